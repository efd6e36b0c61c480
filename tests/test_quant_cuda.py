"""CUDA == CPU, bit for bit: quantize, dequantize, pack, unpack, from_packed (skipped without CUDA)."""

from __future__ import annotations

import itertools

import pytest
import torch

from quantsd.quant import METHODS, QTensor, pack_bits, quantize_tensor, unpack_bits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


CASES = list(itertools.product(METHODS, ["tensor", "channel", "group:32"], [2, 3, 4, 5, 8],
                               [torch.float32, torch.float16, torch.bfloat16]))


@pytest.mark.parametrize("method,gran,bits,dtype", CASES)
def test_cuda_matches_cpu(method, gran, bits, dtype):
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(96, 64, 3, 3, generator=g) * 0.05).to(dtype)
    a = quantize_tensor(w, bits, method, gran, seed=7)
    b = quantize_tensor(w.cuda(), bits, method, gran, seed=7)
    assert b.codes.is_cuda and b.scale.is_cuda
    assert torch.equal(a.scale, b.scale.cpu())
    if a.breakpoint is not None:
        assert torch.equal(a.breakpoint, b.breakpoint.cpu())
    assert torch.equal(a.codes, b.codes.cpu())
    db = b.dequantize()
    assert db.is_cuda and db.dtype == dtype
    assert torch.equal(_bits(a.dequantize()), _bits(db.cpu()))
    pa, pb = a.pack(), b.pack()
    assert pb.is_cuda and torch.equal(pa, pb.cpu())
    back = QTensor.from_packed(pb, w.shape, bits, method, gran, b.scale, b.breakpoint, dtype)
    assert torch.equal(_bits(back.dequantize().cpu()), _bits(a.dequantize()))


@pytest.mark.parametrize("bits", range(2, 9))
def test_cuda_pack_large(bits):
    n = 10_000_003
    codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8, device="cuda")
    packed = pack_bits(codes, bits)
    assert packed.numel() == (bits * n + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    assert torch.equal(packed[:4096].cpu(), pack_bits(codes[:32768].cpu(), bits)[:4096])
