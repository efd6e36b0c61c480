"""What is alive at the peak of a 512² generation?  (GPU only; BENCHMARKS.md)

    python bench/peak_attribution.py --recipe recipes/paper-final.yaml --lean --out OUT.json

sd15-arch, packed recipe, eager fp16 SDPA (as ``quantsd bench``'s ``packed`` row; ``--lean``:
lean VAE decode and no VAE encoder, as ``quantsd bench --lean``).  One image is generated with
the CUDA caching allocator's history recorder on; the recorded allocations and frees are replayed
to find the moment of the peak, and every block alive then that was allocated during the call is
listed with its size and the Python frames that allocated it (grouped by the innermost diffusers
/ quantsd / torch.nn frame).  Then two single-decode variants: diffusers' decode as loaded, and
with cuDNN off (native convolutions, no cuDNN workspace) — the difference bounds the cuDNN
convolution workspace at the decode's peak — and in channels-last memory format (cuDNN's
tensor-core convolutions work in NHWC and transpose NCHW operands through the workspace).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import BenchConfig, build_pipeline, weight_bytes  # noqa: E402
from vae_peak import decode_peak  # noqa: E402  (this script's directory is on sys.path)
from quantsd.recipe import load_recipe  # noqa: E402

OURS = ("diffusers/", "quantsd/", "torch/nn/modules/", "torch/nn/functional")


def _where(frames: list[dict]) -> str:
    """The innermost frames from diffusers/quantsd/torch.nn, innermost first (3 of them)."""
    picked = [f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']}:{f['name']}" for f in frames
              if any(k in f["filename"] for k in OURS)]
    return " < ".join(picked[:3]) or (f"{frames[0]['filename']}:{frames[0]['line']}" if frames else "?")


def live_at_peak(trace: list[dict]) -> tuple[int, list[dict]]:
    """Replay alloc / free_requested events; return (peak bytes above the start, blocks alive
    then that were allocated during the recording)."""
    live: dict[int, dict] = {}
    cur = peak = 0
    at_peak: list[dict] = []
    for ev in trace:
        act = ev.get("action")
        if act == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
            if cur > peak:
                peak = cur
                at_peak = list(live.values())
        elif act == "free_requested" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])["size"]
    return peak, at_peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--lean", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    pipe = build_pipeline("sd15-arch", BenchConfig("packed", packed=True), torch.device("cuda"),
                          recipe=load_recipe(a.recipe))
    if a.lean:
        from quantsd.lean_vae import drop_vae_encoder, lean_vae_decode

        lean_vae_decode(pipe.vae)
        drop_vae_encoder(pipe.vae)
    kw = dict(num_inference_steps=a.steps, guidance_scale=7.5, height=512, width=512, output_type="np")
    res: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "lean": a.lean,
                 "weight_bytes": {m: weight_bytes(getattr(pipe, m), "cuda") for m in ("text_encoder", "unet", "vae")}}
    with torch.inference_mode():
        pipe("warm up", generator=torch.Generator().manual_seed(0), **{**kw, "num_inference_steps": 2})
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    with torch.inference_mode():
        pipe("a photograph of an astronaut riding a horse", generator=torch.Generator().manual_seed(0), **kw)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak_stat = torch.cuda.max_memory_allocated()
    trace = snap["device_traces"][0] if snap.get("device_traces") else []
    peak_delta, live = live_at_peak(trace)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ev in live:
        g = groups[_where(ev.get("frames") or [])]
        g[0] += ev["size"]
        g[1] += 1
    res.update({
        "resident_bytes_before_call": base, "peak_bytes": peak_stat, "peak_over_resident": peak_stat - base,
        "replayed_peak_over_start": peak_delta, "trace_events": len(trace),
        "live_at_peak_bytes": sum(ev["size"] for ev in live), "live_at_peak_blocks": len(live),
        "live_at_peak_by_site": sorted(([k, v[0], v[1]] for k, v in groups.items()), key=lambda r: -r[1])[:a.top],
        "largest_live_at_peak": [[ev["size"], _where(ev.get("frames") or [])]
                                 for ev in sorted(live, key=lambda e: -e["size"])[:a.top]],
    })
    print(json.dumps({k: v for k, v in res.items() if not k.startswith(("live_at_peak_by", "largest"))}), flush=True)
    for site, size, n in res["live_at_peak_by_site"][:15]:
        print(f"{size / 2**20:9.1f} MiB  {n:4d}  {site}")
    res["decode_peak_over_resident"] = decode_peak(pipe)[0]
    torch.backends.cudnn.enabled = False
    try:
        res["decode_peak_over_resident_no_cudnn"] = decode_peak(pipe)[0]
    finally:
        torch.backends.cudnn.enabled = True
    pipe.vae.to(memory_format=torch.channels_last)   # NHWC: cuDNN needs no layout transposes
    res["decode_peak_over_resident_channels_last"] = decode_peak(pipe)[0]
    pipe.vae.to(memory_format=torch.contiguous_format)
    print("decode peak over resident: cuDNN", res["decode_peak_over_resident"], "no cuDNN",
          res["decode_peak_over_resident_no_cudnn"], "channels-last", res["decode_peak_over_resident_channels_last"],
          flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
