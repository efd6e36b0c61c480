"""Eager groups formed in execution order (``group_dequant(..., runs=True)``; the default of
:func:`quantsd.dequant_groups.group_pipeline`, ``QUANTSD_EAGER_RUNS=0`` turns it off).

A prehook group is armed by one root module (:mod:`quantsd.eager_slots`): a module whose packed
layers all fit the group cap.  SD1.5's ``up_blocks.1`` holds 590 MiB, too much for one root at the
384 MiB cap, and its resnets and attentions sit in two ModuleLists whose members run interleaved
(resnet 0, attention 0, resnet 1 ...), so it ends up as 8 roots of 28-93 MiB; the top-level blocks
are roots of their own too: 18 groups a step.  Each group armed costs ~30-35 us of host time where
it runs (H200, session 16), on a host-bound eager step.

Here the first eager forward only records the order in which the roots run; as it ends, consecutive
roots (in that order) are merged while their layers fit the cap: one group per run, decoded as the
run's first root begins (:class:`_RunStart`) and taken back as its last root ends
(:class:`_RunEnd`); the roots between run with their weights already handed over.  For SD1.5 at
384 MiB: 18 -> 5 groups, the largest 360 MiB instead of 309, the 512² peak unchanged; on the H200
the eager step took 0.980-0.985x the time of one group per root, the pipelines taking turns
(BENCHMARKS.md, session 17).  A run group is correct
whatever order the roots run in later (it holds its slot, so nothing overwrites its weights, until
its last root ends or the model's forward does, :class:`_RunPlanner`): order only decides whether
members find their weights handed over or take the checked path.
"""

from __future__ import annotations

import torch
from torch import nn

from .eager_slots import _ArmingForward, _SlotPool

__all__ = ["install_runs"]


class _RunLearner(_ArmingForward):
    """A root's arming forward during the first eager forward: also records that the root ran."""

    def __init__(self, module: nn.Module, groups: list, pool: _SlotPool | None, log: list):
        super().__init__(module, groups, pool)
        self.log = log

    def __call__(self, *args, **kwargs):
        if not torch.compiler.is_compiling():
            self.log.append(self)
        return super().__call__(*args, **kwargs)


class _RunStart(_ArmingForward):
    """A run's first root: arms the run's group as its forward begins (a group left armed by a forward
    that raised is disarmed first); the run's last root disarms it."""

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.call_inner(*args, **kwargs)
        for g in self.groups:
            if g._slot is not None or g._flat is not None:
                g.disarm()
            g.arm(self.pool)
        try:
            return self.call_inner(*args, **kwargs)
        except BaseException:
            for g in self.groups:
                g.disarm()
            raise


class _RunEnd(_ArmingForward):
    """A run's last root: takes the run's group back as its forward ends, even if it raised."""

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.call_inner(*args, **kwargs)
        try:
            return self.call_inner(*args, **kwargs)
        finally:
            for g in self.groups:
                g.disarm()


class _RunPlanner:
    """The model's always-called forward hook (:meth:`after_forward`): after the first eager forward
    that ran every root once, merges the roots into runs (:meth:`_merge`; a root run twice in a
    forward, or three forwards that skipped one, keep one group per root); after that, disarms any
    run group a forward that raised left armed (before the slot pool's own hook returns the slots'
    memory)."""

    def __init__(self, learners: list[_RunLearner], pool: _SlotPool, max_bytes: int):
        self.learners = learners
        self.pool = pool
        self.max_bytes = max_bytes
        self.log: list[_RunLearner] = learners[0].log if learners else []
        self.groups: list = []          # the run groups, once planned
        self.planned = False
        self.tries = 3                  # forwards that may skip a root (a branch not taken, an error)

    def after_forward(self, module: nn.Module | None = None, args=None, output=None) -> None:
        for g in self.groups:
            if g._slot is not None or g._flat is not None:
                g.disarm()
        if self.planned:
            return
        log = list(self.log)
        self.log.clear()
        if not log:
            return                      # (a compiled or interrupted forward: learn from the next)
        ran = {id(a) for a in log}
        if len(ran) < len(log):         # a root ran twice in one forward: keep one group per root
            self._settle([[a] for a in self.learners])
        elif len(ran) == len(self.learners):
            self._merge(log)
        else:                           # some root did not run: learn from the next forward, a few times
            self.tries -= 1
            if self.tries <= 0:
                self._settle([[a] for a in self.learners])

    def _merge(self, order: list[_RunLearner]) -> None:
        runs: list[list[_RunLearner]] = []
        size, widths = 0, set()
        for a in order:
            g = a.groups[0] if len(a.groups) == 1 else None
            nbytes, bits = (g.dense_bytes, {m.bits for m in g.members}) if g is not None else (0, set())
            # (a root of several groups, or one after it, starts a run of its own)
            if (g is not None and runs and len(runs[-1][-1].groups) == 1 and size + nbytes <= self.max_bytes
                    and len(widths | bits) <= 2):
                runs[-1].append(a)
                size, widths = size + nbytes, widths | bits
            else:
                runs.append([a])
                size, widths = nbytes, bits
        self._settle(runs)

    def _settle(self, runs: list[list[_RunLearner]]) -> None:
        from .dequant_groups import DequantGroup

        pool = self.pool
        run_groups, largest = [], 0
        for run in runs:
            if len(run) == 1:
                a = run[0]
                _ArmingForward.remove(a.module)
                _ArmingForward.install(a.module, a.groups, a.pool)
                largest = max([largest] + [g.numel for g in a.groups if a.pool is pool])
                continue
            members = [m for a in run for m in a.groups[0].members]
            for a in run:
                a.groups[0].invalidate()
                _ArmingForward.remove(a.module)
            g = DequantGroup(members)
            g._ready()
            run_groups.append(g)
            largest = max(largest, g.numel)
            _RunStart.install(run[0].module, [g], pool)
            _RunEnd.install(run[-1].module, [g], pool)
        # the pool's slots (all free: this runs as the forward ends) are made again at the new size,
        # on the same pool object: trusted_weights restores the trust on the objects it saw
        pool.resize(max(largest, pool.numel))
        for a in self.learners:
            for g in a.groups:
                g._slot_views = {}
        self.groups = run_groups
        self.learners = []
        self.planned = True


def install_runs(model: nn.Module, hooked: list[tuple[nn.Module, list]], pool: _SlotPool, max_bytes: int) -> None:
    """Learning arming forwards on every root of ``hooked`` ((root, its groups), all of ``pool``) and
    the planner hook on ``model``, run before the pool's own (``prepend``)."""
    log: list = []
    learners = [_RunLearner.install(root, gs, pool, log) for root, gs in hooked]
    planner = _RunPlanner(learners, pool, max_bytes)
    model.register_forward_hook(planner.after_forward, always_call=True, prepend=True)
