"""Feed-forward chunking over tokens: the UNet's high-resolution memory peak, same math.

At large sizes the UNet's peak is its first-level feed-forward: SD1.5's GEGLU projects 320
channels to 2 x 1280 per token, so at 3072² (147,456 latent tokens) one batch-1 call holds the
2560-channel projection (755 MB fp16) plus its two 1280-channel halves at once, ~1.5 GB for one
layer whose inputs are 94 MB.  Every token's feed-forward is independent of the others, so it can
run over slices of the sequence, each slice's output written into one preallocated result.

:func:`chunk_feed_forward` rebinds ``forward`` of every diffusers ``FeedForward`` inside a model
(module names and state-dict keys unchanged) to one that splits sequences longer than ``tokens``
into slices of at most ``tokens``.  Shorter sequences take the module's own forward untouched, so
with the default 4096 (SD1.5 at 512²: the first level has exactly 4096 tokens) a 512² step runs
the same kernels as before.  Over longer sequences each slice is a smaller GEMM, which cuBLAS may
run with a different reduction order: outputs agree to rounding, not necessarily bit for bit.
diffusers' own ``enable_forward_chunking`` needs a chunk size that divides every level's token
count; this takes any sequence length.
"""

from __future__ import annotations

import types

import torch
from torch import nn

__all__ = ["chunk_feed_forward", "undo_chunk_feed_forward", "DEFAULT_FF_CHUNK_TOKENS"]

DEFAULT_FF_CHUNK_TOKENS = 4096


def _chunked_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    step = self._quantsd_ff_chunk
    if hidden_states.dim() != 3 or hidden_states.shape[1] <= step:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    n = hidden_states.shape[1]
    out = None
    for start in range(0, n, step):
        y = type(self).forward(self, hidden_states[:, start:start + step], *args, **kwargs)
        if out is None:  # the output's channels and dtype come from the first slice
            out = y.new_empty(y.shape[0], n, *y.shape[2:])
        out[:, start:start + y.shape[1]] = y
        del y
    return out


def _feed_forwards(model: nn.Module):
    return [m for m in model.modules() if type(m).__name__ == "FeedForward"]


def chunk_feed_forward(model: nn.Module, tokens: int = DEFAULT_FF_CHUNK_TOKENS) -> int:
    """Run every diffusers ``FeedForward`` in ``model`` over slices of at most ``tokens`` tokens;
    returns how many modules were switched (calling again changes the slice size)."""
    tokens = int(tokens)
    if tokens < 1:
        raise ValueError(f"feed-forward chunk must be at least 1 token, got {tokens}")
    mods = _feed_forwards(model)
    for m in mods:
        m._quantsd_ff_chunk = tokens
        m.forward = types.MethodType(_chunked_forward, m)
    return len(mods)


def undo_chunk_feed_forward(model: nn.Module) -> int:
    """Restore diffusers' own forward on every module :func:`chunk_feed_forward` switched."""
    n = 0
    for m in model.modules():
        if "forward" in vars(m) and getattr(m.forward, "__func__", None) is _chunked_forward:
            del m.forward
            del m._quantsd_ff_chunk
            n += 1
    return n
