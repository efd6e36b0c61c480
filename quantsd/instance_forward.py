"""Forwards set on one module instance: the mechanism quantsd's eager wrappers share.

``nn.Module.__call__`` looks ``forward`` up on the instance first, so a callable stored in the
instance's ``__dict__`` replaces the class's forward for that module alone.  Why not a forward
hook: any hook sends ``nn.Module.__call__`` down its slow path (SD1.5's eager step is bound by the
host's Python: 28 hooked roots were ~0.66 ms a step on the H200, session 13).

:class:`InstanceForward` is the base: it remembers what the instance had (``inner``: another
wrapper, accelerate's offload hook, torch.compile's forward, or None for the class's), installs
itself without ``nn.Module.__setattr__`` (it is neither a module, a parameter nor a buffer) and
puts back what it wrapped when removed.  Subclasses hold the behaviour: arming packed weights
(:mod:`quantsd.eager_slots`, :mod:`quantsd.eager_runs`), direct attention calls
(:mod:`quantsd.attention_calls`), the SDPA kernel preference (:mod:`quantsd.sdpa_backend`).
A deep copy or an unpickled model gets its own wrappers: each holds its module, which is copied
with it.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

__all__ = ["InstanceForward"]

_W = TypeVar("_W", bound="InstanceForward")


class InstanceForward:
    """A module instance's forward that wraps what the instance had (see the module docstring)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.inner = module.__dict__.get("forward")      # None: the class's forward

    def call_inner(self, *args, **kwargs):
        """The wrapped forward: the one the instance had, else the class's.  (Hot paths inline it.)"""
        inner = self.inner
        if inner is None:
            return type(self.module).forward(self.module, *args, **kwargs)
        return inner(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.call_inner(*args, **kwargs)

    @classmethod
    def install(cls: type[_W], module: nn.Module, *args, **kwargs) -> _W:
        """Set ``cls(module, *args, **kwargs)`` as ``module``'s forward; returns it."""
        wrapper = cls(module, *args, **kwargs)
        module.__dict__["forward"] = wrapper     # (not nn.Module.__setattr__: a plain attribute)
        return wrapper

    @classmethod
    def installed(cls: type[_W], module: nn.Module) -> _W | None:
        """``module``'s forward if it is one of ``cls`` (the outermost only), else None."""
        current = module.__dict__.get("forward")
        return current if isinstance(current, cls) else None

    @classmethod
    def remove(cls, module: nn.Module) -> bool:
        """Take ``module``'s forward off if it is one of ``cls``, putting back what it wrapped;
        returns whether there was one."""
        current = cls.installed(module)
        if current is None:
            return False
        if current.inner is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = current.inner
        return True
