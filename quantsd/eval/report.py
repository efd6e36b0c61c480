"""Markdown reports and result tables in the style of the paper's Tables I and II.

``render_table(rows)``: one row per evaluated model (fp32 first, then by packed size,
largest first) with packed size, FID, KID, IS, rFID, rKID, latent MSE, PSNR and adherence,
followed by the full protocol. ``merge_table(path, results)`` puts (or replaces, by label) a
row into the table region of a Markdown file (``<!-- quantsd-eval-table:begin/end -->``; the
rows travel inside it as JSON, so merging needs no other file) and leaves the rest of the file
alone. ``aggregate(paths)`` builds a table from several ``results.json`` files / run folders.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..fileio import atomic_write_text

BEGIN = "<!-- quantsd-eval-table:begin -->"
END = "<!-- quantsd-eval-table:end -->"
ROWS_PREFIX = "<!-- quantsd-eval-rows "

COLUMNS = ("Model", "Packed size (MB)", "FID ↓", "KID×10³ ↓", "IS ↑", "rFID ↓", "rKID×10³ ↓", "Latent MSE ↓",
           "PSNR (dB) ↑", "Adherence ↑")
PROTOCOL_KEYS = ("prompts", "num_prompts", "seed", "steps", "guidance", "dtype", "real_images",
                 "generated_preprocessing", "feature_extractor", "metrics_implementation", "kid", "is", "rkid",
                 "latent_mse", "psnr", "adherence", "noise")


def row_from_results(results: dict, source: str | None = None) -> dict:
    m = results.get("metrics", {})
    adh = m.get("adherence")
    return {
        "label": results["label"], "model": results["model"], "reference": results["reference"],
        "packed_bytes": results.get("model_info", {}).get("packed_bytes"),
        "fid": m.get("fid"), "fid_numpy": m.get("fid_numpy"), "kid_mean": m.get("kid_mean"),
        "kid_std": m.get("kid_std"), "is_mean": m.get("is_mean"), "is_std": m.get("is_std"),
        "rfid": m.get("rfid"), "rkid_mean": m.get("rkid_mean"), "latent_mse": m.get("latent_mse"),
        "psnr": m.get("psnr"), "same_as_reference": results.get("same_as_reference", False),
        "adherence": adh.get("all") if isinstance(adh, dict) else None,
        "protocol": {k: results.get("protocol", {}).get(k) for k in PROTOCOL_KEYS},
        "complete": results.get("complete", True), "source": source,
    }


def _f(x, fmt="{:.2f}", scale=1.0, dash="–"):
    if x is None:
        return dash
    out = fmt.format(x * scale)
    return out[1:] if out.startswith("-") and float(out) == 0 else out  # no "-0.00"


def _row_cells(r: dict) -> list[str]:
    same = r.get("same_as_reference")
    psnr = "∞" if (r.get("psnr") is None and same) else _f(r.get("psnr"))
    is_ = "n/a" if r.get("is_mean") is None else f"{r['is_mean']:.2f} ± {r['is_std']:.2f}"
    kid = None if r.get("kid_mean") is None else f"{r['kid_mean'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f}"
    return [r["label"], _f(r.get("packed_bytes"), "{:.2f}", 1e-6), _f(r.get("fid")), kid or "–", is_,
            _f(r.get("rfid")), _f(r.get("rkid_mean"), "{:.2f}", 1e3), _f(r.get("latent_mse"), "{:.3g}"), psnr,
            _f(r.get("adherence"), "{:.1%}")]


def _order(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (not r.get("same_as_reference"), -(r.get("packed_bytes") or 0), r["label"]))


def render_table(rows: list[dict]) -> str:
    rows = _order(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in rows]
    out = "\n".join(lines) + "\n"
    if not rows:
        return out
    p = rows[0]["protocol"]
    fe = p.get("feature_extractor") or {}
    kid = p.get("kid") or {}
    differ = sorted({k for r in rows for k in PROTOCOL_KEYS if r["protocol"].get(k) != p.get(k)})
    out += "\n" + "\n".join([
        f"Protocol: {p.get('num_prompts')} prompts ({p.get('prompts')}); reference model "
        f"`{rows[0]['reference']}`; {p.get('steps')} steps, guidance {p.get('guidance')}, seed {p.get('seed')}, "
        f"{p.get('dtype')}; {p.get('noise')}.",
        f"Real images: {p.get('real_images')}; generated images: {p.get('generated_preprocessing')}.",
        f"Features: {fe.get('name')} — {fe.get('description')}.",
        f"Metrics: {p.get('metrics_implementation')}. KID: {kid.get('subsets')} subsets of "
        f"{kid.get('subset_size')}, cubic polynomial kernel, shown ×10³ (mean ± std). IS: {(p.get('is') or {}).get('splits')} "
        "splits (n/a: the feature network has no classifier logits). rFID / rKID: generated vs the reference model's "
        "images on the same prompts and noise (rKID: " + str(p.get("rkid")) + "). Latent MSE: " + str(p.get("latent_mse")) + ". PSNR: "
        + str(p.get("psnr")) + " (∞: identical). Adherence: " + str(p.get("adherence") or "n/a (not the fixture)") + ".",
        "Packed size: text encoder + UNet + VAE weights — quantsd checkpoints: their packed safetensors files "
        "(quantized codes + scales + fp16 dense tensors); dense models: parameter count × bytes of the evaluated "
        "dtype (fp32: 4).",
    ]) + "\n"
    if differ:
        out += f"\n**Warning:** rows differ in protocol fields: {', '.join(differ)}.\n"
    incomplete = [r["label"] for r in rows if not r.get("complete", True)]
    if incomplete:
        out += f"\n**Incomplete runs:** {', '.join(incomplete)}.\n"
    return out


def render_report(results: dict) -> str:
    row = row_from_results(results)
    m = results.get("metrics", {})
    lines = [f"# quantsd eval: {results['label']}", "",
             f"Model `{results['model']}` vs reference `{results['reference']}`.", "", render_table([row]),
             "## Cross-checks", "",
             f"- FID (torchmetrics) {m.get('fid')} vs numpy/scipy {m.get('fid_numpy')}",
             f"- rFID (torchmetrics) {m.get('rfid')} vs numpy/scipy {m.get('rfid_numpy')}"]
    if isinstance(m.get("adherence"), dict):
        lines.append(f"- adherence per attribute: {json.dumps(m['adherence'])}; reference model: "
                     f"{json.dumps(m.get('adherence_reference'))}")
    for k, v in (results.get("unavailable") or {}).items():
        lines.append(f"- {k}: unavailable — {v}")
    for k, v in (results.get("errors") or {}).items():
        lines.append(f"- **error** in {k}: {v}")
    lines += ["", "## Protocol", "", "```json", json.dumps(results.get("protocol"), indent=2, ensure_ascii=False),
              "```", "", f"Timings: {json.dumps(results.get('timings'))}", ""]
    return "\n".join(lines)


def _read_results(p: str | os.PathLike) -> tuple[dict, str]:
    path = Path(p)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json at {str(p)!r}")
    return json.loads(path.read_text(encoding="utf-8")), str(path)


def aggregate(paths) -> tuple[str, list[dict]]:
    rows = []
    for p in paths:
        res, src = _read_results(p)
        rows.append(row_from_results(res, src))
    return render_table(rows), rows


def _region(rows: list[dict]) -> str:
    protocols: dict[str, dict] = {}
    slim = []
    for r in rows:
        pid = hashlib.sha256(json.dumps(r["protocol"], sort_keys=True).encode()).hexdigest()[:10]
        protocols[pid] = r["protocol"]
        slim.append({**{k: v for k, v in r.items() if k != "protocol"}, "protocol": pid})
    payload = json.dumps({"rows": slim, "protocols": protocols}, ensure_ascii=False, sort_keys=True)
    payload = payload.replace("--", "\\u002d\\u002d")
    return f"{BEGIN}\n{render_table(rows)}\n{ROWS_PREFIX}{payload} -->\n{END}\n"


def read_table_rows(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    text = p.read_text(encoding="utf-8")
    if BEGIN not in text:
        return []
    region = text.split(BEGIN, 1)[1].split(END, 1)[0]
    if ROWS_PREFIX not in region:
        return []
    data = json.loads(region.split(ROWS_PREFIX, 1)[1].rsplit("-->", 1)[0])
    if isinstance(data, list):
        return data
    return [{**r, "protocol": data["protocols"][r["protocol"]]} for r in data["rows"]]


def write_table(path: str | os.PathLike, rows: list[dict], title: str = "## Results") -> None:
    """Write ``rows`` into the table region of ``path`` (created, or appended if it has no region)."""
    p = Path(path)
    text = p.read_text(encoding="utf-8") if p.is_file() else ""
    region = _region(rows)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + region + ("\n" + tail if tail else "")
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + f"{title}\n\n" + region
    atomic_write_text(p, text)


def merge_table(path: str | os.PathLike, results: dict, source: str | os.PathLike | None = None) -> list[dict]:
    """Add this run's row to the table in ``path``, replacing a row with the same label."""
    new = row_from_results(results, str(source) if source else None)
    rows = [r for r in read_table_rows(path) if r["label"] != new["label"]] + [new]
    write_table(path, rows)
    return rows
