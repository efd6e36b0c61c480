"""`quantsd blocks`."""

from __future__ import annotations

import click

from ._base import FORMAT, main, model_option


@main.command()
@model_option()
@click.option("--include-vae-encoder/--no-vae-encoder", default=True, show_default=True,
              help="Also list the VAE encoder (not quantized by default).")
@FORMAT
def blocks(model: str, include_vae_encoder: bool, fmt: str) -> None:
    """List the named blocks of the text encoder, UNet and VAE decoder."""
    from ..blocks import list_blocks
    from ..models import load_for_inspection
    from ..reporting import format_table, to_json

    pipe = load_for_inspection(model)
    found = list_blocks(pipe, include_vae_encoder=include_vae_encoder)
    if fmt == "json":
        click.echo(to_json([b.to_dict() for b in found]))
        return
    rows = [(b.name, b.component + ("" if b.quantized_by_default else " (not quantized)"),
             b.n_layers, b.n_params, f"{b.fp16_bytes / 2**20:.3f}") for b in found]
    click.echo(format_table(rows, ["block", "component", "layers", "params", "fp16 MiB"]))
    totals: dict[str, int] = {}
    for b in found:
        totals[b.component] = totals.get(b.component, 0) + b.n_params
    click.echo("")
    click.echo(format_table([(c, n, f"{2 * n / 2**20:.3f}") for c, n in totals.items()],
                            ["component", "params", "fp16 MiB"]))

