"""Prompt sources: MS-COCO caption files (CSV / TSV / qdiff YAML / COCO annotations JSON),
plain text files, and the fixture's own caption grammar.

Drawing is seeded so a sweep or an evaluation sees the same prompts on every machine.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def assets_dir() -> Path:
    """``$QUANTSD_ASSETS`` or ``../shared/assets`` beside the repository."""
    return Path(os.environ.get("QUANTSD_ASSETS", REPO_ROOT.parent / "shared" / "assets"))


def default_coco_captions() -> Path:
    return assets_dir() / "coco2014_val_captions_5k" / "captions_source.tsv"


class PromptError(ValueError):
    """A prompt source that cannot be read or holds no prompts."""


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Every prompt in a file, in file order.

    ``.txt``: one prompt a line; ``.csv``/``.tsv``: the ``caption`` or ``prompt`` column;
    ``.yaml``/``.yml``: a mapping or list of strings (qdiff format); ``.json``: a COCO
    captions annotations file (``annotations[*].caption``, one per image) or a list of strings.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompts file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            fields = reader.fieldnames or []
            column = next((c for c in ("caption", "prompt", "text") if c in fields), None)
            if column is None:
                raise PromptError(f"{path}: no 'caption' or 'prompt' column (columns: {fields})")
            prompts = [row[column] for row in reader]
    elif suffix in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            prompts = [data[k] for k in sorted(data, key=str)]
        elif isinstance(data, list):
            prompts = list(data)
        else:
            raise PromptError(f"{path}: expected a YAML mapping or list of prompts")
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "annotations" in data:
            by_image: dict = {}
            for ann in data["annotations"]:
                by_image.setdefault(ann["image_id"], ann["caption"])
            prompts = [by_image[k] for k in sorted(by_image)]
        elif isinstance(data, list):
            prompts = data
        else:
            raise PromptError(f"{path}: expected a COCO annotations file or a JSON list")
    else:
        prompts = path.read_text(encoding="utf-8").splitlines()
    prompts = [" ".join(str(p).split()) for p in prompts]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise PromptError(f"prompts file {str(path)!r} holds no prompts")
    return prompts


def draw_prompts(source: str | os.PathLike | None, n: int, seed: int = 0, model: str | None = None) -> list[str]:
    """``n`` prompts drawn without replacement with ``seed``.

    ``source=None`` picks the fixture's held-out captions for the fixture model and the
    MS-COCO 2014 val captions otherwise.
    """
    if n < 1:
        raise PromptError(f"number of prompts must be >= 1, got {n}")
    if source is None and model == "fixture":
        from .fixture import captions_for_eval

        return list(captions_for_eval(n, seed=seed)[0])
    pool = read_prompt_file(source if source is not None else default_coco_captions())
    if n > len(pool):
        raise PromptError(f"asked for {n} prompts but the source holds only {len(pool)}")
    return random.Random(seed).sample(pool, n)
