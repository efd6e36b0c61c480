"""Host time torch.compile adds to every UNet call, without the GPU.  (CPU or GPU; BENCHMARKS.md)

    TRITON_INTERPRET=1 python bench/dynamo_host_overhead.py --out OUT.json

A compiled call runs Dynamo's guard checks and the pre-graph bytecode (looking up parameters and
buffers to hand to the graph) before the graph itself.  This compiles the sd15-arch UNet (dense
fp16, and packed with the recipe: value-table layers through the ``quantsd::dequantize`` op) with
a backend whose "graph" returns at once, so each call's wall time *is* that host overhead, for
``compile_unet(guards="full")`` and ``guards="minimal"``.  On the CPU the packed layers need
``TRITON_INTERPRET=1`` (so they take the kernel path that CUDA takes; nothing is launched).
The packed UNet is grouped as ``configure_pipeline(compile=True)`` groups it (one dequant op per
group, :func:`quantsd.dequant_groups.group_pipeline`) unless ``--ungrouped``; each result also
counts the guard lines Dynamo logged for the compiled frame (what every call re-checks).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import to_packed  # noqa: E402
from quantsd.dequant_groups import group_pipeline  # noqa: E402
from quantsd.generate import compile_unet  # noqa: E402
from quantsd.models import build_sd15_arch_pipeline  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402


def null_backend(gm, example_inputs):
    """A backend whose compiled graph returns placeholder outputs without computing anything."""
    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    ret = [torch.empty(0)] * (len(outs) if isinstance(outs, (tuple, list)) else 1)
    return lambda *args: ret


class _GuardLog(logging.Handler):
    """Collects the guard code Dynamo logs (``torch._logging.set_logs(guards=True)``)."""

    def __init__(self):
        super().__init__()
        self.lines = 0

    def emit(self, record):
        self.lines += record.getMessage().count("\n") + 1


def host_ms(unet, guards: str, calls: int = 30, windows_n: int = 5) -> dict:
    torch._dynamo.reset()
    dev, dt = unet.device, unet.dtype
    lat = torch.randn(2, 4, 8, 8, device=dev, dtype=dt)
    ctx = torch.randn(2, 77, 768, device=dev, dtype=dt)
    t = torch.tensor(500, device=dev)
    compiled = compile_unet(unet, guards=guards, backend=null_backend)
    log = _GuardLog()
    logging.getLogger("torch._dynamo.guards").addHandler(log)
    torch._logging.set_logs(guards=True)
    with torch.inference_mode():
        try:                     # (the guards are built, and logged, by the first call)
            t0 = time.perf_counter()
            compiled(lat, t, encoder_hidden_states=ctx, return_dict=False)
            trace_s = time.perf_counter() - t0
        finally:
            torch._logging.set_logs(guards=False)
            logging.getLogger("torch._dynamo.guards").removeHandler(log)
        windows = []
        for _ in range(windows_n):   # several windows: the full guard check is sometimes far slower
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                compiled(lat, t, encoder_hidden_states=ctx, return_dict=False)
                times.append((time.perf_counter() - t0) * 1e3)
            windows.append(statistics.median(times))
    return {"median_ms": round(statistics.median(windows), 4), "window_medians_ms": [round(w, 4) for w in windows],
            "trace_s": round(trace_s, 1), "guard_lines": log.lines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ungrouped", action="store_true", help="packed: one dequant op per layer, not per group")
    ap.add_argument("--variants", default="dense,packed")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    res = {"device": a.device, "python": platform.python_version(), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine()}
    for variant in a.variants.split(","):
        pipe = build_sd15_arch_pipeline(device=a.device)
        if variant == "packed":
            to_packed(pipe, load_recipe(a.recipe), torch.float16)
            res["packed_groups"] = 0 if a.ungrouped else group_pipeline(pipe, compiled=True)
        else:
            pipe.to(torch.float16)
        pipe.unet.eval()
        for guards in ("full", "minimal"):
            unet = pipe.unet if guards == "full" else copy.copy(pipe.unet)   # minimal compiles in place
            res[f"{variant}_{guards}"] = r = host_ms(unet, guards)
            print(variant, guards, r, flush=True)
        del pipe
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
