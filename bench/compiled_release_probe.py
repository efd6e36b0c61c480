"""What keeps GPU memory after a compiled UNet is released?  (GPU only; BENCHMARKS.md)

    python bench/compiled_release_probe.py --out OUT.json

The known failure behind ``tests/test_compile_guards.py::test_compiled_unet_memory_is_released_by_the_bench``
(xfail): with ``compile_unet(guards="minimal")`` under CUDA graphs, ~1 MB of the tiny UNet's
1.6 MB of weights stays allocated after ``quantsd.bench.core._release`` + ``gc.collect()`` +
``empty_cache()``; with full guards everything goes.  For each guard mode this repeats the test's
steps with the allocator's history recorded, then reports

* the bytes still allocated, and the live blocks' sizes with the Python frames that allocated them
  (``torch.cuda.memory._snapshot``): weights moved by ``pipe.to``, or buffers made by Inductor /
  the CUDA-graph trees;
* every CUDA tensor the garbage collector can still reach, with two levels of its referrers'
  types (who holds it: a Dynamo cache entry, a CUDA-graph tree node, a closure cell ...);
* the same after a second ``torch._dynamo.reset()`` and after resetting the CUDA-graph trees
  (``torch._inductor.cudagraph_trees.reset_cudagraph_trees``): which release step is missing.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import _release  # noqa: E402
from quantsd.generate import compile_unet  # noqa: E402
from quantsd.models import load_pipeline  # noqa: E402


def _allocated() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def _live_blocks(top: int = 12) -> list[dict]:
    """Allocated blocks of the recorded snapshot, largest first, with the Python frames of their allocation."""
    snap = torch.cuda.memory._snapshot()
    blocks = []
    for seg in snap.get("segments", []):
        for b in seg.get("blocks", []):
            if b.get("state") != "active_allocated":
                continue
            frames = [f"{Path(f.get('filename', '?')).name}:{f.get('line')} {f.get('name')}"
                      for f in b.get("frames", []) if f.get("filename", "").endswith(".py")]
            blocks.append({"bytes": b.get("size", 0), "frames": frames[:8]})
    blocks.sort(key=lambda b: -b["bytes"])
    return blocks[:top]


def _label(r, obj) -> str:
    """A referrer in a few words: its type, and which of its slots holds ``obj``."""
    name = type(r).__name__
    try:
        if isinstance(r, dict):
            name += f" keys={[str(k)[:60] for k, v in r.items() if v is obj][:3]} ({len(r)} items)"
        elif isinstance(r, (list, tuple)):
            name += f" len={len(r)}"
        elif type(r).__name__ == "cell":
            name += " (closure cell)"
        elif hasattr(r, "__qualname__"):
            name += f" {r.__qualname__}"
        elif hasattr(r, "__class__") and hasattr(r, "__dict__"):
            name += f" attrs={[k for k, v in vars(r).items() if v is obj][:3]}"
    except Exception:  # noqa: BLE001 -- a diagnostic: any object may refuse
        pass
    return name[:200]


def _referrer_chain(obj, depth: int, seen: set) -> list:
    """``obj``'s referrers, ``depth`` levels up (frames and the probe's own containers skipped)."""
    out = []
    for r in gc.get_referrers(obj):
        if id(r) in seen or type(r).__name__ == "frame":
            continue
        seen.add(id(r))
        entry = {"ref": _label(r, obj)}
        if depth > 1:
            entry["by"] = _referrer_chain(r, depth - 1, seen)[:5]
        out.append(entry)
    return out[:6]


_GUARD_TYPES = frozenset({"GuardManagerWrapper", "CheckFunctionManager", "RootGuardManager", "GuardManager",
                          "function", "cell", "method", "GuardBuilder", "OutputGraphGuardsState", "CacheEntry",
                          "ExtraState", "GuardsState", "DictGuardManager", "builtin_function_or_method"})
_PLUMBING = {"dict", "list", "tuple", "list_iterator", "set", "Parameter", "ModuleList", "ModuleDict", "Sequential",
             "cell", "method", "frozenset"}


def _anchors(obj, max_depth: int = 24, limit: int = 8, through: frozenset = frozenset()) -> list[list[str]]:
    """Referrer paths from ``obj`` up to the first objects that are neither containers nor modules
    nor of a type named in ``through`` (whatever holds a leaked module tree: a cache entry, a
    function, a registry), breadth first; a path that ends in a ``through`` object nothing else
    refers to ends with "(no referrer)"."""
    from collections import deque

    from torch import nn

    frontier = deque([(obj, [])])
    seen = {id(obj), id(frontier)}
    found = []
    while frontier and len(found) < limit:
        o, path = frontier.popleft()
        if len(path) >= max_depth:
            continue
        refs = [r for r in gc.get_referrers(o) if type(r).__name__ != "frame" and r is not frontier]
        if not refs and path and type(o).__name__ in through:
            found.append(path + ["(no referrer)"])
        for r in refs:
            if id(r) in seen or type(r).__name__ == "frame" or r is frontier:
                continue
            seen.add(id(r))
            step = path + [_label(r, o) if not isinstance(r, nn.Module) else f"module {type(r).__name__}"]
            if type(r).__name__ not in _PLUMBING and type(r).__name__ not in through and not isinstance(r, nn.Module):
                found.append(step)
                if len(found) >= limit:
                    break
            else:
                frontier.append((r, step))
    return found


def _live_cuda_tensors(top: int = 6, depth: int = 5) -> dict:
    """Real (not fake) CUDA tensors the collector can reach, by type, and who holds the largest."""
    from torch._subclasses.fake_tensor import FakeTensor

    objs = gc.get_objects()
    fake = sum(isinstance(o, FakeTensor) for o in objs)
    tensors = [o for o in objs if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor) and o.is_cuda]
    del objs
    sizes = Counter()
    for t in tensors:
        sizes[type(t).__name__] += t.untyped_storage().nbytes()
    tensors.sort(key=lambda t: -t.untyped_storage().nbytes())
    seen = {id(tensors)}
    anchors = _anchors(tensors[0]) if tensors else []
    # and past Dynamo's guard objects (the holder found first on the H200): who keeps those alive
    deeper = _anchors(tensors[0], through=_GUARD_TYPES) if tensors else []
    return {"count": len(tensors), "fake_tensors_alive": fake, "bytes_by_type": dict(sizes), "anchors": anchors,
            "anchors_past_guards": deeper,
            "largest": [{"shape": list(t.shape), "dtype": str(t.dtype), "type": type(t).__name__,
                         "storage_bytes": t.untyped_storage().nbytes(), "held_by": _referrer_chain(t, depth, seen)}
                        for t in tensors[:top]]}


def probe(guards: str) -> dict:
    torch._dynamo.reset()
    base = _allocated()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    pipe = load_pipeline("tiny")
    pipe.to("cuda", torch.float16)
    weights = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    pipe.unet = compile_unet(pipe.unet, "reduce-overhead", guards)
    lat = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        for _ in range(4):   # warm-up, record, replays
            pipe.unet(lat, 10, encoder_hidden_states=ctx)
    torch.cuda.synchronize()
    res = {"guards": guards, "unet_weight_bytes": weights, "after_run": _allocated() - base}
    _release(pipe, compiled=True)
    del pipe, lat, ctx
    res["after_release"] = _allocated() - base
    res["live_blocks"] = _live_blocks()
    res["live_tensors"] = _live_cuda_tensors()
    torch._dynamo.reset()
    res["after_second_dynamo_reset"] = _allocated() - base
    try:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
        res["after_cudagraph_trees_reset"] = _allocated() - base
    except Exception as e:  # noqa: BLE001 -- a diagnostic: report, go on
        res["after_cudagraph_trees_reset"] = f"{type(e).__name__}: {e}"
    res["live_blocks_at_end"] = _live_blocks(6)
    torch.cuda.memory._record_memory_history(enabled=None)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guards", default="full,minimal", help="comma-separated guard modes, in order")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("compiled_release_probe.py needs CUDA")
    results = []
    for g in args.guards.split(","):
        try:
            results.append(probe(g))
        except Exception as e:  # noqa: BLE001 -- keep the other mode's result
            results.append({"guards": g, "error": f"{type(e).__name__}: {e}"})
        r = results[-1]
        print("release", g, {k: r.get(k) for k in ("unet_weight_bytes", "after_run", "after_release",
                                                    "after_second_dynamo_reset", "after_cudagraph_trees_reset",
                                                    "error")})
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
