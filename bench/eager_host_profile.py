"""Where an eager UNet step's host time goes, dense fp16 against packed (GPU only; numbers for
BENCHMARKS.md).

    python bench/eager_host_profile.py --out OUT.json

An eager SD1.5 UNet step is host-bound: the GPU waits for Python.  So the packed pipeline is no
slower than the dense one exactly when its host time per step is no larger.  For dense fp16 and
the packed pipeline (grouped as eager generation groups it), interleaved over ``--rounds``:

* ``host_ms``: wall time of one forward up to its return (no sync inside; a sync before each call,
  so the launch queue starts empty) -- the host's own time to issue the step;
* ``step_ms``: the same forward timed with CUDA events (what the bench's eager rows measure);

then one cProfile of ``--profile-steps`` steps per variant: the top functions by own time, and
the per-call cost of the calls the packed forward adds (``QuantModule._eager_weight``,
``DequantGroup.weight``, the group launches); and torch.profiler's self CPU time per aten op
(``aten_self_cpu``: session 11 found the packed model's ``torch.conv2d`` calls ~9 us slower each
on the host, which cProfile can't break down).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import BenchConfig, _unet_inputs, build_pipeline  # noqa: E402
from quantsd.dequant_groups import launch_counts  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402


def _profile(fn, steps: int, top: int) -> dict:
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(steps):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(prof)
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"fn": f"{Path(file).name}:{line}:{name}", "calls_per_step": nc / steps,
                     "own_us_per_step": round(tt / steps * 1e6, 1), "cum_us_per_step": round(ct / steps * 1e6, 1)})
    by_own = sorted(rows, key=lambda r: -r["own_us_per_step"])[:top]
    by_cum = sorted(rows, key=lambda r: -r["cum_us_per_step"])[:top]
    return {"total_own_ms_per_step": round(sum(r["own_us_per_step"] for r in rows) / 1e3, 2),
            "top_own": by_own, "top_cum": by_cum, "all_own": {r["fn"]: r["own_us_per_step"] for r in rows}}


def _differences(fa: dict, fb: dict) -> list[tuple[float, str]]:
    """(``fa[k] - fb[k]``, k) over every key of either (0 where missing), largest first."""
    return sorted(((round(fa.get(k, 0) - fb.get(k, 0), 1), k) for k in set(fa) | set(fb)), reverse=True)


def _cprofile_diff(profiles: dict, a: str = "packed", b: str = "fp16", top: int = 30) -> dict:
    """Own time per step, ``a`` minus ``b``, over every function either profile saw (not just each
    one's top list): by function (the largest differences both ways) and by source file -- where the
    packed step's extra host time sits.  (cProfile inflates functions with many calls alike in both.)"""
    fa, fb = profiles[a]["all_own"], profiles[b]["all_own"]
    by_fn = _differences(fa, fb)
    files: dict[str, float] = {}
    for d, k in by_fn:
        f = k.split(":")[0] if not k.startswith("~") else "(built-in)"
        files[f] = files.get(f, 0.0) + d
    return {"total_us": round(sum(d for d, _ in by_fn), 1),
            "by_file_us": dict(sorted(((f, round(v, 1)) for f, v in files.items()), key=lambda fv: -abs(fv[1]))[:top]),
            "more_in_" + a: [[k, d] for d, k in by_fn[:top]],
            "more_in_" + b: [[k, d] for d, k in by_fn[::-1][:top]]}


def _aten_self_cpu(fn, steps: int, top: int) -> list[dict]:
    """torch.profiler's self CPU time per aten op per step (host only): which op inside a call
    such as ``torch.conv2d`` (``aten::cudnn_convolution``, its allocations, the bias add) takes
    the time that cProfile can only attribute to the whole builtin."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    rows = [{"op": e.key, "calls_per_step": e.count / steps,
             "self_cpu_us_per_step": round(e.self_cpu_time_total / steps, 1)} for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r["self_cpu_us_per_step"])[:top]


def _conv_host_us(dev: torch.device, reps: int = 200) -> dict:
    """Host time of one eager 3x3 convolution (SD's 320-channel level, batch 2, 64x64, fp16) whose
    weight is a parameter, against the same weight as a view into a larger flat buffer (what a
    grouped packed layer passes): the eager profile found the packed model's torch.conv2d calls
    ~9 us slower each on the host than the dense model's."""
    x = torch.randn(2, 320, 64, 64, device=dev, dtype=torch.float16)
    w = torch.randn(320, 320, 3, 3, device=dev, dtype=torch.float16)
    b = torch.randn(320, device=dev, dtype=torch.float16)
    flat = torch.empty(8 * w.numel(), device=dev, dtype=torch.float16)
    view = flat.as_strided(w.shape, w.stride(), 3 * w.numel() + 64)
    view.copy_(w)
    out = {}
    for name, weight in (("parameter", torch.nn.Parameter(w, requires_grad=False)), ("view", view),
                         ("parameter_again", torch.nn.Parameter(w, requires_grad=False))):
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.conv2d(x, weight, b, 1, 1)
            times.append((time.perf_counter() - t0) / reps * 1e6)
            torch.cuda.synchronize()
        out[name] = round(statistics.median(times), 2)
    return out


def _prearmed(pipe, kind: str = "fresh") -> None:
    """The packed UNet with every member's weight decoded once and handed over for good (its root's
    arming forward removed): the same modules and layer forwards as ``packed`` without the per-step
    decode machinery -- the step's remaining gap to fp16, if any, is not the machinery's.  ``kind``:
    each weight a tensor of its own (``fresh``), an ``as_strided`` view of its group's flat buffer
    (``views``, what the slots hand over), or a tensor set on that buffer's storage (``aliases``:
    ``Tensor.set_``, no view) -- does the kind of tensor handed over change the ops' host time?
    (Session 14, run 4: views 0.948x fp16, fresh 0.958x, aliases 1.086x, and slots handing over
    aliases 1.081x against 1.030x with views: the slots keep views.)"""
    from quantsd.dequant_groups import _ArmingForward, arming_forwards

    for armer in arming_forwards(pipe.unet):
        for g in armer.groups:
            if kind == "fresh":
                weights = [m.dequantized_weight() for m in g.members]
            else:
                g._ready()
                launch = g._launch
                flat = launch.run()
                if kind == "views":
                    weights = launch.views(flat)
                else:
                    weights = [torch.empty(0, dtype=flat.dtype, device=flat.device).set_(flat.untyped_storage(), o, sh, st)
                               for sh, st, o in launch._view_args]
            for m, w in zip(g.members, weights):
                assert torch.equal(w, m.dequantized_weight())
            g._handles()             # (the members linked to the group's hand-over cell)
            g._cell[0] = list(weights)
        _ArmingForward.remove(armer.module)


def _machinery_us(unet, reps: int = 50) -> dict:
    """Host time of one step's arming and disarming (every root's groups armed into the slot and
    disarmed, as the roots' forwards do), with the GPU idle (a sync after each, outside the timing),
    and the same with the launches replaced by nothing: how much of the packed step's extra host
    time is the per-block machinery, and how much of that the launches."""
    from quantsd.dequant_groups import arming_forwards
    from quantsd.kernels.grouped import GroupLaunch

    # one armer per group (a run's group is on its first and its last root's forward)
    by_group: dict[int, object] = {}
    for a in arming_forwards(unet):
        by_group.setdefault(id(a.groups[0]), a)
    armers = list(by_group.values())

    def one_step() -> float:
        t = 0.0
        for armer in armers:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for g in armer.groups:
                g.arm(armer.pool)
            for g in armer.groups:
                g.disarm()
            t += time.perf_counter() - t0
        for pool in {id(a.pool): a.pool for a in armers if a.pool is not None}.values():
            pool.free()
        return t * 1e6

    out = {"roots": len(armers), "groups": sum(len(a.groups) for a in armers)}
    out["with_launch_us_per_step"] = round(statistics.median(one_step() for _ in range(reps)), 1)
    real = GroupLaunch.run_into
    GroupLaunch.run_into = lambda self, flat: None
    try:
        out["without_launch_us_per_step"] = round(statistics.median(one_step() for _ in range(reps)), 1)
    finally:
        GroupLaunch.run_into = real
    # which launch path the groups took: Triton's C launcher (_fast), the checked direct call, or Triton's own
    launches = [g._launch for a in armers for g in a.groups if g._launch is not None]
    out["launch_paths"] = {"c_launcher": sum(ln._fast is not None for ln in launches),
                           "direct": sum(ln._direct is not None and ln._fast is None for ln in launches),
                           "triton": sum(ln._direct is None for ln in launches)}
    return out


def _machinery_in_situ_us(unet, call, steps: int = 20) -> dict:
    """Host time per step spent arming and disarming inside real forwards of ``unet`` (the same
    work as :func:`_machinery_us`, timed where it runs: between the blocks' own ops, caches cold),
    and its parts: the decode launch (``GroupLaunch.run_into``), taking a slot (``_SlotPool.acquire``),
    the capture query, and the slot arm less those (checks, hand-over); plus the median arm by its
    place in the step (``arm_by_position_us``: is one arm -- the step's first, which re-allocates the
    slot -- the expensive one, or all of them?)."""
    from quantsd import dequant_groups as DG
    from quantsd.kernels.grouped import GroupLaunch

    spent = {"arm": 0.0, "disarm": 0.0, "launch": 0.0, "acquire": 0.0, "capture_query": 0.0, "arm_in_slot": 0.0}
    arms: list[float] = []
    real = {"arm": DG.DequantGroup.arm, "disarm": DG.DequantGroup.disarm, "run_into": GroupLaunch.run_into,
            "acquire": DG._SlotPool.acquire, "capturing": DG._capturing_now, "slot": DG.DequantGroup._arm_in_slot}

    def timed(name, fn):
        def wrapper(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            dt = time.perf_counter() - t0
            spent[name] += dt
            if name == "arm":
                arms.append(dt)
            return out
        return wrapper

    DG.DequantGroup.arm = timed("arm", real["arm"])
    DG.DequantGroup.disarm = timed("disarm", real["disarm"])
    GroupLaunch.run_into = timed("launch", real["run_into"])
    DG._SlotPool.acquire = timed("acquire", real["acquire"])
    DG._capturing_now = timed("capture_query", real["capturing"])
    DG.DequantGroup._arm_in_slot = timed("arm_in_slot", real["slot"])
    try:
        for _ in range(steps):
            call(unet)
        torch.cuda.synchronize()
    finally:
        DG.DequantGroup.arm, DG.DequantGroup.disarm = real["arm"], real["disarm"]
        GroupLaunch.run_into, DG._SlotPool.acquire = real["run_into"], real["acquire"]
        DG._capturing_now, DG.DequantGroup._arm_in_slot = real["capturing"], real["slot"]
    out = {k: round(v / steps * 1e6, 1) for k, v in spent.items()}
    out["arm_in_slot_less_launch_and_acquire"] = round(out["arm_in_slot"] - out["launch"] - out["acquire"], 1)
    per_step = len(arms) // steps if steps else 0
    if per_step:
        out["arm_by_position_us"] = [round(statistics.median(arms[i::per_step]) * 1e6, 1) for i in range(per_step)]
    return out


def _machinery_only(recipe: str, out: str) -> None:
    """``--machinery-only``: the packed pipeline alone, the arming's host time isolated and in situ."""
    dev = torch.device("cuda")
    pipe = build_pipeline("sd15-arch", BenchConfig("packed", packed=True), dev, recipe=load_recipe(recipe))
    lat, t, ctx = _unet_inputs(pipe, 2, 512, dev, pipe.unet.dtype)
    call = lambda u: u(lat, t, encoder_hidden_states=ctx, return_dict=False)  # noqa: E731
    with torch.inference_mode():
        for _ in range(5):
            call(pipe.unet)
        res = {"machinery": _machinery_us(pipe.unet)}
        res["machinery"]["in_situ_us_per_step"] = [_machinery_in_situ_us(pipe.unet, call) for _ in range(3)]
    print("machinery:", res["machinery"])
    Path(out).write_text(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--checked", action="store_true",
                    help="also the packed pipeline with checked groups (no prehook groups: the default until session 13)")
    ap.add_argument("--prearmed", action="store_true",
                    help="also the packed UNet with every weight decoded once and kept (no per-step machinery), and "
                         "the host time of one step's arming and disarming")
    ap.add_argument("--machinery-only", action="store_true",
                    help="only the packed pipeline's arming host time, isolated and in situ")
    a = ap.parse_args()
    if a.machinery_only:
        return _machinery_only(a.recipe, a.out)
    dev = torch.device("cuda")
    variants = {"fp16": build_pipeline("sd15-arch", BenchConfig("fp16-sdpa"), dev),
                "packed": build_pipeline("sd15-arch", BenchConfig("packed", packed=True), dev,
                                         recipe=load_recipe(a.recipe))}
    if a.prearmed:
        for kind in ("fresh", "views", "aliases"):
            name = "packed-prearmed" + ("" if kind == "fresh" else f"-{kind}")
            variants[name] = build_pipeline("sd15-arch", BenchConfig("packed", packed=True), dev,
                                            recipe=load_recipe(a.recipe))
            _prearmed(variants[name], kind)
    if a.checked:
        variants["packed-checked"] = build_pipeline("sd15-arch", BenchConfig("packed-checked", packed=True, prehook=False),
                                                    dev, recipe=load_recipe(a.recipe))
    res: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    calls = {}
    for name, pipe in variants.items():
        lat, t, ctx = _unet_inputs(pipe, 2, 512, dev, pipe.unet.dtype)
        calls[name] = (lambda u, lat=lat, t=t, ctx=ctx: u(lat, t, encoder_hidden_states=ctx, return_dict=False))
    host: dict = {k: [] for k in variants}
    gpu: dict = {k: [] for k in variants}
    with torch.inference_mode():
        for name, pipe in variants.items():   # warm-up: kernels compiled, allocator primed
            for _ in range(3):
                calls[name](pipe.unet)
        torch.cuda.synchronize()
        names = list(variants)
        alloc: dict = {k: {"device_allocs": 0, "device_frees": 0, "alloc_retries": 0} for k in variants}
        for r in range(a.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                u = variants[name].unet
                before = torch.cuda.memory_stats()
                for _ in range(5):
                    torch.cuda.synchronize()
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    t0 = time.perf_counter()
                    e0.record()
                    calls[name](u)
                    e1.record()
                    host[name].append((time.perf_counter() - t0) * 1e3)
                    e1.synchronize()
                    gpu[name].append(e0.elapsed_time(e1))
                after = torch.cuda.memory_stats()   # cudaMalloc/cudaFree in steady state: host stalls
                for key, stat in (("device_allocs", "num_device_alloc"), ("device_frees", "num_device_free"),
                                  ("alloc_retries", "num_alloc_retries")):
                    alloc[name][key] += after.get(stat, 0) - before.get(stat, 0)
        res["allocator_during_rounds"] = alloc
        # (counted after the rounds: the execution-order runs merge the groups after the first forward)
        res["launches_per_step"] = launch_counts(variants["packed"].unet)
        res["host_ms"] = {k: round(statistics.median(v), 2) for k, v in host.items()}
        res["step_ms"] = {k: round(statistics.median(v), 2) for k, v in gpu.items()}
        res["packed_over_fp16"] = {"host": round(res["host_ms"]["packed"] / res["host_ms"]["fp16"], 3),
                                   "step": round(res["step_ms"]["packed"] / res["step_ms"]["fp16"], 3)}
        for other in ("packed-prearmed", "packed-prearmed-views", "packed-prearmed-aliases"):
            if other in variants:
                res[f"{other}_over_fp16"] = {k: round(res[f"{k}_ms"][other] / res[f"{k}_ms"]["fp16"], 3)
                                             for k in ("host", "step")}
        if a.prearmed:
            try:
                res["machinery"] = _machinery_us(variants["packed"].unet)
                res["machinery"]["in_situ_us_per_step"] = _machinery_in_situ_us(variants["packed"].unet, calls["packed"])
            except Exception as e:  # a diagnostic: keep the rest of the run
                res["machinery"] = {"error": repr(e)}
            print("machinery:", res["machinery"])
        if "packed-checked" in variants:
            res["checked_over_fp16"] = {k: round(res[f"{k}_ms"]["packed-checked"] / res[f"{k}_ms"]["fp16"], 3)
                                        for k in ("host", "step")}
        res["conv_host_us"] = _conv_host_us(dev)
        # every op (the diff below must not compare two truncated lists), the top ones kept in the JSON
        aten_all = {name: _aten_self_cpu(lambda: calls[name](variants[name].unet), 2, 10**6) for name in names}
        res["aten_self_cpu"] = {name: rows[:a.top] for name, rows in aten_all.items()}
        res["profile"] = {name: _profile(lambda: calls[name](variants[name].unet), a.profile_steps, a.top)
                          for name in names}
        res["cprofile_diff"] = _cprofile_diff(res["profile"])
        print("cProfile own time, packed minus fp16, by file (us per step):", res["cprofile_diff"]["by_file_us"])
    print(json.dumps({k: v for k, v in res.items() if k != "profile"}))
    for name in names:
        print(name, "cProfile own time per step (ms):", res["profile"][name]["total_own_ms_per_step"])
        for r in res["profile"][name]["top_own"][:15]:
            print(f"  {r['own_us_per_step']:9.1f} us {r['calls_per_step']:7.1f}x {r['fn']}")
    aten = {name: {r["op"]: r["self_cpu_us_per_step"] for r in aten_all[name]} for name in names}
    diff = _differences(aten["packed"], aten["fp16"])
    print("aten self CPU us per step, packed minus fp16:", [(op, d) for d, op in diff[:12]])
    res["aten_self_cpu_diff"] = {"total_us": round(sum(d for d, _ in diff), 1),
                                 "more_in_packed": [[op, d] for d, op in diff[:30]],
                                 "more_in_fp16": [[op, d] for d, op in diff[::-1][:30]]}
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
