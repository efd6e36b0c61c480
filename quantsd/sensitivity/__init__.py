"""Per-block quantization sensitivity sweeps (``quantsd sensitivity``)."""

from .config import SweepConfig
from .runner import layer_seed, quantized_block, relative_l2
from .store import ResultStore, SweepDirError
from .sweep import run_sensitivity, summarize

__all__ = ["SweepConfig", "run_sensitivity", "summarize", "relative_l2", "layer_seed",
           "quantized_block", "ResultStore", "SweepDirError"]
