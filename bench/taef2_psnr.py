"""TAEF2 reconstruction PSNR with the decoder's conv weights quantized (real trained weights).

Encodes real photos (scikit-image samples) with the fp32 TAEF2 encoder once, then decodes
with the fp32 decoder and with every decoder Conv2d weight replaced by
``quantsd.quant.fake_quantize(w, bits, method, granularity, seed=<layer index>)``
(biases and GroupNorm parameters kept in fp32).  PSNR is against the *input* image, so
the fp32 row is the autoencoder's own ceiling.  Writes a Markdown table (text below a
``<!-- bench:end -->`` marker in an existing file is kept); ``--json`` also dumps the numbers.

    .venv/bin/python bench/taef2_psnr.py --out docs/TAEF2.md
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.quant import fake_quantize, quantize_tensor  # noqa: E402
from quantsd.taesd import default_asset_dir, load_taef2  # noqa: E402

IMAGES = ("astronaut", "coffee", "chelsea", "rocket")


def load_image(name: str) -> torch.Tensor:
    """[1, 3, H, W] float in [0, 1], cropped to a multiple of 8."""
    import skimage.data

    im = getattr(skimage.data, name)()
    x = torch.from_numpy(np.ascontiguousarray(im[..., :3])).permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[-2] // 8 * 8, x.shape[-1] // 8 * 8
    return x[..., :h, :w].contiguous()


def psnr(y: torch.Tensor, x: torch.Tensor) -> float:
    mse = float(((y.clamp(0, 1) - x) ** 2).mean())
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def conv_layers(net: torch.nn.Module) -> list[tuple[str, torch.nn.Conv2d]]:
    return [(n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]


def quantized_weights(dec, bits: int, method: str, gran: str) -> tuple[dict, int]:
    """{layer: fake-quantized weight}, total packed bytes of those weights."""
    out, nbytes = {}, 0
    for i, (name, conv) in enumerate(conv_layers(dec)):
        w = conv.weight.detach()
        out[name] = fake_quantize(w, bits, method, gran, seed=i)
        nbytes += quantize_tensor(w, bits, method, gran, seed=i).nbytes_packed
    return out, nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--assets", default=None, help="TAEF2 asset dir (default: $QUANTSD_ASSETS or ../shared/assets)")
    ap.add_argument("--methods", default="uniform,stochastic,pwlq,pwlq-stochastic")
    ap.add_argument("--bits", default="2,3,4,6,8")
    ap.add_argument("--granularities", default="tensor,channel")
    ap.add_argument("--images", default=",".join(IMAGES))
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--out", default="docs/TAEF2.md")
    ap.add_argument("--json", default=None, help="also write raw results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    bits_list = [int(b) for b in args.bits.split(",")]
    grans = args.granularities.split(",")
    names = args.images.split(",")

    t0 = time.time()
    enc, dec = load_taef2(args.assets)
    images = {n: load_image(n) for n in names}
    with torch.no_grad():
        latents = {n: enc(x) for n, x in images.items()}
        results = {"fp32": {n: psnr(dec(latents[n]), x) for n, x in images.items()}}
    orig = {name: conv.weight.detach().clone() for name, conv in conv_layers(dec)}
    fp16_bytes = sum(w.numel() * 2 for w in orig.values())
    sizes: dict[str, int] = {}
    print(f"fp32: {results['fp32']}", file=sys.stderr)
    for gran in grans:
        for method in methods:
            for bits in bits_list:
                key = f"{method}|{gran}|{bits}"
                qw, sizes[key] = quantized_weights(dec, bits, method, gran)
                convs = dict(conv_layers(dec))
                with torch.no_grad():
                    for name, w in qw.items():
                        convs[name].weight.copy_(w)
                    results[key] = {n: psnr(dec(latents[n]), x) for n, x in images.items()}
                    for name, w in orig.items():
                        convs[name].weight.copy_(w)
                print(f"{key}: mean {np.mean(list(results[key].values())):.2f} dB ({time.time() - t0:.0f}s)", file=sys.stderr)

    def mean(key: str) -> float:
        return float(np.mean(list(results[key].values())))

    cmd = "python bench/taef2_psnr.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# TAEF2 decoder: reconstruction PSNR with quantized conv weights",
        "",
        "Real trained weights (TAEF2, github.com/madebyollin/taesd, MIT; see",
        "`../shared/assets/taef2_taesana/SOURCE.txt`), real photos from `skimage.data`",
        f"({', '.join(f'`{n}` {tuple(images[n].shape[-2:])}' for n in names)}, cropped to multiples of 8).",
        "Each image is encoded once by the fp32 encoder; the decoder runs in fp32 with every",
        f"Conv2d weight ({len(orig)} layers, {sum(w.numel() for w in orig.values()):,} weights) replaced by",
        "`fake_quantize(w, bits, method, granularity, seed=<layer index>)`; biases and GroupNorm",
        "parameters are kept. PSNR (dB, 8-bit peak, output clamped to [0, 1]) is against the input",
        "image and averaged over the images, so the fp32 row is the autoencoder's own ceiling.",
        "Scales/breakpoints are fp16. `pwlq` is round-to-nearest PWLQ, `pwlq-stochastic` the",
        "paper's stochastic-rounding PWLQ; stochastic rows are a single seed per layer.",
        "",
        "Command (from the repo root, CPU):",
        "",
        "```",
        cmd.strip(),
        "```",
        "",
        f"fp32 decoder: **{mean('fp32'):.2f} dB** "
        f"({', '.join(f'{n} {v:.2f}' for n, v in results['fp32'].items())}).",
        "",
    ]
    for gran in grans:
        lines += [f"## granularity `{gran}`", "",
                  "| method | " + " | ".join(f"{b}-bit" for b in bits_list) + " |",
                  "|---|" + "---:|" * len(bits_list)]
        for method in methods:
            cells = [f"{mean(f'{method}|{gran}|{b}'):.2f}" for b in bits_list]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Packed size of the decoder conv weights (codes + fp16 parameters) vs "
                     f"{fp16_bytes:,} B in fp16:")
        lines.append("")
        lines.append("| method | " + " | ".join(f"{b}-bit" for b in bits_list) + " |")
        lines.append("|---|" + "---:|" * len(bits_list))
        for method in methods:
            lines.append(f"| {method} | " + " | ".join(f"{sizes[f'{method}|{gran}|{b}']:,}" for b in bits_list) + " |")
        lines.append("")
    lines += ["## per image (dB)", "",
              "| config | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, per in results.items():
        lines.append(f"| {key.replace('|', ' ')} | " + " | ".join(f"{per[n]:.2f}" for n in names) + " |")
    lines += ["", f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
              f"{time.time() - t0:.0f} s wall.", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    if out.exists() and "<!-- bench:end -->" in out.read_text():
        # keep hand-written notes below the marker
        text += "\n<!-- bench:end -->" + out.read_text().split("<!-- bench:end -->", 1)[1]
    out.write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "packed_bytes": sizes,
                                               "fp16_bytes": fp16_bytes}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
