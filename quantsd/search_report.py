"""``run_search``: sweep directory -> recipe YAML, Pareto CSV/PNG, predicted vs measured error."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import yaml

from .search import Solution, load_problem, pareto_front, search, solution_to_recipe
from .fileio import atomic_write_text


def _beside(stem: Path, suffix: str) -> Path:
    """``mixed-0.5x`` + ``.pareto.csv`` (``Path.with_suffix`` would eat the ``.5x``)."""
    return stem.with_name(stem.name + suffix)


def _write_pareto(front: list[Solution], chosen: Solution, stem: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["total_bytes", "total_mb", "predicted_image_error"])
    for s in front:
        w.writerow([s.total_bytes, f"{s.total_bytes / 1e6:.6f}", f"{s.predicted_error:.6g}"])
    atomic_write_text(_beside(stem, ".pareto.csv"), buf.getvalue())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s.total_bytes / 1e6 for s in front], [max(s.predicted_error, 1e-4) for s in front], "o-", ms=3,
            label="optimal bit maps (predicted)")
    ax.plot([chosen.total_bytes / 1e6], [max(chosen.predicted_error, 1e-4)], "r*", ms=12, label="chosen")
    ax.set_xlabel("packed size (MB)")
    ax.set_ylabel("predicted final-image rel. L2 (%)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = _beside(stem, ".pareto.png")
    tmp = png.with_name("." + png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)


def run_search(sensitivity_dir: str | Path, out: str | Path, *, budget_mb: float | None = None,
               avg_bits: float | None = None, max_error: float | None = None, name: str | None = None,
               methods: tuple[str, ...] | None = None, allow_dense: bool = True, measure: bool = True,
               device: str | None = None, pareto_points: int = 40) -> dict:
    """Solve, write the recipe (+ Pareto front), optionally measure it; returns the summary."""
    out = Path(out)
    problem = load_problem(sensitivity_dir, methods=methods, allow_dense=allow_dense)
    sol = search(problem, budget_mb=budget_mb, avg_bits=avg_bits, max_error=max_error)
    recipe = solution_to_recipe(sol, name or out.stem, problem.granularity)
    atomic_write_text(out, "# Written by `quantsd search`; see the .search.json beside it.\n"
                      + yaml.safe_dump(recipe, sort_keys=False))
    stem = out.with_name(out.name[: -len(out.suffix)] if out.suffix in (".yaml", ".yml") else out.name)
    _write_pareto(pareto_front(problem, pareto_points), sol, stem)
    summary = {"recipe": str(out), "sensitivity_dir": [str(d) for d in sensitivity_dir]
               if isinstance(sensitivity_dir, (list, tuple)) else str(sensitivity_dir), "model": problem.model,
               "constraint": {"budget_mb": budget_mb, "avg_bits": avg_bits, "max_error": max_error},
               "solver": "scipy.optimize.milp (HiGHS), exact multiple-choice knapsack",
               "dense_mb": problem.dense_bytes / 1e6, "min_mb": problem.min_bytes / 1e6,
               **sol.to_dict()}
    if measure:
        from .search_measure import measure_recipe

        first = sensitivity_dir[0] if isinstance(sensitivity_dir, (list, tuple)) else sensitivity_dir
        summary["measured"] = measure_recipe(out, first, device=device)
    atomic_write_text(_beside(stem, ".search.json"), json.dumps(summary, indent=2))
    return summary
