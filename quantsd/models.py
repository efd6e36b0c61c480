"""Load any Stable Diffusion pipeline quantsd works on.

Sources, in the order they are tried:

* ``"tiny"``      – a few-MB random-init pipeline built in code (tests, CPU);
* ``"sd15-arch"`` – the exact SD v1.5 architecture with random weights, built from config
  (speed/memory/size figures are weight-independent; quality figures are not);
* ``"fixture"``   – the small pipeline trained by this project and shipped inside the package;
* a local directory – a diffusers pipeline folder, or a quantsd packed checkpoint;
* a hub id (``org/name``) – passed to ``from_pretrained``; fails with a clear message offline.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizer import default_tokenizer

BUILTIN_MODELS = ("tiny", "sd15-arch", "fixture")
DEFAULT_MODEL = "fixture"
FIXTURE_DIR = Path(__file__).parent / "fixture" / "weights"


class ModelSourceError(ValueError):
    """A model source that cannot be resolved or loaded; the message says how to fix it."""


# --------------------------------------------------------------------------- configs
SD15_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768,
)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
)

TINY_TEXT_ENCODER = dict(
    vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
)
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
    block_out_channels=(16, 32), norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)


def _assemble(text_cfg: dict, unet_cfg: dict, vae_cfg: dict, scheduler, seed: int) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tokenizer = default_tokenizer()
    # Special-token ids must come from the tokenizer that ships with the pipeline
    # (CLIPTextModel pools at eos_token_id).
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **text_cfg, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A ~2M-parameter random-init SD pipeline: same classes as SD, tiny widths; deterministic."""
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return _assemble(TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE, scheduler, seed)


def build_sd15_arch_pipeline(seed: int = 0, device: str | torch.device | None = None) -> StableDiffusionPipeline:
    """The SD v1.5 architecture with random weights.

    ``device="meta"`` builds it without allocating memory (parameter counts, sizes, dry runs).
    On a real device, weights are initialised directly there (fast on a GPU).
    """
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        return _assemble(SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE, PNDMScheduler(**SD15_SCHEDULER), seed)


def _load_directory(path: Path, dtype: torch.dtype | None, device: str | torch.device | None = None,
                    **kwargs: Any) -> StableDiffusionPipeline:
    if (path / "quantsd.json").exists():
        from .io import load_checkpoint  # packed checkpoint: the quantsd loader, never pickle

        # the device decides the weight mode's default (packed on CUDA), so it goes in here
        return load_checkpoint(path, dtype=dtype, device=device, **kwargs)
    if not (path / "model_index.json").exists():
        raise ModelSourceError(
            f"{str(path)!r} is a directory but not a diffusers pipeline (no model_index.json). "
            "Pass a folder written by `pipe.save_pretrained(...)` or by `quantsd export`."
        )
    # An explicit dtype for every component: transformers 5 loads the text encoder in its stored
    # dtype ("auto") while diffusers loads fp32, and mixed dtypes break generation.
    return StableDiffusionPipeline.from_pretrained(
        path, dtype=dtype or torch.float32, safety_checker=None, requires_safety_checker=False,
        local_files_only=True,
    )


def _load_hub(model_id: str, dtype: torch.dtype | None) -> StableDiffusionPipeline:
    try:
        return StableDiffusionPipeline.from_pretrained(
            model_id, dtype=dtype or torch.float32, safety_checker=None, requires_safety_checker=False,
        )
    except Exception as exc:  # network errors, missing repos, gated repos, offline mode
        raise ModelSourceError(
            f"could not load {model_id!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). If this machine is offline, "
            "download the pipeline elsewhere, copy it here and pass the local directory."
        ) from exc


def load_pipeline(
    model: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> StableDiffusionPipeline:
    """Load a pipeline from any source quantsd knows (see module docstring).

    ``dtype`` casts every component (``"float16"`` and friends accepted); ``device`` moves it.
    Extra keyword arguments go to the packed-checkpoint loader (e.g. ``weights="packed"``).
    """
    if isinstance(dtype, str):
        dtype = _parse_dtype(dtype)
    name = str(model)
    if name == "tiny":
        pipe = build_tiny_pipeline(seed)
    elif name == "sd15-arch":
        if device is not None and torch.device(device).type == "meta":
            return build_sd15_arch_pipeline(seed, device="meta")
        pipe = build_sd15_arch_pipeline(seed, device=device if _is_cuda(device) else None)
    elif name == "fixture":
        if not (FIXTURE_DIR / "model_index.json").exists():
            raise ModelSourceError(
                f"the trained fixture pipeline is not installed at {FIXTURE_DIR}; "
                "reinstall quantsd, or use --model tiny"
            )
        pipe = _load_directory(FIXTURE_DIR, dtype, device, **kwargs)
    elif Path(name).expanduser().is_dir():
        pipe = _load_directory(Path(name).expanduser(), dtype, device, **kwargs)
    elif _looks_like_hub_id(name) and not Path(name).expanduser().exists():
        pipe = _load_hub(name, dtype)
    else:
        raise ModelSourceError(
            f"unknown model {name!r}: expected one of {', '.join(BUILTIN_MODELS)}, an existing "
            "local pipeline directory, or a hub id of the form 'org/name'"
        )
    return place_pipeline(pipe, dtype=dtype, device=device)


def place_pipeline(pipe: StableDiffusionPipeline, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None) -> StableDiffusionPipeline:
    """Move/cast a pipeline, skipping no-op casts (diffusers warns on every ``.to(dtype)``)."""
    if dtype is not None and pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    if device is not None and pipe.unet.device != torch.device(device):
        pipe.to(device)
    return pipe


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _is_cuda(device: str | torch.device | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ModelSourceError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}") from None


def load_for_inspection(model: str | os.PathLike = DEFAULT_MODEL) -> StableDiffusionPipeline:
    """Load a pipeline only to look at its structure: big built-ins go on the meta device."""
    return load_pipeline(model, device="meta" if str(model) == "sd15-arch" else None)
