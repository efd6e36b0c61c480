"""TAEF2: a tiny real-weights conv autoencoder, used as a quantization test bed.

Written from the state_dict layout described in ``assets/taef2_taesana/SOURCE.txt``
(github.com/madebyollin/taesd, MIT).  It is not SD-compatible (FLUX.2 latent space); we
use it because it is a *trained* conv net with a meaningful end-to-end metric
(image -> encoder -> decoder, PSNR vs the input), which random-init models lack.

Layout (``nn.Sequential`` indices match the checkpoint keys):
  Block(c):   conv(c,c) ReLU conv(c,c) ReLU conv(c,c)  [keys conv.0/2/4], + identity, ReLU;
              with mid-block GN first ``x = x + pool(x)``,
              pool = Conv1x1(c, 4c, no bias), GroupNorm(4, 4c), ReLU, Conv1x1(4c, c, no bias).
  encoder:    conv(3,64) Block | s2conv Block x3 | s2conv Block x3 | s2conv Block(GN) x3 | conv(64,32)
  decoder:    Clamp(tanh(x/3)*3) conv(32,64) ReLU Block(GN) x3 | Up conv Block x3 | Up conv Block x3
              | Up conv Block | conv(64,3)
Images are in [0, 1]; latents are raw (32 channels at 1/8 resolution).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["TAEBlock", "Clamp", "taef2_encoder", "taef2_decoder", "load_taef2", "default_asset_dir"]


def _conv(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latent to (-3, 3) at the decoder input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class TAEBlock(nn.Module):
    """Residual 3-conv block, optionally preceded by the GroupNorm 'mid-block' pool branch."""

    def __init__(self, c: int = 64, midblock_gn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))
        self.pool = (
            nn.Sequential(
                nn.Conv2d(c, 4 * c, 1, bias=False),
                nn.GroupNorm(4, 4 * c),
                nn.ReLU(),
                nn.Conv2d(4 * c, c, 1, bias=False),
            )
            if midblock_gn
            else None
        )
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


def taef2_encoder(c: int = 64, latent_channels: int = 32) -> nn.Sequential:
    """Image [0,1] (3 ch) -> raw latent (32 ch, 1/8 resolution)."""
    layers: list[nn.Module] = [_conv(3, c), TAEBlock(c)]
    for gn in (False, False, True):
        layers += [_conv(c, c, stride=2, bias=False)] + [TAEBlock(c, gn) for _ in range(3)]
    layers.append(_conv(c, latent_channels))
    return nn.Sequential(*layers)


def taef2_decoder(c: int = 64, latent_channels: int = 32) -> nn.Sequential:
    """Raw latent (32 ch) -> image, nominally [0,1] (not clamped here)."""
    layers: list[nn.Module] = [Clamp(), _conv(latent_channels, c), nn.ReLU()]
    layers += [TAEBlock(c, True) for _ in range(3)]
    for n_blocks in (3, 3, 1):
        layers += [nn.Upsample(scale_factor=2), _conv(c, c, bias=False)] + [TAEBlock(c) for _ in range(n_blocks)]
    layers.append(_conv(c, 3))
    return nn.Sequential(*layers)


def default_asset_dir() -> Path:
    """``$QUANTSD_ASSETS/taef2_taesana`` or ``<repo>/../shared/assets/taef2_taesana``."""
    root = os.environ.get("QUANTSD_ASSETS")
    base = Path(root) if root else Path(__file__).resolve().parents[1].parent / "shared" / "assets"
    return base / "taef2_taesana"


def load_taef2(asset_dir: "str | os.PathLike[str] | None" = None,
               dtype: torch.dtype = torch.float32) -> tuple[nn.Sequential, nn.Sequential]:
    """(encoder, decoder) in eval mode with the real weights; strict key/shape match.

    The checkpoints are fp16 state_dicts loaded with ``weights_only=True`` (no pickle
    code execution); they are cast to ``dtype`` (fp32 by default: the reference).
    """
    d = Path(asset_dir) if asset_dir is not None else default_asset_dir()
    if d.name != "taef2_taesana" and (d / "taef2_taesana").is_dir():
        d = d / "taef2_taesana"
    nets = []
    for name, build in (("taef2_encoder.pth", taef2_encoder), ("taef2_decoder.pth", taef2_decoder)):
        path = d / name
        if not path.is_file():
            raise FileNotFoundError(f"TAEF2 weights not found: {path} (set QUANTSD_ASSETS to the assets directory)")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        net = build()
        net.load_state_dict(sd, strict=True)
        nets.append(net.to(dtype).eval().requires_grad_(False))
    return nets[0], nets[1]
