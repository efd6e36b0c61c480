"""Evaluation prompts and real images.

Prompts (``--prompts``):

* ``None`` – the fixture's held-out captions when the reference model is ``fixture``, else the
  MS-COCO 2014 val captions shipped in ``../shared/assets`` (``quantsd.prompts``);
* ``fixture`` / ``fixture-train`` – the fixture grammar's held-out / training combinations;
* a COCO annotations JSON (``captions_val2014.json``): one caption per image (the first
  annotation of each image id), images drawn with the seed; the image file names are kept so a
  ``--real-images`` directory of COCO val images pairs each caption with its own image;
* a CSV / TSV / TXT / YAML file (``quantsd.prompts.read_prompt_file``);
* ``hf:ORG/NAME[:SPLIT][#COLUMN]`` – the Hugging Face ``datasets`` library (needs hub access;
  fails with a clear message offline).

Real images (FID / KID / IS): a directory of images (COCO val2014), each resized so its short
edge is 256 (bicubic) and center-cropped to 256x256 (the paper's protocol); for the fixture,
the procedural ground-truth renders of exactly the evaluated prompts (no directory needed).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..prompts import PromptError, default_coco_captions, read_prompt_file

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FIXTURE_SOURCES = ("fixture", "fixture-train")


class EvalInputError(ValueError):
    """Bad evaluation input (prompts, real images, sizes); the message says how to fix it."""


@dataclass
class PromptSet:
    prompts: list[str]
    source: str                       # human-readable description of where they came from
    attrs: dict | None = None         # fixture ground-truth attributes (name -> (n,) long), else None
    file_names: list[str] | None = None  # COCO image file names paired with the captions, if known
    fixture_split: str | None = None  # "heldout" / "train" for fixture prompts

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.prompts).encode()).hexdigest()


def _coco_json(path: Path) -> tuple[list[str], list[str | None]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "annotations" not in data:
        raise EvalInputError(f"{path}: not a COCO captions annotations file (no 'annotations')")
    names = {im["id"]: im.get("file_name") for im in data.get("images", [])}
    first: dict = {}
    for ann in data["annotations"]:
        first.setdefault(ann["image_id"], " ".join(str(ann["caption"]).split()))
    ids = sorted(first)
    return [first[i] for i in ids], [names.get(i) for i in ids]


def _from_datasets(spec: str) -> list[str]:
    body = spec.split(":", 1)[1]
    column = None
    if "#" in body:
        body, column = body.split("#", 1)
    name, _, split = body.partition(":")
    split = split or "validation"
    try:
        import datasets  # noqa: F401
        from datasets import load_dataset
    except ImportError as exc:
        raise EvalInputError("--prompts hf:... needs the `datasets` package") from exc
    try:
        ds = load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown dataset, gated
        raise EvalInputError(
            f"could not load captions {name!r} (split {split!r}) with the datasets library "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). This needs access to the "
            "Hugging Face hub; offline, pass a COCO annotations file (--prompts captions_val2014.json) or a "
            "CSV/TSV of captions instead") from exc
    cols = ds.column_names
    column = column or next((c for c in ("caption", "captions", "sentences", "text", "prompt") if c in cols), None)
    if column is None:
        raise EvalInputError(f"dataset {name!r} has no caption column (columns: {cols}); add #COLUMN")
    out = []
    for v in ds[column]:
        if isinstance(v, (list, tuple)):
            v = v[0] if v else ""
            if isinstance(v, dict):  # e.g. {"raw": "..."}
                v = v.get("raw") or next(iter(v.values()), "")
        out.append(" ".join(str(v).split()))
    return [p for p in out if p]


def load_prompts(source: str | None, n: int, seed: int = 0, fixture: bool = False) -> PromptSet:
    """``n`` evaluation prompts, drawn with ``seed`` (one caption per image for COCO)."""
    if n < 1:
        raise EvalInputError(f"--num-prompts must be >= 1, got {n}")
    if (source is None and fixture) or source in FIXTURE_SOURCES:
        from ..fixture.data import captions_for_eval

        held_out = source != "fixture-train"
        prompts, attrs = captions_for_eval(n, seed=seed, held_out=held_out)
        split = "heldout" if held_out else "train"
        return PromptSet(list(prompts), f"fixture grammar, {split} (colour, shape, position) combinations, "
                                        f"captions_for_eval(n={n}, seed={seed})", attrs=attrs, fixture_split=split)
    names: list[str | None] | None = None
    if source is not None and str(source).startswith("hf:"):
        pool = _from_datasets(str(source))
        desc = f"datasets: {str(source)[3:]}"
    else:
        path = Path(source).expanduser() if source is not None else default_coco_captions()
        if not path.is_file():
            raise EvalInputError(f"prompts source {str(path)!r} does not exist"
                                 + ("" if source is not None else
                                    " (the default MS-COCO captions live in ../shared/assets; set QUANTSD_ASSETS or "
                                    "pass --prompts)"))
        if path.suffix.lower() == ".json":
            try:
                pool, names = _coco_json(path)
            except EvalInputError:
                pool = read_prompt_file(path)
        else:
            try:
                pool = read_prompt_file(path)
            except PromptError as exc:
                raise EvalInputError(str(exc)) from exc
        desc = f"{path.name}"
    if n > len(pool):
        raise EvalInputError(f"asked for {n} prompts but {desc} holds only {len(pool)} (one caption per image)")
    idx = random.Random(seed).sample(range(len(pool)), n)
    return PromptSet([pool[i] for i in idx], f"{desc}: {n} of {len(pool)} captions drawn with seed {seed}",
                     file_names=[names[i] for i in idx] if names and all(names[i] for i in idx) else None)


# --------------------------------------------------------------------------- real images
def center_crop_resize(img, size: int = 256) -> np.ndarray:
    """PIL image -> uint8 (size, size, 3): short edge resized to ``size`` (bicubic), center crop."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def preprocess_generated(images: np.ndarray, size: int | None) -> np.ndarray:
    """Generated uint8 (N, H, W, 3) -> the real-image protocol (short edge ``size`` + center crop)."""
    if size is None or images.shape[1:3] == (size, size):
        return images
    from PIL import Image

    return np.stack([center_crop_resize(Image.fromarray(im), size) for im in images])


@dataclass
class RealImages:
    """A real-image set: ``load(indices)`` -> uint8 (k, H, W, 3)."""

    kind: str                    # "directory" | "fixture"
    description: str
    count: int
    key: dict = field(default_factory=dict)
    files: list[Path] | None = None
    size: int | None = 256
    _fixture_attrs: dict | None = None
    _fixture_size: int = 64

    def load(self, indices) -> np.ndarray:
        if self.kind == "fixture":
            from ..fixture import data as fx

            sub = {k: v[list(indices)] for k, v in self._fixture_attrs.items()}
            x = fx.render(sub, image_size=self._fixture_size)
            return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        from PIL import Image

        out = []
        for i in indices:
            f = self.files[i]
            try:
                with Image.open(f) as im:
                    out.append(center_crop_resize(im, self.size))
            except Exception as exc:
                raise EvalInputError(f"real image {str(f)!r} cannot be read ({type(exc).__name__}: {exc}); "
                                     "remove or replace it and run again (finished work is kept)") from exc
        return np.stack(out)


def fixture_real_images(prompts: PromptSet, n: int, seed: int, image_size: int) -> RealImages:
    """Ground-truth procedural renders of exactly the evaluated fixture prompts."""
    from ..fixture import data as fx

    split = prompts.fixture_split or "heldout"
    attrs = fx.sample_attributes(n, seed + 7_777_777, split)  # the draw behind captions_for_eval (incl. jitter)
    return RealImages("fixture", f"procedural fixture renders of the {n} evaluated prompts ({split}), "
                                 f"{image_size}x{image_size}, quantsd.fixture.data.render",
                      n, key={"kind": "fixture", "n": n, "seed": seed, "split": split, "size": image_size},
                      size=None, _fixture_attrs=attrs, _fixture_size=image_size)


def directory_real_images(directory: str | Path, n: int, seed: int = 0, size: int = 256,
                          file_names: list[str] | None = None, verify: bool = True) -> RealImages:
    """Up to ``n`` images from ``directory`` (paired with the prompts' COCO file names when all are
    present; otherwise drawn with ``seed``). Every chosen file is opened first, so an unreadable one
    is reported before any generation starts."""
    d = Path(directory).expanduser()
    if not d.exists():
        raise EvalInputError(f"--real-images directory {str(d)!r} does not exist")
    if not d.is_dir():
        raise EvalInputError(f"--real-images {str(d)!r} is not a directory")
    files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise EvalInputError(f"--real-images directory {str(d)!r} holds no images ({', '.join(IMAGE_EXTS)})")
    paired = False
    if file_names:
        by_name = {p.name: p for p in files}
        if all(fn in by_name for fn in file_names):
            chosen, paired = [by_name[fn] for fn in file_names], True
    if not paired:
        k = min(n, len(files))
        chosen = [files[i] for i in sorted(random.Random(seed).sample(range(len(files)), k))]
    if verify:
        from PIL import Image

        bad = []
        for f in chosen:
            try:
                with Image.open(f) as im:
                    im.verify()
            except Exception as exc:
                bad.append(f"{f} ({type(exc).__name__})")
        if bad:
            raise EvalInputError(f"{len(bad)} real image(s) cannot be read: {'; '.join(bad[:5])}"
                                 + (" ..." if len(bad) > 5 else "") + ". Remove or replace them and run again")
    listing = hashlib.sha256("\n".join(f"{p.relative_to(d)}:{p.stat().st_size}" for p in chosen).encode()).hexdigest()
    how = "paired with the prompts' COCO image ids" if paired else f"{len(chosen)} of {len(files)} drawn with seed {seed}"
    return RealImages("directory", f"{d} ({how}), short edge resized to {size} (bicubic), center-cropped "
                                   f"{size}x{size}", len(chosen),
                      key={"kind": "directory", "dir": str(d.resolve()), "listing": listing, "size": size},
                      files=chosen, size=size)
