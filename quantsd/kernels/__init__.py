"""Triton kernels for packed weights (CUDA; the CPU runs them only under TRITON_INTERPRET=1).

The pure-torch decode in :mod:`quantsd.nn` stays the reference and the CPU path; these kernels
reproduce it bit for bit (tests/test_kernels.py).
"""

from .dequant import HAS_TRITON, available, dequantize, interpreting, level_table, prepare

__all__ = ["HAS_TRITON", "available", "dequantize", "interpreting", "level_table", "prepare"]
