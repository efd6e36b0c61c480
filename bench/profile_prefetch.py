"""Compiled packed UNet step with and without weight prefetch: GPU time and kernels (GPU only).

    python bench/profile_prefetch.py --out OUT.json [--variants plain,prefetch2,prefetch4,plain-nolayout]

Each variant compiles the packed paper-final sd15-arch UNet with Inductor (default mode, so every
kernel is visible to the profiler), then measures (1) the step's GPU time as one captured CUDA graph
replay (batch 2, 512²) and (2) the kernels per step by family (torch.profiler), to tell where
prefetch's time goes: cross-stream waits, layout copies, lost fusions.
``prefetchN``: :func:`quantsd.prefetch.enable_weight_prefetch` with N regions (k x k conv weights
decoded channels-last); ``prefetchN-nchw``: the same with NCHW conv weights; ``plain-nolayout``: no
prefetch, Inductor's conv layout optimization off (what prefetch's opaque convs get).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_packed import kernel_time_per_step  # noqa: E402

from quantsd.bench.core import BenchConfig, _unet_inputs, build_pipeline, cuda_graph_ms  # noqa: E402
from quantsd.prefetch import disable_weight_prefetch, enable_weight_prefetch, prefetcher_of  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--variants", default="plain,prefetch2,prefetch4,prefetch2-nchw")
    ap.add_argument("--profile", default="plain,prefetch2", help="variants to also profile kernel by kernel")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    pipe = build_pipeline("sd15-arch", BenchConfig("packed", packed=True), dev, recipe=load_recipe(a.recipe),
                          grouped_dequant=False)
    unet = pipe.unet
    lat, t, ctx = _unet_inputs(pipe, 2, 512, dev, torch.float16)
    res: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    import torch._inductor.config as icfg

    for name in a.variants.split(","):
        torch._dynamo.reset()
        disable_weight_prefetch(unet)
        icfg.layout_optimization = name != "plain-nolayout"
        if name.startswith("prefetch"):
            regions, _, layout = name[len("prefetch"):].partition("-")
            enable_weight_prefetch(unet, regions=int(regions), channels_last_convs=False if layout == "nchw" else None)
        compiled = torch.compile(unet)
        pipe.unet = compiled

        def step():
            compiled(lat, t, encoder_hidden_states=ctx, return_dict=False)

        entry: dict = {}
        with torch.inference_mode():
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            entry["graph_ms"] = cuda_graph_ms(step, iters=20)
        if name in a.profile.split(","):
            prof = kernel_time_per_step(pipe)
            entry.update({k: prof[k] for k in ("kernel_ms_per_step", "kernels_per_step", "kernel_ms_total")})
            entry["top_kernels"] = prof["top_kernels"][:25]
        pf = prefetcher_of(unet)
        if pf is not None:
            entry["stats"] = dict(pf.stats)
            entry["chunks"] = len(pf._plan.chunks) if pf._plan else None
            entry["ring_bytes"] = pf.ring_bytes
        res[name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k != "top_kernels"}), flush=True)
        pipe.unet = unet
        Path(a.out).write_text(json.dumps(res, indent=1))
    icfg.layout_optimization = True


if __name__ == "__main__":
    main()
