"""The fixture model: dataset, checker, shipped pipeline, adherence vs a random-weight twin (CPU, fast)."""

from __future__ import annotations

import json

import pytest
import torch

from quantsd.fixture import checker, data

N_PROMPTS = 8
STEPS = 20


def test_dataset_is_deterministic():
    a = data.make_batch(16, seed=3)
    b = data.make_batch(16, seed=3)
    c = data.make_batch(16, seed=4)
    assert torch.equal(a.images, b.images)
    assert a.captions == b.captions
    assert all(torch.equal(a.attrs[k], b.attrs[k]) for k in a.attrs)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (16, 3, 64, 64)
    assert 0.0 <= float(a.images.min()) and float(a.images.max()) <= 1.0
    p1, at1 = data.captions_for_eval(32, seed=0)
    p2, at2 = data.captions_for_eval(32, seed=0)
    assert p1 == p2 and all(torch.equal(at1[k], at2[k]) for k in at1)


def test_held_out_split_and_grammar():
    assert len(data.HELD_OUT_TRIPLES) == 32 and not (data.HELD_OUT_TRIPLES & data.TRAIN_TRIPLES)
    tr = data.sample_attributes(4000, seed=1, split="train")
    triples = set(zip(tr["color"].tolist(), tr["shape"].tolist(), tr["position"].tolist()))
    assert not (triples & data.HELD_OUT_TRIPLES)
    # every colour, shape and position still occurs in training
    assert {t[0] for t in triples} == set(range(len(data.COLORS)))
    assert {t[1] for t in triples} == set(range(len(data.SHAPES)))
    assert {t[2] for t in triples} == set(range(len(data.POSITIONS)))
    prompts, attrs = data.captions_for_eval(64, seed=0, held_out=True)
    for i, p in enumerate(prompts):
        t = (int(attrs["color"][i]), int(attrs["shape"][i]), int(attrs["position"][i]))
        assert t in data.HELD_OUT_TRIPLES
        assert p == data.caption(*t[:3], int(attrs["size"][i]), int(attrs["bg"][i]))
        assert p.startswith("a ") and p.endswith(" background")
    assert data.caption(1, 0, 0, 1, 2) == "a large green circle on the left on a gray background"


def test_checker_right_on_procedural_images():
    b = data.make_batch(600, seed=2024, split="all")
    acc = checker.adherence(b.images, b.attrs)
    for k in ("color", "shape", "position", "size", "bg"):
        assert acc[k] >= 0.98, (k, acc)
    # robust to blur / noise / colour shifts like those of generated images
    noisy = checker.augment(b.images, torch.Generator().manual_seed(0))
    acc = checker.adherence(noisy, b.attrs)
    for k in ("color", "shape", "position"):
        assert acc[k] >= 0.98, (k, acc)
    # accepts PIL images and uint8 arrays too
    from PIL import Image

    pil = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in b.images[:4]]
    assert torch.equal(checker.predict(pil)["shape"], b.attrs["shape"][:4])


@pytest.fixture(scope="module")
def fixture_pipe():
    from quantsd.models import load_pipeline

    pipe = load_pipeline("fixture", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_pipeline_loads_offline(fixture_pipe, tmp_path):
    from quantsd.models import FIXTURE_DIR

    files = [f for f in FIXTURE_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20
    assert all(f.stat().st_size <= 16 * 2**20 for f in files)
    assert json.loads((FIXTURE_DIR / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert fixture_pipe.safety_checker is None
    assert type(fixture_pipe.scheduler).__name__ in ("DPMSolverMultistepScheduler", "DDIMScheduler")
    ids = fixture_pipe.tokenizer("a large red circle on the left on a blue background").input_ids
    assert len(ids) == 13  # every grammar word is one token (+ bos/eos)
    out = fixture_pipe("a small blue square at the top on a white background", num_inference_steps=2,
                       generator=torch.Generator().manual_seed(0), output_type="pil")
    assert out.images[0].size == (64, 64)


def test_adherence_far_above_random_pipeline(fixture_pipe):
    from quantsd.fixture.evaluate import evaluate_adherence
    from quantsd.fixture.train import build_random_pipeline

    prompts, attrs = data.captions_for_eval(N_PROMPTS, seed=0)
    kw = dict(steps=STEPS, guidance=5.0, seed=0, batch_size=N_PROMPTS)
    trained = evaluate_adherence(fixture_pipe, prompts, attrs, **kw)
    rnd = build_random_pipeline(seed=0)
    rnd.set_progress_bar_config(disable=True)
    random = evaluate_adherence(rnd, prompts, attrs, **kw)
    assert trained["color"] >= 0.75 and trained["shape"] >= 0.75, trained
    assert trained["all"] >= random["all"] + 0.5, (trained, random)
    assert trained["color"] + trained["shape"] + trained["position"] >= random["color"] + random["shape"] + random["position"] + 1.5


def test_8bit_fake_quant_keeps_adherence_2bit_collapses():
    from quantsd.fixture.evaluate import evaluate_adherence, fake_quantize_pipeline_
    from quantsd.models import load_pipeline

    prompts, attrs = data.captions_for_eval(N_PROMPTS, seed=0)
    kw = dict(steps=STEPS, guidance=5.0, seed=0, batch_size=N_PROMPTS)
    res = {}
    for bits in (8, 2):
        pipe = load_pipeline("fixture", dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        assert fake_quantize_pipeline_(pipe, bits=bits, method="uniform") == 215
        res[bits] = evaluate_adherence(pipe, prompts, attrs, **kw)
    assert res[8]["color"] >= 0.75 and res[8]["shape"] >= 0.75, res
    assert res[2]["all"] <= res[8]["all"] - 0.5, res
