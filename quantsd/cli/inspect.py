"""`quantsd inspect`."""

from __future__ import annotations

import json

import click

from ._base import FORMAT, main


@main.command("inspect")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--verify/--no-verify", default=False, show_default=True,
              help="Also check every file's sha256 against the manifest.")
@FORMAT
def inspect_cmd(checkpoint: str, verify: bool, fmt: str) -> None:
    """Show a packed checkpoint: format, recipe, sizes per component and the per-layer table."""
    import yaml

    from ..io import inspect_checkpoint
    from ..reporting import to_json
    from .export import _layer_rows, print_sizes
    from ..reporting import format_table

    info = inspect_checkpoint(checkpoint, verify=verify)
    if fmt == "json":
        click.echo(to_json(info))
        return
    click.echo(f"{checkpoint}: {info['format']} format version {info['format_version']}, written by quantsd "
               f"{info['quantsd_version']}" + (f" from {info['source']}" if info.get("source") else ""))
    click.echo(f"dense tensors: {info['dense_dtype']}; sha256 {'verified' if verify else 'not checked (--verify)'}\n")
    click.echo(format_table(_layer_rows(info["layers"]),
                            ["layer", "class", "shape", "method", "bits", "granularity", "bytes"]))
    if info.get("dense_layers"):
        click.echo("\nkept dense:")
        click.echo(format_table([(d["path"], d["class"], "x".join(map(str, d["shape"])), d["reason"])
                                 for d in info["dense_layers"]], ["layer", "class", "shape", "reason"]))
    click.echo("")
    print_sizes(info, info["directory_bytes"])
    click.echo(f"\nrecipe (sha256 {info['recipe_sha256']}):")
    click.echo(yaml.safe_dump(json.loads(json.dumps(info["recipe"])), sort_keys=False).rstrip())
