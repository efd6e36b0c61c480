"""Metrics from features: one implementation (torchmetrics) plus direct numpy/scipy cross-checks.

FID / KID / IS are computed by torchmetrics' ``FrechetInceptionDistance``,
``KernelInceptionDistance`` and ``InceptionScore``, each given a *pass-through* ``feature``
module: the Inception features are extracted once (sharded, cached on disk) and handed to
torchmetrics as its "images", so the metric arithmetic is torchmetrics' own and the network
is ours (see :mod:`.features`). :func:`fid_numpy` recomputes FID from the same features with
numpy/scipy (``scipy.linalg.sqrtm``) and every report carries both.

Pixel/latent metrics against the full-precision reference:

* ``latent_mse``: mean over prompts of ``mean((z_q - z_ref)^2)`` over the final latents (the
  paper's MSE; same prompts, same initial noise);
* ``psnr``: ``10 log10(255^2 / MSE)`` with MSE over all pixels of all uint8 images (one number
  for the set; ``None`` when the images are identical, i.e. infinite PSNR).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn

METRICS_IMPLEMENTATION = "torchmetrics"


def torchmetrics_version() -> str:
    import torchmetrics

    return torchmetrics.__version__


class PassThrough(nn.Module):
    """torchmetrics ``feature=`` module whose input already is the feature matrix."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """torchmetrics ``FrechetInceptionDistance`` on precomputed features (float64 throughout)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    r, f = _as_tensor(real), _as_tensor(fake)
    m = FrechetInceptionDistance(feature=PassThrough(r.shape[1]), reset_real_features=False, sync_on_compute=False)
    m.set_dtype(torch.float64)
    m.update(r, real=True)
    m.update(f, real=False)
    return float(m.compute())


def fid_numpy(real: np.ndarray, fake: np.ndarray, eps: float = 1e-6) -> float:
    """Direct numpy/scipy Frechet distance (the pytorch-fid formula), the cross-check."""
    from scipy import linalg

    a, b = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular covariances (fewer images than dims) are handled below
        covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def check_kid_sizes(n_real: int, n_fake: int, subset_size: int) -> None:
    if subset_size < 2:
        raise ValueError(f"KID subset size must be >= 2, got {subset_size}")
    if min(n_real, n_fake) < subset_size:
        raise ValueError(
            f"KID needs at least --kid-subset-size={subset_size} images in each set, but there are "
            f"{n_real} real and {n_fake} generated; pass a smaller --kid-subset-size (<= {min(n_real, n_fake)}) "
            "or evaluate more prompts")


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> tuple[float, float]:
    """torchmetrics ``KernelInceptionDistance`` (polynomial kernel, unbiased MMD^2; mean, std over
    random subsets drawn with ``torch.randperm`` under ``seed``)."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    r, f = _as_tensor(real), _as_tensor(fake)
    check_kid_sizes(len(r), len(f), subset_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features in buffer"
        m = KernelInceptionDistance(feature=PassThrough(r.shape[1]), subsets=subsets, subset_size=subset_size,
                                    degree=degree, gamma=gamma, coef=coef, reset_real_features=False,
                                    sync_on_compute=False)
    m.update(r, real=True)
    m.update(f, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


def kid_numpy(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
              degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> tuple[float, float]:
    """Direct numpy KID on the same subsets as :func:`kid` (same ``torch.randperm`` draws)."""
    a, b = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    check_kid_sizes(len(a), len(b), subset_size)
    g = 1.0 / a.shape[1] if gamma is None else gamma
    vals = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(subsets):
            x = a[torch.randperm(len(a)).numpy()[:subset_size]]
            y = b[torch.randperm(len(b)).numpy()[:subset_size]]
            kxx, kyy, kxy = ((x @ x.T) * g + coef) ** degree, ((y @ y.T) * g + coef) ** degree, \
                ((x @ y.T) * g + coef) ** degree
            m = subset_size
            vals.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m ** 2)
    v = np.array(vals)
    return float(v.mean()), float(v.std())


def inception_score(logits: np.ndarray, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """torchmetrics ``InceptionScore`` from logits (softmax inside; random permutation under ``seed``)."""
    import warnings

    from torchmetrics.image.inception import InceptionScore

    x = _as_tensor(logits)
    if len(x) < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} images, got {len(x)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features in buffer"
        m = InceptionScore(feature=PassThrough(x.shape[1]), splits=splits, sync_on_compute=False)
    m.update(x)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


def inception_score_numpy(logits: np.ndarray, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Direct numpy IS on the same permutation and chunks as :func:`inception_score`."""
    x = np.asarray(logits, dtype=np.float64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        x = x[torch.randperm(len(x)).numpy()]
    x = x - x.max(1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(1, keepdims=True))
    p = np.exp(logp)
    scores = []
    for pc, lc in zip(_torch_chunks(p, splits), _torch_chunks(logp, splits)):
        q = pc.mean(0, keepdims=True)
        scores.append(np.exp((pc * (lc - np.log(q))).sum(1).mean()))
    s = np.array(scores)
    return float(s.mean()), float(s.std(ddof=1)) if len(s) > 1 else float("nan")


def _torch_chunks(a: np.ndarray, k: int) -> list[np.ndarray]:
    """``torch.chunk`` semantics (ceil-sized chunks), which torchmetrics' IS uses."""
    return [c.numpy() for c in torch.from_numpy(a).chunk(k, dim=0)]


def latent_mse(z: np.ndarray, z_ref: np.ndarray) -> float:
    """Mean over samples of the per-sample mean squared latent difference (float64)."""
    a = np.asarray(z, dtype=np.float64).reshape(len(z), -1)
    b = np.asarray(z_ref, dtype=np.float64).reshape(len(z_ref), -1)
    if a.shape != b.shape:
        raise ValueError(f"latent shapes differ: {a.shape} vs {b.shape}")
    return float(((a - b) ** 2).mean(1).mean())


def psnr(images: np.ndarray, ref: np.ndarray) -> float | None:
    """PSNR (dB) of uint8 images against reference images, MSE pooled over the whole set;
    ``None`` if they are identical."""
    a, b = np.asarray(images, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    mse = float(((a - b) ** 2).mean())
    return None if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))
