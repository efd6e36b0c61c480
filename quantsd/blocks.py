"""Named-block partition of a Stable Diffusion pipeline (DESIGN §4).

A *block* is a run of consecutive layers that is quantized, measured and given a bit width
as one unit: a CLIP encoder layer, a UNet resnet / transformer / resampler, the UNet middle
block, a VAE decoder up block, and the small stem/head layers.  Names are full module paths
from the pipeline (``unet.down_blocks.1.attentions.0``, ``text_encoder.encoder.layers.3``,
``vae.decoder.up_blocks.3``) so that recipes, reports and ``nn.Module.get_submodule`` agree.
(transformers >= 5 has no ``text_model`` level in ``CLIPTextModel``; quantsd pins >= 5 so that
names are stable.)

The partition covers every parameter of the text encoder, UNet and VAE decoder (with
``post_quant_conv``) exactly once; the VAE encoder (and ``quant_conv``) is listed separately
and is not quantized by default, since generation never runs it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator

from torch import nn

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
QUANTIZABLE_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)

# Containers kept whole as one block even when they hold more than a handful of layers.
_BLOCK_CLASSES = {
    "CLIPEncoderLayer", "CLIPTextEmbeddings", "TimestepEmbedding",
    "Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D",
    "UNetMidBlock2DCrossAttn", "UNetMidBlock2D", "UpDecoderBlock2D", "DownEncoderBlock2D",
}


# diffusers registers ``mid_block`` after ``up_blocks``; list blocks in forward order instead.
_FORWARD_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "conv_norm_out": 3, "conv_out": 4}


@dataclass(frozen=True)
class Block:
    """One named block: what it is made of and what it costs at fp16."""

    name: str
    component: str
    module_names: tuple[str, ...] = field(default_factory=tuple)  # leaf modules owning params
    layer_names: tuple[str, ...] = field(default_factory=tuple)   # quantizable layers (Linear/Conv/Embedding)
    n_params: int = 0
    quantized_by_default: bool = True

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.n_params

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(n_layers=self.n_layers, fp16_bytes=self.fp16_bytes)
        d["module_names"] = list(self.module_names)
        d["layer_names"] = list(self.layer_names)
        return d


def component_roots(pipe) -> list[tuple[str, str, nn.Module]]:
    """(component, prefix, module) for each quantized part of the pipeline, in forward order."""
    roots = [("text_encoder", "text_encoder", pipe.text_encoder), ("unet", "unet", pipe.unet)]
    roots.append(("vae_decoder", "vae.post_quant_conv", pipe.vae.post_quant_conv))
    roots.append(("vae_decoder", "vae.decoder", pipe.vae.decoder))
    return [r for r in roots if r[2] is not None]


def _vae_encoder_roots(pipe) -> list[tuple[str, str, nn.Module]]:
    roots = [("vae_encoder", "vae.encoder", pipe.vae.encoder)]
    if getattr(pipe.vae, "quant_conv", None) is not None:
        roots.append(("vae_encoder", "vae.quant_conv", pipe.vae.quant_conv))
    return roots


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _split(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield (name, module) block roots below ``module`` in registration (= forward) order."""
    if type(module).__name__ in _BLOCK_CLASSES or not any(_has_params(c) for c in module.children()):
        yield prefix, module
        return
    own = [n for n, _ in module.named_parameters(recurse=False)]
    if own:  # parameters registered directly on a container: keep the container whole
        yield prefix, module
        return
    children = sorted(module.named_children(), key=lambda kv: _FORWARD_RANK.get(kv[0], 0))
    for child_name, child in children:
        if _has_params(child):
            yield from _split(f"{prefix}.{child_name}", child)


def _make_block(name: str, component: str, module: nn.Module, default: bool) -> Block:
    leaves, layers = [], []
    for sub_name, sub in module.named_modules():
        full = f"{name}.{sub_name}" if sub_name else name
        if any(True for _ in sub.parameters(recurse=False)):
            leaves.append(full)
        if isinstance(sub, QUANTIZABLE_TYPES):
            layers.append(full)
    n_params = sum(p.numel() for p in module.parameters())
    return Block(name, component, tuple(leaves), tuple(layers), n_params, default)


def list_blocks(pipe, include_vae_encoder: bool = False) -> list[Block]:
    """Partition the pipeline's text encoder, UNet and VAE decoder into named blocks.

    With ``include_vae_encoder=True`` the VAE encoder's blocks are appended, marked
    ``quantized_by_default=False``.
    """
    roots = component_roots(pipe) + (_vae_encoder_roots(pipe) if include_vae_encoder else [])
    blocks = []
    for component, prefix, root in roots:
        default = component != "vae_encoder"
        for name, module in _split(prefix, root):
            blocks.append(_make_block(name, component, module, default))
    return blocks


def get_module(pipe, path: str) -> nn.Module:
    """Resolve a full module path (``unet.mid_block``, ``vae.decoder.conv_out``) on a pipeline."""
    head, _, rest = path.partition(".")
    root = getattr(pipe, head, None)
    if not isinstance(root, nn.Module):
        raise KeyError(f"{path!r}: the pipeline has no component {head!r}")
    return root.get_submodule(rest) if rest else root


def named_quantizable_layers(pipe, include_vae_encoder: bool = False) -> Iterator[tuple[str, nn.Module, str]]:
    """(full layer path, layer, component) for every quantizable layer, in block order."""
    for block in list_blocks(pipe, include_vae_encoder):
        for name in block.layer_names:
            yield name, get_module(pipe, name), block.component
