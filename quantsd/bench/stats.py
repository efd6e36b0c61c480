"""The bench's pure logic (CPU-tested): the max-resolution bisection, and the statistics of the eager
pair -- pipelines taking turns, per-round ratios, their median and its distribution-free interval."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Sequence

__all__ = ["binary_search_max", "interleaved_rounds", "median_ci", "paired_ratio"]


def binary_search_max(fits: Callable[[int], bool], lo: int, hi: int, step: int = 64,
                      deadline: float | None = None, lo_fits: bool = False,
                      on_probe: Callable[[int, bool], None] | None = None) -> dict:
    """Largest multiple of ``step`` in [lo, hi] with ``fits(s)`` True, assuming monotonicity.

    Returns {"max": s or None, "fit": largest s seen fitting, "fail": smallest s seen failing,
    "probes": [(s, ok), ...], "complete": bool}.  ``lo`` is probed first (if it fails the answer
    is None) unless ``lo_fits`` says it is known to fit (e.g. found under a smaller cap); stops
    early (complete=False) when ``time.monotonic()`` passes ``deadline``.  ``on_probe(s, ok)`` hears
    each probe as it ends: a search cut from outside (a large side's probe can take a minute) still
    leaves its bracket in the log.
    """
    lo = int(math.ceil(lo / step)) * step
    hi = int(hi // step) * step
    probes: list[tuple[int, bool]] = []

    def probe(s: int) -> bool:
        ok = bool(fits(s))
        probes.append((s, ok))
        if on_probe is not None:
            on_probe(s, ok)
        return ok

    if lo > hi:
        raise ValueError(f"empty search range [{lo}, {hi}] for step {step}")
    if not lo_fits and not probe(lo):
        return {"max": None, "fit": None, "fail": lo, "probes": probes, "complete": True}
    good, bad = lo, None
    if probe(hi):
        return {"max": hi, "fit": hi, "fail": None, "probes": probes, "complete": True}
    bad = hi
    while bad - good > step:
        if deadline is not None and time.monotonic() > deadline:
            return {"max": good, "fit": good, "fail": bad, "probes": probes, "complete": False}
        mid = ((good + bad) // 2 // step) * step
        if mid <= good:
            mid = good + step
        if probe(mid):
            good = mid
        else:
            bad = mid
    return {"max": good, "fit": good, "fail": bad, "probes": probes, "complete": True}


def _pctl(xs: Sequence[float]) -> dict:
    xs = sorted(xs)
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "n": len(xs)}


def interleaved_rounds(fns: dict[str, Callable[[], Any]], rounds: int, calls: int,
                       timer: Callable[[Callable[[], Any]], float]) -> dict[str, list[float]]:
    """Per name, one number per round: the median of ``calls`` calls of its function, each timed by
    ``timer`` (milliseconds).  The names take turns inside every round, their order reversed from one
    round to the next (A B, B A, ...), so a host whose speed drifts -- the H200 box's Python moved by
    up to 1.6x between rounds -- slows both sides of a round alike."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(statistics.median(timer(fns[name]) for _ in range(calls)))
    return out


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median of ``values`` (the sign test's: order
    statistics k and n-k+1 with P(Binomial(n, 1/2) < k) <= (1 - level) / 2), or None when there are
    too few values for that level (n < 6 at 95%).  Why not a bootstrap: no random draws, and at
    least the stated coverage for any distribution of independent rounds."""
    import math

    n = len(values)
    alpha = (1 - level) / 2
    k, tail = 0, 0.0        # tail: P(Binomial(n, 1/2) <= k - 1)
    while True:
        nxt = tail + math.comb(n, k) / 2 ** n
        if nxt > alpha:
            break
        tail, k = nxt, k + 1
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def paired_ratio(per_round: dict[str, list[float]], num: str, den: str) -> dict:
    """``num`` / ``den`` from :func:`interleaved_rounds`' numbers: the median of the per-round ratios
    (each ratio compares two measurements taken moments apart) with their range and a 95% interval
    for it (:func:`median_ci`), and each side's median and minimum (the least disturbed round)."""
    a, b = per_round[num], per_round[den]
    if not a or len(a) != len(b):
        raise ValueError(f"{num!r} and {den!r} need the same, non-zero number of rounds")
    ratios = [x / y for x, y in zip(a, b)]
    ci = median_ci(ratios)
    return {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_ci95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)],
            "ratio_of_minima": min(a) / min(b), "rounds": len(ratios), "ratios": [round(r, 4) for r in ratios],
            f"{num}_ms": statistics.median(a), f"{den}_ms": statistics.median(b)}
