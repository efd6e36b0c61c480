"""`quantsd sensitivity`."""

from __future__ import annotations

import click

from ._base import FORMAT, main, model_option


def _csv(kind):
    def convert(ctx, param, value):
        items = [v.strip() for v in value.split(",") if v.strip()]
        try:
            return tuple(kind(v) for v in items)
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
    return convert


@main.command()
@model_option()
@click.option("--methods", default="uniform,stochastic,pwlq", show_default=True, callback=_csv(str),
              help="Comma-separated quantization methods.")
@click.option("--bits", default="4,8", show_default=True, callback=_csv(int), help="Comma-separated bit widths (2..8).")
@click.option("--granularity", default="tensor", show_default=True, help="tensor | channel | group:G")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
              help="Prompts file (.txt/.csv/.tsv/.yaml/.json); default: COCO-2014 captions (fixture: its captions).")
@click.option("--num-prompts", default=8, show_default=True, type=int)
@click.option("--steps", default=20, show_default=True, type=int)
@click.option("--guidance", default=7.5, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--height", default=None, type=int, help="Image height (default: the model's).")
@click.option("--width", default=None, type=int, help="Image width (default: the model's).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory (re-running the same command resumes).")
@FORMAT
def sensitivity(model, methods, bits, granularity, prompts_file, num_prompts, steps, guidance, seed, height,
                width, dtype, device, batch_size, out_dir, fmt):
    """Per-block sensitivity sweep: quantize one block at a time, measure relative L2 error."""
    from ..reporting import to_json
    from ..sensitivity.api import sensitivity_from_model

    records, summary = sensitivity_from_model(
        model, methods=methods, bits=bits, granularity=granularity, prompts_file=prompts_file,
        num_prompts=num_prompts, steps=steps, guidance=guidance, seed=seed, height=height, width=width,
        dtype=dtype, device=device, batch_size=batch_size, out_dir=out_dir)
    if fmt == "json":
        click.echo(to_json({"out_dir": out_dir, "records": len(records), "summary": summary}))
    else:
        click.echo(f"{len(records)} configurations in {out_dir}/sensitivity.csv; report: {out_dir}/report.md")
