"""quantsd.prefetch: decode-ahead of packed weights in compiled forwards (ring plan, order, fallbacks)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from quantsd.nn import QuantConv2d, QuantLinear
from quantsd.prefetch import (ALIGN, PREFETCH_OP, disable_weight_prefetch, enable_weight_prefetch, plan_ring,
                              prefetcher_of)
from quantsd.quant import quantize_tensor

REPO = Path(__file__).resolve().parents[1]


def _chunk_issue_points(plan):
    at = {c: -1 for c in plan.initial}
    for q, cs in enumerate(plan.issue_at):
        for c in cs:
            assert c not in at, "a chunk is issued twice"
            at[c] = q
    assert sorted(at) == list(range(len(plan.chunks)))      # every chunk exactly once
    return at


@pytest.mark.parametrize("seed", range(12))
def test_ring_plan_never_overwrites_a_weight_before_its_layer_ran(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 100, 256, 300, 4096, 10_000, 70_000]) for _ in range(rng.randint(1, 60))]
    ring, regions = rng.choice([4096, 20_000, 65_536, 200_000]), rng.choice([1, 2, 3])
    plan = plan_ring(sizes, ring, regions)
    at = _chunk_issue_points(plan)
    chunk_of = {p: c for c, ps in enumerate(plan.chunks) for p in ps}
    region = ring // regions // ALIGN * ALIGN
    size = lambda p: -(-sizes[p] // ALIGN) * ALIGN  # noqa: E731
    for c, ps in enumerate(plan.chunks):
        assert ps == sorted(ps) and at[c] < ps[0]                   # decoded before its first layer runs
        assert sum(size(p) for p in ps) <= region
        assert [p for p in ps if plan.wait_at[p] is not None] == [ps[0]] and plan.wait_at[ps[0]] == c
    for p, off in enumerate(plan.offsets):
        if off is None:   # too large for a region (or empty): decoded in place, in no chunk
            assert (sizes[p] == 0 or size(p) > region) and p not in chunk_of and plan.wait_at[p] is None
            continue
        assert off % ALIGN == 0 and 0 <= off and off + size(p) <= ring
        for r in range(p + 1, len(sizes)):                 # a later weight sharing bytes with p ...
            o = plan.offsets[r]
            if o is not None and o < off + size(p) and off < o + size(r):
                assert at[chunk_of[r]] >= p                # ... is decoded only after p's layer ran


def test_ring_plan_examples():
    plan = plan_ring([1000, 2000, 3000], 1 << 20)
    assert plan.chunks == [[0, 1, 2]] and plan.initial == [0] and not any(plan.issue_at)
    assert plan.wait_at == [0, None, None]
    tight = plan_ring([1000, 1000, 1000], 2048, regions=2)   # one layer per region: chunk 2 reuses region 0
    assert tight.offsets == [0, 1024, 0] and tight.initial == [0, 1] and tight.issue_at == [[2], [], []]
    with pytest.raises(ValueError, match="regions"):
        plan_ring([1], 1024, regions=0)


def _chain(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    convs = [nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
             nn.Conv2d(8, 4, 1)]
    lins = [nn.Linear(64, 96), nn.Linear(96, 64, bias=False), nn.Linear(64, 64)]
    qconv = [QuantConv2d.from_conv(c, quantize_tensor(c.weight.detach(), b, m, g)) for c, (b, m, g) in
             zip(convs, [(4, "pwlq", "tensor"), (3, "uniform", "channel"), (8, "pwlq", "tensor")])]
    qlin = [QuantLinear.from_linear(l, quantize_tensor(l.weight.detach(), b, m, g)) for l, (b, m, g) in
            zip(lins, [(4, "uniform", "tensor"), (2, "pwlq", "channel"), (6, "stochastic", "tensor")])]

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(qconv)
            self.lins = nn.ModuleList(qlin)

        def forward(self, x):
            for c in self.convs:
                x = torch.relu(c(x))
            x = x.flatten(1)
            for l in self.lins:
                x = torch.tanh(l(x))
            return x

    return Chain().to(device, dtype).eval()


def test_compiled_prefetch_equals_eager_and_reuses_a_small_ring():
    model = _chain()
    x = torch.randn(2, 4, 4, 4)
    with torch.inference_mode():
        want = model(x)
    pf = enable_weight_prefetch(model, ring_bytes=65536)  # smaller than all weights together: region 0 reused
    assert [m._prefetch_slot[1] for m in pf.layers] == list(range(6))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    try:
        with torch.inference_mode():
            outs = [compiled(x) for _ in range(3)]
    finally:
        torch._dynamo.reset()
    assert all(torch.equal(o, want) for o in outs)
    assert pf.order == list(range(6))                        # recorded by the first compiled forward
    assert pf.stats["forwards"] == 2 and pf.stats["ahead"] == 12  # then two planned forwards, all 6 layers ahead
    assert pf._plan.issue_at[3] == [2] and pf._ring is None     # region 0 reused within a forward; ring dropped after


def test_another_order_falls_back_then_is_recorded_again():
    model = _chain()
    pf = enable_weight_prefetch(model, ring_bytes=4096)
    x = torch.randn(2, 64)

    def forward(order):
        h = x
        for i in order:
            layer = pf.layers[i]
            inp = h if layer.in_features == h.shape[-1] else torch.ones(2, layer.in_features)
            got = PREFETCH_OP(inp, pf.id, i)
            assert torch.equal(got, layer.compute(inp, layer.dequantized_weight()))
            h = got
        return h

    forward([3, 4, 5])
    forward([3, 4, 5])                       # planned
    assert pf.order == [3, 4, 5] and pf.stats["forwards"] == 1
    forward([3, 5, 4])                       # differs at position 1: the rest in place
    assert not pf._active and pf.order == [3, 4, 5]
    forward([3, 5, 4])                       # differs again: recorded anew from its start
    forward([3, 5, 4])
    assert pf.order == [3, 5, 4] and pf.stats["order_changes"] == 1 and pf._active is False


def test_disable_and_errors():
    model = _chain()
    pf = enable_weight_prefetch(model)
    assert prefetcher_of(model) is pf and pf.ring_bytes >= 64 << 20
    disable_weight_prefetch(model)
    assert prefetcher_of(model) is None and all(m._prefetch_slot is None for m in pf.layers)
    with pytest.raises(RuntimeError, match="compile the model again"):
        PREFETCH_OP(torch.randn(2, 64), pf.id, 3)
    with pytest.raises(ValueError, match="model, not one layer"):
        enable_weight_prefetch(pf.layers[0])
    with pytest.raises(ValueError, match="no packed"):
        enable_weight_prefetch(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="ring_bytes"):
        enable_weight_prefetch(model, ring_bytes=0)


def test_configure_pipeline_refuses_prefetch_without_compile(tiny_pipe):
    from quantsd.generate import configure_pipeline

    with pytest.raises(ValueError, match="--compile"):
        configure_pipeline(tiny_pipe, prefetch_weights=True)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_graph_of_prefetched_layers_is_bit_exact_over_many_replays(channels_last):
    """Side-stream decodes into a reused ring, captured in one CUDA graph: every replay with new
    inputs gives exactly the per-layer dequant + op outputs (a hazard would show as a mismatch)."""
    model = _chain(torch.float16, "cuda")
    pf = enable_weight_prefetch(model, ring_bytes=32768,   # the last linear reuses the convs' region
                                channels_last_convs=channels_last)
    layers = pf.layers
    x = torch.randn(2, 4, 4, 4, device="cuda", dtype=torch.float16)

    def run(fn, x):
        h = x
        for i in range(3):
            h = torch.relu(fn(i, h))
        h = h.flatten(1)
        for i in range(3, 6):
            h = torch.tanh(fn(i, h))
        return h

    def weight(i):
        w = layers[i].dequantized_weight()
        return w.contiguous(memory_format=torch.channels_last) if pf.channels_last(layers[i], w.device) else w

    def reference(x):
        return run(lambda i, h: layers[i].compute(h, weight(i)), x)

    def prefetched(x):
        return run(lambda i, h: PREFETCH_OP(h, pf.id, i), x)

    with torch.inference_mode():
        prefetched(x)            # records the order
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            prefetched(x)        # a planned forward outside the capture
        torch.cuda.current_stream().wait_stream(s)
        static_x = x.clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = prefetched(static_x)
        for k in range(20):
            static_x.copy_(torch.randn_like(x))
            g.replay()
            assert torch.equal(static_y, reference(static_x)), k
    assert pf.stats["ahead"] == 12 and any(pf._plan.issue_at)


@pytest.mark.gpu
def test_compiled_cuda_graph_tiny_unet_with_prefetch_matches_without(packed_tiny_unet_cuda):
    unet, lat, ctx = packed_tiny_unet_cuda
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            plain = torch.compile(unet, mode="reduce-overhead")
            want = [plain(lat, 10, encoder_hidden_states=ctx).sample.clone() for _ in range(3)][-1]
            torch._dynamo.reset()
            pf = enable_weight_prefetch(unet, ring_bytes=1 << 16)
            fast = torch.compile(unet, mode="reduce-overhead")
            got = [fast(lat, 10, encoder_hidden_states=ctx).sample.clone() for _ in range(4)]
    finally:
        torch._dynamo.reset()
        disable_weight_prefetch(unet)
    assert pf.stats["forwards"] >= 1 and pf.stats["ahead"] > 0
    for o in got:
        torch.testing.assert_close(o, want, rtol=2e-2, atol=2e-2)


def test_channels_last_conv_slots_keep_outputs():
    model = _chain()
    x = torch.randn(2, 4, 4, 4)
    with torch.inference_mode():
        want = model(x)
    pf = enable_weight_prefetch(model, ring_bytes=65536, channels_last_convs=True)
    assert [pf.channels_last(m, x.device) for m in pf.layers] == [True, True, False, False, False, False]
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    try:
        with torch.inference_mode():
            outs = [compiled(x) for _ in range(3)]
            w = pf._slot(0, pf.layers[0]) if pf._ring is not None else None
    finally:
        torch._dynamo.reset()
    assert w is None                              # (the ring lives only while a forward runs)
    for o in outs:
        torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-6)


_CL_SCRIPT = textwrap.dedent("""
    import torch
    from quantsd.kernels.dequant import launch_into, prepare, value_table, level_table
    from quantsd.nn import dequantize_weight
    from quantsd.quant import quantize_tensor
    n = 0
    for bits in (2, 3, 4, 8):
        for method, gran in (("pwlq", "tensor"), ("uniform", "channel"), ("pwlq", "channel")):
            for shape in ((5, 3, 3, 3), (4, 7, 1, 3), (3, 2, 5, 5)):
                for dtype in (torch.float16, torch.bfloat16, torch.float32):
                    w = torch.randn(shape)
                    qt = quantize_tensor(w, bits, method, gran)
                    packed = qt.pack()
                    plan = prepare(shape, bits, method, gran)
                    bp = qt.breakpoint
                    lut = value_table(bits, method, qt.scale, bp) if plan.table else level_table(bits, method, "cpu")
                    args = (packed, lut, None, lut) if plan.table else (packed, qt.scale, bp, lut)
                    out = torch.empty(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
                    launch_into(plan, *args, out)
                    ref = dequantize_weight(packed, shape, bits, method, gran, qt.scale, bp, dtype, backend="torch")
                    assert out.is_contiguous(memory_format=torch.channels_last)
                    assert torch.equal(out.float(), ref.float()), (bits, method, gran, shape, dtype)
                    n += 1
    print("CASES", n)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_channels_last_decode_is_bit_exact_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _CL_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CASES 108" in r.stdout, r.stdout


@pytest.mark.parametrize("channels_last", [False, True])
def test_inductor_accepts_the_ops_layouts(channels_last):
    """Inductor checks every custom op's output against its fake impl's sizes and strides: the op
    states (and enforces) channels-last outputs for convolutions in channels-last mode, whatever the
    backend's convolution would pick."""
    import torch._inductor.config as icfg

    model = _chain()
    x = torch.randn(2, 4, 4, 4)
    with torch.inference_mode():
        want = model(x)
    pf = enable_weight_prefetch(model, ring_bytes=65536, channels_last_convs=channels_last)
    compiled = torch.compile(model, fullgraph=True)
    try:   # (a cached graph would skip the fake impl)
        with torch.inference_mode(), icfg.patch(force_disable_caches=True):
            outs = [compiled(x) for _ in range(3)]
    finally:
        torch._dynamo.reset()
    assert pf.stats["forwards"] == 2 and pf.stats["ahead"] == 12
    for o in outs:
        torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-6)


def test_generate_cli_refuses_prefetch_without_compile(tmp_path):
    from click.testing import CliRunner

    from quantsd.cli import main

    r = CliRunner().invoke(main, ["generate", "-m", "tiny", "-p", "a cat", "--steps", "1", "--prefetch-weights",
                                  "-o", str(tmp_path / "a.png")])
    assert r.exit_code != 0 and "--compile" in r.output, r.output
    assert not (tmp_path / "a.png").exists()
