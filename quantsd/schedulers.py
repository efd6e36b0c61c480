"""Samplers without a host/GPU synchronization per step (same math, same bits).

diffusers' PNDM (SD1.5's default sampler) and DDIM read the current timestep's *value* in
``step``: ``alphas_cumprod[timestep]`` and ``prev_timestep >= 0`` with ``timestep`` a 0-dim
tensor on the GPU (the pipeline passes ``scheduler.timesteps[i]``, which ``set_timesteps(...,
device)`` put there).  Each read copies it to the host and waits for every queued kernel, so the
host cannot issue step i+1 while the GPU runs step i.  With a compiled UNet, whose ~1–3 ms of
host work per call (Dynamo guards, CUDA-graph launch) then adds to the GPU time instead of
hiding behind it, that costs ~0.1 s per 50-step SD1.5 image on an H200.

:func:`make_sync_free` keeps a host copy of the schedule (taken in ``set_timesteps`` before the
move to the device, so that needs no sync either).  A pipeline passes ``step`` an element of
``scheduler.timesteps`` (a 0-dim view into its storage, also after slicing as img2img does), so
its position, and so its value, can be read from the view's storage offset without touching the
GPU.  Any other timestep (a Python number, a CPU tensor, a tensor from elsewhere, a schedule
edited in place) takes diffusers' path unchanged.  The instance's methods are rebound (the
class and config stay diffusers'), so saving or swapping the scheduler works as before.
"""

from __future__ import annotations

import types

import torch

__all__ = ["make_sync_free", "is_sync_free", "SYNC_FREE_SCHEDULERS"]

# classes whose step() only needs the timestep's value, and whose set_timesteps() builds the
# schedule on the host and moves it to ``device`` last
SYNC_FREE_SCHEDULERS = ("PNDMScheduler", "DDIMScheduler")


def _set_timesteps(self, num_inference_steps: int, device=None, *args, **kwargs):
    type(self).set_timesteps(self, num_inference_steps, None, *args, **kwargs)   # on the host
    host = self.timesteps
    self._quantsd_host_timesteps = host.tolist()
    if device is not None:
        self.timesteps = host.to(device)
    self._quantsd_version = (self.timesteps.untyped_storage().data_ptr(), _version_of(self.timesteps))


def _version_of(t: torch.Tensor) -> int:
    """In-place version counter of ``t`` (-1 for inference-mode tensors, which have none and which
    only inference-mode code can edit)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _host_value(self, timestep: torch.Tensor):
    """The value of ``timestep`` read from the host copy, when ``timestep`` is an element of this
    schedule (``scheduler.timesteps[i]`` or an iteration over it or a slice of it: a 0-dim view
    into the same storage); None otherwise."""
    ts = self.timesteps
    host = getattr(self, "_quantsd_host_timesteps", None)
    if host is None or timestep.dim() != 0 or ts.dim() != 1 or ts.stride(0) < 1:
        return None
    storage = ts.untyped_storage().data_ptr()
    if timestep.untyped_storage().data_ptr() != storage or (storage, _version_of(ts)) != self._quantsd_version:
        return None   # not a view of the schedule, or the schedule was replaced or edited in place
    offset = timestep.storage_offset() - ts.storage_offset()
    i, rem = divmod(offset, ts.stride(0))
    if rem or not 0 <= i < len(host):
        return None
    return host[i]


def _step(self, model_output, timestep, sample, *args, **kwargs):
    if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
        value = _host_value(self, timestep)
        if value is not None:
            timestep = value
    return type(self).step(self, model_output, timestep, sample, *args, **kwargs)


def make_sync_free(scheduler) -> bool:
    """Rebind ``set_timesteps``/``step`` of a PNDM or DDIM scheduler instance to the host-timestep
    versions; returns False (and changes nothing) for other schedulers."""
    if type(scheduler).__name__ not in SYNC_FREE_SCHEDULERS:
        return False
    scheduler.set_timesteps = types.MethodType(_set_timesteps, scheduler)
    scheduler.step = types.MethodType(_step, scheduler)
    return True


def is_sync_free(scheduler) -> bool:
    return getattr(vars(scheduler).get("step"), "__func__", None) is _step
