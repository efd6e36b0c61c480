"""Weight quantizers (uniform, stochastic, PWLQ), granularity, n-bit packing and QTensor.

>>> qt = quantize_tensor(w, bits=4, method="pwlq", granularity="channel")
>>> w_hat = qt.dequantize()            # == fake_quantize(w, 4, "pwlq", "channel"), bit for bit
>>> blob = qt.pack()                   # ceil(4*numel/8) bytes, DESIGN §6
"""

from .errors import QuantError
from .granularity import Granularity, param_shape, parse_granularity
from .packing import pack_bits, packed_nbytes, unpack_bits
from .qtensor import SCALE_DTYPES, QTensor, fake_quantize, quantize_tensor
from .quantizers import METHODS

__all__ = [
    "quantize_tensor",
    "fake_quantize",
    "QTensor",
    "pack_bits",
    "unpack_bits",
    "packed_nbytes",
    "METHODS",
    "SCALE_DTYPES",
    "parse_granularity",
    "param_shape",
    "Granularity",
    "QuantError",
]
