"""Generation from reloaded checkpoints equals the simulated pipeline; CLI export/generate."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import quantsd
from quantsd.cli import main
from quantsd.export import export
from quantsd.generate import generate, save_png
from quantsd.io import load_checkpoint
from quantsd.recipe import apply_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "paper-final.yaml"


def run(pipe, steps=1):
    gen = torch.Generator().manual_seed(123)
    with torch.inference_mode():
        return pipe("a red square", num_inference_steps=steps, height=32, width=32, generator=gen,
                    output_type="np").images


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "ck"
    export(quantsd.load_pipeline("tiny"), RECIPE, out, dtype="keep")
    return out


def test_reloaded_generation_equals_simulation_exactly(exported):
    """Tolerance: zero. Same weights bit for bit and the same fp32 CPU ops give the same image,
    in both weight modes (packed layers run F.linear/F.conv2d on the identical dense weight)."""
    sim = quantsd.load_pipeline("tiny")
    apply_recipe(sim, RECIPE)
    ref = run(sim)
    dense = run(load_checkpoint(exported, dtype=torch.float32, weights="dequantize"))
    packed = run(load_checkpoint(exported, dtype=torch.float32, weights="packed"))
    assert np.array_equal(ref, dense)
    assert np.array_equal(ref, packed)
    unquantized = run(quantsd.load_pipeline("tiny"))
    assert not np.array_equal(ref, unquantized)  # the comparison can fail


def test_generate_library_and_atomic_png(exported, tmp_path):
    image, info = generate(str(exported), "a blue circle", steps=1, seed=3, weights="packed", device="cpu")
    assert image.size == (32, 32) and info["weights"] == "packed" and info["dtype"] == "float32"
    p = save_png(image, tmp_path / "sub" / "img.png", info)
    from PIL import Image

    with Image.open(p) as im:
        assert im.size == (32, 32) and im.text["quantsd:seed"] == "3"
    assert [x.name for x in p.parent.iterdir()] == ["img.png"]
    with pytest.raises(ValueError, match="only to quantsd checkpoints"):
        generate("tiny", "x", steps=1, weights="packed", device="cpu")


def test_cli_export_inspect_generate(tmp_path):
    out = tmp_path / "ck"
    r = CliRunner().invoke(main, ["export", "-m", "tiny", "--recipe", str(RECIPE), "-o", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["total_bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert (out / "quantsd.json").exists() and (out / "unet" / "quantsd_weights.safetensors").exists()
    r = CliRunner().invoke(main, ["export", "-m", "tiny", "--recipe", str(RECIPE), "-o", str(out)])
    assert r.exit_code != 0 and "already exists" in r.output and "--overwrite" in r.output
    r = CliRunner().invoke(main, ["export", "-m", "tiny", "--recipe", str(REPO / "recipes" / "w8-uniform.yaml"),
                                  "-o", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert "checkpoint total" in r.output
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "w8-uniform" in r.output
    png = tmp_path / "img.png"
    r = CliRunner().invoke(main, ["generate", "-m", str(out), "-p", "a cat", "--steps", "1", "--seed", "5",
                                  "--weights", "dequantize", "--device", "cpu", "-o", str(png), "--format", "json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output[r.output.index("{"):])
    assert png.exists() and info["seed"] == 5 and info["weights"] == "dequantize"


def test_cli_export_dry_run_sd15(tmp_path):
    r = CliRunner().invoke(main, ["export", "-m", "sd15-arch", "--recipe", str(RECIPE), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "unet.down_blocks.0.resnets.0.conv1" in r.output and "checkpoint total" in r.output
    assert not list(tmp_path.iterdir())
    r = CliRunner().invoke(main, ["export", "-m", "sd15-arch", "--recipe", str(RECIPE), "--dry-run", "--format", "json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert len(res["plan"]["layers"]) == 396 and res["total_bytes"] > 0.7e9
    assert res["manifest"]["totals"]["quantized_tensor_bytes"] == 648_742_424


def test_cli_export_recipe_errors_are_clean(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantsd_recipe: 1\nrules:\n  - match: [unet.down_block.0]\n    bits: 4\n")
    r = CliRunner().invoke(main, ["export", "-m", "tiny", "--recipe", str(bad), "--dry-run"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "does not exist" in r.output and "unet.down_blocks.0" in r.output
    r = CliRunner().invoke(main, ["export", "-m", "tiny", "--recipe", str(RECIPE)])
    assert r.exit_code != 0 and "--output" in r.output


def test_generate_dense_below_keeps_the_image(exported):
    """--dense-below decodes the UNet's smallest packed layers once (the same weights): the image
    is the one the all-packed pipeline makes, and fewer packed layers remain."""
    from quantsd.nn import packed_modules

    kw = dict(steps=2, seed=3, weights="packed", device="cpu", height=32, width=32)
    base, _ = generate(str(exported), "a blue circle", **kw)
    dense, info = generate(str(exported), "a blue circle", dense_below=10**9, **kw)
    assert info["dense_below"] == 10**9
    assert np.array_equal(np.asarray(base), np.asarray(dense))
    pipe = load_checkpoint(exported, dtype=torch.float32, weights="packed")
    from quantsd.generate import configure_pipeline

    n = len(packed_modules(pipe.unet))
    configure_pipeline(pipe, dense_below=10**9)
    assert n > 0 and len(packed_modules(pipe.unet)) == 0


def test_dense_below_comes_before_sequential_offload(exported, monkeypatch):
    """configure_pipeline densifies before attaching offload hooks, so the hooks manage the dense
    layers (densifying after them cloned biases the hooks had moved to the meta device)."""
    from torch import nn

    import quantsd.generate as G
    from quantsd.nn import QuantModule

    pipe = load_checkpoint(exported, dtype=torch.float32, weights="packed")
    seen = []
    monkeypatch.setattr(type(pipe), "enable_sequential_cpu_offload",   # no CUDA here: record what hooks would see
                        lambda self, *a, **k: seen.append([type(m) for m in self.unet.modules()
                                                           if isinstance(m, (nn.Linear, nn.Conv2d, QuantModule))]))
    monkeypatch.setattr(G, "resolve_device", lambda d: torch.device("cuda"))
    G.configure_pipeline(pipe, device="cuda", dense_below=10**9, offload="sequential")
    assert seen and seen[0] and all(t in (nn.Linear, nn.Conv2d) for t in seen[0])


def test_cli_generate_dequant_flags(exported, tmp_path):
    """--no-grouped-dequant and --dense-below run from the CLI (CPU: no kernel groups; the densified
    UNet gives the all-packed image) and bad values are refused before anything is written."""
    from PIL import Image

    outs = []
    for extra in ([], ["--no-grouped-dequant", "--dense-below", "1000000000"]):
        png = tmp_path / f"img{len(outs)}.png"
        r = CliRunner().invoke(main, ["generate", "-m", str(exported), "-p", "a cat", "--steps", "1", "--weights",
                                      "packed", "--device", "cpu", "--height", "32", "--width", "32", "-o", str(png),
                                      "--format", "json", *extra])
        assert r.exit_code == 0, r.output
        info = json.loads(r.output[r.output.index("{"):])
        assert info["dequant_groups"] == 0
        outs.append((info, np.asarray(Image.open(png))))
    assert outs[0][0]["dense_below"] is None and outs[1][0]["dense_below"] == 10**9
    assert np.array_equal(outs[0][1], outs[1][1])
    bad = tmp_path / "bad.png"
    r = CliRunner().invoke(main, ["generate", "-m", str(exported), "-p", "x", "--dense-below", "-3", "-o", str(bad)])
    assert r.exit_code != 0 and "--dense-below" in r.output and not bad.exists()
