"""Speed and memory of several recipes on one model, baselines in the same process (GPU only).

    python bench/recipe_speed.py -m sd15-arch recipes/w8-pwlq.yaml recipes/paper-final.yaml ... --out OUT.json

For each recipe the model is quantized in memory into packed layers (what `quantsd bench --recipe`
measures), eager, fp16 + SDPA: UNet ms/step (CFG batch 2, 512², CUDA events, median of 20 after
warm-up), seconds per image (50 steps, CFG 7.5), peak VRAM and UNet weight bytes resident.
fp16 + SDPA and fp32 + classic attention run first as baselines.  These are the speed columns of
the eval table (`quantsd eval-table`); one `quantsd bench` run per recipe gives the same numbers
plus compiled variants and resolution limits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import BenchConfig, build_pipeline, seconds_per_image, unet_step_ms, weight_bytes  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*")
    ap.add_argument("-m", "--model", default="sd15-arch")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    runs = [("fp32-classic", BenchConfig("fp32-classic", dtype="float32", attention="classic"), None),
            ("fp16-sdpa", BenchConfig("fp16-sdpa"), None)]
    runs += [(Path(r).stem, BenchConfig(Path(r).stem, packed=True), load_recipe(r)) for r in a.recipes]
    rows = []
    for name, cfg, recipe in runs:
        pipe = build_pipeline(a.model, cfg, dev, recipe=recipe)
        row = {"name": name, "unet_ms": unet_step_ms(pipe, 512)["median"],
               "unet_weight_mib": round(weight_bytes(pipe.unet) / 2 ** 20, 1)}
        img = seconds_per_image(pipe, a.steps, 7.5, 512, 512)
        row.update(s_per_image=img["median"], peak_vram_gib=img["peak_vram_bytes"] / 2 ** 30)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del pipe
        torch.cuda.empty_cache()
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": a.model, "rows": rows}
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
