"""``run_sensitivity``: the resumable sweep driver behind ``quantsd sensitivity``."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..blocks import list_blocks
from ..models import place_pipeline
from .config import SweepConfig
from .report import plot_components, sorted_records, write_csv, write_markdown
from .runner import PipelineRunner, load_or_compute_reference, measure, sweep_plan
from ..fileio import atomic_write_text
from .store import ResultStore, SweepDirError


def _versions() -> dict:
    import diffusers
    import transformers

    return {"quantsd": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _check_directory(out_dir: Path, config: SweepConfig) -> None:
    """Refuse to mix results of a different model or configuration into ``out_dir``."""
    meta = out_dir / "sweep.json"
    if not meta.exists():
        if (out_dir / "sensitivity.jsonl").exists():
            raise SweepDirError(f"{out_dir} holds sensitivity.jsonl but no sweep.json; "
                                "choose another output directory")
        return
    old = json.loads(meta.read_text())
    if old.get("fingerprint") != config.fingerprint():
        diffs = [k for k, v in config.to_dict().items()
                 if k not in ("fingerprint", "methods", "bits", "extra") and old.get(k) != (list(v) if isinstance(v, tuple) else v)]
        raise SweepDirError(
            f"{out_dir} holds a sweep of a different model or configuration (differs in: "
            f"{', '.join(diffs) or 'fingerprint'}); nothing was overwritten. Use another -o directory, "
            "or re-run with the original settings to resume it."
        )


def run_sensitivity(pipe, config: SweepConfig, out_dir: str | Path, device: str | torch.device | None = None,
                    batch_size: int = 8, progress: bool = True, limit: int | None = None) -> list[dict]:
    """Run (or resume) a sweep, writing results into ``out_dir`` as they come.

    ``limit`` stops after that many new configurations (used to test resumption). Returns all
    records of the sweep in deterministic order, and (re)writes the CSV, report and plots.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_directory(out_dir, config)
    device = torch.device(device) if device is not None else next(pipe.unet.parameters()).device
    place_pipeline(pipe, dtype=getattr(torch, config.dtype), device=device)
    old_meta = out_dir / "sweep.json"
    unswept = [b for b in list_blocks(pipe) if b.component in config.components and not b.layer_names]
    # Bytes of parameters no sweep entry covers (norms outside any layer-bearing block), at fp16:
    # the search adds them to every bit map so its sizes are whole-pipeline sizes.
    meta = config.to_dict() | {"versions": _versions(), "fixed_bytes": sum(b.fp16_bytes for b in unswept)}
    if old_meta.exists():  # extending a sweep with more methods/bits keeps the union listed
        old = json.loads(old_meta.read_text())
        meta["methods"] = sorted(set(old.get("methods", [])) | set(config.methods))
        meta["bits"] = sorted(set(old.get("bits", [])) | set(config.bits))
    atomic_write_text(old_meta, json.dumps(meta, indent=2))

    store = ResultStore(out_dir / "sensitivity.jsonl")
    runner = PipelineRunner(pipe, config, device, batch_size=batch_size)
    plan = sweep_plan(pipe, config)
    done = store.done_keys()
    todo = [(b, m, n) for b, m, n in plan if (b.name, m, n, config.granularity) not in done]
    if todo:
        ref = load_or_compute_reference(runner, out_dir / "reference.safetensors")
        bar = tqdm(todo, desc="sensitivity", unit="cfg", disable=not progress, dynamic_ncols=True)
        for count, (block, method, bits) in enumerate(bar):
            if limit is not None and count >= limit:
                break
            bar.set_postfix_str(f"{block.name} {method} {bits}b", refresh=False)
            store.append(measure(runner, ref, block, method, bits))
        bar.close()
    return write_outputs(pipe, store.records, out_dir, meta)


def write_outputs(pipe, records: list[dict], out_dir: Path, meta: dict) -> list[dict]:
    order = [b.name for b in list_blocks(pipe)]
    records = sorted_records(records, order)
    write_csv(records, out_dir / "sensitivity.csv")
    plots = plot_components(records, out_dir, order)
    write_markdown(records, meta, meta.get("versions", {}), out_dir / "report.md", plots)
    return records


def summarize(records: list[dict]) -> dict:
    """Per component and setting: mean / max errors and the most sensitive block."""
    out: dict = {}
    for r in records:
        key = f"{r['component']}/{r['method']}/{r['bits']}"
        s = out.setdefault(key, {"n": 0, "mean_image_error": 0.0, "max_image_error": 0.0, "worst_block": None})
        s["n"] += 1
        s["mean_image_error"] += r["image_error"]
        if r["image_error"] >= s["max_image_error"]:
            s["max_image_error"], s["worst_block"] = r["image_error"], r["block"]
    for s in out.values():
        s["mean_image_error"] /= s["n"]
    return out
