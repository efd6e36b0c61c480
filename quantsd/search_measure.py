"""Measure a recipe for real: all its blocks quantized together, against a sweep's reference.

The search predicts a bit map's error from single-block measurements; this runs the whole
quantized pipeline on the sweep's prompts, seed and noise and reports the measured error at
the final latents and image, so predicted and measured can be put side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import load_pipeline
from .recipe import apply_recipe, load_recipe
from .sensitivity.config import SweepConfig
from .sensitivity.runner import PipelineRunner, load_or_compute_reference, relative_l2


def sweep_config_from_dir(sensitivity_dir: str | Path) -> SweepConfig:
    meta = json.loads((Path(sensitivity_dir) / "sweep.json").read_text())
    fields = {k: meta[k] for k in ("model", "granularity", "steps", "guidance", "seed", "height", "width",
                                   "dtype")}
    return SweepConfig(prompts=tuple(meta["prompts"]), methods=tuple(meta["methods"]), bits=tuple(meta["bits"]),
                       components=tuple(meta["components"]), **fields)


def measure_recipe(recipe, sensitivity_dir: str | Path, model: str | None = None,
                   device: str | None = None, batch_size: int = 8) -> dict:
    """Relative L2 error (%) of the fully quantized pipeline at text embeddings, latents and image."""
    config = sweep_config_from_dir(sensitivity_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(model or config.model, dtype=config.dtype, device=device)
    runner = PipelineRunner(pipe, config, torch.device(device), batch_size=batch_size)
    ref = load_or_compute_reference(runner, Path(sensitivity_dir) / "reference.safetensors")
    plan = apply_recipe(pipe, load_recipe(recipe), warn=False)
    cond, uncond = runner.encode(list(config.prompts)), runner.encode([""])
    latents = runner.sample(cond, uncond, ref.noise)
    image = runner.decode(latents)
    return {"text_embedding_error": relative_l2(cond, ref.cond), "latent_error": relative_l2(latents, ref.latents),
            "image_error": relative_l2(image, ref.image),
            "quantized_bytes": sum(lp.nbytes for lp in plan.layers), "prompts": len(config.prompts)}
