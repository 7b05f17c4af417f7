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
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .memory import AttentionShape, ring_attention_buffers, sdpa_buffers

log = logging.getLogger("ringfx.planner")

INPUTS, ACTIVATIONS, ATTENTION, BACKWARD, GRADIENTS, BUFFERS = (
    "inputs", "activations", "attention buffers", "backward temporaries", "gradients", "buffers")


class _LiveBytes(TorchDispatchMode):
    """Live storage bytes by category, and the peak with its split."""

    def __init__(self):
        super().__init__()
        self.live = {}            # storage cdata -> [weak ref, bytes, category, serial]
        self.excluded = set()     # storages counted elsewhere (parameters)
        self.category = ACTIVATIONS
        self.current = 0
        self.peak = 0
        self.peak_split = {}
        self.peak_serials = set()
        self._serial = 0

    def _sweep(self):
        dead = [key for key, entry in self.live.items() if entry[0].expired()]
        for key in dead:
            self.current -= self.live.pop(key)[1]

    def register(self, tensor: torch.Tensor, category: Optional[str]):
        storage = tensor.untyped_storage()
        ref = StorageWeakRef(storage)
        if category is None:
            self.excluded.add(ref.cdata)
            return
        if ref.cdata in self.live or ref.cdata in self.excluded:
            return
        self._serial += 1
        self.live[ref.cdata] = [ref, storage.nbytes(), category, self._serial]
        self.current += storage.nbytes()
        if self.current > self.peak:
            self.peak = self.current
            split = {}
            for _, nbytes, cat, _ in self.live.values():
                split[cat] = split.get(cat, 0) + nbytes
            self.peak_split = split
            self.peak_serials = {entry[3] for entry in self.live.values()}

    def relabel(self, tensor: torch.Tensor, category: str):
        """A storage turned out to be something else (a parameter's gradient)."""
        entry = self.live.get(StorageWeakRef(tensor.untyped_storage()).cdata)
        if entry is None or entry[2] == category:
            return
        if entry[3] in self.peak_serials:
            self.peak_split[entry[2]] -= entry[1]
            self.peak_split[category] = self.peak_split.get(category, 0) + entry[1]
        entry[2] = category

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.register(t, self.category)
        return out


class _ModeledAttention(torch.autograd.Function):
    """Allocates the contract's buffers; computes nothing."""

    @staticmethod
    def forward(ctx, q, k, v, model):
        tracker, ring, query_chunks, kernel = model
        att = _shape_of(q, k)
        s = q.shape[-2]
        buffers = ring_attention_buffers(att, s, query_chunks=query_chunks, kernel=kernel) if ring else \
            sdpa_buffers(att, s, kernel=kernel)
        category = tracker.category
        tracker.category = ATTENTION
        persistent = [_blob(n) for _, n in buffers["forward_persistent"][:1]]  # out accumulator (ring)
        steps = [_blob(n) for _, n in buffers["forward_steps"]]
        del steps
        tracker.category = category
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        del persistent
        ctx.model = model
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        tracker, ring, query_chunks, kernel = ctx.model
        q, k, v, out, lse = ctx.saved_tensors
        att = _shape_of(q, k)
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
        return dq, dk, dv, None


def _blob(nbytes) -> torch.Tensor:
    return torch.empty(int(math.ceil(float(nbytes))), dtype=torch.uint8, device="meta")


def _shape_of(q: torch.Tensor, k: torch.Tensor, causal: bool = False) -> AttentionShape:
    if q.dim() < 3:
        raise ValueError(f"attention inputs must be (..., heads, seq, head_dim); got q of shape {tuple(q.shape)}")
    batch = math.prod(q.shape[:-3])
    return AttentionShape(batch=batch, q_heads=q.shape[-3], kv_heads=k.shape[-3], head_dim=q.shape[-1],
                          dtype_bytes=q.element_size(), causal=causal)


class _AttentionSwap(TorchFunctionMode):
    """Sends SDPA and ringfx ring attention to ``_ModeledAttention``; records the calls."""

    def __init__(self, tracker, ring, query_chunks, kernel):
        super().__init__()
        self.model = (tracker, ring, query_chunks, kernel)
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention or func is torch._C._nn.scaled_dot_product_attention:
            q, k, v = args[:3]
            causal = bool(kwargs.get("is_causal", args[5] if len(args) > 5 else False))
            self.calls.append(_shape_of(q, k, causal))
            return _ModeledAttention.apply(q, k, v, self.model)
        if "ringfx" in str(func) and "ring_attention" in str(func) and "backward" not in str(func):
            q, k, v = args[:3]
            causal = bool(args[8]) if len(args) > 8 else bool(kwargs.get("causal", False))
            self.calls.append(_shape_of(q, k, causal))
            out = _ModeledAttention.apply(q, k, v, self.model)
            return out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        return func(*args, **kwargs)


@dataclasses.dataclass
class StepPeak:
    """One simulated step: the peak, its split by category, the attention calls seen."""

    peak: int
    split: dict
    attention: list


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
def _checkpointed(module: torch.nn.Module):
    """Wrap each layer of the model's longest ModuleList in non-reentrant checkpointing."""
    layers = _layer_list(module)
    if layers is None:
        raise ValueError("activation_checkpointing=True but the model has no nn.ModuleList of layers to "
                         "checkpoint; checkpoint it yourself (torch.utils.checkpoint) and leave the option off")
    patched = []
    for layer in layers:
        if "forward" not in layer.__dict__:
            layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, type(layer).forward.__get__(layer),
                                              use_reentrant=False)
            patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward


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
) -> StepPeak:
    """Peak live bytes of one forward (+ loss + backward when ``training``) on meta tensors.

    ``inputs`` are the model's positional inputs at the *local* length; they are turned
    into meta tensors.  Parameters are excluded from the count (``memory.static_terms``
    counts them, divided by ``param_shards`` when sharded); their gradients are counted.
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
    ckpt = _checkpointed(module) if (activation_checkpointing and training) else contextlib.nullcontext()
    grad = torch.enable_grad() if training else torch.no_grad()
    with ckpt, grad, tracker, swap:
        output = torch.func.functional_call(module, state, meta_inputs)
        if training:
            loss = loss_fn(output, meta_inputs)
            del output
            tracker.category = BACKWARD
            loss.backward()
            del loss
        tracker._sweep()
    split = dict(tracker.peak_split)
    split = {k: v for k, v in split.items() if v}
    return StepPeak(peak=tracker.peak, split=split, attention=swap.calls)


# -- fitting: a polynomial in the local length, then s = S/P -------------------------------------


def fit_memory_terms(run: Callable[[int], StepPeak], points) -> tuple:
    """Fit each category's bytes at the peak as a polynomial (degree <= 2) in the local
    length s over ``points[:3]``, check the total at ``points[3]``; returns
    ``(terms in s, attention calls at points[0], exact)``.

    A ring-sharded model holds s = S/P tokens in every tensor, so the caller substitutes
    s -> S/P.  Ring attention keeps everything linear in s; a quadratic term means the model
    materialises an s x s tensor (a dense mask) and is reported.
    """
    import sympy

    from .memory import s_local

    runs = [run(int(n)) for n in points]
    categories = sorted({c for r in runs for c in r.split})
    terms = {}
    for cat in categories:
        pts = [(int(n), r.split.get(cat, 0)) for n, r in zip(points[:3], runs[:3])]
        terms[cat] = sympy.expand(sympy.interpolate(pts, s_local)) if any(v for _, v in pts) else sympy.Integer(0)
    total = sum(terms.values(), sympy.Integer(0))
    exact = True
    if len(points) > 3:
        predicted = total.subs(s_local, int(points[3]))
        exact = predicted == runs[3].peak
        if not exact:
            log.warning("memory fit is not exact at s=%d: predicted %s, simulated %d bytes (the peak moves "
                        "between phases); using the larger", points[3], predicted, runs[3].peak)
    return {k: v for k, v in terms.items() if v != 0}, runs[0].attention, exact
