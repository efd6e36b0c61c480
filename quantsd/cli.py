"""Command-line interface: parse arguments, call the library, print. No logic lives here."""

from __future__ import annotations

import click

from . import __version__
from .models import DEFAULT_MODEL, ModelSourceError

MODEL_HELP = (
    "Model: 'fixture' (default, trained, shipped), 'tiny', 'sd15-arch', a local pipeline "
    "directory, a quantsd checkpoint, or a hub id."
)
FORMAT = click.option("--format", "fmt", type=click.Choice(["human", "json"]), default="human",
                      show_default=True, help="Output format.")


def model_option(default: str = DEFAULT_MODEL):
    return click.option("-m", "--model", default=default, show_default=True, help=MODEL_HELP)


class _Group(click.Group):
    """Turn the library's ValueErrors (bad input) into click usage errors with the message."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ModelSourceError, ValueError, KeyError, FileNotFoundError) as exc:
            if isinstance(exc, click.ClickException):
                raise
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise click.ClickException(str(message)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantsd")
def main() -> None:
    """quantsd: post-training weight quantization for Stable Diffusion pipelines."""


@main.command()
@model_option()
@click.option("--include-vae-encoder/--no-vae-encoder", default=True, show_default=True,
              help="Also list the VAE encoder (not quantized by default).")
@FORMAT
def blocks(model: str, include_vae_encoder: bool, fmt: str) -> None:
    """List the named blocks of the text encoder, UNet and VAE decoder."""
    from .blocks import list_blocks
    from .models import load_for_inspection
    from .reporting import format_table, to_json

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


if __name__ == "__main__":  # pragma: no cover
    main()
