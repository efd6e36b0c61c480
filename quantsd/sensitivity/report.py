"""Sweep outputs: CSV, a Markdown report ranked per component, and log-scale bar charts
in the style of the reference paper's Figs. 2-4 (one chart per component, a bar per block,
grouped by method x bits)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..fileio import atomic_write_text

CSV_FIELDS = ("block", "component", "method", "bits", "granularity", "n_params", "n_layers",
              "packed_bytes", "fp16_bytes", "component_output", "component_error", "image_error")
# Timings stay in sensitivity.jsonl only: the CSV is a pure function of the configuration.
COMPONENT_TITLES = {"text_encoder": "Text encoder (error at text embeddings)",
                    "unet": "UNet (error at final latents)",
                    "vae_decoder": "VAE decoder (error at image)"}


def sorted_records(records: list[dict], block_order: list[str]) -> list[dict]:
    """Deterministic order independent of completion order: block, method, bits."""
    rank = {b: i for i, b in enumerate(block_order)}
    return sorted(records, key=lambda r: (rank.get(r["block"], len(rank)), r["method"], r["bits"]))


def write_csv(records: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k])
                         for k in CSV_FIELDS})
    atomic_write_text(path, buf.getvalue())


def write_markdown(records: list[dict], config: dict, versions: dict, path: Path, plots: list[str]) -> None:
    lines = ["# Per-block quantization sensitivity", "",
             f"Model `{config['model']}`; {len(config['prompts'])} prompts, {config['steps']} steps, "
             f"guidance {config['guidance']}, seed {config['seed']}, granularity `{config['granularity']}`, "
             f"dtype {config['dtype']}.", "",
             "Error = `100% * ||v_q - v|| / ||v||` per prompt, averaged over prompts; only the named block "
             "is quantized, everything else stays at full precision. *component* is measured at the "
             "output of the block's own component (text embeddings / final latents / decoded image), "
             "*image* at the final image.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    settings = sorted({(r["method"], r["bits"]) for r in records}, key=lambda t: (t[0], t[1]))
    for component, title in COMPONENT_TITLES.items():
        rows = [r for r in records if r["component"] == component]
        if not rows:
            continue
        lines += [f"## {title}", ""]
        # rank blocks by their worst image error at the lowest bit width measured
        low = min(r["bits"] for r in rows)
        worst = {}
        for r in rows:
            if r["bits"] == low:
                worst[r["block"]] = max(worst.get(r["block"], 0.0), r["image_error"])
        ranked = sorted(worst, key=lambda b: -worst[b])
        header = ["rank", "block", "params"] + [f"{m} {b}b comp / img" for m, b in settings]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        by_key = {(r["block"], r["method"], r["bits"]): r for r in rows}
        for i, block in enumerate(ranked, 1):
            n_params = next(r["n_params"] for r in rows if r["block"] == block)
            cells = [str(i), f"`{block}`", f"{n_params:,}"]
            for m, b in settings:
                r = by_key.get((block, m, b))
                cells.append("–" if r is None else f"{r['component_error']:.3g} / {r['image_error']:.3g}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    atomic_write_text(path, "\n".join(lines))


def plot_components(records: list[dict], out_dir: Path, block_order: list[str]) -> list[str]:
    """One PNG per component; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    settings = sorted({(r["method"], r["bits"]) for r in records})
    for component, title in COMPONENT_TITLES.items():
        rows = [r for r in records if r["component"] == component]
        if not rows:
            continue
        blocks = [b for b in block_order if any(r["block"] == b for r in rows)]
        by_key = {(r["block"], r["method"], r["bits"]): r["component_error"] for r in rows}
        x = np.arange(len(blocks))
        width = 0.8 / max(1, len(settings))
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(blocks) * max(1, len(settings)) / 2), 4.5))
        for k, (m, b) in enumerate(settings):
            vals = [max(by_key.get((blk, m, b), np.nan), 1e-6) for blk in blocks]
            ax.bar(x + (k - (len(settings) - 1) / 2) * width, vals, width, label=f"{m} {b}-bit")
        ax.set_yscale("log")
        ax.set_ylabel("relative L2 error (%)")
        ax.set_title(title)
        ax.set_xticks(x)
        ax.set_xticklabels([blk.split(".", 1)[1] if "." in blk else blk for blk in blocks],
                           rotation=75, ha="right", fontsize=7)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        name = f"sensitivity_{component}.png"
        tmp = out_dir / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(out_dir / name)
        written.append(name)
    return written
