"""Host time of an eager UNet forward with and without direct attention calls, on the CPU.

    python bench/attention_calls_cpu.py --out OUT.json

Why: an eager SD1.5 UNet step on a GPU is host-bound, and diffusers' ``Attention.forward`` inspects
its processor's signature on every call (:mod:`quantsd.attention_calls`).  The host's share of it
can be measured without a GPU: the SD1.5 UNet *architecture* (32 attention calls a forward, the same
module tree and forward code) with every width divided by ``--div`` (default 40) on 8x8 latents,
batch 2, so that arithmetic is small and mostly per-op host time remains; the two variants are
timed in interleaved rounds (this box is noisy), minimum per round, median over rounds.  Also the
inspection alone per call (``signature_us``).  The same saving on a GPU host is the same Python.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eager_host_overhead_cpu import narrow_unet_config  # noqa: E402  (bench/, the script's own folder)
from quantsd.attention_calls import direct_attention_calls, remove_direct_attention_calls  # noqa: E402


def narrow_unet(div: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**narrow_unet_config(div)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--div", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    unet = narrow_unet(a.div)
    lat = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    t = torch.tensor([10, 10])

    def forward() -> float:
        t0 = time.perf_counter()
        unet(lat, t, encoder_hidden_states=ctx, return_dict=False)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"diffusers": [], "direct": []}
    with torch.inference_mode():
        for _ in range(3):
            forward()
        ref = unet(lat, t, encoder_hidden_states=ctx, return_dict=False)[0]
        n = direct_attention_calls(unet)
        same = torch.equal(unet(lat, t, encoder_hidden_states=ctx, return_dict=False)[0], ref)
        remove_direct_attention_calls(unet)
        for r in range(a.rounds):
            order = ("diffusers", "direct") if r % 2 == 0 else ("direct", "diffusers")
            for name in order:
                if name == "direct":
                    direct_attention_calls(unet)
                times[name].append(min(forward() for _ in range(a.per_round)))
                remove_direct_attention_calls(unet)
    import inspect

    from diffusers.models.attention_processor import AttnProcessor2_0

    proc = AttnProcessor2_0()
    k = 20000
    sig_us = timeit.timeit(lambda: set(inspect.signature(proc.__call__).parameters.keys()), number=k) / k * 1e6
    med = {k_: round(statistics.median(v) * 1e3, 3) for k_, v in times.items()}
    res = {"attention_calls_per_forward": n, "same_output": same, "forward_ms_median_of_round_minima": med,
           "saved_ms": round(med["diffusers"] - med["direct"], 3),
           "signature_us": round(sig_us, 2), "signature_ms_per_forward": round(sig_us * n / 1e3, 3),
           "rounds": a.rounds, "per_round": a.per_round, "div": a.div, "torch": torch.__version__}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
