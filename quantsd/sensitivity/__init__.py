"""Per-block quantization sensitivity sweeps (``quantsd sensitivity``)."""

from .config import SweepConfig
from .runner import quantized_block, relative_l2
from .store import ResultStore, SweepDirError
from .sweep import run_sensitivity, summarize

__all__ = ["SweepConfig", "run_sensitivity", "summarize", "relative_l2",
           "quantized_block", "ResultStore", "SweepDirError"]
