"""Eager packed groups' reused buffers and arming (see :mod:`quantsd.dequant_groups`).

A prehook group decodes its members' weights as its root module's forward begins, into a slot of a
:class:`_SlotPool` (one per dtype and device, shared by the model's roots), and hands them over;
:class:`_ArmingForward` is that root's forward.  :func:`trusted_weights` lets the groups check their
members' sources once per pipeline call instead of every step.  Kept apart from the grouping itself
because it is the eager hot path: every line here runs once per block and UNet step.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import TYPE_CHECKING

import torch
from torch import nn

from .instance_forward import InstanceForward

if TYPE_CHECKING:
    from .dequant_groups import DequantGroup

__all__ = ["arming_forwards", "slot_pools", "trusted_weights", "trust_weights"]


def _stream_capturing() -> bool:
    """Is a CUDA graph being captured on the current stream?"""
    return torch.cuda.is_current_stream_capturing()


# the capture query without the two Python frames around it (asked on the eager hot path); only ever
# called where the device is CUDA
_capturing_now = getattr(torch._C, "_cuda_isCurrentStreamCapturing", _stream_capturing)


class _SlotPool:
    """Reused flat buffers for the eager weights of ``prehook`` groups of one dtype and device
    (:meth:`quantsd.dequant_groups.DequantGroup.arm`).  Why: the fresh-buffer way costs, per group
    and step, an allocation and one ``as_strided`` view per member (~280 views per SD1.5 step,
    host-bound); a slot's views are made once per group and reused.

    A group takes a free slot as its root's forward begins and gives it back as it ends, so on
    one stream one slot serves every group in turn (the next decode is ordered after the last
    reader by the stream itself); a group armed while another's root is still running (nested roots)
    takes a second slot.  A slot last used on another stream is first waited for (a device sync,
    rare).  The model's own forward hook (:meth:`free`) returns the slots' memory to the caching
    allocator after every forward, keeping the views (``UntypedStorage.resize_``: the views follow
    the storage), so between UNet steps -- and during the VAE decode, a generation's memory peak --
    no slot memory is held.  Runtime state is never copied: a deep copy starts with no slots."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.numel, self.dtype, self.device = int(numel), dtype, device
        self._reset()

    def _reset(self) -> None:
        self.index = self.device.index if self.device.type == "cuda" else None   # CUDA device index
        self.trust = 0          # the current trust epoch (trusted_weights), 0: none
        self.flats: list[torch.Tensor] = []
        self.busy: list[bool] = []
        self.live: list[bool] = []          # the slot's memory is allocated (not returned by free)
        self._stream: list[int] = []

    def __getstate__(self) -> dict:
        return {"numel": self.numel, "dtype": self.dtype, "device": self.device}

    def __setstate__(self, state: dict) -> None:
        self.numel, self.dtype, self.device = state["numel"], state["dtype"], state["device"]
        self._reset()

    def resize(self, numel: int) -> None:
        """Slots of ``numel`` elements from now on: every slot (all free) is dropped, the trust kept."""
        trust = self.trust
        self.numel = int(numel)
        self._reset()
        self.trust = trust

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def acquire(self) -> int | None:
        """A free slot's index, its memory allocated (None: out of memory; the caller decodes into a
        fresh buffer, which then fails the usual way)."""
        busy = self.busy
        index = self.index
        # the common case first (one stream, no nested roots: slot 0 free, allocated, last used on this
        # stream): once per block and eager step, host-bound
        if (index is not None and busy and not busy[0] and self.live[0]
                and self._stream[0] == torch._C._cuda_getCurrentRawStream(index)):
            busy[0] = True
            return 0
        i = 0
        while i < len(busy) and busy[i]:
            i += 1
        if i == len(busy):
            try:
                self.flats.append(torch.empty(self.numel, dtype=self.dtype, device=self.device))
            except torch.OutOfMemoryError:
                return None
            busy.append(False)
            self.live.append(True)
            self._stream.append(0)
        elif not self.live[i]:
            try:
                self.flats[i].untyped_storage().resize_(self.nbytes)
            except torch.OutOfMemoryError:
                return None
            self.live[i] = True
        if self.device.type == "cuda":
            stream = torch._C._cuda_getCurrentRawStream(self.device.index)
            if self._stream[i] != stream:
                if self._stream[i]:            # readers of its last decode may still run on the other stream
                    torch.cuda.synchronize(self.device)
                self._stream[i] = stream
        busy[i] = True
        return i

    def release(self, slot: int) -> None:
        self.busy[slot] = False

    def free(self, module: nn.Module | None = None, args=None, output=None) -> None:
        """Every idle slot's memory back to the caching allocator, views kept (the model's
        always-called forward hook).  Not while a CUDA graph is being captured on this device."""
        if self.device.type == "cuda" and _capturing_now():
            return
        for i, busy in enumerate(self.busy):
            if not busy and self.live[i]:
                self.flats[i].untyped_storage().resize_(0)
                self.live[i] = False


class _ArmingForward(InstanceForward):
    """A prehook root's forward, set on the root instance (``root.forward``, an
    :class:`~quantsd.instance_forward.InstanceForward`: no hook, so ``nn.Module.__call__`` keeps its
    fast path): arm the root's groups, run the root's own forward, disarm them even if it raised
    (eager forwards only: under torch.compile the members trace the graph op).  A forward already
    set on the instance (accelerate's hooks) is kept and called inside.  The module, the groups and
    the pool are copied with a deep copy."""

    def __init__(self, module: nn.Module, groups: list[DequantGroup], pool: "_SlotPool | None" = None):
        super().__init__(module)
        self.groups = groups
        self.pool = pool

    def __call__(self, *args, **kwargs):
        # (call_inner inlined: this runs once per root and eager step)
        inner, module = self.inner, self.module
        if torch.compiler.is_compiling():
            return type(module).forward(module, *args, **kwargs) if inner is None else inner(*args, **kwargs)
        pool = self.pool
        groups = self.groups
        for g in groups:
            g.arm(pool)
        try:
            return type(module).forward(module, *args, **kwargs) if inner is None else inner(*args, **kwargs)
        finally:
            for g in groups:
                g.disarm()


def arming_forwards(module: nn.Module) -> list[_ArmingForward]:
    """The prehook roots' arming forwards below ``module`` (itself included), in module order."""
    return [f for m in module.modules() if (f := _ArmingForward.installed(m)) is not None]


def slot_pools(module: nn.Module) -> list["_SlotPool"]:
    """The slot pools whose memory ``module``'s forward hook returns after every forward."""
    hooks = getattr(module, "_forward_hooks", None) or {}
    return [h.__self__ for h in hooks.values() if isinstance(getattr(h, "__self__", None), _SlotPool)]


_TRUST_EPOCHS = itertools.count(1)


@contextlib.contextmanager
def trusted_weights(module: nn.Module):
    """Within this context, ``module``'s prehook groups check their members' codes, scale and
    breakpoint once (at their first arm) instead of at every forward: the caller promises not to
    replace or edit the packed weights in place inside it (moving or casting the model, new tables,
    :meth:`quantsd.dequant_groups.DequantGroup.invalidate` still make a group check again).
    ``quantsd generate`` runs each pipeline call inside it.

    Why: the check reads two in-place version counters and three buffer entries per member, ~280
    members a step, each cold in the cache between the blocks' own ops: on the H200 box the arms'
    checks and hand-over cost 33-36 us of host time a group where they run (session 14, run 7) --
    ~0.85 ms of a 24-29 ms eager step -- against ~8 us with the caches warm.  Nests; a deep copy
    made inside starts untrusted."""
    pools = slot_pools(module)
    before = [p.trust for p in pools]
    epoch = next(_TRUST_EPOCHS)
    for p in pools:
        p.trust = epoch
    try:
        yield module
    finally:
        for p, t in zip(pools, before):
            p.trust = t


def trust_weights(module: nn.Module, on: bool = True) -> None:
    """:func:`trusted_weights` with no end (``on=False`` ends it): for a pipeline whose weights are
    never edited while it lives (the bench's)."""
    epoch = next(_TRUST_EPOCHS) if on else 0
    for p in slot_pools(module):
        p.trust = epoch
