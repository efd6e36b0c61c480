"""The paper's quantizers (DESIGN §3) as pure tensor maths on a grouped view.

All functions here take ``wv``, the weight reshaped to ``(*P, k)`` (see granularity.py),
and parameters of shape ``P``.  Everything is computed in float32 on the weight's device;
the parameters used are always the *stored* ones (rounded to the scale dtype, then back
to float32), so the simulated weights equal what a loader rebuilds from codes, bit for bit.

With L = 2^n - 1 and Q_n(i) = round(i*L)/L:

uniform      m = max|w|;  c = clamp(round((w/(2m) + 1/2) * L), 0, L);  w_q = 2m*(c/L - 1/2)
stochastic   as uniform with u ~ Unif(-1/2, 1/2) added before rounding (= u/L added to
             the quantizer input, as the paper writes it)
pwlq         breakpoint p = sigma * ln(0.8030*m/sigma - 0.3167) (sigma = std(w), population),
             clamped to [m/64, 63m/64]; code = region bit (MSB) + n-1 payload bits.
             center |w| <= p: (n-1)-bit uniform level over [-p, p]
             tail   |w| >  p: sign bit (1 = negative) + (n-2)-bit level over [p, m];
                    for n = 2 there are 0 level bits and the tail magnitude is (p+m)/2.
             Deterministic round-to-nearest: the paper rounds stochastically, but
             stochastic rounding roughly doubles the MSE of every region and DESIGN §3
             allows a deterministic variant, so that is the default "pwlq".
pwlq-stochastic  the paper's version: u ~ Unif(-1/2, 1/2) added before both roundings.
"""

from __future__ import annotations

import torch

__all__ = [
    "METHODS",
    "STOCHASTIC_METHODS",
    "PWLQ_METHODS",
    "BP_CLAMP_LO",
    "BP_CLAMP_HI",
    "uniform_scale",
    "pwlq_breakpoint",
    "encode",
    "decode",
    "true_div_",
]

METHODS: tuple[str, ...] = ("uniform", "stochastic", "pwlq", "pwlq-stochastic")
STOCHASTIC_METHODS = frozenset({"stochastic", "pwlq-stochastic"})
PWLQ_METHODS = frozenset({"pwlq", "pwlq-stochastic"})

# Breakpoint clamp, as fractions of m.  The paper's formula can leave (0, m): its log
# argument is <= 1 (so p <= 0) whenever m/sigma < 1.64, e.g. tiny groups, and it is NaN
# when sigma = 0 (constant group).  Such p go to the lower bound m/64 (also the limit of
# sigma*ln(c/sigma) as sigma -> 0); large p are capped at 63m/64 so the tail keeps a
# non-empty range.
BP_CLAMP_LO = 1.0 / 64.0
BP_CLAMP_HI = 63.0 / 64.0


def uniform_scale(wv: torch.Tensor) -> torch.Tensor:
    """Per-group max|w| in float32 (shape P); the caller rounds it to the storage dtype."""
    return wv.abs().amax(dim=-1)


def pwlq_breakpoint(wv: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-group PWLQ breakpoint p from the *stored* max ``m`` (float32, shape P).

    sigma is the population std (correction=0: defined for groups of one element),
    reduced in float64 so the result does not depend on the reduction order (CPU vs
    CUDA) before it is rounded to the storage dtype.  Runs in float64 on parameter-sized
    tensors only, so its cost is one reduction over the weight.
    """
    sigma = wv.double().std(dim=-1, correction=0).cpu()
    # The formula runs on CPU (parameter-sized tensors): CUDA's libm log may differ from the
    # CPU's in the last ulp, which could flip the fp16 rounding of p between devices.
    m64 = m.double().cpu()
    p = sigma * torch.log(0.8030 * (m64 / sigma) - 0.3167)
    lo = m64 * BP_CLAMP_LO
    hi = m64 * BP_CLAMP_HI
    p = torch.where(torch.isfinite(p) & (p > lo), p, lo)
    p = torch.minimum(p, hi)
    return p.float().to(m.device)


def true_div_(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x /= k`` in place with IEEE division on every device (use this for ``code / L``).

    ``x / k`` with a Python number ``k`` is *not* the same on CUDA: PyTorch computes it as
    ``x * (1/k)``, which rounds differently from the CPU's true division; a 0-dim tensor
    divisor on x's device forces true division, so CPU and CUDA decode agree bit for bit.
    """
    return x.div_(torch.full((), float(k), dtype=x.dtype, device=x.device))


def _levels(bits: int) -> tuple[int, int, int]:
    return (1 << bits) - 1, (1 << (bits - 1)) - 1, (1 << (bits - 2)) - 1


def encode(
    wv: torch.Tensor,
    method: str,
    bits: int,
    m: torch.Tensor,
    p: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer codes (uint8, shape of ``wv``) for float32 ``wv`` with stored params m, p.

    ``noise`` is u ~ Unif(-1/2, 1/2) of ``wv``'s shape for the stochastic methods, else None.
    """
    # In-place ops below only ever touch fresh temporaries (never ``wv``, which may alias the
    # caller's weight); they compute exactly what the out-of-place expressions would.
    L, L1, L2 = _levels(bits)
    m = m.unsqueeze(-1)
    if method in ("uniform", "stochastic"):
        safe_m = torch.where(m > 0, m, torch.ones_like(m))  # m == 0 groups: w == 0, decode gives 0
        t = wv / (2 * safe_m)
        t.add_(0.5).mul_(L)  # (w/(2m) + 1/2) * L
        if noise is not None:
            t.add_(noise)
        return t.round_().clamp_(0, L).to(torch.uint8)

    assert p is not None
    p = p.unsqueeze(-1)
    sign = (wv < 0).to(torch.uint8)
    # center: (n-1)-bit uniform level over [-p, p]
    safe_p = torch.where(p > 0, p, torch.ones_like(p))
    tc = wv / (2 * safe_p)
    tc.add_(0.5).mul_(L1)
    if noise is not None:
        tc.add_(noise)
    cc = tc.round_().clamp_(0, L1).to(torch.uint8)
    del tc
    # tail: (n-2)-bit level of |w| over [p, m]
    d = m - p
    safe_d = torch.where(d > 0, d, torch.ones_like(d))
    tl = wv.abs()
    center = tl <= p
    tl.sub_(p).div_(safe_d).mul_(L2)  # (|w| - p) / (m - p) * L2
    if noise is not None:
        tl.add_(noise)
    lvl = tl.round_().clamp_(0, L2).to(torch.uint8)
    del tl
    tail = lvl.bitwise_or_(sign.bitwise_left_shift_(bits - 2)).bitwise_or_(1 << (bits - 1))
    return torch.where(center, cc, tail)


def decode(
    cv: torch.Tensor,
    method: str,
    bits: int,
    m: torch.Tensor,
    p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 weights from codes ``cv`` (grouped view) and float32 stored params m, p."""
    # Decoded in place in one or two float32 buffers (this runs inside QuantLinear/QuantConv2d's
    # forward); each in-place op computes exactly what the paper's expression does.
    # Divisors are 0-dim tensors on cv's device, never Python scalars: PyTorch's CUDA kernels
    # turn division by a scalar into multiplication by its reciprocal, which rounds differently
    # from the CPU's true division (seen on H100: up to 6 ulp after the "- 1/2" cancellation).
    L, L1, L2 = _levels(bits)
    m = m.unsqueeze(-1)
    if method in ("uniform", "stochastic"):
        out = true_div_(cv.float(), L).sub_(0.5).mul_(2 * m)  # 2m * (c/L - 1/2)
        return out.masked_fill_(m == 0, 0.0)  # +0.0 (not -0.0) for all-zero groups

    assert p is not None
    p = p.unsqueeze(-1)
    out = true_div_((cv & L1).float(), L1).sub_(0.5).mul_(2 * p)  # center: 2p * (c/L1 - 1/2)
    out.masked_fill_(p == 0, 0.0)
    if L2 > 0:
        mag = true_div_((cv & L2).float(), L2).mul_(m - p).add_(p)  # tail: p + (m-p) * l/L2
    else:  # n = 2: no level bits, one magnitude per tail at the middle of [p, m]
        mag = ((p + m) * 0.5).expand(cv.shape).contiguous()
    sign = 1 - 2 * ((cv >> (bits - 2)) & 1).to(torch.int8)  # +1 / -1 (1 = negative)
    mag.mul_(sign)
    region = cv >= (1 << (bits - 1))
    return torch.where(region, mag, out, out=out)
