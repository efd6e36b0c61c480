"""Real-weights check: TAEF2 round trip PSNR, fp32 and with 8-bit PWLQ decoder convs."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from quantsd.quant import fake_quantize

ASSETS = Path(os.environ.get("QUANTSD_ASSETS") or Path(__file__).resolve().parents[1].parent / "shared" / "assets")
TAEF2 = ASSETS / "taef2_taesana"

pytestmark = pytest.mark.skipif(not (TAEF2 / "taef2_decoder.pth").is_file(), reason=f"TAEF2 weights not in {TAEF2}")


@pytest.fixture
def one_thread():
    # small tensors on a busy 2-core box: intra-op threading costs far more than it gains
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image() -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    im = skimage_data.chelsea()[64:192, 96:288]  # 128 x 192 crop: the cat's face
    return torch.from_numpy(im.copy()).permute(2, 0, 1)[None].float() / 255


def _psnr(y: torch.Tensor, x: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / float(((y.clamp(0, 1) - x) ** 2).mean()))


def test_taef2_roundtrip_fp32_and_8bit_pwlq(one_thread):
    from quantsd.taesd import load_taef2

    enc, dec = load_taef2(TAEF2)
    assert sum(p.numel() for p in enc.parameters()) == 1_338_528  # SOURCE.txt
    assert sum(p.numel() for p in dec.parameters()) == 1_338_499
    x = _image()
    with torch.no_grad():
        z = enc(x)
        assert z.shape == (1, 32, 16, 24)
        p_fp32 = _psnr(dec(z), x)
        convs = [m for m in dec.modules() if isinstance(m, torch.nn.Conv2d)]
        for i, conv in enumerate(convs):
            conv.weight.copy_(fake_quantize(conv.weight, 8, "pwlq", "tensor", seed=i))
        p_q8 = _psnr(dec(z), x)
    assert p_fp32 > 25, p_fp32
    assert abs(p_q8 - p_fp32) < 1.0, (p_fp32, p_q8)
