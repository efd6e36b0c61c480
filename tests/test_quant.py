"""Quantizers: paper formulas, bit-exact simulate == load, level counts, error trends, sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantsd.quant import METHODS, QTensor, fake_quantize, param_shape, quantize_tensor

SHAPES = [(8, 12), (6, 4, 3, 3), (5, 10), (16,), (3, 2, 1, 1)]
HSET = settings(max_examples=25, deadline=None)


def granularities(shape):
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    out = ["tensor", "channel"]
    out += [f"group:{g}" for g in (1, 2, 3, 4, 6, 9, row) if row % g == 0]
    return sorted(set(out))


@st.composite
def weight_cases(draw, methods=METHODS):
    shape = draw(st.sampled_from(SHAPES))
    gran = draw(st.sampled_from(granularities(shape)))
    method = draw(st.sampled_from(methods))
    bits = draw(st.integers(2, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    dist = draw(st.sampled_from(["normal", "laplace", "uniform"]))
    g = torch.Generator().manual_seed(seed)
    if dist == "normal":
        w = torch.randn(shape, generator=g)
    elif dist == "laplace":
        w = -torch.log(torch.rand(shape, generator=g).clamp_min(1e-12)) * torch.sign(torch.rand(shape, generator=g) - 0.5)
    else:
        w = torch.rand(shape, generator=g) * 2 - 1
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return (w * scale).to(dtype), bits, method, gran, seed


def grouped(t: torch.Tensor, gran: str) -> torch.Tensor:
    return t.reshape(*param_shape(t.shape, gran), -1)


# --------------------------------------------------------------------------- simulate == load


@HSET
@given(weight_cases())
def test_fake_quantize_equals_dequantize_bit_for_bit(case):
    w, bits, method, gran, seed = case
    qt = quantize_tensor(w, bits=bits, method=method, granularity=gran, seed=seed)
    deq = qt.dequantize()
    fq = fake_quantize(w, bits=bits, method=method, granularity=gran, seed=seed)
    assert deq.shape == w.shape and deq.dtype == w.dtype and fq.dtype == w.dtype
    # bit-level comparison (also distinguishes -0.0 from 0.0)
    assert torch.equal(_bits(deq), _bits(fq))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@HSET
@given(weight_cases())
def test_from_packed_reproduces_dequantize(case):
    w, bits, method, gran, seed = case
    qt = quantize_tensor(w, bits=bits, method=method, granularity=gran, seed=seed)
    packed = qt.pack()
    assert packed.numel() == math.ceil(bits * w.numel() / 8)
    back = QTensor.from_packed(packed, list(w.shape), bits, method, gran, qt.scale.clone(),
                               None if qt.breakpoint is None else qt.breakpoint.clone(), dtype=w.dtype)
    assert torch.equal(back.codes, qt.codes)
    assert torch.equal(_bits(back.dequantize()), _bits(qt.dequantize()))


@pytest.mark.parametrize("method", METHODS)
def test_from_packed_float32_scales(method):
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    qt = quantize_tensor(w, 3, method, "channel", scale_dtype=torch.float32)
    assert qt.scale.dtype == torch.float32
    back = QTensor.from_packed(qt.pack(), w.shape, 3, method, "channel", qt.scale, qt.breakpoint, torch.float32)
    assert torch.equal(back.dequantize(), qt.dequantize())


# --------------------------------------------------------------------------- structure


@HSET
@given(weight_cases())
def test_codes_params_and_size(case):
    w, bits, method, gran, seed = case
    qt = quantize_tensor(w, bits=bits, method=method, granularity=gran, seed=seed)
    assert qt.codes.dtype == torch.uint8 and qt.codes.shape == w.shape
    assert int(qt.codes.max()) <= (1 << bits) - 1
    assert qt.bits == bits and qt.method == method and qt.granularity == gran
    assert qt.shape == w.shape and qt.dtype == w.dtype
    pshape = param_shape(w.shape, gran)
    assert tuple(qt.scale.shape) == pshape and qt.scale.dtype == torch.float16
    if method.startswith("pwlq"):
        assert qt.breakpoint is not None and tuple(qt.breakpoint.shape) == pshape
        assert qt.breakpoint.dtype == torch.float16
        nparam = 2 * 2 * math.prod(pshape)
    else:
        assert qt.breakpoint is None
        nparam = 2 * math.prod(pshape)
    assert qt.nbytes_packed == math.ceil(bits * w.numel() / 8) + nparam


@pytest.mark.parametrize("shape,gran,nbytes", [
    ((64, 3, 3, 3), "tensor", 864 + 2),
    ((64, 3, 3, 3), "channel", 864 + 128),
    ((10, 8), "group:4", 40 + 2 * 20),
])
def test_nbytes_examples(shape, gran, nbytes):
    w = torch.randn(shape)
    assert quantize_tensor(w, 4, "uniform", gran).nbytes_packed == nbytes
    assert quantize_tensor(w, 4, "pwlq", gran).nbytes_packed == nbytes + (nbytes - math.ceil(4 * w.numel() / 8))
    assert quantize_tensor(w, 3, "uniform", "tensor").nbytes_packed == math.ceil(3 * w.numel() / 8) + 2


@HSET
@given(weight_cases())
def test_at_most_2n_distinct_values_per_parameter_group(case):
    w, bits, method, gran, seed = case
    deq = fake_quantize(w, bits=bits, method=method, granularity=gran, seed=seed)
    gv = grouped(deq.float(), gran).reshape(-1, grouped(deq, gran).shape[-1])
    for row in gv:
        assert torch.unique(row).numel() <= 2**bits
    # and over the whole tensor at tensor granularity
    if gran == "tensor":
        assert torch.unique(deq).numel() <= 2**bits


def test_all_levels_reachable():
    # a fine ramp over [-1, 1] hits every one of the 2^n uniform levels
    w = torch.linspace(-1, 1, 4097)
    for bits in range(2, 9):
        assert torch.unique(fake_quantize(w, bits, "uniform")).numel() == 2**bits
    # PWLQ (paper layout): all 2^n codes are used, but for n >= 3 the tail's level 0 is
    # magnitude p, the same value as the center's outermost level, so 2^n - 2 distinct values
    core = torch.erfinv(torch.linspace(-0.999, 0.999, 20001, dtype=torch.float64)).float() * 2**0.5
    w = torch.cat([core, torch.linspace(-4.5, 4.5, 4001)])  # Gaussian-ish sigma, every level covered
    for bits in range(2, 9):
        qt = quantize_tensor(w, bits, "pwlq")
        assert torch.unique(qt.codes).numel() == 2**bits
        assert torch.unique(qt.dequantize()).numel() == (4 if bits == 2 else 2**bits - 2)


# --------------------------------------------------------------------------- paper formulas


@HSET
@given(weight_cases(methods=("uniform",)))
def test_uniform_matches_float64_reference(case):
    w, bits, _, gran, _ = case
    qt = quantize_tensor(w, bits=bits, method="uniform", granularity=gran)
    L = 2**bits - 1
    wv = grouped(w.float(), gran).numpy().astype(np.float64)
    m = np.abs(wv).max(axis=-1, keepdims=True).astype(np.float16).astype(np.float64)  # stored fp16 scale
    assert np.array_equal(qt.scale.numpy().astype(np.float64), m[..., 0])
    safe = np.where(m > 0, m, 1.0)
    t = (wv / (2 * safe) + 0.5) * L
    code = np.clip(np.round(t), 0, L)
    ref = np.where(m > 0, 2 * m * (code / L - 0.5), 0.0)
    got_codes = grouped(qt.codes, gran).numpy()
    # codes equal exactly except where the float64 value sits on a rounding tie (float32 noise)
    near_tie = np.abs(t - np.floor(t) - 0.5) < 1e-4
    assert np.array_equal(got_codes[~near_tie], code[~near_tie])
    # (weights on a coarse grid, e.g. bf16 at few bits, can put many values on exact ties: those
    # codes may round either way, and their values are checked against the codes below)
    # values: the float64 formula applied to our codes, to float32 precision
    ref_from_codes = np.where(m > 0, 2 * m * (got_codes / L - 0.5), 0.0)
    got = grouped(qt.dequantize().float(), gran).numpy()
    tol = np.finfo(np.float32).eps * 4 * np.maximum(m, 1e-30)
    assert np.all(np.abs(got.astype(np.float64) - ref_from_codes) <= tol + _out_tol(w))
    assert np.all(np.abs(ref_from_codes - ref)[~near_tie] == 0)


def _out_tol(w):
    # dequantize returns w's dtype: allow its rounding on top of float32 arithmetic
    return 0.0 if w.dtype == torch.float32 else float(torch.finfo(w.dtype).eps) * float(w.float().abs().max()) * 2


def test_uniform_worked_example():
    # m = 1 (exact in fp16), 2 bits: levels -1, -1/3, 1/3, 1
    w = torch.tensor([-1.0, -0.5, -0.2, 0.0, 0.2, 0.34, 1.0])
    qt = quantize_tensor(w, 2, "uniform")
    # t = (w/2 + 1/2)*3 = 0, .75, 1.2, 1.5, 1.8, 2.01, 3 -> round half to even
    assert qt.codes.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert torch.allclose(qt.dequantize(), torch.tensor([-1, -1 / 3, -1 / 3, 1 / 3, 1 / 3, 1 / 3, 1.0]))


def test_uniform_zero_group_is_exact_zero():
    w = torch.randn(4, 6)
    w[2] = 0
    for method in METHODS:
        deq = fake_quantize(w, 3, method, "channel")
        assert torch.equal(_bits(deq[2]), _bits(torch.zeros(6)))  # +0.0, not -0.0
    assert torch.equal(_bits(fake_quantize(torch.zeros(5), 4, "pwlq")), _bits(torch.zeros(5)))


def test_scale_is_stored_fp16_value_used_for_decode():
    w = torch.tensor([0.1, -0.3, 0.7001, 0.2])
    qt = quantize_tensor(w, 8, "uniform")
    m16 = torch.tensor(0.7001).half()
    assert qt.scale.item() == m16.item()
    assert torch.equal(qt.dequantize(), (2 * m16.float()) * (qt.codes.float() / 255 - 0.5))


@pytest.mark.parametrize("method", ["uniform", "pwlq"])
def test_codes_use_the_stored_fp16_scale(method):
    # m = 0.70006 is stored as fp16 0.7001; codes must come from the stored value
    m32 = 0.70006
    w = torch.cat([torch.tensor([m32]), torch.linspace(-m32, m32, 20001)])
    m16 = float(torch.tensor(m32).half())
    assert m16 != m32
    L = 255
    x = w.double().numpy()

    def ref_codes(m):
        t = (x / (2 * m) + 0.5) * L
        return np.clip(np.round(t), 0, L), np.abs(t - np.floor(t) - 0.5) < 1e-6

    c16, tie16 = ref_codes(m16)
    c32, _ = ref_codes(m32)
    assert (c16 != c32).sum() > 10  # the test can tell the two apart
    qt = quantize_tensor(w, 8, "uniform")
    assert np.array_equal(qt.codes.numpy()[~tie16], c16[~tie16])
    if method == "pwlq":  # breakpoint formula also takes the stored m
        qt = quantize_tensor(w, 8, "pwlq")
        sigma = x.std()
        p = sigma * np.log(0.8030 * m16 / sigma - 0.3167)
        p = min(max(p, m16 / 64), 63 * m16 / 64)
        assert qt.breakpoint.item() == float(np.float16(p))


def test_pwlq_breakpoint_formula_float64():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 4096, generator=g) * torch.tensor([[0.5], [1.0], [2.0], [0.01]])
    qt = quantize_tensor(w, 4, "pwlq", "channel")
    x = w.double().numpy()
    m = np.abs(x).max(axis=1).astype(np.float16).astype(np.float64)
    sigma = x.std(axis=1)
    p = sigma * np.log(0.8030 * m / sigma - 0.3167)
    assert np.all((p > m / 64) & (p < 63 * m / 64))  # Gaussian rows: the clamp is inactive
    assert np.array_equal(qt.breakpoint.numpy(), p.astype(np.float16))


def test_pwlq_breakpoint_clamped_when_formula_leaves_range():
    # constant group: sigma = 0 -> formula NaN -> lower clamp m/64
    qt = quantize_tensor(torch.full((8,), 0.5), 4, "pwlq")
    assert qt.breakpoint.item() == pytest.approx(0.5 / 64, rel=1e-3)
    # two-point group: m/sigma = 1 -> log argument 0.486 < 1 -> lower clamp
    qt = quantize_tensor(torch.tensor([1.0, -1.0]), 4, "pwlq")
    assert qt.breakpoint.item() == pytest.approx(1 / 64, rel=1e-3)
    for w in (torch.full((8,), 0.5), torch.tensor([1.0, -1.0])):
        deq = fake_quantize(w, 4, "pwlq")
        assert torch.allclose(deq, w, atol=1e-3)  # tail level m is exact enough


@pytest.mark.parametrize("bits", range(2, 9))
def test_pwlq_regions_and_levels(bits):
    w = torch.randn(20000, generator=torch.Generator().manual_seed(bits))
    qt = quantize_tensor(w, bits, "pwlq")
    m, p = qt.scale.float().item(), qt.breakpoint.float().item()
    deq = qt.dequantize()
    region = (qt.codes >> (bits - 1)) & 1
    center = w.abs() <= p
    assert torch.equal(region.bool(), ~center)
    L1, L2 = 2 ** (bits - 1) - 1, 2 ** (bits - 2) - 1
    # center: (n-1)-bit uniform grid over [-p, p], round to nearest
    c_levels = 2 * p * (torch.arange(L1 + 1) / L1 - 0.5)
    assert torch.all(deq[center].abs() <= p * (1 + 1e-6))
    nearest_c = c_levels[(w[center].unsqueeze(1) - c_levels).abs().argmin(1)]
    assert torch.allclose(deq[center], nearest_c, atol=1e-6)
    # tail: sign + (n-2)-bit grid over [p, m]
    tail = ~center
    assert torch.equal(deq[tail] < 0, w[tail] < 0)
    if bits == 2:
        assert torch.allclose(deq[tail].abs(), torch.tensor((p + m) / 2))
    else:
        t_levels = p + (m - p) * torch.arange(L2 + 1) / L2
        nearest_t = t_levels[(w[tail].abs().unsqueeze(1) - t_levels).abs().argmin(1)]
        assert torch.allclose(deq[tail].abs(), nearest_t, atol=1e-6)
    assert torch.unique(deq).numel() <= 2**bits


# --------------------------------------------------------------------------- error behaviour


def _mse(a, b):
    return float(((a.double() - b.double()) ** 2).mean())


@pytest.mark.parametrize("method", METHODS)
def test_error_falls_as_bits_rise(method):
    w = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    errs = [_mse(fake_quantize(w, b, method, seed=1), w) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def _laplace(n, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()


@pytest.mark.parametrize("dist", ["gaussian", "laplacian"])
@pytest.mark.parametrize("seed", [0, 1])
def test_pwlq_beats_uniform_at_4_bits(dist, seed):
    n = 1 << 18
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)) if dist == "gaussian" else _laplace(n, seed)
    e_u = _mse(fake_quantize(w, 4, "uniform"), w)
    e_p = _mse(fake_quantize(w, 4, "pwlq"), w)
    assert e_p < e_u, (e_p, e_u)
    # the paper's stochastic PWLQ beats stochastic uniform too
    e_su = _mse(fake_quantize(w, 4, "stochastic", seed=seed), w)
    e_sp = _mse(fake_quantize(w, 4, "pwlq-stochastic", seed=seed), w)
    if dist == "laplacian":
        assert e_sp < e_su, (e_sp, e_su)


# --------------------------------------------------------------------------- stochastic


@pytest.mark.parametrize("method", ["stochastic", "pwlq-stochastic"])
def test_stochastic_reproducible_and_seed_dependent(method):
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    a = quantize_tensor(w, 4, method, "channel", seed=123)
    b = quantize_tensor(w, 4, method, "channel", seed=123)
    c = quantize_tensor(w, 4, method, "channel", seed=124)
    assert torch.equal(a.codes, b.codes)
    assert not torch.equal(a.codes, c.codes)
    # stochastic differs from round-to-nearest
    det = "uniform" if method == "stochastic" else "pwlq"
    assert not torch.equal(a.codes, quantize_tensor(w, 4, det, "channel").codes)


@pytest.mark.parametrize("method", ["uniform", "pwlq"])
def test_deterministic_methods_ignore_seed(method):
    w = torch.randn(300)
    assert torch.equal(fake_quantize(w, 3, method, seed=0), fake_quantize(w, 3, method, seed=99))


@pytest.mark.parametrize("method", ["stochastic", "pwlq-stochastic"])
def test_stochastic_rounding_is_unbiased(method):
    w = torch.tensor([0.8, -0.33, 0.05, 0.41, -0.77, 1.0, -1.0, 0.6])
    mean = torch.stack([fake_quantize(w, 3, method, seed=s) for s in range(2000)]).mean(0)
    assert torch.allclose(mean, w, atol=0.02), (mean, w)


@pytest.mark.parametrize("bits", range(2, 9))
def test_decode_levels_use_true_division(bits):
    # decode's c/L must be IEEE float32 division (what CUDA also does via true_div_),
    # not c * (1/L), which differs for most c and every L > 1
    L = 2**bits - 1
    c = torch.arange(L + 1, dtype=torch.uint8)
    qt = QTensor(c, torch.tensor(0.5, dtype=torch.float16), None, bits, "uniform", "tensor", c.shape, torch.float32)
    ref = (np.arange(L + 1, dtype=np.float32) / np.float32(L) - np.float32(0.5)) * np.float32(1.0)
    assert np.array_equal(qt.dequantize().numpy(), ref)
