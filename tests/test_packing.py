"""n-bit packing: layout (DESIGN §6), identity, sizes, chunking and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantsd.quant.packing as packing
from quantsd.quant import QuantError, pack_bits, unpack_bits


def reference_pack(codes: list[int], bits: int) -> bytes:
    """Bit-by-bit reference: code k's bit i is stream bit k*bits+i, LSB first in each byte."""
    out = bytearray(math.ceil(bits * len(codes) / 8))
    for k, c in enumerate(codes):
        for i in range(bits):
            if (c >> i) & 1:
                j = k * bits + i
                out[j // 8] |= 1 << (j % 8)
    return bytes(out)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), data=st.data())
def test_pack_unpack_identity_and_layout(bits, data):
    n = data.draw(st.integers(0, 257))
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n))
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_bits(t, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(bits * n / 8)
    assert bytes(packed.tolist()) == reference_pack(codes, bits)
    back = unpack_bits(packed, bits, n)
    assert back.dtype == torch.uint8
    assert torch.equal(back, t)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 9, 13, 1001])
def test_odd_lengths_all_bits(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    t = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64)
    packed = pack_bits(t, bits)
    assert packed.numel() == math.ceil(bits * n / 8)
    assert torch.equal(unpack_bits(packed, bits, n), t.to(torch.uint8))


def test_known_bytes():
    # 3-bit codes 5 (101), 3 (011): stream 1,0,1, 1,1,0, pad 0,0 -> 0b00011101 = 29
    assert pack_bits(torch.tensor([5, 3]), 3).tolist() == [29]
    # 4-bit: low nibble first
    assert pack_bits(torch.tensor([0x1, 0xF, 0x2]), 4).tolist() == [0xF1, 0x02]
    # 2-bit: four codes per byte, first code in bits 0-1
    assert pack_bits(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b10010011]


def test_padding_bits_are_zero():
    packed = pack_bits(torch.full((3,), 7), 3)  # 9 bits -> 2 bytes, last 7 bits padding
    assert packed.tolist() == [0xFF, 0x01]


@pytest.mark.parametrize("bits", [3, 5, 7, 8])
def test_chunked_path_matches_reference(monkeypatch, bits):
    monkeypatch.setattr(packing, "_CHUNK", 16)  # force many chunks on a short input
    g = torch.Generator().manual_seed(bits)
    n = 16 * 5 + 3
    t = torch.randint(0, 1 << bits, (n,), generator=g)
    packed = pack_bits(t, bits)
    assert bytes(packed.tolist()) == reference_pack(t.tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, n), t.to(torch.uint8))


def test_multidim_codes_are_row_major():
    t = torch.arange(16).reshape(4, 4) % 8
    assert torch.equal(pack_bits(t, 3), pack_bits(t.reshape(-1), 3))
    assert torch.equal(pack_bits(t.t(), 3), pack_bits(t.t().contiguous().reshape(-1), 3))


def test_large_tensor_roundtrip():
    n = (1 << 21) + 5  # crosses the real chunk size
    t = torch.randint(0, 8, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_bits(t, 3)
    assert packed.numel() == math.ceil(3 * n / 8)
    assert torch.equal(unpack_bits(packed, 3, n), t)


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(QuantError, match="bits must be an integer in 2..8"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(QuantError, match="bits must be an integer in 2..8"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), bits, 4)


def test_codes_out_of_range():
    with pytest.raises(QuantError, match=r"codes must lie in \[0, 7\]"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(QuantError, match=r"codes must lie in \[0, 3\]"):
        pack_bits(torch.tensor([-1, 2]), 2)


def test_float_codes_rejected():
    with pytest.raises(QuantError, match="integer tensor"):
        pack_bits(torch.tensor([1.0, 2.0]), 4)


def test_unpack_wrong_length():
    packed = pack_bits(torch.tensor([1, 2, 3]), 4)  # 2 bytes
    with pytest.raises(QuantError, match="need exactly 3 bytes"):
        unpack_bits(packed, 4, 5)
    with pytest.raises(QuantError, match="truncated"):
        unpack_bits(packed[:1], 4, 3)
    with pytest.raises(QuantError, match="uint8"):
        unpack_bits(packed.to(torch.int32), 4, 3)
