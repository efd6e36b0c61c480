"""The bench's reports: the summary rows, ``report.md`` (tables, ratios against each baseline, the
eager pair with its intervals) and the time-vs-pixels plot, written from ``results.json``'s dict."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .configs import EAGER_VARIANTS

__all__ = ["markdown_report", "packed_ratios", "plot_time_vs_pixels", "summary_rows", "write_reports"]


# --------------------------------------------------------------------------- reports
def _get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def summary_rows(results: dict) -> list[dict]:
    """One row per configuration with the headline numbers (None where not measured)."""
    rows = []
    base = {c["name"]: c for c in results.get("configs", [])}
    fp32 = _get(base.get("fp32-classic", {}), "image", "median")
    for c in results.get("configs", []):
        img = _get(c, "image", "median")
        row = {"config": c["name"], "compiled": bool(c.get("compile")), "unet_ms": _get(c, "unet_ms", "median"),
               "unet_ms_pipelined": _get(c, "unet_ms_pipelined", "median"),
               "host_issue_ms": _get(c, "unet_ms_pipelined", "host_issue_ms"), "s_per_image": img,
               "speedup_vs_fp32_classic": (fp32 / img) if (fp32 and img) else None,
               "peak_vram_gib": (_get(c, "image", "peak_vram_bytes") or 0) / 2**30 or None,
               "unet_weights_mib": c.get("unet_weight_mib"),
               "attention_backend": _get(c, "attention_kernels", "backend")}
        for k, v in c.items():
            if k.startswith("image_") and isinstance(v, dict) and "median" in v:
                row[f"s_per_image_{k[len('image_'):]}"] = v["median"]
            if k.startswith("max_res_"):
                row[k] = _get(v, "max") if isinstance(v, dict) and "cap_gb" in v else (v.get("error") or v.get("skipped")
                                                                                         if isinstance(v, dict) else v)
        errors = [f"{k}: {v['error']}" for k, v in c.items() if isinstance(v, dict) and "error" in v]
        row["errors"] = "; ".join(errors) or None
        rows.append(row)
    return rows


def _run_notes(meta: dict) -> str:
    """The run's non-default settings, as " · "-separated notes for the report header."""
    notes = []
    if meta.get("lean"):
        notes.append("lean VAE decode, VAE encoder dropped")
    if meta.get("compile") and meta.get("compile_guards") == "minimal":
        notes.append("compiled with minimal guards")
    if meta.get("only"):
        notes.append("only " + ", ".join(meta["only"]))
    if meta.get("grouped_dequant") is False:
        notes.append("packed with one dequant launch per layer")
    if meta.get("dense_below"):
        notes.append(f"packed UNet layers of <= {meta['dense_below']} weights kept dense")
    if meta.get("sdpa_backend", "auto") != "auto":
        notes.append(f"SDPA backend preference {meta['sdpa_backend']} (where a configuration names none)")
    if meta.get("compile") and (meta.get("fused_max_rows") or 0) > 0:
        tuned = f", {meta['fused_tuned_shapes']} tuned shapes" if meta.get("fused_tuned_shapes") else ""
        notes.append(f"fused dequant-GEMM for layers of <= {meta['fused_max_rows']} rows{tuned}")
    if meta.get("max_res_ff_chunk") and meta.get("caps_gb"):
        notes.append(f"max-res probes with feed-forward chunks of {meta['max_res_ff_chunk']} tokens")
    return "".join(f" · {n}" for n in notes)


def _ci_text(summary: dict, lead: str = " ", tail: str = "") -> str:
    """" (95% CI a-b)" for a :func:`paired_ratio` summary that has an interval, else ""."""
    ci = summary.get("ratio_ci95")
    return f"{lead}(95% CI {ci[0]:.3f}-{ci[1]:.3f}){tail}" if ci else ""


# each packed configuration and the dense ones it is measured against (same execution mode)
_DENSE_OF = {"packed": ("fp16-sdpa",), "packed-compiled": ("fp16-sdpa-compiled", "fp16-sdpa-compiled-cl")}


def packed_ratios(rows: list[dict]) -> list[tuple[str, str, float]]:
    """(packed config, dense config, packed / dense UNet ms back to back) for every pair measured in
    this run: the issue's speed targets, against each dense baseline of the same execution mode --
    ``packed-compiled`` against both the NCHW and the channels-last compiled fp16 rows."""
    ms = {r["config"]: r["unet_ms_pipelined"] for r in rows if r.get("unet_ms_pipelined")}
    return [(p, d, ms[p] / ms[d]) for p, ds in _DENSE_OF.items() for d in ds if p in ms and d in ms]


def host_issue_lines(rows: list[dict]) -> list[str]:
    """The report's line on the host's time to issue a compiled step back to back, against that
    step's ms: a row whose host time reaches 90% of it is marked host-bound (its back-to-back number is
    then the host's, and a faster host would lower it).  Compiled rows only: an eager step is
    host-bound by design."""
    parts = []
    for r in rows:
        host, step = r.get("host_issue_ms"), r.get("unet_ms_pipelined")
        if r.get("compiled") and host and step:
            parts.append(f"{r['config']} {host:.2f} of {step:.2f} ms" + (" (host-bound)" if host >= 0.9 * step else ""))
    return ["", "Host time to issue a compiled UNet step back to back: " + ", ".join(parts)] if parts else []


def markdown_report(results: dict) -> str:
    meta = results.get("meta", {})
    lines = [f"# quantsd bench: {meta.get('model')} ({meta.get('recipe') or meta.get('checkpoint') or 'baselines'})",
             "",
             f"{meta.get('gpu')} · torch {meta.get('torch')} · triton {meta.get('triton')} · diffusers "
             f"{meta.get('diffusers')} · {meta.get('height')}x{meta.get('width')}, {meta.get('steps')} steps, "
             f"CFG {meta.get('guidance')}, batch 1{_run_notes(meta)}"
             f" · started {meta.get('started')}, finished {meta.get('finished', '(cut short)')}",
             ""]
    rows = summary_rows(results)
    caps = sorted({k for r in rows for k in r if k.startswith("max_res_")})
    scheds = sorted({k for r in rows for k in r if k.startswith("s_per_image_")})
    head = ["config", "UNet ms/step (CFG b2)", "UNet ms/step back to back", "s/image", "x vs fp32 classic",
            "peak VRAM GiB", "UNet weights MiB", "attention"] + [
            c.replace("s_per_image_", "s/image ") for c in scheds] + [c.replace("max_res_", "max res ") for c in caps]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        vals = [r["config"], r["unet_ms"], r["unet_ms_pipelined"], r["s_per_image"], r["speedup_vs_fp32_classic"],
                r["peak_vram_gib"], r["unet_weights_mib"], r["attention_backend"]] + [r.get(c) for c in scheds] + [
                r.get(c) for c in caps]
        lines.append("| " + " | ".join(_cell(v) for v in vals) + " |")
    ratios = packed_ratios(rows)
    if ratios:
        lines += ["", "Packed UNet step / dense, back to back: " + ", ".join(
            f"{p} / {d} {r:.3f}x" for p, d, r in ratios)]
    lines += host_issue_lines(rows)
    pair = _get(results, "eager_interleaved", "packed_vs_fp16_sdpa")
    if isinstance(pair, dict) and "unet" in pair:
        u, im = pair["unet"], pair["image"]
        lines += ["", f"Eager packed / fp16-sdpa, the pipelines taking turns ({u['rounds']} rounds of "
                  f"{pair['calls']} UNet steps, {im['rounds']} of one image): UNet step {u['ratio_median']:.3f}x "
                  f"{_ci_text(u, lead='', tail=' ')}(per round {u['ratio_min']:.3f}-{u['ratio_max']:.3f}; "
                  f"fastest rounds {u['ratio_of_minima']:.3f}x; "
                  f"median steps {u['packed_ms']:.1f} vs {u['fp16-sdpa_ms']:.1f} ms), image {im['ratio_median']:.3f}x "
                  f"(per round {im['ratio_min']:.3f}-{im['ratio_max']:.3f})"]
        for name in EAGER_VARIANTS:
            v = pair.get(name)
            if isinstance(v, dict):
                lines[-1] += (f"; {name} in the same turns: UNet step {v['unet']['ratio_median']:.3f}x fp16-sdpa"
                              f"{_ci_text(v['unet'], lead=' ')}, {v['unet_vs_packed']['ratio_median']:.3f}x packed"
                              f"{_ci_text(v['unet_vs_packed'], lead=' ')}, image {v['image']['ratio_median']:.3f}x")
    launches = [(c["name"], c["unet_dequant_launches"]) for c in results.get("configs", [])
                if isinstance(c.get("unet_dequant_launches"), dict)]
    if launches:
        lines += ["", "Dequant launches per UNet call: " + ", ".join(
            f"{n} {d['launches']} ({d['groups']} groups + {d['lone_layers']} lone layers)" for n, d in launches)]
    errs = [f"- {r['config']}: {r['errors']}" for r in rows if r["errors"]]
    if errs:
        lines += ["", "Errors (recorded, run continued):", *errs]
    left = [(c["name"], c["left_allocated_bytes"]) for c in results.get("configs", [])
            if (c.get("left_allocated_bytes") or 0) > LEFT_WARN_BYTES]
    if left:   # later peaks and max-res searches in this process include it
        lines += ["", "Memory still allocated after a configuration was released (later peaks and max-res "
                  "searches in this run include it): " + ", ".join(f"{n} {b / 2**30:.2f} GiB" for n, b in left)]
    sweep = {c["name"]: c.get("sweep_unet_ms") for c in results.get("configs", []) if c.get("sweep_unet_ms")}
    if sweep:
        sides = sorted({int(s) for v in sweep.values() for s in v})
        lines += ["", "UNet ms/step (CFG batch 2) vs square side:", "",
                  "| config | " + " | ".join(f"{s}²" for s in sides) + " |", "|---|" + "---|" * len(sides)]
        for name, v in sweep.items():
            lines.append(f"| {name} | " + " | ".join(_cell(v.get(str(s))) for s in sides) + " |")
    sd = results.get("sdpa") or {}
    if sd:
        lines += ["", f"SDPA: flash enabled {sd.get('flash_sdp_enabled')}, mem-efficient {sd.get('mem_efficient_sdp_enabled')}, "
                  f"cuDNN enabled {sd.get('cudnn_sdp_enabled')}, math {sd.get('math_sdp_enabled')} (the attention column: "
                  f"the backend the dispatcher chose, from the forward's aten ops); flash probe ({sd.get('dtype')}): "
                  + ", ".join(f"{k} {v}" for k, v in (sd.get("probes") or {}).items())]
    return "\n".join(lines) + "\n"


LEFT_WARN_BYTES = 64 << 20   # more than this left allocated after a configuration is flagged in the report


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if v < 100 else f"{v:.0f}"
    return str(v)


def plot_time_vs_pixels(results: dict, path: str | os.PathLike) -> Path | None:
    """UNet ms/step vs pixel count, one line per configuration (PNG)."""
    series = {}
    for c in results.get("configs", []):
        pts = [(int(s) ** 2, v) for s, v in (c.get("sweep_unet_ms") or {}).items() if isinstance(v, (int, float))]
        if pts:
            series[c["name"]] = sorted(pts)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        ax.plot([p / 1e6 for p, _ in pts], [v for _, v in pts], marker="o", label=name)
    ax.set_xlabel("pixels (millions)")
    ax.set_ylabel("UNet ms/step (CFG batch 2)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    meta = results.get("meta", {})
    ax.set_title(f"{meta.get('model')} on {meta.get('gpu')}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_reports(results: dict, out_dir: str | os.PathLike) -> dict:
    """results.json + report.md (+ time_vs_pixels.png), each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in (("results.json", json.dumps(results, indent=1, default=str)),
                       ("report.md", markdown_report(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
        paths[name] = out / name
    try:
        png = plot_time_vs_pixels(results, out / "time_vs_pixels.png")
        if png:
            paths["time_vs_pixels.png"] = png
    except Exception as e:  # a plotting problem must not lose the numbers
        paths["plot_error"] = str(e)
    return paths
