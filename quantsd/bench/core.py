"""Speed / memory / max-resolution benchmarks (``quantsd bench``; protocol in BENCHMARKS.md).

Every run measures, in one process, a list of *configurations* (see :func:`default_configs`):

* ``fp32-classic``      fp32 weights, diffusers ``AttnProcessor`` (explicit softmax(QK^T)V): the
                        paper's baseline;
* ``fp16-sdpa``         fp16 weights, ``AttnProcessor2_0`` (F.scaled_dot_product_attention), eager;
* ``fp16-sdpa-compiled``  the same under ``torch.compile(mode="reduce-overhead")`` (with --compile);
* ``fp16-sdpa-compiled-cl``  the same with the UNet's and VAE's parameters channels-last (``quantsd
                        generate --channels-last``): Inductor runs SD's convolutions channels-last
                        and would otherwise copy every NCHW conv weight on every step -- the
                        strongest dense baseline (with --compile);
* ``packed``            the model quantized with the recipe, packed codes resident, Triton
                        dequant in each layer's forward, fp16 SDPA, eager;
* ``packed-compiled``   the same, compiled (with --compile).

Per configuration: weight bytes resident on the GPU per component, UNet ms/step (CFG batch 2,
CUDA events, median after warm-up), seconds per image (full pipeline call), peak VRAM of one
image, and UNet ms/step over a resolution sweep (the time-vs-pixels plot).  Then the maximum
square resolution under each VRAM cap (:func:`max_resolution`).  Every measurement is wrapped:
an OOM or error is recorded in the results instead of ending the run, and ``results.json`` is
rewritten after each measurement, so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import gc
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

# (re-exported: scripts and tests import them from here)
from .configs import (EAGER_VARIANTS, BenchConfig, default_configs, optional_configs, select_configs,  # noqa: F401
                      with_sdpa_backend)
from .report import markdown_report, packed_ratios, plot_time_vs_pixels, summary_rows, write_reports  # noqa: F401
from .stats import _pctl, binary_search_max, interleaved_rounds, median_ci, paired_ratio  # noqa: F401

__all__ = ["BenchConfig", "cuda_time_ms", "default_configs", "optional_configs", "select_configs", "binary_search_max",
           "weight_bytes",
           "to_packed", "Bench", "interleaved_rounds", "paired_ratio", "eager_interleaved",
           "write_reports", "markdown_report", "plot_time_vs_pixels", "sdpa_report"]


def weight_bytes(module: torch.nn.Module, device_type: str | None = None) -> int:
    """Bytes of parameters + buffers (each tensor once; packed layers' tables included), optionally
    only those on ``device_type``."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        if device_type is not None and t.device.type != device_type:
            continue
        total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------- model building
def to_packed(pipe, recipe, dtype: torch.dtype = torch.float16):
    """Quantize ``pipe`` in memory with ``recipe`` and swap every planned Linear/Conv2d for a
    QuantLinear/QuantConv2d holding the packed codes (no disk round trip); embeddings are
    replaced by QuantEmbedding (only looked-up rows decoded), as the checkpoint loader does.  The codes, scales and
    breakpoints are exactly what ``quantsd.export`` would write (same quantize_layer_weight).
    Returns (pipe, plan)."""
    from torch import nn

    from ..blocks import get_module
    from ..nn import QuantConv2d, QuantEmbedding, QuantLinear
    from ..recipe import quantize_layer_weight, resolve_recipe

    plan = resolve_recipe(pipe, recipe, warn=False)
    for lp in plan.layers:
        mod = get_module(pipe, lp.path)
        qt = quantize_layer_weight(mod.weight.detach(), lp)
        if isinstance(mod, nn.Linear):
            new = QuantLinear.from_linear(mod, qt)
        elif isinstance(mod, nn.Conv2d):
            new = QuantConv2d.from_conv(mod, qt)
        elif isinstance(mod, nn.Embedding) and mod.max_norm is None:
            new = QuantEmbedding.from_embedding(mod, qt)
        else:  # any other embedding: dense dequantized weight
            with torch.no_grad():
                mod.weight.copy_(qt.dequantize().to(mod.weight.dtype))
            continue
        parent, _, child = lp.path.rpartition(".")
        new.train(mod.training)   # a fresh module is in training mode; keep the model's mode
        setattr(get_module(pipe, parent), child, new)
        del mod, qt
    for m in ("text_encoder", "unet", "vae"):
        getattr(pipe, m).to(dtype)
    return pipe, plan


def build_pipeline(model: str, cfg: BenchConfig, device: torch.device, recipe=None, checkpoint=None,
                   sync_free_scheduler: bool = True, compile_guards: str = "full", grouped_dequant: bool = True,
                   dense_below: int = 0):
    """A pipeline for one configuration, on ``device`` (built there directly for sd15-arch), with the
    configuration's options applied as ``quantsd generate`` applies them (``configure_pipeline``)."""
    from ..generate import configure_pipeline
    from ..models import load_pipeline

    if cfg.packed and checkpoint is not None:
        from ..io import load_checkpoint

        pipe = load_checkpoint(checkpoint, dtype=cfg.torch_dtype, device=device, weights="packed")
    else:
        pipe = load_pipeline(model, device=device)   # fp32 (random init on the GPU for sd15-arch)
        if cfg.packed:
            to_packed(pipe, recipe, cfg.torch_dtype)
        elif cfg.torch_dtype != torch.float32:
            pipe.to(dtype=cfg.torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    # every configuration alike: PNDM/DDIM without a device sync per step (sync_free_scheduler)
    pipe = configure_pipeline(pipe, compile=cfg.compile, compile_guards=compile_guards, attention=cfg.attention,
                              channels_last=cfg.channels_last,
                              sync_free_scheduler=sync_free_scheduler,
                              grouped_dequant=cfg.packed and cfg.grouped and grouped_dequant,
                              dense_below=dense_below if cfg.packed else 0, prefetch_weights=cfg.prefetch,
                              eager_prehook=cfg.prehook, eager_runs=cfg.runs, direct_attention=cfg.direct_attention,
                              sdpa_backend=cfg.sdpa_backend, eager_armed_calls=cfg.armed_calls,
                              group_max_bytes=None if cfg.group_max_mib is None else int(cfg.group_max_mib * (1 << 20)))
    if cfg.packed:
        # the bench never edits weights: its eager groups check them once, as within each `quantsd
        # generate` call (quantsd.dequant_groups.trusted_weights)
        from ..dequant_groups import trust_weights

        trust_weights(pipe.unet)
    return pipe


# --------------------------------------------------------------------------- measurements (CUDA)
def _unet_inputs(pipe, batch: int, side: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    lat = torch.randn(batch, 4, side // 8, side // 8, generator=g).to(device, dtype)
    ctx = torch.randn(batch, 77, pipe.text_encoder.config.hidden_size, generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)
    return lat, t, ctx


def cuda_time_ms(fn, iters: int = 20, warmup: int = 3) -> dict:
    """Median (min/max) milliseconds of ``iters`` calls of ``fn``, each timed with CUDA events,
    after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return _pctl(times)


def cuda_graph_ms(fn, reps: int = 1, iters: int = 10, warmup: int = 3) -> float:
    """Median GPU milliseconds of one ``fn`` call without launch overhead: ``reps`` calls captured in
    one CUDA graph (after a warm-up call on a side stream), the replay timed by :func:`cuda_time_ms`."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return cuda_time_ms(g.replay, iters, warmup)["median"] / reps


def unet_step_ms(pipe, side: int, iters: int = 20, warmup: int = 3, batch: int = 2) -> dict:
    """Median UNet forward time (ms) at ``side``² (latents side/8), CFG batch 2, CUDA events."""
    dev, dt = pipe.unet.device, pipe.unet.dtype
    lat, t, ctx = _unet_inputs(pipe, batch, side, dev, dt)
    with torch.inference_mode():
        return cuda_time_ms(lambda: pipe.unet(lat, t, encoder_hidden_states=ctx, return_dict=False), iters, warmup)


def _event_ms(fn: Callable[[], Any]) -> float:
    """One call of ``fn`` timed with CUDA events (it starts with an empty launch queue)."""
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def eager_interleaved(pipes: dict, side: int, steps: int, guidance: float, rounds: int = 9, calls: int = 5,
                      image_rounds: int = 3) -> dict:
    """Eager UNet steps (CFG batch 2) and whole images of two or more pipelines, taking turns
    (:func:`interleaved_rounds`): an eager SD step is host-bound, and on a shared host whose
    Python speed drifts, numbers measured minutes apart can't resolve a 10% difference.  Returns the
    per-round numbers; :func:`paired_ratio` compares them."""
    step_fns, image_fns = {}, {}
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=side, width=side, output_type="np")
    for name, pipe in pipes.items():
        lat, t, ctx = _unet_inputs(pipe, 2, side, pipe.unet.device, pipe.unet.dtype)
        step_fns[name] = (lambda u=pipe.unet, lat=lat, t=t, ctx=ctx:
                          u(lat, t, encoder_hidden_states=ctx, return_dict=False))
        image_fns[name] = (lambda p=pipe: p("a photograph of an astronaut riding a horse",
                                            generator=torch.Generator(device="cpu").manual_seed(0), **kw))
    with torch.inference_mode():
        for name in pipes:    # warm-up: kernels compiled, allocator primed
            for _ in range(3):
                step_fns[name]()
            image_fns[name]()
        torch.cuda.synchronize()
        steps_ms = interleaved_rounds(step_fns, rounds, calls, _event_ms)
        image_ms = interleaved_rounds(image_fns, image_rounds, 1, _event_ms)
    return {"unet_ms_rounds": steps_ms, "image_ms_rounds": image_ms, "rounds": rounds, "calls": calls,
            "image_rounds": image_rounds}


def unet_step_pipelined_ms(pipe, side: int, calls: int = 20, repeats: int = 5, batch: int = 2) -> dict:
    """UNet ms/step when steps are issued back to back (one CUDA-event pair around ``calls`` calls,
    no host synchronization between them), median of ``repeats`` windows.

    :func:`unet_step_ms` synchronizes after every call, so it adds the host's time to issue a step
    (Dynamo guards, CUDA-graph bookkeeping: ~1-3 ms for SD1.5) to the GPU time.  A sampling loop
    without per-step synchronization overlaps the two; this measures that throughput.

    Also returned, ``host_issue_ms``: the host's wall time per call to issue each window's calls
    (until the last one returns, before the GPU is waited for), median over the windows.  Where it
    reaches the GPU's ms per call, the back-to-back step is bound by the host, not the GPU -- what a
    compiled packed UNet's many graph inputs and guards risk on a slow host (BENCHMARKS.md, session 19)."""
    dev, dt = pipe.unet.device, pipe.unet.dtype
    lat, t, ctx = _unet_inputs(pipe, batch, side, dev, dt)
    issue_ms = []

    def run():
        t0 = time.perf_counter()
        for _ in range(calls):
            pipe.unet(lat, t, encoder_hidden_states=ctx, return_dict=False)
        issue_ms.append((time.perf_counter() - t0) * 1e3 / calls)

    with torch.inference_mode():
        res = cuda_time_ms(run, repeats, 1)
    out = {k: (v / calls if k != "n" else v) for k, v in res.items()}
    out["host_issue_ms"] = _pctl(issue_ms[-repeats:])["median"]     # (the warm-up window's first)
    return out


def seconds_per_image(pipe, steps: int, guidance: float, height: int, width: int, repeats: int = 2,
                      warmup: int = 1) -> dict:
    """Wall seconds of whole pipeline calls (text encode, ``steps`` steps with CFG, VAE decode,
    output_type="np"); peak VRAM of the last call (max_memory_allocated, stats reset before it)."""
    gen = torch.Generator(device="cpu")
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width, output_type="np")
    with torch.inference_mode():
        for _ in range(warmup):
            pipe("a photograph of an astronaut riding a horse", generator=gen.manual_seed(0), **kw)
        times = []
        for i in range(repeats):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            pipe("a photograph of an astronaut riding a horse", generator=gen.manual_seed(i), **kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return {**_pctl(times), "peak_vram_bytes": torch.cuda.max_memory_allocated()}


def fits_under_cap(pipe, side: int, cfg_mode: str = "sequential") -> bool:
    """One probe of the max-resolution protocol: one UNet step with CFG at ``side``² (batch 2,
    or the two CFG halves as two batch-1 calls with ``cfg_mode="sequential"``) and a tiled VAE
    decode of one ``side``² latent.  False on CUDA OOM."""
    dev, dt = pipe.unet.device, pipe.unet.dtype
    try:
        with torch.inference_mode():
            if cfg_mode == "batch2":
                lat, t, ctx = _unet_inputs(pipe, 2, side, dev, dt)
                out = pipe.unet(lat, t, encoder_hidden_states=ctx, return_dict=False)[0]
                del out
            else:
                lat, t, ctx = _unet_inputs(pipe, 1, side, dev, dt)
                for _ in range(2):
                    out = pipe.unet(lat, t, encoder_hidden_states=ctx, return_dict=False)[0]
                    del out
            del ctx
            pipe.vae.enable_tiling()
            img = pipe.vae.decode(lat[:1] / pipe.vae.config.scaling_factor, return_dict=False)[0]
            del img, lat
            torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _release(pipe, compiled: bool) -> None:
    """Let a measured pipeline's memory go before the next configuration is built.

    A compile with minimal guards (``compile_unet``) puts the compiled method on the UNet itself,
    a reference cycle that holds the UNet (and, through the compiled graphs, CUDA-graph memory
    pools) until a garbage collection; Dynamo's caches and the CUDA-graph trees hold compiled
    code and pools until ``torch._dynamo.reset()``, and Dynamo's guard scope may keep some of the
    UNet's blocks past that (:func:`quantsd.generate.drop_stale_guard_temporaries`).  So: break the
    cycle, reset, drop those, then collect.
    (On the H200, max-resolution searches run after the compiled configurations once found
    ~1.5-2 GiB of a 4 GiB cap already taken: BENCHMARKS.md, fourth run.)"""
    unet = getattr(pipe, "unet", None)
    if isinstance(unet, torch.nn.Module):
        from ..dequant_groups import ungroup_dequant

        vars(unet).pop("forward", None)
        ungroup_dequant(unet)    # a group's buffer held by an interrupted forward goes too
    if compiled:
        from ..generate import drop_stale_guard_temporaries

        torch._dynamo.reset()
        drop_stale_guard_temporaries()   # (Dynamo's guard scope may still hold some of its modules)


def max_resolution(pipe, cap_gb: float, cfg_mode: str, lo: int = 256, hi: int = 8192,
                   deadline: float | None = None, lo_fits: bool = False,
                   on_probe: Callable[[int, bool], None] | None = None) -> dict:
    """Largest square side (multiple of 64) whose probe fits with the caching allocator capped at
    ``cap_gb`` GiB (``torch.cuda.set_per_process_memory_fraction``; resident weights count).
    ``lo_fits``: ``lo`` is known to fit (the answer under a smaller cap), so it is not probed;
    ``on_probe``: :func:`binary_search_max`'s."""
    from ..dequant_groups import launch_counts, regroup_pipeline

    total = torch.cuda.get_device_properties(pipe.unet.device).total_memory
    frac = min(1.0, cap_gb * 2**30 / total)
    gc.collect()
    torch.cuda.empty_cache()
    # what the process holds before the first probe (the pipeline's weights, and anything an earlier
    # measurement left behind): a probe's headroom is the cap minus this
    start = {"allocated_bytes": torch.cuda.memory_allocated(pipe.unet.device),
             "reserved_bytes": torch.cuda.memory_reserved(pipe.unet.device)}
    torch.cuda.set_per_process_memory_fraction(frac, pipe.unet.device)
    try:
        # a grouping that depends on the device's memory sees the cap, as on such a card
        grouping = {"regrouped": regroup_pipeline(pipe), "dequant_launches": launch_counts(pipe.unet)}
        res = binary_search_max(lambda s: fits_under_cap(pipe, s, cfg_mode), lo, hi, 64, deadline, lo_fits,
                                on_probe)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, pipe.unet.device)
        regroup_pipeline(pipe)
        pipe.vae.disable_tiling()
    return {**res, "cap_gb": cap_gb, "cfg_mode": cfg_mode, "fraction": frac, "start": start, **grouping}


def sdpa_report(device, dtype=torch.float16, heads: int = 8, tokens: int = 4096,
                head_dims: Sequence[int] = (40, 80, 160), context: int = 77) -> dict:
    """Flash availability: the global switches, and a probe of SD1.5's attention shapes at 512²
    (self-attention tokens x tokens, cross-attention tokens x 77) forced onto the flash backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    rep: dict[str, Any] = {"flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled(),
                           "mem_efficient_sdp_enabled": torch.backends.cuda.mem_efficient_sdp_enabled(),
                           "math_sdp_enabled": torch.backends.cuda.math_sdp_enabled(),
                           "cudnn_sdp_enabled": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
                           "dtype": str(dtype).replace("torch.", ""), "probes": {}}
    for d in head_dims:
        for kind, kv in (("self", tokens), ("cross", context)):
            q = torch.randn(2, heads, tokens // (d // 40) ** 2, d, device=device, dtype=dtype)
            k = torch.randn(2, heads, kv if kind == "cross" else q.shape[2], d, device=device, dtype=dtype)
            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    F.scaled_dot_product_attention(q, k, k)
                torch.cuda.synchronize()
                rep["probes"][f"{kind}_d{d}"] = "flash ok"
            except Exception as e:  # flash refused these shapes/dtype
                rep["probes"][f"{kind}_d{d}"] = f"flash refused: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return rep


# the SDPA backend each aten op stands for (the op PyTorch's dispatcher chose for the call)
SDPA_OPS = {"aten::_scaled_dot_product_flash_attention": "flash",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
            "aten::_scaled_dot_product_efficient_attention": "mem_efficient",
            "aten::_scaled_dot_product_cudnn_attention": "cudnn",
            "aten::_scaled_dot_product_attention_math": "math",
            "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable"}


def attention_backend_of(op_counts: dict[str, int]) -> str:
    """The SDPA backend(s) a forward used, from its aten op counts: one name, several joined by "+",
    or "classic" where no SDPA op ran (explicit softmax(QK^T)V).

    Why the ops and not the kernels' names: cuDNN's fused attention kernels have "flash" in their
    names, so a name count reports PyTorch's cuDNN backend as "flash" (the bench did until session 17,
    when torch 2.11 on the H200 dispatched SD1.5's attention to cuDNN)."""
    used = sorted({SDPA_OPS[op] for op, n in op_counts.items() if n and op in SDPA_OPS})
    return "+".join(used) if used else "classic"


def attention_kernels_used(pipe, side: int = 512) -> dict:
    """Which SDPA backend one UNet forward actually used (the profiler's aten ops: ``sdpa_ops``), and
    its kernels by name fragment (``kernel_counts``)."""
    from torch.profiler import ProfilerActivity, profile

    lat, t, ctx = _unet_inputs(pipe, 2, side, pipe.unet.device, pipe.unet.dtype)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pipe.unet(lat, t, encoder_hidden_states=ctx, return_dict=False)
        torch.cuda.synchronize()
    counts: dict[str, int] = {}
    ops: dict[str, int] = {}
    for ev in prof.key_averages():
        if ev.key in SDPA_OPS:
            ops[ev.key] = ops.get(ev.key, 0) + ev.count
        name = ev.key.lower()
        if name.startswith("aten::"):
            continue
        for tag in ("flash", "fmha", "efficient_attention", "cudnn", "softmax", "dequant"):
            if tag in name:
                counts[tag] = counts.get(tag, 0) + ev.count
    return {"backend": attention_backend_of(ops), "sdpa_ops": ops, "kernel_counts": counts}


# --------------------------------------------------------------------------- the run
@dataclass
class Bench:
    model: str = "sd15-arch"
    recipe: Any = None
    checkpoint: str | None = None
    steps: int = 50
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    compile: bool = False
    caps_gb: tuple[float, ...] = (8.0, 4.0)
    max_res_modes: tuple[str, ...] = ("sequential", "batch2")
    out_dir: str | os.PathLike = "bench-out"
    time_budget_s: float | None = None
    image_repeats: int = 2
    schedulers: tuple[str, ...] = ()   # extra s/image rows with these samplers ("dpm", ...), same steps
    lean: bool = False                 # every configuration: lean VAE decode + VAE encoder dropped
    max_res_ff_chunk: int | None = 4096  # max-res probes: UNet feed-forwards over <= this many tokens (None: off)
    compile_guards: str = "full"       # compiled configurations: "minimal" = no per-call module-attribute guards
    only: tuple[str, ...] = ()         # run only these of the default configurations (ignored with ``configs``)
    grouped_dequant: bool = True       # packed: one dequant launch per block (quantsd.dequant_groups)
    dense_below: int = 0               # packed: UNet layers of at most this many weights kept dense (0: off)
    eager_pair_rounds: int = 9         # packed vs fp16-sdpa eager, taking turns (eager_interleaved; 0: off)
    eager_pair_calls: int = 5          # UNet steps per pipeline and round (1: the pipelines alternate step by step)
    sdpa_backend: str = "auto"         # the SDPA preference of every configuration that names none (with_sdpa_backend)
    configs: list[BenchConfig] | None = None
    log: Callable[[str], None] = print
    results: dict = field(default_factory=dict)

    def _save(self) -> None:
        write_reports(self.results, self.out_dir)

    def _build(self, cfg: BenchConfig, dev, recipe):
        pipe = build_pipeline(self.model, cfg, dev, recipe, self.checkpoint, compile_guards=self.compile_guards,
                              grouped_dequant=self.grouped_dequant, dense_below=self.dense_below)
        if self.lean:
            from ..lean_vae import drop_vae_encoder, lean_vae_decode

            lean_vae_decode(pipe.vae)
            drop_vae_encoder(pipe.vae)
            torch.cuda.empty_cache()
        return pipe

    def _image_with_scheduler(self, pipe, name: str) -> dict:
        from ..generate import _set_scheduler
        from ..schedulers import make_sync_free

        default = pipe.scheduler
        try:
            _set_scheduler(pipe, name)
            make_sync_free(pipe.scheduler)
            return {**seconds_per_image(pipe, self.steps, self.guidance, self.height, self.width, self.image_repeats),
                    "scheduler": type(pipe.scheduler).__name__}
        finally:
            pipe.scheduler = default

    def max_res_searches(self, cfg: BenchConfig, entry: dict, dev, recipe, mode: str) -> None:
        """The max-resolution searches of one configuration and CFG mode, one per cap, into
        ``entry`` (``max_res_<mode>_<cap>gb``) on a freshly built pipeline (feed-forward chunks of
        ``max_res_ff_chunk`` tokens).  Caps go in increasing order, each search starting from the
        smaller cap's answer without re-probing it: what fits under 4 GiB fits under 8 GiB."""
        try:
            pipe = self._build(cfg, dev, recipe)
            if self.max_res_ff_chunk:
                from ..ff_chunking import chunk_feed_forward

                chunk_feed_forward(pipe.unet, self.max_res_ff_chunk)
        except Exception as e:
            entry[f"max_res_{mode}"] = {"error": f"build: {type(e).__name__}: {e}"}
            return
        known = None
        for cap in sorted(self.caps_gb):
            res = self._step(entry, f"max_res_{mode}_{cap:g}gb",
                             lambda: max_resolution(pipe, cap, mode, lo=known or 256, hi=8192,
                                                    deadline=self._deadline, lo_fits=known is not None,
                                                    on_probe=lambda s, ok: self.log(
                                                        f"    {cfg.name} {mode} {cap:g} GiB: {s}² "
                                                        + ("fits" if ok else "does not fit"))))
            known = res.get("max") if isinstance(res, dict) and res.get("max") else known
        _release(pipe, cfg.compile)
        del pipe
        gc.collect()
        torch.cuda.empty_cache()

    def _step(self, entry: dict, key: str, fn: Callable[[], Any]) -> Any:
        if self._deadline is not None and time.monotonic() > self._deadline:
            entry[key] = {"skipped": "time budget exhausted"}
            self._save()
            return None
        t0 = time.monotonic()
        try:
            val = fn()
            entry[key] = val
        except torch.OutOfMemoryError as e:
            entry[key] = {"error": "OOM", "detail": str(e).splitlines()[0][:300]}
            val = None
        except Exception as e:  # record, go on
            entry[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                          "trace": traceback.format_exc(limit=4)[-1500:]}
            val = None
        entry.setdefault("seconds_spent", {})[key] = round(time.monotonic() - t0, 1)
        self.log(f"  {entry['name']}.{key}: {_short(entry[key])}")
        gc.collect()
        torch.cuda.empty_cache()
        self._save()
        return val

    def run(self) -> dict:
        if not torch.cuda.is_available():
            raise RuntimeError("quantsd bench measures CUDA speed and memory: no CUDA device here")
        from ..recipe import load_recipe
        from ..schedulers import is_sync_free

        dev = torch.device("cuda")
        self._deadline = None if self.time_budget_s is None else time.monotonic() + self.time_budget_s
        recipe = load_recipe(self.recipe) if self.recipe is not None else None
        has_q = recipe is not None or self.checkpoint is not None
        configs = self.configs or select_configs(default_configs(has_q, self.compile), self.only,
                                                 optional_configs(has_q, self.compile))
        configs = with_sdpa_backend(configs, self.sdpa_backend)
        props = torch.cuda.get_device_properties(dev)
        import triton

        self.results = {
            "meta": {"model": self.model, "recipe": getattr(recipe, "name", None), "checkpoint": self.checkpoint,
                     "steps": self.steps, "guidance": self.guidance, "height": self.height, "width": self.width,
                     "batch": 1, "compile": self.compile, "caps_gb": list(self.caps_gb), "lean": self.lean,
                     "max_res_ff_chunk": self.max_res_ff_chunk, "sync_free_scheduler": True,
                     "compile_guards": self.compile_guards, "only": list(self.only),
                     "grouped_dequant": self.grouped_dequant, "dense_below": self.dense_below,
                     "sdpa_backend": self.sdpa_backend, **_fused_meta(),
                     "gpu": props.name, "gpu_memory_bytes": props.total_memory, "torch": torch.__version__,
                     "triton": triton.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S")},
            "configs": [],
        }
        try:
            import diffusers

            self.results["meta"]["diffusers"] = diffusers.__version__
        except Exception:  # pragma: no cover
            pass
        self.results["sdpa"] = {}
        try:
            self.results["sdpa"] = sdpa_report(dev)
        except Exception as e:
            self.results["sdpa"] = {"error": f"{type(e).__name__}: {e}"}
        self._save()
        deferred = []
        self._pair_done = False
        for cfg in configs:
            if cfg.compile and not self._pair_done:   # the eager pair before the (long) compiled configurations
                self._eager_pair(configs, dev, recipe)
            entry: dict[str, Any] = {"name": cfg.name, "dtype": cfg.dtype, "attention": cfg.attention,
                                     "packed": cfg.packed, "compile": cfg.compile}
            self.results["configs"].append(entry)
            self.log(f"[{cfg.name}]")
            torch.cuda.reset_peak_memory_stats()
            holder: dict[str, Any] = {}

            def _build():
                t0 = time.monotonic()
                holder["pipe"] = self._build(cfg, dev, recipe)
                return {"ok": True, "seconds": round(time.monotonic() - t0, 1)}

            self._step(entry, "build", _build)
            pipe = holder.pop("pipe", None)
            if pipe is None:
                continue
            entry["weight_bytes"] = {m: weight_bytes(getattr(pipe, m), "cuda") for m in ("text_encoder", "unet", "vae")}
            entry["unet_weight_mib"] = round(entry["weight_bytes"]["unet"] / 2**20, 1)
            if cfg.packed:
                from ..nn import packed_modules

                entry["packed_layers"] = {m: len(packed_modules(getattr(pipe, m))) for m in ("text_encoder", "unet", "vae")}
                from ..dequant_groups import launch_counts

                entry["unet_dequant_launches"] = launch_counts(pipe.unet)
            if cfg.compile:  # first call compiles (and records the CUDA graph): time it separately
                from torch._dynamo.utils import counters

                counters["inductor"].clear()
                self._step(entry, "compile_warmup", lambda: unet_step_ms(pipe, self.height, iters=3, warmup=3))
                # did CUDA graphs really wrap the step? (a skip means launch-bound replays)
                entry["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
            self._step(entry, "unet_ms", lambda: unet_step_ms(pipe, self.height))
            if cfg.packed:    # again after forwards: eager groups merge into runs after the first one
                entry["unet_dequant_launches"] = launch_counts(pipe.unet)
            self._step(entry, "unet_ms_pipelined", lambda: unet_step_pipelined_ms(pipe, self.height))
            if cfg.attention == "sdpa" and not cfg.compile:
                self._step(entry, "attention_kernels", lambda: attention_kernels_used(pipe, self.height))
            self._step(entry, "image", lambda: {**seconds_per_image(pipe, self.steps, self.guidance, self.height,
                                                                     self.width, self.image_repeats),
                                                "scheduler": type(pipe.scheduler).__name__,
                                                "sync_free_scheduler": is_sync_free(pipe.scheduler)})
            for sched in self.schedulers:  # the same pipeline (and compiled UNet) with another sampler
                self._step(entry, f"image_{sched}", lambda: self._image_with_scheduler(pipe, sched))
            if cfg.sweep:
                sweep: dict[str, Any] = {}
                entry["sweep_unet_ms"] = sweep
                for s in cfg.sweep:
                    if self._deadline is not None and time.monotonic() > self._deadline:
                        break
                    try:
                        sweep[str(s)] = unet_step_ms(pipe, s, iters=8, warmup=2)["median"]
                    except torch.OutOfMemoryError:
                        sweep[str(s)] = "OOM"
                    except Exception as e:
                        sweep[str(s)] = f"{type(e).__name__}"
                    gc.collect()
                    torch.cuda.empty_cache()
                self._save()
            if cfg.max_res and self.caps_gb:
                deferred.append((cfg, entry))
            _release(pipe, cfg.compile)
            del pipe
            gc.collect()
            torch.cuda.empty_cache()
            entry["left_allocated_bytes"] = torch.cuda.memory_allocated(dev)
        if not self._pair_done:
            self._eager_pair(configs, dev, recipe)
        # max-resolution searches last (the most expensive), most important first
        for mode in self.max_res_modes:
            for cfg, entry in sorted(deferred, key=lambda ce: not ce[0].packed):
                if self._deadline is not None and time.monotonic() > self._deadline:
                    break
                self.max_res_searches(cfg, entry, dev, recipe, mode)
        self.results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self._save()
        return self.results

    _deadline: float | None = None
    _pair_done: bool = False

    def _eager_pair(self, configs: list[BenchConfig], dev, recipe) -> None:
        """The eager packed / fp16-sdpa comparison taking turns (:func:`eager_interleaved`) on both
        pipelines built again side by side, when both configurations were built in this run: the
        table's eager rows were measured minutes apart, and the eager target (packed no slower than
        fp16) is a ratio near 1 that host drift alone moves by more than 10%."""
        names = {e["name"] for e in self.results.get("configs", [])
                 if isinstance(e.get("build"), dict) and e["build"].get("ok")}
        if self.eager_pair_rounds <= 0 or not {"packed", "fp16-sdpa"} <= names:
            return
        self._pair_done = True
        extra = [n for n in EAGER_VARIANTS if n in names]
        cfgs = {c.name: c for c in configs if c.name in ("fp16-sdpa", "packed", *extra)}
        entry: dict[str, Any] = {"name": "eager-interleaved"}
        self.results["eager_interleaved"] = entry
        pipes: dict[str, Any] = {}

        def measure() -> dict:
            for name in ("fp16-sdpa", "packed", *extra):
                pipes[name] = self._build(cfgs[name], dev, recipe)
            rounds = eager_interleaved(pipes, self.height, self.steps, self.guidance, rounds=self.eager_pair_rounds,
                                       calls=self.eager_pair_calls)
            out = {**rounds, "unet": paired_ratio(rounds["unet_ms_rounds"], "packed", "fp16-sdpa"),
                   "image": paired_ratio(rounds["image_ms_rounds"], "packed", "fp16-sdpa")}
            for name in extra:    # each variant against fp16 and against the default packed pipeline
                out[name] = {"unet": paired_ratio(rounds["unet_ms_rounds"], name, "fp16-sdpa"),
                             "image": paired_ratio(rounds["image_ms_rounds"], name, "fp16-sdpa"),
                             "unet_vs_packed": paired_ratio(rounds["unet_ms_rounds"], name, "packed")}
            return out

        self._step(entry, "packed_vs_fp16_sdpa", measure)
        for name, pipe in pipes.items():
            _release(pipe, False)
        pipes.clear()
        gc.collect()
        torch.cuda.empty_cache()


def _short(v: Any) -> str:
    if isinstance(v, dict):
        if "error" in v or "skipped" in v:
            return str(v.get("error") or v.get("skipped"))
        if "median" in v:
            extra = f", peak {v['peak_vram_bytes'] / 2**30:.2f} GiB" if "peak_vram_bytes" in v else ""
            return f"median {v['median']:.4g}{extra}"
        if "max" in v and "cap_gb" in v:
            return f"max {v['max']} (fit {v['fit']}, fail {v['fail']}, complete {v['complete']})"
        if "backend" in v:
            return f"backend {v['backend']} {v.get('kernel_counts')}"
    return str(v)[:200]


def _fused_meta() -> dict:
    """The fused dequant-GEMM settings a run had (environment: QUANTSD_FUSED_MAX_M / _CONFIGS)."""
    from ..kernels import fused

    return {"fused_max_rows": max(fused.max_rows(), 0),
            "fused_tuned_shapes": sum(1 for _, use in fused._TUNED.values() if use)}


