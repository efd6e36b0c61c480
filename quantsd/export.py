"""Export a pipeline to a packed quantsd checkpoint (DESIGN §6, docs/FORMAT.md).

``export(pipe, recipe, out_dir)`` quantizes every planned layer with the same quantizer call
as ``apply_recipe`` (so reloaded weights equal the simulation bit for bit), writes a diffusers
pipeline directory whose ``text_encoder/``, ``unet/`` and ``vae/`` hold
``quantsd_weights.safetensors`` (packed layers + dense tensors), and a ``quantsd.json``
manifest.  Everything is written into a temporary directory beside ``out_dir`` and renamed
into place at the end, so a crash never leaves a half-written checkpoint under ``out_dir``.

``dry_run(pipe, recipe)`` computes the same plan, tensor layout and manifest from shapes alone
(works for a pipeline on the meta device) and predicts every file's exact size.
"""

from __future__ import annotations

import json
import sys
import types
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Mapping

import torch

from . import __version__
from .fileio import sha256_file
from .io import (
    DTYPE_NAMES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    METADATA_KEY,
    MODELS,
    WEIGHTS_NAME,
    dtype_name,
    safetensors_layout,
    st_dtype,
    write_safetensors,
)
from .quant import param_shape
from .recipe import Plan, Recipe, load_recipe, quantize_layer_weight, resolve_recipe

__all__ = ["export", "dry_run", "ExportError", "parse_dense_dtype"]

_PLACEHOLDER_SHA = "0" * 64


class ExportError(ValueError):
    """The export cannot proceed (output exists, meta-device weights, ...)."""


def parse_dense_dtype(dtype: "torch.dtype | str | None") -> torch.dtype | None:
    """``torch.float16`` (default), a name, or None / "keep" (tensors keep their dtype)."""
    if dtype is None or dtype == "keep":
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ExportError(f"unknown dtype {dtype!r}; choose keep, {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[dtype]
    if dtype not in DTYPE_NAMES.values():
        raise ExportError(f"dense dtype must be a floating dtype, got {dtype}")
    return dtype


def _model_of(path: str) -> tuple[str, str]:
    model, _, key = path.partition(".")
    return model, key


def _layout(pipe, plan: Plan, dense_dtype: torch.dtype | None) -> dict[str, dict]:
    """Per model: tensor entries (name, st dtype, shape), header metadata and accounting.

    Needs only shapes and dtypes, so it is shared by export and dry_run.
    """
    per_model: dict[str, dict] = {m: {"entries": [], "layers": {}, "dense_bytes": 0, "quantized_bytes": 0,
                                      "quantized_layers": 0, "dense_dtypes": set()} for m in MODELS}
    quantized = {}
    for lp in plan.layers:
        model, key = _model_of(lp.path)
        quantized[(model, key)] = lp
    for model in MODELS:
        info = per_model[model]
        sd = getattr(pipe, model).state_dict()
        for name, t in sd.items():
            key = name[: -len(".weight")] if name.endswith(".weight") else None
            lp = quantized.get((model, key)) if key is not None else None
            if lp is None:
                dt = dense_dtype if (dense_dtype is not None and t.is_floating_point()) else t.dtype
                if t.is_floating_point():
                    info["dense_dtypes"].add(dtype_name(dt))
                info["entries"].append((name, st_dtype(dt), tuple(t.shape)))
                info["dense_bytes"] += t.numel() * torch.empty((), dtype=dt).element_size()
                continue
            pshape = param_shape(lp.shape, lp.granularity)
            sdt = st_dtype(DTYPE_NAMES[lp.scale_dtype])
            info["entries"].append((f"{key}.weight_packed", "U8", (lp.packed_bytes,)))
            info["entries"].append((f"{key}.weight_scale", sdt, pshape))
            if lp.method in ("pwlq", "pwlq-stochastic"):
                info["entries"].append((f"{key}.weight_breakpoint", sdt, pshape))
            info["entries"].append((f"{key}.weight_shape", "I64", (len(lp.shape),)))
            info["quantized_bytes"] += lp.nbytes + 8 * len(lp.shape)
            info["quantized_layers"] += 1
            wdt = dense_dtype if dense_dtype is not None else t.dtype
            info["layers"][key] = {"path": lp.path, "method": lp.method, "bits": lp.bits,
                                   "granularity": lp.granularity, "scale_dtype": lp.scale_dtype, "seed": lp.seed,
                                   "shape": list(lp.shape), "dtype": dtype_name(wdt)}
        missing = [k for (m, k) in quantized if m == model and k not in info["layers"]]
        if missing:
            raise ExportError(f"{model}: planned layers not in its state dict: {missing[:3]}")
    return per_model


def _header_metadata(model: str, info: dict, plan: Plan, dense_name: str) -> dict[str, str]:
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "quantsd_version": __version__,
            "model": model, "recipe_sha256": plan.recipe_sha256, "dense_dtype": dense_name,
            "layers": info["layers"]}
    return {METADATA_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))}


def _dense_name(per_model: dict, dense_dtype: torch.dtype | None) -> str:
    if dense_dtype is not None:
        return dtype_name(dense_dtype)
    names = set().union(*(i["dense_dtypes"] for i in per_model.values()))
    return names.pop() if len(names) == 1 else "mixed"


def _write_side_files(pipe, root: Path) -> None:
    """model_index.json, scheduler/, tokenizer/ and the three model configs (JSON/text only)."""
    pipe.save_config(root)
    pipe.scheduler.save_pretrained(root / "scheduler")
    pipe.tokenizer.save_pretrained(str(root / "tokenizer"))
    (root / "text_encoder").mkdir(exist_ok=True)
    pipe.text_encoder.config.save_pretrained(str(root / "text_encoder"))
    pipe.unet.save_config(root / "unet")
    pipe.vae.save_config(root / "vae")


def _files_table(root: Path, hashes: bool) -> dict[str, dict]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel == MANIFEST_NAME or rel.endswith(WEIGHTS_NAME):
                continue
            out[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p) if hashes else _PLACEHOLDER_SHA}
    return out


def _manifest(plan: Plan, per_model: dict, comp_files: dict[str, dict], files: dict[str, dict], dense_name: str,
              source: str | None) -> dict:
    components = {}
    for m in MODELS:
        info, f = per_model[m], comp_files[m]
        components[m] = {"file": f"{m}/{WEIGHTS_NAME}", "bytes": f["bytes"], "sha256": f["sha256"],
                         "header_bytes": f["header_bytes"], "quantized_layers": info["quantized_layers"],
                         "quantized_bytes": info["quantized_bytes"], "dense_bytes": info["dense_bytes"]}
    layers = []
    for lp in plan.layers:
        model, key = _model_of(lp.path)
        layers.append({**lp.to_dict(), "model": model, "key": key, "dtype": per_model[model]["layers"][key]["dtype"]})
    weights = sum(c["bytes"] for c in components.values())
    other = sum(f["bytes"] for f in files.values())
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "quantsd_version": __version__,
        "source": source,
        "dense_dtype": dense_name,
        "recipe_sha256": plan.recipe_sha256,
        "recipe": plan.recipe.to_dict(),
        "components": components,
        "files": files,
        "totals": {"weights_bytes": weights, "other_files_bytes": other,
                   "quantized_layers": len(plan.layers), "dense_layers": len(plan.dense),
                   "quantized_tensor_bytes": sum(per_model[m]["quantized_bytes"] for m in MODELS),
                   "dense_tensor_bytes": sum(per_model[m]["dense_bytes"] for m in MODELS)},
        "layers": layers,
        "dense_layers": [d.to_dict() for d in plan.dense],
    }


def _manifest_bytes(manifest: Mapping) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode("utf-8")


def dry_run(pipe, recipe: "Recipe | str | os.PathLike | Mapping", dtype: "torch.dtype | str | None" = torch.float16,
            source: str | None = None) -> dict:
    """Plan, predicted manifest and exact sizes of ``export`` without writing the checkpoint.

    Works on a pipeline on the meta device.  ``total_bytes`` is the exact size of the
    directory ``export`` would write (weights, configs, tokenizer, scheduler, manifest).
    """
    dense_dtype = parse_dense_dtype(dtype)
    plan = resolve_recipe(pipe, recipe)
    per_model = _layout(pipe, plan, dense_dtype)
    dense_name = _dense_name(per_model, dense_dtype)
    comp_files = {}
    for m in MODELS:
        header, _, size = safetensors_layout(per_model[m]["entries"], _header_metadata(m, per_model[m], plan, dense_name))
        comp_files[m] = {"bytes": size, "sha256": _PLACEHOLDER_SHA, "header_bytes": len(header)}
    with tempfile.TemporaryDirectory() as tmp:  # configs/tokenizer only, to measure them
        _write_side_files(pipe, Path(tmp))
        files = _files_table(Path(tmp), hashes=False)
    manifest = _manifest(plan, per_model, comp_files, files, dense_name, source)
    mbytes = len(_manifest_bytes(manifest))
    total = manifest["totals"]["weights_bytes"] + manifest["totals"]["other_files_bytes"] + mbytes
    return {"plan": plan, "manifest": manifest, "manifest_bytes": mbytes, "total_bytes": total}


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise ExportError(f"{out} exists and is not a directory; choose another output path")
        empty = not any(out.iterdir())
        if empty:
            return
        if not overwrite:
            raise ExportError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
        if not (out / MANIFEST_NAME).is_file():
            raise ExportError(f"{out} exists and is not a quantsd checkpoint; refusing to overwrite it "
                              "(remove it yourself or choose another output path)")


def export(
    pipe,
    recipe: "Recipe | str | os.PathLike | Mapping",
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    dtype: "torch.dtype | str | None" = torch.float16,
    source: str | None = None,
    progress: bool = False,
) -> dict:
    """Quantize ``pipe`` with ``recipe`` and write a packed checkpoint to ``out_dir``.

    ``dtype``: storage dtype of the dense (unquantized floating) tensors; float16 by default,
    None/"keep" keeps each tensor's dtype.  Returns the manifest (also written as
    ``out_dir/quantsd.json``).  Refuses to replace an existing non-empty ``out_dir`` unless
    ``overwrite`` (and then only a previous quantsd checkpoint).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir).expanduser()
    _check_target(out, overwrite)
    recipe = load_recipe(recipe)
    dense_dtype = parse_dense_dtype(dtype)
    plan = resolve_recipe(pipe, recipe)
    if any(getattr(pipe, m).device.type == "meta" for m in MODELS):
        raise ExportError("the pipeline is on the meta device (no weights): use dry_run / `--dry-run` for sizes")
    if any(getattr(_get(pipe, lp.path), "_quantsd_simulated", None) is not None for lp in plan.layers):
        warnings.warn("exporting a pipeline whose weights were already quantized by apply_recipe: they are "
                      "quantized again (export the original weights to match the simulation)", stacklevel=2)
    per_model = _layout(pipe, plan, dense_dtype)
    dense_name = _dense_name(per_model, dense_dtype)
    by_model: dict[str, dict] = {m: {} for m in MODELS}
    for lp in plan.layers:
        m, key = _model_of(lp.path)
        by_model[m][key] = lp

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.quantsd-tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        _write_side_files(pipe, tmp)
        comp_files = {}
        bar = tqdm(total=len(plan.layers), desc="export", unit="layer", disable=not progress)
        for m in MODELS:
            tensors: dict[str, torch.Tensor] = {}
            for name, t in getattr(pipe, m).state_dict().items():
                key = name[: -len(".weight")] if name.endswith(".weight") else None
                lp = by_model[m].get(key) if key is not None else None
                if lp is None:
                    t = t.detach()
                    if dense_dtype is not None and t.is_floating_point():
                        t = t.to(dense_dtype)
                    tensors[name] = t.cpu()
                    continue
                qt = quantize_layer_weight(t, lp)
                tensors[f"{key}.weight_packed"] = qt.pack().cpu()
                tensors[f"{key}.weight_scale"] = qt.scale.cpu()
                if qt.breakpoint is not None:
                    tensors[f"{key}.weight_breakpoint"] = qt.breakpoint.cpu()
                tensors[f"{key}.weight_shape"] = torch.tensor(lp.shape, dtype=torch.int64)
                bar.update(1)
            path = tmp / m / WEIGHTS_NAME
            path.parent.mkdir(exist_ok=True)
            meta = _header_metadata(m, per_model[m], plan, dense_name)
            size = write_safetensors(path, tensors, meta)
            header, _, predicted = safetensors_layout(per_model[m]["entries"], meta)
            if size != predicted:  # pragma: no cover - layout and writer share one function
                raise ExportError(f"internal error: {m} file is {size} bytes, layout says {predicted}")
            comp_files[m] = {"bytes": size, "sha256": sha256_file(path), "header_bytes": len(header)}
            del tensors
        bar.close()
        manifest = _manifest(plan, per_model, comp_files, _files_table(tmp, hashes=True), dense_name, source)
        with open(tmp / MANIFEST_NAME, "wb") as f:
            f.write(_manifest_bytes(manifest))
            f.flush()
            os.fsync(f.fileno())
        _check_target(out, overwrite)
        if out.exists() and any(out.iterdir()):
            old = out.parent / f".{out.name}.quantsd-old-{uuid.uuid4().hex[:12]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.exists():
                out.rmdir()
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _get(pipe, path: str):
    from .blocks import get_module

    return get_module(pipe, path)


def directory_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit, k in (("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if n >= 1024**k:
            return f"{n / 1024**k:.3f} {unit}"
    return f"{n} B"  # pragma: no cover



class _CallableModule(types.ModuleType):
    """DESIGN §2 makes ``quantsd.export`` a function, and §1 a module of that name. Importing the
    submodule (which io/eval/cli do) rebinds the package attribute ``quantsd.export`` to this
    module, so the module forwards calls: ``quantsd.export(pipe, recipe, out)`` works either way."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
