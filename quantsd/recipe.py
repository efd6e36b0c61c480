"""Recipes (DESIGN §5): YAML schema, validation, resolution to a per-layer plan, simulation.

A recipe says, for every quantizable layer of the text encoder, the UNet and the VAE decoder
(``quantsd.blocks.named_quantizable_layers``), how it is stored::

    quantsd_recipe: 1
    name: paper-final
    description: free text (optional)
    seed: 0                            # stochastic methods: per-layer seeds derive from it
    defaults: {bits: 8, method: pwlq, granularity: tensor, scale_dtype: float16}
    ignore: ["unet.conv_in"]           # kept dense
    rules:                             # first match wins; then defaults
      - match: ["re:unet\\.(down_blocks|mid_block)\\..*"]
        bits: 4
      - match: ["class:Conv2d"]
        bits: 4
    metadata: {}                       # optional free-form mapping (e.g. how a search made it)

Targets (in ``match`` and ``ignore``):

* a module path (``unet.mid_block``, ``text_encoder.encoder.layers.3.mlp.fc1``): the layer
  itself, or every quantizable layer below that module;
* ``class:<Name>``: layers whose class (or a base class) is called ``Name`` (``Linear``,
  ``Conv2d``, ``Embedding``);
* ``re:<regex>``: layers whose full path matches the regex (``re.fullmatch``).

Resolution is strict: unknown keys, bits outside 2..8, unknown methods / granularities /
scale dtypes, targets that match nothing and module paths that do not exist are a
:class:`RecipeError` naming the closest valid names.  A layer matched by two rules that
would quantize it *differently* triggers a :class:`RecipeOverlapWarning` naming both rules
(the first wins); overlaps with identical settings are harmless and only recorded in the plan
(``Plan.overlaps``) -- the paper's own recipe has such overlaps (4-bit convs inside 4-bit
blocks).

Stochastic methods get a per-layer seed ``zlib.crc32(f"{recipe.seed}:{path}".encode())``, so
simulation (:func:`apply_recipe`) and export (``quantsd.export``) draw the same noise.
The recipe hash is the sha256 of :meth:`Recipe.canonical_json`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .quant import QuantError, packed_nbytes, param_shape, parse_granularity
from .quant.quantizers import METHODS, PWLQ_METHODS, STOCHASTIC_METHODS

__all__ = [
    "RECIPE_VERSION",
    "RecipeError",
    "RecipeOverlapWarning",
    "QuantSpec",
    "Rule",
    "Recipe",
    "LayerPlan",
    "DenseLayer",
    "Plan",
    "load_recipe",
    "resolve_recipe",
    "apply_recipe",
    "layer_seed",
]

RECIPE_VERSION = 1
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
BUILTIN_DEFAULTS = {"bits": 8, "method": "pwlq", "granularity": "tensor", "scale_dtype": "float16"}
_TOP_KEYS = ("quantsd_recipe", "name", "description", "seed", "defaults", "ignore", "rules", "metadata")
_SPEC_KEYS = ("bits", "method", "granularity", "scale_dtype")
_RULE_KEYS = ("match", "name", *_SPEC_KEYS)


class RecipeError(ValueError):
    """An invalid recipe, or one that does not fit the pipeline; the message says how to fix it."""


class RecipeOverlapWarning(UserWarning):
    """A layer is matched by two rules with different settings; the first one wins."""


def _did_you_mean(word: str, options: Iterable[str], n: int = 3) -> str:
    close = difflib.get_close_matches(word, list(options), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


# --------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class QuantSpec:
    """How one layer is quantized."""

    bits: int
    method: str
    granularity: str
    scale_dtype: str = "float16"

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict:
        return {"bits": self.bits, "method": self.method, "granularity": self.granularity,
                "scale_dtype": self.scale_dtype}

    def short(self) -> str:
        s = f"{self.method} w{self.bits} {self.granularity}"
        return s if self.scale_dtype == "float16" else f"{s} {self.scale_dtype}"


@dataclass(frozen=True)
class Rule:
    """One ``rules`` entry: targets plus the settings it overrides (None = from defaults)."""

    index: int
    match: tuple[str, ...]
    name: str | None = None
    bits: int | None = None
    method: str | None = None
    granularity: str | None = None
    scale_dtype: str | None = None

    @property
    def label(self) -> str:
        who = f"rules[{self.index}]" + (f" {self.name!r}" if self.name else "")
        return f"{who} (match: {', '.join(self.match)})"

    def spec(self, defaults: QuantSpec) -> QuantSpec:
        return QuantSpec(
            bits=self.bits if self.bits is not None else defaults.bits,
            method=self.method if self.method is not None else defaults.method,
            granularity=self.granularity if self.granularity is not None else defaults.granularity,
            scale_dtype=self.scale_dtype if self.scale_dtype is not None else defaults.scale_dtype,
        )

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"match": list(self.match)}
        if self.name is not None:
            d["name"] = self.name
        for k in _SPEC_KEYS:
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        return d


@dataclass(frozen=True)
class Recipe:
    """A validated recipe (schema only; :func:`resolve_recipe` checks it against a pipeline)."""

    name: str
    defaults: QuantSpec
    rules: tuple[Rule, ...] = ()
    ignore: tuple[str, ...] = ()
    seed: int = 0
    description: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    source: str | None = None  # file it was read from (not part of the recipe / its hash)

    def to_dict(self) -> dict:
        """The normalized recipe (defaults filled in); ``load_recipe(r.to_dict()) == r``."""
        d: dict[str, Any] = {"quantsd_recipe": RECIPE_VERSION, "name": self.name}
        if self.description is not None:
            d["description"] = self.description
        d["seed"] = self.seed
        d["defaults"] = self.defaults.to_dict()
        d["ignore"] = list(self.ignore)
        d["rules"] = [r.to_dict() for r in self.rules]
        if self.metadata:
            d["metadata"] = json.loads(json.dumps(self.metadata))
        return d

    def canonical_json(self) -> str:
        """Sorted keys, no whitespace, ASCII: the bytes the recipe hash is taken over."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.canonical_json() == other.canonical_json()

    def __hash__(self) -> int:
        return hash(self.canonical_json())


# --------------------------------------------------------------------------- parsing
def _check_keys(d: Mapping, allowed: Iterable[str], where: str) -> None:
    allowed = tuple(allowed)
    for k in d:
        if not isinstance(k, str) or k not in allowed:
            raise RecipeError(f"{where}: unknown key {k!r}{_did_you_mean(str(k), allowed)} "
                              f"(allowed: {', '.join(allowed)})")


def _parse_bits(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
        raise RecipeError(f"{where}: bits must be an integer in 2..8, got {v!r}")
    return int(v)


def _parse_method(v: Any, where: str) -> str:
    if not isinstance(v, str) or v not in METHODS:
        raise RecipeError(f"{where}: unknown method {v!r}{_did_you_mean(str(v), METHODS)} "
                          f"(valid: {', '.join(METHODS)})")
    return v


def _parse_gran(v: Any, where: str) -> str:
    try:
        return str(parse_granularity(v))
    except QuantError as e:
        raise RecipeError(f"{where}: {e}") from None


def _parse_scale_dtype(v: Any, where: str) -> str:
    if not isinstance(v, str) or v not in SCALE_DTYPES:
        raise RecipeError(f"{where}: scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {v!r}")
    return v


_PARSERS = {"bits": _parse_bits, "method": _parse_method, "granularity": _parse_gran,
            "scale_dtype": _parse_scale_dtype}


def _parse_targets(v: Any, where: str, allow_empty: bool) -> tuple[str, ...]:
    if v is None:
        v = []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise RecipeError(f"{where}: expected a target string or a list of them, got {type(v).__name__}")
    if not v and not allow_empty:
        raise RecipeError(f"{where}: needs at least one target (module path, 'class:<Name>' or 're:<regex>')")
    out = []
    for i, t in enumerate(v):
        w = f"{where}[{i}]"
        if not isinstance(t, str) or not t.strip():
            raise RecipeError(f"{w}: a target must be a non-empty string, got {t!r}")
        t = t.strip()
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise RecipeError(f"{w}: invalid regular expression {t[3:]!r}: {e}") from None
        elif t.startswith("class:"):
            if not t[6:].isidentifier():
                raise RecipeError(f"{w}: 'class:' needs a class name such as class:Conv2d, got {t!r}")
        elif any(c.isspace() for c in t) or t.startswith(".") or t.endswith(".") or ":" in t:
            raise RecipeError(f"{w}: {t!r} is not a module path (e.g. 'unet.mid_block'), "
                              "'class:<Name>' or 're:<regex>'")
        out.append(t)
    return tuple(out)


def _parse(d: Mapping, source: str | None) -> Recipe:
    if not isinstance(d, Mapping):
        raise RecipeError(f"a recipe must be a mapping at the top level, got {type(d).__name__}")
    _check_keys(d, _TOP_KEYS, "recipe")
    if "quantsd_recipe" not in d:
        raise RecipeError("recipe: missing 'quantsd_recipe: 1' (the recipe schema version)")
    ver = d["quantsd_recipe"]
    if isinstance(ver, bool) or ver != RECIPE_VERSION:
        raise RecipeError(f"recipe: unsupported quantsd_recipe version {ver!r}; this quantsd reads {RECIPE_VERSION}")
    name = d.get("name")
    if name is None:
        name = Path(source).stem if source else "recipe"
    if not isinstance(name, str) or not name:
        raise RecipeError(f"recipe: name must be a non-empty string, got {name!r}")
    desc = d.get("description")
    if desc is not None and not isinstance(desc, str):
        raise RecipeError("recipe: description must be a string")
    seed = d.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise RecipeError(f"recipe: seed must be a non-negative integer, got {seed!r}")
    meta = d.get("metadata") or {}
    if not isinstance(meta, Mapping):
        raise RecipeError("recipe: metadata must be a mapping")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"recipe: metadata must be JSON-serialisable ({e})") from None

    raw_defaults = d.get("defaults") or {}
    if not isinstance(raw_defaults, Mapping):
        raise RecipeError("recipe: defaults must be a mapping like {bits: 8, method: pwlq, granularity: tensor}")
    _check_keys(raw_defaults, _SPEC_KEYS, "defaults")
    dflt = {k: _PARSERS[k](raw_defaults.get(k, BUILTIN_DEFAULTS[k]), f"defaults.{k}") for k in _SPEC_KEYS}
    defaults = QuantSpec(**dflt)

    ignore = _parse_targets(d.get("ignore"), "ignore", allow_empty=True)
    raw_rules = d.get("rules") or []
    if not isinstance(raw_rules, (list, tuple)):
        raise RecipeError("recipe: rules must be a list of {match: [...], bits: ..} mappings")
    rules = []
    for i, r in enumerate(raw_rules):
        where = f"rules[{i}]"
        if not isinstance(r, Mapping):
            raise RecipeError(f"{where}: must be a mapping with 'match' and settings, got {type(r).__name__}")
        _check_keys(r, _RULE_KEYS, where)
        if "match" not in r:
            raise RecipeError(f"{where}: missing 'match' (a target or a list of targets)")
        rname = r.get("name")
        if rname is not None and not isinstance(rname, str):
            raise RecipeError(f"{where}.name: must be a string")
        kw = {k: _PARSERS[k](r[k], f"{where}.{k}") for k in _SPEC_KEYS if k in r and r[k] is not None}
        rules.append(Rule(index=i, match=_parse_targets(r["match"], f"{where}.match", allow_empty=False),
                          name=rname, **kw))
    return Recipe(name=name, defaults=defaults, rules=tuple(rules), ignore=ignore, seed=int(seed),
                  description=desc, metadata=dict(meta), source=source)


def load_recipe(recipe: "str | os.PathLike | Mapping | Recipe") -> Recipe:
    """Read and validate a recipe from a YAML/JSON file, a dict, or pass a Recipe through."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return _parse(recipe, None)
    if isinstance(recipe, (str, os.PathLike)):
        path = Path(recipe).expanduser()
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} not found")
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise RecipeError(f"{path}: not valid YAML: {e}") from None
        try:
            return _parse(data, str(path))
        except RecipeError as e:
            raise RecipeError(f"{path}: {e}") from None
    raise RecipeError(f"expected a recipe path, mapping or Recipe, got {type(recipe).__name__}")


def layer_seed(recipe_seed: int, path: str) -> int:
    """Deterministic per-layer seed for the stochastic methods (documented in docs/RECIPES.md)."""
    return zlib.crc32(f"{int(recipe_seed)}:{path}".encode("utf-8"))


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class LayerPlan:
    """One quantized layer: where it is, what it is, how it is stored and what it costs."""

    path: str
    component: str          # text_encoder | unet | vae_decoder (blocks.py)
    cls: str
    shape: tuple[int, ...]
    method: str
    bits: int
    granularity: str
    scale_dtype: str
    seed: int
    rule: str               # label of the rule that chose it, or "defaults"
    packed_bytes: int       # ceil(bits * numel / 8)
    param_bytes: int        # scale (+ breakpoint) bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Codes + stored parameters (== QTensor.nbytes_packed); the shape tensor is extra."""
        return self.packed_bytes + self.param_bytes

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.method, self.granularity, self.scale_dtype)

    def to_dict(self) -> dict:
        return {"path": self.path, "component": self.component, "class": self.cls, "shape": list(self.shape),
                "numel": self.numel, "method": self.method, "bits": self.bits, "granularity": self.granularity,
                "scale_dtype": self.scale_dtype, "seed": self.seed, "rule": self.rule,
                "packed_bytes": self.packed_bytes, "param_bytes": self.param_bytes, "nbytes": self.nbytes}


@dataclass(frozen=True)
class DenseLayer:
    """A quantizable layer the recipe keeps dense (``ignore``)."""

    path: str
    component: str
    cls: str
    shape: tuple[int, ...]
    reason: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict:
        return {"path": self.path, "component": self.component, "class": self.cls, "shape": list(self.shape),
                "numel": self.numel, "reason": self.reason}


@dataclass
class Plan:
    """The recipe resolved against one pipeline: every quantizable layer, in block order."""

    recipe: Recipe
    layers: list[LayerPlan]
    dense: list[DenseLayer]
    overlaps: list[dict] = field(default_factory=list)  # {layer, first, other, conflict}

    @property
    def recipe_sha256(self) -> str:
        return self.recipe.sha256

    def by_path(self) -> dict[str, LayerPlan]:
        return {lp.path: lp for lp in self.layers}

    def summary(self) -> dict:
        """Per component: quantized layers, their weights' numel and bytes, dense layers."""
        out: dict[str, dict] = {}
        for lp in self.layers:
            c = out.setdefault(lp.component, {"quantized_layers": 0, "quantized_numel": 0, "quantized_bytes": 0,
                                              "dense_layers": 0, "dense_numel": 0})
            c["quantized_layers"] += 1
            c["quantized_numel"] += lp.numel
            c["quantized_bytes"] += lp.nbytes
        for dl in self.dense:
            c = out.setdefault(dl.component, {"quantized_layers": 0, "quantized_numel": 0, "quantized_bytes": 0,
                                              "dense_layers": 0, "dense_numel": 0})
            c["dense_layers"] += 1
            c["dense_numel"] += dl.numel
        return out

    def to_dict(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "recipe_sha256": self.recipe_sha256,
                "layers": [lp.to_dict() for lp in self.layers], "dense": [d.to_dict() for d in self.dense],
                "overlaps": list(self.overlaps), "summary": self.summary()}


def _class_names(module: torch.nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def _all_module_paths(pipe) -> list[str]:
    paths = []
    for head in ("text_encoder", "unet", "vae"):
        root = getattr(pipe, head, None)
        if isinstance(root, torch.nn.Module):
            paths.extend(f"{head}.{n}" if n else head for n, _ in root.named_modules())
    return paths


class _Matcher:
    """Resolves targets to sets of layer paths (with errors naming the closest valid names)."""

    def __init__(self, pipe, layers: list[tuple[str, torch.nn.Module, str]]):
        self.pipe = pipe
        self.layers = layers
        self.paths = [p for p, _, _ in layers]
        self.classes = {p: _class_names(m) for p, m, _ in layers}
        self._modules: set[str] | None = None

    @property
    def modules(self) -> set[str]:
        if self._modules is None:
            self._modules = set(_all_module_paths(self.pipe))
        return self._modules

    def match(self, target: str, where: str) -> tuple[list[str], str | None]:
        """(matched layer paths, error message or None)."""
        if target.startswith("re:"):
            rx = re.compile(target[3:])
            hit = [p for p in self.paths if rx.fullmatch(p)]
            if not hit:
                return hit, (f"{where}: {target!r} matches no quantizable layer (full match against paths "
                             f"such as {self.paths[len(self.paths) // 2]!r})")
            return hit, None
        if target.startswith("class:"):
            name = target[6:]
            hit = [p for p in self.paths if name in self.classes[p]]
            if not hit:
                present = sorted({type(m).__name__ for _, m, _ in self.layers} | {"Linear", "Conv2d", "Embedding"})
                return hit, (f"{where}: {target!r} matches no quantizable layer{_did_you_mean(name, present)} "
                             f"(layer classes here: {', '.join(present)})")
            return hit, None
        prefix = target + "."
        hit = [p for p in self.paths if p == target or p.startswith(prefix)]
        if hit:
            return hit, None
        if target not in self.modules:
            return hit, f"{where}: module {target!r} does not exist in this pipeline{_did_you_mean(target, self.modules, 5)}"
        why = ""
        if target.startswith(("vae.encoder", "vae.quant_conv")):
            why = " (the VAE encoder is not quantized: generation never runs it)"
        return hit, f"{where}: module {target!r} contains no quantizable (Linear/Conv2d/Embedding) layer{why}"


def resolve_recipe(pipe, recipe: "Recipe | str | os.PathLike | Mapping", warn: bool = True) -> Plan:
    """Resolve ``recipe`` against ``pipe``: a :class:`Plan` with every layer's settings and bytes.

    Works on a pipeline on the meta device (only shapes are read).  Raises RecipeError
    listing every problem found; warns (RecipeOverlapWarning) about conflicting overlaps.
    """
    from .blocks import named_quantizable_layers

    recipe = load_recipe(recipe)
    layers = list(named_quantizable_layers(pipe))
    if not layers:
        raise RecipeError("the pipeline has no quantizable layers (already packed-loaded?)")
    m = _Matcher(pipe, layers)
    errors: list[str] = []

    def targets(ts: tuple[str, ...], where: str) -> set[str]:
        s: set[str] = set()
        for i, t in enumerate(ts):
            hit, err = m.match(t, f"{where}[{i}]")
            if err:
                errors.append(err)
            s.update(hit)
        return s

    ignored: dict[str, str] = {}
    for i, t in enumerate(recipe.ignore):
        hit, err = m.match(t, f"ignore[{i}]")
        if err:
            errors.append(err)
        for p in hit:
            ignored.setdefault(p, t)
    rule_sets = [targets(r.match, f"rules[{r.index}].match") for r in recipe.rules]
    if errors:
        raise RecipeError(f"recipe {recipe.name!r} does not fit this pipeline:\n  " + "\n  ".join(errors))

    plan_layers: list[LayerPlan] = []
    dense: list[DenseLayer] = []
    overlaps: list[dict] = []
    conflicts: dict[tuple[int, int], list[str]] = {}
    for path, module, component in layers:
        shape = tuple(int(s) for s in module.weight.shape)
        cls = type(module).__name__
        if path in ignored:
            dense.append(DenseLayer(path, component, cls, shape, f"ignore: {ignored[path]}"))
            continue
        hits = [r for r, s in zip(recipe.rules, rule_sets) if path in s]
        if hits:
            rule = hits[0]
            spec = rule.spec(recipe.defaults)
            label = rule.label
            for other in hits[1:]:
                conflict = other.spec(recipe.defaults) != spec
                overlaps.append({"layer": path, "first": rule.label, "other": other.label, "conflict": conflict})
                if conflict:
                    conflicts.setdefault((rule.index, other.index), []).append(path)
        else:
            spec, label = recipe.defaults, "defaults"
        try:
            pshape = param_shape(shape, spec.granularity)
        except QuantError as e:
            errors.append(f"{path} ({label}): {e}")
            continue
        n_params = math.prod(pshape)
        per = 2 if spec.method in PWLQ_METHODS else 1
        numel = math.prod(shape)
        plan_layers.append(LayerPlan(
            path=path, component=component, cls=cls, shape=shape, method=spec.method, bits=spec.bits,
            granularity=spec.granularity, scale_dtype=spec.scale_dtype, seed=layer_seed(recipe.seed, path),
            rule=label, packed_bytes=packed_nbytes(spec.bits, numel),
            param_bytes=per * n_params * torch.empty((), dtype=spec.torch_scale_dtype).element_size(),
        ))
    if errors:
        hint = ""
        if any("group size" in e for e in errors):
            hint = ("\n  (add a rule with granularity: channel for these layers, or pick a group size that "
                    "divides every row length)")
        raise RecipeError(f"recipe {recipe.name!r} does not fit this pipeline:\n  " + "\n  ".join(errors) + hint)
    if warn:
        by_index = {r.index: r for r in recipe.rules}
        for (a, b), paths in conflicts.items():
            ra, rb = by_index[a], by_index[b]
            warnings.warn(
                f"recipe {recipe.name!r}: {len(paths)} layer(s) matched by both {ra.label} and {rb.label} "
                f"with different settings; the first match wins ({ra.spec(recipe.defaults).short()} instead of "
                f"{rb.spec(recipe.defaults).short()}), e.g. {paths[0]}",
                RecipeOverlapWarning, stacklevel=2,
            )
    return Plan(recipe=recipe, layers=plan_layers, dense=dense, overlaps=overlaps)


def quantize_layer_weight(weight: torch.Tensor, lp: LayerPlan):
    """The QTensor for one planned layer (shared by apply_recipe and export)."""
    return _quantize(weight, lp)


def _quantize(weight: torch.Tensor, lp: LayerPlan):
    from .quant import quantize_tensor

    return quantize_tensor(weight.detach(), bits=lp.bits, method=lp.method, granularity=lp.granularity,
                           seed=lp.seed if lp.method in STOCHASTIC_METHODS else 0,
                           scale_dtype=SCALE_DTYPES[lp.scale_dtype])


def apply_recipe(pipe, recipe: "Recipe | str | os.PathLike | Mapping", warn: bool = True) -> Plan:
    """Simulated quantization in place: each planned layer's weight becomes
    ``quantize_tensor(w, ...).dequantize()`` (same dtype/device).  Returns the plan.

    The result equals, bit for bit, what ``quantsd.io.load_checkpoint`` rebuilds from
    ``quantsd.export(pipe_before, recipe, ...)``.
    """
    from .blocks import get_module

    plan = resolve_recipe(pipe, recipe, warn=warn)
    for lp in plan.layers:
        module = get_module(pipe, lp.path)
        w = module.weight
        if w.device.type == "meta":
            raise RecipeError("cannot apply a recipe to a pipeline on the meta device (no weights); "
                              "use resolve_recipe() / `quantsd export --dry-run` for plans and sizes")
        if getattr(module, "_quantsd_simulated", None) is not None:
            warnings.warn(f"{lp.path} was already quantized by a recipe; quantizing it again", stacklevel=2)
        with torch.no_grad():
            w.copy_(_quantize(w, lp).dequantize())
        module._quantsd_simulated = lp.spec
    return plan

