"""Attribute adherence (fixture checker) of the fixture under each recipe, on held-out prompts.

    .venv/bin/python scripts/fixture_recipe_adherence.py --n 64 recipes/paper-final.yaml recipes/fixture-searched.yaml
"""

import argparse
import json

import torch

from quantsd.fixture.evaluate import evaluate_adherence
from quantsd.models import load_pipeline
from quantsd.recipe import apply_recipe

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("recipes", nargs="*")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = {}
    for recipe in ["fp32"] + args.recipes:
        pipe = load_pipeline("fixture")
        if recipe != "fp32":
            apply_recipe(pipe, recipe, warn=False)
        res = evaluate_adherence(pipe, n=args.n, steps=args.steps, guidance=5.0, seed=0, batch_size=32)
        rows[recipe] = {k: v for k, v in res.items() if k != "images"}
        print(recipe, json.dumps(rows[recipe]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"protocol": f"{args.n} held-out fixture prompts, {args.steps} steps DPM-Solver++, guidance 5, "
                                   "seed 0, CPU fp32, fixture checker", "results": rows}, f, indent=2)
