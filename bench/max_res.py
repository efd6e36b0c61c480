"""The max-resolution search of ``quantsd bench`` on its own (GPU only; BENCHMARKS.md).

    python bench/max_res.py --configs packed --caps 8,4 --lean --out DIR

Runs :meth:`quantsd.bench.core.Bench.max_res_searches` — the bench's own protocol (the caching
allocator capped with ``set_per_process_memory_fraction``, one UNet step with CFG and a tiled VAE
decode per probe, binary search over multiples of 64, feed-forward chunks of ``--ff-chunk``
tokens, caps in increasing order) — and nothing else, for runs where the whole bench does not fit
in the time at hand.  Writes the bench's ``results.json`` and ``report.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import Bench, BenchConfig  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--configs", default="packed", help="packed and/or fp16-sdpa, comma-separated")
    ap.add_argument("--caps", default="8,4")
    ap.add_argument("--cfg-mode", default="sequential", choices=["sequential", "batch2"])
    ap.add_argument("--ff-chunk", type=int, default=4096, help="0: off")
    ap.add_argument("--lean", action="store_true")
    ap.add_argument("--time-budget", type=float, default=None)
    ap.add_argument("--out", required=True, help="output directory")
    a = ap.parse_args()
    caps = tuple(float(c) for c in a.caps.split(","))
    bench = Bench(model="sd15-arch", recipe=a.recipe, caps_gb=caps, max_res_modes=(a.cfg_mode,), out_dir=a.out,
                  lean=a.lean, max_res_ff_chunk=a.ff_chunk or None, log=lambda s: print(s, flush=True))
    bench._deadline = None if a.time_budget is None else time.monotonic() + a.time_budget
    bench.results = {"meta": {"model": "sd15-arch", "recipe": a.recipe, "caps_gb": list(caps), "lean": a.lean,
                              "max_res_ff_chunk": a.ff_chunk or None, "gpu": torch.cuda.get_device_name(0),
                              "torch": torch.__version__}, "configs": []}
    recipe = load_recipe(a.recipe)
    for name in a.configs.split(","):
        entry = {"name": name, "packed": name == "packed"}
        bench.results["configs"].append(entry)
        bench.max_res_searches(BenchConfig(name, packed=name == "packed"), entry, torch.device("cuda"), recipe,
                               a.cfg_mode)


if __name__ == "__main__":
    main()
