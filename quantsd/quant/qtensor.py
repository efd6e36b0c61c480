"""QTensor (codes + stored parameters) and the quantize_tensor / fake_quantize entry points.

The one rule this module keeps: a weight's simulated value is *defined* as the decode of
its codes with its stored (fp16 by default) parameters.  fake_quantize is literally
``quantize_tensor(...).dequantize()``, and a QTensor rebuilt from a packed checkpoint runs
the same decode, so simulated and loaded weights agree bit for bit.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import QuantError
from .granularity import grouped_view, param_shape, parse_granularity
from .packing import check_bits, pack_bits, packed_nbytes, unpack_bits
from .quantizers import METHODS, PWLQ_METHODS, STOCHASTIC_METHODS, decode, encode, pwlq_breakpoint, uniform_scale

__all__ = ["QTensor", "quantize_tensor", "fake_quantize", "SCALE_DTYPES"]

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_method(method: object) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise QuantError(f"unknown quantization method {method!r}; valid: {', '.join(METHODS)}")
    return method


def _check_scale_dtype(dt: object) -> torch.dtype:
    if dt not in SCALE_DTYPES:
        raise QuantError(f"scale_dtype must be one of {', '.join(str(d) for d in SCALE_DTYPES)}, got {dt!r}")
    return dt  # type: ignore[return-value]


@dataclass
class QTensor:
    """A quantized weight: uint8 codes (shape of the weight) + scale (+ breakpoint for pwlq).

    ``scale``/``breakpoint`` are stored in the scale dtype with the granularity's parameter
    shape ([] / [out] / [out, row//G]).  ``pack()`` gives the checkpoint bitstream and
    ``from_packed`` rebuilds an identical QTensor from it.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    breakpoint: torch.Tensor | None
    bits: int
    method: str
    granularity: str
    shape: torch.Size
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return self.codes.numel()

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes_packed(self) -> int:
        """Checkpoint bytes: ceil(bits*numel/8) for the codes + the stored parameters."""
        n = packed_nbytes(self.bits, self.numel) + self.scale.numel() * self.scale.element_size()
        if self.breakpoint is not None:
            n += self.breakpoint.numel() * self.breakpoint.element_size()
        return n

    def dequantize(self) -> torch.Tensor:
        """The simulated weight: decode of the codes with the stored parameters, in ``dtype``."""
        pshape = tuple(self.scale.shape)
        cv = grouped_view(self.codes, pshape)
        p = None if self.breakpoint is None else self.breakpoint.float()
        with torch.no_grad():
            w = decode(cv, self.method, self.bits, self.scale.float(), p)
        return w.reshape(self.shape).to(self.dtype)

    def pack(self) -> torch.Tensor:
        """The codes as one LSB-first n-bit stream (1-D uint8), DESIGN §6."""
        return pack_bits(self.codes, self.bits)

    def to(self, device: "torch.device | str") -> "QTensor":
        """A copy on ``device`` (decode is elementwise, so results do not change)."""
        bp = None if self.breakpoint is None else self.breakpoint.to(device)
        return QTensor(self.codes.to(device), self.scale.to(device), bp, self.bits, self.method,
                       self.granularity, self.shape, self.dtype)

    @classmethod
    def from_packed(
        cls,
        packed: torch.Tensor,
        shape: Sequence[int],
        bits: int,
        method: str,
        granularity: str,
        scale: torch.Tensor,
        breakpoint: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> "QTensor":
        """Rebuild a QTensor from checkpoint pieces, validating every size before use."""
        bits = check_bits(bits)
        method = _check_method(method)
        gran = parse_granularity(granularity)
        try:
            shape = torch.Size(int(s) for s in shape)
        except (TypeError, ValueError) as e:
            raise QuantError(f"shape must be a sequence of ints, got {shape!r}") from e
        if any(s < 0 for s in shape):
            raise QuantError(f"shape must be non-negative, got {list(shape)}")
        pshape = param_shape(shape, gran)
        if not isinstance(scale, torch.Tensor) or not scale.dtype.is_floating_point:
            raise QuantError("scale must be a floating-point torch.Tensor")
        if tuple(scale.shape) != pshape:
            raise QuantError(f"scale has shape {list(scale.shape)} but granularity {gran} on shape {list(shape)} needs {list(pshape)}")
        if method in PWLQ_METHODS:
            if breakpoint is None:
                raise QuantError(f"method {method!r} needs a breakpoint tensor")
            if not isinstance(breakpoint, torch.Tensor) or tuple(breakpoint.shape) != pshape:
                raise QuantError(f"breakpoint must be a tensor of shape {list(pshape)}, got "
                                 f"{list(breakpoint.shape) if isinstance(breakpoint, torch.Tensor) else type(breakpoint).__name__}")
        elif breakpoint is not None:
            raise QuantError(f"method {method!r} takes no breakpoint")
        numel = shape.numel()
        codes = unpack_bits(packed, bits, numel).reshape(shape)
        dev = codes.device
        bp = None if breakpoint is None else breakpoint.to(dev)
        return cls(codes, scale.to(dev), bp, bits, method, str(gran), shape, dtype)

    def __repr__(self) -> str:
        return (f"QTensor(shape={list(self.shape)}, dtype={self.dtype}, bits={self.bits}, method={self.method!r}, "
                f"granularity={self.granularity!r}, scale_dtype={self.scale.dtype}, nbytes_packed={self.nbytes_packed})")


def _uniform_noise(numel: int, seed: int, device: torch.device) -> torch.Tensor:
    """u ~ Unif(-1/2, 1/2) from a CPU generator, so CPU and CUDA results are identical."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return (torch.rand(numel, generator=g, dtype=torch.float32) - 0.5).to(device)


def quantize_tensor(
    w: torch.Tensor,
    bits: int = 4,
    method: str = "pwlq",
    granularity: str = "tensor",
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float16,
) -> QTensor:
    """Quantize ``w`` to n-bit codes with the paper's quantizers (see quantizers.py).

    ``method`` is one of METHODS: "uniform", "stochastic", "pwlq" (deterministic
    round-to-nearest PWLQ, the default because stochastic rounding roughly doubles the
    MSE) or "pwlq-stochastic" (the paper's stochastic-rounding PWLQ).  ``seed`` drives the
    stochastic methods' noise (CPU generator; identical results on CPU and CUDA).
    Parameters are rounded to ``scale_dtype`` first and the rounded values are used for
    encoding and decoding alike.
    """
    if not isinstance(w, torch.Tensor):
        raise QuantError(f"weight must be a torch.Tensor, got {type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise QuantError(f"weight must be a floating-point tensor, got dtype {w.dtype}")
    bits = check_bits(bits)
    method = _check_method(method)
    gran = parse_granularity(granularity)
    scale_dtype = _check_scale_dtype(scale_dtype)
    if w.numel() == 0:
        raise QuantError(f"cannot quantize an empty tensor (shape {list(w.shape)})")
    pshape = param_shape(w.shape, gran)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise QuantError(f"seed must be an int, got {seed!r}")

    with torch.no_grad():
        bad = int((~torch.isfinite(w)).sum())
        if bad:
            raise QuantError(f"weight contains {bad} NaN/Inf values (shape {list(w.shape)}); cannot quantize")
        wv = grouped_view(w.detach().float(), pshape)

        m_stored = uniform_scale(wv).to(scale_dtype)
        if not bool(torch.isfinite(m_stored).all()):
            raise QuantError(
                f"max|w| = {float(wv.abs().max()):.6g} does not fit the {scale_dtype} scale "
                f"(max {torch.finfo(scale_dtype).max:.6g}); pass scale_dtype=torch.float32"
            )
        m = m_stored.float()
        bp_stored = None
        p = None
        if method in PWLQ_METHODS:
            bp_stored = pwlq_breakpoint(wv, m).to(scale_dtype)
            p = bp_stored.float()
        noise = None
        if method in STOCHASTIC_METHODS:
            noise = _uniform_noise(w.numel(), seed, w.device).reshape(wv.shape)
        codes = encode(wv, method, bits, m, p, noise).reshape(w.shape)

    return QTensor(codes, m_stored, bp_stored, bits, method, str(gran), w.shape, w.dtype)


def fake_quantize(
    w: torch.Tensor,
    bits: int = 4,
    method: str = "uniform",
    granularity: str = "tensor",
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Simulated quantization: exactly ``quantize_tensor(...).dequantize()`` (same shape/dtype as w)."""
    return quantize_tensor(w, bits, method, granularity, seed, scale_dtype).dequantize()
