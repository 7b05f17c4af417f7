"""Run a model's training step on the ``meta`` device and track the bytes it keeps alive.

No memory and almost no time is spent: every op runs on ``meta`` tensors, a
``TorchDispatchMode`` sees each storage an op creates, and a weak reference tells when the
storage dies.  The peak of live bytes — split by what the storages are (inputs,
activations, attention buffers, backward temporaries, gradients) — is what a real device
would hold (less allocator rounding and library workspaces).

Attention is modelled, not run: ``F.scaled_dot_product_attention`` and
``torch.ops.ringfx.ring_attention`` calls are replaced by an autograd function that
allocates what the runtime contract says (``memory.ring_attention_buffers``) at the moment
the contract says, saves q, k, v, out, lse, and returns correctly shaped outputs.

    before:  out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    here:    out = _ModeledAttention.apply(q, k, v, <contract, local length s>)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import weakref
from fractions import Fraction
from typing import Callable, Optional, Sequence

import numpy
import sympy
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .._compat import SDPA_BINDING, TorchDispatchMode, tree_flatten, tree_map
from .memory import AttentionShape, blockwise_loss_buffers, ring_attention_buffers, s_local, sdpa_buffers
from .models import unpacked_sequences_on_meta

log = logging.getLogger("ringfx.planner")

INPUTS, ACTIVATIONS, ATTENTION, BACKWARD, GRADIENTS, BUFFERS, LOGITS = (
    "inputs", "activations", "attention buffers", "backward temporaries", "gradients", "buffers", "logits and loss")


CATEGORIES = (INPUTS, BUFFERS, ACTIVATIONS, ATTENTION, LOGITS, BACKWARD, GRADIENTS)


class _LiveBytes(TorchDispatchMode):
    """Live storage bytes by category after every op: the trace the memory model is fitted on.

    A storage's Python object lives exactly as long as its storage (torch preserves it while
    any tensor or saved variable holds the storage), so a weak reference's callback tells
    the moment it dies: no scan over the live storages per op.
    """

    def __init__(self):
        super().__init__()
        self.live = {}            # storage cdata -> [weak ref, bytes, category]
        self.excluded = set()     # storages counted elsewhere (parameters)
        self.category = ACTIVATIONS
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.trace = []           # one tuple of category totals per event, in CATEGORIES order

    def _sweep(self):
        """Deaths are counted by the weak references' callbacks; kept for the callers that
        want the totals settled (a no-op)."""

    def _died(self, key):
        entry = self.live.pop(key, None)
        if entry is not None:
            self.totals[entry[2]] -= entry[1]

    def register(self, tensor: torch.Tensor, category: Optional[str]):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if category is None:
            self.excluded.add(key)
            return
        if key in self.live or key in self.excluded:
            return
        ref = weakref.ref(storage, lambda _, key=key, died=self._died: died(key))
        self.live[key] = [ref, storage.nbytes(), category]
        self.totals[category] += storage.nbytes()

    def snapshot(self):
        self.trace.append(tuple(self.totals[c] for c in CATEGORIES))

    def relabel(self, tensor: torch.Tensor, category: str):
        """A storage turned out to be something else (a parameter's gradient)."""
        entry = self.live.get(tensor.untyped_storage()._cdata)
        if entry is None or entry[2] == category:
            return
        self.totals[entry[2]] -= entry[1]
        self.totals[category] += entry[1]
        entry[2] = category

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.register(t, self.category)
        self.snapshot()
        return out


class _ModeledAttention(torch.autograd.Function):
    """Allocates the contract's buffers; computes nothing."""

    @staticmethod
    def forward(ctx, q, k, v, model, causal):
        tracker, ring, query_chunks, kernel = model
        att = _shape_of(q, k, causal)
        s = q.shape[-2]
        buffers = ring_attention_buffers(att, s, query_chunks=query_chunks, kernel=kernel) if ring else \
            sdpa_buffers(att, s, kernel=kernel)
        category = tracker.category
        tracker.category = ATTENTION
        # the ring's float32 lse accumulator is the lse it saves: a real tensor, not a blob
        persistent = [_blob(n) for _, n in buffers["forward_persistent"][:1]]
        tracker.category = category
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        tracker.category = ATTENTION
        steps = [_blob(n) for _, n in buffers["forward_steps"]]
        del steps
        tracker.category = category
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        del persistent
        ctx.model, ctx.causal = model, causal
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        tracker, ring, query_chunks, kernel = ctx.model
        q, k, v, out, lse = ctx.saved_tensors
        att = _shape_of(q, k, ctx.causal)
        s = q.shape[-2]
        buffers = ring_attention_buffers(att, s, query_chunks=query_chunks, kernel=kernel) if ring else \
            sdpa_buffers(att, s, kernel=kernel)
        category = tracker.category
        tracker.category = ATTENTION
        persistent = [_blob(n) for _, n in buffers["backward_persistent"]]
        steps = [_blob(n) for _, n in buffers["backward_steps"]]
        del steps
        tracker.category = category
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del persistent
        return dq, dk, dv, None, None


class _ModeledBlockwiseLoss(torch.autograd.Function):
    """``ringfx::linear_cross_entropy`` as its contract says (``memory.blockwise_loss_buffers``):
    per-chunk temporaries that live only inside the op, the float32 dW accumulator through its
    backward, nothing of size vocab saved."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, tracker):
        buffers = blockwise_loss_buffers(hidden.shape[-1], weight.shape[0], hidden.element_size(), chunk,
                                         bias=bias is not None)
        category, tracker.category = tracker.category, LOGITS
        steps = [_blob(n) for _, n in buffers["forward_steps"]]
        del steps
        tracker.category = category
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.buffers, ctx.tracker = buffers, tracker
        return (torch.empty((), dtype=torch.float32, device=hidden.device),
                torch.empty((), dtype=torch.int64, device=hidden.device))

    @staticmethod
    def backward(ctx, grad, _grad_count):
        hidden, weight, bias, labels = ctx.saved_tensors
        tracker = ctx.tracker
        category, tracker.category = tracker.category, LOGITS
        persistent = [_blob(n) for _, n in ctx.buffers["backward_persistent"]]
        steps = [_blob(n) for _, n in ctx.buffers["backward_steps"]]
        del steps
        tracker.category = category
        dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        db = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device) if bias is not None else None
        del persistent
        return dh, dw, db, None, None, None


class _ModeledRMSNorm(torch.autograd.Function):
    """``F.rms_norm`` as CUDA runs it: one fused kernel that saves the input and the float32
    reciprocal RMS (on CPU and meta it decomposes into several saved fp32 intermediates)."""

    @staticmethod
    def forward(ctx, x, weight):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, weight, rstd)
        ctx.has_weight = weight is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if ctx.has_weight else None
        return dx, dw


def _blob(nbytes) -> torch.Tensor:
    return torch.empty(int(math.ceil(float(nbytes))), dtype=torch.uint8, device="meta")


def _shape_of(q: torch.Tensor, k: torch.Tensor, causal: bool = False) -> AttentionShape:
    if q.dim() < 3:
        raise ValueError(f"attention inputs must be (..., heads, seq, head_dim); got q of shape {tuple(q.shape)}")
    batch = math.prod(q.shape[:-3])
    return AttentionShape(batch=batch, q_heads=q.shape[-3], kv_heads=k.shape[-3], head_dim=q.shape[-1],
                          dtype_bytes=q.element_size(), causal=causal)


class _AttentionSwap(TorchFunctionMode):
    """Sends SDPA and ringfx ring attention to ``_ModeledAttention``, ringfx's blockwise loss
    to ``_ModeledBlockwiseLoss`` (and ``F.rms_norm`` to its fused CUDA form); records the
    attention calls."""

    def __init__(self, tracker, ring, query_chunks, kernel):
        super().__init__()
        self.model = (tracker, ring, query_chunks, kernel)
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention or func is SDPA_BINDING:
            q, k, v = args[:3]
            causal = bool(kwargs.get("is_causal", args[5] if len(args) > 5 else False))
            self.calls.append(_shape_of(q, k, causal))
            return _ModeledAttention.apply(q, k, v, self.model, causal)
        if func is F.rms_norm or func is torch.rms_norm:
            x, shape = args[0], args[1]
            weight = args[2] if len(args) > 2 else kwargs.get("weight")
            if len(shape) == 1 and (weight is None or weight.dim() == 1):
                return _ModeledRMSNorm.apply(x, weight)
            return func(*args, **kwargs)
        if "ringfx" in str(func) and "linear_cross_entropy" in str(func) and "backward" not in str(func):
            hidden, weight, bias, labels = args[:4]
            chunk = args[7] if len(args) > 7 else kwargs["chunk"]
            return _ModeledBlockwiseLoss.apply(hidden, weight, bias, labels, chunk, self.model[0])
        if "ringfx" in str(func) and "ring_attention" in str(func) and "backward" not in str(func):
            q, k, v = args[:3]
            causal = bool(args[8]) if len(args) > 8 else bool(kwargs.get("causal", False))
            self.calls.append(_shape_of(q, k, causal))
            out = _ModeledAttention.apply(q, k, v, self.model, causal)
            return out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        return func(*args, **kwargs)


@dataclasses.dataclass
class StepPeak:
    """One simulated step: the peak, its split by category, the attention calls seen."""

    peak: int
    split: dict
    attention: list
    trace: list = dataclasses.field(default_factory=list, repr=False)
    # where each layer of the longest ModuleList runs in ``trace`` (``mark_layers=True``), or None
    marks: Optional["LayerMarks"] = None


@dataclasses.dataclass
class LayerMarks:
    """Trace indices of the layers: ``forward[k]`` where layer k's forward starts, ``forward_end``
    where the last layer's ends; ``backward[k]`` where the gradient of layer k's output is
    complete (its backward starts: recomputation included), ``backward_end`` where the gradient
    of the first layer's input is (None without a backward)."""

    forward: list
    forward_end: Optional[int] = None
    backward: list = dataclasses.field(default_factory=list)
    backward_end: Optional[int] = None


@contextlib.contextmanager
def _layers_marked(module: torch.nn.Module, tracker: _LiveBytes, marks: Optional[LayerMarks]):
    """Fill ``marks`` from hooks on the model's layers (a recomputation calls the layer's own
    forward, not the module, so the hooks see the step's forward only)."""
    layers = _layer_list(module) if marks is not None else None
    if layers is None:
        yield
        return
    marks.backward = [None] * len(layers)

    def before(k):
        def hook(_, args):
            marks.forward.append(len(tracker.trace))
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if k == 0 and first is not None and first.requires_grad:
                first.register_hook(lambda grad: setattr(marks, "backward_end", len(tracker.trace)))
        return hook

    def after(k):
        def hook(_, __, output):
            if k == len(layers) - 1:
                marks.forward_end = len(tracker.trace)
            first = next((t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad), None)
            if first is not None:
                first.register_hook(lambda grad: marks.backward.__setitem__(k, len(tracker.trace)))
        return hook

    handles = [h for k, layer in enumerate(layers)
               for h in (layer.register_forward_pre_hook(before(k)), layer.register_forward_hook(after(k)))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def default_loss(output, inputs):
    """Sum of the first floating output: its backward allocates nothing of its own."""
    for t in tree_flatten(output)[0]:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.sum()
    raise ValueError("the model returned no floating tensor; pass loss_fn=(output, inputs) -> scalar")


def _layer_list(module: torch.nn.Module):
    lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList) and len(m) >= 2]
    return max(lists, key=len) if lists else None


@contextlib.contextmanager
def _checkpointed(module: torch.nn.Module, swap: "_AttentionSwap"):
    """Wrap each layer of the model's longest ModuleList in non-reentrant checkpointing.

    The recomputation runs inside backward, where torch-function modes of the forward are
    not active: ``context_fn`` enters a twin of the attention swap for it.
    """
    layers = _layer_list(module)
    if layers is None:
        raise ValueError("activation_checkpointing=True but the model has no nn.ModuleList of layers to "
                         "checkpoint; checkpoint it yourself (torch.utils.checkpoint) and leave the option off")
    patched = []
    for layer in layers:
        if "forward" not in layer.__dict__:
            layer.forward = functools.partial(
                torch.utils.checkpoint.checkpoint, type(layer).forward.__get__(layer), use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _AttentionSwap(*swap.model)))
            patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward


@contextlib.contextmanager
def _head_marked(module: torch.nn.Module, tracker: _LiveBytes):
    """Storages made after the last layer (final norm, logits, loss) and, in backward,
    before the gradient reaches the last layer's output are "logits and loss"."""
    layers = _layer_list(module)
    if layers is None:
        yield
        return

    def after_last(_, __, output):
        if tracker.category != ACTIVATIONS:  # a recomputation inside backward
            return
        tracker.category = LOGITS
        first = next((t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad), None)
        if first is not None:
            first.register_hook(lambda grad: setattr(tracker, "category", BACKWARD))

    handle = layers[-1].register_forward_hook(after_last)
    try:
        yield
    finally:
        handle.remove()


def to_meta(x):
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta").requires_grad_(x.requires_grad)
    return x


def simulate_step(
    module: torch.nn.Module,
    inputs: tuple,
    *,
    training: bool = True,
    ring: bool = True,
    query_chunks: int = 1,
    kernel: str = "cudnn",
    activation_checkpointing: bool = False,
    loss_fn: Optional[Callable] = None,
    mark_layers: bool = False,
) -> StepPeak:
    """Peak live bytes of one forward (+ loss + backward when ``training``) on meta tensors.

    ``inputs`` are the model's positional inputs at the *local* length; they are turned
    into meta tensors.  Parameters are excluded from the count (``memory.static_terms``
    counts them, divided by ``param_shards`` when sharded); their gradients are counted.
    ``mark_layers``: record where each layer runs in the trace (``StepPeak.marks``).
    """
    tracker = _LiveBytes()
    params = {name: to_meta(p) for name, p in module.named_parameters()}
    for p in params.values():
        p.requires_grad_(training and p.requires_grad)
        tracker.register(p, None)
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda param: tracker.relabel(param.grad, GRADIENTS))
    buffers = {name: to_meta(b) for name, b in module.named_buffers()}
    for b in buffers.values():
        tracker.register(b, BUFFERS)
    meta_inputs = tree_map(to_meta, tuple(inputs))
    for t in tree_flatten(meta_inputs)[0]:
        if isinstance(t, torch.Tensor):
            tracker.register(t, INPUTS)
    swap = _AttentionSwap(tracker, ring, query_chunks, kernel)
    loss_fn = loss_fn or default_loss
    state = {**params, **buffers}
    ckpt = _checkpointed(module, swap) if (activation_checkpointing and training) else contextlib.nullcontext()
    grad = torch.enable_grad() if training else torch.no_grad()
    # the swap of parameters stays on through backward: checkpointed layers recompute there
    reparametrized = torch.nn.utils.stateless._reparametrize_module(module, state, tie_weights=True)
    marks = LayerMarks(forward=[]) if mark_layers else None
    with reparametrized, ckpt, grad, unpacked_sequences_on_meta(), tracker, swap, _head_marked(module, tracker), \
            _layers_marked(module, tracker, marks):
        output = module(*meta_inputs)
        if training:
            loss = loss_fn(output, meta_inputs)
            del output
            # what backward allocates before it reaches the last layer is the loss's and the head's
            tracker.category = LOGITS if _layer_list(module) is not None else BACKWARD
            loss.backward()
            del loss
        tracker._sweep()
    trace = tracker.trace
    peak_at = max(range(len(trace)), key=lambda i: sum(trace[i])) if trace else 0
    split = {c: v for c, v in zip(CATEGORIES, trace[peak_at]) if v} if trace else {}
    return StepPeak(peak=sum(split.values()), split=split, attention=swap.calls, trace=trace,
                    marks=marks if marks is not None and marks.forward else None)


# -- fitting: a polynomial in the local length, then s = S/P -------------------------------------


def quadratic_predicts(traces: Sequence[list], xs: Sequence[int], x: int, actual: list) -> bool:
    """Whether ``actual`` (a trace at length ``x``) is, event by event and category by
    category, the quadratic through the same events of ``traces`` at the three lengths
    ``xs``: Lagrange's formula in integers, no rounding."""
    x0, x1, x2 = (int(n) for n in xs)
    d0, d1, d2 = (x0 - x1) * (x0 - x2), (x1 - x0) * (x1 - x2), (x2 - x0) * (x2 - x1)
    big_d = d0 * d1 * d2
    w0, w1, w2 = ((x - x1) * (x - x2) * d1 * d2, (x - x0) * (x - x2) * d0 * d2, (x - x0) * (x - x1) * d0 * d1)
    if any(len(t) != len(actual) for t in traces):
        return False
    return all(big_d * a == y0 * w0 + y1 * w1 + y2 * w2
               for e0, e1, e2, ea in zip(*traces, actual) for y0, y1, y2, a in zip(e0, e1, e2, ea))


def fit_peak_envelope(runs: Sequence[StepPeak], points: Sequence[int],
                      check: Optional[tuple[int, StepPeak]] = None) -> tuple:
    """The peak as a function of the local length s: ``max_i p_i(s)`` over the step's events.

    Live bytes after event i of the step are a polynomial p_i(s) in the local length (the
    same program runs at every length; tensors grow with s).  Each event's polynomial
    (degree <= 2) is read off ``runs``, the traces at the three lengths ``points`` (exact
    rationals), and checked against ``check = (length, run)`` when given (without one the
    caller has checked the fit: ``layer_extrapolation.extrapolated_runs``); only events that
    are the peak at some s (sampled from 1 to 2^40 tokens) are kept.  Returns
    ``(envelope, attention calls, exact)`` where ``envelope`` is a list of
    ``{category: polynomial in s}`` (one per surviving event) and ``exact`` says whether
    the check agreed.
    """
    lengths = {len(r.trace) for r in runs} | ({len(check[1].trace)} if check is not None else set())
    if len(lengths) != 1:
        raise ValueError(f"the model runs a different program at different lengths ({sorted(lengths)} events); "
                         "its memory cannot be fitted symbolically")
    xs = [int(n) for n in points]
    if len(xs) != 3 or len(runs) != 3:
        raise ValueError(f"fit_peak_envelope: three lengths and three runs, got {len(xs)} and {len(runs)}")
    # events with the same live bytes at the three fitting lengths are the same polynomial
    first = {}
    for i, key in enumerate(zip(*(r.trace for r in runs))):
        first.setdefault(key, i)
    events = sorted(first.values())
    (x0, x1, x2) = xs

    def coefficients(y0, y1, y2):  # Lagrange on three points, exactly: (c0, c1, c2)
        d0, d1, d2 = (x0 - x1) * (x0 - x2), (x1 - x0) * (x1 - x2), (x2 - x0) * (x2 - x1)
        c2 = Fraction(y0, d0) + Fraction(y1, d1) + Fraction(y2, d2)
        c1 = -(Fraction(y0 * (x1 + x2), d0) + Fraction(y1 * (x0 + x2), d1) + Fraction(y2 * (x0 + x1), d2))
        c0 = Fraction(y0 * x1 * x2, d0) + Fraction(y1 * x0 * x2, d1) + Fraction(y2 * x0 * x1, d2)
        return c0, c1, c2

    # Totals first, in integers: Lagrange's coefficients times D = d0 d1 d2 (exact, and N / D is
    # the correctly rounded float of the same rational the per-category Fractions would sum to);
    # the per-category Fractions only for the events that are kept.
    d0, d1, d2 = (x0 - x1) * (x0 - x2), (x1 - x0) * (x1 - x2), (x2 - x0) * (x2 - x1)
    w0, w1, w2, big_d = d1 * d2, d0 * d2, d0 * d1, d0 * d1 * d2
    t0, t1, t2 = (tuple(map(sum, r.trace)) for r in runs)
    numerators = [(y0 * x1 * x2 * w0 + y1 * x0 * x2 * w1 + y2 * x0 * x1 * w2,
                   -(y0 * (x1 + x2) * w0 + y1 * (x0 + x2) * w1 + y2 * (x0 + x1) * w2),
                   y0 * w0 + y1 * w1 + y2 * w2)
                  for y0, y1, y2 in ((t0[i], t1[i], t2[i]) for i in events)]
    totals = numpy.array([[n / big_d for n in line] for line in numerators], dtype=numpy.float64).reshape(-1, 3)
    exact = True
    if check is not None:
        x3 = int(check[0])
        t3 = check[1].trace
        exact = all(n0 + n1 * x3 + n2 * x3 * x3 == big_d * sum(t3[i]) for (n0, n1, n2), i in zip(numerators, events))
    # keep the events that are the peak somewhere: sampled at s = 2^(k/4) up to 2^40 tokens
    # (numpy evaluates t0 + t1 x + t2 x x in the same order as Python floats; argmax takes the first maximum)
    samples = [2.0 ** (k / 4) for k in range(161)] + [float(n) for n in xs] + ([float(check[0])] if check else [])
    kept = sorted({int(numpy.argmax(totals[:, 0] + totals[:, 1] * x + totals[:, 2] * x * x)) for x in samples})
    coeffs = {i: [coefficients(*(runs[k].trace[events[i]][c] for k in range(3))) for c in range(len(CATEGORIES))]
              for i in kept}
    envelope = []
    for i in kept:
        terms = {}
        for c, (c0, c1, c2) in zip(CATEGORIES, coeffs[i]):
            poly = sympy.Rational(c0) + sympy.Rational(c1) * s_local + sympy.Rational(c2) * s_local ** 2
            if poly != 0:
                terms[c] = poly
        envelope.append(terms)
    if not exact:
        log.warning("memory fit is not exact at s=%d: the model's tensors do not grow polynomially in the "
                    "sequence; predictions between the fitted lengths are approximate", check[0])
    return envelope, runs[0].attention, exact
