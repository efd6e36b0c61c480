"""Size (search accounting) and measured final-image error of a recipe on the fixture.

    .venv/bin/python scripts/fixture_paper_final.py recipes/paper-final.yaml sensitivity/fixture-tensor
"""

import json
import sys

import torch

from quantsd.blocks import component_roots
from quantsd.models import load_pipeline
from quantsd.recipe import resolve_recipe
from quantsd.search_measure import measure_recipe

if __name__ == "__main__":
    recipe, sweep = sys.argv[1], sys.argv[2]
    torch.set_num_threads(2)
    pipe = load_pipeline("fixture")
    plan = resolve_recipe(pipe, recipe, warn=False)
    params = sum(p.numel() for _, _, root in component_roots(pipe) for p in root.parameters())
    quantized = sum(lp.numel for lp in plan.layers)
    size = sum(lp.nbytes for lp in plan.layers) + 2 * (params - quantized)
    result = {"recipe": recipe, "size_bytes": size, "size_mb": size / 1e6, "dense_fp16_mb": 2 * params / 1e6,
              "measured": measure_recipe(recipe, sweep, device="cpu")}
    print(json.dumps(result, indent=2))
