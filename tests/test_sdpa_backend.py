"""quantsd.sdpa_backend: a component's SDPA calls prefer the chosen backend (the aten op the
dispatcher picks changes), fall back where it cannot run, and the choice is replaced, never stacked."""

import pytest
import torch
from click.testing import CliRunner
from torch.profiler import ProfilerActivity, profile

import quantsd
from quantsd.bench.core import SDPA_OPS, attention_backend_of
from quantsd.generate import configure_pipeline
from quantsd.sdpa_backend import preferred_sdpa_backend, resolve_sdpa_backend, sdpa_backend_of, set_sdpa_backend


def _unet_backend(unet):
    torch.manual_seed(0)
    lat = torch.randn(2, unet.config.in_channels, 16, 16)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        out = unet(lat, torch.tensor([10, 10]), encoder_hidden_states=ctx, return_dict=False)[0]
    return attention_backend_of({e.key: e.count for e in prof.key_averages() if e.key in SDPA_OPS}), out


def test_the_preferred_backend_is_the_one_dispatched():
    """On the CPU, fp32: "math" dispatches the math op, "flash" the CPU flash kernel; the outputs agree
    to float rounding; "pytorch" removes the preference, and so does "auto" on the CPU."""
    unet = quantsd.load_pipeline("tiny").unet
    set_sdpa_backend(unet, "math")
    math_backend, math_out = _unet_backend(unet)
    set_sdpa_backend(unet, "flash")
    flash_backend, flash_out = _unet_backend(unet)
    assert (math_backend, flash_backend) == ("math", "flash")
    torch.testing.assert_close(flash_out, math_out, rtol=1e-4, atol=1e-5)
    assert sdpa_backend_of(unet) == "flash"
    set_sdpa_backend(unet, "pytorch")
    assert sdpa_backend_of(unet) == "pytorch" and "forward" not in unet.__dict__
    set_sdpa_backend(unet, "flash")
    set_sdpa_backend(unet, "auto")    # fp32 on the CPU: FlashAttention-2 cannot run, PyTorch chooses
    assert sdpa_backend_of(unet) == "pytorch" and "forward" not in unet.__dict__


def test_auto_prefers_flash_for_16_bit_cuda_only():
    """"auto" is FlashAttention first where FA2 runs (fp16/bf16 on CUDA) and the module is eager,
    PyTorch's choice elsewhere; it is resolved from the module's own parameters."""
    assert preferred_sdpa_backend(torch.float16, "cuda") == "flash"
    assert preferred_sdpa_backend(torch.bfloat16, "cuda") == "flash"
    assert preferred_sdpa_backend(torch.float32, "cuda") is None
    assert preferred_sdpa_backend(torch.float16, "cpu") is None
    unet = quantsd.load_pipeline("tiny").unet
    assert resolve_sdpa_backend(unet, "auto") is None
    assert resolve_sdpa_backend(unet.to(torch.float16), "auto") is None     # still the CPU
    assert resolve_sdpa_backend(unet, "pytorch") is None and resolve_sdpa_backend(unet, "cudnn") == "cudnn"
    assert resolve_sdpa_backend(torch.nn.ReLU(), "auto") is None            # no parameters: nothing to go by
    # a torch.compile'd module: PyTorch's choice (cuDNN's kernel is the faster one under CUDA graphs), unless named
    compiled = torch.compile(unet)
    assert resolve_sdpa_backend(compiled, "auto") is None and resolve_sdpa_backend(compiled, "flash") == "flash"
    # compile_unet(guards="minimal") returns the module itself: configure_pipeline says it is compiled
    assert resolve_sdpa_backend(unet, "auto", compiled=True) is None


def test_a_preference_that_cannot_run_falls_back():
    """cuDNN attention does not exist on the CPU: preferring it falls back (flash for CPU) instead of
    failing."""
    unet = quantsd.load_pipeline("tiny").unet
    set_sdpa_backend(unet, "cudnn")
    backend, _ = _unet_backend(unet)
    assert backend in ("flash", "math")


def test_replaced_never_stacked_and_an_instance_forward_is_kept():
    unet = quantsd.load_pipeline("tiny").unet
    calls = []
    own = unet.forward

    def wrapper(*args, **kwargs):      # e.g. accelerate's hook
        calls.append(1)
        return own(*args, **kwargs)

    unet.__dict__["forward"] = wrapper
    set_sdpa_backend(unet, "math")
    set_sdpa_backend(unet, "flash")
    assert unet.__dict__["forward"].inner is wrapper
    backend, _ = _unet_backend(unet)
    assert backend == "flash" and calls == [1]
    set_sdpa_backend(unet, None)
    assert unet.__dict__["forward"] is wrapper
    set_sdpa_backend(unet, "flash")
    set_sdpa_backend(unet, "pytorch")
    assert unet.__dict__["forward"] is wrapper
    with pytest.raises(ValueError, match="unknown SDPA backend 'fast'"):
        set_sdpa_backend(unet, "fast")


def test_configure_pipeline_and_the_cli_take_the_choice(tmp_path):
    fresh = quantsd.load_pipeline("tiny")
    with pytest.raises(ValueError, match="unknown SDPA backend 'fast'"):
        configure_pipeline(fresh, sdpa_backend="fast", attention="classic")
    # refused before anything changed: the attention processors are still diffusers' defaults
    assert not any(type(p).__name__ == "AttnProcessor" for p in fresh.unet.attn_processors.values())
    pipe = configure_pipeline(quantsd.load_pipeline("tiny"), sdpa_backend="math")
    parts = [pipe.text_encoder, pipe.unet, pipe.vae.encoder, pipe.vae.decoder]
    assert [sdpa_backend_of(m) for m in parts] == ["math"] * 4
    # the decode a pipeline runs (vae.decode, not vae.forward) dispatches under the choice
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        pipe.vae.decode(torch.randn(1, pipe.vae.config.latent_channels, 8, 8))
    ops = {e.key: e.count for e in prof.key_averages() if e.key in SDPA_OPS}
    assert attention_backend_of(ops) == "math"
    from quantsd.cli import main

    out = tmp_path / "img.png"
    r = CliRunner().invoke(main, ["generate", "-m", "tiny", "-p", "a red square", "--steps", "1",
                                  "--sdpa-backend", "math", "-o", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and '"sdpa_backend": "math"' in r.output
    # the default, auto, on the CPU: no preference set anywhere, the image's info says so
    r = CliRunner().invoke(main, ["generate", "-m", "tiny", "-p", "a red square", "--steps", "1",
                                  "-o", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert '"sdpa_backend": "pytorch"' in r.output
    r = CliRunner().invoke(main, ["generate", "-m", "tiny", "-p", "a red square", "--steps", "1",
                                  "--sdpa-backend", "pytorch", "-o", str(out), "--format", "json"])
    assert r.exit_code == 0 and '"sdpa_backend": "pytorch"' in r.output, r.output
    r = CliRunner().invoke(main, ["generate", "-m", "tiny", "-p", "a red square", "--sdpa-backend", "fast",
                                  "-o", str(out)])
    assert r.exit_code != 0 and "fast" in r.output and "pytorch" in r.output
    pipe = configure_pipeline(quantsd.load_pipeline("tiny"), sdpa_backend="math")
    configure_pipeline(pipe)     # configured again with the default: the earlier preference is taken back
    assert [sdpa_backend_of(m) for m in (pipe.text_encoder, pipe.unet, pipe.vae.decoder)] == ["pytorch"] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_auto_prefers_flash_for_the_fp16_unet_only():
    """"auto" (the default) is flash for an eager fp16 UNet on CUDA; an fp32 one on CUDA stays PyTorch's."""
    unet = quantsd.load_pipeline("tiny").unet.to("cuda", torch.float16)
    set_sdpa_backend(unet, "auto")
    assert sdpa_backend_of(unet) == "flash"
    assert resolve_sdpa_backend(quantsd.load_pipeline("tiny").unet.to("cuda"), "auto") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_flash_and_cudnn_preferences_dispatch_their_ops():
    """fp16 on CUDA: "flash" dispatches PyTorch's FlashAttention op, "cudnn" the cuDNN one where the
    card has it (else a fallback), "math" the math op; flash and math agree to fp16 rounding."""
    unet = quantsd.load_pipeline("tiny").unet.to("cuda", torch.float16)

    def inputs():
        torch.manual_seed(0)
        lat = torch.randn(2, unet.config.in_channels, 16, 16, device="cuda", dtype=torch.float16)
        ctx = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=torch.float16)
        return lat, torch.tensor([10, 10], device="cuda"), ctx

    def run():
        lat, t, ctx = inputs()
        with torch.inference_mode():       # (unprofiled first: lazy kernel and profiler set-up outside the count)
            unet(lat, t, encoder_hidden_states=ctx, return_dict=False)
            torch.cuda.synchronize()
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            out = unet(lat, t, encoder_hidden_states=ctx, return_dict=False)[0]
            torch.cuda.synchronize()
        return attention_backend_of({e.key: e.count for e in prof.key_averages() if e.key in SDPA_OPS}), out

    set_sdpa_backend(unet, "flash")
    flash, flash_out = run()
    set_sdpa_backend(unet, "math")
    math, math_out = run()
    set_sdpa_backend(unet, "cudnn")
    cudnn, _ = run()
    assert (flash, math) == ("flash", "math") and cudnn in ("cudnn", "flash")
    torch.testing.assert_close(flash_out, math_out, rtol=2e-2, atol=2e-2)


def test_configure_pipeline_leaves_a_compiled_unet_to_pytorch(monkeypatch):
    """With "auto", a --compile'd UNet keeps PyTorch's choice while the eager components get the
    preference (here "flash" stands in for a CUDA device's pick; torch.compile is lazy, nothing is
    compiled), whichever guard mode wrapped it."""
    import quantsd.sdpa_backend as sb

    monkeypatch.setattr(sb, "preferred_sdpa_backend", lambda dtype, device_type: "flash")
    for guards in ("full", "minimal"):
        pipe = configure_pipeline(quantsd.load_pipeline("tiny"), compile=True, compile_guards=guards)
        assert sdpa_backend_of(pipe.unet) == "pytorch"
        assert [sdpa_backend_of(m) for m in (pipe.text_encoder, pipe.vae.decoder)] == ["flash", "flash"]
    eager = configure_pipeline(quantsd.load_pipeline("tiny"))
    assert sdpa_backend_of(eager.unet) == "flash"
