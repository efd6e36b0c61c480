"""``quantsd.eval.evaluate``: generate, extract features, score, report (DESIGN §1 eval/).

Stages (each resumable, each sharded over processes under ``accelerate launch`` / ``torchrun``):

1. validate everything cheap first: prompts, real images (every chosen file opened), KID/IS
   sizes, the Inception weights, and that the evaluated model loads;
2. generate the evaluated model's images into ``OUT/generated`` (PNG + final latents per prompt
   index, written as they come); the initial noise of prompt ``i`` comes from a CPU generator
   seeded with ``(seed << 32) + i``, so it does not depend on batching or sharding;
3. the reference (full-precision) model's images on the same prompts and noise, cached under
   ``--cache-dir`` keyed by everything that determines them (model files, prompts, seed, steps,
   guidance, resolution, dtype, batch size, device type) - evaluating several checkpoints against
   one reference generates it once;
4. Inception features of generated, reference and real images (real features cached likewise);
5. rank 0: FID / KID / IS vs real, rFID / rKID vs reference (torchmetrics), the numpy/scipy FID
   cross-check, latent MSE, PSNR, fixture attribute adherence -> ``results.json`` +
   ``report.md`` (+ a row merged into ``--table``).

If a metric cannot be computed, everything already computed stays on disk and the results
written so far are kept (``results.json`` with ``"complete": false``) before the error is raised.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..fileio import atomic_write_text
from . import metrics as M
from .data import (EvalInputError, PromptSet, RealImages, directory_real_images, fixture_real_images, load_prompts,
                   preprocess_generated)
from .dist import Dist, init_dist
from .features import FeatureExtractor, load_extractor
from .store import FeatureCache, Store, key_hash


class EvalError(RuntimeError):
    """A metric could not be computed; finished work is on disk and the message says where."""


@dataclass
class EvalConfig:
    model: str
    reference: str = "fixture"
    prompts: str | None = None
    num_prompts: int = 4096
    real_images: str | None = None
    inception: str | None = None
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    batch_size: int = 16
    device: str | None = None
    dtype: str = "float32"
    height: int | None = None
    width: int | None = None
    eval_size: int | None = None        # real-image protocol size (256 for COCO; None: native for the fixture)
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    is_splits: int = 10
    out: str = "eval-out"
    cache_dir: str | None = None
    label: str | None = None
    weights: str | None = None          # quantsd checkpoints: packed | dequantize
    overwrite: bool = False
    features_only: bool = False         # never generate: score images already in -o / the cache (made elsewhere)
    progress: bool = True
    table: str | None = None

    def fixture_mode(self) -> bool:
        return self.prompts in ("fixture", "fixture-train") or (self.prompts is None and self.reference == "fixture")


def default_cache_dir() -> Path:
    env = os.environ.get("QUANTSD_CACHE")
    if env:
        return Path(env) / "eval"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantsd" / "eval"


# --------------------------------------------------------------------------- model identity / size
def _file_digest(p: Path) -> str:
    h = hashlib.sha256()
    size = p.stat().st_size
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read())
    return f"{size}:{h.hexdigest()[:16]}"


# Library-version stamps that save_pretrained writes into configs: they change no computed value,
# and two machines with different transformers/diffusers versions must agree on a checkpoint's
# identity (images made on a GPU machine are scored where the Inception weights are).
_VERSION_STAMPS = frozenset({"_diffusers_version", "transformers_version", "_name_or_path", "_commit_hash"})


def _config_digest(p: Path) -> str:
    """sha256 of a JSON file's content without library-version stamps (raw bytes if not JSON)."""
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return _file_digest(p)
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in _VERSION_STAMPS}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _checkpoint_identity(d: Path) -> str:
    """The weights' sha256 (from the manifest), the recipe hash and every config's content minus
    version stamps: equal for byte-identical exports made under different library versions."""
    man = json.loads((d / "quantsd.json").read_text())
    files = {}
    for rel, info in sorted((man.get("files") or {}).items()):
        files[rel] = _config_digest(d / rel) if rel.endswith(".json") and (d / rel).is_file() else info.get("sha256")
    key = {"format_version": man.get("format_version"), "recipe_sha256": man.get("recipe_sha256"),
           "dense_dtype": man.get("dense_dtype"), "files": files,
           "components": {c: info.get("sha256") for c, info in sorted((man.get("components") or {}).items())}}
    return "ckpt:" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def model_identity(model: str) -> str:
    """What determines a model's outputs: built-in name + quantsd version; a quantsd checkpoint's
    weights and recipe hashes (from its manifest) and configs without version stamps; the files of
    any other folder (name, size, sha256 of the first and last MiB of each); or a hub id."""
    from ..models import FIXTURE_DIR

    name = str(model)
    if name in ("tiny", "sd15-arch"):
        return f"{name}:quantsd-{__version__}"
    d = FIXTURE_DIR if name == "fixture" else Path(name).expanduser()
    if (d / "quantsd.json").is_file():
        try:
            return _checkpoint_identity(d)
        except (OSError, ValueError, AttributeError):  # unreadable manifest: loading will say why
            return "ckpt:" + hashlib.sha256((d / "quantsd.json").read_bytes()).hexdigest()[:20]
    if d.is_dir():
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        h = hashlib.sha256("\n".join(f"{p.relative_to(d)}={_file_digest(p)}" for p in files).encode())
        return f"dir:{h.hexdigest()[:20]}"
    return f"hub:{name}"


def model_info(model: str, pipe=None, dtype: str = "float32") -> dict:
    """Packed size and description. Checkpoints: the manifest's weight files (what is stored);
    dense models: the text encoder + UNet + VAE values at the evaluated dtype (fp32: 4 bytes)."""
    from ..models import FIXTURE_DIR

    name = str(model)
    d = FIXTURE_DIR if name == "fixture" else Path(name).expanduser()
    if (d / "quantsd.json").is_file():
        from ..io import read_manifest

        try:
            man = read_manifest(d)
        except Exception as exc:  # unknown format version, corrupt JSON, ...
            raise EvalInputError(f"model {name!r} does not load: {exc}") from exc
        layers = man.get("layers", [])
        bits = sorted({int(l["bits"]) for l in layers})
        methods = sorted({l["method"] for l in layers})
        return {"kind": "quantsd-checkpoint", "packed_bytes": int(man["totals"]["weights_bytes"]),
                "recipe": (man.get("recipe") or {}).get("name"), "recipe_sha256": man.get("recipe_sha256"),
                "source": man.get("source"), "dense_dtype": man.get("dense_dtype"), "bits": bits, "methods": methods,
                "quantized_layers": man["totals"].get("quantized_layers")}
    width = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    if d.is_dir() and (d / "model_index.json").is_file():
        from ..io import read_safetensors_header

        files = [p for c in ("text_encoder", "unet", "vae") for p in (d / c).glob("*.safetensors")]
        numel = sum(t.numel for p in files for t in read_safetensors_header(p)[1].values())
        return {"kind": "dense", "packed_bytes": numel * width, "params": numel, "recipe": None,
                "files_bytes": sum(p.stat().st_size for p in files),
                "note": f"text encoder + UNet + VAE: {numel:,} values x {width} bytes ({dtype}, as evaluated)"}
    if pipe is None:
        from ..models import load_pipeline

        pipe = load_pipeline(name, device="meta" if name == "sd15-arch" else None)
    numel = sum(p.numel() for m in (pipe.text_encoder, pipe.unet, pipe.vae) for p in m.parameters())
    return {"kind": "dense", "packed_bytes": int(numel * width), "params": int(numel), "recipe": None,
            "note": f"text encoder + UNet + VAE: {numel:,} parameters x {width} bytes ({dtype}, as evaluated)"}


def default_label(model: str, reference: str, info: dict) -> str:
    if str(model) == str(reference):
        return "fp32"
    if info.get("recipe"):
        return str(info["recipe"])
    return Path(str(model)).name or str(model)


# --------------------------------------------------------------------------- generation
def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, dynamic_ncols=True, leave=False)


def initial_noise(index: int, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed((int(seed) << 32) + int(index))
    return torch.randn(shape, generator=g)


def load_eval_pipeline(model: str, device: torch.device, dtype: str, weights: str | None):
    from ..generate import load_for_generation

    try:
        pipe = load_for_generation(model, device=device, dtype=dtype, weights=weights)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise EvalInputError(f"model {str(model)!r} does not load: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_set(store: Store, load_pipe, prompts: list[str], cfg: EvalConfig, dist: Dist, desc: str,
                 show: bool) -> int:
    """Generate every missing index of this rank's batches; returns how many were generated."""
    mine = [b for b in dist.batches(len(prompts), cfg.batch_size) if not all(store.done(i) for i in b)]
    if not mine:
        return 0
    if cfg.features_only:
        missing = [i for b in mine for i in b if not store.done(i)]
        raise EvalInputError(f"--features-only, but {len(missing)} image(s) are missing in {store.root} "
                             f"(first: {missing[:5]}); run without --features-only to generate them")
    pipe = load_pipe()
    scale = pipe.vae_scale_factor
    h = cfg.height or int(pipe.unet.config.sample_size) * scale
    w = cfg.width or int(pipe.unet.config.sample_size) * scale
    shape = (int(pipe.unet.config.in_channels), h // scale, w // scale)
    dev, dt = pipe.unet.device, pipe.unet.dtype
    made = 0
    with _progress(sum(len(b) for b in mine), desc, show) as bar:
        for b in mine:
            noise = torch.stack([initial_noise(i, cfg.seed, shape) for i in b]).to(dev, dt)
            lat = pipe(prompt=[prompts[i] for i in b], height=h, width=w, num_inference_steps=cfg.steps,
                       guidance_scale=cfg.guidance, latents=noise, output_type="latent").images
            img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
            img = ((img.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            lat = lat.float().cpu().numpy()
            for k, i in enumerate(b):
                if not store.done(i):
                    made += 1
                store.write(i, img[k], lat[k], {"index": i, "prompt": prompts[i], "seed": cfg.seed})
            bar.update(len(b))
    del pipe
    return made


def extract_set(cache: FeatureCache, load_images, n: int, extractor: FeatureExtractor, cfg: EvalConfig, dist: Dist,
                desc: str, show: bool) -> None:
    mine = [(k, b) for k, b in enumerate(_all_batches(n, cfg.batch_size)) if k % dist.world == dist.rank
            and not cache.has(k)]
    with _progress(sum(len(b) for _, b in mine), desc, show) as bar:
        for k, b in mine:
            imgs = load_images(b)
            x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).contiguous()
            f = extractor(x)
            cache.write(k, b, f["pool"].numpy(), None if f["logits"] is None else f["logits"].numpy())
            bar.update(len(b))


def _all_batches(n: int, bs: int) -> list[list[int]]:
    return [list(range(i, min(n, i + bs))) for i in range(0, n, bs)]


# --------------------------------------------------------------------------- the run
@dataclass
class _Plan:
    prompts: PromptSet
    real: RealImages
    extractor: FeatureExtractor | None
    gen_key: dict
    ref_key: dict
    same_as_reference: bool
    info: dict
    label: str
    eval_size: int | None
    device: torch.device
    cache: Path
    notes: list[str] = field(default_factory=list)


def _plan(cfg: EvalConfig, dist: Dist) -> _Plan:
    fixture = cfg.fixture_mode()
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed, fixture=fixture)
    n = len(prompts.prompts)
    if fixture:
        if cfg.real_images:
            raise EvalInputError("fixture prompts use procedural real images; drop --real-images")
        size = cfg.height or cfg.width
        if size is None:
            from ..models import FIXTURE_DIR

            ref_dir = FIXTURE_DIR if cfg.reference == "fixture" else Path(cfg.reference)
            try:
                ucfg = json.loads((ref_dir / "unet" / "config.json").read_text())
                vcfg = json.loads((ref_dir / "vae" / "config.json").read_text())
                size = int(ucfg["sample_size"]) * 2 ** (len(vcfg["block_out_channels"]) - 1)
            except (OSError, KeyError, ValueError):
                size = 64
        real = fixture_real_images(prompts, n, cfg.seed, size)
        eval_size = cfg.eval_size
    else:
        if not cfg.real_images:
            raise EvalInputError("--real-images DIR is required for FID/KID/IS on COCO prompts (a directory of "
                                 "COCO val2014 images); the fixture model needs none")
        eval_size = cfg.eval_size or 256
        real = directory_real_images(cfg.real_images, n, cfg.seed, eval_size, file_names=prompts.file_names)
    M.check_kid_sizes(real.count, n, cfg.kid_subset_size)
    if n < max(2, cfg.is_splits):
        raise EvalInputError(f"need at least {max(2, cfg.is_splits)} prompts (IS splits = {cfg.is_splits})")
    device = torch.device(cfg.device) if cfg.device else dist.default_device()
    skip = cfg.inception is not None and str(cfg.inception).lower() == "none"
    extractor = None if skip else load_extractor(cfg.inception, device=device)
    common = {"prompts_sha256": prompts.sha256(), "n": n, "seed": cfg.seed, "steps": cfg.steps,
              "guidance": cfg.guidance, "height": cfg.height, "width": cfg.width, "dtype": cfg.dtype,
              "batch_size": cfg.batch_size, "device_type": device.type, "noise": "cpu-generator(seed<<32 + index)",
              "quantsd": __version__}
    gen_key = {"model": str(cfg.model), "model_identity": model_identity(cfg.model), "weights": cfg.weights, **common}
    ref_key = {"model": str(cfg.reference), "model_identity": model_identity(cfg.reference), "weights": None,
               **common}
    same = gen_key["model_identity"] == ref_key["model_identity"] and cfg.weights is None
    info = model_info(cfg.model, dtype=cfg.dtype)
    label = cfg.label or default_label(cfg.model, cfg.reference, info)
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return _Plan(prompts, real, extractor, gen_key, ref_key, same, info, label, eval_size, device, cache)


def evaluate(model: str | None = None, reference: str = "fixture", *, out: str | os.PathLike = "eval-out",
             config: EvalConfig | None = None, **kwargs: Any) -> dict | None:
    """Evaluate ``model`` against ``reference`` (full precision) and real images.

    Returns the results dict on rank 0 (``None`` on other ranks) and writes ``out/results.json``
    and ``out/report.md``. See :class:`EvalConfig` for the options.
    """
    cfg = config or EvalConfig(model=str(model), reference=str(reference), out=str(out), **kwargs)
    dist = init_dist()
    show = cfg.progress and dist.is_main
    t0 = time.perf_counter()
    plan = _plan(cfg, dist)
    out_dir = Path(cfg.out).expanduser()
    n = len(plan.prompts.prompts)
    timings: dict[str, float] = {}

    # stores (rank 0 creates them; the others wait so run.json exists before anyone reads it)
    ref_store_dir = plan.cache / "reference" / key_hash(plan.ref_key)
    if cfg.features_only:  # images made elsewhere (e.g. on a GPU): accept them whatever device made them
        ref_store_dir = find_store(plan.cache / "reference", plan.ref_key) or ref_store_dir
        gen_meta = out_dir / "generated" / "run.json"
        if gen_meta.is_file() and _same_but_device(json.loads(gen_meta.read_text()), plan.gen_key):
            plan.gen_key = json.loads(gen_meta.read_text())
        if ref_store_dir.is_dir() and (ref_store_dir / "run.json").is_file():
            plan.ref_key = json.loads((ref_store_dir / "run.json").read_text())
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        Store(ref_store_dir, plan.ref_key)
        if not plan.same_as_reference:
            Store(out_dir / "generated", plan.gen_key, overwrite=cfg.overwrite)
    dist.barrier()
    ref_store = Store(ref_store_dir, plan.ref_key, create=False)
    gen_store = ref_store if plan.same_as_reference else Store(out_dir / "generated", plan.gen_key, create=False)

    def loader(model, weights):
        return lambda: load_eval_pipeline(model, plan.device, cfg.dtype, weights)

    # 2-3. generation (evaluated model first: a checkpoint that does not load fails before anything else)
    t = time.perf_counter()
    made_gen = 0 if plan.same_as_reference else generate_set(
        gen_store, loader(cfg.model, cfg.weights), plan.prompts.prompts, cfg, dist, f"generate {plan.label}", show)
    timings["generate_model_s"] = time.perf_counter() - t
    t = time.perf_counter()
    made_ref = generate_set(ref_store, loader(cfg.reference, None), plan.prompts.prompts, cfg, dist,
                            "generate reference", show)
    timings["generate_reference_s"] = time.perf_counter() - t
    dist.barrier()

    # 4. features
    t = time.perf_counter()
    ext = plan.extractor
    if ext is not None:
        fkey = key_hash({"extractor": ext.identity, "eval_size": plan.eval_size, "bs": cfg.batch_size})
        gen_fc = FeatureCache(gen_store.root / "features" / fkey)
        ref_fc = FeatureCache(ref_store.root / "features" / fkey)
        real_fc = FeatureCache(plan.cache / "real" / key_hash({**plan.real.key, "extractor": ext.identity,
                                                               "bs": cfg.batch_size}))
        extract_set(real_fc, plan.real.load, plan.real.count, ext, cfg, dist, "features real", show)
        if not plan.same_as_reference:
            extract_set(gen_fc, lambda b: preprocess_generated(gen_store.load_images(b), plan.eval_size), n,
                        ext, cfg, dist, f"features {plan.label}", show)
        extract_set(ref_fc, lambda b: preprocess_generated(ref_store.load_images(b), plan.eval_size), n,
                    ext, cfg, dist, "features reference", show)
    timings["features_s"] = time.perf_counter() - t
    dist.barrier()
    if not dist.is_main:
        return None

    # 5. metrics on rank 0
    t = time.perf_counter()
    results = _base_results(cfg, plan, dist, made_gen, made_ref)
    errors: dict[str, str] = {}
    m: dict[str, Any] = {}
    results["metrics"] = m
    results["unavailable"] = {}

    def attempt(name: str, fn):
        try:
            fn()
        except Exception as exc:  # keep going: every other metric still gets computed and saved
            errors[name] = f"{type(exc).__name__}: {exc}"

    if ext is not None:
        real_pool, _ = real_fc.load(plan.real.count, cfg.batch_size)
        gen_pool, gen_logits = gen_fc.load(n, cfg.batch_size)
        ref_pool, _ = ref_fc.load(n, cfg.batch_size)

    def vs_real():
        m["fid"] = M.fid(real_pool, gen_pool)
        m["fid_numpy"] = M.fid_numpy(real_pool, gen_pool)

    def kid_real():
        m["kid_mean"], m["kid_std"] = M.kid(real_pool, gen_pool, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)

    def vs_ref():
        m["rfid"] = M.fid(ref_pool, gen_pool)
        m["rfid_numpy"] = M.fid_numpy(ref_pool, gen_pool)
        # The unbiased MMD estimator assumes independent samples; generated image i and reference image i
        # share prompt and noise, so rKID compares *disjoint* halves of the prompts (pairs never meet).
        a, b = rkid_halves(n, cfg.seed)
        m["rkid_mean"], m["rkid_std"] = M.kid(ref_pool[a], gen_pool[b], cfg.kid_subsets,
                                              min(cfg.kid_subset_size, len(a)), cfg.seed)

    def incep():
        if gen_logits is None:
            m["is_mean"] = m["is_std"] = None
            results["unavailable"]["is"] = (
                f"{plan.extractor.name} has no classifier logits (2048-d pool only), so the Inception Score cannot "
                "be computed honestly; pass --inception torch-fidelity (download) or --inception PATH to "
                "torch-fidelity's pt_inception-2015-12-05-6726825d.pth for IS")
            return
        m["is_mean"], m["is_std"] = M.inception_score(gen_logits, cfg.is_splits, cfg.seed)

    def pixel():
        idx = range(n)
        z, z_ref = gen_store.load_latents(idx), ref_store.load_latents(idx)
        m["latent_mse"] = M.latent_mse(z, z_ref)
        imgs, ref_imgs = gen_store.load_images(idx), ref_store.load_images(idx)
        m["psnr"] = M.psnr(imgs, ref_imgs)
        if m["psnr"] is None:
            results["unavailable"]["psnr"] = "images identical to the reference (PSNR = infinity)"
        if plan.prompts.attrs is not None:
            from ..fixture import checker

            if not checker.CHECKER_PATH.is_file():
                m["adherence"] = None
                results["unavailable"]["adherence"] = f"fixture attribute checker weights missing ({checker.CHECKER_PATH})"
            else:
                m["adherence"] = {k: round(v, 4) for k, v in checker.adherence(imgs, plan.prompts.attrs).items()}
                m["adherence_reference"] = {k: round(v, 4) for k, v in
                                            checker.adherence(ref_imgs, plan.prompts.attrs).items()}

    stages = [("pixel", pixel)]
    if ext is not None:
        stages = [("fid", vs_real), ("kid", kid_real), ("reference", vs_ref), ("is", incep)] + stages
    else:
        for k in ("fid", "fid_numpy", "kid_mean", "kid_std", "rfid", "rfid_numpy", "rkid_mean", "rkid_std", "is_mean",
                  "is_std"):
            m[k] = None
        results["unavailable"]["fid_kid_is"] = (
            "no feature network (--inception none): FID / KID / IS / rFID / rKID not computed. Images, latents and "
            "the reference cache are on disk: rerun the same command with --features-only and --inception on a "
            "machine that has the Inception weights")
    for name, fn in stages:
        attempt(name, fn)
    timings["metrics_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    results["complete"] = not errors
    if errors:
        results["errors"] = errors
    from .report import render_report, merge_table

    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    atomic_write_text(out_dir / "report.md", render_report(results))
    if errors:
        raise EvalError("; ".join(f"{k}: {v}" for k, v in errors.items())
                        + f". Generated images, latents and features are kept in {gen_store.root} and "
                          f"{ref_store.root}; partial results in {out_dir / 'results.json'}")
    if cfg.table:
        merge_table(cfg.table, results, out_dir / "results.json")
    return results


def rkid_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint random halves of ``range(n)`` (reference side, generated side) for rKID."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).numpy()
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2: 2 * (n // 2)])


def _same_but_device(a: dict, b: dict) -> bool:
    ignore = ("device_type", "model")  # the path as given may differ between machines; identity may not
    return {k: v for k, v in a.items() if k not in ignore} == \
        {k: v for k, v in json.loads(json.dumps(b, default=str)).items() if k not in ignore}


def find_store(parent: Path, key: dict) -> Path | None:
    """A store under ``parent`` whose key equals ``key`` up to the generating device type."""
    if not parent.is_dir():
        return None
    for d in sorted(parent.iterdir()):
        meta = d / "run.json"
        if meta.is_file() and _same_but_device(json.loads(meta.read_text()), key):
            return d
    return None


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def _base_results(cfg: EvalConfig, plan: _Plan, dist: Dist, made_gen: int, made_ref: int) -> dict:
    import diffusers
    import transformers

    n = len(plan.prompts.prompts)
    protocol = {
        "prompts": plan.prompts.source,
        "num_prompts": n,
        "seed": cfg.seed,
        "noise": "initial latents of prompt i from torch.Generator('cpu').manual_seed((seed << 32) + i)",
        "steps": cfg.steps, "guidance": cfg.guidance, "height": cfg.height, "width": cfg.width,
        "dtype": cfg.dtype, "batch_size": cfg.batch_size, "device": str(plan.device),
        "processes": dist.world, "backend": dist.backend,
        "real_images": plan.real.description, "num_real_images": plan.real.count,
        "generated_preprocessing": (f"short edge resized to {plan.eval_size} (bicubic) + center crop"
                                    if plan.eval_size else "native resolution"),
        "feature_extractor": plan.extractor.info() if plan.extractor is not None else {"name": "none"},
        "metrics_implementation": f"torchmetrics {M.torchmetrics_version()} (FrechetInceptionDistance, "
                                  "KernelInceptionDistance, InceptionScore with a pass-through feature module "
                                  "over precomputed features); FID cross-checked with numpy/scipy (fid_numpy)",
        "kid": {"subsets": cfg.kid_subsets, "subset_size": cfg.kid_subset_size, "degree": 3, "gamma": "1/dim",
                "coef": 1.0, "subset_rng": f"torch.randperm under torch.manual_seed({cfg.seed})"},
        "is": {"splits": cfg.is_splits},
        "rkid": ("KID between the reference images of one random half of the prompts and the generated images of "
                 f"the other half (subset size min({cfg.kid_subset_size}, n//2)): paired images share prompt and "
                 "noise, and the unbiased MMD estimator assumes independent samples"),
        "latent_mse": "mean over prompts of mean((z - z_ref)^2) over the final latents (same prompts and noise)",
        "psnr": "10*log10(255^2 / MSE), MSE over all pixels of all uint8 images vs the reference's",
        "adherence": ("quantsd.fixture.checker: fraction of images whose colour / shape / position (and all three) "
                      "match the prompt" if plan.prompts.attrs is not None else None),
    }
    return {
        "quantsd_eval": 1,
        "label": plan.label,
        "model": str(cfg.model),
        "reference": str(cfg.reference),
        "model_info": plan.info,
        "same_as_reference": plan.same_as_reference,
        "protocol": protocol,
        "versions": {"quantsd": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "torchmetrics": M.torchmetrics_version(),
                     "python": platform.python_version()},
        "paths": {"generated": str(Path(cfg.out) / "generated") if not plan.same_as_reference else None,
                  "reference_cache": str(plan.cache / "reference" / key_hash(plan.ref_key))},
        "generated_this_run": {"model": made_gen, "reference": made_ref},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


__all__ = ["EvalConfig", "EvalError", "evaluate", "model_identity", "model_info"]
