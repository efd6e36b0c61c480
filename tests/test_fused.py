"""Fused dequant-GEMM (quantsd.kernels.fused): the packed layers' output without a dense weight.

* CPU: the kernel under the Triton interpreter (subprocess, TRITON_INTERPRET=1) against a float64
  product with the reference-decoded weight, for linear and convolution geometries, both 16-bit
  dtypes, split-K and direct; which path torch.compile takes; the kernel compiles for sm_90.
* GPU (``-m gpu``): the same comparison against dequantize + cuBLAS/cuDNN for every bits 2..8 x
  method x granularity, and a compiled, CUDA-graphed packed model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quantsd.kernels import fused
from quantsd.quant import METHODS, quantize_tensor

REPO = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# a fused output vs the float64 product of the same (decoded) operands: only the output's rounding
# and float32 accumulation differ (relative to the output's largest magnitude)
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _run_interpreted(script: str) -> str:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _layer_case(kind: str, bits: int, method: str, gran: str, dtype, geometry, device="cpu", seed=0):
    """A packed layer (QuantLinear/QuantConv2d, bias on) of random weights, and an input for it."""
    from quantsd.nn import QuantConv2d, QuantLinear

    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        rows, n, k = geometry
        dense = torch.nn.Linear(k, n)
        with torch.no_grad():
            dense.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        q = QuantLinear.from_linear(dense, quantize_tensor(dense.weight.detach(), bits, method, gran, seed=seed))
        x = torch.randn(rows, k, generator=g)
    else:
        b, cin, cout, kernel, stride, pad, dil, h, w = geometry
        dense = torch.nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, dilation=dil)
        with torch.no_grad():
            dense.weight.copy_(torch.randn(dense.weight.shape, generator=g) * 0.05)
        q = QuantConv2d.from_conv(dense, quantize_tensor(dense.weight.detach(), bits, method, gran, seed=seed))
        x = torch.randn(b, cin, h, w, generator=g)
    return q.to(device, dtype), x.to(device, dtype)


def _reference(q, x) -> torch.Tensor:
    """float64 op with the reference-decoded weight (in the compute dtype) and bias."""
    from quantsd.nn import QuantLinear

    w = q.dequantized_weight().double()
    b = q.bias.double()
    if isinstance(q, QuantLinear):
        return F.linear(x.double(), w, b)
    return F.conv2d(x.double(), w, b, q.stride, q.padding, q.dilation)


def _fused_call(q, x, config=None):
    from quantsd.nn import QuantLinear, kernel_args

    p = kernel_args(q)
    if isinstance(q, QuantLinear):
        return fused.fused_linear(x, q._plan, *p, q.bias, config)
    return fused.fused_conv2d(x, q._plan, *p, q.bias, q.stride, q.padding, q.dilation, config)


def _assert_decodes_exactly(q) -> None:
    """Identity input, no bias: every output is one product 1 * w (exact in float32, and already a
    value of the compute dtype), so the fused product must equal the reference-decoded weight bit for
    bit: the in-register decode is the reference's (bf16 only on the GPU: the interpreter truncates)."""
    from quantsd.nn import kernel_args

    n, k = q.weight_shape
    eye = torch.eye(k, dtype=q.compute_dtype, device=q.weight_packed.device)
    want = q.dequantized_weight().t()
    for cfg in (None, fused.FusedConfig(16, 16, 16, 1, 4), fused.FusedConfig(16, 32, 16, 3, 4)):
        got = fused.fused_linear(eye, q._plan, *kernel_args(q), None, cfg)
        assert torch.equal(got.view(torch.int16), want.contiguous().view(torch.int16)), cfg


def _rel_err(got, ref) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


CONV_GEOMETRIES = [   # batch, in, out, kernel, stride, padding, dilation, H, W
    (2, 6, 20, 3, 1, 1, 1, 5, 7),
    (1, 5, 18, 3, 2, 1, 1, 9, 8),
    (2, 8, 16, 1, 1, 0, 1, 4, 4),
    (1, 4, 12, 3, 1, 2, 2, 6, 6),
    (2, 3, 7, (3, 1), (1, 2), (1, 0), 1, 5, 6),
]

_INTERP_SCRIPT = textwrap.dedent("""
    import torch, test_fused as T
    from quantsd.kernels import fused
    cases = [("linear", 4, "pwlq", "tensor", (37, 50, 72)), ("linear", 8, "pwlq", "tensor", (2, 24, 40)),
             ("linear", 3, "uniform", "channel", (19, 33, 45)), ("linear", 5, "pwlq", "group:8", (16, 16, 64)),
             ("linear", 2, "pwlq-stochastic", "channel", (7, 20, 30)), ("linear", 7, "stochastic", "tensor", (9, 17, 33)),
             ("linear", 2, "pwlq", "tensor", (5, 24, 40)), ("linear", 4, "uniform", "tensor", (6, 19, 45))]
    cases += [("conv", b, m, g, geo) for (b, m, g), geo in zip(
        [(4, "pwlq", "tensor"), (3, "uniform", "channel"), (8, "pwlq", "tensor"), (5, "pwlq", "group:12"),
         (6, "stochastic", "tensor")], T.CONV_GEOMETRIES)]
    worst = {}
    for i, (kind, bits, method, gran, geo) in enumerate(cases):
        for dtype in (torch.float16, torch.bfloat16):
            q, x = T._layer_case(kind, bits, method, gran, dtype, geo, seed=i)
            if kind == "conv" and i % 2:
                x = x.contiguous(memory_format=torch.channels_last)
            ref = T._reference(q, x)
            for cfg in (None, fused.FusedConfig(16, 16, 16, 1, 4), fused.FusedConfig(16, 32, 16, 3, 4)):
                got = T._fused_call(q, x, cfg)
                assert got.shape == ref.shape and got.dtype == dtype, (got.shape, ref.shape)
                e = T._rel_err(got, ref)
                worst[dtype] = max(worst.get(dtype, 0.0), e)
                assert e <= T.TOL[dtype], (kind, bits, method, gran, geo, dtype, cfg, e)
            # deterministic: the same bits twice (split-K partials summed in a fixed order)
            cfg = fused.FusedConfig(16, 16, 16, 3, 4)
            assert torch.equal(T._fused_call(q, x, cfg), T._fused_call(q, x, cfg))
            if kind == "linear" and dtype == torch.float16:
                T._assert_decodes_exactly(q)
    print("WORST", {str(k): v for k, v in worst.items()}, "CASES", len(cases))
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_fused_kernel_matches_reference_product_under_interpreter():
    out = _run_interpreted(_INTERP_SCRIPT)
    assert "CASES 13" in out, out


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, tempfile, torch, test_fused as T
    from quantsd.kernels import fused
    from quantsd.kernels.dequant import plan_key
    fused.set_max_rows(256)   # (off by default)
    graphs = []
    def grab(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward
    def compiled(q, x, reset=True):
        if reset:
            torch._dynamo.reset()
        graphs.clear()
        with torch.no_grad():
            out = torch.compile(q, backend=grab, fullgraph=True)(x)
        return out, (graphs[-1] if graphs else None)
    for kind, geo in (("linear", (6, 40, 96)), ("conv", T.CONV_GEOMETRIES[0])):
        q, x = T._layer_case(kind, 4, "pwlq", "tensor", torch.float16, geo)
        rows = x.shape[0] if kind == "linear" else q._output_rows(x)
        with torch.no_grad():
            eager = q(x)
        out, graph = compiled(q, x)
        assert "quantsd.fused_" in graph and "quantsd.dequantize" not in graph, graph
        assert T._rel_err(out, T._reference(q, x)) <= T.TOL[torch.float16]
        if kind == "conv":   # the fused conv's output is channels-last in memory
            assert out.is_contiguous(memory_format=torch.channels_last)
        # a new input shape (Dynamo then compiles with dynamic sizes): still one graph, still correct
        x3 = torch.cat([x, x[:1]])
        out3, graph3 = compiled(q, x3, reset=False)
        assert T._rel_err(out3, T._reference(q, x3)) <= T.TOL[torch.float16]
        fused.set_max_rows(0)    # switched off without a reset: the graph is re-traced (guard on MAX_ROWS)
        out, graph = compiled(q, x, reset=False)
        assert graph is not None and "quantsd.dequantize" in graph and "quantsd.fused_" not in graph, graph
        assert torch.equal(out, eager)
        fused.set_max_rows(rows - 1)   # one row more than the limit: not fused
        out, graph = compiled(q, x)
        assert "quantsd.fused_" not in graph
        fused.set_max_rows(rows)       # exactly the limit: fused
        out, graph = compiled(q, x)
        assert "quantsd.fused_" in graph
        fused.set_max_rows(256)
        # a tuning table: fused only where it measured faster, with its launch shape
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump([{"kind": kind, "plan": q._plan_key, "M": rows, "config": [16, 16, 16, 2, 4],
                        "fused_ms": 2.0, "unfused_ms": 1.0}], f)
        fused.load_tuned(f.name)
        out, graph = compiled(q, x)
        assert "quantsd.fused_" not in graph            # measured slower
        fused._TUNED.clear()
        with open(f.name, "w") as g:
            json.dump([{"kind": kind, "plan": q._plan_key, "M": rows, "config": [16, 16, 16, 2, 4],
                        "fused_ms": 1.0, "unfused_ms": 2.0}], g)
        fused.load_tuned(f.name)
        out, graph = compiled(q, x)
        assert "quantsd.fused_" in graph                # measured faster
        assert T._rel_err(out, T._reference(q, x)) <= T.TOL[torch.float16]
        out3, graph3 = compiled(q, x3, reset=False)     # a shape the table does not list: not fused
        assert graph3 is None or "quantsd.fused_" not in graph3
        fused._TUNED.clear()
        q32, x32 = q.float(), x.float()   # float32 compute is not fused (tensor cores would round it)
        out, graph = compiled(q32, x32)
        assert "quantsd.fused_" not in graph
        # eager forwards never take the fused path, even when it is on
        real = fused.LINEAR_OP, fused.CONV_OP
        def boom(*a, **k):
            raise AssertionError("fused op called in eager mode")
        fused.LINEAR_OP = fused.CONV_OP = boom
        q16 = q.half()
        with torch.no_grad():
            assert torch.equal(q16(x), eager)
        fused.LINEAR_OP, fused.CONV_OP = real
    print("COMPILE PATHS OK")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_compiled_layers_take_the_fused_path_for_few_rows():
    assert "COMPILE PATHS OK" in _run_interpreted(_COMPILE_SCRIPT)


@pytest.mark.parametrize("M,N,K,bits", [(2, 1280, 320, 8), (128, 1280, 11520, 4), (154, 320, 768, 8),
                                        (512, 1280, 1280, 4), (1, 7, 9, 3)])
def test_choose_config_bounds(M, N, K, bits):
    pytest.importorskip("triton")
    cfg = fused.choose_config(M, N, K, bits, 132)
    for b in (cfg.block_m, cfg.block_n, cfg.block_k):
        assert b >= 16 and b & (b - 1) == 0          # tl.dot needs powers of two >= 16
    assert cfg.block_m >= min(M, 64) and cfg.block_m * cfg.block_n * cfg.block_k <= 64 * 64 * 32   # no spills
    assert cfg.split >= 1
    if cfg.split > 1:   # float32 partials stay under half the packed weight bytes, >= 4 K steps a split
        assert cfg.split * M * N * 4 <= N * K * bits / 8 / 2
        assert K // cfg.split >= 4 * cfg.block_k


def test_tuned_table_sets_launch_shapes_and_which_shapes_fuse(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    import json

    from quantsd.kernels.dequant import plan_key, prepare

    conv = plan_key(prepare((640, 640, 3, 3), 4, "pwlq", "tensor"))
    lin = plan_key(prepare((320, 768), 8, "pwlq", "tensor"))
    p = tmp_path / "tuned.json"
    p.write_text(json.dumps([
        {"kind": "conv", "plan": conv, "M": 128, "config": [64, 64, 32, 4, 4], "fused_ms": 0.01, "unfused_ms": 0.02},
        {"kind": "linear", "plan": lin, "M": 154, "config": [64, 32, 32, 1, 4], "fused_ms": 0.03,
         "unfused_ms": 0.02}]))
    monkeypatch.setattr(fused, "MAX_ROWS", 256)
    try:
        assert fused.should_fuse(conv, 128, "conv") and fused.should_fuse(lin, 154, "linear")   # no table: rows
        assert not fused.should_fuse(conv, 257, "conv")
        assert fused.load_tuned(str(p)) == 2
        assert fused.tuned_config(conv, 128, "conv") == fused.FusedConfig(64, 64, 32, 4, 4)
        assert fused.tuned_config(conv, 128, "linear") is None          # keyed by kind too
        assert fused.should_fuse(conv, 128, "conv")             # measured faster fused
        assert not fused.should_fuse(lin, 154, "linear")        # measured slower fused
        assert not fused.should_fuse(conv, 64, "conv")          # not measured once a table is loaded
        monkeypatch.setattr(fused, "MAX_ROWS", 0)
        assert not fused.should_fuse(conv, 128, "conv")         # switched off
    finally:
        fused._TUNED.clear()


@pytest.mark.parametrize("content", ["not json", '[{"kind": "conv"}]', '[{"kind": "conv", "plan": "x", "M": 2, '
                                     '"config": [12, 64, 32, 1, 4]}]', None])
def test_bad_tuning_table_is_refused_clearly(tmp_path, content):
    pytest.importorskip("triton")
    p = tmp_path / "t.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ValueError, match="tuning table .*tune_fused.py"):
        fused.load_tuned(str(p))
    assert not fused._TUNED          # nothing half-loaded


def test_fused_refuses_inputs_beyond_32_bit_offsets():
    pytest.importorskip("triton")
    from quantsd.kernels.dequant import prepare

    plan = prepare((8, 16), 4, "pwlq", "tensor")
    x = torch.empty(2 ** 27, 16, dtype=torch.float16, device="meta")
    lut = torch.zeros(16)
    with pytest.raises(ValueError, match="32-bit"):
        fused.fused_linear(x, plan, torch.zeros(plan.nbytes, dtype=torch.uint8), lut, None, lut, None)


@pytest.mark.skipif(sys.platform == "win32", reason="ptxas of the Triton wheel: Linux only")
@pytest.mark.parametrize("conv,bf16,table", [(False, False, True), (True, True, False)])
def test_fused_kernel_compiles_for_sm90_with_tensor_cores(conv, bf16, table):
    """Compiled for an H100/H200 on this machine (no GPU): the product runs on tensor cores (wgmma or
    mma) and the decode keeps its multiplies and adds separate (no fma, as the dequant kernel)."""
    import re

    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # pragma: no cover
        pytest.skip(f"no NVIDIA Triton backend: {e}")
    from quantsd.kernels.fused import _fused_kernel

    act = "bf16" if bf16 else "fp16"
    sig = {"x_ptr": f"*{act}", "packed_ptr": "*u8", "scale_ptr": "*fp16", "bp_ptr": "*fp16", "lut_ptr": "*fp32",
           "bias_ptr": f"*{act}", "out_ptr": "*i16" if bf16 else "*fp16", "M": "i32", "N": "i32", "K": "i32",
           "group": "i32", "k_per_split": "i32", "sx0": "i32", "sx1": "i32", "sx2": "i32", "sx3": "i32", "H": "i32",
           "W": "i32", "OH": "i32", "OW": "i32"}
    const = {"BITS": 4 if table else 5, "PWLQ": True, "GMODE": 0 if table else 1, "TABLE": table, "CONV": conv,
             "KH": 3 if conv else 1, "KW": 3 if conv else 1, "SH": 1, "SW": 1, "PH": 1 if conv else 0,
             "PW": 1 if conv else 0, "DH": 1, "DW": 1, "HAS_BIAS": True, "DIRECT": False, "BF16": bf16,
             "DOT_F32": False, "ROWBYTES": True, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
    sig.update({k: "constexpr" for k in const})
    k = triton.compile(ASTSource(_fused_kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "enable_fp_fusion": False})
    ptx = k.asm["ptx"]
    assert re.search(r"\b(wgmma|mma)\.", ptx)
    assert not re.search(r"\bfma\.rn\.f32", ptx)


# --------------------------------------------------------------------------- GPU
# bits 2..8, every method, granularity and 16-bit dtype at least once, linear and conv geometries
GPU_CASES = [(2, "pwlq", "tensor", torch.float16), (3, "uniform", "channel", torch.bfloat16),
             (4, "pwlq", "tensor", torch.float16), (4, "pwlq", "channel", torch.bfloat16),
             (5, "stochastic", "group:8", torch.float16), (6, "pwlq-stochastic", "tensor", torch.bfloat16),
             (7, "pwlq", "channel", torch.float16), (8, "pwlq", "tensor", torch.float16),
             (8, "uniform", "tensor", torch.bfloat16)]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits,method,gran,dtype", GPU_CASES)
def test_fused_equals_dequant_then_op_on_cuda(bits, method, gran, dtype):
    from quantsd.nn import QuantLinear

    assert method in METHODS
    # (group:8 needs rows of a multiple of 8 weights: 8 x 3 x 3 and 8 x 1 x 1 inputs)
    convs = [CONV_GEOMETRIES[0], CONV_GEOMETRIES[1]] if gran != "group:8" else \
        [(2, 8, 16, 3, 1, 1, 1, 5, 5), CONV_GEOMETRIES[2]]
    cases = [("linear", (2, 96, 40)), ("linear", (154, 200, 72))] + [("conv", geo) for geo in convs]
    for kind, geo in cases:
        q, x = _layer_case(kind, bits, method, gran, dtype, geo, "cuda", seed=bits)
        w = q.dequantized_weight()
        assert q._lut is not None
        op = (F.linear(x, w, q.bias) if isinstance(q, QuantLinear)
              else F.conv2d(x, w, q.bias, q.stride, q.padding, q.dilation))
        ref = _reference(q, x)
        for cfg in (None, fused.FusedConfig(16, 32, 32, 3, 4)):
            got = _fused_call(q, x, cfg)
            # as close to the exact product as cuBLAS/cuDNN's own result is (plus an output ulp)
            assert _rel_err(got, ref) <= max(2 * _rel_err(op, ref), TOL[dtype]), (kind, geo, gran, dtype, cfg)
        if kind == "linear":
            _assert_decodes_exactly(q)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("guards", ["full", "minimal"])
def test_compiled_packed_unet_with_fused_layers_on_cuda(guards, monkeypatch):
    """A packed tiny UNet compiled with CUDA graphs takes the fused path in its low-resolution
    layers and stays as close to the eager (dequantize + cuDNN/cuBLAS) output as fp16 allows."""
    from quantsd.bench.core import to_packed
    from quantsd.generate import compile_unet
    from quantsd.models import load_pipeline
    from quantsd.recipe import load_recipe

    calls = {"linear": 0, "conv": 0}
    real_linear, real_conv = fused.fused_linear, fused.fused_conv2d

    def count_linear(*a, **k):
        calls["linear"] += 1
        return real_linear(*a, **k)

    def count_conv(*a, **k):
        calls["conv"] += 1
        return real_conv(*a, **k)

    monkeypatch.setattr(fused, "fused_linear", count_linear)
    monkeypatch.setattr(fused, "fused_conv2d", count_conv)
    monkeypatch.setattr(fused, "MAX_ROWS", 256)   # (off by default)
    torch._dynamo.reset()
    pipe, _ = to_packed(load_pipeline("tiny"), load_recipe(REPO / "recipes" / "paper-final.yaml"))
    pipe.to("cuda", torch.float16)
    lat = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        eager = pipe.unet(lat, 10, encoder_hidden_states=ctx).sample.float()
        assert calls == {"linear": 0, "conv": 0}
        unet = compile_unet(pipe.unet, "reduce-overhead", guards)
        for _ in range(4):   # warm-up, record, replays
            out = unet(lat, 10, encoder_hidden_states=ctx).sample.float().clone()
    torch.cuda.synchronize()
    assert calls["linear"] > 0 and calls["conv"] > 0, calls
    rel = ((out - eager).norm() / eager.norm()).item()
    assert rel < 5e-3, rel
    torch._dynamo.reset()


def test_row_byte_loads_only_for_byte_aligned_rows_and_deep_tiles():
    """The row-bytes code loads need rows that start on a byte, and (H200, session 9: the exact-decode
    test failed with 16-deep tiles for 2-/4-bit codes) tiles at least 32 weights deep."""
    assert fused._rowbytes_ok(96, 4, 32) and fused._rowbytes_ok(96, 2, 64)
    assert not fused._rowbytes_ok(96, 4, 16) and not fused._rowbytes_ok(96, 2, 16)
    assert not fused._rowbytes_ok(45, 3, 32)        # 135 bits per row: rows do not start on a byte
