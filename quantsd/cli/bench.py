"""`quantsd bench`."""

from __future__ import annotations

import click

from ..sdpa_backend import SDPA_CHOICES
from ._base import main, model_option


def _caps(ctx, param, value):
    if value is None or value == "" or value == "none":
        return ()
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("a comma-separated list of GiB, e.g. 8,4") from None


@main.command("bench")
@model_option(default="sd15-arch")
@click.argument("checkpoint", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--recipe", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Quantize MODEL in memory with this recipe and bench the packed modules.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--guidance", default=7.5, show_default=True, type=float)
@click.option("--height", default=512, show_default=True, type=int)
@click.option("--width", default=512, show_default=True, type=int)
@click.option("--compile", "compile_", is_flag=True, help="Also bench torch.compile (reduce-overhead) variants.")
@click.option("--only", default="", metavar="NAMES",
              help="Run only these configurations (comma-separated: fp16-sdpa, packed, fp32-classic, "
                   "fp16-sdpa-compiled, fp16-sdpa-compiled-cl, packed-compiled; and, only when named, "
                   "fp16-sdpa-inspect, fp16-sdpa-pytorch, packed-pytorch, packed-modcall, packed-checked, packed-roots, packed-groups-512, -384, -256, -96 (eager, they join the eager pair), "
                   "fp16-sdpa-compiled-flash, packed-compiled-flash, packed-compiled-per-layer, packed-compiled-prefetch); the default is all but the "
                   "named-only ones.")
@click.option("--compile-guards", type=click.Choice(["full", "minimal"]), default="full", show_default=True,
              help="Compiled configurations: 'minimal' skips Dynamo's per-call module-attribute checks.")
@click.option("--max-res-cap-gb", "caps", default="8,4", show_default=True, callback=_caps,
              help="VRAM caps (GiB) for the max-resolution search; 'none' to skip.")
@click.option("--max-res-cfg", default="sequential,batch2", show_default=True,
              help="CFG modes for the max-resolution probe: sequential (two batch-1 halves) and/or batch2.")
@click.option("--max-res-ff-chunk", default=4096, show_default=True, type=click.IntRange(min=0), metavar="TOKENS",
              help="Max-resolution probes run the UNet's feed-forwards over at most TOKENS tokens at a time; 0: off.")
@click.option("--time-budget", default=None, type=float, help="Seconds; later measurements are skipped after it.")
@click.option("--image-repeats", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--schedulers", default="", show_default=False,
              help="Also time s/image with these samplers (comma-separated: dpm, ddim, euler, pndm), same steps.")
@click.option("--lean", is_flag=True,
              help="Every configuration with the lean VAE decode and without the VAE encoder (text-to-image memory).")
@click.option("--no-grouped-dequant", "no_grouped", is_flag=True,
              help="Packed configurations with one dequant launch per layer (default: one per block).")
@click.option("--dense-below", type=click.IntRange(min=0), default=0, metavar="WEIGHTS",
              help="Packed configurations: keep the UNet's layers of at most WEIGHTS weights dense (0: off).")
@click.option("--eager-pair-rounds", type=click.IntRange(min=0), default=9, show_default=True, metavar="N",
              help="Eager packed vs fp16-sdpa, rebuilt side by side and taking turns for N rounds "
                   "(host drift cancels out of the ratio); 0: off.")
@click.option("--eager-pair-calls", type=click.IntRange(min=1), default=5, show_default=True, metavar="N",
              help="UNet steps per pipeline in each round of the eager pair (1: the pipelines alternate step by "
                   "step; more rounds then give the median as many ratios).")
@click.option("--sdpa-backend", type=click.Choice(SDPA_CHOICES),
              default="auto", show_default=True,
              help="SDPA kernel preferred by every configuration that names none (as quantsd generate "
                   "--sdpa-backend; variants such as fp16-sdpa-pytorch keep their own).")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Output directory.")
def bench_cmd(model, checkpoint, recipe, steps, guidance, height, width, compile_, only, compile_guards, caps,
              max_res_cfg, max_res_ff_chunk, time_budget, image_repeats, schedulers, lean, no_grouped, dense_below,
              eager_pair_rounds, eager_pair_calls, sdpa_backend, out) -> None:
    """Speed, memory and max resolution of MODEL (fp32 classic-attention and fp16 SDPA baselines
    always; the quantized model with --recipe or a packed CHECKPOINT) on CUDA. Writes
    results.json, report.md and time_vs_pixels.png to the output directory."""
    import torch

    from ..bench import Bench, markdown_report

    if recipe and checkpoint:
        raise click.UsageError("give either --recipe (quantize MODEL in memory) or a CHECKPOINT, not both")
    modes = tuple(m for m in max_res_cfg.split(",") if m)
    bad = [m for m in modes if m not in ("sequential", "batch2")]
    if bad:
        raise click.BadParameter(f"unknown CFG mode(s) {bad}", param_hint="--max-res-cfg")
    from ..generate import SCHEDULERS

    scheds = tuple(x for x in schedulers.split(",") if x)
    bad = [x for x in scheds if x not in SCHEDULERS or x == "default"]
    if bad:
        raise click.BadParameter(f"unknown scheduler(s) {bad}; valid: {', '.join(x for x in SCHEDULERS if x != 'default')}",
                                 param_hint="--schedulers")
    from ..bench.core import default_configs, optional_configs, select_configs

    only_names = tuple(x.strip() for x in only.split(",") if x.strip())
    try:
        has_q = bool(recipe or checkpoint)
        select_configs(default_configs(has_q, compile_), only_names, optional_configs(has_q, compile_))
    except ValueError as e:
        hint = " (compiled configurations need --compile)" if any(n.endswith("-compiled") for n in only_names) else ""
        raise click.BadParameter(f"{e}{hint}", param_hint="--only") from None
    if not torch.cuda.is_available():
        raise click.ClickException("quantsd bench measures CUDA speed and memory: no CUDA device here")
    b = Bench(model=model, recipe=recipe, checkpoint=checkpoint, steps=steps, guidance=guidance, height=height,
              width=width, compile=compile_, caps_gb=caps, max_res_modes=modes, out_dir=out,
              time_budget_s=time_budget, image_repeats=image_repeats, schedulers=scheds, lean=lean,
              max_res_ff_chunk=max_res_ff_chunk or None, compile_guards=compile_guards, only=only_names,
              grouped_dequant=not no_grouped, dense_below=dense_below,
              eager_pair_rounds=eager_pair_rounds, eager_pair_calls=eager_pair_calls, sdpa_backend=sdpa_backend,
              log=lambda s: click.echo(s, err=True))
    results = b.run()
    click.echo(markdown_report(results))
