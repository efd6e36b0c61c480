"""Which fused attention kernel ``F.scaled_dot_product_attention`` uses, per pipeline component.

PyTorch's dispatcher picks the SDPA backend per call; with torch 2.11 on the H200 it picks cuDNN's
fused attention for SD1.5's shapes (the profile's ``aten::_scaled_dot_product_cudnn_attention``),
not FlashAttention.  quantsd's default, "auto" (:func:`resolve_sdpa_backend`), prefers
FlashAttention for 16-bit components on CUDA that run eagerly -- DESIGN.md §7's backend, and
measured faster there: the eager SD1.5 step 0.984x (dense) and 0.982x (packed) the time under cuDNN,
H200, session 18 -- and leaves compiled modules and everything else to PyTorch's dispatcher
("pytorch"): under torch.compile with CUDA graphs the step is GPU-bound and cuDNN's kernel is the
faster one (7.17 vs 7.91 ms a compiled step back to back, H200, session 18).
:func:`set_sdpa_backend` makes a component prefer one backend: a forward set
on the component instance (the UNet, the VAE) runs the component's own forward inside
``torch.nn.attention.sdpa_kernel`` with that backend first in priority and the others after it,
so a shape the preferred kernel cannot run (fp32 for flash, an unsupported head dim such as the
VAE's 512) falls back instead of failing.  Entered once per component call (one context per UNet
step, not one per attention call: the eager step is host-bound).  Set on a compiled UNet
explicitly, it wraps the compiled module, so the graph is traced, and its attention chosen, under
the preference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .instance_forward import InstanceForward

__all__ = ["SDPA_BACKENDS", "SDPA_CHOICES", "check_sdpa_backend", "preferred_sdpa_backend", "resolve_sdpa_backend",
           "set_sdpa_backend", "sdpa_backend_of"]

# the choices, each with the order the dispatcher tries them in
SDPA_BACKENDS = {
    "flash": (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
    "cudnn": (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
    "efficient": (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                  SDPBackend.MATH),
    "math": (SDPBackend.MATH,),
}


# what a user may name: "auto" (quantsd's choice per component), "pytorch" (the dispatcher's own), a backend
SDPA_CHOICES = ("auto", "pytorch", *SDPA_BACKENDS)


def check_sdpa_backend(backend: str | None) -> None:
    """Refuse a backend name that is none of :data:`SDPA_CHOICES` (None: "pytorch")."""
    if backend is not None and backend not in SDPA_CHOICES:
        raise ValueError(f"unknown SDPA backend {backend!r}: use {', '.join(SDPA_CHOICES)}")


def preferred_sdpa_backend(dtype: torch.dtype, device_type: str) -> str | None:
    """What "auto" prefers for an eager component computing in ``dtype`` on ``device_type``: "flash"
    for fp16/bf16 on CUDA (the only case FlashAttention runs; there the eager step is measured faster
    than under PyTorch's pick, cuDNN, on the H200), else None: PyTorch's own choice, as without
    quantsd."""
    if device_type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return "flash"
    return None


def _compiled_module_type() -> type:
    """torch.compile's wrapper class (``OptimizedModule``)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule


def resolve_sdpa_backend(module: nn.Module, backend: str | None, compiled: bool = False) -> str | None:
    """The backend ``backend`` means for ``module``: "auto" resolved by the dtype and device of the
    module's first floating-point parameter (:func:`preferred_sdpa_backend`; a module offloaded to the
    CPU at this point gets PyTorch's choice) for an eager module, and PyTorch's choice (None) for a
    compiled one (``compiled``, or a torch.compile ``OptimizedModule``); None for "pytorch" or None,
    else ``backend`` itself."""
    check_sdpa_backend(backend)
    if backend == "auto":
        if compiled or isinstance(module, _compiled_module_type()):
            return None
        param = next((p for p in module.parameters() if p.is_floating_point()), None)
        return None if param is None else preferred_sdpa_backend(param.dtype, param.device.type)
    return None if backend in (None, "pytorch") else backend


class _SDPABackendForward(InstanceForward):
    """A component's forward run inside ``sdpa_kernel(order, set_priority=True)``.  A forward already
    set on the instance (accelerate's hooks, torch.compile's ``OptimizedModule``) is kept and called
    inside."""

    def __init__(self, module: nn.Module, backend: str):
        super().__init__(module)
        self.backend = backend
        self.order = list(SDPA_BACKENDS[backend])

    def __call__(self, *args, **kwargs):
        with sdpa_kernel(self.order, set_priority=True):
            return self.call_inner(*args, **kwargs)


def set_sdpa_backend(module: nn.Module, backend: str | None, compiled: bool = False) -> None:
    """Make ``module``'s forward prefer ``backend`` ("flash", "cudnn", "efficient" or "math") for its
    SDPA calls; "auto": :func:`resolve_sdpa_backend`'s pick for it (``compiled``: it runs under
    torch.compile); None or "pytorch" gives the choice back to PyTorch's dispatcher."""
    backend = resolve_sdpa_backend(module, backend, compiled)
    _SDPABackendForward.remove(module)      # (replace, never stack)
    if backend is not None:
        _SDPABackendForward.install(module, backend)


def sdpa_backend_of(module: nn.Module) -> str:
    """The backend :func:`set_sdpa_backend` set on ``module`` ("pytorch" where none: the dispatcher's)."""
    current = _SDPABackendForward.installed(module)
    return "pytorch" if current is None else current.backend
