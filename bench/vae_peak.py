"""Peak GPU memory of a 512² generation and of its VAE decode, diffusers' decode vs the lean one.

    python bench/vae_peak.py --recipe recipes/paper-final.yaml --out OUT.json

sd15-arch, packed paper-final (eager, fp16, SDPA), 50 steps, CFG 7.5: ``max_memory_allocated``
over one whole image (as ``quantsd bench``) and over one VAE decode alone (above the resident
weights), first with diffusers' decoder, then with :func:`quantsd.lean_vae.lean_vae_decode`;
the decoded images are compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import BenchConfig, build_pipeline, seconds_per_image  # noqa: E402
from quantsd.lean_vae import lean_vae_decode  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402


def decode_peak(pipe) -> tuple[int, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(1, 4, 64, 64, generator=g).to("cuda", torch.float16)
    with torch.inference_mode():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        img = pipe.vae.decode(z / pipe.vae.config.scaling_factor, return_dict=False)[0]
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    pipe = build_pipeline("sd15-arch", BenchConfig("packed", packed=True), torch.device("cuda"),
                          recipe=load_recipe(a.recipe))
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name in ("diffusers", "lean"):
        if name == "lean":
            res["lean_blocks"] = lean_vae_decode(pipe.vae)
        peak, img = decode_peak(pipe)
        res[name] = {"decode_peak_over_resident": peak,
                     "image": seconds_per_image(pipe, a.steps, 7.5, 512, 512, repeats=1)}
        res[name]["image_peak_bytes"] = res[name]["image"]["peak_vram_bytes"]
        res[name + "_img"] = img
        print(name, json.dumps({k: v for k, v in res[name].items() if k != "image"}), flush=True)
    res["bit_identical"] = bool(torch.equal(res.pop("diffusers_img"), res.pop("lean_img")))
    print("bit_identical", res["bit_identical"])
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
