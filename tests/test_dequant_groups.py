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

        # any call order stays correct: a member taken twice relaunches its group
        b0 = net.blocks[0]
        g = b0.q._dq_group
        w1 = b0.q._forward_weight()
        w2 = b0.q._forward_weight()
        assert torch.equal(w1, b0.q.dequantized_weight()) and torch.equal(w2, w1) and w1.data_ptr() != w2.data_ptr()
        assert g.launches == 4
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

        # a cap below every block's size: the blocks' layers run alone
        assert all(gg.dense_bytes <= 4096 for gg in groups)
        assert DG.group_dequant(net, max_bytes=2600) == []
        groups = DG.group_dequant(net, max_bytes=4096)
        out = net(x)
        DG.ungroup_dequant(net)
        assert all(m._dq_group is None for _, m in packed_modules(net))
        assert torch.equal(out, net(x))

        # torch.compile traces the per-layer path (no grouped launches inside the graph; the fused
        # dequant-GEMM, which rounds differently, off for this exact comparison)
        from quantsd.kernels import fused
        fused.set_max_rows(0)
        groups = DG.group_dequant(net)
        comp = torch.compile(net, backend="aot_eager", fullgraph=True)
        got = comp(x)
        assert torch.equal(got, net(x))
        print("GROUPS OK")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_grouped_dequant_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "GROUPS OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])


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


def test_group_needs_two_layers():
    from quantsd.dequant_groups import DequantGroup

    with pytest.raises(ValueError, match="two or more"):
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
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _GENERATE_SCRIPT % str(REPO / "recipes" / "paper-final.yaml"),
                        str(tmp_path / "ck")], env=env, capture_output=True, text=True, timeout=900)
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
