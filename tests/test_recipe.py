"""Recipes: schema validation, target resolution, overlaps, seeds, hash, shipped recipes."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from quantsd.recipe import (
    RecipeError,
    RecipeOverlapWarning,
    apply_recipe,
    layer_seed,
    load_recipe,
    resolve_recipe,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["paper-final", "w8-pwlq", "w4-pwlq", "w8-uniform"]


def R(**kw):
    d = {"quantsd_recipe": 1, "name": "t", "defaults": {"bits": 8, "method": "pwlq", "granularity": "tensor"}}
    d.update(kw)
    return d


@pytest.mark.parametrize("bad, msg", [
    (R(rulez=[]), "unknown key 'rulez'; did you mean 'rules'"),
    (R(defaults={"bits": 9}), "bits must be an integer in 2..8"),
    (R(defaults={"bits": 1}), "bits must be an integer in 2..8"),
    (R(defaults={"bits": True}), "bits must be an integer"),
    (R(defaults={"method": "pwql"}), "unknown method 'pwql'; did you mean 'pwlq'"),
    (R(defaults={"granularity": "group:0"}), "group size must be a positive integer"),
    (R(defaults={"granularity": "row"}), "unknown granularity 'row'"),
    (R(defaults={"scale_dtype": "float64"}), "scale_dtype must be one of"),
    (R(defaults={"bitz": 4}), "defaults: unknown key 'bitz'; did you mean 'bits'"),
    (R(rules=[{"match": "unet", "bitz": 4}]), "rules[0]: unknown key 'bitz'"),
    (R(rules=[{"bits": 4}]), "rules[0]: missing 'match'"),
    (R(rules=[{"match": [], "bits": 4}]), "needs at least one target"),
    (R(rules=[{"match": ["re:("], "bits": 4}]), "invalid regular expression"),
    (R(quantsd_recipe=2), "unsupported quantsd_recipe version 2"),
    ({"name": "x"}, "missing 'quantsd_recipe: 1'"),
])
def test_schema_errors(bad, msg):
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    assert msg in str(e.value)
    assert isinstance(e.value, ValueError)


def test_yaml_file_roundtrip_and_hash(tmp_path):
    r = load_recipe(REPO / "recipes" / "paper-final.yaml")
    assert r.name == "paper-final" and len(r.rules) == 2 and r.rules[0].bits == 4
    again = load_recipe(r.to_dict())
    assert again == r and again.sha256 == r.sha256
    # key order and omitted defaults do not change the hash; a setting does
    d = r.to_dict()
    reordered = dict(reversed(list(d.items())))
    assert load_recipe(reordered).sha256 == r.sha256
    d2 = json.loads(json.dumps(d))
    d2["rules"][0]["bits"] = 3
    assert load_recipe(d2).sha256 != r.sha256
    p = tmp_path / "r.yaml"
    p.write_text(r.to_yaml())
    assert load_recipe(p) == r
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("quantsd_recipe: 1\nrules: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_targets_module_class_regex(tiny_pipe):
    plan = resolve_recipe(tiny_pipe, R(rules=[
        {"match": "unet.mid_block", "bits": 3},                          # a block: every layer under it
        {"match": "class:Embedding", "bits": 5},
        {"match": "re:vae\\.decoder\\.up_blocks\\.\\d+\\.resnets\\.0\\.conv1", "bits": 6},
        {"match": "unet.conv_in", "bits": 2},                            # a single layer
    ]))
    by = plan.by_path()
    mids = [p for p in by if p.startswith("unet.mid_block.")]
    assert mids and all(by[p].bits == 3 for p in mids)
    assert by["text_encoder.embeddings.token_embedding"].bits == 5
    assert by["vae.decoder.up_blocks.0.resnets.0.conv1"].bits == 6
    assert by["vae.decoder.up_blocks.0.resnets.0.conv2"].bits == 8  # defaults
    assert by["unet.conv_in"].bits == 2 and by["unet.conv_in"].rule.startswith("rules[3]")


def test_ignore_keeps_layers_dense(tiny_pipe):
    plan = resolve_recipe(tiny_pipe, R(ignore=["vae", "re:.*time_emb.*"]))
    dense = {d.path for d in plan.dense}
    assert "vae.decoder.conv_out" in dense and "unet.time_embedding.linear_1" in dense
    assert "unet.down_blocks.0.resnets.0.time_emb_proj" in dense
    assert not any(lp.path.startswith("vae.") or "time_emb" in lp.path for lp in plan.layers)


def test_nonexistent_module_suggests_closest(tiny_pipe):
    with pytest.raises(RecipeError) as e:
        resolve_recipe(tiny_pipe, R(rules=[{"match": "unet.down_block.1", "bits": 4}]))
    assert "module 'unet.down_block.1' does not exist" in str(e.value)
    assert "did you mean 'unet.down_blocks.1'" in str(e.value)
    with pytest.raises(RecipeError, match="unet.mid_blocks.*did you mean 'unet.mid_block'"):
        resolve_recipe(tiny_pipe, R(ignore=["unet.mid_blocks"]))


def test_rules_that_match_nothing_are_errors(tiny_pipe):
    with pytest.raises(RecipeError) as e:
        resolve_recipe(tiny_pipe, R(rules=[{"match": "re:unet\\.nope.*", "bits": 4}]))
    assert "rules[0].match[0]: 're:unet" in str(e.value) and "matches no quantizable layer" in str(e.value)
    with pytest.raises(RecipeError, match="class:Conv3d.*did you mean 'Conv2d'"):
        resolve_recipe(tiny_pipe, R(rules=[{"match": "class:Conv3d", "bits": 4}]))
    with pytest.raises(RecipeError, match="contains no quantizable"):
        resolve_recipe(tiny_pipe, R(rules=[{"match": "unet.conv_norm_out", "bits": 4}]))
    with pytest.raises(RecipeError, match="VAE encoder is not quantized"):
        resolve_recipe(tiny_pipe, R(rules=[{"match": "vae.encoder", "bits": 4}]))


def test_all_problems_reported_at_once(tiny_pipe):
    with pytest.raises(RecipeError) as e:
        resolve_recipe(tiny_pipe, R(rules=[{"match": ["unet.nope", "class:Nope"], "bits": 4}]))
    assert "unet.nope" in str(e.value) and "class:Nope" in str(e.value)


def test_group_size_that_does_not_divide_rows(tiny_pipe):
    with pytest.raises(RecipeError, match="vae.post_quant_conv.*group size 64 does not divide"):
        resolve_recipe(tiny_pipe, R(defaults={"granularity": "group:64"}))


def test_overlap_with_different_settings_warns_naming_both(tiny_pipe):
    recipe = R(rules=[{"name": "first", "match": "class:Conv2d", "bits": 4},
                      {"name": "second", "match": "unet.mid_block", "bits": 6}])
    with pytest.warns(RecipeOverlapWarning) as rec:
        plan = resolve_recipe(tiny_pipe, recipe)
    msg = str(rec[0].message)
    assert "rules[0] 'first'" in msg and "rules[1] 'second'" in msg and "first match wins" in msg
    assert plan.by_path()["unet.mid_block.resnets.0.conv1"].bits == 4       # first wins
    assert plan.by_path()["unet.mid_block.resnets.0.time_emb_proj"].bits == 6
    assert any(o["conflict"] for o in plan.overlaps)


def test_overlap_with_identical_settings_is_recorded_not_warned(tiny_pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = resolve_recipe(tiny_pipe, load_recipe(REPO / "recipes" / "paper-final.yaml"))
    assert plan.overlaps and not any(o["conflict"] for o in plan.overlaps)


def test_layer_seeds_are_deterministic_and_distinct(tiny_pipe):
    a = resolve_recipe(tiny_pipe, R(defaults={"method": "stochastic"}))
    b = resolve_recipe(tiny_pipe, R(defaults={"method": "stochastic"}))
    c = resolve_recipe(tiny_pipe, R(defaults={"method": "stochastic"}, seed=1))
    assert [lp.seed for lp in a.layers] == [lp.seed for lp in b.layers]
    assert len({lp.seed for lp in a.layers}) == len(a.layers)
    assert [lp.seed for lp in a.layers] != [lp.seed for lp in c.layers]
    assert a.layers[0].seed == layer_seed(0, a.layers[0].path)


def test_apply_recipe_equals_quantize_tensor_per_layer():
    import quantsd
    from quantsd.blocks import get_module

    pipe = quantsd.load_pipeline("tiny")
    ref = quantsd.load_pipeline("tiny")
    plan = apply_recipe(pipe, R(defaults={"bits": 3, "method": "pwlq-stochastic", "granularity": "channel"}, seed=4))
    assert len(plan.layers) == 118
    for lp in plan.layers[::7]:
        w = get_module(ref, lp.path).weight
        want = quantsd.quantize_tensor(w, 3, "pwlq-stochastic", "channel", seed=layer_seed(4, lp.path)).dequantize()
        assert torch.equal(get_module(pipe, lp.path).weight, want)
    # dense parameters (biases, norms) untouched
    assert torch.equal(pipe.unet.conv_in.bias, ref.unet.conv_in.bias)


def test_apply_on_meta_is_a_clear_error(sd15_meta_pipe):
    with pytest.raises(RecipeError, match="meta device"):
        apply_recipe(sd15_meta_pipe, R())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_resolve_on_sd15_without_warnings(sd15_meta_pipe, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = resolve_recipe(sd15_meta_pipe, REPO / "recipes" / f"{name}.yaml")
    assert len(plan.layers) == 396 and not plan.dense


def test_paper_final_assignment(sd15_meta_pipe):
    plan = resolve_recipe(sd15_meta_pipe, REPO / "recipes" / "paper-final.yaml")
    for lp in plan.layers:
        four = lp.cls == "Conv2d" or lp.path.startswith(("unet.down_blocks.", "unet.mid_block."))
        assert lp.bits == (4 if four else 8), lp.path
        assert lp.method == "pwlq" and lp.granularity == "tensor"
