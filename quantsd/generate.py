"""Text-to-image generation from any model source or quantsd checkpoint (DESIGN §7).

``generate(model, prompt, ...)`` returns a PIL image and a dict describing the run;
``save_png(image, path)`` writes it atomically (temp file beside the target, fsync, rename).
Noise comes from a CPU ``torch.Generator`` seeded with ``seed``, so a seed gives the same
initial latents on every device.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["generate", "save_png", "resolve_device", "load_for_generation"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _is_checkpoint(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and (Path(model).expanduser() / "quantsd.json").is_file()


def load_for_generation(model: Any, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                        weights: str | None = None):
    """A pipeline ready to generate: quantsd checkpoints go through ``load_checkpoint`` (so the
    packed/dequantize choice sees the device); everything else through ``load_pipeline``."""
    from .models import _parse_dtype, load_pipeline

    dev = resolve_device(device)
    if isinstance(dtype, str):
        dtype = _parse_dtype(dtype)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if not isinstance(model, (str, os.PathLike)):  # a pipeline object
        if weights is not None:
            raise ValueError("weights= applies only when loading a quantsd checkpoint")
        return model.to(dev, dtype)
    if _is_checkpoint(model):
        from .io import load_checkpoint

        return load_checkpoint(Path(model).expanduser(), dtype=dtype, device=dev, weights=weights)
    if weights is not None:
        raise ValueError(f"--weights applies only to quantsd checkpoints (a folder with quantsd.json); "
                         f"{str(model)!r} is not one")
    return load_pipeline(model, dtype=dtype, device=dev)


def generate(
    model: Any,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    weights: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
):
    """Generate one image; returns (PIL.Image, info dict)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    pipe = load_for_generation(model, device, dtype, weights)
    scale = getattr(pipe, "vae_scale_factor", 8)
    default = int(pipe.unet.config.sample_size) * scale
    height = height or default
    width = width or default
    if height % 8 or width % 8:
        raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                   height=height, width=width, generator=gen, output_type="pil")
    elapsed = time.perf_counter() - t0
    ck = getattr(pipe, "quantsd_checkpoint", None)
    info = {"model": str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
            "prompt": prompt, "negative_prompt": negative_prompt, "seed": int(seed), "steps": steps,
            "guidance": guidance, "height": height, "width": width, "device": str(pipe.device),
            "dtype": str(pipe.unet.dtype).replace("torch.", ""),
            "weights": ck["weights"] if ck else "dense", "seconds": round(elapsed, 3)}
    return out.images[0], info


def save_png(image, path: str | os.PathLike, info: dict | None = None) -> Path:
    """Write ``image`` as PNG atomically (never a half-written file at ``path``)."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = PngInfo()
    for k, v in (info or {}).items():
        if v is not None:
            meta.add_text(f"quantsd:{k}", str(v))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=meta)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
