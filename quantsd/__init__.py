"""quantsd: post-training weight quantization for Stable Diffusion pipelines.

The public API (DESIGN §2) is imported lazily so that ``import quantsd`` and the CLI start
fast; ``quantsd.load_pipeline`` etc. resolve on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_pipeline": "quantsd.models",
    "list_blocks": "quantsd.blocks",
    "Block": "quantsd.blocks",
    "quantize_tensor": "quantsd.quant",
    "fake_quantize": "quantsd.quant",
    "QTensor": "quantsd.quant",
    "QuantError": "quantsd.quant",
    "load_recipe": "quantsd.recipe",
    "apply_recipe": "quantsd.recipe",
    "export": "quantsd.export",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'quantsd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
