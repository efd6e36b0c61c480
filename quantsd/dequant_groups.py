"""Grouped dequant: one kernel launch per block of packed layers, not per layer (eager and compiled).

    from quantsd.dequant_groups import group_dequant
    group_dequant(pipe.unet)          # after the model is on the GPU in its compute dtype

Why: an eager UNet step is host-bound (the GPU waits for Python), and each packed layer's own
dequant launch adds ~15-30 us of host time (bench/launch_overhead.py) -- ~282 launches per
SD1.5 step.  A group is the value-table layers (per-tensor parameters, one or two bit widths) inside
one block (a ResNet block, a transformer, an attention...), or of consecutive children of a block
too large to be one group (``conv1`` + ``time_emb_proj``): the first of its layers that runs
rebuilds every member's dense weight in one launch (:class:`quantsd.kernels.grouped.GroupLaunch`)
and each member then takes its view.  Bits are the per-layer kernel's (same decode).

Memory: a group's buffer lives from its first member's forward until every member has taken its
weight (and at most ``max_live`` groups are held at once; an evicted group relaunches if a member
still needs it), so groups are capped at ``max_bytes`` of dense weights.  Every member call
checks which weights it takes, so any call order is correct: a member called twice before its
group is used up, or a group evicted early, simply launches again.  Each launch writes a fresh
buffer (never one a previous weight still reads), so nothing is overwritten under autograd or
on other streams.

Eager UNets grouped by :func:`group_pipeline` (generation, the bench) go one step further by
default (``prehook``; ``QUANTSD_EAGER_PREHOOK=0`` turns it off): each block decodes its group as its
forward begins (an arming forward set on the block, no hook), once, into a reused slot whose member
views were made once, and hands the members their weights; the per-member checks above are made once
per group, and every layer is in such a group (a lone layer in a group of one).  Why: the checked
way's Python per member (the capture query, the staleness test, a view per step) was most of the eager
packed step's extra host time; on the H200 the eager packed step went from 1.136x the fp16 step
(session 12) to 1.072x (session 13), 1.047x (session 14, with 256 MiB groups there) and 1.02-1.04x
(sessions 15-16; 384 MiB groups since, 0.985-0.994x the 256 MiB step).  The slots,
the arming forwards and :func:`trusted_weights` live in :mod:`quantsd.eager_slots`.

Under torch.compile a grouped member traces ``torch.ops.quantsd.dequant_group`` (the group's
flat buffer) and takes its slice by a view, so Inductor still sees an ordinary matmul/convolution
on a dense weight.  Every member traces the same call; :data:`DEDUP_PASS`, an Inductor post-grad
pass that grouping installs (``torch._inductor.config.post_grad_custom_pre_pass``), keeps the
first call of each group and points the others at it: one launch per group in the compiled graph
(and in its CUDA graph) instead of one per layer.  Why: the per-layer kernels of a compiled SD1.5
step (282) are small, and each pays a kernel's fixed cost; a group launch keeps the GPU busy.
Without Inductor (another backend) the calls stay separate: correct, each decodes its group.
"""

from __future__ import annotations

import itertools
import operator
import os
import weakref
from collections import deque

import torch
from torch import nn

from . import nn as _nn
from .kernels.grouped import flat_layout
from .eager_slots import (_ArmingForward, _capturing_now, _SlotPool, arming_forwards, slot_pools,  # noqa: F401
                          trust_weights, trusted_weights)
from .eager_runs import _RunPlanner, install_runs
from .nn import QuantConv2d, QuantLinear, QuantModule, _version_of, set_armed_calls

__all__ = ["DequantGroup", "group_dequant", "group_pipeline", "regroup_pipeline", "eager_max_bytes", "trusted_weights",
           "trust_weights", "ungroup_dequant", "launch_counts", "DEFAULT_MAX_BYTES", "EAGER_MAX_BYTES",
           "EAGER_LARGE_MAX_BYTES", "DEDUP_PASS", "install_dedup_pass"]

# Group caps (dense bytes).  Compiled graphs: 32 MiB -- a group's weights are read by the GEMMs right
# after their decode, and a larger group made the compiled step no faster on the H200 (session 7).
# Eager forwards are host-bound and each launch costs ~25-30 us of host time there
# (bench/launch_overhead.py), so eager groups are larger: 96 MiB cuts SD1.5's launches per step
# from 85 to 33, and two such buffers (at most _MAX_LIVE) stay under the VAE decode's own peak.
DEFAULT_MAX_BYTES = 32 << 20
EAGER_MAX_BYTES = 96 << 20
# Eager groups where the process may use at least LARGE_DEVICE_BYTES of the device: about half the
# launches and roots per SD1.5 step (18 instead of 34).  256 MiB (25 groups) ran at 0.968-0.983x the
# 96 MiB step with the pipelines taking turns (H200, session 14, three runs), 384 MiB at 0.985-0.994x
# the 256 MiB step (sessions 15-16, three runs), for a slot of up to 309 MiB during each UNet call (360
# MiB once the execution-order runs merge the 18 into 5, session 17); the
# 512² image's peak stays 1.16 GiB (the VAE decode's), while 512 MiB (12 groups, a 492 MiB slot) took
# it to 1.26 GiB for 0.992x.  A large slot cost the 4 GiB card's largest image 4224² -> 3840² (256 MiB,
# session 14), so smaller devices keep 96 MiB.
EAGER_LARGE_MAX_BYTES = 384 << 20
LARGE_DEVICE_BYTES = 16 << 30
_LIVE: deque = deque()      # weak references to the groups whose buffer is held, oldest first
_MAX_LIVE = 2
_REGISTRY: "weakref.WeakValueDictionary[int, DequantGroup]" = weakref.WeakValueDictionary()  # key -> group
_KEYS = itertools.count(1)


def _eligible(m: nn.Module) -> bool:
    """A layer the grouped kernel can rebuild: packed Linear/Conv2d on a device the Triton kernel
    runs on, decoded by its value table (per-tensor parameters), in a kernel dtype."""
    return (isinstance(m, (QuantLinear, QuantConv2d)) and m._lut is not None and m._plan is not None
            and m._plan.table and m._kernel_dtype_ok and m._lut.dtype == torch.float32)


def _may_capture(device: torch.device) -> bool:
    """Can work on ``device`` be captured into a CUDA graph (so a group there must check for one)?"""
    return device.type == "cuda"


class DequantGroup:
    """Packed layers whose dense weights are rebuilt together, by the first of them that runs.

    Runtime state (the launch constants, the buffer) is never copied: a deep copy or an unpickled
    group starts empty and rebuilds from its own (copied) members."""

    def __init__(self, members: list[QuantModule], channels_last: bool = False):
        self.members = members
        # which members' weights are written channels-last: with ``channels_last``, the conv weights
        # whose codes can be stored in (O, KH, KW, I) order
        self.channels_last = [channels_last and _cl_candidate(m) for m in members]
        if not members:
            raise ValueError("a group has one or more layers")
        # the flat buffer's layout, GroupLaunch's own
        self.offsets, self.numel = flat_layout([m._plan.numel for m in members])
        # those members' codes go to (O, KH, KW, I) order, and the decode (which writes every layer in
        # its codes' order) writes them channels-last; ungroup_dequant restores the natural order of
        # the ones switched here
        self.repacked = [False] * len(members)
        for k, (m, c) in enumerate(zip(members, self.channels_last)):
            if c and not m.codes_channels_last:
                m.set_codes_channels_last(True)
                self.repacked[k] = True
        self._set_views()
        self._reset()
        for i, m in enumerate(members):
            m._dq_group, m._dq_index = self, i
            m.__dict__["_arm_cell"] = self._cell
        self.launches = 0               # how many times the group was rebuilt (for tests/benchmarks)

    def _set_views(self) -> None:
        """Each member's ``_dq_view``: its slot, and (O, KH, KW, I) where its codes, hence its weight,
        are in channels-last order (from the members as they are now: a member's order may have been
        switched since grouping)."""
        for m, off in zip(self.members, self.offsets):
            m._dq_view = (off, m._plan.numel, m._codes_cl)

    def _reset(self) -> None:
        # the compiled graphs' handle (torch.ops.quantsd.dequant_group's ``group``): a copy gets its own
        self.key = next(_KEYS)
        _REGISTRY[self.key] = self
        self._launch = None
        self._signature = None
        # per member, _sources_of its buffers when the launch constants were last checked against
        # them (_ready): while every member still matches, a new buffer needs no check first
        self._checked_sources: list[tuple] | None = None
        # the members' device may capture CUDA graphs: set by _ready, so true before any buffer is held there
        self._check_capture = False
        self._flat: torch.Tensor | None = None   # the group's buffer while members still need it
        self._views: list[torch.Tensor] | None = None   # the members' weights in it (views), made with it
        self._stamp: list[int] = [0] * len(self.members)
        # per member, what its weight in the buffer was decoded from: (codes, scale, breakpoint) and
        # their in-place versions (-1: an inference tensor, which has none), made with the buffer
        self._sources: list[tuple] = [()] * len(self.members)
        self._generation = 0
        self._remaining = 0
        self._ref = weakref.ref(self)            # this group's entry in _LIVE while it holds a buffer
        self._slot: int | None = None            # the pool slot it is armed in (prehook groups)
        self._pool: _SlotPool | None = None
        self._slot_views: dict[int, tuple] = {}  # slot -> (the launch the views were made for, views)
        self._member_bufs: list[dict] | None = None    # the members' _buffers and __dict__ (_handles)
        self._member_dicts: list[dict] | None = None
        self._expected: tuple | None = None      # the slot arm's check, made from _checked_sources (_expect)
        self._trusted = 0                        # the trust epoch its sources were last checked in (trusted_weights)
        # the hand-over: every member holds this very list (``_arm_cell``, linked by the constructor and
        # again by _handles after a copy); arming puts the weights in it and disarming takes them out --
        # one store per group, not one per member (~280 a step, twice, on SD1.5's host-bound eager step)
        self._cell: list = [None]

    def __getstate__(self) -> dict:
        return {"members": self.members, "launches": self.launches, "offsets": self.offsets, "numel": self.numel,
                "channels_last": self.channels_last, "repacked": self.repacked}

    def __setstate__(self, state: dict) -> None:   # members may be half-built here (deepcopy): don't read them
        self.members = state["members"]
        self.launches = state["launches"]
        self.offsets, self.numel = state["offsets"], state["numel"]
        self.repacked = state.get("repacked", [False] * len(self.members))
        # A group pickled while the removed tile decode existed (cl_decode "tile", or older still: no
        # "repacked") wrote its channels-last members from natural-order codes, never repacked.  Now
        # every weight is written in its codes' order, so those come back NCHW: the same bits, and the
        # first _ready() (a move, a cast, an eager forward) re-derives each member's view from its
        # codes.  Regrouping (group_dequant / group_pipeline) writes them channels-last again.
        tile = state.get("cl_decode") == "tile" or "repacked" not in state
        self.channels_last = [False] * len(self.members) if tile else state["channels_last"]
        self._reset()

    @property
    def dense_bytes(self) -> int:
        return sum(_dense_bytes(m) for m in self.members)

    def invalidate(self) -> None:
        """Forget the buffer and the launch constants (a member moved, changed dtype, or got new
        codes or tables): the next request rebuilds them from the members as they are then."""
        self._release()
        self._launch = None
        self._signature = None
        self._checked_sources = None
        self._slot_views = {}
        self._trusted = 0

    def _current_signature(self) -> list | None:
        """Every member's codes and table tensors, and its dtype (the launch constants hold their
        addresses: a replaced tensor means new constants); None if one left the kernel path or the
        members are not all on one device."""
        sig = []
        device = None
        for m in self.members:
            buffers = m._buffers
            lut = buffers["_lut"]
            if lut is None or lut.dtype != torch.float32 or not m._kernel_dtype_ok:
                return None
            if m._table_source != m._params_signature():   # scales edited since the table was made
                m._refresh_lut(prepare_group=False)
                lut = buffers["_lut"]
            packed = buffers["weight_packed"]
            if device is None:
                device = packed.device
            if packed.device != device or lut.device != device:
                return None
            sig += (packed, lut, m._dtype)
        return sig

    def _same_signature(self, sig: list) -> bool:
        old = self._signature
        return old is not None and len(old) == len(sig) and all(a is b for a, b in zip(old, sig))

    def _unchanged(self) -> bool:
        """The cheap case of :meth:`_ready` (every eager materialization): each member still has the
        very codes, table and dtype the launch constants were built from (whose devices and dtypes
        were checked then) and no table is stale.  False sends :meth:`_ready` the full way."""
        old = self._signature
        if old is None:
            return False
        i = 0
        for m in self.members:
            buffers = m._buffers
            if (buffers["weight_packed"] is not old[i] or buffers["_lut"] is not old[i + 1]
                    or m._dtype is not old[i + 2] or m._table_source != m._params_signature()):
                return False
            i += 3
        return True

    def _ready(self) -> bool:
        """Are the launch constants current (rebuilt if a member's tensors changed)?  False where the
        members can't share one launch (mixed dtypes or bits, a member off the kernel path)."""
        if self._unchanged():
            return True
        sig = self._current_signature()
        if sig is None:
            return False
        if not self._same_signature(sig):
            from .kernels.grouped import GroupLaunch

            ms = self.members
            if len({m._dtype for m in ms}) != 1 or len({m.bits for m in ms}) > 2:
                return False
            self._launch = GroupLaunch([m.weight_packed for m in ms], [m._lut for m in ms],
                                       [m.weight_shape for m in ms], [m.bits for m in ms], ms[0]._dtype,
                                       codes_channels_last=[m._codes_cl is not None for m in ms])
            self._set_views()
            self._signature = sig
            self._checked_sources = None
        self._check_capture = _may_capture(sig[0].device)
        return True

    def prepare(self) -> bool:
        """Build the launch constants now if the members allow it (all moved, one dtype): called when
        a member moves or gets new tables, so that a compiled graph's first run (whose allocations
        must all be its own) finds them built.  True when ready."""
        try:
            return self._ready()
        except RuntimeError:    # no Triton here: the members fall back to their own decode
            return False

    def flat(self, dtype: torch.dtype) -> torch.Tensor:
        """A fresh flat buffer of every member's dense weight in ``dtype`` (member i at
        ``offsets[i]``): the compiled graphs' op.  One launch where the members share one; else each
        member's own decode, copied in (same bits, slower)."""
        if self._ready() and self._launch.dtype == dtype:
            return self._launch.run()
        dev = self.members[0].weight_packed.device
        out = torch.zeros(self.numel, dtype=dtype, device=dev)
        for m, o in zip(self.members, self.offsets):
            w = m.dequantized_weight(dtype)
            _, _, cl = m._dq_view
            if cl is not None:      # (O, I, KH, KW) stored in (O, KH, KW, I) order
                w = w.permute(0, 2, 3, 1)
            out.narrow(0, o, m._plan.numel).view(w.shape).copy_(w)
        return out

    def _materialize(self, check: bool = False) -> bool:
        """A new buffer.  Its launch constants are checked against every member (:meth:`_ready`)
        only with ``check`` or when no check has been recorded since they were built: otherwise each
        member compares its own buffers with the recorded ones when it takes its weight
        (:meth:`weight`), and a mismatch comes back here with ``check``.  (The per-group check was about
        a sixth of an eager packed step's extra host time on the H200 box, bench/eager_host_profile.py.)
        The constants' tensors stay referenced (``_signature``, ``_sources``), so a launch from
        outdated constants reads memory that is still allocated, and its result is never returned."""
        self._release()                    # the old buffer goes before the new one is allocated
        if (check or self._checked_sources is None or self._launch is None) and not self._check_launch():
            return False
        self._sources = self._checked_sources
        self._flat = self._launch.run()
        self._views = self._launch.views(self._flat)
        self.launches += 1
        self._generation += 1
        self._remaining = len(self.members)
        _LIVE.append(self._ref)
        while len(_LIVE) > _MAX_LIVE:
            old = _LIVE.popleft()()
            if old is not None and old is not self:
                old._release()
        return True

    def _check_launch(self) -> bool:
        """The full check before a launch: the launch constants current (:meth:`_ready`), no capture
        begun (``_ready`` may have just learnt that the device captures: a caller asked before that),
        and every member's codes, scale and breakpoint recorded as checked.  False: no launch now."""
        if not self._ready() or (self._check_capture and _capturing_now()):
            return False
        self._checked_sources = [_sources_of(m._buffers) for m in self.members]
        return True

    def _handles(self) -> tuple[list[dict], list[dict]]:
        """The members' ``_buffers`` and ``__dict__`` (the hand-over's hot loops read and write them
        directly), made at first use: a group being unpickled or deep-copied may not read its members."""
        if self._member_dicts is None:
            self._member_bufs = [m._buffers for m in self.members]
            self._member_dicts = [m.__dict__ for m in self.members]
            for d in self._member_dicts:    # (a copy's members hold a copy of the cell: link them to this one)
                d["_arm_cell"] = self._cell
        return self._member_bufs, self._member_dicts

    def _release(self) -> None:
        if self._flat is not None:
            self._flat = None
            self._views = None
            for i, r in enumerate(_LIVE):
                if r() is self:
                    del _LIVE[i]
                    break

    def weight(self, index: int) -> torch.Tensor | None:
        """Member ``index``'s dense weight (None: use the layer's own launch).

        Never while a CUDA graph is being captured: a buffer made outside the capture would be
        baked into the graph, and one made inside it must not outlive it.  (Checked on every call,
        not once per buffer: a capture may begin while a buffer is held.)

        The hot path of an eager forward (once per member, ~280 times per SD1.5 step, host-bound):
        the member's view was made with the buffer, so a call is the capture query, the staleness
        test -- are the member's codes, scale and breakpoint the very tensors, at the very in-place
        versions, the buffer was decoded from -- inline, and a list lookup."""
        if self._check_capture and _capturing_now():
            return None
        if self._views is None or self._stamp[index] == self._generation:
            if not self._materialize():
                return None
        bufs = self.members[index]._buffers
        p, vp, sc, vs, bp, vb = self._sources[index]
        q, t, c = bufs["weight_packed"], bufs["weight_scale"], bufs["weight_breakpoint"]
        if (q is not p or t is not sc or c is not bp                            # a tensor replaced
                or (vp >= 0 and q._version != vp) or (vs >= 0 and t._version != vs)   # edited in place
                or (vb >= 0 and c._version != vb)):
            if not self._materialize(check=True):
                return None
        views = self._views
        self._stamp[index] = self._generation
        w = views[index]
        self._remaining -= 1
        if self._remaining == 0:       # every member has its weight: drop the buffer with the last view
            self._release()
        return w


    def arm(self, pool: "_SlotPool | None" = None) -> None:
        """Decode now and hand every member its weight as a plain attribute (``_armed``), which its
        eager forward takes with no check of its own: called as the group's root module's forward
        begins (:class:`_ArmingForward`, ``group_dequant(..., prehook=True)``).  The checks
        :meth:`weight` makes per member are made here once: no capture (none can begin between this
        call and the root's own layers), and
        each member's codes, scale and breakpoint still the ones the buffer is decoded from.  Where
        a check fails nothing is handed over and the members take the checked path.

        With ``pool`` and autograd off (a pipeline's ``__call__``), the decode goes into one of the
        pool's reused buffers, whose member views were made once (:class:`_SlotPool`): no allocation
        and no view per member in the step.  With autograd on, a fresh buffer as :meth:`weight`
        makes: a weight saved for backward must never be overwritten by a later group's decode."""
        if self._check_capture and _capturing_now():
            return
        if pool is not None and not torch.is_grad_enabled() and self._arm_in_slot(pool):
            return
        if not self._materialize():
            return
        for m, src in zip(self.members, self._sources):
            if not _same_sources(m._buffers, src):
                if not self._materialize(check=True):
                    return
                break
        self._handles()
        self._cell[0] = self._views

    def _expect(self) -> tuple:
        """The slot arm's check, made once from ``_checked_sources``: (those sources, every member's
        codes, scale and breakpoint in order, the scales and breakpoints that have in-place versions,
        those versions).  The codes' versions are not in it: every arm decodes the codes as they are
        (the kernel reads them in place); only the scale and breakpoint feed a derived copy, the value
        table."""
        src = self._checked_sources
        exp = self._expected
        if exp is None or exp[0] is not src:
            tensors, versioned, versions = [], [], []
            for p, _, sc, vs, bp, vb in src:
                tensors += (p, sc, bp)
                for t, v in ((sc, vs), (bp, vb)):
                    if v >= 0:
                        versioned.append(t)
                        versions.append(v)
            exp = self._expected = (src, tensors, versioned, versions)
        return exp

    def _arm_in_slot(self, pool: "_SlotPool") -> bool:
        """:meth:`arm` into a pool slot: the full check (:meth:`_check_launch`) where none is recorded,
        every member's sources compared with the recorded ones (a mismatch: the full check again),
        then one launch into the slot and the slot's views handed over.  False: not armed (the caller
        takes the fresh-buffer way, which reports the reason by not arming either).

        Once per group and eager step, on the host-bound path: the comparison runs in C iterators
        (``map``/``operator``), not a Python loop over the members -- the loop was the largest item
        of the prehook step's extra host time (H200 profile, session 13)."""
        if (self._checked_sources is None or self._launch is None) and not self._check_launch():
            return False
        bufs = self._handles()[0]
        trust = pool.trust
        if not trust or self._trusted != trust:    # (trusted_weights: checked once per epoch)
            _, tensors, versioned, versions = self._expect()
            if not (all(map(operator.is_, itertools.chain.from_iterable(map(_MEMBER_SOURCES, bufs)), tensors))
                    and list(map(_VERSION, versioned)) == versions):
                if not self._check_launch():
                    return False
            self._trusted = trust
        launch = self._launch
        # (the members cast or moved since grouping: their launch no longer fits the pool's buffers)
        if launch.dtype is not pool.dtype or self.numel > pool.numel or launch.device != pool.device:
            return False
        slot = pool.acquire()
        if slot is None:
            return False
        flat = pool.flats[slot]
        if pool.index is None or pool.index == torch._C._cuda_getDevice():
            launch.run_into(flat)    # (a slot of this pool: of the launch's dtype and device, large enough)
        else:
            launch.run(flat)         # (makes the weights' device current)
        cached = self._slot_views.get(slot)
        if cached is None or cached[0] is not launch:
            cached = self._slot_views[slot] = (launch, launch.views(flat))
        self._sources = self._checked_sources
        self._slot = slot
        self._pool = pool
        self.launches += 1
        self._cell[0] = cached[1]
        return True

    def disarm(self) -> None:
        """Called as the root's forward ends (even when it raised, :class:`_ArmingForward`): the
        members' handed-over weights are taken back and the buffer (or pool slot) is let go."""
        self._cell[0] = None
        if self._slot is not None:
            self._pool.release(self._slot)
            self._slot = None
        if self._flat is not None:      # a fresh buffer: this arm's, or one a checked call left held
            self._release()


_MEMBER_SOURCES = operator.itemgetter("weight_packed", "weight_scale", "weight_breakpoint")
_VERSION = operator.attrgetter("_version")


def _same_sources(buffers: dict, src: tuple) -> bool:
    """Are a member's codes, scale and breakpoint the very tensors (and in-place versions) in
    ``src`` (:func:`_sources_of`)?  (:meth:`DequantGroup.weight` makes the same test inline, on the
    eager hot path where a call costs; change both together.)"""
    p, vp, sc, vs, bp, vb = src
    q, t, c = buffers["weight_packed"], buffers["weight_scale"], buffers["weight_breakpoint"]
    return (q is p and t is sc and c is bp and (vp < 0 or q._version == vp) and (vs < 0 or t._version == vs)
            and (vb < 0 or c._version == vb))


def _sources_of(buffers: dict) -> tuple:
    """(codes, version, scale, version, breakpoint, version) of a member's buffers (version -1 for
    an inference tensor or no breakpoint: never compared)."""
    p, s, b = buffers["weight_packed"], buffers["weight_scale"], buffers["weight_breakpoint"]
    return (p, _version_of(p), s, _version_of(s), b, -1 if b is None else _version_of(b))


def _dense_bytes(m: QuantModule) -> int:
    return m._plan.numel * m._compute_dtype_ref.element_size()


def group_dequant(module: nn.Module, max_bytes: int = DEFAULT_MAX_BYTES, *, mixed_bits: bool = True,
                  channels_last: bool = False, prehook: bool = False, runs: bool = False,
                  armed_calls: bool = True) -> list[DequantGroup]:
    """Group the packed layers below ``module`` for eager forwards; returns the groups.

    A group root is the largest non-container module (not a ModuleList/ModuleDict, whose children
    may run interleaved) whose eligible layers hold at most ``max_bytes`` of dense weights; its
    eligible layers form one group per dtype -- layers of two bit widths share it (one kernel
    launch decodes both; ``mixed_bits=False``, or three or more widths in one root: one group per
    width) -- and a layer larger than ``max_bytes`` is a root of its own, so it keeps its own
    launch.  Inside a module too large to be a root (a ResNet block with a 28 MiB conv, say),
    consecutive children that are roots are taken together, and their layers of one kind are packed
    in order into groups of at most ``max_bytes`` -- so a small layer beside a large one (``conv1``
    + ``time_emb_proj``, ``conv2`` + ``conv_shortcut``) shares a launch instead of making its own.  Only consecutive children (no split child between them) are
    packed together: they run close together, so a group's buffer is not held across other groups.
    Call again after moving or casting the module (groups check and rebuild themselves, but the
    split by dtype is made here).  Layers in no group keep their own launch.

    ``channels_last``: write k x k conv weights channels-last (views with channels-last strides),
    for a model that torch.compile will run: Inductor runs SD's convolutions channels-last and
    would otherwise copy each NCHW weight to channels-last on every call (0.79 ms of a 7.07 ms
    SD1.5 step on an H200, bench/conv_layout_probe.py).  Their codes are stored in (O, KH, KW, I)
    order (:meth:`quantsd.nn.QuantModule.set_codes_channels_last`: k > 1, groups=1, per-tensor or
    per-channel scales -- any input channel count, SD's 4-channel ``conv_in`` included) and the
    decode writes them so, at its own speed; :func:`ungroup_dequant` (and regrouping) puts the codes
    back in natural order.  A conv layer that would be alone then gets a group of its own (same one
    launch, written channels-last).  Eager convolutions given such a weight run channels-last too
    (cuDNN follows the weight), so eager models keep the default.

    ``prehook`` (eager; :func:`group_pipeline`'s default for eager UNets): a group whose layers all
    sit below one root module decodes as that root's forward begins (the root's forward is wrapped on
    the instance, :class:`_ArmingForward`: no hook, so ``nn.Module.__call__`` keeps its fast path) and
    hands each member its weight as a plain attribute, taken back as the forward ends, even if it
    raises (:meth:`DequantGroup.arm`); members then skip the per-call checks of :meth:`DequantGroup.weight`,
    which are made once per group instead.  With autograd off the decode goes into a reused slot of
    a pool shared by the model's roots, whose member views were made once (:class:`_SlotPool`; its
    memory is returned after every forward of ``module``).  Every root gets groups of its own (sibling
    roots are not taken together), a layer alone in its root included (a group of one), so no layer
    keeps the checked path or its own launch; members called outside their root's forward take the
    checked path.  Same weights, fewer host instructions per eager step: 0.95x the checked groups'
    UNet step on the H200 (session 13).

    ``runs`` (with ``prehook``): after the first eager forward, the roots that ran one after the other
    share one group while their layers fit ``max_bytes``, armed by the first and taken back by the
    last (:mod:`quantsd.eager_runs`): fewer launches and arms per step.

    ``armed_calls`` (with ``prehook``; default on): the members take the armed call
    (:func:`quantsd.nn.set_armed_calls`): an armed member's call goes straight to its op, without
    ``nn.Module.__call__`` and the forward; :func:`ungroup_dequant` takes it back."""
    _refuse_cl_decode_env()
    ungroup_dequant(module)
    totals: dict[int, int] = {}

    def total(mod: nn.Module) -> int:
        if id(mod) not in totals:
            own = _dense_bytes(mod) if _eligible(mod) else 0
            totals[id(mod)] = own + sum(total(c) for c in mod.children())
        return totals[id(mod)]

    def is_container(mod: nn.Module) -> bool:   # its children may run interleaved
        return isinstance(mod, (nn.ModuleList, nn.ModuleDict))

    def is_root(mod: nn.Module) -> bool:
        return 0 < total(mod) <= max_bytes and not is_container(mod)

    merge_in_order = runs and prehook
    root_runs: list[list[nn.Module]] = []   # roots taken together (one, or consecutive siblings)

    def visit(mod: nn.Module) -> None:
        if total(mod) == 0:
            return
        if is_root(mod) or (channels_last and _eligible(mod) and _cl_candidate(mod)):
            root_runs.append([mod])    # (a conv larger than max_bytes: a group of its own, written channels-last)
            return
        container = is_container(mod)
        run: list[nn.Module] = []
        for c in mod.children():
            if total(c) == 0:
                continue
            if is_root(c) and not container:
                run.append(c)
                continue
            if run:
                root_runs.append(run)
                run = []
            visit(c)
        if run:
            root_runs.append(run)

    visit(module)
    if prehook:
        # every root its own run, so that each group is armed by its own root's forward: a group of
        # several sibling roots would take the checked path, and siblings need not run in module
        # order (SD's conv_in runs after time_embedding)
        root_runs = [[root] for run in root_runs for root in run]
    groups: list[DequantGroup] = []
    hooked: list[tuple[nn.Module, list[DequantGroup]]] = []   # (root, its groups) of prehook roots
    for run in root_runs:
        first = len(groups)
        by_kind: dict[tuple, list[QuantModule]] = {}
        for root in run:
            for m in root.modules():
                if _eligible(m):
                    by_kind.setdefault((m._dtype, m.weight_packed.device), []).append(m)
        split: dict[tuple, list[QuantModule]] = {}
        for kind, ms in by_kind.items():     # one launch decodes at most two widths
            widths = sorted({m.bits for m in ms})
            if mixed_bits and len(widths) <= 2:
                split[kind] = ms
            else:
                split.update({kind + (b,): [m for m in ms if m.bits == b] for b in widths})
        for layers in split.values():
            for members in _packed_under(layers, max_bytes):
                # (a layer alone in its root: a group of one where its root arms it -- one launch into
                # the slot instead of the layer's own checked launch -- or channels-last; else its own)
                if len(members) < 2 and not (prehook or (channels_last and _cl_candidate(members[0]))):
                    continue
                g = DequantGroup(members, channels_last=channels_last)
                # the launch constants now, outside any CUDA-graph pool: built lazily inside a compiled
                # graph's first (warm-up) run they would be allocations the graph does not own
                g._ready()
                groups.append(g)
        if prehook and len(run) == 1 and len(groups) > first:   # one root holds these groups' layers
            hooked.append((run[0], groups[first:]))
    if hooked and armed_calls:
        for _, gs in hooked:
            for g in gs:
                for m in g.members:
                    set_armed_calls(m, True)
    if hooked:
        # one slot pool per dtype and device, sized to its largest group (the roots' groups share it)
        sizes: dict[tuple, int] = {}
        for _, gs in hooked:
            for g in gs:
                key = _pool_key(g)
                sizes[key] = max(sizes.get(key, 0), g.numel)
        pools = {key: _SlotPool(numel, *key) for key, numel in sizes.items()}
        learning: dict[tuple, list] = {}     # runs: the roots whose groups may merge, per pool
        for root, gs in hooked:
            keys = {_pool_key(g) for g in gs}
            if merge_in_order and len(keys) == 1:
                learning.setdefault(next(iter(keys)), []).append((root, gs))
            else:
                _ArmingForward.install(root, gs, pools[keys.pop()] if len(keys) == 1 else None)
        for key, roots in learning.items():
            install_runs(module, roots, pools[key], max_bytes)
        for pool in pools.values():     # a hook: runs after the forward of ``module`` (a root itself, maybe) disarmed
            module.register_forward_hook(pool.free, always_call=True)
    if groups:
        install_dedup_pass()   # compiled graphs: one launch per group (see the module docstring)
    return groups


def _pool_key(g: DequantGroup) -> tuple:
    """(dtype, device) of a group's weights when grouped: its slot pool's."""
    m = g.members[0]
    return m._dtype, m.weight_packed.device


def _cl_candidate(m: QuantModule) -> bool:
    """A layer whose weight a group can write channels-last: one whose codes can be stored in
    (O, KH, KW, I) order (a k x k conv, k > 1, groups=1, per-tensor or per-channel scales)."""
    return m.codes_channels_last_refusal() is None


def _refuse_cl_decode_env() -> None:
    """``QUANTSD_CL_DECODE`` chose between two channels-last decodes until the tile decode was
    removed (quantsd 0.1, session 12): refused rather than ignored, so that a run still asking for
    ``tile`` is not silently measured on the codes path."""
    value = os.environ.get("QUANTSD_CL_DECODE", "").strip()
    if value not in ("", "codes"):
        raise ValueError(f"QUANTSD_CL_DECODE={value!r}: the tile decode was removed (quantsd 0.1, session 12); "
                         "channels-last conv weights are always decoded from codes stored channels-last. "
                         "Unset QUANTSD_CL_DECODE (QUANTSD_DECODE_CHANNELS_LAST=0 decodes NCHW)")


def _packed_under(layers: list[QuantModule], max_bytes: int) -> list[list[QuantModule]]:
    """``layers`` (in order) cut into consecutive runs of at most ``max_bytes`` of dense weights."""
    out: list[list[QuantModule]] = []
    size = 0
    for m in layers:
        b = _dense_bytes(m)
        if not out or size + b > max_bytes:
            out.append([])
            size = 0
        out[-1].append(m)
        size += b
    return out


def ungroup_dequant(module: nn.Module) -> None:
    """Every packed layer below ``module`` back to its own launch, and its codes back to natural
    order where its group switched them (the codes path of ``channels_last``); the roots' hooks of
    ``prehook`` groups lose their arming forwards and the pools' hooks are removed (found by kind, so
    a deep copy's are too)."""
    for m in module.modules():
        _ArmingForward.remove(m)
        hooks = m._forward_hooks
        for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), (_SlotPool, _RunPlanner))]:
            del hooks[key]
            m._forward_hooks_always_called.pop(key, None)
        set_armed_calls(m, False)
        group = getattr(m, "_dq_group", None) if isinstance(m, QuantModule) else None
        if group is not None:
            group.invalidate()
            m.__dict__.pop("_arm_cell", None)
            m._dq_group = None
            if group.repacked[m._dq_index]:
                m.set_codes_channels_last(False)


def launch_counts(module: nn.Module) -> dict:
    """Dequant launches one forward of ``module`` makes: its groups, its packed Linear/Conv2d layers
    in no group (one launch each), and the sum (layers kept dense make none)."""
    layers = [m for m in module.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    groups = {id(m._dq_group) for m in layers if m._dq_group is not None}
    lone = sum(m._dq_group is None for m in layers)
    return {"groups": len(groups), "lone_layers": lone, "launches": len(groups) + lone}


def eager_max_bytes(device: torch.device) -> int:
    """The eager group cap for ``device``: :data:`EAGER_LARGE_MAX_BYTES` where this process may use
    at least :data:`LARGE_DEVICE_BYTES` of it (its memory times the per-process fraction, which
    ``torch.cuda.set_per_process_memory_fraction`` lowers), else :data:`EAGER_MAX_BYTES` -- fewer,
    larger groups are faster, and a small card's memory is better spent on the image."""
    if device.type != "cuda":
        return EAGER_MAX_BYTES
    usable = torch.cuda.get_device_properties(device).total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:
        usable *= fraction(device)
    return EAGER_LARGE_MAX_BYTES if usable >= LARGE_DEVICE_BYTES else EAGER_MAX_BYTES


def group_pipeline(pipe, max_bytes: int | None = None, *, compiled: bool = True, prehook: bool | None = None,
                   runs: bool | None = None, armed_calls: bool | None = None) -> int:
    """:func:`group_dequant` on a diffusers pipeline's UNet; returns how many groups were made (0
    where no layer runs the Triton kernel, e.g. on the CPU).  ``max_bytes`` None: the environment's
    ``QUANTSD_GROUP_MAX_MIB`` (MiB, for experiments), else :data:`DEFAULT_MAX_BYTES` for a UNet that
    will be compiled and :func:`eager_max_bytes` of the UNet's device for one that runs eager
    (``compiled=False``).  The arguments are kept on the UNet, so :func:`regroup_pipeline` can make
    the same choice again after the memory the process may use has changed.

    Only the UNet: it runs once per step, the text encoder and the VAE once per image (a few ms of
    launches), and the VAE decode is a generation's memory peak, which a group's buffer would raise.

    A UNet that will be compiled gets its k x k conv weights written channels-last (see
    :func:`group_dequant`); ``QUANTSD_DECODE_CHANNELS_LAST=0`` / ``1`` overrides that.  An eager one
    gets ``prehook`` groups decoding into reused slots (``prehook`` None: on unless
    ``QUANTSD_EAGER_PREHOOK=0``): on the H200 the eager packed step took 0.95x the time of checked
    groups, the pipelines taking turns (BENCHMARKS.md, session 13).  ``runs`` (eager prehook groups;
    None: ``QUANTSD_EAGER_RUNS=1``, off by default until measured): the roots merged in execution order
    after the first forward (:mod:`quantsd.eager_runs`; SD1.5 at 384 MiB: 18 -> 5 groups).
    ``armed_calls`` (eager prehook groups; None: on unless ``QUANTSD_EAGER_ARMED_CALLS=0``): armed
    members' calls go straight to their op (:func:`quantsd.nn.set_armed_calls`)."""
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        return 0
    from_device = False        # the cap chosen from the device's memory (regroup_pipeline may redo it)
    if max_bytes is None:
        env = os.environ.get("QUANTSD_GROUP_MAX_MIB", "").strip()
        try:
            max_bytes = int(float(env) * (1 << 20)) if env else None
        except ValueError:
            raise ValueError(f"QUANTSD_GROUP_MAX_MIB must be a number of MiB, got {env!r}") from None
        if max_bytes is None:
            from_device = not compiled
            max_bytes = eager_max_bytes(_device_of(unet)) if from_device else DEFAULT_MAX_BYTES
    channels_last = _env_flag("QUANTSD_DECODE_CHANNELS_LAST", default=compiled)
    prehook_on = not compiled and (_env_flag("QUANTSD_EAGER_PREHOOK", default=True) if prehook is None else prehook)
    runs_on = prehook_on and (_env_flag("QUANTSD_EAGER_RUNS", default=True) if runs is None else runs)
    calls_on = prehook_on and (_env_flag("QUANTSD_EAGER_ARMED_CALLS", default=True) if armed_calls is None
                               else armed_calls)
    groups = group_dequant(unet, max_bytes, channels_last=channels_last, prehook=prehook_on, runs=runs_on,
                           armed_calls=calls_on)
    unet.__dict__["_quantsd_grouping"] = {"prehook": prehook, "runs": runs, "armed_calls": armed_calls,
                                          "max_bytes": max_bytes} if from_device else None
    return len(groups)


def regroup_pipeline(pipe) -> bool:
    """Group an eager UNet again when :func:`group_pipeline` chose its cap from the device's memory
    (:func:`eager_max_bytes`) and that choice has changed since -- after
    ``torch.cuda.set_per_process_memory_fraction`` changed what the process may use (the bench's
    maximum-resolution search emulates a smaller card this way).  True if it regrouped.  A cap that
    was given, and a UNet grouped for compiling (whose graphs hold its groups), are left alone."""
    unet = getattr(pipe, "unet", None)
    args = getattr(unet, "__dict__", {}).get("_quantsd_grouping")
    if args is None or eager_max_bytes(_device_of(unet)) == args["max_bytes"]:
        return False
    trust = max((p.trust for p in slot_pools(unet)), default=0)
    group_pipeline(pipe, compiled=False, prehook=args["prehook"], runs=args.get("runs"),
                   armed_calls=args.get("armed_calls"))
    for p in slot_pools(unet):      # (the new pools keep a trust the old ones had: trust_weights)
        p.trust = trust
    return True


def _device_of(module: nn.Module) -> torch.device:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def _env_flag(name: str, default: bool = False) -> bool:
    """An on/off environment setting: "0" off, "1" on, unset or "" ``default``; anything else is refused."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return default if value == "" else value == "1"


# --------------------------------------------------------------------------- compiled graphs
def _lookup(key: int) -> DequantGroup:
    group = _REGISTRY.get(key)
    if group is None:
        raise RuntimeError(f"dequant group {key} no longer exists (its model was freed or regrouped after "
                           "compiling): compile the model again")
    return group


def _register_op():
    @torch.library.custom_op("quantsd::dequant_group", mutates_args=())
    def _op(anchors: list[torch.Tensor], group: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Group ``group``'s flat buffer of dense weights.  ``anchors``: the members' codes and tables
        (each member traces its own; :func:`_dedup_group_calls` merges them into one call), inputs
        so that torch.compile and CUDA graphs track them; the kernel reads the group's members."""
        return _lookup(group).flat(dtype)

    @_op.register_fake
    def _(anchors, group, numel, dtype):
        return anchors[0].new_empty(numel, dtype=dtype)

    return _op


GROUP_OP = _register_op()   # at import: registering inside a traced region would break the graph
_nn._GROUP_OP = GROUP_OP


def _dedup_group_calls(graph: torch.fx.Graph) -> int:
    """One ``quantsd::dequant_group`` call per (group, numel, dtype) in ``graph``: the first call
    takes every later call's tensor inputs (deduplicated) and the later calls' users read its
    output; returns how many calls were removed.  A later call whose inputs are not all defined
    before the first call (never the case for module buffers, which are graph inputs) stays as is."""
    target = torch.ops.quantsd.dequant_group.default
    order = {node: i for i, node in enumerate(graph.nodes)}
    first: dict = {}
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not target:
            continue
        args = dict(zip(("anchors", "group", "numel", "dtype"), node.args), **node.kwargs)
        key = (args["group"], args["numel"], args["dtype"])
        kept = first.setdefault(key, node)
        if kept is node:
            continue
        anchors = list(args["anchors"])
        if any(isinstance(a, torch.fx.Node) and order[a] > order[kept] for a in anchors):
            continue
        kept_args = dict(zip(("anchors", "group", "numel", "dtype"), kept.args), **kept.kwargs)
        merged = list(kept_args["anchors"])
        merged += [a for a in anchors if a not in merged]
        kept.args, kept.kwargs = (merged, kept_args["group"], kept_args["numel"], kept_args["dtype"]), {}
        node.replace_all_uses_with(kept)
        graph.erase_node(node)
        removed += 1
    return removed


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass as _PassBase
except ImportError:   # pragma: no cover - older torch: a plain callable (FX graph cache then bypassed)
    _PassBase = object


class _DedupGroupDequant(_PassBase):
    """Inductor post-grad pass: :func:`_dedup_group_calls`, then whatever pass was installed before."""

    def __init__(self, then=None):
        self.then = then

    def __call__(self, graph: torch.fx.Graph) -> None:
        _dedup_group_calls(graph)
        if self.then is not None:
            self.then(graph)

    def uuid(self):
        then = None if self.then is None else getattr(self.then, "uuid", lambda: repr(self.then))()
        return ("quantsd.dedup_group_dequant.v1", then)


DEDUP_PASS = _DedupGroupDequant()


def install_dedup_pass() -> None:
    """Make every later Inductor compile in this process run :data:`DEDUP_PASS` (idempotent; a pass
    already installed by someone else keeps running after ours).  Grouping calls this."""
    import torch._inductor.config as inductor_config

    current = inductor_config.post_grad_custom_pre_pass
    if current is DEDUP_PASS or isinstance(current, _DedupGroupDequant):
        return
    inductor_config.post_grad_custom_pre_pass = DEDUP_PASS if current is None else _DedupGroupDequant(current)
