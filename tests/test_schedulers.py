"""Sync-free PNDM/DDIM: same sample bits, timestep values read from the host copy."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

from quantsd.generate import generate
from quantsd.schedulers import _host_value, is_sync_free, make_sync_free, undo_sync_free

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _pair(cls):
    kw = dict(SD, skip_prk_steps=True, steps_offset=1) if cls is PNDMScheduler else dict(SD, steps_offset=1)
    ref, fast = cls(**kw), cls(**kw)
    assert make_sync_free(fast) and is_sync_free(fast) and not is_sync_free(ref)
    return ref, fast


def _run(sched, device, steps=12):
    sched.set_timesteps(steps, device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    for t in sched.timesteps:            # as a pipeline iterates: 0-dim views of the schedule
        eps = torch.randn(1, 4, 8, 8, generator=g)
        x = sched.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("cls", [PNDMScheduler, DDIMScheduler])
def test_sync_free_step_gives_the_same_samples(cls):
    ref, fast = _pair(cls)
    want = _run(ref, None)
    assert torch.equal(_run(fast, None), want)          # CPU timesteps: diffusers' path
    # "meta" timesteps stand in for GPU ones: diffusers' own step cannot read their value at all,
    # the sync-free step reads it from the host copy and gives the same bits
    assert torch.equal(_run(fast, "meta"), want)
    with pytest.raises(Exception):
        _run(ref, "meta")


def test_host_value_only_for_views_of_the_schedule():
    _, fast = _pair(PNDMScheduler)
    fast.set_timesteps(10)
    ts = fast.timesteps
    host = ts.tolist()
    assert [_host_value(fast, t) for t in ts] == host
    assert [_host_value(fast, t) for t in ts[4:]] == host[4:]     # img2img slices the schedule
    assert [_host_value(fast, t) for t in ts[::2]] == host[::2]
    fast.timesteps = ts[3:]                                         # reassigned to a slice of itself
    assert [_host_value(fast, t) for t in fast.timesteps] == host[3:]
    assert _host_value(fast, ts[3].clone()) is None                 # not a view: diffusers' path
    assert _host_value(fast, torch.tensor(host[3])) is None
    ts.add_(0)                                                      # edited in place: stale copy
    assert _host_value(fast, ts[3]) is None
    fast.set_timesteps(10)
    fast.timesteps = fast.timesteps.flip(0).clone()                 # replaced: not the schedule
    assert _host_value(fast, fast.timesteps[0]) is None


def test_sync_free_scheduler_looks_like_diffusers(tmp_path):
    import copy
    import inspect
    import pickle

    from diffusers import StableDiffusionPipeline

    ref, fast = _pair(DDIMScheduler)
    assert type(fast).__name__ == "DDIMScheduler" and isinstance(fast, DDIMScheduler)
    # pipelines pass eta/generator only when step's signature names them
    assert inspect.signature(fast.step).parameters.keys() == inspect.signature(ref.step).parameters.keys()
    fake = type("P", (), {"scheduler": fast})()
    extra = StableDiffusionPipeline.prepare_extra_step_kwargs(fake, torch.Generator(), 1.0)
    assert extra["eta"] == 1.0 and "generator" in extra
    fast.save_config(tmp_path)
    import json

    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    loaded = DDIMScheduler.from_pretrained(tmp_path)
    assert {k: loaded.config[k] for k in ref.config if not k.startswith("_")} == {
        k: v for k, v in ref.config.items() if not k.startswith("_")}
    c = copy.copy(fast)                       # an independent sync-free scheduler
    c.set_timesteps(7)
    fast.set_timesteps(5)
    assert is_sync_free(c) and len(c.timesteps) == 7 and len(fast.timesteps) == 5
    d = copy.deepcopy(fast)
    assert is_sync_free(d) and [_host_value(d, t) for t in d.timesteps] == fast.timesteps.tolist()
    fast.timesteps.add_(1)                    # stale here: stale in a deep copy too
    assert _host_value(fast, fast.timesteps[0]) is None
    d2 = copy.deepcopy(fast)
    assert _host_value(d2, d2.timesteps[0]) is None
    fast.set_timesteps(5)
    assert _host_value(fast, fast.timesteps.view(torch.int32)[2]) is None   # another dtype's view
    back = pickle.loads(pickle.dumps(fast))   # comes back as the plain diffusers class
    assert type(back) is DDIMScheduler and torch.equal(back.timesteps, fast.timesteps)
    assert make_sync_free(fast) and undo_sync_free(fast) and type(fast) is DDIMScheduler
    assert not undo_sync_free(fast)


def test_other_schedulers_are_left_alone():
    e = EulerDiscreteScheduler(**SD)
    assert not make_sync_free(e) and type(e) is EulerDiscreteScheduler and not is_sync_free(e)


def test_generate_uses_it_without_changing_the_image():
    kw = dict(steps=3, height=32, width=32, device="cpu", seed=1)
    a, _ = generate("tiny", "a blue circle", **kw)          # tiny's DDIM, sync-free by default
    b, _ = generate("tiny", "a blue circle", sync_free_scheduler=False, **kw)
    assert a.tobytes() == b.tobytes()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [PNDMScheduler, DDIMScheduler])
def test_no_device_sync_per_step_on_cuda(cls):
    ref, fast = _pair(cls)

    def run(sched):
        sched.set_timesteps(10, device="cuda")
        x = torch.randn(1, 4, 8, 8, device="cuda")
        eps = torch.randn(1, 4, 8, 8, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in sched.timesteps:
                x = sched.step(eps, t, x).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return x

    with pytest.raises(RuntimeError):   # diffusers' step synchronizes (the reason for this module)
        run(ref)
    run(fast)
