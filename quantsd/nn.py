"""Packed-weight layers: QuantLinear / QuantConv2d (DESIGN §7 ``weights="packed"``).

The n-bit codes (``weight_packed``, the checkpoint's LSB-first bitstream, uint8) and the
stored parameters (``weight_scale`` and, for PWLQ, ``weight_breakpoint``, in their stored
float16/float32 dtype) stay resident as buffers on the layer's device; the dense weight is
rebuilt inside ``forward`` by :func:`dequantize_weight` and dropped afterwards.  On CUDA the
rebuild is one Triton kernel launch per layer (``quantsd.kernels``: unpack + decode + cast in
one pass, bit-identical to the pure-torch decode, a custom op under torch.compile); the
pure-torch decode below is the reference and the CPU path.  Where the kernel runs, each layer
also holds ``_lut`` (a non-persistent buffer, so CUDA graphs see a static input): its own value
table (2^bits float32, the reference decode of every code) for per-tensor parameters, else the
level table shared by every layer of that bit width and method.  It is rebuilt when the layer
moves to another device or loads new parameters (``load_state_dict``), never saved.

The decode is exactly the quantizer's (``quantsd.quant``): a weight rebuilt here equals the
simulated ``quantize_tensor(...).dequantize()`` bit for bit.

``module.to(dtype)`` / ``.half()`` change the compute dtype (and the bias) but never the
stored parameters: scales/breakpoints keep their stored dtype, so casting a packed pipeline
cannot change which weights it computes with beyond the final rounding to the compute dtype.
QuantEmbedding keeps an embedding table packed too and decodes only the rows a forward looks up
(gather the rows' codes, then the same elementwise decode: exact).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from .kernels import fused as _fused
from .kernels.dequant import op_call
from .quant.granularity import grouped_view, param_shape, parse_granularity
from .quant.packing import pack_bits, unpack_bits
from .quant.quantizers import PWLQ_METHODS, decode

__all__ = ["dequantize_weight", "QuantLinear", "QuantConv2d", "QuantEmbedding", "QuantModule", "packed_modules",
           "densify_small_layers", "ArmedQuantLinear", "ArmedQuantConv2d", "set_armed_calls"]


def dequantize_weight(
    packed: torch.Tensor,
    shape: Sequence[int],
    bits: int,
    method: str,
    granularity: str,
    scale: torch.Tensor,
    breakpoint: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float16,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense weight of ``shape`` in ``dtype`` from packed codes and stored parameters.

    ``backend="torch"`` (the reference; the only one on the CPU): unpack the LSB-first n-bit
    stream, view it as the granularity's groups, decode in float32 with the stored parameters
    (as float32), cast.  Identical to ``QTensor.from_packed(...).dequantize()`` minus the
    validation.  ``backend="auto"`` uses the Triton kernel (same bits) on CUDA for float16 /
    bfloat16 / float32 outputs; ``"triton"`` insists on it.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton" or (backend == "auto" and packed.is_cuda and _triton_ok(packed.device, dtype)):
        from .kernels import dequantize

        return dequantize(packed, shape, bits, method, granularity, scale, breakpoint, dtype)
    numel = 1
    for s in shape:
        numel *= int(s)
    codes = unpack_bits(packed, bits, numel)
    pshape = param_shape(shape, granularity)
    cv = grouped_view(codes, pshape)
    p = None if breakpoint is None else breakpoint.float()
    w = decode(cv, method, bits, scale.float(), p)
    return w.reshape(tuple(int(s) for s in shape)).to(dtype)


_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _version_of(t: torch.Tensor) -> int:
    """In-place version counter of ``t`` (-1 for inference-mode tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _triton_ok(device: torch.device, dtype: torch.dtype) -> bool:
    from .kernels.dequant import SUPPORTED_DTYPES, available

    return dtype in SUPPORTED_DTYPES and available(device)


_PREFETCH_OP = None   # quantsd.prefetch's custom op, set when that module is imported (before any layer uses it)
# True once quantsd.prefetch.enable_weight_prefetch has run in this process (never reset): compiled forwards
# read a layer's ``_prefetch_slot`` only then.  One global that Dynamo guards once per graph, instead of
# two guards a layer on every compiled call for an attribute that is None unless prefetch is on
_PREFETCH_ENABLED = False
_GROUP_OP = None      # quantsd.dequant_groups' custom op, set when that module is imported (before any group exists)


def kernel_args(layer: "QuantModule") -> tuple:
    """(packed, scale, breakpoint, lut) as the dequant kernel takes them for this layer (a value-table
    plan passes its table for the unread scale and no breakpoint, as :func:`_kernel_weight` does)."""
    lut = layer._lut
    if layer._table:
        return layer.weight_packed, lut, None, lut
    return layer.weight_packed, layer.weight_scale, layer.weight_breakpoint, lut


def _kernel_weight(layer: "QuantModule", lut: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A packed layer's dense weight by one Triton launch (CUDA, or the interpreter), no validation.
    A module-level function, not a method: torch.compile then guards it once, not once per layer."""
    if layer._table:
        if not torch.compiler.is_compiling() and layer._table_source != layer._params_signature():
            layer._refresh_lut()
            lut = layer._lut
        w = op_call(layer._plan, layer._plan_key, layer.weight_packed, lut, None, lut, dtype)
    else:
        w = op_call(layer._plan, layer._plan_key, layer.weight_packed, layer.weight_scale, layer.weight_breakpoint,
                    lut, dtype)
    if torch.compiler.is_compiling():   # the op's key says the code order: its output is already the view
        return w
    cl = layer._codes_cl
    return w if cl is None else w.view(cl).permute(0, 3, 1, 2)


def _kernel_weight_eager(layer: "QuantModule", lut: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_kernel_weight` for eager forwards (never traced): the same checks and the same launch,
    the buffers read from ``_buffers`` (``layer.weight_packed`` goes through nn.Module.__getattr__,
    ~1 us of host time per read after the failed ordinary lookup)."""
    buffers = layer._buffers
    if layer._table:
        if layer._table_source != layer._params_signature():
            layer._refresh_lut()
            lut = buffers["_lut"]
        w = op_call(layer._plan, layer._plan_key, buffers["weight_packed"], lut, None, lut, dtype)
    else:
        w = op_call(layer._plan, layer._plan_key, buffers["weight_packed"], buffers["weight_scale"],
                    buffers["weight_breakpoint"], lut, dtype)
    cl = layer._codes_cl
    return w if cl is None else w.view(cl).permute(0, 3, 1, 2)


# nn.Module's registries of hooks on every module (dicts mutated in place, never rebound) and the JIT
# tracer's state: an armed packed layer takes nn.Module.__call__ whenever any of them is set
# (_ArmedCalls.__call__)
_GLOBAL_FORWARD_HOOKS = _nn_module._global_forward_hooks
_GLOBAL_FORWARD_PRE_HOOKS = _nn_module._global_forward_pre_hooks
_GLOBAL_BACKWARD_HOOKS = _nn_module._global_backward_hooks
_GLOBAL_BACKWARD_PRE_HOOKS = _nn_module._global_backward_pre_hooks
_jit_tracing = torch._C._get_tracing_state


def _bias(layer: nn.Module):
    """``layer.bias`` without nn.Module.__getattr__ (eager forwards): a registered parameter (also
    one set to None) is read from ``_parameters``, anything else by the ordinary lookup."""
    params = layer._parameters
    if "bias" in params:
        return params["bias"]
    return layer.bias


def _permute_codes(packed: torch.Tensor, bits: int, shape: tuple, order: tuple) -> torch.Tensor:
    """Codes stored row-major in ``shape``, packed again in the order of ``shape`` permuted by
    ``order`` (a new tensor, on ``packed``'s device)."""
    if packed.device.type == "meta":
        return torch.empty_like(packed)
    codes = unpack_bits(packed, bits, _numel(shape)).view(shape).permute(order)
    return pack_bits(codes, bits)


_FUSED_DTYPES = (torch.float16, torch.bfloat16)


def _fused_rows_ok(layer: "QuantModule", x: torch.Tensor, kind: str) -> bool:
    """Does this call take the fused dequant-GEMM (:mod:`quantsd.kernels.fused`)?  Only while
    torch.compile traces (the decision is then made once per compiled shape; eager forwards keep the
    per-layer / grouped dequant, whose launches are cheaper on the host), for a layer whose kernel
    runs on its device, 16-bit compute, and a shape :func:`quantsd.kernels.fused.should_fuse` takes
    (a convolution's input batched, 4-d).  Called only while the fused path is on (the forwards test
    ``_fused.MAX_ROWS > 0`` first: while it is off nothing here is traced, and what it reads --
    ``in_features``, a conv's kernel size -- would be Dynamo guards on every layer of every compiled call)."""
    return (layer._lut is not None and layer._fusable and x.dtype == layer._dtype
            and x.dtype in _FUSED_DTYPES and (kind == "linear" or x.dim() == 4)
            and _fused.should_fuse(layer._plan_key, layer._output_rows(x), kind))


class QuantModule(nn.Module):
    """Shared buffers and bookkeeping of the packed layers."""

    _STORED = ("weight_scale", "weight_breakpoint")
    _dq_group = None    # quantsd.dequant_groups.DequantGroup of this layer (grouped launches), if any
    _dq_index = 0
    _dq_view = (0, 0, None)   # (offset, numel, channels-last (O, KH, KW, I) or None) of its weight in the group's buffer
    # its group's hand-over cell (quantsd.dequant_groups, ``prehook``): [the group's weights] while its
    # root's forward runs (eager), [None] otherwise; a layer reads its own at ``_dq_index``
    _arm_cell = (None,)
    _prefetch_slot = None   # (prefetcher id, layer index) under quantsd.prefetch (compiled forwards), if any
    # (O, KH, KW, I) while ``weight_packed`` holds a conv's codes in that order (set_codes_channels_last),
    # else None: the natural (O, I, KH, KW) order, the only one checkpoints ever hold
    _codes_cl = None

    @property
    def _armed(self) -> torch.Tensor | None:
        """Its weight as handed over by its group for the root's forward, else None (tests, tools)."""
        views = self._arm_cell[0]
        return None if views is None else views[self._dq_index]

    def _init_quant(self, shape, bits, method, granularity, packed, scale, breakpoint, dtype, device):
        self.weight_shape = tuple(int(s) for s in shape)
        self.bits = int(bits)
        self.method = str(method)
        self.granularity = str(granularity)
        device = packed.device if device is None else torch.device(device)
        self.register_buffer("weight_packed", packed.to(device))
        self.register_buffer("weight_scale", scale.to(device))
        self.register_buffer("weight_breakpoint", None if breakpoint is None else breakpoint.to(device))
        # follows .to(dtype)/.half(): the dtype forward computes in
        self.register_buffer("_compute_dtype_ref", torch.empty(0, dtype=dtype, device=device), persistent=False)
        if (self.method in PWLQ_METHODS) != (breakpoint is not None):
            raise ValueError(f"method {method!r} {'needs' if self.method in PWLQ_METHODS else 'takes no'} breakpoint")
        from .kernels.dequant import HAS_TRITON, plan_key, prepare

        # launch constants for the Triton path, computed once (nothing per call but the launch)
        self._plan = prepare(self.weight_shape, self.bits, self.method, self.granularity) if HAS_TRITON else None
        self._plan_key = None if self._plan is None else plan_key(self._plan)
        self._table = self._plan is not None and self._plan.table
        self._dtype = dtype  # == _compute_dtype_ref.dtype; a plain attribute is one cheap guard under compile
        self._kernel_dtype_ok = dtype in _FAST_DTYPES
        # may the fused dequant-GEMM run this layer
        self._fusable = self._natural_fusable()
        # the kernel's table: a (non-persistent) buffer, so torch.compile + CUDA graphs treat it as a
        # static input like any weight (a plain tensor attribute would be copied on every replay)
        self.register_buffer("_lut", None, persistent=False)
        self._refresh_lut()

    def _natural_fusable(self) -> bool:
        """Could the fused dequant-GEMM (natural code order only) run this layer?"""
        return self._plan is not None and not self._plan.wide

    @property
    def codes_channels_last(self) -> bool:
        """Are the codes stored in (O, KH, KW, I) order (see :meth:`set_codes_channels_last`)?"""
        return self._codes_cl is not None

    def codes_channels_last_refusal(self) -> str | None:
        """Why this layer's codes can't be stored channels-last (None: they can)."""
        return "only QuantConv2d layers (4-D weights) have a channels-last order"

    def set_codes_channels_last(self, flag: bool) -> None:
        """Store the codes in (O, KH, KW, I) order (True) or the natural (O, I, KH, KW) order (False).

        Why: every kernel decodes the codes in their stored order, so channels-last codes come out
        as channels-last weight memory from the flat decode (the layer's weight is then a
        ``permute(0, 3, 1, 2)`` view with the same values), which a compiled graph's channels-last
        convolution takes without a copy.  Scales are per tensor or per output channel, the same in
        both orders.  Checkpoints (``state_dict``) always hold the natural order."""
        flag = bool(flag)
        if flag == (self._codes_cl is not None):
            return
        if flag:
            why = self.codes_channels_last_refusal()
            if why is not None:
                raise ValueError(f"can't store this layer's codes channels-last: {why}")
        o, i, kh, kw = self.weight_shape
        with torch.no_grad():
            if flag:
                new = _permute_codes(self._buffers["weight_packed"], self.bits, (o, i, kh, kw), (0, 2, 3, 1))
            else:
                new = _permute_codes(self._buffers["weight_packed"], self.bits, (o, kh, kw, i), (0, 3, 1, 2))
        group = self._dq_group
        if group is not None:   # its launch holds the old codes' address
            group.invalidate()
        self._buffers["weight_packed"] = new    # a new tensor: identity-based staleness checks see it
        self._codes_cl = (o, kh, kw, i) if flag else None
        if self._plan is not None:   # the compiled op reads the order from its key (no extra attribute guard)
            from .kernels.dequant import CODES_CL, plan_key

            self._plan_key = plan_key(self._plan) + (CODES_CL if flag else "")
        self._fusable = self._natural_fusable() and not flag   # the fused GEMM reads the natural order
        if group is not None:
            group.prepare()

    def _natural_codes(self) -> torch.Tensor:
        """``weight_packed`` in the natural (O, I, KH, KW) order (itself when stored so)."""
        packed = self._buffers["weight_packed"]
        cl = self._codes_cl
        if cl is None:
            return packed
        with torch.no_grad():
            return _permute_codes(packed, self.bits, cl, (0, 3, 1, 2))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # checkpoints and exports never see the internal code order
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight_packed"
        if self._codes_cl is not None and key in destination:
            destination[key] = self._natural_codes()

    def _refresh_lut(self, prepare_group: bool = True) -> None:
        """The kernel's table on this layer's device (None where the kernel can't run): the layer's
        own value table (every code's decoded weight) for per-tensor parameters, else the level
        table shared by all layers of this bit width and method.  A grouped layer's group then
        rebuilds its launch constants (``prepare_group``), here rather than inside a compiled graph."""
        group = self._dq_group
        if group is not None:   # a grouped launch must not keep the old table's address
            group.invalidate()
        self._make_lut()
        if group is not None and prepare_group:
            group.prepare()

    def _make_lut(self) -> None:
        self._lut = None
        self._table_source = None
        dev = self.weight_packed.device
        if self._plan is not None and dev.type != "meta":
            from .kernels.dequant import available, level_table, value_table

            if not available(dev):  # CUDA, or the CPU under TRITON_INTERPRET=1 (tests)
                return
            if self._plan.table:
                self._lut = value_table(self.bits, self.method, self.weight_scale, self.weight_breakpoint)
                self._table_source = self._params_signature()
            else:
                self._lut = level_table(self.bits, self.method, dev)

    def _params_signature(self) -> tuple:
        """Which scale/breakpoint tensors (and which in-place versions of them) a value table was
        built from: a table whose source changed (in-place edit, reassignment, functional_call)
        is rebuilt before use in eager mode."""
        buffers = self._buffers
        s, b = buffers["weight_scale"], buffers["weight_breakpoint"]
        try:     # (called on every eager forward: no helper calls on the common path)
            return (id(s), s._version, None if b is None else (id(b), b._version))
        except RuntimeError:   # an inference-mode tensor: no version counter
            return (id(s), _version_of(s), None if b is None else (id(b), _version_of(b)))

    def refresh_tables(self) -> None:
        """Rebuild the kernel's table from the current scale/breakpoint.  Eager forwards do this
        by themselves when the parameters changed; inside torch.compile, call it after editing
        them (compiled graphs do not re-check)."""
        self._refresh_lut()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # incoming codes are in the natural order: stored in this layer's order (swapped into the
        # caller's dict for the duration of the load only)
        key = prefix + "weight_packed"
        incoming = state_dict.get(key) if self._codes_cl is not None else None
        swap = (isinstance(incoming, torch.Tensor) and incoming.dtype == torch.uint8
                and incoming.shape == self._buffers["weight_packed"].shape)
        if swap:
            o, kh, kw, i = self._codes_cl
            with torch.no_grad():
                state_dict[key] = _permute_codes(incoming, self.bits, (o, i, kh, kw), (0, 2, 3, 1))
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        finally:
            if swap:
                state_dict[key] = incoming
        # new scales/breakpoints: the value table derived from them must follow
        if getattr(self, "_plan", None) is not None:
            self._refresh_lut()   # (which also drops a grouped launch's buffer of the old weights)

    def _apply(self, fn, recurse=True):
        # Stored quantization parameters follow the device, never a dtype cast; the float32 table
        # is rebuilt on the new device (never cast either).
        if self._dq_group is not None:   # new device or dtype: the group rebuilds from scratch
            self._dq_group.invalidate()
        saved = {k: self._buffers.pop(k) for k in self._STORED if k in self._buffers}
        lut = self._buffers.pop("_lut", None)
        try:
            super()._apply(fn, recurse)
        finally:
            dev = self.weight_packed.device
            for k, t in saved.items():
                self._buffers[k] = None if t is None else t.to(dev)
            self._buffers["_lut"] = lut
            self._dtype = self._compute_dtype_ref.dtype
            self._kernel_dtype_ok = self._dtype in _FAST_DTYPES
        if getattr(self, "_plan", None) is not None and (lut is None or lut.device != self.weight_packed.device):
            self._refresh_lut()
        if self._dq_group is not None:   # once its last member has moved, the group rebuilds its constants
            self._dq_group.prepare()
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype_ref.dtype

    def _forward_weight(self) -> torch.Tensor:
        """The dense weight in the compute dtype, for ``forward``.

        Kept lean on purpose: torch.compile guards every attribute and tensor this reads, once per
        layer on every compiled call (~280 layers in SD1.5), so each read costs host time per step.
        A value-table layer reads its codes, its table and three constants (``_table`` mirrors
        ``_plan.table`` for that reason: reading the plan would guard its type and length too).

        Eager calls go to :meth:`_eager_weight` (the same weights by the same launches, with less
        host time); what follows that first test is only ever traced."""
        if not torch.compiler.is_compiling():
            return self._eager_weight()
        lut = self._lut
        if lut is not None and self._kernel_dtype_ok:
            group = self._dq_group
            if group is not None:   # a grouped launch (quantsd.dequant_groups)
                # one op per member, all alike: the graph pass quantsd.dequant_groups.DEDUP_PASS keeps
                # the first and every member takes its slice of that one buffer
                offset, numel, cl = self._dq_view
                # the layer's own codes and table go in as inputs, so CUDA graphs check their
                # addresses as they do for a per-layer op (the pass merges every member's into one call)
                flat = _GROUP_OP([self.weight_packed, lut], group.key, group.numel, self._dtype)
                if cl is not None:   # written channels-last: Inductor's channels-last convolution takes it as is
                    return flat.narrow(0, offset, numel).view(cl).permute(0, 3, 1, 2)
                return flat.narrow(0, offset, numel).view(self.weight_shape)
            return _kernel_weight(self, lut, self._dtype)
        return self.dequantized_weight()

    def _eager_weight(self) -> torch.Tensor:
        """:meth:`_forward_weight` outside torch.compile: the member's view of its group's buffer
        (:meth:`quantsd.dequant_groups.DequantGroup.weight`), else the layer's own launch, else the
        reference decode.  An eager UNet step is host-bound and runs this ~280 times, so buffers are
        read from ``_buffers`` (not through nn.Module.__getattr__) and nothing is checked twice."""
        lut = self._buffers["_lut"]
        if lut is not None and self._kernel_dtype_ok:
            group = self._dq_group
            if group is not None:   # a grouped launch (quantsd.dequant_groups)
                w = group.weight(self._dq_index)
                if w is not None:
                    return w
            return _kernel_weight_eager(self, lut, self._dtype)
        return self.dequantized_weight()

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self._dtype
        lut = self._lut
        if lut is not None and dtype in _FAST_DTYPES:
            return _kernel_weight(self, lut, dtype)
        cl = self._codes_cl   # channels-last codes: decoded in their order, viewed back as (O, I, KH, KW)
        w = dequantize_weight(self.weight_packed, self.weight_shape if cl is None else cl, self.bits, self.method,
                              self.granularity, self.weight_scale, self.weight_breakpoint, dtype, backend="torch")
        return w if cl is None else w.permute(0, 3, 1, 2)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, rebuilt on every access (for code that reads ``.weight``)."""
        return self.dequantized_weight()

    @property
    def nbytes_packed(self) -> int:
        n = self.weight_packed.numel() + self.weight_scale.numel() * self.weight_scale.element_size()
        if self.weight_breakpoint is not None:
            n += self.weight_breakpoint.numel() * self.weight_breakpoint.element_size()
        return n

    def _quant_repr(self) -> str:
        return (f"bits={self.bits}, method={self.method!r}, granularity={self.granularity!r}, "
                f"scale_dtype={self.weight_scale.dtype}, packed_bytes={self.weight_packed.numel()}"
                + (", codes_channels_last=True" if self._codes_cl is not None else ""))


class QuantLinear(QuantModule):
    """``nn.Linear`` with a packed weight, dequantized in forward."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, *, bits: int, method: str,
                 granularity: str, packed: torch.Tensor, scale: torch.Tensor,
                 breakpoint: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._init_quant((out_features, in_features), bits, method, granularity, packed, scale, breakpoint, dtype,
                         device)
        self.bias = None if bias is None else nn.Parameter(bias.to(self.weight_packed.device, dtype),
                                                             requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qt, device=None) -> "QuantLinear":
        """From a dense layer (for its shape and bias) and a QTensor of its weight."""
        dtype = linear.bias.dtype if linear.bias is not None else qt.dtype
        return cls(linear.in_features, linear.out_features, None if linear.bias is None else linear.bias.detach(),
                   bits=qt.bits, method=qt.method, granularity=qt.granularity, packed=qt.pack(), scale=qt.scale,
                   breakpoint=qt.breakpoint, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (the compile test first: a traced read of ``_armed`` would be one more Dynamo guard per layer,
        # re-checked on every compiled call)
        if torch.compiler.is_compiling():
            if _PREFETCH_ENABLED and self._prefetch_slot is not None:
                return _PREFETCH_OP(x, *self._prefetch_slot)
            if _fused.MAX_ROWS > 0 and _fused_rows_ok(self, x, "linear"):   # (the switch first: _fused_rows_ok)
                return _fused.LINEAR_OP(x, *kernel_args(self), self.bias, self._plan_key)
            return F.linear(x, self._forward_weight(), self.bias)
        views = self._arm_cell[0]     # handed over by a prehook group's root (eager)
        return F.linear(x, self._eager_weight() if views is None else views[self._dq_index], _bias(self))

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This layer's op with a given dense weight (the weight prefetcher's, :mod:`quantsd.prefetch`)."""
        return F.linear(x, weight, self.bias)

    def _output_rows(self, x: torch.Tensor) -> int:
        """Rows of the product as a GEMM: every leading position of ``x``."""
        return x.numel() // self.in_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               + self._quant_repr()


class QuantConv2d(QuantModule):
    """``nn.Conv2d`` with a packed weight, dequantized in forward."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, bias: torch.Tensor | None, *, stride=1,
                 padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros", bits: int, method: str,
                 granularity: str, packed: torch.Tensor, scale: torch.Tensor,
                 breakpoint: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = pair(kernel_size)
        self.stride = pair(stride)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.dilation = pair(dilation)
        self.groups = int(groups)
        self.padding_mode = padding_mode
        if padding_mode != "zeros":
            if isinstance(self.padding, str):
                raise ValueError("string padding needs padding_mode='zeros'")
            # same as nn.Conv2d: F.pad takes (left, right, top, bottom)
            self._reversed_padding_repeated_twice = tuple(x for x in reversed(self.padding) for _ in range(2))
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self._init_quant(shape, bits, method, granularity, packed, scale, breakpoint, dtype, device)
        self.bias = None if bias is None else nn.Parameter(bias.to(self.weight_packed.device, dtype),
                                                             requires_grad=False)

    def _natural_fusable(self) -> bool:
        # the fused kernel does groups 1 with numeric zero padding
        return (super()._natural_fusable() and self.groups == 1 and self.padding_mode == "zeros"
                and not isinstance(self.padding, str))

    def codes_channels_last_refusal(self) -> str | None:
        if len(self.weight_shape) != 4 or self.weight_shape[2] * self.weight_shape[3] <= 1:
            return (f"kernel size {self.kernel_size}: a 1x1 weight's (O, I, 1, 1) order already is its "
                    "channels-last order")
        if self.groups != 1:
            return f"groups={self.groups}: only groups=1 convolutions"
        kind = parse_granularity(self.granularity).kind
        if kind not in ("tensor", "channel"):
            return (f"granularity {self.granularity!r}: its groups run along each (I, KH, KW) row, whose order "
                    "this changes (only 'tensor' and 'channel')")
        return None

    def _output_rows(self, x: torch.Tensor) -> int:
        """Rows of the convolution as a GEMM: batch x output pixels."""
        if isinstance(self.padding, str):
            return 1 << 62
        oh, ow = (_fused.conv_output_size(x.shape[2 + i], self.kernel_size[i], self.stride[i], self.padding[i],
                                          self.dilation[i]) for i in range(2))
        return x.shape[0] * oh * ow

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, qt, device=None) -> "QuantConv2d":
        dtype = conv.bias.dtype if conv.bias is not None else qt.dtype
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size,
                   None if conv.bias is None else conv.bias.detach(), stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode, bits=qt.bits,
                   method=qt.method, granularity=qt.granularity, packed=qt.pack(), scale=qt.scale,
                   breakpoint=qt.breakpoint, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():     # (first: see QuantLinear.forward)
            if _PREFETCH_ENABLED and self._prefetch_slot is not None:
                return _PREFETCH_OP(x, *self._prefetch_slot)
            if _fused.MAX_ROWS > 0 and _fused_rows_ok(self, x, "conv"):
                return _fused.CONV_OP(x, *kernel_args(self), self.bias, self._plan_key, self.stride, self.padding,
                                      self.dilation)
            return self.compute(x, self._forward_weight())
        views = self._arm_cell[0]     # handed over by a prehook group's root (eager)
        w = self._eager_weight() if views is None else views[self._dq_index]
        if self.padding_mode != "zeros":
            return self.compute(x, w)
        return F.conv2d(x, w, _bias(self), self.stride, self.padding, self.dilation, self.groups)   # = compute's

    def compute(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None | bool = True) -> torch.Tensor:
        """This layer's convolution with a given dense weight (the weight prefetcher's,
        :mod:`quantsd.prefetch`); ``bias`` True: the layer's own."""
        bias = self.bias if bias is True else bias
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, " + self._quant_repr())


class _ArmedCalls:
    """The eager hot path's call for packed layers in prehook groups (:func:`set_armed_calls`): an
    armed layer's call goes straight to its op, anything else through ``nn.Module.__call__``.

    Why: an eager SD1.5 step is bound by the host's Python and makes 282 packed layer calls;
    ``nn.Module.__call__`` and the forward add three frames and their checks to each (~0.5 us of a
    ~4 us call on this project's CPU, ``bench/layer_forward_host_cpu.py``).  Taken only where
    ``nn.Module.__call__`` would do nothing but call ``forward``, and ``forward`` nothing but the op
    with the weight the layer's group handed over: one positional input, no hook on the layer or on
    every module, no forward set on the instance, no ``Module.compile``, no JIT tracing, and not
    while torch.compile traces.  A class of its own, set only on the members of eager prehook groups
    (:func:`quantsd.dequant_groups.group_dequant`), because Dynamo inlines a module class's own
    ``__call__``: on every packed layer that was ~10 more guards a layer in compiled graphs."""

    _conv = False       # the armed call is a convolution (ArmedQuantConv2d)

    def __call__(self, *args, **kwargs):
        if (torch.compiler.is_compiling() or kwargs or len(args) != 1
                or (views := self._arm_cell[0]) is None
                or self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                or self._backward_pre_hooks or _GLOBAL_FORWARD_HOOKS or _GLOBAL_FORWARD_PRE_HOOKS
                or _GLOBAL_BACKWARD_HOOKS or _GLOBAL_BACKWARD_PRE_HOOKS
                or self._compiled_call_impl is not None or "forward" in self.__dict__ or _jit_tracing()):
            return nn.Module.__call__(self, *args, **kwargs)
        weight = views[self._dq_index]
        params = self._parameters
        bias = params["bias"] if "bias" in params else self.bias    # (= _bias, without its frame)
        if not self._conv:
            return F.linear(args[0], weight, bias)
        if self.padding_mode != "zeros":
            return self.compute(args[0], weight, bias)
        return F.conv2d(args[0], weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _get_name(self) -> str:       # (printed as the layer it is)
        return type(self).__mro__[2].__name__


class ArmedQuantLinear(_ArmedCalls, QuantLinear):
    """A :class:`QuantLinear` in an eager prehook group (:class:`_ArmedCalls`)."""


class ArmedQuantConv2d(_ArmedCalls, QuantConv2d):
    """A :class:`QuantConv2d` in an eager prehook group (:class:`_ArmedCalls`)."""

    _conv = True


_ARMED_CLASS = {QuantLinear: ArmedQuantLinear, QuantConv2d: ArmedQuantConv2d}
_PLAIN_CLASS = {armed: plain for plain, armed in _ARMED_CLASS.items()}


def set_armed_calls(layer: nn.Module, on: bool) -> None:
    """Give a QuantLinear / QuantConv2d the armed call (:class:`_ArmedCalls`, ``on``) or take it back;
    any other module (a subclass of those included) is left as it is."""
    cls = type(layer)
    target = _ARMED_CLASS.get(cls) if on else _PLAIN_CLASS.get(cls)
    if target is not None:
        layer.__class__ = target


class QuantEmbedding(QuantModule):
    """``nn.Embedding`` with a packed table: forward gathers the codes of the looked-up rows and
    decodes only those (77 rows of a 49,408-row CLIP vocabulary), so the table stays packed on
    the GPU (8-bit: half the fp16 bytes).

    Exact: the decode is elementwise, so decoding gathered codes with their rows' parameters gives
    the very values the full decode (:func:`dequantize_weight`) has at those rows.  Rows must start
    on a byte boundary (``embedding_dim * bits % 8 == 0``, true for every SD text encoder); other
    shapes decode the whole table per call.  ``max_norm`` is not supported (SD does not use it).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, padding_idx: int | None = None, bits: int,
                 method: str, granularity: str, packed: torch.Tensor, scale: torch.Tensor,
                 breakpoint: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.padding_idx = padding_idx
        self._init_quant((self.num_embeddings, self.embedding_dim), bits, method, granularity, packed, scale,
                         breakpoint, dtype, device)
        self._row_bytes = self.embedding_dim * self.bits // 8 if (self.embedding_dim * self.bits) % 8 == 0 else None
        self._pshape = param_shape(self.weight_shape, self.granularity)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, qt, device=None) -> "QuantEmbedding":
        if emb.max_norm is not None:
            raise ValueError("QuantEmbedding does not support max_norm (it would rescale the stored table)")
        return cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, bits=qt.bits,
                   method=qt.method, granularity=qt.granularity, packed=qt.pack(), scale=qt.scale,
                   breakpoint=qt.breakpoint, dtype=emb.weight.dtype, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._row_bytes is None:
            return F.embedding(ids, self.dequantized_weight(), self.padding_idx)
        flat = ids.reshape(-1)
        n, dim = flat.numel(), self.embedding_dim
        rows = self.weight_packed.view(self.num_embeddings, self._row_bytes).index_select(0, flat)
        codes = unpack_bits(rows.reshape(-1), self.bits, n * dim)
        # the reference's grouped view (quant.granularity), with the looked-up rows in place of all
        # rows: (rows, parameters per row, group length), the parameters gathered to (rows, parameters
        # per row); per-tensor parameters: one group, the parameters as they are.  Explicit sizes, so
        # that no ids (n = 0) still make a valid view.
        if self._pshape:
            groups = self._pshape[1] if len(self._pshape) == 2 else 1
            cv = codes.view(n, groups, dim // groups)
            params = [None if t is None else t.float().index_select(0, flat).reshape(n, groups)
                      for t in (self.weight_scale, self.weight_breakpoint)]
        else:
            cv = codes
            params = [None if t is None else t.float() for t in (self.weight_scale, self.weight_breakpoint)]
        w = decode(cv, self.method, self.bits, *params)
        return w.reshape(*ids.shape, dim).to(self._dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, " + self._quant_repr()


def packed_modules(module: nn.Module):
    """(name, QuantModule) for every packed layer below ``module``."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, QuantModule)]


def densify_small_layers(module: nn.Module, max_params: int) -> int:
    """Replace packed Linear/Conv2d layers of at most ``max_params`` weights below ``module`` by dense
    ``nn.Linear`` / ``nn.Conv2d`` holding their decoded weights (the same values, bit for bit, in the
    compute dtype); returns how many were replaced.

    Why: each packed layer costs a dequant launch per forward, whatever its size; for the smallest
    layers that launch costs more time than their few bytes save (SD1.5: 55 of 282 UNet layers hold
    at most 262,144 weights, 13.7 MiB of fp16 together).  A trade of resident bytes for kernel
    count, off unless asked for."""
    if max_params <= 0:
        return 0
    if isinstance(module, QuantModule):
        raise ValueError("densify_small_layers replaces layers inside a module: pass the model, not the layer")
    todo = [(n, m) for n, m in module.named_modules()
            if isinstance(m, (QuantLinear, QuantConv2d)) and _numel(m.weight_shape) <= max_params]
    for _, m in todo:   # a grouped launch must not keep decoding a layer that is gone
        group = m._dq_group
        if group is not None:
            group.invalidate()
            for member in group.members:
                member._dq_group = None
    with torch.inference_mode(False), torch.no_grad():   # ordinary tensors, whatever the caller's mode
        _replace_dense(module, todo)
    return len(todo)


def _replace_dense(module: nn.Module, todo: list) -> None:
    for name, m in todo:
        w = m.dequantized_weight()
        bias = m.bias
        if isinstance(m, QuantLinear):
            dense = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device="meta")
        else:
            dense = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                              dilation=m.dilation, groups=m.groups, bias=bias is not None,
                              padding_mode=m.padding_mode, device="meta")
        dense.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        holder = module.get_submodule(parent) if parent else module
        dense.train(m.training)
        setattr(holder, child, dense)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
