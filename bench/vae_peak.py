"""Peak GPU memory of a 512² generation and of its VAE decode: diffusers' decode vs the lean ones.

    python bench/vae_peak.py --recipe recipes/paper-final.yaml --steps 10 --drop-encoder --out OUT.json

sd15-arch, packed paper-final (eager, fp16, SDPA), CFG 7.5: ``max_memory_allocated`` over one
whole image (as ``quantsd bench``) and over one VAE decode alone (above the resident weights),
for diffusers' decoder, the lean resnets alone (``conv_chunk_bytes=None``: bit-identical by
construction) and the lean resnets with banded convolutions (the default of
:func:`quantsd.lean_vae.lean_vae_decode`).  Decoded images are compared with diffusers' (bit
identity and the largest absolute difference, images in [-1, 1]).  ``--drop-encoder`` frees the
VAE encoder first, as ``quantsd bench --lean`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import BenchConfig, build_pipeline, seconds_per_image  # noqa: E402
from quantsd.lean_vae import drop_vae_encoder, lean_vae_decode, undo_lean_vae_decode  # noqa: E402
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
    ap.add_argument("--drop-encoder", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    pipe = build_pipeline("sd15-arch", BenchConfig("packed", packed=True), torch.device("cuda"),
                          recipe=load_recipe(a.recipe))
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": a.steps,
           "drop_encoder": a.drop_encoder}
    if a.drop_encoder:
        res["encoder_bytes_freed"] = drop_vae_encoder(pipe.vae)
        torch.cuda.empty_cache()
    imgs = {}
    for name, bands in (("diffusers", False), ("lean", None), ("lean_banded", True)):
        undo_lean_vae_decode(pipe.vae)
        if bands is not False:
            kw = {} if bands else {"conv_chunk_bytes": None}
            res[name + "_modules"] = lean_vae_decode(pipe.vae, **kw)
        peak, imgs[name] = decode_peak(pipe)
        res[name] = {"decode_peak_over_resident": peak,
                     "image": seconds_per_image(pipe, a.steps, 7.5, 512, 512, repeats=1)}
        res[name]["image_peak_bytes"] = res[name]["image"]["peak_vram_bytes"]
        if name != "diffusers":
            d = (imgs[name].float() - imgs["diffusers"].float()).abs()
            res[name]["bit_identical"] = bool(torch.equal(imgs[name], imgs["diffusers"]))
            res[name]["max_abs_diff"] = float(d.max())
            res[name]["mean_abs_diff"] = float(d.mean())
        print(name, json.dumps({k: v for k, v in res[name].items() if k != "image"}), flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
