"""Sweep configuration and its fingerprint (what makes two sweeps comparable)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from ..quant import METHODS, QuantError, parse_granularity
from ..quant.packing import check_bits


@dataclass(frozen=True)
class SweepConfig:
    """Everything that determines a sweep's numbers.

    ``model`` is recorded as given; ``prompts`` are the exact prompts used, so the fingerprint
    changes when the prompt source or seed changes.
    """

    model: str
    prompts: tuple[str, ...]
    methods: tuple[str, ...] = ("uniform", "stochastic", "pwlq")
    bits: tuple[int, ...] = (4, 8)
    granularity: str = "tensor"
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    height: int | None = None
    width: int | None = None
    dtype: str = "float32"
    components: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder")
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("a sweep needs at least one prompt")
        for m in self.methods:
            if m not in METHODS:
                raise QuantError(f"unknown method {m!r}; valid methods: {', '.join(METHODS)}")
        for b in self.bits:
            check_bits(b)
        parse_granularity(self.granularity)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")

    def reference_key(self) -> dict:
        """The fields the fp32 reference outputs depend on (not methods/bits)."""
        d = asdict(self)
        for k in ("methods", "bits", "granularity", "extra"):
            d.pop(k)
        return d

    def fingerprint(self) -> str:
        """sha256 of the reference-determining fields plus the granularity.

        Methods and bit widths are *not* part of it, so a sweep can be extended with more
        methods or bits into the same directory; anything that changes existing numbers is.
        """
        key = self.reference_key() | {"granularity": self.granularity}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fingerprint"] = self.fingerprint()
        return d
