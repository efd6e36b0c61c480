"""Size (search accounting) and measured error of recipes, on a sweep's model, prompts and settings.

    python scripts/recipe_error.py --sweep sensitivity/fixture-tensor recipes/paper-final.yaml [...]
    python scripts/recipe_error.py --sweep sensitivity/sd15-arch --device cuda recipes/paper-final.yaml \
        sensitivity/sd15-arch/searched-719mb.yaml

Every recipe quantizes the whole pipeline at once; the error (relative L2, %) is measured at the
text embeddings, the final latents and the decoded image against the sweep's full-precision
reference (the same numbers `quantsd search --measure` prints for its own recipe).
"""

import argparse
import json

import torch

from quantsd.blocks import component_roots
from quantsd.models import load_pipeline
from quantsd.recipe import resolve_recipe
from quantsd.search_measure import measure_recipe, sweep_config_from_dir

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--sweep", required=True, help="a `quantsd sensitivity` output directory")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(2)
    config = sweep_config_from_dir(a.sweep)
    pipe = load_pipeline(config.model)
    params = sum(p.numel() for _, _, root in component_roots(pipe) for p in root.parameters())
    results = []
    for recipe in a.recipes:
        plan = resolve_recipe(pipe, recipe, warn=False)
        quantized = sum(lp.numel for lp in plan.layers)
        size = sum(lp.nbytes for lp in plan.layers) + 2 * (params - quantized)
        results.append({"recipe": recipe, "size_bytes": size, "size_mb": size / 1e6, "dense_fp16_mb": 2 * params / 1e6,
                        "measured": measure_recipe(recipe, a.sweep, device=a.device)})
        print(json.dumps(results[-1]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
