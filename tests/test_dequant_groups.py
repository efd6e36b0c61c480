"""Grouped eager dequant (quantsd.dequant_groups): one launch per block of packed layers.

The kernel runs on the CPU only under the Triton interpreter, so the checks run in a subprocess
with TRITON_INTERPRET=1 (the variable must not leak into this process).  They compare against
the per-layer path bit for bit, and check the bookkeeping that keeps any call order correct
and the memory bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def _run_interpreted(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python with the Triton interpreter on and no GPU (the variable must
    not leak into this process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)

_SCRIPT = textwrap.dedent("""
    import torch
    from torch import nn
    from quantsd import dequant_groups as DG
    from quantsd.nn import QuantConv2d, QuantLinear, packed_modules
    from quantsd.quant import quantize_tensor

    torch.manual_seed(0)

    def qlin(i, o, bits, gran="tensor"):
        l = nn.Linear(i, o)
        return QuantLinear.from_linear(l, quantize_tensor(l.weight.detach(), bits, "pwlq", gran))

    def qconv(i, o, bits):
        c = nn.Conv2d(i, o, 3, padding=1)
        return QuantConv2d.from_conv(c, quantize_tensor(c.weight.detach(), bits, "pwlq", "tensor"))

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.conv2 = qconv(c, c, 4), qconv(c, c, 4)
            self.q, self.k, self.v = qlin(c, c, 8), qlin(c, c, 8), qlin(c, c, 4)
            self.chan = qlin(c, c, 8, "channel")           # per-channel: not groupable (own launch)
        def forward(self, x):
            x = self.conv2(torch.relu(self.conv1(x)))
            t = x.flatten(2).transpose(1, 2)
            t = self.q(t) + self.k(t) * 0.5 + self.v(t) + self.chan(t)
            return t.transpose(1, 2).reshape(x.shape)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(8), Block(8)])
            self.head = qlin(8, 8, 8)
        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.head(x.mean((2, 3)))

    net = Net().half().eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float16)
    with torch.no_grad():
        ref = net(x)
        # the default: layers of two bit widths share a group (one launch decodes both) -- per block
        # conv1, conv2, q, k, v in one group; the per-channel layer and the head alone
        mixed = DG.group_dequant(net, max_bytes=4096)
        assert sorted(len(g.members) for g in mixed) == [5, 5] and all({m.bits for m in g.members} == {4, 8} for g in mixed)
        assert torch.equal(net(x), ref) and [g.launches for g in mixed] == [1, 1]
        assert sorted(len(g.members) for g in DG.group_dequant(net)) == [11] and torch.equal(net(x), ref)
        # three widths in one root: one group per width (a launch decodes at most two)
        three = nn.Sequential(qlin(8, 8, 2), qlin(8, 8, 4), qlin(8, 8, 8), qlin(8, 8, 4), qlin(8, 8, 2)).half()
        assert sorted(sorted({m.bits for m in g.members}) for g in DG.group_dequant(three)) == [[2], [4]]
        # below, the rules with one bit width per group (mixed_bits=False)
        _group_dequant = DG.group_dequant
        DG.group_dequant = lambda m, max_bytes=DG.DEFAULT_MAX_BYTES: _group_dequant(m, max_bytes, mixed_bits=False)
        # the whole (small) net is one root: one group per bit width, spanning the blocks
        whole = DG.group_dequant(net)
        assert sorted(len(g.members) for g in whole) == [5, 6] and torch.equal(net(x), ref)
        # with a cap below the net's size the roots are the blocks (a ModuleList is never a root:
        # its children may run interleaved)
        groups = DG.group_dequant(net, max_bytes=4096)
        # per block: the 4-bit convs + the 4-bit v in one group, the two 8-bit linears in another;
        # the per-channel layer and the lone head layer keep their own launches; no group spans blocks
        assert len(groups) == 4, [[type(m).__name__ for m in g.members] for g in groups]
        blocks = list(net.blocks)
        for g in groups:
            owners = {i for i, b in enumerate(blocks) for m in g.members if any(m is mm for mm in b.modules())}
            assert len(owners) == 1 and len({m.bits for m in g.members}) == 1
        assert net.blocks[0].chan._dq_group is None and net.head._dq_group is None
        out = net(x)
        assert torch.equal(out, ref), (out - ref).abs().max()
        assert [g.launches for g in groups] == [1, 1, 1, 1]
        assert all(g._flat is None for g in groups) and not DG._LIVE   # buffers dropped once used up
        out = net(x)
        assert torch.equal(out, ref) and [g.launches for g in groups] == [2, 2, 2, 2]

        # an unchanged group makes its next buffer without re-checking its members (the host's
        # per-group cost in an eager step); each member still compares its own tensors on taking
        # its weight, so edits made between forwards -- to any member, not only the first to run --
        # relaunch from checked constants
        ready_calls = []
        for g in groups:
            g._ready = (lambda g=g, f=g._ready: ready_calls.append(g) or f())
        assert torch.equal(net(x), ref) and not ready_calls and [g.launches for g in groups] == [3, 3, 3, 3]
        b1 = net.blocks[1]
        g8 = b1.k._dq_group
        assert g8.members[0] is not b1.k                     # k is not the member that launches
        saved = (b1.k.weight_scale.clone(), b1.k.weight_packed.clone())
        b1.k.weight_scale.mul_(3)                             # in place, after the buffer was dropped
        want_k = b1.k.dequantized_weight()
        got = [None]
        h = b1.k.register_forward_pre_hook(lambda m, a: got.__setitem__(0, m._forward_weight()))
        net(x)
        h.remove()
        # two checks: the table rebuilt for want_k prepares the group's new constants, and q, first to
        # run, checks them before launching; k's own compare then matches
        assert torch.equal(got[0], want_k) and ready_calls == [g8, g8]
        ready_calls.clear()
        b1.k.weight_packed.copy_(b1.k.weight_packed.flip(0))   # codes edited in place: no table rebuilt,
        want_k = b1.k.dequantized_weight()                     # so only k's own compare can see it
        h = b1.k.register_forward_pre_hook(lambda m, a: got.__setitem__(0, m._forward_weight()))
        net(x)
        h.remove()
        assert torch.equal(got[0], want_k) and ready_calls == [g8]
        b1.k.weight_packed = b1.k.weight_packed.flip(0).clone()          # codes replaced
        assert torch.equal(b1.k._forward_weight(), b1.k.dequantized_weight())
        b1.k.weight_scale.copy_(saved[0])
        b1.k.weight_packed = saved[1]
        for g in groups:
            del g._ready
            g._release()
        assert torch.equal(net(x), ref)

        # any call order stays correct: a member taken twice relaunches its group
        b0 = net.blocks[0]
        g = b0.q._dq_group
        n0 = g.launches
        w1 = b0.q._forward_weight()
        w2 = b0.q._forward_weight()
        assert torch.equal(w1, b0.q.dequantized_weight()) and torch.equal(w2, w1) and w1.data_ptr() != w2.data_ptr()
        assert g.launches == n0 + 2
        # at most two groups hold a buffer: a third evicts the oldest (whose members then relaunch)
        others = [gg for gg in groups if gg is not g][:2]
        for gg in others:
            gg.members[0]._forward_weight()
        live = [r() for r in DG._LIVE]
        assert len(live) == 2 and all(x is not g for x in live) and g._flat is None
        for gg in groups:
            gg._release()
        assert not DG._LIVE

        # a buffer still held (a group only partly used, as with feed-forward chunks or an error
        # mid-forward) never hands out stale weights: scales edited in place, new codes loaded,
        # a new dtype -- each member's next weight is the per-layer path's
        b0.conv1._forward_weight()                 # b0's 4-bit group now holds a buffer
        g4 = b0.conv1._dq_group
        assert g4._flat is not None
        before = b0.conv2.dequantized_weight()
        b0.conv2.weight_scale.mul_(2)
        got = b0.conv2._forward_weight()
        assert torch.equal(got, b0.conv2.dequantized_weight()) and not torch.equal(got, before)
        g4._release()
        b0.conv1._forward_weight()                 # a fresh buffer, conv2 not yet taken from it
        assert g4._flat is not None and g4._stamp[g4.members.index(b0.conv2)] != g4._generation
        before = b0.conv2.dequantized_weight()     # new codes copied in place while it is held:
        b0.conv2.weight_packed.copy_(b0.conv2.weight_packed.flip(0))
        got = b0.conv2._forward_weight()
        assert torch.equal(got, b0.conv2.dequantized_weight()) and not torch.equal(got, before)
        c = nn.Conv2d(8, 8, 3, padding=1)
        q = quantize_tensor(c.weight.detach(), 4, "pwlq", "tensor")
        b0.conv1._forward_weight()                 # held again
        b0.v.load_state_dict({"weight_packed": quantize_tensor(torch.randn(8, 8), 4, "pwlq", "tensor").pack(),
                              "weight_scale": b0.v.weight_scale.clone(), "weight_breakpoint": b0.v.weight_breakpoint.clone(),
                              "bias": b0.v.bias.detach().clone()})
        assert g4._flat is None                    # the load dropped the group's buffer
        assert torch.equal(b0.v._forward_weight(), b0.v.dequantized_weight())
        b0.conv1._forward_weight()
        net.float()
        w = b0.conv2._forward_weight()
        assert w.dtype == torch.float32 and torch.equal(w, b0.conv2.dequantized_weight())
        net.half()
        for gg in groups:
            gg._release()

        # copies start empty and rebuild from their own members
        import copy
        b0.conv1._forward_weight()
        twin = copy.deepcopy(b0)
        tg = twin.conv1._dq_group
        assert tg is not g4 and tg._flat is None and tg._launch is None
        assert all(any(m is mm for mm in twin.modules()) for m in tg.members)
        with torch.no_grad():
            twin.conv2.weight_scale.mul_(0.5)
        assert torch.equal(twin.conv2._forward_weight(), twin.conv2.dequantized_weight())
        assert not torch.equal(twin.conv2._forward_weight(), b0.conv2._forward_weight())
        for gg in groups + [tg]:
            gg._release()
        # held buffers are weakly referenced: a dropped model's groups do not stay alive
        import gc, weakref
        twin.conv1._forward_weight()
        alive = weakref.ref(tg)
        del twin, tg, gg
        gc.collect()
        assert alive() is None and all(r() is None or r() in groups for r in DG._LIVE)
        DG._LIVE.clear()

        # a cap below a block's size: its consecutive children share groups in order, under the cap --
        # 2600 bytes: the 4-bit conv1, conv2 and v (2432) in one, the 8-bit q and k in another;
        # 1200: no two 4-bit layers fit (each alone), q and k still do; 200: every layer alone
        assert all(gg.dense_bytes <= 4096 for gg in groups)
        assert sorted(len(g.members) for g in DG.group_dequant(net, max_bytes=2600)) == [2, 2, 3, 3]
        g1200 = DG.group_dequant(net, max_bytes=1200)
        assert sorted(len(g.members) for g in g1200) == [2, 2] and all({m.bits for m in g.members} == {8} for g in g1200)
        assert all(g.dense_bytes <= 1200 for g in g1200)
        assert DG.group_dequant(net, max_bytes=200) == []
        # only consecutive children share: a split child (here a ModuleList) between two ends the run
        class Sandwich(nn.Module):
            def __init__(self, split):
                super().__init__()
                self.a = qlin(8, 8, 8)
                if split:
                    self.mid = nn.ModuleList([qlin(8, 8, 8)])
                self.b = qlin(8, 8, 8)
                if not split:
                    self.mid = nn.ModuleList([qlin(8, 8, 8)])
        assert DG.group_dequant(Sandwich(True).half(), max_bytes=300) == []
        sg = DG.group_dequant(Sandwich(False).half(), max_bytes=300)
        assert len(sg) == 1 and len(sg[0].members) == 2
        groups = DG.group_dequant(net, max_bytes=4096)
        out = net(x)
        DG.ungroup_dequant(net)
        assert all(m._dq_group is None for _, m in packed_modules(net))
        assert torch.equal(out, net(x))

        # torch.compile: each member traces the group op and takes its slice (the fused
        # dequant-GEMM, which rounds differently, off for this exact comparison)
        from quantsd.kernels import fused
        fused.set_max_rows(0)
        calls = []
        flat = DG.DequantGroup.flat
        DG.DequantGroup.flat = lambda self, dtype: calls.append(self) or flat(self, dtype)
        per_layer = {}
        for backend in ("aot_eager", "inductor"):
            torch._dynamo.reset()
            per_layer[backend] = torch.compile(net, backend=backend, fullgraph=True)(x)
        groups = DG.group_dequant(net, max_bytes=4096)
        assert len(groups) == 4
        # without Inductor's pass every member's call stays: correct, one group decode per member
        comp = torch.compile(net, backend="aot_eager", fullgraph=True)
        comp(x)
        calls.clear()
        assert torch.equal(comp(x), per_layer["aot_eager"])
        assert len(calls) == sum(len(g.members) for g in groups)
        # Inductor runs DEDUP_PASS (installed by grouping): one call per group and forward, same bits
        import torch._inductor.config as icfg
        assert icfg.post_grad_custom_pre_pass is DG.DEDUP_PASS
        torch._dynamo.reset()
        comp = torch.compile(net, backend="inductor", fullgraph=True)
        comp(x)
        calls.clear()
        assert torch.equal(comp(x), per_layer["inductor"])
        assert sorted(map(id, calls)) == sorted(map(id, groups)), (len(calls), len(groups))
        # new codes loaded into a member of a compiled, grouped net: the group's launch constants are
        # rebuilt by the load itself (not inside a compiled graph), and the compiled net computes
        # with the new weights
        g0 = net.blocks[1].q._dq_group
        assert g0._launch is not None and g0._same_signature(g0._current_signature())
        lin = nn.Linear(8, 8)
        q8 = quantize_tensor(lin.weight.detach(), 8, "pwlq", "tensor")
        net.blocks[1].q.load_state_dict({"weight_packed": q8.pack(), "weight_scale": q8.scale,
                                         "weight_breakpoint": q8.breakpoint, "bias": lin.bias.detach().half()})
        assert g0._launch is not None and g0._same_signature(g0._current_signature())
        want = net(x)
        assert torch.equal(comp(x), want) or torch.allclose(comp(x), want, rtol=1e-3, atol=1e-3)
        assert not torch.equal(want, per_layer["inductor"])
        # regrouping makes new groups under new keys; a key nobody holds is an error, not other weights
        assert not {g.key for g in groups} & {g.key for g in DG.group_dequant(net, max_bytes=4096)}
        try:
            DG._lookup(-1)
            raise AssertionError("an unknown group key was accepted")
        except RuntimeError as e:
            assert "compile the model again" in str(e)
        DG.DequantGroup.flat = flat
        DG.group_dequant = _group_dequant
        print("GROUPS OK")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_grouped_dequant_under_interpreter():
    pytest.importorskip("triton")
    r = _run_interpreted(_SCRIPT)
    assert r.returncode == 0 and "GROUPS OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])


_PREHOOK_SCRIPT = _SCRIPT.split("net = Net().half().eval()")[0] + textwrap.dedent("""
    net = Net().half().eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float16)
    with torch.no_grad():
        ref = net(x)
        plain = DG.group_dequant(net, max_bytes=4096)
        assert torch.equal(net(x), ref)
        groups = DG.group_dequant(net, max_bytes=4096, prehook=True)
        # the head, a layer alone in its root (itself), gets a group of one instead of its own launch
        assert sorted(len(g.members) for g in groups) == [1, 5, 5] and groups[-1].members == [net.head]
        blocks = list(net.blocks)
        # each root got an arming forward and no hook (nn.Module.__call__ keeps its fast path); the
        # model itself, only its pool's release hook
        armers = DG.arming_forwards(net)
        assert [a.module for a in armers] == blocks + [net.head]
        assert all(r.forward is a for r, a in zip(blocks + [net.head], armers))
        assert all(not b._forward_pre_hooks and not b._forward_hooks for b in blocks)
        assert not net._forward_pre_hooks and len(net._forward_hooks) == 1
        seen = []
        for g in groups:                       # the members' forwards take the handed-over weight,
            for m in g.members:                # never the per-member checked path (the head, its own
                if m is not net.head:          # root, is armed inside its forward, after pre-hooks)
                    m.register_forward_pre_hook(lambda mod, a: seen.append(mod._armed is not None))
        real_weight = DG.DequantGroup.weight
        DG.DequantGroup.weight = lambda self, i: (_ for _ in ()).throw(AssertionError("checked path taken"))
        try:
            for _ in range(2):
                assert torch.equal(net(x), ref)
        finally:
            DG.DequantGroup.weight = real_weight
        assert seen and all(seen) and len(seen) == 2 * 10
        assert [g.launches for g in groups] == [2, 2, 2]          # one launch per group and forward
        assert all(m._armed is None for g in groups for m in g.members) and all(g._flat is None for g in groups)
        # a member called outside its root's forward takes the checked path: same weight
        t = torch.randn(3, 8, dtype=torch.float16)
        q = blocks[0].q
        DG.ungroup_dequant(net)
        want = q(t)
        groups = DG.group_dequant(net, max_bytes=4096, prehook=True)
        assert torch.equal(q(t), want) and q._armed is None
        # a forward that raises inside the root still takes the weights back
        try:
            blocks[0](torch.randn(2, 3, 5, 5, dtype=torch.float16))   # wrong channel count: conv1 raises
        except RuntimeError:
            pass
        else:
            raise AssertionError("expected the forward to raise")
        assert all(m._armed is None for g in groups for m in g.members) and all(g._flat is None for g in groups)
        assert torch.equal(net(x), ref)
        # a scale edited in place between forwards: the pre-hook's check sees it and the value table
        # is rebuilt (the codes are read where they are, but the table is the group's own copy)
        k = blocks[1].k
        before = net(x)
        k.weight_scale.mul_(2)
        after = net(x)
        DG.ungroup_dequant(net)
        assert torch.equal(after, net(x)) and not torch.equal(before, after)
        groups = DG.group_dequant(net, max_bytes=4096, prehook=True)
        # a deep copy works on its own, and ungrouping removes the hooks (the copy's too)
        import copy
        twin = copy.deepcopy(net)
        tw = DG.arming_forwards(twin)
        assert [a.module for a in tw] == list(twin.blocks) + [twin.head]
        assert all(a.groups[0].members[0] in a.module.modules() for a in tw)
        # ... its members take the weights its own groups hand over (their copied hand-over cells
        # relinked to the copy's groups at the first arm), never the checked path, never the original's
        DG.DequantGroup.weight = lambda self, i: (_ for _ in ()).throw(AssertionError("checked path taken"))
        try:
            assert torch.equal(twin(x), net(x))
        finally:
            DG.DequantGroup.weight = real_weight
        assert all(m._arm_cell is g._cell for a in tw for g in a.groups for m in g.members)
        assert {id(g._cell) for a in tw for g in a.groups}.isdisjoint(id(g._cell) for g in groups)
        for model in (net, twin):
            DG.ungroup_dequant(model)
            assert all("forward" not in b.__dict__ and not b._forward_hooks and not b._forward_hooks_always_called
                       for b in model.blocks) and not model._forward_hooks
            assert torch.equal(model(x), after)
    print("PREHOOK OK")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_prehook_groups_hand_members_their_weights_under_interpreter():
    """group_dequant(prehook=True): each single-root group decodes in its root's pre-hook and its
    members take their weights without the per-member check -- same bits as ungrouped, one launch per
    group and forward, nothing held after the forward (even one that raised), members called
    outside the root still correct, edits between forwards caught, hooks gone on ungrouping."""
    r = _run_interpreted(_PREHOOK_SCRIPT)
    assert r.returncode == 0 and "PREHOOK OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


_ARMED_CALLS_SCRIPT = _SCRIPT.split("net = Net().half().eval()")[0] + textwrap.dedent("""
    from quantsd.nn import ArmedQuantConv2d, ArmedQuantLinear
    net = Net().half().eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float16)
    layers = [m for _, m in packed_modules(net)]
    plain = {QuantLinear, QuantConv2d}
    forwards = []
    real = {c: c.forward for c in plain}
    def spy(c):
        def forward(self, *a, **k):
            forwards.append(self)
            return real[c](self, *a, **k)
        return forward
    with torch.no_grad():
        ref = net(x)
        groups = DG.group_dequant(net, max_bytes=4096, prehook=True)
        members = [m for g in groups for m in g.members]
        assert {type(m) for m in members} == {ArmedQuantLinear, ArmedQuantConv2d}
        assert "ArmedQuant" not in repr(net) and "QuantConv2d(" in repr(net)
        for c in plain:
            c.forward = spy(c)
        try:
            for _ in range(2):
                assert torch.equal(net(x), ref)
        finally:
            for c in plain:
                c.forward = real[c]
        # only the head, a root itself (its arming forward is set on the instance), and the per-channel
        # layers, in no group, went through a forward
        once = [net.blocks[0].chan, net.blocks[1].chan, net.head]
        assert forwards == once + once, forwards
        assert all(type(m) in plain for m in once[:2])
        DG.ungroup_dequant(net)
        assert {type(m) for m in layers} <= plain and torch.equal(net(x), ref)
        DG.group_dequant(net, max_bytes=4096, prehook=True, armed_calls=False)
        assert {type(m) for m in layers} <= plain and torch.equal(net(x), ref)
        DG.group_dequant(net, max_bytes=4096, prehook=True)
        DG.group_dequant(net, max_bytes=4096)          # grouped for a compiled model: the plain classes
        assert {type(m) for m in layers} <= plain and torch.equal(net(x), ref)
    print("ARMED CALLS OK")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_prehook_group_members_take_the_armed_call_under_interpreter():
    """group_dequant(prehook=True) gives its members the armed call (quantsd.nn.set_armed_calls):
    a forward of the model calls no member's forward (only the head's, a root with its own arming
    forward) and gives the same bits; ungrouping, armed_calls=False and grouping for compiled
    models leave the plain classes."""
    r = _run_interpreted(_ARMED_CALLS_SCRIPT)
    assert r.returncode == 0 and "ARMED CALLS OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


_SLOTS_SCRIPT = _SCRIPT.split("net = Net().half().eval()")[0] + textwrap.dedent("""
    import copy
    net = Net().half().eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float16)
    with torch.no_grad():
        ref = net(x)
        groups = DG.group_dequant(net, max_bytes=4096, prehook=True)
        hooks = DG.arming_forwards(net)
        pool = hooks[0].pool
        # one pool for the model's one dtype, sized to its largest group, shared by both roots, and its
        # release hook on the model itself
        assert len(hooks) == 3 and all(h.pool is pool for h in hooks) and pool.numel == max(g.numel for g in groups)
        assert DG.slot_pools(net) == [pool]
        for _ in range(3):
            assert torch.equal(net(x), ref)
        # one stream, no nesting: one slot serves every group in turn; its memory is returned after
        # each forward, and each group's views were made once and are reused
        assert len(pool.flats) == 1 and pool.flats[0].untyped_storage().nbytes() == 0 and pool.busy == [False]
        views = [g._slot_views[0][1] for g in groups]
        assert torch.equal(net(x), ref)
        assert all(g._slot_views[0][1] is v for g, v in zip(groups, views))
        assert [g.launches for g in groups] == [4, 4, 4] and all(g._flat is None for g in groups)
        assert all(m._armed is None for g in groups for m in g.members)
        # a slot still held (a root running around another, say) is never written: a second slot is made
        held = pool.acquire()
        assert torch.equal(net(x), ref) and len(pool.flats) == 2 and pool.busy == [True, False]
        pool.release(held)
        # new codes in a member between forwards: the pre-hook's check rebuilds, the slot path follows
        k = net.blocks[1].k
        before = net(x)
        k.weight_scale.mul_(2)
        after = net(x)
        assert not torch.equal(before, after)
        DG.ungroup_dequant(net)
        assert torch.equal(net(x), after)
        groups = DG.group_dequant(net, max_bytes=4096, prehook=True)
        # codes edited in place: not compared (every arm decodes the codes as they are), still seen
        assert torch.equal(net(x), after)
        net.blocks[0].q.weight_packed.bitwise_xor_(3)
        edited = net(x)
        DG.ungroup_dequant(net)
        assert torch.equal(net(x), edited) and not torch.equal(edited, after)
        net.blocks[0].q.weight_packed.bitwise_xor_(3)
        groups = DG.group_dequant(net, max_bytes=4096, prehook=True)
        pool = DG.arming_forwards(net)[0].pool
        # cast after grouping: the groups rebuild in the new dtype and no longer fit the pool's slots,
        # so they decode into fresh buffers (same weights as ungrouped)
        net.float()
        cast = net(x.float())
        DG.ungroup_dequant(net)
        assert torch.equal(net(x.float()), cast) and all(g._slot is None for g in groups)
        net.half()
        groups = DG.group_dequant(net, max_bytes=4096, prehook=True)
        pool = DG.arming_forwards(net)[0].pool
    # autograd on: never a slot (a weight saved for backward must not be overwritten later): fresh buffers
    used = len(pool.flats)
    assert torch.equal(net(x), after) and len(pool.flats) == used
    assert all(g._flat is None for g in groups) and all(m._armed is None for g in groups for m in g.members)
    with torch.no_grad():
        # a deep copy gets a pool of its own, empty; ungrouping removes every hook, the pool's too
        twin = copy.deepcopy(net)
        tpool = DG.slot_pools(twin)[0]
        assert all(h.pool is tpool for h in DG.arming_forwards(twin)) and len(DG.arming_forwards(twin)) == 3
        assert tpool is not pool and tpool.flats == [] and torch.equal(twin(x), after) and len(tpool.flats) == 1
        for model in (net, twin):
            DG.ungroup_dequant(model)
            assert not model._forward_hooks and not model._forward_hooks_always_called
            assert torch.equal(model(x), after)
    with torch.no_grad():
        # trusted_weights: each group checks its members' sources once per trust epoch, not per forward
        groups = DG.group_dequant(net, max_bytes=4096, prehook=True)
        checks = []
        real_expect = DG.DequantGroup._expect
        DG.DequantGroup._expect = lambda self: checks.append(self) or real_expect(self)
        assert torch.equal(net(x), after) and len(checks) == 3
        with DG.trusted_weights(net):
            for _ in range(3):
                assert torch.equal(net(x), after)
            assert len(checks) == 6           # the first forward of the epoch only
            groups[0].invalidate()            # (a move, a cast, new tables): checked again
            assert torch.equal(net(x), after) and len(checks) == 7
        assert torch.equal(net(x), after) and len(checks) == 10    # outside it: every forward
        DG.trust_weights(net)
        net(x), net(x)
        assert len(checks) == 13 and all(p.trust for p in DG.slot_pools(net))
        DG.trust_weights(net, on=False)
        assert not any(p.trust for p in DG.slot_pools(net)) and copy.deepcopy(net) is not None
        DG.DequantGroup._expect = real_expect
    print("SLOTS OK")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_prehook_groups_decode_into_reused_slots_under_interpreter():
    """Prehook groups with autograd off decode into a pool slot whose views were made once: one slot
    on one stream, its memory returned after every forward, a held slot never overwritten, edits
    caught, a fresh buffer with autograd on, deep copies with a pool of their own, hooks removed."""
    r = _run_interpreted(_SLOTS_SCRIPT)
    assert r.returncode == 0 and "SLOTS OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def _record_wrong_handed_weights(layers, want: dict) -> list:
    """A list that collects every layer whose handed-over weight (``_armed``) differs from its
    per-layer decode ``want[id(layer)]`` as it runs (a pre-hook on each)."""
    bad = []
    for m in layers:
        m.register_forward_pre_hook(
            lambda mod, a: bad.append(mod) if mod._armed is not None and not torch.equal(mod._armed, want[id(mod)])
            else None)
    return bad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prehook_slots_on_cuda_give_the_per_layer_weights_and_hold_no_memory(packed_tiny_unet_cuda):
    """Prehook groups on CUDA with autograd off: every member computes with exactly its per-layer
    decode, one slot serves every group, the slot's memory is returned after each forward, a
    forward on another stream is still right, and with autograd on no slot is used."""
    from quantsd import dequant_groups as DG

    unet, lat, ctx = packed_tiny_unet_cuda
    t = torch.tensor([10.0], device="cuda")
    layers = [m for m in unet.modules() if DG._eligible(m)]
    with torch.inference_mode():
        ref = unet(lat, t, encoder_hidden_states=ctx).sample
        want = {id(m): m.dequantized_weight() for m in layers}
        groups = DG.group_dequant(unet, 64 << 10, prehook=True)
        pool = DG.slot_pools(unet)[0]
        bad = _record_wrong_handed_weights(layers, want)
        armed = [g for g in groups if any(g in a.groups for a in DG.arming_forwards(unet))]
        assert armed, "no group got an arming forward"
        base = torch.cuda.memory_allocated()
        for _ in range(2):
            out = unet(lat, t, encoder_hidden_states=ctx).sample
        torch.cuda.synchronize()
        assert not bad and torch.allclose(out, ref, rtol=1e-3, atol=1e-3)
        assert len(pool.flats) == 1 and pool.flats[0].untyped_storage().nbytes() == 0
        assert torch.cuda.memory_allocated() - base == out.numel() * out.element_size()
        assert all(g.launches == 2 for g in armed)
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            out2 = unet(lat, t, encoder_hidden_states=ctx).sample
        side.synchronize()
        assert not bad and torch.allclose(out2, out, rtol=1e-3, atol=1e-3) and pool._stream == [side.cuda_stream]
    out3 = unet(lat, t, encoder_hidden_states=ctx).sample   # autograd on: fresh buffers, same weights
    assert not bad and torch.allclose(out3, out, rtol=1e-3, atol=1e-3) and len(pool.flats) == 1 and all(g.launches == 4 for g in armed)
    DG.ungroup_dequant(unet)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_execution_order_runs_on_cuda_give_the_per_layer_weights_and_hold_no_memory(packed_tiny_unet_cuda):
    """Groups merged in execution order (runs=True) on CUDA: after the first forward fewer groups
    (the tiny UNet at 64 KiB: 31 roots -> 14 groups on the CPU), every member computes with exactly
    its per-layer decode inside its run, each run group decodes once per forward, and its slot's
    memory is returned after each forward."""
    from quantsd import dequant_groups as DG

    unet, lat, ctx = packed_tiny_unet_cuda
    t = torch.tensor([10.0], device="cuda")
    layers = [m for m in unet.modules() if DG._eligible(m)]
    with torch.inference_mode():
        ref = unet(lat, t, encoder_hidden_states=ctx).sample
        want = {id(m): m.dequantized_weight() for m in layers}
        before = len(DG.group_dequant(unet, 64 << 10, prehook=True, runs=True))
        pool = DG.slot_pools(unet)[0]
        first = unet(lat, t, encoder_hidden_states=ctx).sample          # learns the order, then merges
        after = DG.launch_counts(unet)["groups"]
        assert after < before, (before, after)
        bad = _record_wrong_handed_weights(layers, want)
        runs = {id(a.groups[0]): a.groups[0] for a in DG.arming_forwards(unet) if type(a).__name__ == "_RunStart"}
        assert runs
        counts = {k: g.launches for k, g in runs.items()}
        base = torch.cuda.memory_allocated()
        for _ in range(2):
            out = unet(lat, t, encoder_hidden_states=ctx).sample
        torch.cuda.synchronize()
        assert not bad and torch.allclose(first, ref, rtol=1e-3, atol=1e-3) and torch.allclose(out, ref, rtol=1e-3, atol=1e-3)
        assert all(g.launches - counts[k] == 2 for k, g in runs.items())
        assert all(g._slot is None for g in runs.values()) and not any(pool.busy)
        assert all(f.untyped_storage().nbytes() == 0 for f in pool.flats)
        assert torch.cuda.memory_allocated() - base == out.numel() * out.element_size()
    DG.ungroup_dequant(unet)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eager_generate_on_cuda_gives_the_same_image_with_prehook_slots(tmp_path, monkeypatch):
    """quantsd generate, eager on CUDA, from a packed checkpoint: the default (prehook groups,
    reused slots) makes the image of the checked groups and of one launch per layer."""
    import numpy as np

    import quantsd
    from quantsd.export import export
    from quantsd.generate import generate

    out = tmp_path / "ck"
    export(quantsd.load_pipeline("tiny"), str(REPO / "recipes" / "paper-final.yaml"), str(out), dtype="keep")
    kw = dict(steps=3, seed=3, weights="packed", device="cuda", dtype="float16", height=32, width=32)
    monkeypatch.delenv("QUANTSD_EAGER_PREHOOK", raising=False)
    images = {"prehook": generate(str(out), "a blue circle", **kw)}
    monkeypatch.setenv("QUANTSD_EAGER_PREHOOK", "0")
    images["checked"] = generate(str(out), "a blue circle", **kw)
    images["per_layer"] = generate(str(out), "a blue circle", grouped_dequant=False, **kw)
    assert images["prehook"][1]["dequant_groups"] > 0 and images["per_layer"][1]["dequant_groups"] == 0
    a = np.asarray(images["prehook"][0]).astype(int)
    for name in ("checked", "per_layer"):
        b = np.asarray(images[name][0]).astype(int)
        assert np.abs(a - b).max() <= 1, name


def test_group_pipeline_reads_the_prehook_flag(monkeypatch):
    from quantsd import dequant_groups as DG

    calls = []
    monkeypatch.setattr(DG, "group_dequant", lambda unet, max_bytes, **kw: calls.append(kw) or [])
    pipe = type("P", (), {"unet": nn.Linear(2, 2)})()
    monkeypatch.delenv("QUANTSD_EAGER_PREHOOK", raising=False)
    DG.group_pipeline(pipe, compiled=False)         # eager: on by default
    monkeypatch.setenv("QUANTSD_EAGER_PREHOOK", "1")
    DG.group_pipeline(pipe, compiled=False)
    DG.group_pipeline(pipe, compiled=True)          # compiled UNets never get hooks
    monkeypatch.setenv("QUANTSD_EAGER_PREHOOK", "0")
    DG.group_pipeline(pipe, compiled=False)
    DG.group_pipeline(pipe, compiled=False, prehook=True)    # an explicit choice wins over the environment
    monkeypatch.setenv("QUANTSD_EAGER_PREHOOK", "")
    DG.group_pipeline(pipe, compiled=False, prehook=False)
    assert [c["prehook"] for c in calls] == [True, True, False, False, True, False]
    monkeypatch.setenv("QUANTSD_EAGER_PREHOOK", "yes")
    with pytest.raises(ValueError, match="QUANTSD_EAGER_PREHOOK must be 0 or 1"):
        DG.group_pipeline(pipe, compiled=False)


_LAUNCH_SCRIPT = textwrap.dedent("""
    import torch
    from torch import nn
    from quantsd.kernels.grouped import GroupLaunch
    from quantsd.nn import QuantLinear, dequantize_weight
    from quantsd.quant import quantize_tensor

    torch.manual_seed(0)
    for bits in (2, 3, 4, 6, 8):
        for shapes, aligned in (([(16, 8), (32, 24), (8, 2)], True), ([(16, 8), (7, 9), (3, 5)], False)):
            layers = []
            for o, i in shapes:
                w = torch.randn(o, i)
                layers.append(QuantLinear.from_linear(nn.Linear(i, o), quantize_tensor(w, bits, "pwlq", "tensor")).half())
            g = GroupLaunch([m.weight_packed for m in layers], [m._lut for m in layers], shapes, bits, torch.float16)
            assert g.aligned == aligned, (bits, shapes, g.aligned)
            flat = g.run()
            for k, m in enumerate(layers):
                ref = dequantize_weight(m.weight_packed, m.weight_shape, bits, "pwlq", "tensor", m.weight_scale,
                                        m.weight_breakpoint, torch.float16, backend="torch")
                assert torch.equal(g.view(flat, k).view(torch.int16), ref.view(torch.int16)), (bits, shapes, k)
    # two bit widths in one launch (4-bit convolutions beside 8-bit projections), either order
    for widths in ((4, 8, 8, 4, 4), (8, 2, 2, 8, 8), (3, 6, 6, 3, 3)):
        shapes = [(16, 8), (32, 24), (8, 2), (7, 9), (64, 16)]
        layers = [QuantLinear.from_linear(nn.Linear(i, o), quantize_tensor(torch.randn(o, i), b, "pwlq", "tensor")).half()
                  for (o, i), b in zip(shapes, widths)]
        g = GroupLaunch([m.weight_packed for m in layers], [m._lut for m in layers], shapes, list(widths), torch.float16)
        assert (g.bits, g.bits2) == tuple(sorted(set(widths)))
        flat = g.run()
        for k, (m, b) in enumerate(zip(layers, widths)):
            ref = dequantize_weight(m.weight_packed, m.weight_shape, b, "pwlq", "tensor", m.weight_scale,
                                    m.weight_breakpoint, torch.float16, backend="torch")
            assert torch.equal(g.view(flat, k).view(torch.int16), ref.view(torch.int16)), (widths, k)
    try:
        GroupLaunch([m.weight_packed for m in layers[:3]], [m._lut for m in layers[:3]], shapes[:3], [2, 4, 8],
                    torch.float16)
    except ValueError as e:
        assert "two bit widths" in str(e)
    else:
        raise AssertionError("three widths in one launch must be refused")
    # conv weights whose codes are stored in (O, KH, KW, I) order come out channels-last (compiled
    # graphs' layout) beside layers in their own order, one or two widths, any input channel count
    # (4: SD's conv_in; odd ones: codes straddle rows' byte boundaries), bf16 too
    from quantsd.nn import QuantConv2d
    convs = [(24, 16, 3, 3), (8, 4, 3, 3), (16, 8, 3, 3), (5, 9, 3, 3), (7, 3, 5, 5)]
    for widths, dtype in (((4, 4, 4, 4, 4, 4), torch.float16), ((4, 8, 4, 8, 4, 8), torch.float16),
                          ((3, 3, 6, 6, 3, 6), torch.bfloat16), ((8, 2, 2, 8, 8, 2), torch.float16)):
        layers = [QuantConv2d.from_conv(nn.Conv2d(c[1], c[0], c[2]), quantize_tensor(torch.randn(c), b, "pwlq", "tensor"))
                  for c, b in zip(convs, widths)]
        layers.append(QuantLinear.from_linear(nn.Linear(24, 40), quantize_tensor(torch.randn(40, 24), widths[5], "pwlq",
                                                                                 "tensor")))
        layers = [m.to(dtype) for m in layers]
        refs = [dequantize_weight(m.weight_packed, m.weight_shape, b, "pwlq", "tensor", m.weight_scale,
                                  m.weight_breakpoint, dtype, backend="torch") for m, b in zip(layers, widths)]
        cl = [True, True, False, True, True, False]
        for m, c in zip(layers, cl):
            m.set_codes_channels_last(c)
        g = GroupLaunch([m.weight_packed for m in layers], [m._lut for m in layers], [m.weight_shape for m in layers],
                        list(widths), dtype, codes_channels_last=cl)
        flat = g.run()
        for k, (m, ref) in enumerate(zip(layers, refs)):
            w = g.view(flat, k)
            assert w.shape == ref.shape and w.is_contiguous() != cl[k], (widths, k)
            assert w.is_contiguous(memory_format=torch.channels_last) == cl[k] or w.dim() == 2, (widths, k)
            assert torch.equal(w.contiguous().view(torch.int16), ref.view(torch.int16)), (widths, k, cl[k])
    for bad in ((24, 16, 1, 1), (24, 16)):   # a 1x1 conv, a linear weight: no channels-last codes
        try:
            GroupLaunch([layers[0].weight_packed], [layers[0]._lut], [bad], 4, torch.float16, codes_channels_last=[True])
        except ValueError as e:
            assert "channels-last codes" in str(e)
        else:
            raise AssertionError(f"{bad} with channels-last codes must be refused")
    # group_dequant(channels_last=True): k x k convs written channels-last (their codes repacked), a conv
    # too large to share a group gets one of its own, 1x1 convs and linears stay in their layout
    from quantsd.dequant_groups import group_dequant, launch_counts
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 64, 3, padding=1),
                        nn.Conv2d(64, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))
    for i, m in enumerate(net):
        if isinstance(m, nn.Conv2d):
            net[i] = QuantConv2d.from_conv(m, quantize_tensor(m.weight.detach(), 4, "pwlq", "tensor"))
        elif isinstance(m, nn.Linear):
            net[i] = QuantLinear.from_linear(m, quantize_tensor(m.weight.detach(), 8, "pwlq", "tensor"))
    net = net.half()
    x = torch.randn(2, 8, 4, 4).half()
    refs = {i: dequantize_weight(net[i].weight_packed, net[i].weight_shape, 4, "pwlq", "tensor", net[i].weight_scale,
                                 net[i].weight_breakpoint, torch.float16, backend="torch") for i in (0, 2, 3)}
    with torch.inference_mode():
        want = net(x)
        # the 16->64 and 64->8 convs: 18 KiB each
        groups = group_dequant(net, max_bytes=5000, channels_last=True)
        got = net(x)
    # the linear: lone
    assert launch_counts(net) == {"groups": 3, "lone_layers": 1, "launches": 4}, launch_counts(net)
    cl = {i: net[i]._dq_view[2] for i in (0, 1, 2, 3, 5)}
    assert cl == {0: (16, 3, 3, 8), 1: None, 2: (64, 3, 3, 16), 3: (8, 3, 3, 64), 5: None}, cl
    assert [len(g.members) for g in groups] == [2, 1, 1], [len(g.members) for g in groups]
    assert [net[i].codes_channels_last for i in (0, 1, 2, 3)] == [True, False, True, True]   # (the 1x1 conv: never)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    for i in (0, 2, 3):
        m = net[i]
        g = m._dq_group
        ref = refs[i]
        w = g._launch.view(g._launch.run(), m._dq_index)
        assert w.is_contiguous(memory_format=torch.channels_last), i
        assert torch.equal(w.contiguous().view(torch.int16), ref.view(torch.int16)), i
        # the fallback (each member's own decode, copied into the flat buffer) keeps the layout
        g._launch = None
        g._ready = lambda: False
        w = g.flat(torch.float16).narrow(0, g.offsets[m._dq_index], m._plan.numel).view(m._dq_view[2])
        assert torch.equal(w.permute(0, 3, 1, 2).contiguous().view(torch.int16), ref.view(torch.int16)), i
    print("LAUNCH OK")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_group_launch_aligned_and_unaligned_layers_decode_the_reference_bits():
    """GroupLaunch's kernel states vector-aligned code offsets and lengths to the compiler only when
    every member has them (``aligned``); both paths give the torch reference's bits, bits 2/3/4/6/8,
    and so does a launch of layers of two bit widths (three are refused), and one that writes conv
    weights channels-last from their (O, KH, KW, I)-order codes (also through
    group_dequant(channels_last=True) and the fallback copy)."""
    pytest.importorskip("triton")
    r = _run_interpreted(_LAUNCH_SCRIPT)
    assert r.returncode == 0 and "LAUNCH OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])


def test_layers_without_the_kernel_are_not_grouped():
    """On the CPU without the interpreter no layer has a kernel table: nothing to group, and the
    model runs as before."""
    from quantsd.dequant_groups import group_dequant
    from quantsd.nn import QuantLinear
    from quantsd.quant import quantize_tensor

    lin = nn.Linear(16, 16)
    q = QuantLinear.from_linear(lin, quantize_tensor(lin.weight.detach(), 4, "pwlq", "tensor"))
    net = nn.Sequential(q, QuantLinear.from_linear(lin, quantize_tensor(lin.weight.detach(), 4, "pwlq", "tensor")))
    assert group_dequant(net) == [] and q._dq_group is None
    x = torch.randn(3, 16)
    assert torch.equal(net(x), net[1](net[0](x)))


def test_group_needs_a_layer():
    from quantsd.dequant_groups import DequantGroup

    with pytest.raises(ValueError, match="one or more"):
        DequantGroup([])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_dequant_on_cuda_equals_per_layer():
    from quantsd.dequant_groups import group_dequant
    from quantsd.nn import QuantConv2d, QuantLinear
    from quantsd.quant import quantize_tensor

    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        layers = []
        for i, bits in enumerate((2, 4, 4, 8, 8, 3, 3, 5, 6, 7, 7)):
            if i % 2:
                c = nn.Conv2d(19, 37, 3)
                layers.append(QuantConv2d.from_conv(c, quantize_tensor(c.weight.detach(), bits, "pwlq", "tensor")))
            else:
                l = nn.Linear(37, 37 * 19 * 9 // 37)
                layers.append(QuantLinear.from_linear(l, quantize_tensor(l.weight.detach(), bits, "uniform", "tensor")))
        net = nn.ModuleDict({"b": nn.Sequential(*layers)}).cuda().to(dtype)
        refs = [m.dequantized_weight() for m in layers]
        groups = group_dequant(net)
        assert groups and all(len(g.members) >= 2 for g in groups)
        for _ in range(2):   # the second round launches the cached compiled kernel directly
            for m, r in zip(layers, refs):
                assert torch.equal(m._forward_weight(), r)
        from quantsd.kernels.grouped import _KERNELS

        assert all(g._launch._key in _KERNELS for g in groups) and all(g.launches == 2 for g in groups)
        # run_into (the slots' launch): the direct launch with the addresses as integers, adopted
        # after one checked run, writes the same bits into a reused buffer (stale contents overwritten)
        from quantsd.kernels import dequant

        for g in groups:
            flat = torch.full((g.numel + 64,), float("nan"), dtype=dtype, device="cuda")
            for _ in range(2):
                g._launch.run_into(flat)
                assert all(torch.equal(v, m.dequantized_weight()) for v, m in zip(g._launch.views(flat), g.members))
                flat.fill_(7)
            assert g._launch._direct is _KERNELS[g._launch._key] and dequant._direct_enabled
            # the C launcher alone (no Triton wrapper), adopted where the launcher has the checked layout
            assert (g._launch._fast is not None) == (dequant.c_launcher(g._launch._direct) is not None)
            side = torch.cuda.Stream()       # it launches on the current stream
            with torch.cuda.stream(side):
                flat = torch.full((g.numel,), float("nan"), dtype=dtype, device="cuda")
                g._launch.run_into(flat)
            side.synchronize()
            assert all(torch.equal(v, m.dequantized_weight()) for v, m in zip(g._launch.views(flat), g.members))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_group_c_launcher_that_writes_nothing_is_not_adopted(monkeypatch):
    """The C-launcher call is adopted only after it reproduced the direct launch's bits: one that
    writes nothing (into a block that may hold a previous decode's very bits) is refused, and the
    group keeps the direct launch."""
    from quantsd.kernels import dequant
    from quantsd.kernels.grouped import GroupLaunch
    from quantsd.nn import QuantLinear
    from quantsd.quant import quantize_tensor

    torch.manual_seed(1)
    layers = [QuantLinear.from_linear(nn.Linear(48, 64), quantize_tensor(torch.randn(64, 48), 4, "pwlq", "tensor"))
              .cuda().half() for _ in range(2)]
    gl = GroupLaunch([m.weight_packed for m in layers], [m._lut for m in layers], [(64, 48)] * 2, 4, torch.float16)
    want = gl.run()
    monkeypatch.setattr(dequant, "c_launcher", lambda k: (lambda *args: None, ()))
    for _ in range(3):
        out = torch.empty(gl.numel, dtype=torch.float16, device="cuda")
        gl.run_into(out)
        assert all(torch.equal(a, b) for a, b in zip(gl.views(out), gl.views(want)))
    assert gl._fast is None and gl._direct is not None


_GENERATE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch
    import quantsd
    from quantsd.export import export
    from quantsd.generate import generate
    out = sys.argv[1]
    export(quantsd.load_pipeline("tiny"), %r, out, dtype="keep")
    kw = dict(steps=2, seed=3, weights="packed", device="cpu", dtype="float16", height=32, width=32)
    grouped, info = generate(out, "a blue circle", **kw)
    single, info1 = generate(out, "a blue circle", grouped_dequant=False, **kw)
    assert info["dequant_groups"] > 0 and info1["dequant_groups"] == 0, (info["dequant_groups"], info1["dequant_groups"])
    assert np.array_equal(np.asarray(grouped), np.asarray(single))
    print("GENERATE OK", info["dequant_groups"])
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_generate_groups_packed_layers_by_default(tmp_path):
    """quantsd generate (eager, packed checkpoint) sets up grouped launches by default: the same
    image as one launch per layer."""
    pytest.importorskip("triton")
    r = _run_interpreted(_GENERATE_SCRIPT % str(REPO / "recipes" / "paper-final.yaml"), str(tmp_path / "ck"),
                         timeout=900)
    assert r.returncode == 0 and "GENERATE OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])


def test_group_direct_launch_check_ignores_the_padding():
    """The first direct launch of a group kernel is checked against Triton's own launch by the
    layers' weights only: the padding between layers belongs to no weight (when the check was made it
    was never written, and a whole-buffer comparison turned direct launches off on the H200)."""
    from quantsd.kernels.grouped import ALIGN, GroupLaunch

    packed = [torch.zeros(5, dtype=torch.uint8), torch.zeros(6, dtype=torch.uint8)]
    luts = [torch.zeros(256), torch.zeros(256)]
    g = GroupLaunch(packed, luts, [(5,), (3, 2)], 8, torch.float16)
    assert g.offsets == [0, ALIGN] and g.numel == ALIGN + ALIGN
    a = torch.full((g.numel,), float("nan"), dtype=torch.float16)
    b = torch.full((g.numel,), 7.0, dtype=torch.float16)
    for t in (a, b):
        t[:5] = torch.arange(5)
        t[ALIGN:ALIGN + 6] = torch.arange(6)
    assert g.same_weights(a, b)
    b[ALIGN + 5] = -1
    assert not g.same_weights(a, b)
    assert g.view(a, 1).shape == (3, 2) and torch.equal(g.view(a, 1), torch.arange(6.).view(3, 2).half())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_cuda_graph_tiny_unet_grouped_matches_per_layer(packed_tiny_unet_cuda):
    """torch.compile (Inductor, CUDA graphs) of a grouped packed UNet: one group launch per group
    and forward (DEDUP_PASS), the group's weights are the per-layer decode's bits, and the output
    matches the per-layer compiled UNet."""
    from quantsd import dequant_groups as DG

    unet, lat, ctx = packed_tiny_unet_cuda
    calls = []
    flat = DG.DequantGroup.flat
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            plain = torch.compile(unet, mode="reduce-overhead")
            want = [plain(lat, 10, encoder_hidden_states=ctx).sample.clone() for _ in range(3)][-1]
            torch._dynamo.reset()
            groups = DG.group_dequant(unet)
            assert groups
            # nothing decoded before the compiled graph's warm-up (its allocations must all be outputs:
            # the launch constants are built by group_dequant, outside the graph's pool)
            DG.DequantGroup.flat = lambda self, dtype: calls.append(self) or flat(self, dtype)
            fast = torch.compile(unet, mode="reduce-overhead")
            got = [fast(lat, 10, encoder_hidden_states=ctx).sample.clone()]
            first = len(calls)
            got += [fast(lat, 10, encoder_hidden_states=ctx).sample.clone() for _ in range(3)]
            DG.DequantGroup.flat = flat
            for grp in groups:
                buf = grp.flat(torch.float16)
                for m, o in zip(grp.members, grp.offsets):
                    w = buf.narrow(0, o, m._plan.numel).view(m.weight_shape)
                    assert torch.equal(w, m.dequantized_weight())
    finally:
        DG.DequantGroup.flat = flat
        torch._dynamo.reset()
        DG.ungroup_dequant(unet)
    assert first == len(groups), (first, len(groups))
    # same weights, but Inductor's code around slices of one buffer may round differently (the H200
    # measured 4 of 2048 outputs off by <= 1.6e-3)
    for o in got:
        torch.testing.assert_close(o, want, rtol=2e-2, atol=2e-2)


def test_group_pipeline_reads_the_size_cap_from_the_environment(monkeypatch):
    """QUANTSD_GROUP_MAX_MIB (an experiment knob) sets the group size cap; nonsense is an error
    naming the variable, not a silent default.  A UNet to be compiled gets channels-last conv
    weights, an eager one not; QUANTSD_DECODE_CHANNELS_LAST overrides that, and checks its value."""
    from quantsd import dequant_groups as DG

    seen = []
    monkeypatch.setattr(DG, "group_dequant",
                        lambda unet, max_bytes, channels_last, prehook=False, runs=False, armed_calls=True:
                        seen.append((max_bytes, channels_last)) or [])
    pipe = type("Pipe", (), {"unet": nn.Linear(2, 2)})()
    monkeypatch.delenv("QUANTSD_GROUP_MAX_MIB", raising=False)
    monkeypatch.delenv("QUANTSD_DECODE_CHANNELS_LAST", raising=False)
    DG.group_pipeline(pipe)
    DG.group_pipeline(pipe, compiled=False)     # eager forwards: larger groups, fewer launches
    monkeypatch.setenv("QUANTSD_GROUP_MAX_MIB", "48")
    DG.group_pipeline(pipe)
    DG.group_pipeline(pipe, compiled=False)
    DG.group_pipeline(pipe, max_bytes=1234)
    monkeypatch.setenv("QUANTSD_DECODE_CHANNELS_LAST", "0")
    DG.group_pipeline(pipe, max_bytes=1)
    monkeypatch.setenv("QUANTSD_DECODE_CHANNELS_LAST", "1")
    DG.group_pipeline(pipe, max_bytes=2, compiled=False)
    assert DG.EAGER_MAX_BYTES > DG.DEFAULT_MAX_BYTES
    assert seen == [(DG.DEFAULT_MAX_BYTES, True), (DG.EAGER_MAX_BYTES, False), (48 << 20, True), (48 << 20, False),
                    (1234, True), (1, False), (2, True)]
    monkeypatch.setenv("QUANTSD_DECODE_CHANNELS_LAST", "yes")
    with pytest.raises(ValueError, match="QUANTSD_DECODE_CHANNELS_LAST"):
        DG.group_pipeline(pipe)
    monkeypatch.delenv("QUANTSD_DECODE_CHANNELS_LAST")
    monkeypatch.setenv("QUANTSD_GROUP_MAX_MIB", "lots")
    with pytest.raises(ValueError, match="QUANTSD_GROUP_MAX_MIB"):
        DG.group_pipeline(pipe)


def test_dedup_pass_keeps_one_call_per_group_and_chains_an_earlier_pass():
    """The Inductor pass on a hand-built graph: later calls of a group point at its first call,
    which takes their inputs too; another group's call stays; a pass installed before ours still
    runs, after it."""
    import torch._inductor.config as icfg
    from torch import fx

    from quantsd import dequant_groups as DG

    op = torch.ops.quantsd.dequant_group.default
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    calls = [g.call_function(op, ([a], 7, 256, torch.float16)), g.call_function(op, ([b, a], 7, 256, torch.float16)),
             g.call_function(op, ([b], 8, 256, torch.float16)), g.call_function(op, ([a], 7, 256, torch.float32))]
    outs = [g.call_function(torch.ops.aten.narrow.default, (c, 0, 0, 4)) for c in calls]
    g.output(tuple(outs))
    seen = []
    # (icfg.patch, not monkeypatch: undoing a monkeypatch deletes a config entry, hiding it for good)
    with icfg.patch(post_grad_custom_pre_pass=lambda graph: seen.append(graph)):
        DG.install_dedup_pass()
        DG.install_dedup_pass()          # idempotent: not wrapped twice
        p = icfg.post_grad_custom_pre_pass
    assert isinstance(p, DG._DedupGroupDequant) and not isinstance(p.then, DG._DedupGroupDequant)
    p(g)
    left = [n for n in g.nodes if n.target is op]
    assert left == [calls[0], calls[2], calls[3]] and seen == [g]
    assert outs[1].args[0] is calls[0]      # the second call of group 7 now reads the first's buffer
    assert calls[0].args[0] == [a, b]       # ...and the kept call takes both calls' inputs, once each
    assert calls[2].args[0] == [b] and calls[3].args[0] == [a]
    assert p.uuid()[0].startswith("quantsd.dedup_group_dequant")


_PROFILE_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, %r)
    from profile_packed import grouped_decode
    from quantsd.bench.core import to_packed
    from quantsd.dequant_groups import group_dequant
    from quantsd.models import load_pipeline
    from quantsd.nn import packed_modules
    from quantsd.recipe import load_recipe

    pipe, _ = to_packed(load_pipeline("tiny"), load_recipe(%r))
    unet = pipe.unet.half()
    layers = [m for _, m in packed_modules(unet)]
    groups = group_dequant(unet, 1 << 14)
    decode, stats = grouped_decode(unet)
    assert stats["groups"] == len(groups) >= 2, stats
    assert stats["grouped_layers"] + stats["lone_layers"] == len(layers)
    assert stats["launches"] == stats["groups"] + stats["lone_layers"] < len(layers)
    bufs = decode()
    for g, buf in zip(groups, bufs):
        for m, o in zip(g.members, g.offsets):
            assert torch.equal(buf.narrow(0, o, m._plan.numel).view(m.weight_shape), m.dequantized_weight())
    lone = [m for m in layers if m._dq_group is None]
    assert all(torch.equal(b, m.dequantized_weight()) for b, m in zip(bufs[len(groups):], lone))
    print("PROFILE OK", stats)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_profile_packed_grouped_decode_rebuilds_every_weight():
    """bench/profile_packed.py times a grouped step's decode: its decode must rebuild every packed
    layer's weight (grouped ones in their group's buffer, lone ones alone) in fewer launches."""
    pytest.importorskip("triton")
    r = _run_interpreted(_PROFILE_SCRIPT % (str(REPO / "bench"), str(REPO / "recipes" / "paper-final.yaml")))
    assert r.returncode == 0 and "PROFILE OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])


_TUNE_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, %r)
    from tune_group_kernel import build_units
    from quantsd.bench.core import to_packed
    from quantsd.dequant_groups import group_dequant
    from quantsd.models import load_pipeline
    from quantsd.recipe import load_recipe

    pipe, _ = to_packed(load_pipeline("tiny"), load_recipe(%r))
    unet = pipe.unet.half()
    group_dequant(unet, 1 << 14, mixed_bits=False)
    units = build_units(unet)
    assert len(units) >= 3 and any(len(u.members) > 1 for u in units)
    for variant in ((1024, 4, 1, False, False, False), (2048, 4, 1, False, False, True), (512, 4, 2, True, True, True),
                    (2048, 4, 1, False, False, True, True), (1024, 4, 1, False, True, True, True)):
        with torch.inference_mode():
            for u in units:
                u.out.fill_(float("nan"))
                u.launch(*variant)
        assert all(u.exact() for u in units), variant
        u = units[0]
        with torch.inference_mode():                    # (the units' buffers are inference tensors)
            u.out.view(torch.int16)[u.offsets[-1]] += 1  # one wrong weight is caught
        assert not u.exact()
    print("TUNE OK")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_tune_group_kernel_variants_match_the_production_decode():
    """bench/tune_group_kernel.py's experimental kernel variants (launch shape, vector loads, 2-D grid,
    fp16 table, table gathered from shared memory) decode every unit of the tiny UNet bit for bit as the production path does, and its
    check notices a single wrong weight."""
    pytest.importorskip("triton")
    r = _run_interpreted(_TUNE_SCRIPT % (str(REPO / "bench"), str(REPO / "recipes" / "paper-final.yaml")))
    assert r.returncode == 0 and "TUNE OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])


def test_launch_counts_counts_groups_and_lone_layers():
    from quantsd.dequant_groups import launch_counts
    from quantsd.nn import QuantLinear
    from quantsd.quant import quantize_tensor

    lin = nn.Linear(8, 8)
    qs = [QuantLinear.from_linear(lin, quantize_tensor(lin.weight.detach(), 4, "pwlq", "tensor")) for _ in range(5)]
    net = nn.Sequential(*qs, nn.Linear(8, 8))     # the dense layer makes no launch
    assert launch_counts(net) == {"groups": 0, "lone_layers": 5, "launches": 5}
    a, b = object(), object()
    for q, g in zip(qs, (a, a, b, b, None)):       # (bookkeeping only: which group a layer is in)
        q._dq_group = g
    assert launch_counts(net) == {"groups": 2, "lone_layers": 1, "launches": 3}


_COMPILED_GENERATE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch
    import quantsd
    from quantsd.export import export
    from quantsd.generate import generate
    out = sys.argv[1]
    export(quantsd.load_pipeline("tiny"), %r, out, dtype="keep")
    import os
    kw = dict(steps=2, seed=3, weights="packed", device="cpu", dtype="float16", height=32, width=32, compile=True)
    os.environ["QUANTSD_DECODE_CHANNELS_LAST"] = "0"
    grouped, info = generate(out, "a blue circle", **kw)
    torch._dynamo.reset()
    single, info1 = generate(out, "a blue circle", grouped_dequant=False, **kw)
    assert info["dequant_groups"] > 0 and info1["dequant_groups"] == 0, (info["dequant_groups"], info1["dequant_groups"])
    assert np.array_equal(np.asarray(grouped), np.asarray(single))
    # the compiled default: k x k conv weights written channels-last (the same weights, bit for bit:
    # test_group_launch_...; the convolutions then run from another memory layout, so the image may
    # differ by rounding, by one level at most)
    torch._dynamo.reset()
    os.environ.pop("QUANTSD_DECODE_CHANNELS_LAST")
    cl, info2 = generate(out, "a blue circle", **kw)
    d = np.abs(np.asarray(cl).astype(int) - np.asarray(single).astype(int))
    assert d.max() <= 1 and d.mean() < 0.5, (d.max(), d.mean())
    print("COMPILED GENERATE OK", info["dequant_groups"], info2["dequant_groups"], d.max(), d.mean())
""")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_compiled_generate_groups_and_gives_the_per_layer_image(tmp_path):
    """quantsd generate --compile (Inductor, CPU, Triton interpreter) on a packed checkpoint groups
    the UNet's layers in the compiled graph and makes the very image of one launch per layer; with
    channels-last conv weights (the compiled default) an image within one level of it (~3.5 min:
    three Inductor compiles of the tiny UNet)."""
    pytest.importorskip("triton")
    r = _run_interpreted(_COMPILED_GENERATE_SCRIPT % str(REPO / "recipes" / "paper-final.yaml"),
                         str(tmp_path / "ck"), timeout=1200)
    assert r.returncode == 0 and "COMPILED GENERATE OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_channels_last_group_launch_on_cuda_is_bit_exact():
    """The compiled default on the GPU: 3x3 conv weights whose codes are stored in (O, KH, KW, I)
    order, written channels-last by the group kernel (beside layers in their own order, one or two
    widths, fp16/bf16, SD's 4-channel conv_in among them), hold the reference decode's bits."""
    from quantsd.kernels.grouped import GroupLaunch
    from quantsd.nn import QuantConv2d, QuantLinear, dequantize_weight
    from quantsd.quant import quantize_tensor

    torch.manual_seed(0)
    convs = [(320, 320, 3, 3), (320, 4, 3, 3), (1280, 2560, 3, 3), (64, 520, 3, 3), (8, 16, 3, 3)]
    for widths, dtype in (((4, 4, 4, 4, 4, 8), torch.float16), ((4, 8, 4, 8, 8, 4), torch.bfloat16),
                          ((3, 3, 5, 5, 5, 3), torch.float16)):
        layers = [QuantConv2d.from_conv(nn.Conv2d(c[1], c[0], 3), quantize_tensor(torch.randn(c), b, "pwlq", "tensor"),
                                        device="cuda") for c, b in zip(convs, widths)]
        layers.append(QuantLinear.from_linear(nn.Linear(768, 320), quantize_tensor(torch.randn(320, 768), widths[5],
                                                                                   "pwlq", "tensor"), device="cuda"))
        layers = [m.to(dtype) for m in layers]
        refs = [dequantize_weight(m.weight_packed, m.weight_shape, b, "pwlq", "tensor", m.weight_scale,
                                  m.weight_breakpoint, dtype, backend="torch") for m, b in zip(layers, widths)]
        cl = [True, True, True, True, False, False]
        for m, c in zip(layers, cl):
            m.set_codes_channels_last(c)
        g = GroupLaunch([m.weight_packed for m in layers], [m._lut for m in layers], [m.weight_shape for m in layers],
                        list(widths), dtype, codes_channels_last=cl)
        for run in range(2):   # Triton's own launch, then the cached direct launch
            flat = g.run()
            for k, ref in enumerate(refs):
                w = g.view(flat, k)
                assert w.is_contiguous(memory_format=torch.channels_last) == cl[k] or w.dim() == 2, (widths, k)
                assert torch.equal(w.contiguous().view(torch.int16), ref.view(torch.int16)), (widths, k, run)


_INDUCTOR_CL_SCRIPT = textwrap.dedent("""
    import re
    import torch
    from torch import nn
    import torch._inductor.config as icfg
    from torch._inductor.utils import run_and_get_code
    from quantsd.dequant_groups import group_dequant
    from quantsd.nn import QuantConv2d
    from quantsd.quant import quantize_tensor

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1), nn.SiLU(),
                        nn.Conv2d(16, 8, 3, padding=1))
    for i, m in enumerate(net):
        if isinstance(m, nn.Conv2d):
            net[i] = QuantConv2d.from_conv(m, quantize_tensor(m.weight.detach(), 4, "pwlq", "tensor"))
    assert len(group_dequant(net, channels_last=True)) == 1
    x = torch.randn(2, 8, 16, 16)
    with torch.inference_mode(), icfg.patch(force_disable_caches=True):
        want = net(x)
        got, codes = run_and_get_code(torch.compile(net), x)
    src = "\\n".join(codes)
    weights = re.findall(r"extern_kernels\\.convolution\\(\\w+, (\\w+)\\(", src)
    assert weights == ["reinterpret_tensor"] * 3, (weights, src[-4000:])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("INDUCTOR CL OK")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_inductor_takes_channels_last_group_weights_without_a_copy():
    """Inductor (CPU here; CUDA alike) runs convolutions channels-last and copies a weight that
    arrives NCHW on every call; a group written channels-last hands each convolution a view of the
    group's buffer that it takes as is (the copies cost 0.79 ms of a 7.07 ms SD1.5 step on an H200)."""
    pytest.importorskip("triton")
    r = _run_interpreted(_INDUCTOR_CL_SCRIPT)
    assert r.returncode == 0 and "INDUCTOR CL OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])


_CONV_IN_SCRIPT = textwrap.dedent("""
    import torch
    from torch import nn
    from quantsd.dequant_groups import group_dequant
    from quantsd.nn import QuantConv2d, dequantize_weight
    from quantsd.quant import quantize_tensor

    torch.manual_seed(0)
    # SD's conv_in (4 latent channels in, 3x3) beside an ordinary 3x3 conv; 8- and 4-bit (two widths)
    net = nn.Sequential(nn.Conv2d(4, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1))
    for i, bits in ((0, 8), (2, 4)):
        net[i] = QuantConv2d.from_conv(net[i], quantize_tensor(net[i].weight.detach(), bits, "pwlq", "tensor"))
    net = net.half()
    conv_in = net[0]
    ref = dequantize_weight(conv_in.weight_packed, conv_in.weight_shape, 8, "pwlq", "tensor", conv_in.weight_scale,
                            conv_in.weight_breakpoint, torch.float16, backend="torch")
    assert torch.equal(conv_in.dequantized_weight().view(torch.int16), ref.view(torch.int16))
    x = torch.randn(2, 4, 8, 8).half()
    with torch.inference_mode():
        want = net(x)
        groups = group_dequant(net, channels_last=True)
        got = net(x)
    assert len(groups) == 1 and conv_in._dq_group is groups[0] and groups[0].channels_last == [True, True]
    assert conv_in.codes_channels_last and conv_in._dq_view[2] == (32, 3, 3, 4), conv_in._dq_view
    g = groups[0]
    cl_strides = (3 * 3 * 4, 1, 3 * 4, 4)     # (O, KH, KW, I) memory order
    # the group's launch, the eager member's weight, and the compiled member's view of the group op
    real = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: True
    try:
        traced = conv_in._forward_weight()
    finally:
        torch.compiler.is_compiling = real
    for w in (g._launch.view(g._launch.run(), conv_in._dq_index), conv_in._eager_weight(), traced):
        assert w.shape == (32, 4, 3, 3) and w.stride() == cl_strides, (w.shape, w.stride())
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        assert torch.equal(w.contiguous().view(torch.int16), ref.view(torch.int16))
    # the layer's own decode of its repacked codes: the same bits
    assert torch.equal(conv_in.dequantized_weight().contiguous().view(torch.int16), ref.view(torch.int16))
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    print("CONV_IN OK")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_conv_in_with_four_input_channels_is_written_channels_last():
    """SD's conv_in (4 input channels, 3x3) is grouped channels-last like every k x k conv: its codes
    are repacked, its weight (the group launch's, the eager member's, the compiled member's view) has
    channels-last strides and the reference decode's bits (the removed tile decode needed I % 8 == 0,
    so conv_in used to arrive NCHW and be copied by Inductor on every step)."""
    pytest.importorskip("triton")
    r = _run_interpreted(_CONV_IN_SCRIPT)
    assert r.returncode == 0 and "CONV_IN OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])


_CL_CODES_SCRIPT = textwrap.dedent("""
    import os
    import torch
    from torch import nn
    from quantsd.dequant_groups import group_dequant, ungroup_dequant
    from quantsd.nn import QuantConv2d, QuantLinear, dequantize_weight
    from quantsd.quant import quantize_tensor

    torch.manual_seed(0)
    specs = [("c", 16, 7, 3, "pwlq"), ("c", 8, 9, 3, "uniform"), ("l", 24, 13, 8, "pwlq"), ("c", 24, 5, 5, "pwlq"),
             ("c", 16, 16, 1, "uniform"), ("l", 40, 24, 3, "uniform")]   # (kind, in, out, bits or kernel, method)
    def build():
        layers = []
        for n, (kind, i, o, k, method) in enumerate(specs):
            bits = (3, 5, 5, 3, 3, 5)[n]     # (one launch: two widths; both straddle bytes)
            if kind == "c":
                c = nn.Conv2d(i, o, k, padding=k // 2)
                layers.append(QuantConv2d.from_conv(c, quantize_tensor(c.weight.detach(), bits, method, "tensor")))
            else:
                l = nn.Linear(i, o)
                layers.append(QuantLinear.from_linear(l, quantize_tensor(l.weight.detach(), bits, method, "tensor")))
        return nn.Sequential(*layers).half()    # (one group root; never called as a whole)
    torch.manual_seed(0)
    net = build()
    refs = [dequantize_weight(m.weight_packed, m.weight_shape, m.bits, m.method, m.granularity, m.weight_scale,
                              m.weight_breakpoint, torch.float16, backend="torch") for m in net]
    natural = [m.weight_packed.clone() for m in net]
    def layout_ok(w, channels_last):   # channels-last memory (and not NCHW), or NCHW
        if channels_last:
            return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        return w.is_contiguous()
    groups = group_dequant(net, max_bytes=1 << 20, channels_last=True)
    assert len(groups) == 1 and all(m._dq_group is groups[0] for m in net), groups
    g = groups[0]
    cl = [m.codes_channels_last for m in net]
    assert cl == [True, True, False, True, False, False], cl          # the k x k convs: repacked
    assert g.repacked == cl and g.channels_last == cl and g._launch.codes_channels_last == cl
    flat = g._launch.run()
    for k, m in enumerate(net):
        w = g._launch.view(flat, k)
        assert torch.equal(w.view(torch.int16), refs[k].view(torch.int16)), k
        assert layout_ok(w, cl[k]), k
        assert (m._dq_view[2] is not None) == cl[k], (k, m._dq_view)
        # eager: the member's weight is a view of the group's buffer, channels-last where the codes are
        e = m._eager_weight()
        assert torch.equal(e.view(torch.int16), refs[k].view(torch.int16)), k
        assert layout_ok(e, cl[k]), k
    # the compiled member's code path (nn.QuantModule._forward_weight): a channels-last view of the
    # group op's flat buffer, no copy
    real = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: True
    try:
        for k, m in enumerate(net):
            w = m._forward_weight()
            assert torch.equal(w.view(torch.int16), refs[k].view(torch.int16)), k
            assert w._base is not None and w._base.dim() == 1 and w._base.numel() == g.numel, k
            assert w.data_ptr() == w._base.data_ptr() + 2 * g.offsets[k], k
            assert layout_ok(w, cl[k]), k
    finally:
        torch.compiler.is_compiling = real
    # the per-layer kernel (a lone layer) honours the order too
    m = net[0]
    m._dq_group = None
    w = m.dequantized_weight()
    assert torch.equal(w.view(torch.int16), refs[0].view(torch.int16)) and w.permute(0, 2, 3, 1).is_contiguous()
    m._dq_group = g
    # ungrouping restores the natural order byte for byte
    ungroup_dequant(net)
    assert not any(m.codes_channels_last for m in net)
    assert all(torch.equal(m.weight_packed, p) for m, p in zip(net, natural))
    # the removed tile decode: QUANTSD_CL_DECODE asking for it is refused, not silently ignored
    os.environ["QUANTSD_CL_DECODE"] = "codes"    # (what is left: accepted)
    assert net[0].codes_channels_last is False and len(group_dequant(net, max_bytes=1 << 20, channels_last=True)) == 1
    assert net[0].codes_channels_last
    for value in ("tile", "gather"):
        os.environ["QUANTSD_CL_DECODE"] = value
        try:
            group_dequant(net, max_bytes=1 << 20, channels_last=True)
        except ValueError as e:
            assert "QUANTSD_CL_DECODE" in str(e) and "removed" in str(e), e
        else:
            raise AssertionError(f"QUANTSD_CL_DECODE={value} must be refused")
    del os.environ["QUANTSD_CL_DECODE"]
    # a group pickled while the tile decode existed (cl_decode "tile", or older: no "repacked") has
    # channels-last members whose codes were never repacked and whose views say channels-last: it
    # unpickles as a group of NCHW weights (the same bits), its first _ready() re-deriving the views
    from quantsd.dequant_groups import DequantGroup
    ungroup_dequant(net)
    state = group_dequant(net, max_bytes=1 << 20)[0].__getstate__()     # natural codes, as under the tile decode
    tile_views = [m._dq_view[:2] + (((m.weight_shape[0], *m.weight_shape[2:], m.weight_shape[1]) if c else None),)
                  for m, c in zip(net, cl)]
    for old_state in ({**state, "channels_last": cl, "cl_decode": "tile"},
                      {**{k: v for k, v in state.items() if k != "repacked"}, "channels_last": cl}):
        old = DequantGroup.__new__(DequantGroup)
        old.__setstate__(old_state)
        assert old.channels_last == [False] * len(net) and old.repacked == [False] * len(net), old_state
        for m, v in zip(net, tile_views):
            m._dq_group, m._dq_view = old, v
        assert old._ready() and all(m._dq_view[2] is None for m in net)
        for k, m in enumerate(net):
            e = m._eager_weight()
            assert torch.equal(e.view(torch.int16), refs[k].view(torch.int16)) and e.is_contiguous(), k
    # a group pickled under the codes decode (cl_decode "codes"), and one pickled now, keep their layout
    groups = group_dequant(net, max_bytes=1 << 20, channels_last=True)
    g = groups[0]
    for state in ({**g.__getstate__(), "cl_decode": "codes"}, g.__getstate__()):
        new = DequantGroup.__new__(DequantGroup)
        new.__setstate__(state)
        assert new.channels_last == cl and new.repacked == cl, state
    # regrouping for eager forwards (channels_last=False): natural order again
    group_dequant(net, max_bytes=1 << 20, channels_last=True)
    assert net[0].codes_channels_last
    group_dequant(net, max_bytes=1 << 20)
    assert not any(m.codes_channels_last for m in net) and all(m._dq_view[2] is None for m in net)
    assert all(torch.equal(m.weight_packed, p) for m, p in zip(net, natural))
    # the weight prefetcher decodes repacked convs into channels-last and NCHW slots alike
    from quantsd.prefetch import enable_weight_prefetch, disable_weight_prefetch
    ungroup_dequant(net)
    c0 = nn.Conv2d(9, 8, 3, padding=1)
    c0 = QuantConv2d.from_conv(c0, quantize_tensor(c0.weight.detach(), 5, "pwlq", "channel"))  # (a per-layer plan)
    seq = nn.Sequential(c0, nn.SiLU(), net[1]).half()
    x = torch.randn(1, 9, 6, 6).half()
    with torch.inference_mode():
        want = seq(x)
    seq[0].set_codes_channels_last(True)
    seq[2].set_codes_channels_last(True)
    # the per-layer op under torch.compile: its key carries the code order, its output is the view
    m = seq[2]
    assert m._plan_key.endswith(":cl")
    w = torch.ops.quantsd.dequantize(m.weight_packed, m._lut, None, m._lut, m._plan_key, torch.float16)
    assert torch.equal(w.view(torch.int16), refs[1].view(torch.int16)) and layout_ok(w, True)
    compiled = torch.compile(seq, backend="eager", fullgraph=True)
    try:
        with torch.inference_mode():
            torch.testing.assert_close(compiled(x), want, rtol=2e-3, atol=2e-3)
    finally:
        torch._dynamo.reset()
    for slots_cl in (True, False):
        pf = enable_weight_prefetch(seq, ring_bytes=1 << 16, channels_last_convs=slots_cl)
        compiled = torch.compile(seq, backend="eager", fullgraph=True)
        try:
            with torch.inference_mode():
                outs = [compiled(x) for _ in range(3)]
        finally:
            torch._dynamo.reset()
            disable_weight_prefetch(seq)
        assert pf.stats["ahead"] > 0, pf.stats
        for o in outs:
            torch.testing.assert_close(o, want, rtol=2e-3, atol=2e-3)
    print("CL CODES OK")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_channels_last_codes_group_decodes_by_the_flat_path():
    """group_dequant(channels_last=True) stores k x k convs' codes in (O, KH, KW, I) order and decodes
    them with the flat group kernel: the reference's bits (3- and 5-bit layers, odd O), channels-last
    views of the buffer (eager, and the compiled member's view: no copy), the per-layer kernel and the
    prefetcher honour the order, ungrouping restores the natural bytes, QUANTSD_CL_DECODE asking for
    the removed tile decode is refused, and groups pickled under it unpickle as NCHW groups."""
    pytest.importorskip("triton")
    r = _run_interpreted(_CL_CODES_SCRIPT)
    assert r.returncode == 0 and "CL CODES OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])


def test_configure_pipeline_passes_the_group_cap(monkeypatch):
    """configure_pipeline(group_max_bytes=...) (the bench's packed-groups-256) reaches group_pipeline
    as its cap, and eager_runs (packed-roots: False) as runs; None leaves them to the environment and the
    defaults."""
    import quantsd
    from quantsd import dequant_groups as DG
    from quantsd.generate import configure_pipeline

    seen = []
    monkeypatch.setattr(DG, "group_pipeline", lambda pipe, max_bytes, **kw: seen.append((max_bytes, kw)) or 0)
    pipe = quantsd.load_pipeline("tiny")
    configure_pipeline(pipe, group_max_bytes=256 << 20)
    configure_pipeline(pipe)
    configure_pipeline(pipe, eager_runs=False)
    configure_pipeline(pipe, eager_armed_calls=False)      # (the bench's packed-modcall)
    default = {"compiled": False, "prehook": None, "runs": None, "armed_calls": None}
    assert seen == [(256 << 20, default), (None, default), (None, {**default, "runs": False}),
                    (None, {**default, "armed_calls": False})]


def test_eager_cap_follows_the_memory_the_process_may_use(monkeypatch):
    """Eager UNets grouped with no cap given take 384 MiB groups where the process may use at least
    16 GiB of the device and 96 MiB below that (the per-process fraction counts: the bench's max-res
    search emulates a small card with it); regroup_pipeline follows a change of that choice, and
    leaves a given cap, the environment's and a compiled grouping alone."""
    from types import SimpleNamespace

    from quantsd import dequant_groups as DG

    frac = [1.0]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=24 << 30))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: frac[0], raising=False)
    cuda = torch.device("cuda", 0)
    assert DG.eager_max_bytes(cuda) == DG.EAGER_LARGE_MAX_BYTES > DG.EAGER_MAX_BYTES
    frac[0] = 8 / 24
    assert DG.eager_max_bytes(cuda) == DG.EAGER_MAX_BYTES
    assert DG.eager_max_bytes(torch.device("cpu")) == DG.EAGER_MAX_BYTES
    seen = []
    monkeypatch.setattr(DG, "group_dequant",
                        lambda unet, max_bytes, channels_last, prehook=False, runs=False, armed_calls=True:
                        seen.append(max_bytes) or [])
    monkeypatch.setattr(DG, "_device_of", lambda m: cuda)
    monkeypatch.delenv("QUANTSD_GROUP_MAX_MIB", raising=False)
    pipe = SimpleNamespace(unet=nn.Linear(2, 2))
    frac[0] = 1.0
    DG.group_pipeline(pipe, compiled=False)
    assert seen == [DG.EAGER_LARGE_MAX_BYTES] and not DG.regroup_pipeline(pipe)   # nothing changed
    frac[0] = 4 / 24
    assert DG.regroup_pipeline(pipe) and seen[-1] == DG.EAGER_MAX_BYTES
    frac[0] = 1.0
    assert DG.regroup_pipeline(pipe) and seen[-1] == DG.EAGER_LARGE_MAX_BYTES
    for kw in ({"compiled": False, "max_bytes": 5 << 20}, {"compiled": True}):
        DG.group_pipeline(pipe, **kw)
        frac[0], n = 4 / 24, len(seen)
        assert not DG.regroup_pipeline(pipe) and len(seen) == n
        frac[0] = 1.0
    monkeypatch.setenv("QUANTSD_GROUP_MAX_MIB", "64")
    DG.group_pipeline(pipe, compiled=False)
    frac[0] = 4 / 24
    assert seen[-1] == 64 << 20 and not DG.regroup_pipeline(pipe)
    assert not DG.regroup_pipeline(SimpleNamespace(unet=nn.Linear(2, 2)))   # never grouped


def test_arming_forward_wraps_what_was_there_and_disarms_on_error():
    """A prehook root's forward is set on the instance (no hook: nn.Module.__call__ keeps its fast
    path): it arms the groups, runs the forward that was there -- the class's, or one already set on
    the instance (accelerate's hooks do that) -- and disarms even when that raises; removing it
    restores exactly what was there, and a deep copy arms its own groups."""
    import copy

    from quantsd.dequant_groups import _ArmingForward, arming_forwards

    log = []

    class Group:
        def arm(self, pool):
            log.append(("arm", pool))

        def disarm(self):
            log.append("disarm")

    lin = nn.Linear(2, 2)
    x = torch.ones(1, 2)
    want = lin(x)
    armer = _ArmingForward.install(lin, [Group()], "pool")
    assert lin.forward is armer and not lin._forward_pre_hooks and arming_forwards(lin) == [armer]
    assert torch.equal(lin(x), want) and log == [("arm", "pool"), "disarm"]
    twin = copy.deepcopy(lin)
    assert twin.forward.module is twin and twin.forward.groups[0] is not armer.groups[0]
    _ArmingForward.remove(lin)
    assert "forward" not in lin.__dict__ and torch.equal(lin(x), want) and arming_forwards(lin) == []
    # a forward already on the instance is kept inside, and comes back on removal
    log.clear()
    own = lambda t: t * 3  # noqa: E731
    lin.forward = own
    _ArmingForward.install(lin, [Group()], None)
    assert torch.equal(lin(x), x * 3) and log == [("arm", None), "disarm"]
    _ArmingForward.remove(lin)
    assert lin.forward is own
    # the forward raises: the groups are still disarmed
    del lin.forward
    log.clear()
    _ArmingForward.install(lin, [Group()], None)
    with pytest.raises(RuntimeError):
        lin(torch.ones(1, 3))        # wrong width: F.linear raises inside the class's forward
    assert log == [("arm", None), "disarm"]


def test_c_launcher_binds_only_the_checked_launcher_layout():
    """The C-launcher shortcut is taken only for a launcher shaped like Triton 3.6's (no scratch
    memory, no sanitizer, no generic-launcher argument tables); its head is what that launcher's
    Python wrapper passes before the kernel's arguments, in order."""
    pytest.importorskip("triton")
    from quantsd.kernels import dequant

    def launch(*args):
        return args

    class CudaLauncher:
        def __init__(self, **kw):
            self.launch, self.launch_cooperative_grid, self.launch_pdl = launch, False, True
            self.global_scratch_size = self.profile_scratch_size = 0
            self.__dict__.update(kw)

    class Kernel:
        def __init__(self, run):
            self.run, self.function, self.packed_metadata = run, 1234, (4, 1, 0)

    bound = dequant.c_launcher(Kernel(CudaLauncher()))
    assert bound == (launch, (1234, False, True, None, None, (4, 1, 0), None, None, None))
    for kw in ({"global_scratch_size": 64}, {"profile_scratch_size": 8}, {"gsan_enabled": True},
               {"arg_annotations": ()}):
        assert dequant.c_launcher(Kernel(CudaLauncher(**kw))) is None, kw
    assert dequant.c_launcher(Kernel(object())) is None

    class OtherLauncher(CudaLauncher):
        pass

    OtherLauncher.__name__ = "HIPLauncher"
    assert dequant.c_launcher(Kernel(OtherLauncher())) is None


_RUNS_SCRIPT = _SCRIPT.split("net = Net().half().eval()")[0] + textwrap.dedent("""
    import copy
    FAIL = [None]

    class FBlock(Block):
        def forward(self, x):
            if FAIL[0] is self:
                raise RuntimeError("boom")
            return super().forward(x)

    class Interleaved(nn.Module):      # registered attentions first, run resnet 0, attention 0, ...
        def __init__(self):
            super().__init__()
            self.attns = nn.ModuleList([FBlock(8), FBlock(8)])
            self.resnets = nn.ModuleList([FBlock(8), FBlock(8)])
            self.head = qlin(8, 8, 8)
        def forward(self, x):
            for r, a in zip(self.resnets, self.attns):
                x = a(r(x))
            return self.head(x.mean((2, 3)))

    net = Interleaved().half().eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float16)
    with torch.no_grad():
        ref = net(x)
        alone = net.resnets[1](x)
        groups = DG.group_dequant(net, max_bytes=6000, prehook=True, runs=True)
        assert sorted(len(g.members) for g in groups) == [1, 5, 5, 5, 5]
        pool = DG.slot_pools(net)[0]
        # the first forward runs one group per root, learning their order; then runs merge under the cap
        assert torch.equal(net(x), ref)
        assert DG.launch_counts(net)["groups"] == 2
        armers = DG.arming_forwards(net)
        starts = [a.module for a in armers if type(a).__name__ == "_RunStart"]
        ends = [a.module for a in armers if type(a).__name__ == "_RunEnd"]
        assert starts == [net.resnets[0], net.resnets[1]] and set(ends) == {net.attns[0], net.head}
        assert "forward" not in net.attns[1].__dict__          # a root inside a run arms nothing
        runs = {id(m._dq_group): m._dq_group for m in (net.resnets[0].q, net.resnets[1].q)}
        assert len(runs) == 2 and net.head._dq_group is net.resnets[1].q._dq_group
        assert pool.numel >= max(g.numel for g in runs.values())
        # members take the handed-over weights across roots: never the checked path
        real_weight = DG.DequantGroup.weight
        DG.DequantGroup.weight = lambda self, i: (_ for _ in ()).throw(AssertionError("checked path taken"))
        try:
            before = [g.launches for g in runs.values()]
            for _ in range(2):
                assert torch.equal(net(x), ref)
            assert [g.launches - b for g, b in zip(runs.values(), before)] == [2, 2]
        finally:
            DG.DequantGroup.weight = real_weight
        assert pool.busy == [False] and pool.flats[0].untyped_storage().nbytes() == 0
        assert all(g._slot is None and all(m._armed is None for m in g.members) for g in runs.values())
        # a root inside a run that raises: the model's hook takes the run's weights back
        FAIL[0] = net.attns[1]
        try:
            net(x)
        except RuntimeError:
            pass
        else:
            raise AssertionError("expected the forward to raise")
        FAIL[0] = None
        assert all(g._slot is None and all(m._armed is None for m in g.members) for g in runs.values())
        assert pool.busy == [False] and torch.equal(net(x), ref)
        # a root called on its own (out of its run): the checked path, same weights
        assert torch.equal(net.resnets[1](x), alone)
        # a deep copy plans nothing again and runs on its own pool
        twin = copy.deepcopy(net)
        assert DG.slot_pools(twin)[0] is not pool and torch.equal(twin(x), ref)
        assert DG.launch_counts(twin)["groups"] == 2
        # ungrouping removes the run forwards and the planner
        for model in (net, twin):
            DG.ungroup_dequant(model)
            assert not DG.arming_forwards(model) and not model._forward_hooks
            assert torch.equal(model(x), ref)
        # planned inside trusted_weights (generate's first call): the trust ends with the context
        DG.group_dequant(net, max_bytes=6000, prehook=True, runs=True)
        pool = DG.slot_pools(net)[0]
        with DG.trusted_weights(net):
            assert torch.equal(net(x), ref) and torch.equal(net(x), ref)
            assert DG.launch_counts(net)["groups"] == 2 and pool.trust != 0
        assert pool.trust == 0
        net.resnets[0].k.weight_scale.mul_(2)          # an edit after the context is seen
        edited = net(x)
        DG.ungroup_dequant(net)
        assert torch.equal(net(x), edited) and not torch.equal(edited, ref)

        class Twice(nn.Module):     # a root run twice in one forward: no runs, one group per root
            def __init__(self):
                super().__init__()
                self.a, self.b, self.c = FBlock(8), FBlock(8), FBlock(8)
            def forward(self, x):       # (a and b would fit one group of 6000 bytes)
                return self.c(self.b(self.a(self.a(x))))

        twice = Twice().half().eval()
        want = twice(x)
        DG.group_dequant(twice, max_bytes=6000, prehook=True, runs=True)
        for _ in range(2):
            assert torch.equal(twice(x), want)
        assert DG.launch_counts(twice)["groups"] == 3
        assert [type(a).__name__ for a in DG.arming_forwards(twice)] == ["_ArmingForward"] * 3
    print("RUNS OK")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_eager_runs_merge_roots_in_execution_order_under_interpreter():
    """group_dequant(prehook=True, runs=True): the first forward learns the order the roots run in
    (interleaved ModuleLists here, registered in another order), then consecutive roots share one
    group under the cap -- armed by the run's first root, taken back by its last; same bits as
    ungrouped, members never take the checked path inside the run, a forward that raises mid-run
    leaves nothing armed, a root called alone still correct, deep copies and ungrouping work, and a
    plan made inside trusted_weights does not outlive its trust."""
    r = _run_interpreted(_RUNS_SCRIPT)
    assert r.returncode == 0 and "RUNS OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_group_pipeline_takes_runs_from_the_argument_or_the_environment(monkeypatch):
    """Execution-order runs are on by default for eager prehook groups (measured faster on the H200,
    session 17); QUANTSD_EAGER_RUNS=0 or runs=False turns them off, the argument wins over the
    environment, and compiled or checked groups never merge."""
    from quantsd import dequant_groups as DG

    seen = []
    monkeypatch.setattr(DG, "group_dequant", lambda unet, max_bytes, channels_last, prehook=False, runs=False, armed_calls=True:
                        seen.append((prehook, runs)) or [])
    pipe = type("Pipe", (), {"unet": nn.Linear(2, 2)})()
    monkeypatch.delenv("QUANTSD_EAGER_RUNS", raising=False)
    DG.group_pipeline(pipe, compiled=False)
    DG.group_pipeline(pipe, compiled=False, runs=False)
    monkeypatch.setenv("QUANTSD_EAGER_RUNS", "0")
    DG.group_pipeline(pipe, compiled=False)
    DG.group_pipeline(pipe, compiled=False, runs=True)
    DG.group_pipeline(pipe, compiled=True)
    DG.group_pipeline(pipe, compiled=False, prehook=False)
    monkeypatch.setenv("QUANTSD_EAGER_RUNS", "1")
    DG.group_pipeline(pipe, compiled=False)
    assert seen == [(True, True), (True, False), (True, False), (True, True), (False, False), (False, False),
                    (True, True)]
