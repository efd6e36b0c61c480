"""Host (Python + dispatcher) overhead of the packed layers in an eager UNet forward, on the CPU.

    TRITON_INTERPRET=1 python bench/eager_host_overhead_cpu.py --out OUT.json   # (the script sets it)

Why: an eager SD1.5 UNet step on an H200 is host-bound (fp16 dense ~38.7 ms, packed ~50.8 ms,
~12 ms of GPU work), so what separates packed from dense is host time: the Python of
``QuantModule.forward -> _forward_weight -> DequantGroup.weight / _kernel_weight -> op_call ->
kernels.dequant.launch / GroupLaunch.run`` plus the driver's launch.  That Python can be measured
without a GPU, deterministically enough to compare two versions of it.

How:

* The model is the SD1.5 UNet *architecture* (``quantsd.models.SD15_UNET``: same blocks, same 282
  packed layers under ``recipes/paper-final.yaml``, same module tree and forward code) with every
  width divided by 40 (channels 8/16/32/32, 8 groups per norm) and run on 8x8 latents, batch 2, so
  that the CPU's arithmetic is small and mostly per-op overhead remains, as on the GPU host.  It is
  quantized for real (``quantsd.bench.core.to_packed``: codes, fp16 scales, value tables).
* ``TRITON_INTERPRET=1`` puts the layers on the kernel path on the CPU (``_lut`` set, grouping
  possible), i.e. the same Python as on CUDA down to the launch.  The launches themselves are
  emulated: ``kernels.dequant.launch`` and ``GroupLaunch.run`` are replaced by copies of their
  CUDA branch (device check, ``torch.empty`` of the output, ``direct_ok()``, the direct-launch
  cache lookup with its key) whose final ``k.run(...)`` is a Python no-op taking the same
  arguments, and the groups' capture query (``torch.cuda.is_current_stream_capturing()``,
  which needs a CUDA driver) by a Python call returning False, asked where CUDA would ask it.
  Not emulated: the Triton launcher's C code and the driver (``cuLaunchKernel``), a fixed few us
  per launch, the same before and after any change to quantsd/nn.py or quantsd/dequant_groups.py;
  the output counts launches per forward so that cost can be added from a GPU measurement.
  Weights are left unwritten (the emulated kernel writes nothing; denormals are flushed so garbage
  weights cost no extra time), and each output, once allocated, is swapped for one warm buffer of
  its size (``--fresh-weights``: not), since on the CPU computing with freshly allocated weights
  costs up to ~10 us per layer that the GPU host never pays.

Measured (all host time, ``time.perf_counter``; this 2-core box is noisy, so variants are
interleaved round by round and medians/minima reported):

* ``forward_ms``: one UNet forward, dense vs packed: checked groups (``packed_grouped``), prehook
  groups (``packed_prehook``, the eager default), prehook groups under ``trust_weights``
  (``packed_trusted``: sources checked once, as within a ``quantsd generate`` call), those merged in
  execution order after the first forward (``packed_runs``, :mod:`quantsd.eager_runs`; ``packed_runs_modcall``:
  the same without the armed call, :func:`quantsd.nn.set_armed_calls`), one launch per
  layer (``packed_per_layer``); and ``extra_us_per_layer`` = (packed - dense) / packed layers;
* ``forward_weight_us``: ``_forward_weight()`` of every packed layer in a loop, per layer
  (grouped, per layer), like bench/launch_overhead.py's ``layer_grouped`` / ``layer`` on the GPU;
* ``profile``: a cProfile of packed grouped forwards: per function, calls per forward and us per
  call (own time, cProfile-inflated) -- where the extra time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")   # before quantsd.kernels / triton are imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd import dequant_groups as dg  # noqa: E402
from quantsd import models as M  # noqa: E402
from quantsd.bench.core import to_packed  # noqa: E402
from quantsd.dequant_groups import group_dequant, launch_counts, ungroup_dequant  # noqa: E402
from quantsd.kernels import dequant, grouped  # noqa: E402
from quantsd.nn import packed_modules  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the emulated launches
class _FakeKernel:
    """What the direct-launch caches hold on CUDA (a compiled Triton kernel): ``run`` takes the
    launcher's arguments and does nothing."""

    function = None
    packed_metadata = None

    @staticmethod
    def run(*args):
        return None


_FAKE = _FakeKernel()


def _fake_get_device() -> int:          # torch._C._cuda_getDevice
    return 0


def _fake_raw_stream(index) -> int:     # torch._C._cuda_getCurrentRawStream
    return 0


def _fake_is_capturing() -> bool:       # torch.cuda.is_current_stream_capturing
    return False


_WARM: dict = {}      # (numel, dtype) -> one buffer handed out for every output of that size (see _out)
FRESH_WEIGHTS = False


def _out(shape, dtype, device) -> torch.Tensor:
    """The launch's output: allocated as on CUDA (``torch.empty``), then, unless FRESH_WEIGHTS, swapped
    for one warm buffer of that size, so that the CPU's matmuls/convolutions do not read freshly
    allocated (cache-cold) weights -- a cost of this emulation, not of the GPU host, which never
    touches the weights."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if FRESH_WEIGHTS:
        return out
    return _WARM.setdefault((tuple(out.shape), dtype), out)


def _direct_launch(k, grid: int, device_index: int, *args) -> None:
    """kernels.dequant.direct_launch, its stream lookup stubbed."""
    k.run(grid, 1, 1, _fake_raw_stream(device_index), k.function, k.packed_metadata, None, None, None, *args)


def _launch(plan, packed, scale, breakpoint, lut, dtype):
    """kernels.dequant.launch as it runs on CUDA (same-device case)."""
    packed.is_cuda and packed.device.index != _fake_get_device()   # the device check (its cost; same device)
    out = _out(plan.shape, dtype, packed.device)
    _launch_into(plan, packed, scale, breakpoint, lut, out)
    return out


def _launch_into(plan, packed, scale, breakpoint, lut, out) -> None:
    """kernels.dequant.launch_into's CUDA branch with the direct launcher cached (the steady state)."""
    if plan.numel == 0:
        return
    dtype = out.dtype
    bf16 = dtype == torch.bfloat16
    bp = scale if breakpoint is None else breakpoint
    grid = -(-plan.numel // dequant.BLOCK)
    if not out.is_contiguous():
        raise ValueError("emulation: contiguous outputs only")
    o = out.view(torch.int16) if bf16 else out
    direct = dequant.direct_ok()
    if direct:
        key = dequant._direct_key(plan, packed, scale, bp, lut, dtype)
        k = dequant._DIRECT.get(key)
        if k is None:
            dequant._DIRECT[key] = k = _FAKE
        _direct_launch(k, grid, packed.device.index, packed, scale, bp, lut, o, plan.numel, plan.group, plan.bits,
                       plan.pwlq, plan.gmode, dequant.BLOCK, bf16, plan.wide, plan.table)


def _group_run(self, out=None):
    """GroupLaunch.run as it runs on CUDA (same device, direct launcher cached)."""
    self.device.type == "cuda" and self.device.index != _fake_get_device()   # the device check (its cost)
    if out is None:
        out = _out(self.numel, self.dtype, self.device)
    elif (out.dtype != self.dtype or out.device != self.device or out.numel() < self.numel
          or not out.is_contiguous()):      # the checks of a given buffer (their cost)
        raise ValueError("bad out")
    if not self.programs:
        return out
    bf16 = self.dtype == torch.bfloat16
    o = out.view(torch.int16) if bf16 else out
    direct = dequant.direct_ok()
    if direct:
        k = grouped._KERNELS.get(self._key)
        if k is None:
            grouped._KERNELS[self._key] = k = _FAKE
        _direct_launch(k, self.programs, self.device.index, self._packed_base, self._lut_base, o, self.desc,
                       self.prog_layer, self.bits, grouped.BLOCK, bf16, grouped.ALIGN, self.aligned, self.bits2)
    return out


def install_emulation() -> None:
    if not dequant.available(torch.device("cpu")):
        raise SystemExit("needs Triton and TRITON_INTERPRET=1")
    dequant.launch = _launch
    grouped.GroupLaunch.run = _group_run
    if hasattr(dg, "_capturing"):   # (the grouped path before its host-time pass: one check per call)
        dg._capturing = lambda device: device.type == "cpu" and _fake_is_capturing()
    else:                           # groups check for a capture as on CUDA
        dg._may_capture = lambda device: True
        dg._stream_capturing = _fake_is_capturing
        if hasattr(dg, "_capturing_now"):   # (since session 11 the query is torch's own binding, aliased)
            dg._capturing_now = _fake_is_capturing


# --------------------------------------------------------------------------- the models
def narrow_unet_config(div: int) -> dict:
    cfg = dict(M.SD15_UNET)
    cfg["block_out_channels"] = tuple(c // div for c in cfg["block_out_channels"])
    cfg["norm_num_groups"] = min(cfg["block_out_channels"][0], 32)
    cfg["cross_attention_dim"] = max(8, cfg["cross_attention_dim"] // div // 8 * 8)
    return cfg


def build_unets(div: int, dtype: torch.dtype, recipe):
    from diffusers import PNDMScheduler

    cfg = narrow_unet_config(div)
    pipe = M._assemble(M.TINY_TEXT_ENCODER, cfg, M.TINY_VAE, PNDMScheduler(**M.SD15_SCHEDULER), 0)
    dense = M._assemble(M.TINY_TEXT_ENCODER, cfg, M.TINY_VAE, PNDMScheduler(**M.SD15_SCHEDULER), 0).unet
    dense = dense.to(dtype).eval()
    to_packed(pipe, recipe, dtype)
    return dense, pipe.unet.eval(), cfg


_SD15_BYTES: dict = {}   # id(narrow packed layer) -> the full-size SD1.5 layer's fp16 dense bytes


def sd15_group_sizes(packed, recipe) -> None:
    """Group the narrow UNet exactly as group_dequant groups the real SD1.5 UNet in fp16: grouping
    decides by dense bytes, so each layer counts with its full-size SD1.5 layer's bytes (the
    sd15-arch pipeline on the meta device: shapes only)."""
    from quantsd.recipe import resolve_recipe

    full = {lp.path: lp.numel for lp in resolve_recipe(M.load_pipeline("sd15-arch", device="meta"), recipe,
                                                       warn=False).layers if lp.component == "unet"}
    for name, m in packed_modules(packed):
        _SD15_BYTES[id(m)] = full["unet." + name] * 2


MAX_BYTES = dg.EAGER_MAX_BYTES   # --group-max-mib


def group(packed, prehook: bool = False):
    """group_dequant(packed) as eager generation groups (``EAGER_MAX_BYTES``, or ``--group-max-mib``),
    with SD1.5's fp16 layer sizes (see :func:`sd15_group_sizes`); ``prehook``: the block pre-hook groups
    (the eager default since session 13; ``packed_grouped`` measures the checked groups)."""
    real = dg._dense_bytes
    dg._dense_bytes = lambda m: _SD15_BYTES[id(m)]
    try:
        return group_dequant(packed, MAX_BYTES, prehook=prehook)
    finally:
        dg._dense_bytes = real


# --------------------------------------------------------------------------- timing
def _time_calls(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _med(v):
    return statistics.median(v)


def measure(dense, packed, inputs, rounds: int, per_round: int, layers) -> dict:
    lat, t, ctx = inputs
    n = len(layers)

    def fwd(u):
        return lambda: u(lat, t, encoder_hidden_states=ctx, return_dict=False)

    def variant(name):
        if name in ("packed_runs", "packed_runs_modcall"):   # trusted prehook groups merged in execution order
            real = dg._dense_bytes                           # (quantsd.eager_runs); _modcall: without the armed call
            dg._dense_bytes = lambda m: _SD15_BYTES[id(m)]     # (SD1.5's sizes for the runs' cap too)
            try:
                group_dequant(packed, MAX_BYTES, prehook=True, runs=True, armed_calls=name == "packed_runs")
                dg.trust_weights(packed)
                fwd(packed)()       # the first forward learns the order and merges
            finally:
                dg._dense_bytes = real
            return fwd(packed)
        if name in ("packed_grouped", "packed_prehook", "packed_trusted"):
            group(packed, prehook=name != "packed_grouped")
            if name == "packed_trusted":      # prehook groups checking their sources once (trusted_weights)
                dg.trust_weights(packed)
        else:
            ungroup_dequant(packed)
        return fwd(dense if name == "dense" else packed)

    names = ["dense", "packed_grouped", "packed_prehook", "packed_trusted", "packed_runs", "packed_runs_modcall",
             "packed_per_layer"]
    fw_names = ["packed_grouped", "packed_prehook", "packed_trusted", "packed_runs", "packed_per_layer"]
    res = {k: [] for k in names}
    fw = {k: [] for k in fw_names}
    with torch.inference_mode():
        for name in names:          # warm-up (caches, allocator)
            f = variant(name)
            for _ in range(3):
                f()
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                f = variant(name)
                res[name].append(min(_time_calls(f, per_round)))
            for name in fw_names:
                variant(name)
                call = lambda: [m._forward_weight() for m in layers]  # noqa: E731
                call()
                fw[name].append(min(_time_calls(call, per_round)) / n)
        variant("packed_runs")
        runs_launches = launch_counts(packed)["launches"]
        ungroup_dequant(packed)
    ms = {k: round(_med(v) * 1e3, 3) for k, v in res.items()}
    best = {k: round(min(v) * 1e3, 3) for k, v in res.items()}
    extra = {k: round(_med([(p - d) for p, d in zip(res[k], res["dense"])]) / n * 1e6, 2)
             for k in [*fw_names, "packed_runs_modcall"]}
    return {
        "forward_ms": {"median_of_round_minima": ms, "min": best},
        "extra_us_per_layer": extra,
        "extra_ms_per_forward": {k: round(v * n / 1e3, 3) for k, v in extra.items()},
        # the armed call's saving per forward, from the same rounds (the runs' variant with and without it)
        "armed_call_saves_ms_per_forward": round(_med([b - a for a, b in zip(res["packed_runs"],
                                                                                 res["packed_runs_modcall"])]) * 1e3, 3),
        "launches_per_forward_runs": runs_launches,
        "forward_weight_us": {k: round(_med(v) * 1e6, 2) for k, v in fw.items()},
        "rounds": {k: [round(x * 1e3, 3) for x in v] for k, v in res.items()},
    }


def _profile_rows(unet, inputs, forwards: int) -> dict:
    lat, t, ctx = inputs
    with torch.inference_mode():
        for _ in range(3):
            unet(lat, t, encoder_hidden_states=ctx, return_dict=False)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(forwards):
            unet(lat, t, encoder_hidden_states=ctx, return_dict=False)
        pr.disable()
    rows = {}
    for (file, line, fn), (cc, nc, tt, ct, _) in pstats.Stats(pr).stats.items():
        short = fn if file == "~" else f"{Path(file).name}:{line}({fn})"
        rows[short] = {"function": short, "calls_per_forward": round(nc / forwards, 1),
                       "own_us_per_forward": round(tt / forwards * 1e6, 1),
                       "cum_us_per_forward": round(ct / forwards * 1e6, 1),
                       "own_us_per_call": round(tt / max(nc, 1) * 1e6, 3), "quantsd": "quantsd" in file}
    return rows


def profile(dense, packed, inputs, forwards: int, top: int, prehook: bool = False) -> dict:
    """cProfile of dense and packed (grouped; ``prehook``: prehook groups) forwards (cProfile inflates
    every Python call, so read the us as relative): the functions whose own time per forward grew
    most, and the quantsd ones."""
    d = _profile_rows(dense, inputs, forwards)
    group(packed, prehook=prehook)
    p = _profile_rows(packed, inputs, forwards)
    ungroup_dequant(packed)
    diff = []
    for k in set(d) | set(p):
        a, b = d.get(k), p.get(k)
        diff.append({"function": k,
                     "calls_per_forward": [a and a["calls_per_forward"], b and b["calls_per_forward"]],
                     "own_us_per_forward": [a and a["own_us_per_forward"], b and b["own_us_per_forward"]],
                     "delta_own_us": round((b["own_us_per_forward"] if b else 0)
                                           - (a["own_us_per_forward"] if a else 0), 1)})
    diff.sort(key=lambda r: -abs(r["delta_own_us"]))
    q = sorted([r for r in p.values() if r["quantsd"]], key=lambda r: -r["cum_us_per_forward"])
    total = [round(sum(r["own_us_per_forward"] for r in x.values()), 1) for x in (d, p)]
    return {"total_profiled_us_per_forward_dense_packed": total,
            "delta_by_function (dense, packed)": diff[:top], "quantsd_by_cumulative": q[:top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "paper-final.yaml"))
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("--div", type=int, default=40, help="divide SD1.5's widths by this (default 40: 8..32 channels)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="compute dtype (float32: the CPU's fast path; the Python is the same as fp16's)")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    ap.add_argument("--per-round", type=int, default=5, help="timed calls per variant per round (minimum kept)")
    ap.add_argument("--profile-forwards", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise)")
    ap.add_argument("--fresh-weights", action="store_true",
                    help="compute with each launch's own fresh output (cache-cold weights: a CPU-only cost)")
    ap.add_argument("--group-max-mib", type=float, default=None,
                    help="eager group cap in MiB of SD1.5 fp16 weights (default: EAGER_MAX_BYTES, 96)")
    a = ap.parse_args()
    global FRESH_WEIGHTS, MAX_BYTES
    FRESH_WEIGHTS = a.fresh_weights
    if a.group_max_mib is not None:
        MAX_BYTES = int(a.group_max_mib * (1 << 20))

    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    install_emulation()
    dtype = getattr(torch, a.dtype)
    recipe = load_recipe(a.recipe)
    dense, packed, cfg = build_unets(a.div, dtype, recipe)
    sd15_group_sizes(packed, recipe)
    layers = [m for _, m in packed_modules(packed)]
    groups = group(packed)
    counts = launch_counts(packed)
    ungroup_dequant(packed)
    g = torch.Generator().manual_seed(0)
    side = 2 ** (len(cfg["block_out_channels"]) - 1)   # smallest latent the UNet takes: 8 for SD1.5
    inputs = (torch.randn(2, 4, side, side, generator=g).to(dtype), torch.tensor(500),
              torch.randn(2, 77, cfg["cross_attention_dim"], generator=g).to(dtype))
    res = {"fresh_weights": a.fresh_weights,
           "model": {"unet": cfg, "latent": side, "batch": 2, "dtype": a.dtype, "packed_layers": len(layers),
                     "groups": len(groups), "grouped_layers": sum(len(x.members) for x in groups),
                     "launches_per_forward_grouped": counts["launches"],
                     "launches_per_forward_per_layer": len(layers)},
           "threads": a.threads, "torch": torch.__version__, "group_max_bytes": MAX_BYTES}
    res.update(measure(dense, packed, inputs, a.rounds, a.per_round, layers))
    res["profile_packed_grouped"] = profile(dense, packed, inputs, a.profile_forwards, a.top)
    res["profile_packed_prehook"] = profile(dense, packed, inputs, a.profile_forwards, a.top, prehook=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    short = {k: res[k] for k in ("forward_ms", "extra_us_per_layer", "extra_ms_per_forward", "forward_weight_us")}
    print(json.dumps({"model": res["model"], **short}, indent=1))


if __name__ == "__main__":
    main()
