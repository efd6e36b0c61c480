"""Triton dequant kernel == pure-torch decode, bit for bit.

* GPU (``-m gpu``, skipped without CUDA): every bits 2..8 x method x granularity x output dtype on
  random (odd) shapes, large weights, poisoned outputs, the layers' forward, torch.compile
  (fullgraph: no graph breaks) and CUDA graphs (mode="reduce-overhead"), opcheck of the custom op.
* CPU: the same comparison under the Triton interpreter (TRITON_INTERPRET=1, in a subprocess so
  the variable does not leak into this process), and the fallback / dispatch logic.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantsd.nn import QuantConv2d, QuantLinear, dequantize_weight
from quantsd.quant import METHODS, param_shape, quantize_tensor

REPO = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _shapes(seed: int):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    # odd sizes (numel not a multiple of 8, rows not a multiple of 8), conv shapes, a tall one
    return [(r(1, 40), r(1, 70)), (r(2, 20), r(1, 9), 3, 3), (1, 1), (3, 5), (64, 40), (r(100, 300), 8, 1, 1)]


def _grans(shape):
    row = 1
    for s in shape[1:]:
        row *= s
    out = ["tensor", "channel"]
    for g in (8, 3, row):
        if row % g == 0:
            out.append(f"group:{g}")
    return out


def _case(shape, bits, method, gran, device, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    qt = quantize_tensor(w.to(device), bits, method, gran, seed=seed)
    return qt


# --------------------------------------------------------------------------- GPU
GPU_CASES = list(itertools.product(range(2, 9), METHODS))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits,method", GPU_CASES)
def test_triton_equals_torch_all_cases(bits, method):
    from quantsd.kernels import dequantize

    n = 0
    for i, shape in enumerate(_shapes(bits * 31 + len(method))):
        for gran in _grans(shape):
            qt = _case(shape, bits, method, gran, "cuda", seed=i)
            packed = qt.pack()
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                ref = dequantize_weight(packed, shape, bits, method, gran, qt.scale, qt.breakpoint, dtype,
                                        backend="torch")
                poison = torch.full((max(ref.numel(), 1) * 4,), float("nan"), device="cuda")
                del poison  # the caching allocator hands this NaN block to the kernel's output
                got = dequantize(packed, shape, bits, method, gran, qt.scale, qt.breakpoint, dtype)
                assert got.dtype == dtype and got.shape == ref.shape and got.is_cuda
                assert torch.equal(_bits(got), _bits(ref)), (shape, gran, dtype)
                # the default CUDA path of dequantize_weight is the kernel
                auto = dequantize_weight(packed, shape, bits, method, gran, qt.scale, qt.breakpoint, dtype)
                assert torch.equal(_bits(auto), _bits(ref))
                n += 1
    assert n > 50


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits,method", list(itertools.product(range(2, 9), METHODS)))
def test_triton_on_cuda_equals_cpu_reference(bits, method):
    """Also equal to the CPU decode (the exporter's), for fp32 scales and fp16 ones."""
    from quantsd.kernels import dequantize

    shape = (37, 11, 3, 3)
    for gran in ("tensor", "channel", "group:9"):
        qt = _case(shape, bits, method, gran, "cpu", seed=bits)
        ref = qt.dequantize().to(torch.float16)
        got = dequantize(qt.pack().cuda(), shape, bits, method, gran, qt.scale.cuda(),
                         None if qt.breakpoint is None else qt.breakpoint.cuda(), torch.float16)
        assert torch.equal(_bits(got.cpu()), _bits(ref))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group:64"])
def test_triton_large_weights(bits, gran):
    from quantsd.kernels import dequantize

    shape = (1280, 1280, 3, 3)  # the largest SD1.5 UNet conv: 14.7M weights, ~7200 programs
    for method in ("uniform", "pwlq"):
        qt = _case(shape, bits, method, gran, "cuda", seed=bits)
        packed = qt.pack()
        ref = dequantize_weight(packed, shape, bits, method, gran, qt.scale, qt.breakpoint, torch.float16,
                                backend="torch")
        got = dequantize(packed, shape, bits, method, gran, qt.scale, qt.breakpoint, torch.float16)
        assert torch.equal(_bits(got), _bits(ref))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("method", ["uniform", "pwlq"])
def test_level_table_on_cuda_is_true_division(bits, method):
    """The CUDA table holds the reference's IEEE ``c/L`` (the CPU's), not ``c * (1/L)``: a table
    built with a Python-scalar divisor (CUDA: reciprocal multiply) made 3..8-bit decodes differ."""
    from quantsd.kernels.dequant import level_table

    got = level_table(bits, method, torch.device("cuda")).cpu()
    assert torch.equal(_bits(got), _bits(level_table(bits, method, torch.device("cpu"))))
    assert torch.equal(_bits(got), _bits(_ieee_level_table(bits, method)))


@pytest.mark.gpu
@cuda
def test_triton_float32_scales_and_zero_groups():
    from quantsd.kernels import dequantize

    w = torch.randn(24, 40) * 0.1
    w[3] = 0  # all-zero channel: m == 0 (and p == 0) groups decode to exact zeros
    for method, bits in itertools.product(METHODS, (2, 5, 8)):
        qt = quantize_tensor(w.cuda(), bits, method, "channel", seed=1, scale_dtype=torch.float32)
        assert qt.scale.dtype == torch.float32
        ref = dequantize_weight(qt.pack(), w.shape, bits, method, "channel", qt.scale, qt.breakpoint,
                                torch.float16, backend="torch")
        got = dequantize(qt.pack(), w.shape, bits, method, "channel", qt.scale, qt.breakpoint, torch.float16)
        assert torch.equal(_bits(got), _bits(ref))


def _quant_net(device, dtype=torch.float16):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    ql = QuantLinear.from_linear(lin, quantize_tensor(lin.weight.detach(), 4, "pwlq", "tensor"))
    qc = QuantConv2d.from_conv(conv, quantize_tensor(conv.weight.detach(), 5, "uniform", "channel"))
    net = nn.ModuleDict({"lin": ql, "conv": qc}).to(device, dtype)
    return net


class _Net(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.m = _quant_net(device)

    def forward(self, x, y):
        return self.m["lin"](x).sum() + self.m["conv"](y).float().sum(), self.m["conv"](y)


@pytest.mark.gpu
@cuda
def test_quant_layers_forward_use_kernel_and_match():
    net = _quant_net("cuda")
    ql, qc = net["lin"], net["conv"]
    assert ql._lut is not None and ql._lut.is_cuda
    x = torch.randn(5, 96, device="cuda", dtype=torch.float16)
    wref = dequantize_weight(ql.weight_packed, ql.weight_shape, 4, "pwlq", "tensor", ql.weight_scale,
                             ql.weight_breakpoint, torch.float16, backend="torch")
    assert torch.equal(_bits(ql.weight), _bits(wref))
    assert torch.equal(ql(x), F.linear(x, wref, ql.bias))
    y = torch.randn(2, 8, 9, 9, device="cuda", dtype=torch.float16)
    cref = dequantize_weight(qc.weight_packed, qc.weight_shape, 5, "uniform", "channel", qc.weight_scale, None,
                             torch.float16, backend="torch")
    assert torch.equal(qc(y), F.conv2d(y, cref, qc.bias, padding=1))
    net.cpu()  # back on the CPU: the torch decode, the table dropped
    assert ql._lut is None
    assert torch.equal(_bits(ql.weight.cpu()), _bits(wref.cpu()))
    net.cuda()
    assert ql._lut is not None and ql._lut.is_cuda


@pytest.mark.gpu
@cuda
def test_torch_compile_fullgraph_no_graph_breaks(monkeypatch):
    import torch._dynamo

    from quantsd.kernels import fused

    monkeypatch.setattr(fused, "MAX_ROWS", 0)   # the dequant op (exact); tests/test_fused.py: the fused path

    torch._dynamo.reset()
    net = _Net("cuda")
    x = torch.randn(5, 96, device="cuda", dtype=torch.float16)
    y = torch.randn(2, 8, 9, 9, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = net(x, y)
        compiled = torch.compile(net, fullgraph=True)  # fullgraph: any graph break is an error
        out = compiled(x, y)
    assert torch.equal(out[1], eager[1])


@pytest.mark.gpu
@cuda
def test_torch_compile_reduce_overhead_cuda_graphs(monkeypatch):
    import torch._dynamo

    from quantsd.kernels import fused

    monkeypatch.setattr(fused, "MAX_ROWS", 0)   # the dequant op (exact); tests/test_fused.py: the fused path

    torch._dynamo.reset()
    net = _Net("cuda")
    y = torch.randn(2, 8, 9, 9, device="cuda", dtype=torch.float16)
    x = torch.randn(5, 96, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = net(x, y)[1].clone()
        compiled = torch.compile(net, mode="reduce-overhead", fullgraph=True)
        for _ in range(4):  # warm-up, record, replays
            out = compiled(x, y)[1].clone()
        torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.gpu
@cuda
def test_custom_op_opcheck():
    from quantsd.kernels.dequant import _register_op, level_table, plan_key, prepare, value_table

    op = _register_op()
    qt = _case((16, 24), 4, "pwlq", "group:8", "cuda")
    key = plan_key(prepare((16, 24), 4, "pwlq", "group:8"))
    args = (qt.pack(), qt.scale, qt.breakpoint, level_table(4, "pwlq", torch.device("cuda")), key, torch.float16)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    qt = _case((9, 5, 3, 3), 3, "uniform", "tensor", "cuda")
    tab = value_table(3, "uniform", qt.scale, None)
    args = (qt.pack(), tab, None, tab, plan_key(prepare((9, 5, 3, 3), 3, "uniform", "tensor")), torch.bfloat16)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------- CPU
def test_dispatch_without_interpreter_uses_torch():
    from quantsd.kernels import available

    if not os.environ.get("TRITON_INTERPRET"):
        assert not available(torch.device("cpu"))
    qt = _case((6, 10), 3, "uniform", "channel", "cpu")
    w = dequantize_weight(qt.pack(), (6, 10), 3, "uniform", "channel", qt.scale, None, torch.float32)
    assert torch.equal(w, qt.dequantize())
    with pytest.raises(ValueError, match="backend"):
        dequantize_weight(qt.pack(), (6, 10), 3, "uniform", "channel", qt.scale, None, backend="cuda")


def test_plan_key_round_trips():
    """The op's one constant argument encodes the whole launch plan (so an FX-graph cache entry
    keyed on it can never run a layer with another layer's plan)."""
    from quantsd.kernels.dequant import plan_from_key, plan_key, prepare

    for shape, bits, method, gran in (((320, 320, 3, 3), 4, "pwlq", "tensor"), ((5, 9), 3, "uniform", "group:3"),
                                      ((7,), 8, "stochastic", "channel"), ((1280, 2560, 3, 3), 2, "pwlq", "channel")):
        plan = prepare(shape, bits, method, gran)
        assert plan_from_key(plan_key(plan)) == plan
    assert plan_key(prepare((320, 320, 3, 3), 4, "pwlq", "tensor")) != plan_key(prepare((320, 320, 3, 3), 4,
                                                                                         "uniform", "tensor"))


def test_prepare_group_modes():
    from quantsd.kernels import prepare

    assert prepare((320, 320, 3, 3), 4, "pwlq", "tensor").gmode == 0
    p = prepare((320, 2880), 4, "pwlq", "channel")
    assert (p.gmode, p.group) == (1, 2880)
    p = prepare((5, 9), 8, "uniform", "channel")
    assert (p.gmode, p.group, p.nbytes, p.wide) == (1, 9, 45, False)
    p = prepare((5, 9), 3, "uniform", "group:3")
    assert (p.gmode, p.group, p.nbytes) == (1, 3, 17)
    assert prepare((320, 320, 3, 3), 4, "pwlq", "tensor").table
    assert not prepare((320, 2880), 4, "pwlq", "channel").table
    assert not prepare((0, 5), 4, "pwlq", "tensor").table     # nothing to decode: no value table
    # 64-bit index math only once the bitstream nears 2^31 bits (not for any SD layer)
    assert not prepare((1280, 1280, 3, 3), 8, "pwlq", "tensor").wide
    assert prepare((2 ** 28 + 1,), 8, "uniform", "tensor").wide


def _ieee_level_table(bits: int, method: str) -> torch.Tensor:
    """The level table from IEEE float32 division computed independently of torch: the float64
    quotient of two small integers rounded once to float32 is the correctly rounded float32
    quotient (53 >= 2*24 + 2), then ``- 0.5`` in float32."""
    import numpy as np

    L, L1, L2 = (1 << bits) - 1, (1 << (bits - 1)) - 1, (1 << (bits - 2)) - 1
    t = np.zeros(512, dtype=np.float32)
    k = L1 if method in ("pwlq", "pwlq-stochastic") else L
    t[:k + 1] = (np.arange(k + 1) / k).astype(np.float32) - np.float32(0.5)
    if method in ("pwlq", "pwlq-stochastic") and L2 > 0:
        t[256:256 + L2 + 1] = (np.arange(L2 + 1) / L2).astype(np.float32)
    return torch.from_numpy(t)


@pytest.mark.parametrize("bits,method", list(itertools.product(range(2, 9), METHODS)))
def test_level_table_is_the_reference_intermediate(bits, method):
    """The kernel's table == IEEE c/L - 1/2 (and l/L2), i.e. the decode's intermediate, bit for bit;
    and decoding with it the kernel's way (same ops, same order) == the reference decode."""
    from quantsd.kernels.dequant import level_table
    from quantsd.quant.quantizers import decode

    lut = level_table(bits, method, torch.device("cpu"))
    assert lut.dtype == torch.float32 and lut.shape == (512,)
    assert torch.equal(_bits(lut), _bits(_ieee_level_table(bits, method)))
    # every code of 3 groups (one with m = p = 0), the kernel's op sequence in torch
    n = 1 << bits
    cv = torch.arange(n, dtype=torch.uint8).repeat(3, 1)
    m = torch.tensor([0.1234, 0.0, 3.5e-3])
    pw = method in ("pwlq", "pwlq-stochastic")
    p = torch.tensor([0.0311, 0.0, 1.1e-3]) if pw else None
    ref = decode(cv, method, bits, m, p)
    c, mm = cv.long(), m[:, None]
    if not pw:
        got = torch.where(mm == 0, 0.0, (2.0 * mm) * lut[c])
    else:
        pp = p[:, None]
        L1, L2 = (1 << (bits - 1)) - 1, (1 << (bits - 2)) - 1
        center = torch.where(pp == 0, 0.0, (2.0 * pp) * lut[c & L1])
        mag = pp + (mm - pp) * lut[256 + (c & L2)] if L2 > 0 else ((pp + mm) * 0.5).expand(3, n)
        tail = torch.where(((c >> (bits - 2)) & 1) != 0, -mag, mag)
        got = torch.where((c >> (bits - 1)) != 0, tail, center)
    assert torch.equal(_bits(got), _bits(ref))


def _compile_for_sm90(const: dict):
    """Compile the kernel for an H100 (sm_90) on this machine, no GPU needed (ptxas ships with
    Triton); skips where the NVIDIA backend or its tools are unavailable."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from quantsd.kernels.dequant import LAUNCH_OPTIONS, _dequant_kernel

    sig = {"packed_ptr": "*u8", "scale_ptr": "*fp16", "bp_ptr": "*fp16", "lut_ptr": "*fp32",
           "out_ptr": "*i16" if const["OUT_BF16"] else "*fp16", "numel": "i32", "group": "i32",
           **{k: "constexpr" for k in const}}
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # pragma: no cover - triton without the NVIDIA backend
        pytest.skip(f"no NVIDIA Triton backend: {e}")
    return triton.compile(ASTSource(_dequant_kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                          options=dict(LAUNCH_OPTIONS))


@pytest.mark.skipif(sys.platform == "win32", reason="ptxas/nvdisasm of the Triton wheel: Linux only")
@pytest.mark.parametrize("bits,pwlq", [(2, True), (5, True), (8, True), (8, False)])
def test_kernel_has_no_fma_on_sm90(bits, pwlq):
    """What the H100 runs keeps every multiply and add separately rounded, as torch eager does:
    PTX with no fma and only ``.rn`` f32 mul/add/sub (which ptxas never contracts), no ``.ftz``,
    SASS with no FFMA.  (Checked to pass with triton 3.6 and 3.8; fails with enable_fp_fusion=True.)"""
    import re
    import shutil
    import tempfile

    for gmode, bf16, wide, table in ((0, False, False, False), (1, True, False, False), (1, False, True, False),
                                     (0, True, False, True)):  # the last: the value-table decode
        k = _compile_for_sm90({"BITS": bits, "PWLQ": pwlq, "GMODE": gmode, "BLOCK": 2048, "OUT_BF16": bf16,
                               "WIDE": wide, "TABLE": table})
        ptx = k.asm["ptx"]
        assert not re.search(r"\bfma\.", ptx) and ".ftz" not in ptx  # no contraction, no flush-to-zero
        arith = re.findall(r"\b(?:mul|add|sub)(?:\.[a-z]+)*\.f32\b", ptx)
        assert (arith or table) and all(".rn." in a for a in arith), sorted(set(arith))
        import triton

        nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
        if not nvdisasm.exists():
            nvdisasm = shutil.which("nvdisasm")
        if nvdisasm is None:
            continue
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "k.cubin"
            f.write_bytes(k.asm["cubin"])
            sass = subprocess.run([str(nvdisasm), str(f)], capture_output=True, text=True, check=True).stdout
        assert ("FMUL" in sass or table) and not re.search(r"\bFFMA\b", sass)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("method", METHODS)
def test_value_table_is_the_reference_decode_of_every_code(bits, method):
    """The per-tensor value table holds, for each code, exactly the weight the reference decode
    gives it (fp16-stored parameters, including a zero scale / breakpoint: +0.0, never -0.0)."""
    from quantsd.kernels.dequant import value_table
    from quantsd.quant.quantizers import decode

    pw = method in ("pwlq", "pwlq-stochastic")
    for m, p in ((0.0731, 0.0213), (0.0, 0.0), (2.5, 0.0)):
        scale = torch.tensor([m], dtype=torch.float16)
        bp = torch.tensor([p], dtype=torch.float16) if pw else None
        tab = value_table(bits, method, scale, bp)
        assert tab.dtype == torch.float32 and tab.shape == (1 << bits,)
        codes = torch.randint(0, 1 << bits, (1, 999), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
        ref = decode(codes, method, bits, scale.float(), None if bp is None else bp.float())
        assert torch.equal(_bits(tab[codes.long()]), _bits(ref))


def test_layers_on_cpu_have_no_kernel_state():
    net = _quant_net("cpu", torch.float32)
    assert net["lin"]._lut is None and net["lin"]._plan is not None


_INTERP_SCRIPT = textwrap.dedent("""
    import itertools, sys, torch
    from quantsd.kernels import available, dequantize
    from quantsd.nn import dequantize_weight, QuantLinear
    from quantsd.quant import METHODS, quantize_tensor, param_shape
    assert available(torch.device("cpu"))
    def bits_of(t):
        return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])
    n = bad = 0
    shapes = [(7, 24), (3, 5), (33, 8, 3, 3), (1, 1)]
    for bits, method in itertools.product(range(2, 9), METHODS):
        for i, shape in enumerate(shapes):
            for gran in ("tensor", "channel", "group:8", "group:3"):
                try:
                    param_shape(shape, gran)
                except Exception:
                    continue
                w = torch.randn(shape, generator=torch.Generator().manual_seed(n)) * 0.1
                qt = quantize_tensor(w, bits, method, gran, seed=n)
                dtype = (torch.float16, torch.bfloat16, torch.float32)[n % 3]
                ref = dequantize_weight(qt.pack(), shape, bits, method, gran, qt.scale, qt.breakpoint, dtype,
                                        backend="torch")
                got = dequantize(qt.pack(), shape, bits, method, gran, qt.scale, qt.breakpoint, dtype)
                n += 1
                if not torch.equal(bits_of(got), bits_of(ref)):
                    bad += 1
                    print("MISMATCH", bits, method, shape, gran, dtype)
    print(f"CASES {n} BAD {bad}")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_triton_interpreter_equals_torch_on_cpu():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0 and "interpret" in r.stderr.lower() and "not supported" in r.stderr.lower():
        pytest.skip(f"Triton interpreter unavailable: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("CASES") and last.endswith("BAD 0"), r.stdout[-3000:]
    assert int(last.split()[1]) > 250


_INTERP_COMPILE_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, %r)
    import test_kernels as T
    from quantsd.kernels import fused
    fused.set_max_rows(0)   # the per-layer dequant op under compile (exact; tests/test_fused.py: the fused path)
    net = T._Net("cpu")
    assert net.m["lin"]._lut is not None  # the kernel path is active on the CPU under the interpreter
    x = torch.randn(5, 96, dtype=torch.float16)
    y = torch.randn(2, 8, 9, 9, dtype=torch.float16)
    with torch.no_grad():
        eager = net(x, y)
        out = torch.compile(net, fullgraph=True, backend="aot_eager")(x, y)
    assert torch.equal(out[1], eager[1]) and torch.equal(out[0], eager[0])
    # per-tensor layer: the kernel decodes through the layer's value table, which must follow a
    # load_state_dict of new scales (else the layer would silently compute with the old weights)
    lin = net.m["lin"]
    assert lin._plan.table and lin._lut.numel() == 1 << lin.bits
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(7)) * 0.3
    qt = T.quantize_tensor(w, 4, "pwlq", "tensor")
    lin.load_state_dict({"weight_packed": qt.pack(), "weight_scale": qt.scale, "weight_breakpoint": qt.breakpoint,
                         "bias": lin.bias.detach().clone()})
    assert torch.equal(T._bits(lin.weight), T._bits(qt.dequantize().to(torch.float16)))
    # ... and any other change of the parameters: in place, reassigned (eager forwards re-check)
    from quantsd.nn import dequantize_weight
    def ref():
        return dequantize_weight(lin.weight_packed, lin.weight_shape, 4, "pwlq", "tensor", lin.weight_scale,
                                 lin.weight_breakpoint, torch.float16, backend="torch")
    with torch.no_grad():
        lin.weight_scale.mul_(2)
    assert torch.equal(T._bits(lin.weight), T._bits(ref()))
    x5 = torch.randn(3, 96, dtype=torch.float16)
    assert torch.equal(lin(x5), torch.nn.functional.linear(x5, ref(), lin.bias))
    lin.weight_breakpoint = lin.weight_breakpoint * 0.5
    assert torch.equal(T._bits(lin.weight), T._bits(ref()))
    with torch.inference_mode():  # inference tensors have no version counter: still works
        lin.weight_scale = lin.weight_scale * 0.25
        assert torch.equal(T._bits(lin.weight), T._bits(ref()))
    print("COMPILE OK")
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_custom_op_fullgraph_under_interpreter():
    """torch.compile(fullgraph=True) through the quantized layers (dynamo + AOT autograd, no
    inductor): no graph breaks, same output as eager."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _INTERP_COMPILE_SCRIPT % str(REPO / "tests")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "COMPILE OK" in r.stdout, r.stderr[-3000:]


_GUARD_COUNT_SCRIPT = textwrap.dedent("""
    import logging, re, torch
    from torch import nn
    from quantsd.nn import QuantLinear
    from quantsd.quant import quantize_tensor
    records = []
    class Grab(logging.Handler):
        def emit(self, r):
            records.append(r.getMessage())
    def count(net, x):
        torch._dynamo.reset()
        records.clear()
        torch._logging.set_logs(guards=True)
        log = logging.getLogger("torch._dynamo.guards")
        h = Grab()
        log.addHandler(h)
        try:
            with torch.no_grad():
                torch.compile(net, backend="eager", fullgraph=True)(x)
        finally:
            log.removeHandler(h)
            torch._logging.set_logs()
        return len(re.findall(r"\\+- [A-Z_]+:", "\\n".join(records)))
    torch.manual_seed(0)
    dense = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)]).half()
    packed = nn.Sequential(*[QuantLinear.from_linear(l, quantize_tensor(l.weight.detach().float(), 4, "pwlq", "tensor"))
                             for l in dense]).half()
    assert packed[0]._lut is not None
    x = torch.randn(3, 32, dtype=torch.float16)
    n_packed = count(packed, x)
    from quantsd.dequant_groups import group_dequant
    assert len(group_dequant(packed)) == 1
    print("GUARDS", count(dense, x), n_packed, count(packed, x))
""")


@pytest.mark.skipif(sys.platform == "win32", reason="interpreter subprocess test is POSIX-only")
def test_compiled_packed_layer_adds_few_dynamo_guards():
    """Host time of a compiled step grows with the guards Dynamo re-checks on every call; a packed
    layer once cost ~42 guards more than an nn.Linear (3.3 ms per SD1.5 UNet call on an H200).
    Keep it small: the plan as one string, a plain dtype, codes + table as the only tensors (and a
    grouped member: a few more for its group)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _GUARD_COUNT_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("GUARDS")][-1]
    dense, packed, grouped = map(int, line.split()[1:])
    assert dense > 20  # the log was captured
    # ~18 a layer (codes and table: a tensor check each, the plan constants), one of them the grouped-dequant check
    assert (packed - dense) / 4 <= 18, (dense, packed)   # 20.25 before the prefetch and fused switches were read first
    assert (grouped - packed) / 4 <= 4, (packed, grouped)   # a grouped member: its group's key and size


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("gran", ["tensor", "channel", "group:64"])
def test_quant_embedding_on_cuda_equals_full_decode(gran):
    from quantsd.nn import QuantEmbedding

    emb = nn.Embedding(4096, 768)
    q = QuantEmbedding.from_embedding(emb, quantize_tensor(emb.weight.detach().cuda(), 8, "pwlq", gran)).half()
    ids = torch.randint(0, 4096, (2, 77), device="cuda")
    full = dequantize_weight(q.weight_packed, q.weight_shape, 8, "pwlq", gran, q.weight_scale, q.weight_breakpoint,
                             torch.float16, backend="torch")
    assert torch.equal(_bits(q(ids)), _bits(F.embedding(ids, full)))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_direct_launch_is_used_and_equals_torch(dtype):
    """Eager launches after the first go through the cached compiled kernel's launcher (skipping
    Triton's argument binding): still the reference's bits, for every plan kind."""
    from quantsd.kernels import dequant

    for bits, method, gran in ((4, "pwlq", "tensor"), (3, "uniform", "channel"), (8, "pwlq", "group:8"),
                               (5, "pwlq-stochastic", "channel")):
        qt = _case((40, 24), bits, method, gran, "cuda", seed=bits)
        lin = QuantLinear.from_linear(nn.Linear(24, 40), qt, device="cuda").to(dtype)
        ref = dequantize_weight(lin.weight_packed, lin.weight_shape, bits, method, gran, lin.weight_scale,
                                lin.weight_breakpoint, dtype, backend="torch")
        first = lin.dequantized_weight()   # Triton's own launch; the kernel is then checked and cached
        lut = lin._lut
        key = dequant._direct_key(lin._plan, lin.weight_packed, lut if lin._plan.table else lin.weight_scale,
                                  lut if lin._plan.table else (lin.weight_breakpoint if lin.weight_breakpoint is not None
                                                               else lin.weight_scale), lut, dtype)
        assert dequant._direct_enabled and key in dequant._DIRECT, (bits, method, gran)
        n_cached = len(dequant._DIRECT)
        again = lin.dequantized_weight()   # the direct launch
        assert len(dequant._DIRECT) == n_cached
        assert torch.equal(_bits(first), _bits(ref)) and torch.equal(_bits(again), _bits(ref)), (bits, method, gran)


def test_direct_launch_switches_itself_off_when_it_disagrees(monkeypatch):
    """A launcher that writes other bits than Triton's own launch (or raises: another Triton's
    launcher signature) turns the direct path off instead of being cached."""
    from quantsd.kernels import dequant

    want = torch.arange(8, dtype=torch.float16)
    args = (1, None, None, None, None, None, want, False)
    monkeypatch.setattr(dequant, "_DIRECT", {})
    monkeypatch.setattr(dequant, "_direct_enabled", True)
    monkeypatch.setattr(dequant, "_run_direct", lambda k, grid, plan, p, s, b, lut, out, bf16: out.copy_(want))
    dequant._adopt("same", "K", *args)
    assert dequant._DIRECT == {"same": "K"} and dequant._direct_enabled
    monkeypatch.setattr(dequant, "_run_direct", lambda k, grid, plan, p, s, b, lut, out, bf16: out.fill_(1))
    dequant._adopt("differs", "K2", *args)
    assert "differs" not in dequant._DIRECT and not dequant._direct_enabled
    monkeypatch.setattr(dequant, "_direct_enabled", True)

    def boom(*a):
        raise TypeError("launcher takes other arguments")

    monkeypatch.setattr(dequant, "_run_direct", boom)
    dequant._adopt("raises", "K3", *args)
    assert "raises" not in dequant._DIRECT and not dequant._direct_enabled
    # no memory for the check buffer: not cached, but direct launches stay on
    monkeypatch.setattr(dequant, "_direct_enabled", True)

    def oom(*a):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(dequant, "_run_direct", oom)
    dequant._adopt("oom", "K4", *args)
    assert "oom" not in dequant._DIRECT and dequant._direct_enabled


@pytest.mark.skipif(sys.platform == "win32", reason="the Triton wheel's ptxas: Linux only")
def test_group_kernel_stores_and_loads_vectorize_on_sm90():
    """The grouped kernel's stores cover whole ALIGN-element runs from ALIGN boundaries, so on an
    H100 they compile to 16-byte vector stores like the per-layer kernel's (a runtime layer offset
    and length would otherwise give one 2-byte store per weight); with ALIGNED (code offsets and
    lengths multiples of 16) its code loads vectorize too, instead of one byte load per lane; and the
    table lookups read shared memory."""
    import re

    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from quantsd.kernels.dequant import LAUNCH_OPTIONS, _group_table_kernel
    from quantsd.kernels.grouped import ALIGN

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # pragma: no cover - triton without the NVIDIA backend
        pytest.skip(f"no NVIDIA Triton backend: {e}")
    sig = {"packed_base": "*u8", "lut_base": "*fp32", "out_ptr": "*fp16", "desc_ptr": "*i64", "prog_layer_ptr": "*i32",
           "BITS": "constexpr", "BLOCK": "constexpr", "OUT_BF16": "constexpr", "ALIGN": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    sig["ALIGNED"] = sig["BITS2"] = "constexpr"
    for bits, bits2 in ((2, 0), (4, 0), (8, 0), (4, 8)):   # (4, 8): a launch of 4- and 8-bit layers
        for aligned in (False, True):
            k = triton.compile(ASTSource(_group_table_kernel, sig, {"BITS": bits, "BLOCK": 1024, "OUT_BF16": False,
                                                                   "ALIGN": ALIGN, "ALIGNED": aligned, "BITS2": bits2},
                                         attrs=attrs),
                               target=GPUTarget("cuda", 90, 32), options=dict(LAUNCH_OPTIONS))
            ptx = k.asm["ptx"]
            stores = set(re.findall(r"st\.global[\.\w]*", ptx))
            assert stores and all(".v4" in st or ".v2" in st for st in stores), stores
            # each weight's value is gathered from the layer's table in shared memory, not from global
            assert re.findall(r"ld\.shared", ptx), bits
            if aligned:   # the codes too: no single-byte loads left (without ALIGNED there are)
                assert not re.findall(r"ld\.global[\.\w]*\.[bu]8\b", ptx), (bits, set(re.findall(r"ld\.global[\.\w]*", ptx)))
            elif bits in (4, 8):
                assert re.findall(r"ld\.global[\.\w]*\.[bu]8\b", ptx), bits


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_layers_on_another_device_than_the_current_one():
    """Triton launches on the current device; a model on cuda:1 must still get its weights there."""
    from quantsd.dequant_groups import group_dequant

    torch.cuda.set_device(0)
    layers = [QuantLinear.from_linear(nn.Linear(40, 24), _case((24, 40), 4, "pwlq", "tensor", "cpu", seed=i))
              for i in range(3)]
    net = nn.Sequential(*layers).to("cuda:1").half()
    refs = [dequantize_weight(m.weight_packed, m.weight_shape, 4, "pwlq", "tensor", m.weight_scale,
                              m.weight_breakpoint, torch.float16, backend="torch") for m in layers]
    for _ in range(2):
        assert all(torch.equal(m.dequantized_weight(), r) for m, r in zip(layers, refs))
    group_dequant(net)
    for _ in range(2):
        assert all(torch.equal(m._forward_weight(), r) for m, r in zip(layers, refs))


def test_poisoned_like_sets_every_byte_whatever_the_dtype_and_layout():
    """The buffer a direct launch is checked into starts as all-ones bytes for every dtype the
    kernels write through (bf16 outputs are written as int16 views: a float fill would raise there
    and switch direct launches off for good) and for channels-last weights."""
    from quantsd.kernels.dequant import poisoned_like

    for t in (torch.zeros(5, 3, dtype=torch.int16), torch.zeros(7, dtype=torch.float16),
              torch.zeros(2, 3, 3, 4, dtype=torch.bfloat16).to(memory_format=torch.channels_last)):
        got = poisoned_like(t)
        assert got.shape == t.shape and got.dtype == t.dtype and got.stride() == t.stride()
        raw = torch.frombuffer(bytearray(bytes(got.untyped_storage())), dtype=torch.uint8)
        assert raw.numel() == t.untyped_storage().nbytes() and bool((raw == 255).all())
        if got.is_floating_point():
            assert bool(got.isnan().all())
