"""Triton kernels for packed weights (CUDA; the CPU runs them only under TRITON_INTERPRET=1).

The pure-torch decode in :mod:`quantsd.nn` stays the reference and the CPU path; these kernels
reproduce it bit for bit (tests/test_kernels.py).  ``dequant``: one dense weight per launch (and the
custom op compiled graphs call); ``grouped``: several layers' weights per launch (eager); ``fused``: an
experimental dequant-GEMM that never writes the dense weight (off by default: measured slower so far,
BENCHMARKS.md).
"""

from .dequant import HAS_TRITON, available, dequantize, interpreting, level_table, prepare

__all__ = ["HAS_TRITON", "available", "dequantize", "interpreting", "level_table", "prepare"]
