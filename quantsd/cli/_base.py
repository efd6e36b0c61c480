"""The click group, shared options and error handling every command uses."""

from __future__ import annotations

import click

from .. import __version__
from ..models import DEFAULT_MODEL, ModelSourceError

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
