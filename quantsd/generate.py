"""Text-to-image generation from any model source or quantsd checkpoint (DESIGN §7).

``generate(model, prompt, ...)`` returns a PIL image and a dict describing the run;
``save_png(image, path)`` writes it atomically (temp file beside the target, fsync, rename).
Noise comes from a CPU ``torch.Generator`` seeded with ``seed``, so a seed gives the same
initial latents on every device.
"""

from __future__ import annotations

import itertools
import os
import re
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch

__all__ = ["generate", "save_png", "resolve_device", "load_for_generation", "configure_pipeline",
           "cfg_cutoff_kwargs", "set_attention", "compile_unet", "SCHEDULERS", "OFFLOAD_MODES", "ATTENTION_MODES",
           "COMPILE_GUARDS"]

SCHEDULERS = ("default", "dpm", "ddim", "euler", "pndm")
OFFLOAD_MODES = ("model", "sequential")
ATTENTION_MODES = ("sdpa", "classic")
COMPILE_GUARDS = ("full", "minimal")


def _check_compile_guards(guards: str) -> None:
    if guards not in COMPILE_GUARDS:
        raise ValueError(f"compile guards must be one of {', '.join(COMPILE_GUARDS)}, got {guards!r}")


def compile_unet(unet, mode: str | None = "reduce-overhead", guards: str = "full", backend: str = "inductor"):
    """``torch.compile`` a UNet (or any module); returns what to call in its place.

    ``guards="minimal"``: Dynamo stops re-checking the modules' attributes on every call
    (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``; the inputs' shapes and dtypes are
    still checked).  Every UNet call otherwise spends host time on a few thousand such checks
    (SD1.5: ~0.16 ms dense, ~0.31 ms packed on a CPU host; more on the H200's), which a per-step
    sync makes part of the step time.  Dynamo keeps compiled code per code object, shared by
    every module of a class, and without module guards it could not tell two UNets apart: so
    the module's ``forward`` is replaced, in place, by a compiled method whose code object is its
    own, traced as one graph (``fullgraph=True``: a graph break would hand inner frames back to
    the shared code objects, so it is an error instead).  The module itself is returned.  Needs
    the class's own ``forward`` (no hooks, offload or an earlier compile on the instance), and is
    only valid while nothing edits the module after its first call (swap a layer, change a
    dtype: compile a fresh module); parameters may change, they are read on every call."""
    _check_compile_guards(guards)
    if guards == "full":
        return torch.compile(unet, mode=mode, backend=backend) if backend == "inductor" else \
            torch.compile(unet, backend=backend)
    if "forward" in vars(unet):
        raise ValueError("compile_unet(guards='minimal') needs the module's own forward, but this module's forward "
                         "was replaced (hooks, CPU offload, or an earlier compile): use guards='full'")
    from torch._inductor import list_mode_options

    # torch.compile takes a mode or options, not both: the mode's own options plus the filter
    use_mode = backend == "inductor" and mode not in (None, "default")
    options = dict(list_mode_options(mode)) if use_mode else {}
    options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    cls_forward = type(unet).forward

    def forward(self, *args, **kwargs):
        return cls_forward(self, *args, **kwargs)

    forward.__code__ = forward.__code__.replace(co_name=f"quantsd_compiled_forward_{next(_COMPILED)}")
    compiled = torch.compile(forward, backend=backend, options=options, fullgraph=True)
    unet.forward = types.MethodType(compiled, unet)   # a deep copy rebinds it to the copy
    return unet


_COMPILED = itertools.count()
_GUARD_TEMPORARY = re.compile(r"tmp\d*")


def drop_stale_guard_temporaries() -> int:
    """Remove the temporaries Dynamo's guard builder left in its shared scope; returns how many.

    Why: building guards evaluates chained sources with each intermediate object bound to a
    temporary name (``tmp``, ``tmp0`` ...) in ``torch._dynamo.guards``' module-wide closure-variable
    dict and deletes it afterwards -- but not when the evaluation raises, so the object stays
    referenced for the life of the process.  With ``compile_unet(guards="minimal")`` under CUDA
    graphs that held two of the tiny UNet's up blocks (58% of its weights) after release, through
    ``torch._dynamo.reset()`` (H200, torch 2.11: ``bench/compiled_release_probe.py``).  Only those
    names are touched (Dynamo's own entries all begin with underscores or are fixed names), in that
    dict and in the guard managers' copies of it; call it between compiles, not during one."""
    try:
        from torch._dynamo import guards
    except Exception:  # noqa: BLE001 -- no Dynamo, nothing left behind
        return 0
    import gc

    scopes = [getattr(guards, "_CLOSURE_VARS", None)]
    # guard managers copy that scope (stale temporaries included) into their own ``closure_vars``,
    # and one can outlive ``torch._dynamo.reset()``
    wrapper = getattr(guards, "GuardManagerWrapper", None)
    if isinstance(wrapper, type):
        # (type(), not isinstance: the heap holds dead weak proxies, which raise on any other look)
        scopes += [getattr(o, "closure_vars", None) for o in gc.get_objects() if issubclass(type(o), wrapper)]
    dropped = 0
    for scope in scopes:
        if isinstance(scope, dict):
            stale = [k for k in scope if isinstance(k, str) and _GUARD_TEMPORARY.fullmatch(k)]
            for k in stale:
                del scope[k]
            dropped += len(stale)
    return dropped


def set_attention(module, mode: str = "sdpa") -> None:
    """``"sdpa"``: diffusers' AttnProcessor2_0 (F.scaled_dot_product_attention; flash on CUDA in
    fp16/bf16 where the shapes allow); ``"classic"``: AttnProcessor (explicit softmax(QK^T)V, the
    paper's fp32 baseline).  Applies to a UNet or VAE (anything with ``set_attn_processor``)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {mode!r}")
    if hasattr(module, "set_attn_processor"):
        module.set_attn_processor(AttnProcessor2_0() if mode == "sdpa" else AttnProcessor())


def _set_scheduler(pipe, name: str) -> None:
    import diffusers

    classes = {"dpm": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler",
               "euler": "EulerDiscreteScheduler", "pndm": "PNDMScheduler"}
    if name in (None, "default"):
        return
    if name not in classes:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    pipe.scheduler = getattr(diffusers, classes[name]).from_config(pipe.scheduler.config)


def configure_pipeline(pipe, *, device=None, compile: bool = False, compile_mode: str = "reduce-overhead",
                       channels_last: bool = False, scheduler: str | None = None, attention: str | None = None,
                       attention_slicing: bool = False, vae_tiling: bool = False, vae_slicing: bool = False,
                       offload: str | None = None, tiny_vae: str | os.PathLike | None = None,
                       lean_vae: bool = False, drop_vae_encoder: bool = False, ff_chunk: int | None = None,
                       sync_free_scheduler: bool = True, compile_guards: str = "full",
                       grouped_dequant: bool = True, dense_below: int = 0, prefetch_weights: bool = False,
                       eager_prehook: bool | None = None, group_max_bytes: int | None = None,
                       eager_runs: bool | None = None, direct_attention: bool = True,
                       sdpa_backend: str | None = "auto", eager_armed_calls: bool | None = None):
    """Apply generation options to a loaded pipeline (in place; returns it).

    ``lean_vae``: the VAE decoder's resnet blocks run SiLU and the residual add in place on
    tensors they own, and its large convolutions over bands of rows (:mod:`quantsd.lean_vae`): a lower
    decode peak, the same image up to fp16 rounding in the banded convolutions.
    ``drop_vae_encoder``: free the VAE encoder (unused from text; SD1.5: 68 MB fp16); the pipeline
    can then only generate from text.
    ``ff_chunk``: run the UNet's feed-forwards over at most this many tokens at a time
    (:mod:`quantsd.ff_chunking`; the high-resolution memory peak; no effect at or below it).
    ``sync_free_scheduler`` (default on): PNDM and DDIM read timestep values from a host copy
    instead of the GPU (:mod:`quantsd.schedulers`; same bits, no device sync per step).
    ``compile_guards``: "minimal" compiles with fewer per-call Dynamo checks (:func:`compile_unet`).
    ``grouped_dequant`` (default on; not offloaded): the UNet's packed layers of one block are
    dequantized by one kernel launch, eager and compiled (:mod:`quantsd.dequant_groups`; same
    weights; less host time eager, fewer and larger kernels in a compiled graph).  Eager UNets group
    up to 96 MiB per launch, compiled ones 32 MiB (:func:`quantsd.dequant_groups.group_pipeline`).
    ``dense_below`` (default 0: off): the UNet's packed layers of at most that many weights are
    decoded once and kept dense (:func:`quantsd.nn.densify_small_layers`; same weights, fewer
    dequant launches per step, a few MiB more resident).
    ``prefetch_weights`` (with ``compile``): the compiled UNet decodes its packed weights ahead, on a
    second CUDA stream, while earlier layers compute (:mod:`quantsd.prefetch`; same weights).
    ``eager_prehook`` (eager, grouped; None: on unless ``QUANTSD_EAGER_PREHOOK=0``): each block's
    packed weights are decoded as the block's forward begins, into a reused buffer while autograd
    is off, and handed over without per-layer checks (:func:`quantsd.dequant_groups.group_dequant`'s
    ``prehook``; same weights, less host time per eager step).  ``eager_runs`` (None: on unless
    ``QUANTSD_EAGER_RUNS=0``): those groups merged in execution order after the first forward
    (:mod:`quantsd.eager_runs`; fewer launches and arms: SD1.5 18 -> 5 a step, the eager step 0.985x
    the time of one group per block on the H200, same peak).
    ``eager_armed_calls`` (None: on unless ``QUANTSD_EAGER_ARMED_CALLS=0``): an armed packed layer's
    eager call goes straight to its op, skipping ``nn.Module.__call__`` and its forward where they
    would add nothing (:func:`quantsd.nn.set_armed_calls`; same outputs; hooks still honoured).
    ``direct_attention`` (default on; eager only): the UNet's and the VAE's diffusers ``Attention``
    modules call their processor directly when no extra keyword arguments come, skipping diffusers'
    ``inspect.signature`` on every call (:mod:`quantsd.attention_calls`; same outputs; without it
    the eager SD1.5 step took 1.10x the time on the H200, session 18).
    ``sdpa_backend`` ("flash", "cudnn", "efficient", "math"; default "auto": FlashAttention for an
    eager component computing in fp16/bf16 on CUDA, PyTorch's choice for the others -- a compiled
    UNet among them: under CUDA graphs cuDNN's kernel is the faster one on the H200; None or
    "pytorch": PyTorch's choice, which on an H200 with torch 2.11 is cuDNN's fused attention): the
    text encoder's, UNet's and VAE encoder's and decoder's ``F.scaled_dot_product_attention`` calls
    prefer that kernel, falling back to the others where it cannot run (:mod:`quantsd.sdpa_backend`;
    "auto" is resolved per component when this runs, so a component offloaded to the CPU gets
    PyTorch's).
    ``group_max_bytes`` (grouped): the cap on a group's dense weights (None: the environment's
    ``QUANTSD_GROUP_MAX_MIB``, else eager 384 MiB on a device the process may use 16 GiB of and 96 MiB
    below (:func:`quantsd.dequant_groups.eager_max_bytes`), 32 MiB compiled); larger eager groups mean
    fewer launches and blocks to arm per step and a larger reused buffer held during each UNet call.

    Order matters: the tiny VAE and memory format first, then offload hooks, then torch.compile
    of the UNet (``compile_mode`` "reduce-overhead" = CUDA graphs where shapes are static).
    """
    _check_compile_guards(compile_guards)   # before anything changes
    if sdpa_backend is not None:
        from .sdpa_backend import check_sdpa_backend

        check_sdpa_backend(sdpa_backend)
    if prefetch_weights and not compile:
        raise ValueError("weight prefetch acts in compiled forwards: add compile=True (--compile)")
    dev = resolve_device(device) if device is not None else pipe.unet.device
    if tiny_vae is not None:
        from diffusers import AutoencoderTiny

        path = Path(tiny_vae).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--tiny-vae {str(path)!r} is not a directory (an AutoencoderTiny folder with "
                                    "config.json and weights)")
        vae = AutoencoderTiny.from_pretrained(str(path), local_files_only=True)
        pipe.register_modules(vae=vae.to(pipe.unet.device, pipe.unet.dtype))
    _set_scheduler(pipe, scheduler)
    if sync_free_scheduler:
        from .schedulers import make_sync_free

        make_sync_free(pipe.scheduler)
    if attention is not None:
        set_attention(pipe.unet, attention)
        set_attention(pipe.vae, attention)
    if attention_slicing:
        pipe.enable_attention_slicing()
    if direct_attention and not compile:   # (before offload and grouping: their forwards wrap this one)
        from .attention_calls import direct_attention_calls

        for name in ("unet", "vae"):
            component = getattr(pipe, name, None)
            if isinstance(component, torch.nn.Module):
                direct_attention_calls(component)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if vae_slicing:
        pipe.vae.enable_slicing()
    if lean_vae:
        from .lean_vae import lean_vae_decode

        lean_vae_decode(pipe.vae)
    if drop_vae_encoder:
        from .lean_vae import drop_vae_encoder as _drop

        _drop(pipe.vae)
    if ff_chunk is not None:
        from .ff_chunking import chunk_feed_forward

        chunk_feed_forward(pipe.unet, ff_chunk)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if dense_below:   # before offload hooks: they must see the dense layers (and their biases)
        from .nn import densify_small_layers

        densify_small_layers(pipe.unet, dense_below)
    if offload is not None:
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
        if dev.type != "cuda":
            raise ValueError("CPU offload needs a CUDA device to offload to")
        if offload == "model":
            pipe.enable_model_cpu_offload(device=dev)
        else:
            pipe.enable_sequential_cpu_offload(device=dev)
    if grouped_dequant and offload is None:
        from .dequant_groups import group_pipeline

        group_pipeline(pipe, max_bytes=group_max_bytes, compiled=compile, prehook=eager_prehook, runs=eager_runs,
                       armed_calls=eager_armed_calls)
    if compile:
        if prefetch_weights:
            from .prefetch import enable_weight_prefetch

            enable_weight_prefetch(pipe.unet)
        pipe.unet = compile_unet(pipe.unet, compile_mode, compile_guards)
    # last: around a compiled UNet, so its graph is traced under the choice
    _set_sdpa_backends(pipe, sdpa_backend, compiled_unet=compile)
    return pipe


def _set_sdpa_backends(pipe, backend: str | None, compiled_unet: bool = False) -> None:
    """The SDPA backend preference on every component that runs attention (None also takes back an
    earlier one; "auto" resolved per component, the UNet as compiled when ``compiled_unet``).  The
    VAE's goes on its encoder and decoder: a pipeline calls ``vae.decode``, never ``vae.forward``."""
    from .sdpa_backend import set_sdpa_backend

    vae = getattr(pipe, "vae", None)
    parts = [getattr(pipe, "text_encoder", None), pipe.unet,
             *([getattr(vae, n, None) for n in ("encoder", "decoder")] if vae is not None else [])]
    for component in parts:
        if isinstance(component, torch.nn.Module):
            set_sdpa_backend(component, backend, compiled=compiled_unet and component is pipe.unet)


def cfg_cutoff_kwargs(steps: int, cutoff: float | None) -> dict:
    """Pipeline-call kwargs for dynamic CFG: classifier-free guidance for the first
    ``ceil(cutoff * steps)`` steps, then the unconditional half is dropped (batch 1, guidance
    off) through diffusers' ``callback_on_step_end``.  ``cutoff`` None or >= 1: CFG throughout;
    0: no CFG at all (``{"guidance_scale": 1.0}``)."""
    import math

    if cutoff is None or cutoff >= 1:
        return {}
    if cutoff < 0:
        raise ValueError(f"cfg cutoff must be in [0, 1], got {cutoff}")
    n_cfg = math.ceil(cutoff * steps - 1e-9)
    if n_cfg <= 0:
        return {"guidance_scale": 1.0}
    if n_cfg >= steps:
        return {}

    def drop_cfg(pipe, step_index, timestep, callback_kwargs):
        if step_index == n_cfg - 1 and pipe.do_classifier_free_guidance:
            callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return callback_kwargs

    return {"callback_on_step_end": drop_cfg, "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _is_checkpoint(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and (Path(model).expanduser() / "quantsd.json").is_file()


def load_for_generation(model: Any, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                        weights: str | None = None):
    """A pipeline ready to generate: quantsd checkpoints go through ``load_checkpoint`` (so the
    packed/dequantize choice sees the device); everything else through ``load_pipeline``."""
    from .models import _parse_dtype, load_pipeline

    dev = resolve_device(device)
    if isinstance(dtype, str):
        dtype = _parse_dtype(dtype)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if not isinstance(model, (str, os.PathLike)):  # a pipeline object
        if weights is not None:
            raise ValueError("weights= applies only when loading a quantsd checkpoint")
        return model.to(dev, dtype)
    if _is_checkpoint(model):
        from .io import load_checkpoint

        return load_checkpoint(Path(model).expanduser(), dtype=dtype, device=dev, weights=weights)
    if weights is not None:
        raise ValueError(f"--weights applies only to quantsd checkpoints (a folder with quantsd.json); "
                         f"{str(model)!r} is not one")
    return load_pipeline(model, dtype=dtype, device=dev)


def generate(
    model: Any,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    weights: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    compile: bool = False,
    channels_last: bool = False,
    scheduler: str | None = None,
    cfg_cutoff: float | None = None,
    attention: str | None = None,
    attention_slicing: bool = False,
    vae_tiling: bool = False,
    vae_slicing: bool = False,
    offload: str | None = None,
    tiny_vae: str | os.PathLike | None = None,
    lean_vae: bool = False,
    drop_vae_encoder: bool = False,
    ff_chunk: int | None = None,
    sync_free_scheduler: bool = True,
    compile_guards: str = "full",
    grouped_dequant: bool = True,
    dense_below: int = 0,
    prefetch_weights: bool = False,
    sdpa_backend: str | None = "auto",
):
    """Generate one image; returns (PIL.Image, info dict).

    Generation options (see :func:`configure_pipeline`): ``compile`` (torch.compile of the UNet,
    mode reduce-overhead), ``channels_last``, ``scheduler`` ("dpm" = DPMSolverMultistep, ...),
    ``cfg_cutoff`` (dynamic CFG: guidance only for that fraction of the steps), ``attention``
    ("sdpa" or "classic"), ``attention_slicing``, ``vae_tiling``, ``vae_slicing``, ``offload``
    ("model" / "sequential" CPU offload), ``tiny_vae`` (an AutoencoderTiny directory) and
    ``lean_vae`` (in-place SiLU/residual and banded convolutions in the VAE decoder: lower decode
    peak, same image to fp16 rounding) and
    ``drop_vae_encoder`` (free the VAE encoder, unused when generating from text) and ``ff_chunk``
    (feed-forwards over at most this many tokens at a time: large images in less memory);
    ``sync_free_scheduler`` (default True) lets PNDM/DDIM run without a device sync per step;
    ``compile_guards="minimal"`` (with ``compile``) trades Dynamo's per-call module checks for less
    host time per step; ``grouped_dequant`` (default True) dequantizes the packed layers of a block
    in one launch in eager mode; ``dense_below`` keeps the UNet's smallest packed layers dense;
    ``prefetch_weights`` (with ``compile``) decodes packed weights ahead on a second CUDA stream;
    ``sdpa_backend`` ("auto": FlashAttention for eager fp16/bf16 on CUDA; "pytorch"/None: PyTorch's choice;
    "flash", "cudnn", "efficient", "math") the fused attention kernel preferred.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if offload is not None:
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
        target = resolve_device(device)
        if target.type != "cuda":
            raise ValueError("CPU offload needs a CUDA device to offload to")
        if dtype is None:
            dtype = torch.float16
        if weights is None and _is_checkpoint(model):
            weights = "packed"
        pipe = load_for_generation(model, "cpu", dtype, weights)  # the offload hooks move modules
    else:
        target = None
        pipe = load_for_generation(model, device, dtype, weights)
    configure_pipeline(pipe, device=target, compile=compile, channels_last=channels_last, scheduler=scheduler,
                       attention=attention, attention_slicing=attention_slicing, vae_tiling=vae_tiling,
                       vae_slicing=vae_slicing, offload=offload, tiny_vae=tiny_vae, lean_vae=lean_vae,
                       drop_vae_encoder=drop_vae_encoder, ff_chunk=ff_chunk,
                       sync_free_scheduler=sync_free_scheduler, compile_guards=compile_guards,
                       grouped_dequant=grouped_dequant, dense_below=dense_below, prefetch_weights=prefetch_weights,
                       sdpa_backend=sdpa_backend)
    scale = getattr(pipe, "vae_scale_factor", 8)
    default = int(pipe.unet.config.sample_size) * scale
    height = height or default
    width = width or default
    if height % 8 or width % 8:
        raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    t0 = time.perf_counter()
    from .dequant_groups import trusted_weights
    from .sdpa_backend import sdpa_backend_of

    # inside the call the weights are not edited: eager groups check them once, not every step
    with torch.inference_mode(), trusted_weights(pipe.unet):
        kw = {"guidance_scale": guidance, **cfg_cutoff_kwargs(steps, cfg_cutoff)}
        out = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, height=height, width=width,
                   generator=gen, output_type="pil", **kw)
    elapsed = time.perf_counter() - t0
    ck = getattr(pipe, "quantsd_checkpoint", None)
    info = {"model": str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
            "prompt": prompt, "negative_prompt": negative_prompt, "seed": int(seed), "steps": steps,
            "guidance": guidance, "height": height, "width": width, "device": str(pipe.device),
            "dtype": str(pipe.unet.dtype).replace("torch.", ""),
            "weights": ck["weights"] if ck else "dense", "seconds": round(elapsed, 3),
            "scheduler": type(pipe.scheduler).__name__, "cfg_cutoff": cfg_cutoff, "compile": compile,
            "channels_last": channels_last, "offload": offload, "ff_chunk": ff_chunk,
            "compile_guards": compile_guards if compile else None,
            "dequant_groups": _count_groups(pipe), "dense_below": dense_below or None,
            "prefetch_weights": prefetch_weights, "tiny_vae": None if tiny_vae is None else str(tiny_vae),
            "sdpa_backend": sdpa_backend_of(pipe.unet)}
    return out.images[0], info


def _count_groups(pipe) -> int:
    """Grouped dequant launches set up on the pipeline's UNet (quantsd.dequant_groups)."""
    from .dequant_groups import launch_counts

    unet = getattr(pipe, "unet", None)
    return 0 if unet is None else launch_counts(unet)["groups"]


def save_png(image, path: str | os.PathLike, info: dict | None = None) -> Path:
    """Write ``image`` as PNG atomically (never a half-written file at ``path``)."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = PngInfo()
    for k, v in (info or {}).items():
        if v is not None:
            meta.add_text(f"quantsd:{k}", str(v))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=meta)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
