"""On-disk image/latent/feature stores: written as they come, atomically, so a run resumes.

A store is a directory::

    run.json                 what determines its contents (model identity, prompts, seed, ...)
    images/00000.png ...     one PNG per prompt index (uint8 RGB)
    latents/00000.npy ...    the final latents of that prompt (float32)
    features/<key>/b00000.npz  Inception features of one global batch (pool [+ logits], indices)

An index is done when both its PNG and its latents exist; every file is written to a temp name
beside its target and renamed, so an interrupted run never leaves half a file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_bytes, atomic_write_text
from .data import EvalInputError


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


class Store:
    def __init__(self, root: str | os.PathLike, key: dict, overwrite: bool = False, create: bool = True):
        self.root = Path(root)
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))
        meta = self.root / "run.json"
        if meta.exists():
            old = json.loads(meta.read_text(encoding="utf-8"))
            # "model" is the path/name as given: informative only (model_identity is the content)
            if {k: v for k, v in old.items() if k != "model"} != {k: v for k, v in self.key.items() if k != "model"}:
                if not overwrite:
                    diff = sorted(k for k in set(old) | set(self.key) if old.get(k) != self.key.get(k))
                    raise EvalInputError(
                        f"{self.root} holds images generated with different settings (differs in: "
                        f"{', '.join(diff)}); use another output directory or --overwrite")
                for sub in ("images", "latents", "features"):
                    shutil.rmtree(self.root / sub, ignore_errors=True)
                meta.unlink()
        if create and not meta.exists():
            atomic_write_text(meta, json.dumps(self.key, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ images + latents
    def image_path(self, i: int) -> Path:
        return self.root / "images" / f"{i:05d}.png"

    def latent_path(self, i: int) -> Path:
        return self.root / "latents" / f"{i:05d}.npy"

    def done(self, i: int) -> bool:
        return self.image_path(i).exists() and self.latent_path(i).exists()

    def count_done(self, n: int) -> int:
        return sum(self.done(i) for i in range(n))

    def write(self, i: int, image: np.ndarray, latent: np.ndarray, text: dict | None = None) -> None:
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        meta = PngInfo()
        for k, v in (text or {}).items():
            meta.add_text(f"quantsd:{k}", str(v))
        atomic_write_bytes(self.latent_path(i), lambda f: np.save(f, np.asarray(latent, dtype=np.float32)))
        atomic_write_bytes(self.image_path(i), lambda f: Image.fromarray(image).save(f, format="PNG", pnginfo=meta))

    def load_images(self, indices) -> np.ndarray:
        from PIL import Image

        out = []
        for i in indices:
            with Image.open(self.image_path(i)) as im:
                out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        return np.stack(out)

    def load_latents(self, indices) -> np.ndarray:
        return np.stack([np.load(self.latent_path(i)) for i in indices])

    # ------------------------------------------------------------------ features
    def feature_path(self, fkey: str, batch_index: int) -> Path:
        return self.root / "features" / fkey / f"b{batch_index:05d}.npz"


class FeatureCache:
    """Features of one image set under one extractor, one ``.npz`` per global batch."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, b: int) -> Path:
        return self.root / f"b{b:05d}.npz"

    def has(self, b: int) -> bool:
        return self.path(b).exists()

    def write(self, b: int, indices: list[int], pool: np.ndarray, logits: np.ndarray | None) -> None:
        arrays = {"indices": np.asarray(indices), "pool": pool}
        if logits is not None:
            arrays["logits"] = logits
        atomic_write_bytes(self.path(b), lambda f: np.savez(f, **arrays))

    def load(self, n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        pools, logits = [], []
        for b, start in enumerate(range(0, n, batch_size)):
            with np.load(self.path(b)) as z:
                expect = list(range(start, min(n, start + batch_size)))
                if list(z["indices"]) != expect:
                    raise EvalInputError(f"feature cache {self.path(b)} is inconsistent; delete {self.root}")
                pools.append(z["pool"])
                logits.append(z["logits"] if "logits" in z.files else None)
        lg = None if any(x is None for x in logits) else np.concatenate(logits)
        return np.concatenate(pools), lg
