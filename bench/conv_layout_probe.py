"""Does Inductor copy every convolution weight to channels-last on every compiled step?  (GPU only)

    python bench/conv_layout_probe.py --out OUT.json

Inductor's layout optimization runs SD's convolutions channels-last (cuDNN's ``nhwc`` kernels in
the profiles) and lowers each one with ``require_channels_last(weight)``: a weight that arrives
NCHW -- a dense parameter that was never converted, or a packed layer's decoded view -- is then
copied to channels-last inside the graph, on every call.  This compiles the sd15-arch UNet (fp16,
batch 2 = CFG, 512², Inductor default mode) as dense NCHW parameters, dense channels-last
parameters (``unet.to(memory_format=torch.channels_last)``) and paper-final packed with grouped
dequant in each decode layout (``group_dequant(channels_last=...)``: ``packed_nchw`` decodes NCHW,
``packed_cl`` stores the convs' codes in (O, KH, KW, I) order so the decode writes them
channels-last, the compiled default), and reports per variant the step's time as one CUDA-graph
replay, its kernel time by family (torch.profiler) and, from Inductor's generated code, how many of
its Triton kernels come from convolution lowering alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_packed import kernel_time_per_step  # noqa: E402

from quantsd.bench.core import BenchConfig, _unet_inputs, build_pipeline, cuda_graph_ms  # noqa: E402
from quantsd.dequant_groups import DEFAULT_MAX_BYTES, group_dequant, launch_counts  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402

_PACKED = ("packed_nchw", "packed_cl")
_CONV_ONLY = re.compile(r"def (triton_\w+?_fused_convolution_\d+)\(")


def _variant(pipe) -> dict:
    unet = pipe.unet
    compiled = torch.compile(unet)
    lat, t, ctx = _unet_inputs(pipe, 2, 512, unet.device, unet.dtype)
    from torch._inductor.utils import run_and_get_code

    with torch.inference_mode():
        _, codes = run_and_get_code(lambda: compiled(lat, t, encoder_hidden_states=ctx, return_dict=False))
        src = "\n".join(codes)
        out = {"triton_kernels_defined": len(re.findall(r"^def triton_", src, flags=re.M)),
               "conv_only_kernels": sorted(set(_CONV_ONLY.findall(src))),
               "extern_convolutions": src.count("extern_kernels.convolution(")}
        out["conv_only_kernel_count"] = len(out["conv_only_kernels"])
        out["graph_replay_ms"] = cuda_graph_ms(lambda: compiled(lat, t, encoder_hidden_states=ctx, return_dict=False),
                                               iters=20)
    pipe.unet = compiled
    prof = kernel_time_per_step(pipe)
    pipe.unet = unet
    out.update({k: prof[k] for k in ("kernel_ms_per_step", "kernels_per_step", "kernel_ms_total")})
    out["top_kernels"] = prof["top_kernels"][:25]
    torch._dynamo.reset()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--variants", default="dense_nchw,dense_cl,packed_nchw,packed_cl")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    res: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    wanted = a.variants.split(",")
    if any(v.startswith("dense") for v in wanted):
        dense = build_pipeline("sd15-arch", BenchConfig("fp16-sdpa"), dev)
        for v in ("dense_nchw", "dense_cl"):
            if v not in wanted:
                continue
            if v == "dense_cl":
                dense.unet.to(memory_format=torch.channels_last)
            res[v] = _variant(dense)
            print(v, json.dumps({k: x for k, x in res[v].items() if k not in ("top_kernels", "conv_only_kernels")}),
                  flush=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
        del dense
        torch.cuda.empty_cache()
    if any(v.startswith("packed") for v in wanted):
        for v in _PACKED:
            if v not in wanted:
                continue
            packed = build_pipeline("sd15-arch", BenchConfig("packed", packed=True), dev, recipe=load_recipe(a.recipe),
                                    grouped_dequant=False)
            group_dequant(packed.unet, DEFAULT_MAX_BYTES, channels_last=v == "packed_cl")   # compiled grouping
            res[v] = {"launches": launch_counts(packed.unet),
                      "codes_channels_last": sum(getattr(m, "codes_channels_last", False)
                                                 for m in packed.unet.modules()),
                      "channels_last_members": sum(getattr(m, "_dq_group", None) is not None
                                                   and m._dq_view[2] is not None for m in packed.unet.modules()),
                      **_variant(packed)}
            print(v, json.dumps({k: x for k, x in res[v].items() if k not in ("top_kernels", "conv_only_kernels")}),
                  flush=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
            del packed
            torch.cuda.empty_cache()
    for v in ("dense_cl", *_PACKED):
        if v in res and "dense_nchw" in res:
            res[f"{v}_over_dense_nchw"] = res[v]["graph_replay_ms"] / res["dense_nchw"]["graph_replay_ms"]
    for v in _PACKED:
        if v in res and "dense_cl" in res:
            res[f"{v}_over_dense_cl"] = res[v]["graph_replay_ms"] / res["dense_cl"]["graph_replay_ms"]
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=1))
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
