"""The one exception type the quantizers raise."""

from __future__ import annotations

__all__ = ["QuantError"]


class QuantError(ValueError):
    """Bad input to a quantizer (bits, method, granularity, weight values, packed data).

    A subclass of ValueError so callers that only know the builtin still catch it; the
    message always names the problem and, where there is a fixed set, the valid choices.
    """
