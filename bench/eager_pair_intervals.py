"""95% intervals for the eager pair's median ratios of saved bench runs (``results.json`` files),
including runs from before the bench reported them.

    python bench/eager_pair_intervals.py bench/results/bench_eager_pair_h200_session17_run2.json ...

Why: a median ratio of 1.005 says nothing about "no slower" without its precision; this recomputes
every pair in a run -- packed / fp16-sdpa, each variant / fp16-sdpa and / packed, and variants of
one backend against each other -- from the per-round times the runs saved
(:func:`quantsd.bench.stats.median_ci`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.stats import paired_ratio  # noqa: E402


def pair_intervals(results: dict) -> list[dict]:
    """Every (numerator, denominator) of a run's eager pair with its median ratio and interval."""
    pair = (results.get("eager_interleaved") or {}).get("packed_vs_fp16_sdpa") or {}
    rounds = pair.get("unet_ms_rounds") or {}
    if not {"packed", "fp16-sdpa"} <= set(rounds):
        return []

    def row(num: str, den: str) -> dict:
        r = paired_ratio(rounds, num, den)
        return {"num": num, "den": den, "median": round(r["ratio_median"], 4), "ci95": r["ratio_ci95"],
                "rounds": r["rounds"]}

    names = list(rounds)
    rows = [row(num, den) for num in names for den in ("fp16-sdpa", "packed")
            if num != den and not (num == "fp16-sdpa" and den == "packed")]
    # each packed variant against the dense variant of the same attention backend (``packed-x`` / ``fp16-sdpa-x``)
    rows += [row(num, f"fp16-sdpa-{num[len('packed-'):]}") for num in names
             if num.startswith("packed-") and f"fp16-sdpa-{num[len('packed-'):]}" in rounds]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="results.json files of quantsd bench runs")
    ap.add_argument("--out", help="also write the table as JSON")
    a = ap.parse_args()
    table = {}
    for path in a.results:
        rows = pair_intervals(json.loads(Path(path).read_text()))
        table[path] = rows
        print(path + (":" if rows else ": no eager pair"))
        for r in rows:
            ci = "n/a" if r["ci95"] is None else f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}"
            print(f"  {r['num']} / {r['den']}: {r['median']:.3f}x (95% CI {ci}; {r['rounds']} rounds)")
    if a.out:
        Path(a.out).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
