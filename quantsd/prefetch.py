"""Weight prefetch for compiled packed models: decode the next layers' weights on a side stream
while the current layer computes.

    from quantsd.prefetch import enable_weight_prefetch
    enable_weight_prefetch(pipe.unet)            # packed model on the GPU, in its compute dtype
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")

Why: a compiled packed UNet step runs the dense step's kernels plus one dequant kernel per layer
(~1 ms of an ~7 ms SD1.5 step on an H200, bound by writing the fp16 weights).  Those kernels need
no activation, only codes, so they can run *ahead*, concurrently with the compute of earlier layers
(which leaves most of the GPU's memory bandwidth unused at 512²).  Measured upper bound
(``bench/overlap_probe.py``, H200): a dense step with every dequant of the step on a second stream
takes 1.08x the dense step, against 1.15x one after the other.

How: each prefetched layer, inside torch.compile, is one custom op ``quantsd::prefetched_layer``
(layer input in, layer output out: the decode-ahead bookkeeping and the layer's own
``F.linear``/``F.conv2d`` with the decoded weight).  The first compiled forward records the order
in which the layers run; from the second on, a :class:`RingPlan` packs that order into chunks of
consecutive layers, each chunk in one region of a ring buffer (allocated per forward,
``ring_bytes``, ``regions`` regions; double buffering with the default two).  A chunk's decodes are
enqueued on the side stream right after the last layer of the chunk that used its region before
(after an event on the compute stream), and its first layer waits for the chunk's event before its
GEMM.  Under CUDA graphs (``mode="reduce-overhead"``) this fork/join is captured once and replayed
with no host work.  Chunks, not single layers, because each cross-stream dependency costs time in
a graph replay: one wait and one event per layer (282 in SD1.5) made the step slower than no
prefetch at all (H200: 11.3 vs 8.2 ms).

Safety: a decode only ever overwrites bytes whose readers (GEMMs) were enqueued on the compute
stream before the event it waits for; every enqueued decode is waited for by its layer in the same
forward, so all side-stream work is joined back before the forward ends (a requirement of CUDA
graph capture).  A forward that runs the layers in another order than the recorded one stops
prefetching at the first difference (joins, then decodes each remaining layer in place, as
without prefetch) and, if the next forward differs too, the order is recorded again.  Weights are
the per-layer kernel's, bit for bit.
"""

from __future__ import annotations

import itertools
import weakref
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from . import nn as _nn
from .nn import QuantConv2d, QuantLinear, kernel_args

__all__ = ["RingPlan", "plan_ring", "WeightPrefetcher", "enable_weight_prefetch", "disable_weight_prefetch",
           "prefetcher_of", "ALIGN", "DEFAULT_MIN_REGION_BYTES"]

ALIGN = 256                         # bytes: every slot starts on a 256-byte boundary
DEFAULT_MIN_REGION_BYTES = 64 << 20


class RingPlan(NamedTuple):
    """Where each position of a forward's layer order decodes its weight, and when.

    The ring is cut into ``regions`` equal regions; consecutive positions are packed into *chunks*
    of at most one region, chunk c in region ``c % regions``.  A chunk is decoded as a whole (one
    wait on the compute stream, its layers' decodes, one event), so a forward has two cross-stream
    dependencies per chunk instead of two per layer.

    ``offsets[p]``: position p's first byte in the ring (None: larger than a region, or empty;
    decoded in place when the layer runs).  ``chunks[c]``: the positions of chunk c.
    ``wait_at[p]``: the chunk whose decode position p waits for (its first ring position), else None.
    ``initial``: chunks decoded when the forward starts (one per region).  ``issue_at[q]``: chunks
    decoded right after position q's layer has been enqueued (the last position of the chunk that
    used the same region before)."""

    offsets: list
    chunks: list
    wait_at: list
    initial: list
    issue_at: list


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_ring(sizes: Sequence[int], ring_bytes: int, regions: int = 2) -> RingPlan:
    """Chunks and slots in a ring of ``ring_bytes`` (``regions`` regions) for weights of ``sizes``
    bytes used in that order.  Chunk c (c >= regions) is issued after the last layer of chunk
    c - regions, the previous user of its region, which is always before its own first layer; so
    a decode never overwrites a weight whose layer has not been enqueued yet."""
    if regions < 1:
        raise ValueError(f"regions must be >= 1, got {regions}")
    region = ring_bytes // regions // ALIGN * ALIGN
    offsets: list = []
    chunks: list = []
    wait_at: list = []
    fill = region + 1    # bytes used in the current chunk (start with "full": the first layer opens one)
    for s in sizes:
        s = _aligned(int(s))
        if s == 0 or s > region:
            offsets.append(None)
            wait_at.append(None)
            continue
        if fill + s > region:
            chunks.append([])
            fill = 0
        c = len(chunks) - 1
        offsets.append((c % regions) * region + fill)
        wait_at.append(c if not chunks[c] else None)
        chunks[c].append(len(offsets) - 1)
        fill += s
    issue_at: list = [[] for _ in sizes]
    for c in range(regions, len(chunks)):
        issue_at[chunks[c - regions][-1]].append(c)
    return RingPlan(offsets, chunks, wait_at, list(range(min(regions, len(chunks)))), issue_at)


# --------------------------------------------------------------------------- registry + custom op
_REGISTRY: "dict[int, weakref.ref]" = {}
_IDS = itertools.count(1)


def _lookup(pid: int, index: int):
    ref = _REGISTRY.get(pid)
    pf = None if ref is None else ref()
    if pf is None:
        raise RuntimeError(f"weight prefetcher {pid} no longer exists (its model was freed or "
                           "disable_weight_prefetch was called after compiling): compile the model again")
    return pf, pf.layers[index]


def _register_op():
    @torch.library.custom_op("quantsd::prefetched_layer", mutates_args=())
    def _op(x: torch.Tensor, prefetcher: int, index: int) -> torch.Tensor:
        pf, _ = _lookup(prefetcher, index)
        return pf.run(index, x)

    @_op.register_fake
    def _(x, prefetcher, index):
        pf, layer = _lookup(prefetcher, index)
        if isinstance(layer, QuantLinear):
            return x.new_empty((*x.shape[:-1], layer.out_features))
        y = layer.compute(x, x.new_empty(layer.weight_shape), None)   # the real op's shape
        if pf.channels_last_output(layer, x.device):   # the real op's layout, stated (meta may not infer it)
            return y.contiguous(memory_format=torch.channels_last)
        return y

    return _op


PREFETCH_OP = _register_op()   # at import: registering inside a traced region would break the graph
_nn._PREFETCH_OP = PREFETCH_OP


# --------------------------------------------------------------------------- the prefetcher
def _nbytes(layer) -> int:
    n = 1
    for s in layer.weight_shape:
        n *= s
    return n * torch.empty((), dtype=layer._dtype).element_size()


class WeightPrefetcher:
    """Decode-ahead state of one model's packed Linear/Conv2d layers (see the module docstring).

    ``stats``: forwards run with a plan, layers decoded ahead / in place, order changes seen."""

    def __init__(self, layers: Sequence[nn.Module], ring_bytes: Optional[int] = None, regions: int = 2,
                 channels_last_convs: Optional[bool] = None):
        self.layers = list(layers)
        self.channels_last_convs = channels_last_convs
        if not self.layers:
            raise ValueError("no packed Linear/Conv2d layers to prefetch")
        if int(regions) < 1:
            raise ValueError(f"regions must be >= 1, got {regions}")
        self.regions = int(regions)
        largest = max(_nbytes(m) for m in self.layers)
        self.ring_bytes = int(ring_bytes) if ring_bytes is not None else \
            self.regions * max(DEFAULT_MIN_REGION_BYTES, _aligned(largest))
        if self.ring_bytes <= 0:
            raise ValueError(f"ring_bytes must be positive, got {ring_bytes}")
        self.id = next(_IDS)
        _REGISTRY[self.id] = weakref.ref(self)
        self.order: list[int] = []          # layer indices in the recorded call order
        self._recording: Optional[list] = []  # the order being recorded (None: an order is in use)
        self._relearn = False
        self._plan: Optional[RingPlan] = None
        self._plan_sig = None
        self._pos = 0                        # next position of the active forward
        self._active = False                 # a forward with a plan is running
        self._ring: Optional[torch.Tensor] = None
        self._issued: list = []
        self._ready: list = []               # CUDA events, one per chunk
        self._side: Optional[torch.cuda.Stream] = None
        self.stats = {"forwards": 0, "ahead": 0, "in_place": 0, "order_changes": 0}

    # ---- the op's body
    def run(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s output for input ``x`` (called by the custom op, in call order)."""
        layer = self.layers[index]
        pos = self._advance(index, x.device)
        if pos is None:
            self.stats["in_place"] += 1
            y = layer.compute(x, layer.dequantized_weight())
        else:
            y = layer.compute(x, self._take(pos, layer))
            self._issue(self._plan.issue_at[pos], x.device)
            if pos == len(self.order) - 1:
                self._end()
        if self.channels_last_output(layer, x.device):   # the layout the fake impl states, whichever path ran
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def _advance(self, index: int, device: torch.device) -> Optional[int]:
        """This call's position in the planned order, or None (decode in place)."""
        if self._recording is not None:
            if index not in self._recording:
                self._recording.append(index)
                return None
            self.order, self._recording = self._recording, None   # a repeat: the first forward is complete
            self._plan_sig = None
            if index != self.order[0]:
                return None
        if index == self.order[0]:
            if not self._start(device):   # (recording the order again)
                return None
        elif not self._active:
            return None
        pos = self._pos
        if pos >= len(self.order) or self.order[pos] != index:
            self._diverge()
            return None
        self._pos = pos + 1
        return pos

    def _start(self, device: torch.device):
        """A new forward (the first layer of the order runs): a fresh ring, the first decodes.  False
        when the order is to be recorded again instead."""
        if self._active:
            self._end()
        if self._relearn:   # the previous forward differed from the order too: record it again
            self._relearn = False
            self.stats["order_changes"] += 1
            self._recording = [self.order[0]]
            self.order = []
            return False
        sig = (device, tuple(m._dtype for m in self.layers))
        if sig != self._plan_sig:
            self._plan = plan_ring([_nbytes(self.layers[i]) for i in self.order], self.ring_bytes, self.regions)
            self._plan_sig = sig
            if device.type == "cuda":
                self._ready = [torch.cuda.Event() for _ in self._plan.chunks]
        if device.type == "cuda" and (self._side is None or self._side.device != device):
            self._side = torch.cuda.Stream(device=device)
        self._ring = torch.empty(self.ring_bytes, dtype=torch.uint8, device=device)
        self._issued = [False] * len(self.order)
        self._active, self._pos = True, 0
        self.stats["forwards"] += 1
        self._issue(self._plan.initial, device)
        return True

    def _issue(self, chunks: list, device: torch.device) -> None:
        """Decode the layers of ``chunks`` into their slots: on the side stream after everything
        enqueued so far on the compute stream (CUDA), one event per chunk; else right here."""
        if not chunks or not self._active:
            return
        plan = self._plan
        if device.type == "cuda":
            main = torch.cuda.current_stream(device)
            self._side.wait_stream(main)
            with torch.cuda.stream(self._side):
                for c in chunks:
                    for p in plan.chunks[c]:
                        self._decode(p)
                    self._ready[c].record(self._side)
        else:
            for c in chunks:
                for p in plan.chunks[c]:
                    self._decode(p)

    def channels_last(self, layer, device: torch.device) -> bool:
        """Is ``layer``'s weight decoded channels-last on ``device``?  Convolutions with a kernel
        larger than 1x1 on CUDA (``channels_last`` None) or wherever asked (True).  Why: with the
        convolutions inside an opaque op, Inductor no longer switches the graph to channels-last as
        it does for a dense UNet; a channels-last weight makes cuDNN run (and output) channels-last,
        so the activations stay in the layout the dense compiled graph uses, and no weight is
        converted on the compute stream."""
        return self.channels_last_output(layer, device) and layer.kernel_size != (1, 1)

    def channels_last_output(self, layer, device: torch.device) -> bool:
        """Is ``layer``'s output channels-last on ``device``?  Every convolution's, in channels-last
        mode: stated by the op's fake impl and enforced by the op, so the compiled graph's layouts
        never depend on what a backend's convolution picks (meta and cuDNN/oneDNN can disagree)."""
        if not isinstance(layer, QuantConv2d):
            return False
        return device.type == "cuda" if self.channels_last_convs is None else bool(self.channels_last_convs)

    def _slot(self, p: int, layer) -> torch.Tensor:
        off = self._plan.offsets[p]
        flat = self._ring[off:off + _nbytes(layer)].view(layer._dtype)
        if self.channels_last(layer, flat.device):
            o, i, kh, kw = layer.weight_shape
            return flat.view(o, kh, kw, i).permute(0, 3, 1, 2)
        return flat.view(layer.weight_shape)

    def _decode(self, p: int) -> None:
        layer = self.layers[self.order[p]]
        out = self._slot(p, layer)
        cl = layer._codes_cl   # codes stored in (O, KH, KW, I) order: the flat decode writes that order
        if layer._lut is not None and layer._kernel_dtype_ok and (cl is None or not out.is_contiguous()):
            from .kernels.dequant import launch_into

            launch_into(layer._plan, *kernel_args(layer), out if cl is None else out.permute(0, 2, 3, 1))
        else:   # no kernel on this device, or an NCHW slot for channels-last codes: the layer's decode, copied in
            out.copy_(layer.dequantized_weight())
        self._issued[p] = True

    def _take(self, pos: int, layer) -> torch.Tensor:
        if not self._issued[pos]:   # too large for the ring
            self.stats["in_place"] += 1
            return layer.dequantized_weight()
        self.stats["ahead"] += 1
        c = self._plan.wait_at[pos]
        if c is not None and self._ring.is_cuda:
            torch.cuda.current_stream(self._ring.device).wait_event(self._ready[c])
        return self._slot(pos, layer)

    def _join(self) -> None:
        if self._side is not None and self._ring is not None and self._ring.is_cuda:
            torch.cuda.current_stream(self._ring.device).wait_stream(self._side)

    def _end(self) -> None:
        """The forward is over (or abandoned): join the side stream, drop the ring."""
        self._join()
        self._ring = None
        self._active = False

    def _diverge(self) -> None:
        if self._active:
            self._end()
        self._relearn = True


# --------------------------------------------------------------------------- public API
def _eligible(m: nn.Module) -> bool:
    return isinstance(m, (QuantLinear, QuantConv2d))


def enable_weight_prefetch(model: nn.Module, ring_bytes: Optional[int] = None, regions: int = 2,
                           channels_last_convs: Optional[bool] = None) -> WeightPrefetcher:
    """Attach a :class:`WeightPrefetcher` to ``model``'s packed Linear/Conv2d layers; it acts in
    compiled forwards (``torch.compile``), compile afterwards.  ``ring_bytes``: the per-forward
    buffer of decoded weights, cut into ``regions`` regions (default: ``regions`` times the largest
    layer's dense weight, at least 64 MiB each; SD1.5 fp16: 128 MiB, alive while the UNet runs,
    where the per-layer path held one transient weight at a time).  ``channels_last_convs``: decode
    k x k convolution weights channels-last (default: on CUDA; see :meth:`WeightPrefetcher.channels_last`)."""
    if isinstance(model, (QuantLinear, QuantConv2d)):
        raise ValueError("enable_weight_prefetch takes the model, not one layer")
    disable_weight_prefetch(model)
    layers = [m for _, m in model.named_modules() if _eligible(m)]
    pf = WeightPrefetcher(layers, ring_bytes, regions, channels_last_convs)
    for i, m in enumerate(layers):
        m._prefetch_slot = (pf.id, i)
    _nn._PREFETCH_ENABLED = True       # (compiled forwards look at the slots from now on)
    model._quantsd_prefetcher = pf
    return pf


def prefetcher_of(model: nn.Module) -> Optional[WeightPrefetcher]:
    return getattr(model, "_quantsd_prefetcher", None)


def disable_weight_prefetch(model: nn.Module) -> None:
    """Back to one dequant op per layer (recompile a model compiled with prefetch)."""
    pf = prefetcher_of(model)
    for _, m in model.named_modules():
        if _eligible(m):
            m._prefetch_slot = None
    if pf is not None:
        if pf._active:
            pf._end()
        _REGISTRY.pop(pf.id, None)
        del model._quantsd_prefetcher
