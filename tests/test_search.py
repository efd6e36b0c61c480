import itertools
import json
import math

import pytest
import yaml
from click.testing import CliRunner

from quantsd.blocks import component_roots
from quantsd.cli import main
from quantsd.recipe import load_recipe, resolve_recipe
from quantsd.search import Choice, SearchError, SearchProblem, load_problem, search, solution_to_recipe
from quantsd.sensitivity import SweepConfig, run_sensitivity


def _random_problem(rng, n_blocks=5):
    blocks, choices = [], []
    for i in range(n_blocks):
        size = rng.randint(1000, 5000)
        cs = [Choice("uniform", b, size * b // 16 + rng.randint(0, 50), rng.uniform(0.1, 20) / b) for b in (2, 4, 8)]
        cs.append(Choice("fp16", 16, size, 0.0))
        blocks.append(f"b{i}")
        choices.append(cs)
    return SearchProblem(blocks, choices, fixed_bytes=123, granularity="tensor", model="x")


def _brute(problem, budget=None, max_error=None):
    best = None
    for combo in itertools.product(*problem.choices):
        size = problem.fixed_bytes + sum(c.nbytes for c in combo)
        err = math.sqrt(sum(c.error ** 2 for c in combo))
        if budget is not None and size <= budget:
            key = (err, size)
        elif max_error is not None and err <= max_error:
            key = (size, err)
        else:
            continue
        best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
def test_milp_is_exact_against_brute_force(seed):
    import random

    rng = random.Random(seed)
    problem = _random_problem(rng)
    budget = rng.randint(problem.min_bytes, problem.dense_bytes)
    sol = search(problem, budget_mb=budget / 1e6)
    err, _ = _brute(problem, budget=budget)
    assert sol.total_bytes <= budget
    assert sol.predicted_error == pytest.approx(err, rel=1e-9, abs=1e-9)
    cap = rng.uniform(0.5, 5)
    best = _brute(problem, max_error=cap)
    if best is None:
        with pytest.raises(SearchError):
            search(problem, max_error=cap)
    else:
        sol = search(problem, max_error=cap)
        assert sol.total_bytes == best[0] and sol.predicted_error <= cap + 1e-9


def test_infeasible_budget_names_the_minimum():
    import random

    problem = _random_problem(random.Random(0))
    with pytest.raises(SearchError, match="smallest possible size"):
        search(problem, budget_mb=problem.min_bytes / 1e6 / 2)
    with pytest.raises(SearchError, match="exactly one"):
        search(problem, budget_mb=1, max_error=1)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    from quantsd.models import load_pipeline

    d = tmp_path_factory.mktemp("sweep")
    cfg = SweepConfig(model="tiny", prompts=("a red circle", "a cat"), methods=("uniform", "pwlq"),
                      bits=(2, 4, 8), steps=2)
    run_sensitivity(load_pipeline("tiny"), cfg, d, progress=False)
    return d


def test_recipe_size_equals_search_size(sweep_dir, tiny_pipe):
    problem = load_problem(sweep_dir)
    sol = search(problem, avg_bits=6)
    recipe = load_recipe(solution_to_recipe(sol, "t", "tensor"))
    plan = resolve_recipe(tiny_pipe, recipe)
    total_params = sum(p.numel() for _, _, root in component_roots(tiny_pipe) for p in root.parameters())
    quantized = sum(lp.numel for lp in plan.layers)
    assert sum(lp.nbytes for lp in plan.layers) + 2 * (total_params - quantized) == sol.total_bytes
    assert sol.total_bytes <= 6 * total_params / 8


def test_cli_search_writes_recipe_pareto_and_measurement(sweep_dir, tmp_path):
    out = tmp_path / "mixed-0.5x.yaml"  # a dot in the stem must survive in the side files
    r = CliRunner().invoke(main, ["search", "--sensitivity", str(sweep_dir), "--avg-bits", "5",
                                  "--device", "cpu", "-o", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output[r.output.index("{"):])
    assert yaml.safe_load(out.read_text())["quantsd_recipe"] == 1
    assert (tmp_path / "mixed-0.5x.pareto.csv").read_text().count("\n") >= 3
    assert (tmp_path / "mixed-0.5x.pareto.png").stat().st_size > 0
    assert json.loads((tmp_path / "mixed-0.5x.search.json").read_text())["total_bytes"] == summary["total_bytes"]
    measured = summary["measured"]["image_error"]
    assert 0 < measured and summary["predicted_image_error"] > 0
    # single-block errors add roughly in quadrature: prediction within a factor 3 of reality
    assert summary["predicted_image_error"] / 3 < measured < 3 * summary["predicted_image_error"]
    bad = CliRunner().invoke(main, ["search", "--sensitivity", str(sweep_dir), "--budget-mb", "0.0001",
                                    "--no-measure", "-o", str(tmp_path / "x.yaml")])
    assert bad.exit_code != 0 and "smallest possible size" in bad.output
    assert not (tmp_path / "x.yaml").exists()
