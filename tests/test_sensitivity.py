import json

import pytest
import torch
from click.testing import CliRunner

from quantsd.blocks import list_blocks
from quantsd.cli import main
from quantsd.models import load_pipeline
from quantsd.prompts import PromptError, draw_prompts
from quantsd.quant import QuantError
from quantsd.sensitivity import SweepConfig, SweepDirError, run_sensitivity
from quantsd.sensitivity.runner import PipelineRunner, measure

PROMPTS = ("a red circle on the left", "a photo of a cat on a sofa")


def _config(**kw):
    base = dict(model="tiny", prompts=PROMPTS, methods=("uniform",), bits=(4, 8), steps=3)
    base.update(kw)
    return SweepConfig(**base)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


def test_unquantized_block_has_exactly_zero_error(pipe):
    runner = PipelineRunner(pipe, _config(), torch.device("cpu"))
    ref = runner.reference()
    for block in list_blocks(pipe):
        if block.layer_names:
            r = measure(runner, ref, block, None, 8)
            assert r["component_error"] == 0.0 and r["image_error"] == 0.0, block.name


def test_sweep_8bit_beats_4bit_and_restores_weights(pipe, tmp_path):
    before = {k: v.clone() for c in (pipe.text_encoder, pipe.unet, pipe.vae) for k, v in c.state_dict().items()}
    records = run_sensitivity(pipe, _config(), tmp_path, progress=False)
    after = {k: v for c in (pipe.text_encoder, pipe.unet, pipe.vae) for k, v in c.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before), "weights changed by the sweep"
    by = {(r["block"], r["bits"]): r for r in records}
    blocks = {r["block"] for r in records}
    assert blocks == {b.name for b in list_blocks(pipe) if b.layer_names}
    for b in blocks:
        assert by[(b, 8)]["component_error"] < by[(b, 4)]["component_error"], b
        assert by[(b, 8)]["packed_bytes"] > by[(b, 4)]["packed_bytes"]
    for name in ("sensitivity.jsonl", "sensitivity.csv", "report.md", "sweep.json",
                 "sensitivity_unet.png", "sensitivity_text_encoder.png", "sensitivity_vae_decoder.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_resume_after_interrupt_gives_the_same_csv(pipe, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_sensitivity(pipe, _config(bits=(4,)), full, progress=False)
    run_sensitivity(pipe, _config(bits=(4,)), part, progress=False, limit=5)  # "interrupted"
    lines = (part / "sensitivity.jsonl").read_text().splitlines()
    assert len(lines) == 5
    with open(part / "sensitivity.jsonl", "a") as f:  # a torn write from a killed process
        f.write('{"block": "unet.conv')
    run_sensitivity(pipe, _config(bits=(4,)), part, progress=False)
    assert (part / "sensitivity.csv").read_text() == (full / "sensitivity.csv").read_text()


def test_directory_of_another_configuration_is_refused_untouched(pipe, tmp_path):
    run_sensitivity(pipe, _config(bits=(4,)), tmp_path, progress=False, limit=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SweepDirError, match="steps"):
        run_sensitivity(pipe, _config(bits=(4,), steps=4), tmp_path, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("kw, err, match", [
    (dict(methods=("nope",)), QuantError, "valid methods"),
    (dict(bits=(9,)), QuantError, "2..8"),
    (dict(granularity="rows"), QuantError, "granularity"),
    (dict(prompts=()), ValueError, "at least one prompt"),
])
def test_bad_configuration(kw, err, match):
    with pytest.raises(err, match=match):
        _config(**kw)


def test_empty_prompts_file(tmp_path):
    (tmp_path / "p.txt").write_text("\n  \n")
    with pytest.raises(PromptError, match="holds no prompts"):
        draw_prompts(tmp_path / "p.txt", 2)


def test_prompts_are_seeded_draws(tmp_path):
    captions = tmp_path / "caps.tsv"  # a caption file of our own: the test must not need ../shared/assets
    captions.write_text("caption\n" + "\n".join(f"a photo of thing number {i}" for i in range(40)) + "\n")
    src = str(captions)
    a, b, c = draw_prompts(src, 8, seed=0), draw_prompts(src, 8, seed=0), draw_prompts(src, 8, seed=1)
    assert a == b and a != c and len(set(a)) == 8


def test_cli_sensitivity_json_summary(tmp_path):
    (tmp_path / "p.txt").write_text("a red square\na blue circle\n")
    out = tmp_path / "out"
    args = ["sensitivity", "-m", "tiny", "--methods", "uniform", "--bits", "4", "--steps", "2",
            "--num-prompts", "2", "--prompts", str(tmp_path / "p.txt"), "--device", "cpu",
            "-o", str(out), "--format", "json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output[r.output.index("{"):])
    n_csv = len((out / "sensitivity.csv").read_text().splitlines()) - 1
    assert data["records"] == n_csv > 0
    r2 = CliRunner().invoke(main, args[:-2] + ["--bits", "11"])
    assert r2.exit_code != 0 and "2..8" in r2.output
