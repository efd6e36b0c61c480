"""The bench's configurations: what each row measures (weights, attention, execution mode), the
default list, the variants run only when named, and ``--only`` selection."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

__all__ = ["BenchConfig", "EAGER_VARIANTS", "default_configs", "optional_configs", "select_configs",
           "with_sdpa_backend"]


@dataclass
class BenchConfig:
    name: str
    dtype: str = "float16"           # compute dtype
    attention: str = "sdpa"          # sdpa | classic
    packed: bool = False             # quantize with the recipe, packed modules
    compile: bool = False            # torch.compile(unet, mode="reduce-overhead")
    sweep: tuple[int, ...] = (256, 512, 768, 1024)
    max_res: bool = False            # run the VRAM-cap search for this config
    prefetch: bool = False           # compiled packed: decode weights ahead on a side stream (quantsd.prefetch)
    grouped: bool = True             # packed: one dequant launch per group of layers (quantsd.dequant_groups)
    channels_last: bool = False      # parameters in channels-last memory format (configure_pipeline's channels_last)
    prehook: bool | None = None      # eager packed: prehook groups (None: QUANTSD_EAGER_PREHOOK, on unless 0)
    runs: bool | None = None         # eager packed: groups merged in execution order (None: unless QUANTSD_EAGER_RUNS=0)
    group_max_mib: float | None = None   # packed, grouped: group cap (None: QUANTSD_GROUP_MAX_MIB, else the default)
    direct_attention: bool = True    # eager: attentions call their processor directly (quantsd.attention_calls)
    sdpa_backend: str | None = "auto"   # the SDPA kernel preferred (quantsd.sdpa_backend; "auto": configure_pipeline's
                                        # default, FlashAttention for eager fp16 on CUDA; "pytorch": the dispatcher's)
    armed_calls: bool | None = None  # eager packed: armed layers' calls straight to their op (None: unless
                                     # QUANTSD_EAGER_ARMED_CALLS=0; quantsd.nn.set_armed_calls)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]


def select_configs(configs: list[BenchConfig], names: Sequence[str] | None,
                   optional: Sequence[BenchConfig] = ()) -> list[BenchConfig]:
    """``configs`` restricted to ``names`` (None: all of ``configs``), in run order; ``optional``
    configurations (:func:`optional_configs`) run only when named, after the others of their
    execution mode (eager ones before every compiled one: the eager pair, which runs before the
    first compiled configuration, can then include them).  Unknown names are an error that lists
    the valid ones."""
    if not names:
        return configs
    pool = list(configs) + list(optional)
    known = [c.name for c in pool]
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown configuration(s) {bad}; this run has {', '.join(known)}")
    return sorted((c for c in pool if c.name in names), key=lambda c: c.compile)


def default_configs(recipe: bool, compile: bool) -> list[BenchConfig]:
    """The baselines (always) + the quantized model (with a recipe/checkpoint); order = run order."""
    cfgs = [BenchConfig("fp16-sdpa", max_res=True)]
    if recipe:
        cfgs.append(BenchConfig("packed", packed=True, max_res=True))
    cfgs.append(BenchConfig("fp32-classic", dtype="float32", attention="classic", sweep=(256, 512, 768)))
    if compile:
        cfgs.append(BenchConfig("fp16-sdpa-compiled", compile=True, sweep=()))
        cfgs.append(BenchConfig("fp16-sdpa-compiled-cl", compile=True, channels_last=True, sweep=()))
        if recipe:
            cfgs.append(BenchConfig("packed-compiled", packed=True, compile=True, sweep=()))
    return cfgs


# optional eager packed configurations that join the eager pair's turns (compared with fp16-sdpa and packed)
EAGER_VARIANTS = ("fp16-sdpa-inspect", "fp16-sdpa-pytorch", "packed-pytorch", "packed-modcall", "packed-checked",
                  "packed-roots",
                  "packed-groups-512", "packed-groups-384", "packed-groups-256", "packed-groups-96")


def optional_configs(recipe: bool, compile: bool) -> list[BenchConfig]:
    """Variants of the packed configurations that run only when named (``--only``): eager with the
    checked groups that were the default until the prehook groups (``packed-checked``), with one
    prehook group per block instead of the blocks merged in execution order after the first forward
    (``packed-roots``, the default until session 17; :mod:`quantsd.eager_runs`: SD1.5 18 groups
    instead of 5 at 384 MiB), and with
    eager groups capped at 512, 384, 256 or 96 MiB whatever the device (``packed-groups-512`` ...
    ``packed-groups-96``; the default takes 384 MiB on a device of 16 GiB or more, 96 below:
    :func:`quantsd.dequant_groups.eager_max_bytes`; SD1.5's UNet then has 12, 18, 25 or 34 blocks of
    their own -- one group each before the runs merge them -- the largest holding 492, 309, 185 or 93 MiB); all join the eager pair's turns; compiled with
    one dequant launch per layer instead of per group (what grouping buys), and with weight prefetch
    (:mod:`quantsd.prefetch`, measured slower so far).  And the dense eager baseline with diffusers' own
    attention forward (``fp16-sdpa-inspect``: ``inspect.signature`` on every attention call, what
    :mod:`quantsd.attention_calls` removes from every eager configuration); it joins the eager pair's
    turns too, so its ratio to ``fp16-sdpa`` is what the direct calls save.  And the other SDPA
    backend of each mode (:mod:`quantsd.sdpa_backend`; "auto" prefers FlashAttention eager and leaves
    compiled UNets to PyTorch, which on the H200 with torch 2.11 picks cuDNN's attention): eager
    with PyTorch's choice (``fp16-sdpa-pytorch``, ``packed-pytorch``), compiled with FlashAttention
    preferred (``fp16-sdpa-compiled-flash``, ``packed-compiled-flash``).  And eager packed with its
    armed layers called through ``nn.Module.__call__`` and their forward (``packed-modcall``: without
    :func:`quantsd.nn.set_armed_calls`, the call path until session 18)."""
    if not recipe:
        return []
    eager = [BenchConfig("fp16-sdpa-inspect", direct_attention=False, sweep=()),
             BenchConfig("fp16-sdpa-pytorch", sdpa_backend="pytorch", sweep=()),
             BenchConfig("packed-pytorch", packed=True, sdpa_backend="pytorch", sweep=()),
             BenchConfig("packed-modcall", packed=True, armed_calls=False, sweep=()),
             BenchConfig("packed-checked", packed=True, prehook=False, sweep=()),
             BenchConfig("packed-roots", packed=True, runs=False, sweep=()),
             BenchConfig("packed-groups-512", packed=True, group_max_mib=512, sweep=()),
             BenchConfig("packed-groups-384", packed=True, group_max_mib=384, sweep=()),
             BenchConfig("packed-groups-256", packed=True, group_max_mib=256, sweep=()),
             BenchConfig("packed-groups-96", packed=True, group_max_mib=96, sweep=())]
    if not compile:
        return eager
    return eager + [BenchConfig("fp16-sdpa-compiled-flash", compile=True, sdpa_backend="flash", sweep=()),
                    BenchConfig("packed-compiled-flash", packed=True, compile=True, sdpa_backend="flash", sweep=()),
                    BenchConfig("packed-compiled-per-layer", packed=True, compile=True, grouped=False, sweep=()),
                    BenchConfig("packed-compiled-prefetch", packed=True, compile=True, prefetch=True, sweep=())]


def with_sdpa_backend(configs: list[BenchConfig], backend: str) -> list[BenchConfig]:
    """``configs`` with every configuration that follows the default SDPA choice ("auto") set to
    ``backend`` instead (``quantsd bench --sdpa-backend``: another card may favour another kernel);
    a variant that names its own backend keeps it, so it still measures the other choice."""
    from ..sdpa_backend import check_sdpa_backend

    check_sdpa_backend(backend)
    return [replace(c, sdpa_backend=backend) if c.sdpa_backend == "auto" else c for c in configs]
