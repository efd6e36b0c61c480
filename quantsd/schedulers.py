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
``scheduler.timesteps`` (a 0-dim view into the schedule's storage, also after slicing as img2img
does), so its position in the schedule ``set_timesteps`` built, and so its value, follows from
the view's storage offset without touching the GPU.  Any other timestep (a Python number, a CPU
tensor, a tensor from elsewhere) takes diffusers' path unchanged, as does a schedule edited in
place outside inference mode; edits made inside inference mode or through ``.data`` are not seen
(those tensors keep no version counter) and would be read from the stale host copy.

The scheduler instance's class is switched to a subclass that keeps the diffusers class's name,
module and method signatures (pipelines read ``step``'s signature to pass ``eta``/``generator``),
so configs, ``save_pretrained``, ``copy`` and pickling (which restores the plain diffusers class)
behave as before.
"""

from __future__ import annotations

import copy
import copyreg
import inspect

import torch

from .nn import _version_of

__all__ = ["make_sync_free", "undo_sync_free", "is_sync_free", "SYNC_FREE_SCHEDULERS"]

# classes whose step() only needs the timestep's value, and whose set_timesteps() builds the
# schedule on the host and moves it to ``device`` last
SYNC_FREE_SCHEDULERS = ("PNDMScheduler", "DDIMScheduler")

_SUBCLASSES: dict[type, type] = {}


def _host_value(self, timestep: torch.Tensor):
    """The value of ``timestep`` read from the host copy, when ``timestep`` is a 0-dim view of the
    schedule ``set_timesteps`` built (``timesteps[i]``, iteration, slices of it); None otherwise."""
    sched = self.__dict__.get("_quantsd_schedule")
    if sched is None or timestep.dim() != 0:
        return None
    base, host, version = sched
    if (timestep.dtype != base.dtype or timestep.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
            or _version_of(base) != version):
        return None   # not a view of the schedule, or the schedule was edited in place
    i, rem = divmod(timestep.storage_offset() - base.storage_offset(), base.stride(0))
    if rem or not 0 <= i < len(host):
        return None
    return host[i]


def _subclass(cls: type) -> type:
    """``cls`` with the host-timestep ``set_timesteps``/``step``, under ``cls``'s own name."""
    sub = _SUBCLASSES.get(cls)
    if sub is not None:
        return sub

    def set_timesteps(self, num_inference_steps, device=None, *args, **kwargs):
        cls.set_timesteps(self, num_inference_steps, None, *args, **kwargs)   # built on the host
        host = self.timesteps
        if device is not None:
            self.timesteps = host.to(device)
        if self.timesteps.dim() == 1 and self.timesteps.stride(0) >= 1:
            self._quantsd_schedule = (self.timesteps, host.tolist(), _version_of(self.timesteps))
        else:
            self.__dict__.pop("_quantsd_schedule", None)

    def step(self, model_output, timestep, *args, **kwargs):
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            value = _host_value(self, timestep)
            if value is not None:
                timestep = value
        return cls.step(self, model_output, timestep, *args, **kwargs)

    # pipelines inspect these signatures (eta, generator, custom timesteps): show the real ones
    set_timesteps.__signature__ = inspect.signature(cls.set_timesteps)
    step.__signature__ = inspect.signature(cls.step)
    for fn, name in ((set_timesteps, "set_timesteps"), (step, "step")):
        fn.__doc__ = getattr(cls, name).__doc__
        fn.__qualname__ = f"{cls.__qualname__}.{name}"
    def __reduce_ex__(self, protocol):
        # pickles name the plain diffusers class (and need no quantsd to load): correct, not sync-free
        state = {k: v for k, v in self.__dict__.items() if k != "_quantsd_schedule"}
        return copyreg._reconstructor, (cls, object, None), state

    def __copy__(self):
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        old, sched = self.__dict__.get("_quantsd_schedule"), new.__dict__.get("_quantsd_schedule")
        if sched is not None:
            if _version_of(old[0]) != old[2]:   # already stale here: stale in the copy too
                del new._quantsd_schedule
            else:                              # a deep-copied tensor starts a new version count
                new._quantsd_schedule = (sched[0], sched[1], _version_of(sched[0]))
        return new

    # same name, module and qualname as ``cls``: saved configs name the diffusers class
    sub = type(cls.__name__, (cls,), {"set_timesteps": set_timesteps, "step": step, "_quantsd_base": cls,
                                      "__reduce_ex__": __reduce_ex__, "__copy__": __copy__,
                                      "__deepcopy__": __deepcopy__,
                                      "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _SUBCLASSES.setdefault(cls, sub)   # one subclass per class, also when threads race


def make_sync_free(scheduler) -> bool:
    """Switch a PNDM or DDIM scheduler instance to the host-timestep ``set_timesteps``/``step``;
    returns False (and changes nothing) for other schedulers."""
    if is_sync_free(scheduler):
        return True
    if type(scheduler).__name__ not in SYNC_FREE_SCHEDULERS:
        return False
    scheduler.__class__ = _subclass(type(scheduler))
    return True


def undo_sync_free(scheduler) -> bool:
    """Back to the plain diffusers class; returns whether anything changed."""
    base = type(scheduler).__dict__.get("_quantsd_base")
    if base is None:
        return False
    scheduler.__class__ = base
    scheduler.__dict__.pop("_quantsd_schedule", None)
    return True


def is_sync_free(scheduler) -> bool:
    return "_quantsd_base" in type(scheduler).__dict__
