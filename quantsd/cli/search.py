"""`quantsd search`."""

from __future__ import annotations

import click

from ._base import FORMAT, main


@main.command()
@click.option("--sensitivity", "sensitivity_dir", required=True, multiple=True,
              type=click.Path(file_okay=False, exists=True),
              help="Directory written by `quantsd sensitivity`; repeat to pool sweeps of other granularities.")
@click.option("--budget-mb", type=float, default=None, help="Size budget in MB (10^6 bytes) for the whole pipeline.")
@click.option("--avg-bits", type=float, default=None, help="Average bits per parameter (everything counted).")
@click.option("--max-error", type=float, default=None, help="Predicted final-image relative L2 error cap (%).")
@click.option("--methods", default=None, help="Restrict to these methods (comma-separated).")
@click.option("--no-dense", is_flag=True, help="Every block must be quantized (no fp16 choice).")
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="Run the chosen recipe for real and report the measured error beside the prediction.")
@click.option("--device", default=None)
@click.option("--name", default=None, help="Recipe name (default: the output file's stem).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Recipe YAML to write.")
@FORMAT
def search(sensitivity_dir, budget_mb, avg_bits, max_error, methods, no_dense, measure, device, name, out, fmt):
    """Search a mixed-precision bit map (exact knapsack) and write it as a recipe."""
    from ..reporting import format_table, to_json
    from ..search_report import run_search

    summary = run_search(list(sensitivity_dir), out, budget_mb=budget_mb, avg_bits=avg_bits, max_error=max_error,
                         name=name, methods=tuple(methods.split(",")) if methods else None,
                         allow_dense=not no_dense, measure=measure, device=device)
    if fmt == "json":
        click.echo(to_json(summary))
        return
    rows = [(b, c["method"], c["bits"], c["granularity"], c["bytes"], c["error"])
            for b, c in summary["blocks"].items()]
    click.echo(format_table(rows, ["block", "method", "bits", "granularity", "bytes", "solo image err %"]))
    click.echo(f"\nsize {summary['total_mb']:.4f} MB (dense fp16 {summary['dense_mb']:.4f} MB); "
               f"predicted image error {summary['predicted_image_error']:.4g}%")
    if "measured" in summary:
        click.echo(f"measured image error {summary['measured']['image_error']:.4g}% "
                   f"(latents {summary['measured']['latent_error']:.4g}%)")
    click.echo(f"wrote {out} (+ .pareto.csv/.pareto.png/.search.json)")
