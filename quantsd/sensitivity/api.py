"""One call from a model name to a finished sweep (what the CLI runs)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models import load_pipeline
from ..prompts import draw_prompts
from .config import SweepConfig
from .sweep import run_sensitivity, summarize


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sensitivity_from_model(model: str, *, methods, bits, granularity="tensor", prompts_file=None,
                           num_prompts=8, steps=20, guidance=7.5, seed=0, height=None, width=None,
                           dtype="float32", device=None, batch_size=8, out_dir: str | Path,
                           progress: bool = True, limit: int | None = None) -> tuple[list[dict], dict]:
    """Validate the configuration *before* loading the model, then run or resume the sweep."""
    prompts = draw_prompts(prompts_file, num_prompts, seed=seed, model=model)
    config = SweepConfig(model=str(model), prompts=tuple(prompts), methods=tuple(methods), bits=tuple(bits),
                         granularity=granularity, steps=steps, guidance=guidance, seed=seed, height=height,
                         width=width, dtype=dtype)
    device = device or default_device()
    pipe = load_pipeline(model, dtype=dtype, device=device)
    records = run_sensitivity(pipe, config, out_dir, device=device, batch_size=batch_size,
                              progress=progress, limit=limit)
    return records, summarize(records)
