"""n-bit code packing (DESIGN §6): one LSB-first bitstream, row-major, padded to a byte.

Code k occupies stream bits ``[k*n, (k+1)*n)``; stream bit j is bit ``j % 8`` of byte
``j // 8``; bit 0 of each code goes first.  So any n in 2..8 costs exactly
``ceil(n * numel / 8)`` bytes, with no per-row or per-code padding.

Both directions are vectorised torch ops on the input's device (CPU or CUDA).  The bit
expansion is ``n`` bytes per element, so long tensors are processed in chunks of
``_CHUNK`` elements (a multiple of 8, hence every chunk starts on a byte boundary) to keep
the temporary at a few MB regardless of the weight size.
"""

from __future__ import annotations

import numbers

import torch

from .errors import QuantError

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes", "check_bits", "MIN_BITS", "MAX_BITS"]

MIN_BITS, MAX_BITS = 2, 8
_CHUNK = 1 << 20  # elements per chunk; multiple of 8


def check_bits(bits: object) -> int:
    """Return ``bits`` as an int if it is an integer in 2..8, else raise QuantError."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise QuantError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r} ({type(bits).__name__})")
    b = int(bits)
    if not MIN_BITS <= b <= MAX_BITS:
        raise QuantError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {b}")
    return b


def packed_nbytes(bits: int, numel: int) -> int:
    """Bytes of the packed bitstream: ``ceil(bits * numel / 8)``."""
    return (int(bits) * int(numel) + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, each in [0, 2^bits-1]) into a 1-D uint8 bitstream.

    The result lives on ``codes.device`` and has exactly ``ceil(bits*numel/8)`` bytes.
    """
    n = check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise QuantError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise QuantError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    flat = codes.reshape(-1)
    numel = flat.numel()
    device = flat.device
    if numel == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi > (1 << n) - 1:
        raise QuantError(f"codes must lie in [0, {(1 << n) - 1}] for bits={n}, got values in [{lo}, {hi}]")
    flat = flat.to(torch.uint8)
    if n == 8:
        return flat.clone()

    out = torch.empty(packed_nbytes(n, numel), dtype=torch.uint8, device=device)
    code_shift = torch.arange(n, dtype=torch.uint8, device=device)
    byte_shift = torch.arange(8, dtype=torch.uint8, device=device)
    for start in range(0, numel, _CHUNK):
        c = flat[start:start + _CHUNK]
        stream = ((c.unsqueeze(1) >> code_shift) & 1).reshape(-1)  # LSB first
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        byts = (stream.view(-1, 8) << byte_shift).sum(1, dtype=torch.uint8)  # disjoint bits: sum == OR
        b0 = start * n // 8
        out[b0:b0 + byts.numel()] = byts
    return out


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``numel`` uint8 codes from a packed bitstream.

    ``packed`` must hold exactly ``ceil(bits*numel/8)`` bytes; anything else means a
    truncated or mismatched checkpoint and raises QuantError.
    """
    n = check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise QuantError(f"packed must be a uint8 torch.Tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral) or numel < 0:
        raise QuantError(f"numel must be a non-negative integer, got {numel!r}")
    numel = int(numel)
    packed = packed.reshape(-1)
    want = packed_nbytes(n, numel)
    if packed.numel() != want:
        raise QuantError(
            f"packed data has {packed.numel()} bytes but {numel} codes of {n} bits need exactly {want} bytes "
            "(truncated, corrupt or mismatched shape/bits)"
        )
    device = packed.device
    if n == 8:
        return packed.clone()
    out = torch.empty(numel, dtype=torch.uint8, device=device)
    code_shift = torch.arange(n, dtype=torch.uint8, device=device)
    byte_shift = torch.arange(8, dtype=torch.uint8, device=device)
    for start in range(0, numel, _CHUNK):
        k = min(_CHUNK, numel - start)
        b0 = start * n // 8
        b1 = packed_nbytes(n, start + k)
        stream = ((packed[b0:b1].unsqueeze(1) >> byte_shift) & 1).reshape(-1)[: k * n]
        out[start:start + k] = (stream.view(k, n) << code_shift).sum(1, dtype=torch.uint8)
    return out
