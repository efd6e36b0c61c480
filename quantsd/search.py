"""Mixed-precision bit-map search (``quantsd search``).

Each block gets one *choice*: one of the (method, bits) settings measured by a sensitivity
sweep, or staying dense at fp16. A choice costs its exact packed bytes (codes + stored scales /
breakpoints + everything else in the block at fp16, as the sweep recorded them) and contributes
its measured final-image error. Errors of different blocks are treated as independent
perturbations, so the predicted error of a bit map is ``sqrt(sum_i e_i^2)`` (relative L2 errors
of uncorrelated perturbations add in quadrature); minimising it is minimising ``sum_i e_i^2``,
a linear objective.

That makes the search an exact multiple-choice knapsack, solved as an integer linear program
with SciPy's HiGHS MILP solver (binary x[b, c], one choice per block, a size or an error
constraint). It is exact in bytes — no discretised capacity, no greedy ratio heuristic.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

DENSE = ("fp16", 16)


class SearchError(ValueError):
    """An infeasible budget or an unusable sensitivity directory."""


@dataclass(frozen=True)
class Choice:
    method: str      # "fp16" for the dense choice
    bits: int
    nbytes: int
    error: float     # measured final-image relative L2 error (%) with only this block quantized
    granularity: str = "tensor"


@dataclass
class SearchProblem:
    blocks: list[str]
    choices: list[list[Choice]]
    fixed_bytes: int          # parameters outside swept blocks (kept fp16)
    granularity: str
    model: str

    @property
    def min_bytes(self) -> int:
        return self.fixed_bytes + sum(min(c.nbytes for c in cs) for cs in self.choices)

    @property
    def dense_bytes(self) -> int:
        return self.fixed_bytes + sum(c.nbytes for cs in self.choices for c in cs if c.method == "fp16")


@dataclass
class Solution:
    picks: dict[str, Choice]
    total_bytes: int
    predicted_error: float

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "total_mb": self.total_bytes / 1e6,
                "predicted_image_error": self.predicted_error,
                "blocks": {b: {"method": c.method, "bits": c.bits, "granularity": c.granularity,
                               "bytes": c.nbytes, "error": c.error}
                           for b, c in self.picks.items()}}


def load_problem(sensitivity_dir: str | Path | list, error_key: str = "image_error",
                 methods: tuple[str, ...] | None = None, allow_dense: bool = True) -> SearchProblem:
    """Build the knapsack from one or more sweep directories (``sweep.json`` + ``sensitivity.jsonl``).

    Several directories (e.g. a per-tensor and a per-channel sweep of the same model, prompts and
    seed) pool their choices, so the search also picks the granularity per block.
    """
    dirs = [Path(d) for d in (sensitivity_dir if isinstance(sensitivity_dir, (list, tuple)) else [sensitivity_dir])]
    by_block: dict[str, list[Choice]] = {}
    fp16: dict[str, int] = {}
    metas = []
    for d in dirs:
        meta_path, results = d / "sweep.json", d / "sensitivity.jsonl"
        if not meta_path.exists() or not results.exists():
            raise SearchError(f"{d} is not a sensitivity directory (needs sweep.json and sensitivity.jsonl); "
                              "run `quantsd sensitivity -o DIR` first")
        metas.append(json.loads(meta_path.read_text()))
        for line in results.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if methods and r["method"] not in methods:
                continue
            by_block.setdefault(r["block"], []).append(Choice(
                r["method"], int(r["bits"]), int(r["packed_bytes"]), float(r[error_key]), r["granularity"]))
            fp16[r["block"]] = int(r["fp16_bytes"])
    meta = metas[0]
    for other, d in zip(metas[1:], dirs[1:]):
        for key in ("model", "prompts", "seed", "steps", "guidance", "height", "width", "dtype"):
            if other.get(key) != meta.get(key):
                raise SearchError(f"{d} was swept with a different {key} than {dirs[0]}; "
                                  "pool only sweeps of the same model, prompts and sampling settings")
    if not by_block:
        raise SearchError(f"{', '.join(map(str, dirs))}: no usable results")
    blocks = list(by_block)
    choices = []
    for b in blocks:
        cs = sorted(set(by_block[b]), key=lambda c: (c.nbytes, c.error))
        if allow_dense:
            cs.append(Choice(*DENSE, fp16[b], 0.0, "none"))
        choices.append(cs)
    return SearchProblem(blocks, choices, int(meta.get("fixed_bytes", 0)), meta.get("granularity", "tensor"),
                         meta.get("model", "?"))


def _solve(problem: SearchProblem, budget_bytes: int | None = None, max_error: float | None = None) -> Solution:
    sizes = [len(cs) for cs in problem.choices]
    n = sum(sizes)
    cost = np.array([c.nbytes for cs in problem.choices for c in cs], dtype=float)
    err2 = np.array([c.error ** 2 for cs in problem.choices for c in cs], dtype=float)
    one_per_block = np.zeros((len(sizes), n))
    start = 0
    for i, k in enumerate(sizes):
        one_per_block[i, start:start + k] = 1
        start += k
    constraints = [LinearConstraint(one_per_block, 1, 1)]
    if budget_bytes is not None:
        constraints.append(LinearConstraint(cost[None, :], -np.inf, budget_bytes - problem.fixed_bytes))
        objective = err2
    else:
        constraints.append(LinearConstraint(err2[None, :], -np.inf, max_error ** 2))
        objective = cost
    res = milp(objective, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0.0})
    if res.status != 0 or res.x is None:
        raise SearchError("no bit map satisfies the constraint "
                          f"({'budget %.4f MB' % (budget_bytes / 1e6) if budget_bytes is not None else 'max error %g%%' % max_error}); "
                          f"the smallest possible size is {problem.min_bytes / 1e6:.4f} MB")
    x = np.round(res.x).astype(bool)
    picks, start = {}, 0
    for b, cs in zip(problem.blocks, problem.choices):
        k = len(cs)
        picks[b] = cs[int(np.argmax(x[start:start + k]))]
        start += k
    total = problem.fixed_bytes + sum(c.nbytes for c in picks.values())
    return Solution(picks, total, math.sqrt(sum(c.error ** 2 for c in picks.values())))


def search(problem: SearchProblem, budget_mb: float | None = None, avg_bits: float | None = None,
           max_error: float | None = None) -> Solution:
    """Exactly one of ``budget_mb`` (1 MB = 10^6 bytes), ``avg_bits`` (bits per swept parameter,
    everything counted) or ``max_error`` (predicted final-image relative L2, %)."""
    given = [v is not None for v in (budget_mb, avg_bits, max_error)]
    if sum(given) != 1:
        raise SearchError("give exactly one of --budget-mb, --avg-bits, --max-error")
    if max_error is not None:
        if max_error <= 0:
            raise SearchError(f"--max-error must be > 0, got {max_error}")
        return _solve(problem, max_error=max_error)
    if avg_bits is not None:
        if not 1 <= avg_bits <= 16:
            raise SearchError(f"--avg-bits must be in 1..16, got {avg_bits}")
        n_params = problem.dense_bytes / 2
        budget = int(avg_bits * n_params / 8)
    else:
        if budget_mb <= 0:
            raise SearchError(f"--budget-mb must be > 0, got {budget_mb}")
        budget = int(budget_mb * 1e6)
    return _solve(problem, budget_bytes=budget)


def pareto_front(problem: SearchProblem, points: int = 40) -> list[Solution]:
    """Optimal bit maps for evenly spaced size budgets between the smallest and the dense size."""
    lo, hi = problem.min_bytes, problem.dense_bytes
    front, seen = [], set()
    for budget in np.linspace(lo, hi, points):
        sol = _solve(problem, budget_bytes=int(math.ceil(budget)))
        if sol.total_bytes not in seen:
            seen.add(sol.total_bytes)
            front.append(sol)
    return front


def solution_to_recipe(sol: Solution, name: str, granularity: str = "tensor", seed: int = 0,
                       note: str = "") -> dict:
    """A DESIGN §5 recipe: one rule per block (exact block path), dense blocks in ``ignore``.

    The most frequent (method, bits, granularity) becomes ``defaults`` to keep the recipe short.
    """
    rules, ignore = [], []
    for block, c in sol.picks.items():
        if c.method == "fp16":
            ignore.append(block)
        else:
            rules.append({"match": [block], "bits": c.bits, "method": c.method, "granularity": c.granularity})
    common = {"bits": 8, "method": "pwlq", "granularity": granularity}
    if rules:
        counts: dict[tuple, int] = {}
        for r in rules:
            key = (r["method"], r["bits"], r["granularity"])
            counts[key] = counts.get(key, 0) + 1
        (m, b, g), _ = max(counts.items(), key=lambda kv: kv[1])
        common = {"bits": b, "method": m, "granularity": g}
        rules = [r for r in rules if (r["method"], r["bits"], r["granularity"]) != (m, b, g)]
        for r in rules:
            if r["granularity"] == g:
                del r["granularity"]
    return {"quantsd_recipe": 1, "name": name,
            "description": note or f"searched: {sol.total_bytes / 1e6:.4f} MB, predicted image error "
                                   f"{sol.predicted_error:.4g}%",
            "seed": seed, "defaults": common, "ignore": ignore, "rules": rules}
