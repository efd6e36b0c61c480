"""Which fused attention kernel ``F.scaled_dot_product_attention`` uses, per pipeline component.

PyTorch's dispatcher picks the SDPA backend per call; with torch 2.11 on the H200 it picks cuDNN's
fused attention for SD1.5's shapes (the profile's ``aten::_scaled_dot_product_cudnn_attention``),
not FlashAttention.  :func:`set_sdpa_backend` makes a component prefer one backend: a forward set
on the component instance (the UNet, the VAE) runs the component's own forward inside
``torch.nn.attention.sdpa_kernel`` with that backend first in priority and the others after it,
so a shape the preferred kernel cannot run (fp32 for flash, an unsupported head dim) falls back
instead of failing.  Entered once per component call (one context per UNet step, not one per
attention call: the eager step is host-bound).  Set on a compiled UNet it wraps the compiled module,
so the graph is traced, and its attention chosen, under the preference.
"""

from __future__ import annotations

from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["SDPA_BACKENDS", "check_sdpa_backend", "set_sdpa_backend", "sdpa_backend_of"]

# the choices, each with the order the dispatcher tries them in
SDPA_BACKENDS = {
    "flash": (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
    "cudnn": (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
    "efficient": (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                  SDPBackend.MATH),
    "math": (SDPBackend.MATH,),
}


def check_sdpa_backend(backend: str | None) -> None:
    """Refuse a backend name that is none of auto (or None) and :data:`SDPA_BACKENDS`."""
    if backend is not None and backend != "auto" and backend not in SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA backend {backend!r}: use auto, {', '.join(SDPA_BACKENDS)}")


class _SDPABackendForward:
    """A component's forward run inside ``sdpa_kernel(order, set_priority=True)``.  A forward already
    set on the instance (accelerate's hooks, torch.compile's ``OptimizedModule``) is kept and called
    inside; a deep copy or an unpickled model gets its own."""

    def __init__(self, module: nn.Module, backend: str):
        self.module = module
        self.backend = backend
        self.order = list(SDPA_BACKENDS[backend])
        self.inner = module.__dict__.get("forward")      # None: the class's forward

    def __call__(self, *args, **kwargs):
        with sdpa_kernel(self.order, set_priority=True):
            if self.inner is None:
                return type(self.module).forward(self.module, *args, **kwargs)
            return self.inner(*args, **kwargs)


def set_sdpa_backend(module: nn.Module, backend: str | None) -> None:
    """Make ``module``'s forward prefer ``backend`` ("flash", "cudnn", "efficient" or "math") for its
    SDPA calls; None or "auto" gives the choice back to PyTorch's dispatcher."""
    check_sdpa_backend(backend)
    current = module.__dict__.get("forward")
    if isinstance(current, _SDPABackendForward):    # (replace, never stack)
        if current.inner is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = current.inner
    if backend is not None and backend != "auto":
        module.__dict__["forward"] = _SDPABackendForward(module, backend)   # (a plain attribute, as nn.Module allows)


def sdpa_backend_of(module: nn.Module) -> str:
    """The backend :func:`set_sdpa_backend` set on ``module`` ("auto" where none)."""
    current = module.__dict__.get("forward")
    return current.backend if isinstance(current, _SDPABackendForward) else "auto"
