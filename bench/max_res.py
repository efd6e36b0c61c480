"""The max-resolution search of ``quantsd bench`` on its own (GPU only; BENCHMARKS.md).

    python bench/max_res.py --configs packed --caps 8,4 --lean --out OUT.json

Same protocol as ``quantsd bench``'s max-resolution rows (:func:`quantsd.bench.core.max_resolution`:
the caching allocator capped with ``set_per_process_memory_fraction``, one UNet step with CFG and
a tiled VAE decode per probe, binary search over multiples of 64), feed-forward chunks of
``--ff-chunk`` tokens, for runs where the whole bench does not fit in the time at hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import Bench, BenchConfig, max_resolution  # noqa: E402
from quantsd.ff_chunking import chunk_feed_forward  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--configs", default="packed", help="packed and/or fp16-sdpa, comma-separated")
    ap.add_argument("--caps", default="8,4")
    ap.add_argument("--cfg-mode", default="sequential", choices=["sequential", "batch2"])
    ap.add_argument("--ff-chunk", type=int, default=4096)
    ap.add_argument("--lean", action="store_true")
    ap.add_argument("--time-budget", type=float, default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    deadline = None if a.time_budget is None else time.monotonic() + a.time_budget
    bench = Bench(model="sd15-arch", lean=a.lean)
    recipe = load_recipe(a.recipe)
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "lean": a.lean, "ff_chunk": a.ff_chunk,
           "cfg_mode": a.cfg_mode}
    for name in a.configs.split(","):
        cfg = BenchConfig(name, packed=name == "packed")
        pipe = bench._build(cfg, torch.device("cuda"), recipe)
        if a.ff_chunk:
            chunk_feed_forward(pipe.unet, a.ff_chunk)
        for cap in (float(c) for c in a.caps.split(",")):
            t0 = time.monotonic()
            r = max_resolution(pipe, cap, a.cfg_mode, deadline=deadline)
            r["seconds"] = round(time.monotonic() - t0, 1)
            res[f"{name}_{cap:g}gb"] = r
            print(name, cap, {k: r[k] for k in ("max", "fail", "complete", "seconds")}, flush=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
        del pipe
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
