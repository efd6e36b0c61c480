"""Per-block sensitivity sweeps (DESIGN §4).

For every block, method and bit width the block alone is quantized (everything else stays at
the sweep dtype, fp32 by default) and the relative L2 error ``100 * ||v_q - v|| / ||v||`` is
measured (a) at the output of the block's own component — text embeddings, the final latents
of a full sampling run, or the decoded image — and (b) at the final image, averaged over the
prompts.

Work is never repeated: the reference outputs are computed once (and cached on disk), a
text-encoder block re-runs sampling and decoding, a UNet block re-runs sampling from the
cached embeddings, a decoder block only re-decodes the cached latents. Weights are swapped in
place and restored bit for bit, so peak memory is the model plus one block.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from ..blocks import Block, get_module, list_blocks
from ..quant import quantize_tensor
from ..recipe import layer_seed  # same per-layer seeds as recipes/export
from .config import SweepConfig

COMPONENT_OUTPUT = {"text_encoder": "text_embeddings", "unet": "latents", "vae_decoder": "image"}


def relative_l2(v_q: torch.Tensor, v_ref: torch.Tensor) -> float:
    """Mean over the batch of ``100 * ||v_q - v_ref|| / ||v_ref||`` (per sample, in float64)."""
    a = v_q.detach().reshape(v_q.shape[0], -1).double()
    b = v_ref.detach().reshape(v_ref.shape[0], -1).double()
    err = (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)
    return float(100.0 * err.mean())


@dataclass
class Reference:
    cond: torch.Tensor      # text embeddings of the prompts
    uncond: torch.Tensor    # text embeddings of the empty prompt (CFG)
    noise: torch.Tensor     # initial latents, drawn once from the sweep seed
    latents: torch.Tensor   # final latents after sampling
    image: torch.Tensor     # decoded image in [-1, 1]

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).contiguous().cpu() for k in ("cond", "uncond", "noise", "latents", "image")}


class PipelineRunner:
    """The three stages of generation with fixed inputs, batched over prompts."""

    def __init__(self, pipe, config: SweepConfig, device: torch.device, batch_size: int = 8):
        self.pipe, self.config, self.device, self.batch_size = pipe, config, device, batch_size
        pipe.set_progress_bar_config(disable=True)
        self.dtype = getattr(torch, config.dtype)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer(prompts, padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt")
        return self.pipe.text_encoder(tok.input_ids.to(self.device))[0]

    def initial_noise(self, n: int) -> torch.Tensor:
        unet = self.pipe.unet
        h = (self.config.height or unet.config.sample_size * self.pipe.vae_scale_factor) // self.pipe.vae_scale_factor
        w = (self.config.width or unet.config.sample_size * self.pipe.vae_scale_factor) // self.pipe.vae_scale_factor
        gen = torch.Generator("cpu").manual_seed(self.config.seed)
        return torch.randn((n, unet.config.in_channels, h, w), generator=gen).to(self.device, self.dtype)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(0, cond.shape[0], self.batch_size):
            c = cond[i:i + self.batch_size]
            u = uncond[:1].expand(c.shape[0], -1, -1)
            out = self.pipe(prompt_embeds=c, negative_prompt_embeds=u, latents=noise[i:i + self.batch_size].clone(),
                            num_inference_steps=self.config.steps, guidance_scale=self.config.guidance,
                            output_type="latent")
            outs.append(out.images)
        return torch.cat(outs)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        outs = [vae.decode(latents[i:i + self.batch_size] / vae.config.scaling_factor).sample.clamp(-1, 1)
                for i in range(0, latents.shape[0], self.batch_size)]
        return torch.cat(outs)

    def reference(self) -> Reference:
        prompts = list(self.config.prompts)
        cond, uncond = self.encode(prompts), self.encode([""])
        noise = self.initial_noise(len(prompts))
        latents = self.sample(cond, uncond, noise)
        return Reference(cond, uncond, noise, latents, self.decode(latents))

    def outputs_with(self, component: str, ref: Reference) -> tuple[torch.Tensor, torch.Tensor]:
        """(component output, final image) with the pipeline's current weights, reusing ``ref``."""
        if component == "text_encoder":
            cond, uncond = self.encode(list(self.config.prompts)), self.encode([""])
            image = self.decode(self.sample(cond, uncond, ref.noise))
            return cond, image
        if component == "unet":
            latents = self.sample(ref.cond, ref.uncond, ref.noise)
            return latents, self.decode(latents)
        if component == "vae_decoder":
            image = self.decode(ref.latents)
            return image, image
        raise ValueError(f"unknown component {component!r}")


@contextlib.contextmanager
def quantized_block(pipe, block: Block, method: str | None, bits: int, granularity: str, seed: int) -> Iterator[int]:
    """Quantize one block's weights in place; restore them bit for bit on exit.

    Yields the block's packed size in bytes (quantized weights packed + everything else fp16).
    ``method=None`` swaps nothing (the control: its error must be exactly zero).
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    packed = 0
    quantized_numel = 0
    try:
        for path in block.layer_names:
            weight = get_module(pipe, path).weight
            if method is None:
                continue
            original = weight.detach().clone()
            saved.append((weight, original))
            qt = quantize_tensor(original.float(), bits=bits, method=method, granularity=granularity,
                                 seed=layer_seed(seed, path))
            packed += qt.nbytes_packed
            quantized_numel += original.numel()
            with torch.no_grad():
                weight.copy_(qt.dequantize().to(weight.dtype))
        yield packed + 2 * (block.n_params - quantized_numel)
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def load_or_compute_reference(runner: PipelineRunner, cache: Path | None) -> Reference:
    """fp reference outputs, cached in ``cache`` (safetensors, keyed by the config fingerprint)."""
    key = runner.config.fingerprint()
    if cache is not None and cache.exists():
        tensors = load_file(str(cache))
        meta_key = tensors.pop("fingerprint_bytes", None)
        if meta_key is not None and bytes(meta_key.tolist()).decode() == key:
            return Reference(**{k: v.to(runner.device) for k, v in tensors.items()})
    ref = runner.reference()
    if cache is not None:
        tmp = cache.with_suffix(".tmp")
        payload = ref.to_dict() | {"fingerprint_bytes": torch.tensor(list(key.encode()), dtype=torch.uint8)}
        save_file(payload, str(tmp))
        tmp.replace(cache)
    return ref


def sweep_plan(pipe, config: SweepConfig) -> list[tuple[Block, str, int]]:
    """Every (block, method, bits) the sweep measures, in block order."""
    blocks = [b for b in list_blocks(pipe) if b.component in config.components and b.layer_names]
    return [(b, m, n) for b in blocks for m in config.methods for n in config.bits]


def measure(runner: PipelineRunner, ref: Reference, block: Block, method: str | None, bits: int) -> dict:
    """Quantize one block, run its component and everything downstream, restore, report."""
    cfg = runner.config
    t0 = time.perf_counter()
    with quantized_block(runner.pipe, block, method, bits, cfg.granularity, cfg.seed) as packed_bytes:
        component_out, image = runner.outputs_with(block.component, ref)
    ref_component = {"text_encoder": ref.cond, "unet": ref.latents, "vae_decoder": ref.image}[block.component]
    return {
        "block": block.name, "component": block.component, "method": method, "bits": bits,
        "granularity": cfg.granularity, "n_params": block.n_params, "n_layers": block.n_layers,
        "packed_bytes": packed_bytes, "fp16_bytes": block.fp16_bytes,
        "component_output": COMPONENT_OUTPUT[block.component],
        "component_error": relative_l2(component_out, ref_component),
        "image_error": relative_l2(image, ref.image),
        "seconds": round(time.perf_counter() - t0, 4),
    }

