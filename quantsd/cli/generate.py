"""`quantsd generate`."""

from __future__ import annotations

import click

from ..sdpa_backend import SDPA_CHOICES
from ._base import FORMAT, main, model_option


@main.command("generate")
@model_option()
@click.option("-p", "--prompt", required=True, help="Text prompt.")
@click.option("-n", "--negative-prompt", default=None, help="Negative prompt.")
@click.option("--seed", default=0, show_default=True, type=int, help="Noise seed (CPU generator).")
@click.option("--steps", default=25, show_default=True, type=click.IntRange(min=1), help="Denoising steps.")
@click.option("--guidance", default=7.5, show_default=True, type=float, help="Classifier-free guidance scale.")
@click.option("--height", default=None, type=int, help="Image height (default: the model's native size).")
@click.option("--width", default=None, type=int, help="Image width (default: the model's native size).")
@click.option("--weights", type=click.Choice(["packed", "dequantize"]), default=None,
              help="Quantsd checkpoints: keep packed codes resident (default on CUDA) or dequantize once.")
@click.option("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Compute dtype (default: float16 on CUDA, float32 on CPU).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the UNet (mode reduce-overhead: CUDA graphs).")
@click.option("--compile-guards", type=click.Choice(["full", "minimal"]), default="full", show_default=True,
              help="With --compile: 'minimal' skips Dynamo's per-call checks of module attributes (less host "
                   "time per step; the pipeline must not be edited after the first step).")
@click.option("--channels-last", is_flag=True, help="UNet and VAE in channels-last memory format.")
@click.option("--scheduler", type=click.Choice(["default", "dpm", "ddim", "euler", "pndm"]), default="default",
              show_default=True, help="Sampler; dpm = DPMSolverMultistepScheduler (good in ~20 steps).")
@click.option("--cfg-cutoff", type=click.FloatRange(0, 1), default=None,
              help="Dynamic CFG: classifier-free guidance only for this fraction of the steps, then batch 1.")
@click.option("--attention", type=click.Choice(["sdpa", "classic"]), default=None,
              help="Attention processor: sdpa (F.scaled_dot_product_attention; --sdpa-backend picks its kernel) or classic.")
@click.option("--sdpa-backend", type=click.Choice(SDPA_CHOICES),
              default="auto", show_default=True,
              help="Fused attention kernel preferred by SDPA (others are the fallback); auto: FlashAttention for "
                   "eager fp16/bf16 on CUDA, else (and for a --compile'd UNet) PyTorch's choice; pytorch: PyTorch's "
                   "choice (cuDNN on an H200 with torch 2.11).")
@click.option("--attention-slicing", is_flag=True, help="Compute attention in slices (less memory).")
@click.option("--vae-tiling", is_flag=True, help="Decode latents in tiles (large images in little memory).")
@click.option("--vae-slicing", is_flag=True, help="Decode a batch one image at a time.")
@click.option("--lean-vae", is_flag=True,
              help="VAE decoder works in place and runs large convolutions in row bands: lower decode peak, "
                   "same image to fp16 rounding.")
@click.option("--no-vae-encoder", "drop_vae_encoder", is_flag=True,
              help="Free the VAE encoder (never used from text; SD1.5: 68 MB fp16).")
@click.option("--ff-chunk", type=click.IntRange(min=1), default=None, metavar="TOKENS",
              help="UNet feed-forwards over at most TOKENS tokens at a time (e.g. 4096): large images in less memory.")
@click.option("--no-grouped-dequant", "no_grouped", is_flag=True,
              help="Packed weights: one dequant launch per layer instead of one per block (for comparison).")
@click.option("--dense-below", type=click.IntRange(min=0), default=0, metavar="WEIGHTS",
              help="Packed checkpoints: keep the UNet's layers of at most WEIGHTS weights dense (decoded once: "
                   "same weights, fewer dequant launches per step; e.g. 262144).")
@click.option("--prefetch-weights", is_flag=True,
              help="With --compile: decode packed weights ahead on a second CUDA stream while earlier layers "
                   "compute (same weights; hides most of the dequant time).")
@click.option("--offload", type=click.Choice(["model", "sequential"]), default=None,
              help="CPU offload: whole models (model) or layer by layer (sequential); needs CUDA.")
@click.option("--tiny-vae", type=click.Path(exists=True, file_okay=False), default=None,
              help="Decode with an AutoencoderTiny from this local directory.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@FORMAT
def generate_cmd(model, prompt, negative_prompt, seed, steps, guidance, height, width, weights, device, dtype,
                 compile_, compile_guards, channels_last, scheduler, cfg_cutoff, attention, sdpa_backend,
                 attention_slicing,
                 vae_tiling, vae_slicing,
                 lean_vae, drop_vae_encoder, ff_chunk, no_grouped, dense_below, prefetch_weights, offload, tiny_vae, out,
                 fmt) -> None:
    """Generate an image from MODEL (a model source or a quantsd checkpoint)."""
    from ..generate import generate, save_png
    from ..reporting import to_json

    image, info = generate(model, prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                           guidance=guidance, height=height, width=width, weights=weights, device=device,
                           dtype=dtype, compile=compile_, compile_guards=compile_guards,
                           channels_last=channels_last, scheduler=scheduler,
                           cfg_cutoff=cfg_cutoff, attention=attention, attention_slicing=attention_slicing,
                           vae_tiling=vae_tiling, vae_slicing=vae_slicing, offload=offload, tiny_vae=tiny_vae,
                           lean_vae=lean_vae, drop_vae_encoder=drop_vae_encoder, ff_chunk=ff_chunk,
                           grouped_dequant=not no_grouped, dense_below=dense_below,
                           prefetch_weights=prefetch_weights,
                           sdpa_backend=sdpa_backend)
    save_png(image, out, info)
    info["output"] = out
    if fmt == "json":
        click.echo(to_json(info))
    else:
        click.echo(f"wrote {out} ({info['width']}x{info['height']}, {info['steps']} steps, seed {info['seed']}, "
                   f"{info['weights']} weights on {info['device']} {info['dtype']}, {info['seconds']:.2f} s)")
