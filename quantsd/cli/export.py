"""`quantsd export`."""

from __future__ import annotations

import click

from ._base import FORMAT, main, model_option


def _layer_rows(layers):
    return [(lp["path"], lp["class"], "x".join(map(str, lp["shape"])), lp["method"], lp["bits"], lp["granularity"],
             lp["packed_bytes"] + lp["param_bytes"]) for lp in layers]


def print_sizes(manifest: dict, total: int | None) -> None:
    from ..export import human_bytes
    from ..reporting import format_table

    rows = [(m, c["quantized_layers"], c["quantized_bytes"], c["dense_bytes"], c["bytes"], human_bytes(c["bytes"]))
            for m, c in manifest["components"].items()]
    click.echo(format_table(rows, ["file", "quantized layers", "quantized bytes", "dense bytes", "file bytes", ""]))
    t = manifest["totals"]
    click.echo(f"\nweights files: {t['weights_bytes']:,} bytes ({human_bytes(t['weights_bytes'])}); "
               f"configs/tokenizer/scheduler: {t['other_files_bytes']:,} bytes")
    if total is not None:
        click.echo(f"checkpoint total (all files incl. quantsd.json): {total:,} bytes ({human_bytes(total)}, "
                   f"{total / 1e9:.4f} GB)")


@main.command("export")
@model_option()
@click.option("-r", "--recipe", "recipe_path", required=True, type=click.Path(dir_okay=False),
              help="Recipe YAML (see recipes/).")
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), default=None,
              help="Checkpoint directory to write (required unless --dry-run).")
@click.option("--dry-run", is_flag=True, help="Print the resolved per-layer plan and exact sizes; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing quantsd checkpoint at OUTPUT.")
@click.option("--dtype", "dense_dtype", type=click.Choice(["float16", "bfloat16", "float32", "keep"]),
              default="float16", show_default=True, help="Storage dtype of unquantized tensors.")
@FORMAT
def export_cmd(model: str, recipe_path: str, out: str | None, dry_run: bool, overwrite: bool, dense_dtype: str,
               fmt: str) -> None:
    """Quantize MODEL with a recipe and write a packed checkpoint (or --dry-run)."""
    from ..export import directory_bytes, dry_run as plan_only, export
    from ..models import load_for_inspection, load_pipeline
    from ..recipe import load_recipe
    from ..reporting import format_table, to_json

    recipe = load_recipe(recipe_path)
    if dry_run:
        pipe = load_for_inspection(model)
        res = plan_only(pipe, recipe, dtype=dense_dtype, source=model)
        if fmt == "json":
            click.echo(to_json({"plan": res["plan"].to_dict(), "manifest": res["manifest"],
                                "manifest_bytes": res["manifest_bytes"], "total_bytes": res["total_bytes"]}))
            return
        man = res["manifest"]
        click.echo(f"recipe {recipe.name} (sha256 {recipe.sha256[:16]}...) on {model}: dry run, nothing written\n")
        click.echo(format_table(_layer_rows(man["layers"]),
                                ["layer", "class", "shape", "method", "bits", "granularity", "bytes"]))
        if man["dense_layers"]:
            click.echo("\nkept dense:")
            click.echo(format_table([(d["path"], d["class"], "x".join(map(str, d["shape"])), d["reason"])
                                     for d in man["dense_layers"]], ["layer", "class", "shape", "reason"]))
        click.echo("")
        print_sizes(man, res["total_bytes"])
        return
    if out is None:
        raise click.UsageError("--output/-o is required (or pass --dry-run)")
    pipe = load_pipeline(model)
    manifest = export(pipe, recipe, out, overwrite=overwrite, dtype=dense_dtype, source=model, progress=True)
    total = directory_bytes(out)
    if fmt == "json":
        click.echo(to_json({"output": out, "total_bytes": total, "manifest": manifest}))
        return
    click.echo(f"wrote {out} ({len(manifest['layers'])} quantized layers, recipe {recipe.name})\n")
    print_sizes(manifest, total)
