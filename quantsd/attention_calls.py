"""Eager attention calls without diffusers' per-call signature inspection.

diffusers' ``Attention.forward`` runs ``inspect.signature(self.processor.__call__)`` on every call,
only to filter the extra keyword arguments (``cross_attention_kwargs``) -- which a plain
text-to-image call never passes.  An eager SD1.5 UNet step makes 32 attention calls and is bound by
the host's Python, and the inspection costs ~16 us a call on this project's CPU (~0.5 ms a step;
``bench/attention_calls_cpu.py``).

:func:`direct_attention_calls` sets a forward on each ``Attention`` instance (``module.forward``,
a :class:`quantsd.instance_forward.InstanceForward`: no hook, so ``nn.Module.__call__`` keeps its
fast path) that
calls the processor directly when no extra keyword argument comes -- exactly what diffusers'
forward does then -- and diffusers' own forward otherwise (LoRA scales, IP-adapter inputs: the
same filtering, the same warnings), or while torch.compile traces.  The processor is read at
every call, so ``set_attn_processor`` afterwards still takes effect.
"""

from __future__ import annotations

import torch
from torch import nn

from .instance_forward import InstanceForward

__all__ = ["direct_attention_calls", "remove_direct_attention_calls"]


class _DirectAttentionForward(InstanceForward):
    """An ``Attention`` instance's forward: its processor called directly when no extra keyword
    argument comes, the class's forward otherwise (installed only where the instance has no forward
    of its own: ``inner`` is None)."""

    def __call__(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        module = self.module
        if kwargs or torch.compiler.is_compiling():
            return type(module).forward(module, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        return module.processor(module, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                attention_mask=attention_mask)


def _attention_class():
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:     # (a diffusers without it: nothing to do)
        return None
    return Attention


def direct_attention_calls(module: nn.Module) -> int:
    """Give every diffusers ``Attention`` below ``module`` (itself included) the direct forward;
    returns how many got it.  An instance that already has a forward of its own (accelerate's
    offload hooks, another wrapper) is left alone: its wrapper may rely on the class's forward; so
    is a subclass that overrides ``forward`` (it may do more than call its processor)."""
    cls = _attention_class()
    if cls is None:
        return 0
    n = 0
    for m in module.modules():
        if isinstance(m, cls) and type(m).forward is cls.forward and "forward" not in m.__dict__:
            _DirectAttentionForward.install(m)
            n += 1
    return n


def remove_direct_attention_calls(module: nn.Module) -> int:
    """Undo :func:`direct_attention_calls` below ``module``; returns how many were removed."""
    return sum(_DirectAttentionForward.remove(m) for m in module.modules())
