"""Granularity: which elements of a weight share one scale (and breakpoint).

Every granularity is expressed as a *parameter shape* P plus the rule that the weight,
reshaped to ``(*P, -1)``, has one parameter per leading index and reduces over the last
axis.  That single view is what the quantizers work on, so tensor / channel / group need
no separate code paths:

- ``"tensor"``  P = []               one scale for the whole weight (the paper)
- ``"channel"`` P = [out]            one scale per output channel (dim 0); Linear [out, in]
                                     and Conv2d [out, in, kh, kw] alike
- ``"group:G"`` P = [out, row // G]  groups of G consecutive elements inside each row of
                                     ``w.reshape(out, -1)``; G must divide the row length
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import QuantError

__all__ = ["Granularity", "parse_granularity", "param_shape", "grouped_view"]

_VALID = '"tensor", "channel" or "group:G" (G a positive integer, e.g. "group:64")'


@dataclass(frozen=True)
class Granularity:
    """A parsed granularity spec; ``str()`` gives the canonical spelling."""

    kind: str  # "tensor" | "channel" | "group"
    group_size: int | None = None

    def __str__(self) -> str:
        return f"group:{self.group_size}" if self.kind == "group" else self.kind


def parse_granularity(spec: "str | Granularity") -> Granularity:
    """Parse ``"tensor"``, ``"channel"`` or ``"group:G"``; raise QuantError otherwise.

    Strict on purpose (no aliases, no case folding) so that a recipe typo is an error,
    not a silently different quantization.
    """
    if isinstance(spec, Granularity):
        return spec
    if not isinstance(spec, str):
        raise QuantError(f"granularity must be a string, got {type(spec).__name__}; valid: {_VALID}")
    s = spec.strip()
    if s in ("tensor", "channel"):
        return Granularity(s)
    if s.startswith("group:"):
        g = s[len("group:"):]
        if not g.isdigit() or int(g) <= 0:
            raise QuantError(f"malformed granularity {spec!r}: group size must be a positive integer; valid: {_VALID}")
        return Granularity("group", int(g))
    raise QuantError(f"unknown granularity {spec!r}; valid: {_VALID}")


def param_shape(shape: Sequence[int], gran: "str | Granularity") -> tuple[int, ...]:
    """Shape of the scale (and breakpoint) tensor for a weight of ``shape``.

    Also validates that the granularity fits the weight (channel needs dim >= 1, a group
    size must divide the row length).
    """
    g = parse_granularity(gran)
    shape = tuple(int(s) for s in shape)
    if g.kind == "tensor":
        return ()
    if len(shape) == 0:
        raise QuantError(f'granularity "{g}" needs a weight with at least 1 dimension (output channels), got a 0-d tensor; use "tensor"')
    out = shape[0]
    row = 1
    for s in shape[1:]:
        row *= s
    if g.kind == "channel":
        return (out,)
    assert g.group_size is not None
    if row % g.group_size != 0:
        raise QuantError(
            f"group size {g.group_size} does not divide the row length {row} of a weight of shape {list(shape)} "
            f"(rows are w.reshape({out}, -1)); choose a divisor of {row}, or granularity \"channel\"/\"tensor\""
        )
    return (out, row // g.group_size)


def grouped_view(w: torch.Tensor, pshape: Sequence[int]) -> torch.Tensor:
    """``w`` reshaped to ``(*pshape, -1)``: the last axis is the set sharing one parameter."""
    return w.reshape(*pshape, -1)
