"""Packed checkpoint I/O (DESIGN §6; the on-disk format is specified in docs/FORMAT.md).

* a strict safetensors writer/reader: quantsd writes the files itself (deterministic header
  layout, so ``quantsd export --dry-run`` can predict every byte) and parses headers itself
  with hard limits before reading any tensor; files stay readable by ``safetensors``.
* :func:`load_checkpoint`: validate everything (format version, manifest, file sizes,
  sha256, header, every tensor's dtype / shape / byte count against the architecture built
  from the configs on the meta device), then read and assemble a standard diffusers
  ``StableDiffusionPipeline``.  Only JSON, text and raw tensor bytes are read; nothing is
  unpickled and no code named by the checkpoint is imported (component classes come from an
  allow-list).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from . import __version__
from .fileio import sha256_file

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "MODELS",
    "CheckpointError",
    "write_safetensors",
    "safetensors_layout",
    "read_safetensors_header",
    "read_manifest",
    "load_checkpoint",
    "inspect_checkpoint",
]

FORMAT_NAME = "quantsd-packed"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST_NAME = "quantsd.json"
WEIGHTS_NAME = "quantsd_weights.safetensors"
MODELS = ("text_encoder", "unet", "vae")          # pipeline components holding weights
METADATA_KEY = "quantsd"
MAX_HEADER_BYTES = 100 * 2**20                    # same limit as the safetensors library
MAX_JSON_BYTES = 64 * 2**20
QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_breakpoint", "weight_shape")

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in ST_DTYPES.items()}
DTYPE_NAMES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16,
               "float64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (corrupt, truncated, mismatched or unsupported)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def st_dtype(dtype: torch.dtype) -> str:
    try:
        return _ST_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in a quantsd checkpoint") from None


# --------------------------------------------------------------------------- safetensors writer
def safetensors_layout(entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str]
                       ) -> tuple[bytes, list[tuple[str, int, int]], int]:
    """Header bytes (length prefix included), [(name, begin, end)] in data order, file size.

    Tensors are laid out by decreasing element size, then by name, so every tensor is aligned
    to its element size; the JSON header is compact and space-padded to a multiple of 8.
    """
    rows = sorted(((n, d, tuple(int(x) for x in s)) for n, d, s in entries), key=lambda e: (-_ITEMSIZE[e[1]], e[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    order, off = [], 0
    for name, dt, shape in rows:
        nbytes = math.prod(shape) * _ITEMSIZE[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        order.append((name, off, off + nbytes))
        off += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, order, 8 + len(raw) + off


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                      ) -> int:
    """Write ``tensors`` as a safetensors file with our deterministic layout; returns its size."""
    if sys.byteorder != "little":  # pragma: no cover
        raise RuntimeError("quantsd checkpoints are little-endian; big-endian hosts are not supported")
    header, order, size = safetensors_layout(((n, st_dtype(t.dtype), tuple(t.shape)) for n, t in tensors.items()),
                                             metadata)
    with open(path, "wb") as f:
        f.write(header)
        for name, _, _ in order:
            f.write(_tensor_bytes(tensors[name]))
        f.flush()
        os.fsync(f.fileno())
    return size


# --------------------------------------------------------------------------- safetensors reader
@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data section
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, TensorInfo], int]:
    """Parse and fully validate a safetensors header without reading tensor data.

    Returns (metadata, {name: TensorInfo}, data_start).  Checks: length prefix within the
    file and the 100 MB limit, UTF-8 JSON object, known dtypes, non-negative int shapes,
    ``end - begin == numel * itemsize``, and offsets that tile the data section exactly
    (no gaps, overlaps, or bytes missing: a truncated file fails here).
    """
    path = Path(path)
    where = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{where}: truncated ({size} bytes; a safetensors file starts with an 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(f"{where}: corrupt or truncated header (declared header length {n} bytes, "
                                      f"file has {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read ({e})") from None
    if len(raw) != n:
        raise CheckpointError(f"{where}: truncated header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: corrupt header (not UTF-8 JSON: {type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{where}: corrupt header (__metadata__ must map strings to strings)")
    infos: dict[str, TensorInfo] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: corrupt header entry for {name!r}")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dt not in ST_DTYPES:
            raise CheckpointError(f"{where}: tensor {name!r} has unsupported dtype {dt!r}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(s) and 0 <= s < 2**40 for s in shape):
            raise CheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f"{where}: tensor {name!r} has invalid data offsets {offs!r}")
        nbytes = math.prod(shape) * _ITEMSIZE[dt]
        if offs[1] - offs[0] != nbytes:
            raise CheckpointError(f"{where}: tensor {name!r}: {offs[1] - offs[0]} bytes stored but dtype {dt} "
                                  f"shape {shape} needs {nbytes}")
        infos[name] = TensorInfo(name, dt, tuple(shape), offs[0], offs[1])
    pos = 0
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != pos:
            raise CheckpointError(f"{where}: corrupt header (tensor {info.name!r} starts at byte {info.begin}, "
                                  f"expected {pos}: gap or overlap)")
        pos = info.end
    data_start = 8 + n
    if data_start + pos != size:
        raise CheckpointError(f"{where}: {'truncated' if data_start + pos > size else 'trailing bytes'}: the header "
                              f"describes {data_start + pos} bytes, the file has {size}")
    return metadata, infos, data_start


def read_tensors(path: str | os.PathLike, infos: Iterable[TensorInfo], data_start: int) -> dict[str, torch.Tensor]:
    """Read validated tensors (CPU) in file order; no mmap, no pickle."""
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for info in sorted(infos, key=lambda i: i.begin):
            nbytes = info.end - info.begin
            buf = torch.empty(nbytes, dtype=torch.uint8)
            if nbytes:
                f.seek(data_start + info.begin)
                got = f.readinto(memoryview(buf.numpy()))
                if got != nbytes:
                    raise CheckpointError(f"{path}: truncated while reading {info.name!r}")
            dt = info.torch_dtype
            t = buf.view(torch.uint8).to(torch.bool) if dt == torch.bool else (buf.view(dt) if nbytes else
                                                                                 torch.empty(0, dtype=dt))
            out[info.name] = t.reshape(info.shape)
    return out


# --------------------------------------------------------------------------- manifest
def _read_json(path: Path, what: str) -> Any:
    try:
        size = path.stat().st_size
    except OSError:
        raise CheckpointError(f"{path.parent}: missing {what} ({path.name})") from None
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {what} is implausibly large ({size} bytes)")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt {what} (not UTF-8 JSON: {e})") from None


def check_format_version(version: Any, where: str) -> int:
    if not _is_int(version) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"{where}: unsupported quantsd checkpoint format version {version!r}; this quantsd ({__version__}) "
            f"reads version(s) {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}. Upgrade quantsd to load it."
        )
    return version


def read_manifest(path: str | os.PathLike) -> dict:
    """The validated ``quantsd.json`` of a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a directory (a quantsd checkpoint is a pipeline folder)")
    m = _read_json(path / MANIFEST_NAME, "manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path / MANIFEST_NAME}: not a quantsd checkpoint manifest (format != {FORMAT_NAME!r})")
    check_format_version(m.get("format_version"), str(path / MANIFEST_NAME))
    for key in ("components", "files", "layers", "recipe_sha256", "recipe", "dense_dtype"):
        if key not in m:
            raise CheckpointError(f"{path / MANIFEST_NAME}: corrupt manifest (missing {key!r})")
    comps = m["components"]
    if not isinstance(comps, dict) or set(comps) != set(MODELS):
        raise CheckpointError(f"{path / MANIFEST_NAME}: corrupt manifest (components must be {', '.join(MODELS)})")
    for name, c in comps.items():
        if (not isinstance(c, dict) or c.get("file") != f"{name}/{WEIGHTS_NAME}" or not _is_int(c.get("bytes"))
                or not isinstance(c.get("sha256"), str)):
            raise CheckpointError(f"{path / MANIFEST_NAME}: corrupt manifest entry for component {name!r}")
    if not isinstance(m["files"], dict) or not isinstance(m["layers"], list):
        raise CheckpointError(f"{path / MANIFEST_NAME}: corrupt manifest (files/layers)")
    return m


def _check_files(root: Path, manifest: dict, verify: bool) -> None:
    entries = [(c["file"], c["bytes"], c["sha256"]) for c in manifest["components"].values()]
    for rel, e in manifest["files"].items():
        if not isinstance(e, dict) or not _is_int(e.get("bytes")) or not isinstance(e.get("sha256"), str):
            raise CheckpointError(f"{root / MANIFEST_NAME}: corrupt manifest entry for file {rel!r}")
        entries.append((rel, e["bytes"], e["sha256"]))
    for rel, nbytes, sha in entries:
        if not isinstance(rel, str) or rel.startswith(("/", "\\")) or ".." in Path(rel).parts:
            raise CheckpointError(f"{root / MANIFEST_NAME}: invalid file name {rel!r}")
        p = root / rel
        if not p.is_file():
            raise CheckpointError(f"{root}: missing file {rel} (incomplete copy?)")
        size = p.stat().st_size
        if size != nbytes:
            raise CheckpointError(f"{p}: {size} bytes, the manifest says {nbytes} "
                                  f"({'truncated' if size < nbytes else 'modified or replaced'} file)")
        if verify and sha256_file(p) != sha:
            raise CheckpointError(f"{p}: sha256 mismatch (corrupt file); pass verify=False to skip this check")


# --------------------------------------------------------------------------- architecture skeletons
@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device (buffers stay real), like
    ``accelerate.init_empty_weights(include_buffers=False)``."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


_ALLOWED = {
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    "unet": ("diffusers", ("UNet2DConditionModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
}


def _check_model_index(root: Path) -> dict:
    idx = _read_json(root / "model_index.json", "model_index.json")
    if not isinstance(idx, dict) or idx.get("_class_name") != "StableDiffusionPipeline":
        raise CheckpointError(f"{root / 'model_index.json'}: only StableDiffusionPipeline checkpoints are supported")
    for comp, (lib, names) in _ALLOWED.items():
        if idx.get(comp) != [lib, names[0]] and not (isinstance(idx.get(comp), list) and idx[comp][:1] == [lib]
                                                     and idx[comp][1:] and idx[comp][1] in names):
            raise CheckpointError(f"{root / 'model_index.json'}: {comp} must be one of "
                                  f"{', '.join(f'{lib}.{n}' for n in names)}, got {idx.get(comp)!r}")
    sch = idx.get("scheduler")
    if not (isinstance(sch, list) and len(sch) == 2 and sch[0] == "diffusers" and isinstance(sch[1], str)):
        raise CheckpointError(f"{root / 'model_index.json'}: invalid scheduler entry {sch!r}")
    return idx


def _scheduler_class(name: str):
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise CheckpointError(f"unknown scheduler class {name!r} in model_index.json")
    return cls


def _build_skeleton(root: Path, model: str) -> nn.Module:
    cfg = _read_json(root / model / "config.json", f"{model} config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{root / model / 'config.json'}: not a JSON object")
    try:
        with _parameters_on_meta():
            if model == "text_encoder":
                from transformers import CLIPTextConfig, CLIPTextModel

                mod = CLIPTextModel(CLIPTextConfig.from_dict(cfg))
            elif model == "unet":
                from diffusers import UNet2DConditionModel

                mod = UNet2DConditionModel.from_config(cfg)
            else:
                from diffusers import AutoencoderKL

                mod = AutoencoderKL.from_config(cfg)
    except CheckpointError:
        raise
    except Exception as e:  # a config the model class rejects
        raise CheckpointError(f"{root / model / 'config.json'}: cannot build the {model} from it "
                              f"({type(e).__name__}: {e})") from e
    return mod.eval()


# --------------------------------------------------------------------------- validation
@dataclass
class _QLayer:
    key: str
    meta: dict
    shape: tuple[int, ...]
    module: nn.Module


def _validate_component(root: Path, model: str, manifest: dict, skeleton: nn.Module
                        ) -> tuple[dict[str, TensorInfo], int, dict[str, _QLayer], list[str]]:
    """Check one component file against its metadata and the architecture; nothing is read
    beyond the header.  Returns (infos, data_start, quantized layers, dense keys)."""
    from .quant import QuantError, packed_nbytes, param_shape, parse_granularity
    from .quant.packing import check_bits
    from .quant.quantizers import METHODS, PWLQ_METHODS

    path = root / model / WEIGHTS_NAME
    where = f"{model}/{WEIGHTS_NAME}"
    metadata, infos, data_start = read_safetensors_header(path)
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{where}: no '{METADATA_KEY}' header metadata (not written by quantsd export)")
    try:
        qmeta = json.loads(metadata[METADATA_KEY])
    except (ValueError, RecursionError):
        raise CheckpointError(f"{where}: corrupt '{METADATA_KEY}' header metadata (not JSON)") from None
    if not isinstance(qmeta, dict) or qmeta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where}: corrupt '{METADATA_KEY}' header metadata")
    check_format_version(qmeta.get("format_version"), where)
    if qmeta.get("format_version") != manifest["format_version"] or qmeta.get("recipe_sha256") != manifest["recipe_sha256"] \
            or qmeta.get("model") != model:
        raise CheckpointError(f"{where}: header metadata does not match quantsd.json (mixed checkpoints?)")
    layers = qmeta.get("layers")
    if not isinstance(layers, dict):
        raise CheckpointError(f"{where}: corrupt '{METADATA_KEY}' header metadata (layers)")

    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    modules = dict(skeleton.named_modules())
    qlayers: dict[str, _QLayer] = {}
    used: set[str] = set()
    for key, lm in layers.items():
        lw = f"{where}: layer {key!r}"
        if not isinstance(lm, dict):
            raise CheckpointError(f"{lw}: corrupt metadata")
        mod = modules.get(key)
        if not isinstance(mod, (nn.Linear, nn.Conv2d, nn.Embedding)) or f"{key}.weight" not in expected:
            raise CheckpointError(f"{lw}: no such Linear/Conv2d/Embedding layer in this {model} architecture "
                                  "(checkpoint for another model?)")
        try:
            bits = check_bits(lm.get("bits"))
            method = lm.get("method")
            if method not in METHODS:
                raise CheckpointError(f"{lw}: unknown method {method!r}")
            gran = str(parse_granularity(lm.get("granularity")))
            shape = lm.get("shape")
            if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
                raise CheckpointError(f"{lw}: invalid shape {shape!r}")
            shape = tuple(shape)
            if shape != expected[f"{key}.weight"]:
                raise CheckpointError(f"{lw}: weight shape {list(shape)} but this architecture has "
                                      f"{list(expected[f'{key}.weight'])} (checkpoint for another architecture?)")
            pshape = param_shape(shape, gran)
        except QuantError as e:
            raise CheckpointError(f"{lw}: {e}") from None
        numel = math.prod(shape)
        want = {"weight_packed": ("U8", (packed_nbytes(bits, numel),)),
                "weight_scale": (None, pshape), "weight_shape": ("I64", (len(shape),))}
        if method in PWLQ_METHODS:
            want["weight_breakpoint"] = (None, pshape)
        for suffix in QUANT_SUFFIXES:
            name = f"{key}.{suffix}"
            info = infos.get(name)
            if suffix not in want:
                if info is not None:
                    raise CheckpointError(f"{where}: unexpected tensor {name!r} for method {method!r}")
                continue
            if info is None:
                raise CheckpointError(f"{where}: missing tensor {name!r}")
            dt, shp = want[suffix]
            if dt is None:
                sdt = lm.get("scale_dtype")
                if sdt not in ("float16", "float32", "bfloat16"):
                    raise CheckpointError(f"{lw}: invalid scale_dtype {sdt!r}")
                dt = st_dtype(DTYPE_NAMES[sdt])
            if info.dtype != dt or info.shape != tuple(shp):
                extra = " (packed bytes must be ceil(bits*numel/8))" if suffix == "weight_packed" else ""
                raise CheckpointError(f"{where}: tensor {name!r} is {info.dtype}{list(info.shape)}, expected "
                                      f"{dt}{list(shp)}{extra}")
            used.add(name)
        if f"{key}.weight" in infos:
            raise CheckpointError(f"{where}: layer {key!r} is stored both dense and packed")
        qlayers[key] = _QLayer(key, {**lm, "bits": bits, "granularity": gran}, shape, mod)

    dense_keys = []
    for k, shape in expected.items():
        if k.endswith(".weight") and k[: -len(".weight")] in qlayers:
            continue
        info = infos.get(k)
        if info is None:
            raise CheckpointError(f"{where}: missing tensor {k!r} (checkpoint for another architecture, or corrupt)")
        if info.shape != shape:
            raise CheckpointError(f"{where}: tensor {k!r} has shape {list(info.shape)} but this architecture needs "
                                  f"{list(shape)} (checkpoint for another architecture?)")
        used.add(k)
        dense_keys.append(k)
    extra = sorted(set(infos) - used)
    if extra:
        raise CheckpointError(f"{where}: {len(extra)} unexpected tensor(s), e.g. {extra[:3]} "
                              "(checkpoint for another architecture?)")
    return infos, data_start, qlayers, dense_keys


def _check_manifest_layers(manifest: dict, per_model: dict[str, dict[str, _QLayer]]) -> None:
    got = {f"{m}.{k}": (q.meta["bits"], q.meta["method"], q.meta["granularity"])
           for m, d in per_model.items() for k, q in d.items()}
    want = {}
    for e in manifest["layers"]:
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise CheckpointError(f"{MANIFEST_NAME}: corrupt layer entry")
        want[e["path"]] = (e.get("bits"), e.get("method"), e.get("granularity"))
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise CheckpointError(f"{MANIFEST_NAME} and the weight files disagree on the quantized layers, e.g. {diff}")


# --------------------------------------------------------------------------- loading
def _finite_params(name: str, scale: torch.Tensor, bp: torch.Tensor | None) -> None:
    s = scale.float()
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise CheckpointError(f"{name}: corrupt scale (non-finite or negative values)")
    if bp is not None:
        p = bp.float()
        if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or bool((p > s).any()):
            raise CheckpointError(f"{name}: corrupt breakpoint (must be finite and in [0, scale])")


def _set_module(root: nn.Module, key: str, new: nn.Module) -> None:
    """Put ``new`` where ``key`` is, in the replaced module's train/eval mode (a fresh module is
    in training mode, which would leave eval-only fast paths of an eval-mode model off)."""
    parent, _, child = key.rpartition(".")
    holder = root.get_submodule(parent) if parent else root
    new.train(getattr(holder, child).training)
    setattr(holder, child, new)


def _refuse_save(self, *args, **kwargs):
    raise RuntimeError(
        "this pipeline was loaded from a quantsd checkpoint with weights='packed': its layers hold packed "
        "n-bit codes, and diffusers' save_pretrained would write them in a layout nothing can load. "
        "To keep the packed checkpoint, copy its directory (or export again with `quantsd export`); "
        "to save dense weights, load it with weights='dequantize' and save that."
    )


def _assemble_model(model: str, skeleton: nn.Module, tensors: dict[str, torch.Tensor], qlayers: dict[str, _QLayer],
                    dense_keys: list[str], dtype: torch.dtype | None, weights: str, dense_default: str) -> nn.Module:
    from .nn import QuantConv2d, QuantEmbedding, QuantLinear
    from .quant import QTensor, QuantError

    sd: dict[str, torch.Tensor] = {}
    for k in dense_keys:
        t = tensors[k]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        sd[k] = t
    for key, q in qlayers.items():
        lm = q.meta
        scale = tensors[f"{key}.weight_scale"]
        bp = tensors.get(f"{key}.weight_breakpoint")
        stored_shape = tensors[f"{key}.weight_shape"].tolist()
        if tuple(stored_shape) != q.shape:
            raise CheckpointError(f"{model}: {key}.weight_shape = {stored_shape} disagrees with the header metadata "
                                  f"{list(q.shape)} (corrupt file)")
        _finite_params(f"{model}: {key}", scale, bp)
        wdtype = dtype or DTYPE_NAMES.get(lm.get("dtype"), DTYPE_NAMES.get(dense_default, torch.float32))
        packed = tensors[f"{key}.weight_packed"]
        if weights == "packed" and isinstance(q.module, (nn.Linear, nn.Conv2d)):
            bias = sd.pop(f"{key}.bias", None)
            kw = dict(bits=lm["bits"], method=lm["method"], granularity=lm["granularity"], packed=packed,
                      scale=scale, breakpoint=bp, dtype=wdtype)
            if isinstance(q.module, nn.Linear):
                new = QuantLinear(q.module.in_features, q.module.out_features, bias, **kw)
            else:
                c = q.module
                new = QuantConv2d(c.in_channels, c.out_channels, c.kernel_size, bias, stride=c.stride,
                                  padding=c.padding, dilation=c.dilation, groups=c.groups,
                                  padding_mode=c.padding_mode, **kw)
            _set_module(skeleton, key, new)
            continue
        if weights == "packed" and isinstance(q.module, nn.Embedding) and q.module.max_norm is None:
            e = q.module
            new = QuantEmbedding(e.num_embeddings, e.embedding_dim, padding_idx=e.padding_idx, bits=lm["bits"],
                                 method=lm["method"], granularity=lm["granularity"], packed=packed, scale=scale,
                                 breakpoint=bp, dtype=wdtype)
            _set_module(skeleton, key, new)
            continue
        try:
            qt = QTensor.from_packed(packed, q.shape, lm["bits"], lm["method"], lm["granularity"], scale, bp,
                                     dtype=wdtype)
        except QuantError as e:
            raise CheckpointError(f"{model}: layer {key!r}: {e}") from None
        sd[f"{key}.weight"] = qt.dequantize()
    missing, unexpected = skeleton.load_state_dict(sd, strict=False, assign=True)
    if unexpected:
        raise CheckpointError(f"{model}: unexpected tensors {unexpected[:3]}")
    left = [n for n, t in [*skeleton.named_parameters(), *skeleton.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{model}: no data for {left[:3]} (incomplete checkpoint)")
    for p in skeleton.parameters():
        p.requires_grad_(False)
    return skeleton


def load_checkpoint(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    weights: str | None = None,
    verify: bool = True,
):
    """Load a quantsd packed checkpoint as a diffusers ``StableDiffusionPipeline``.

    ``weights``: ``"packed"`` (QuantLinear/QuantConv2d keep the codes resident and dequantize
    in forward; QuantEmbedding decodes only the looked-up rows) or ``"dequantize"`` (dense weights
    built once).  Default: packed on CUDA, dequantize elsewhere.  ``dtype``: the pipeline's
    floating dtype (default: the checkpoint's dense dtype).  ``verify`` checks every file's
    sha256 against the manifest.  Everything is validated before any tensor is read; every
    problem raises :class:`CheckpointError`.  Never unpickles.
    """
    root = Path(path).expanduser()
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
        dtype = DTYPE_NAMES[dtype]
    dev = torch.device(device) if device is not None else None
    if weights is None:
        weights = "packed" if dev is not None and dev.type == "cuda" else "dequantize"
    if weights not in ("packed", "dequantize"):
        raise CheckpointError(f"weights must be 'packed' or 'dequantize', got {weights!r}")

    manifest = read_manifest(root)
    _check_model_index(root)
    _check_files(root, manifest, verify)
    skeletons = {m: _build_skeleton(root, m) for m in MODELS}
    checked = {m: _validate_component(root, m, manifest, skeletons[m]) for m in MODELS}
    _check_manifest_layers(manifest, {m: c[2] for m, c in checked.items()})

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    idx = _read_json(root / "model_index.json", "model_index.json")
    scheduler_cls = _scheduler_class(idx["scheduler"][1])
    sch_cfg = _read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
    try:
        scheduler = scheduler_cls.from_config(sch_cfg)
        tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{root}: cannot load the scheduler/tokenizer ({type(e).__name__}: {e})") from e

    models = {}
    for m in MODELS:
        infos, data_start, qlayers, dense_keys = checked[m]
        tensors = read_tensors(root / m / WEIGHTS_NAME, infos.values(), data_start)
        models[m] = _assemble_model(m, skeletons[m], tensors, qlayers, dense_keys, dtype, weights,
                                    manifest["dense_dtype"])
        del tensors
    pipe = StableDiffusionPipeline(
        vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer, unet=models["unet"],
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if dev is not None:
        pipe.to(dev)
    pipe.quantsd_checkpoint = {"path": str(root), "weights": weights, "manifest": manifest}
    if weights == "packed":
        pipe.save_pretrained = types.MethodType(_refuse_save, pipe)
        for m in MODELS:
            models[m].save_pretrained = types.MethodType(_refuse_save, models[m])
    return pipe


def inspect_checkpoint(path: str | os.PathLike, verify: bool = False) -> dict:
    """Manifest plus what is on disk (sizes, header check) without building the pipeline."""
    root = Path(path).expanduser()
    manifest = read_manifest(root)
    _check_files(root, manifest, verify)
    for m in MODELS:
        read_safetensors_header(root / m / WEIGHTS_NAME)
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {**manifest, "directory_bytes": total, "verified_sha256": verify}
