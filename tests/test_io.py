"""Loader reliability: clear CheckpointErrors, no pickle, fuzzing, and an independent reader
written from docs/FORMAT.md alone (numpy + safetensors.numpy) that must agree bit for bit."""

import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quantsd
from quantsd.io import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    load_checkpoint,
    read_safetensors_header,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from quantsd.export import export
    from test_export import all_combos_recipe

    src = quantsd.load_pipeline("tiny")
    out = tmp_path_factory.mktemp("io") / "ck"
    export(src, all_combos_recipe(src), out)  # float16 dense tensors (default)
    return out


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_manifest(root: Path, fn) -> None:
    m = json.loads((root / MANIFEST_NAME).read_text())
    fn(m)
    (root / MANIFEST_NAME).write_text(json.dumps(m, indent=2))


# --------------------------------------------------------------------------- independent reader
def np_unpack(packed: np.ndarray, bits: int, numel: int) -> np.ndarray:
    """FORMAT.md §4: one LSB-first bitstream; code k = stream bits [k*n, (k+1)*n), bit 0 first."""
    stream = np.unpackbits(packed, bitorder="little")[: bits * numel].reshape(numel, bits)
    return (stream.astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(axis=1).astype(np.uint32)


def np_decode(codes, bits, method, m, p):
    """FORMAT.md §5, float32 arithmetic in the documented order. codes: (*P, k); m, p: P."""
    f = np.float32
    m = m.astype(f)[..., None]
    L, L1, L2 = 2**bits - 1, 2 ** (bits - 1) - 1, 2 ** (bits - 2) - 1
    if method in ("uniform", "stochastic"):
        w = (f(2) * m) * (codes.astype(f) / f(L) - f(0.5))
        return np.where(m == 0, f(0), w).astype(f)
    p = p.astype(f)[..., None]
    region = (codes >> (bits - 1)) & 1
    center = (f(2) * p) * ((codes & L1).astype(f) / f(L1) - f(0.5))
    center = np.where(p == 0, f(0), center)
    if L2 > 0:
        mag = p + (m - p) * ((codes & L2).astype(f) / f(L2))
    else:
        mag = np.broadcast_to((p + m) * f(0.5), codes.shape)
    neg = ((codes >> (bits - 2)) & 1).astype(bool)
    tail = np.where(neg, -mag, mag)
    return np.where(region == 1, tail, center).astype(f)


def param_shape_np(shape, gran):
    if gran == "tensor":
        return ()
    row = int(np.prod(shape[1:]))
    if gran == "channel":
        return (shape[0],)
    g = int(gran.split(":")[1])
    return (shape[0], row // g)


def independent_read(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="np") as f:
        meta = json.loads(f.metadata()["quantsd"])
    assert meta["format"] == "quantsd-packed" and meta["format_version"] == 1
    out = {}
    for key, lm in meta["layers"].items():
        shape = tuple(int(s) for s in tensors[f"{key}.weight_shape"])
        assert list(shape) == lm["shape"]
        numel = int(np.prod(shape))
        codes = np_unpack(tensors[f"{key}.weight_packed"], lm["bits"], numel)
        pshape = param_shape_np(shape, lm["granularity"])
        m = tensors[f"{key}.weight_scale"].astype(np.float32)
        p = tensors.get(f"{key}.weight_breakpoint")
        w = np_decode(codes.reshape(*pshape, -1), lm["bits"], lm["method"], m, None if p is None else p.astype(np.float32))
        out[f"{key}.weight"] = w.reshape(shape)
    for k, t in tensors.items():
        if not k.rsplit(".", 1)[-1].startswith("weight_"):
            out[k] = t
    return out


def test_independent_numpy_reader_matches_loader_bit_for_bit(ckpt):
    loaded = load_checkpoint(ckpt, dtype=torch.float32, weights="dequantize")
    n = 0
    for model in ("text_encoder", "unet", "vae"):
        ref = independent_read(ckpt / model / WEIGHTS_NAME)
        sd = getattr(loaded, model).state_dict()
        assert ref.keys() == sd.keys()
        for k, v in ref.items():
            got = sd[k].numpy()
            want = v.astype(np.float32) if v.dtype == np.float16 else v
            assert got.shape == want.shape and got.dtype == want.dtype, k
            assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), k
            n += 1
    assert n > 200


# --------------------------------------------------------------------------- clear errors
def test_truncated_file(ckpt, tmp_path):
    root = copy_ckpt(ckpt, tmp_path / "ck")
    f = root / "unet" / WEIGHTS_NAME
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(root)
    with pytest.raises(CheckpointError, match="truncated"):  # even when sizes are not checked first
        read_safetensors_header(f)


def test_flipped_header_bytes(ckpt, tmp_path):
    root = copy_ckpt(ckpt, tmp_path / "ck")
    f = root / "unet" / WEIGHTS_NAME
    data = bytearray(f.read_bytes())
    data[20] ^= 0xFF
    data[21] ^= 0x5A
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(root)
    with pytest.raises(CheckpointError, match="corrupt header"):
        load_checkpoint(root, verify=False)


def test_flipped_payload_byte_caught_by_sha256(ckpt, tmp_path):
    root = copy_ckpt(ckpt, tmp_path / "ck")
    f = root / "vae" / WEIGHTS_NAME
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(root)


def test_header_length_prefix_corrupt(ckpt, tmp_path):
    root = copy_ckpt(ckpt, tmp_path / "ck")
    f = root / "unet" / WEIGHTS_NAME
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="declared header length"):
        load_checkpoint(root, verify=False)


def test_unknown_format_version(ckpt, tmp_path):
    root = copy_ckpt(ckpt, tmp_path / "ck")
    rewrite_manifest(root, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="unsupported quantsd checkpoint format version 99.*reads version"):
        load_checkpoint(root)
    with pytest.raises(CheckpointError, match="not a quantsd checkpoint manifest"):
        rewrite_manifest(root, lambda m: m.update(format="something-else"))
        load_checkpoint(root)


def test_checkpoint_for_another_architecture(ckpt, tmp_path):
    root = copy_ckpt(ckpt, tmp_path / "ck")
    # a UNet config for a wider model (as if the unet/ folder came from another checkpoint)
    cfg_path = root / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["block_out_channels"] = [32, 48]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="manifest says"):
        load_checkpoint(root)

    def fix(m):
        import hashlib

        m["files"]["unet/config.json"] = {"bytes": cfg_path.stat().st_size,
                                          "sha256": hashlib.sha256(cfg_path.read_bytes()).hexdigest()}

    rewrite_manifest(root, fix)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_checkpoint(root)


def test_missing_component_file(ckpt, tmp_path):
    root = copy_ckpt(ckpt, tmp_path / "ck")
    (root / "vae" / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="missing file vae/"):
        load_checkpoint(root)


def test_disallowed_component_class(ckpt, tmp_path):
    root = copy_ckpt(ckpt, tmp_path / "ck")
    idx = json.loads((root / "model_index.json").read_text())
    idx["unet"] = ["evil_module", "Payload"]
    (root / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="unet must be one of diffusers.UNet2DConditionModel"):
        load_checkpoint(root, verify=False)


def test_corrupt_scale_values(ckpt, tmp_path):
    root = copy_ckpt(ckpt, tmp_path / "ck")
    f = root / "unet" / WEIGHTS_NAME
    _, infos, start = read_safetensors_header(f)
    info = infos["conv_in.weight_scale"]
    data = bytearray(f.read_bytes())
    data[start + info.begin: start + info.begin + 2] = np.float16(np.inf).tobytes()
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt scale"):
        load_checkpoint(root, verify=False)


def test_loading_never_unpickles(ckpt, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("unpickling during checkpoint load")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    for weights in ("packed", "dequantize"):
        pipe = load_checkpoint(ckpt, weights=weights)
        assert pipe.unet is not None


# --------------------------------------------------------------------------- fuzzing
_FUZZ = settings(max_examples=15, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_root(ckpt, tmp_path_factory):
    root = copy_ckpt(ckpt, tmp_path_factory.mktemp("fuzz") / "ck")
    f = root / "unet" / WEIGHTS_NAME
    return root, f.read_bytes(), 8 + struct.unpack("<Q", f.read_bytes()[:8])[0]


def _mutate_and_load(root, pristine, edits):
    data = bytearray(pristine)
    for pos, val in edits:
        data[pos % len(data)] = val
    (root / "unet" / WEIGHTS_NAME).write_bytes(bytes(data))
    try:
        load_checkpoint(root, verify=False)
    except CheckpointError:
        pass  # the only acceptable failure


@_FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=6), st.data())
def test_fuzz_header_bytes(fuzz_root, edits, data):
    root, pristine, header_end = fuzz_root
    _mutate_and_load(root, pristine, [(p % header_end, v) for p, v in edits])


@_FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=20))
def test_fuzz_payload_bytes(fuzz_root, edits):
    root, pristine, header_end = fuzz_root
    _mutate_and_load(root, pristine, [(header_end + p % (len(pristine) - header_end), v) for p, v in edits])


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64), st.integers(0, 2**64 - 1))
def test_fuzz_header_parser_random_files(tmp_path, blob, n):
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", n) + blob)
    try:
        read_safetensors_header(f)
    except CheckpointError:
        pass


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=10))
def test_fuzz_header_parser_random_json(tmp_path, obj):
    raw = json.dumps({"t": obj, "__metadata__": obj}).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw)
    try:
        read_safetensors_header(f)
    except CheckpointError:
        pass


# --------------------------------------------------------------------------- packed pipelines
def test_packed_pipeline_refuses_save_pretrained(ckpt, tmp_path):
    pipe = load_checkpoint(ckpt, weights="packed")
    with pytest.raises(RuntimeError, match="packed"):
        pipe.save_pretrained(tmp_path / "x")
    with pytest.raises(RuntimeError, match="weights='dequantize'"):
        pipe.unet.save_pretrained(tmp_path / "y")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").rglob("*.safetensors"))


def test_load_pipeline_routes_checkpoints(ckpt):
    pipe = quantsd.load_pipeline(str(ckpt), dtype="float32", weights="packed")
    assert pipe.quantsd_checkpoint["weights"] == "packed"
    assert pipe.unet.dtype == torch.float32


def test_inspect_cli(ckpt):
    from click.testing import CliRunner

    from quantsd.cli import main

    r = CliRunner().invoke(main, ["inspect", str(ckpt), "--format", "json", "--verify"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["format_version"] == 1 and info["verified_sha256"] is True
    assert info["recipe"]["name"] == "all-combos" and len(info["layers"]) == 118
    r = CliRunner().invoke(main, ["inspect", str(ckpt)])
    assert r.exit_code == 0, r.output
    assert "format version 1" in r.output and "unet.conv_in" in r.output and "name: all-combos" in r.output
    assert "text_encoder" in r.output and "checkpoint total" in r.output


def test_inspect_cli_reports_corruption(ckpt, tmp_path):
    from click.testing import CliRunner

    from quantsd.cli import main

    root = copy_ckpt(ckpt, tmp_path / "ck")
    rewrite_manifest(root, lambda m: m.update(format_version=7))
    r = CliRunner().invoke(main, ["inspect", str(root)])
    assert r.exit_code != 0 and "unsupported quantsd checkpoint format version 7" in r.output
