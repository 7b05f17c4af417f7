"""The symbolic per-device memory model: sympy expressions in S (sequence) and P (ring size).

Per-device bytes are

    static(params, grads, optimizer state, master weights)      -- not sharded by the ring
  + f(S / P)                                                     -- everything that scales with
                                                                    the local sequence

where ``f`` is read off the model's own tensors (``simulate.py`` runs the training step on
the ``meta`` device and tracks live storages) and the attention's buffers come from the
runtime contract written out once below (``ring_attention_buffers``).  Every tensor of a
ring-sharded model holds the local S/P tokens, so substituting ``s = S/P`` into the
polynomial fitted over the local length gives the exact expression for any (S, P).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction
from typing import Optional

import sympy
import torch

from ..runtime.algorithm import DQ_GROUP, MERGE_GROUP  # blocks per fused fold: the runtime decides

S, P = sympy.symbols("S P", positive=True, integer=True)
s_local = sympy.Symbol("s", positive=True)  # local sequence length, S/P

FP32 = 4


def dtype_bytes(dtype) -> int:
    if isinstance(dtype, int):
        return dtype
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64}.get(dtype.lower(), None)
        if dtype is None:
            raise ValueError("dtype must be one of fp32, bf16, fp16, fp64")
    return torch.empty((), dtype=dtype).element_size()


# -- training options ----------------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16")
OPTIMIZERS = ("adam", "sgd", "none")


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """What lives beside the activations.

    ``precision``: ``fp32`` (params/grads fp32), ``bf16-mixed``/``fp16-mixed`` (half params
    and grads plus an fp32 master copy), ``bf16`` (pure bf16 params/grads, no master copy).
    ``optimizer``: ``adam`` (two fp32 states per parameter), ``sgd`` (none; momentum not
    modelled), ``none``.  ``training=False`` plans a forward pass only (no grads, no
    optimizer, nothing saved for backward).  ``activation_checkpointing`` recomputes each
    layer in backward (keeps only layer inputs).  ``param_shards``: parameters, grads and
    optimizer state divided over this many devices (FSDP/ZeRO-3 over the ring's devices;
    1 = replicated, the default).  ``query_chunks``: split each ring step's local queries in
    this many chunks to bound the per-step temporaries (the planner raises it if needed).
    ``kernel``: the per-block attention kernel (``cudnn``, ``flash``, ``efficient``,
    ``math``), whose backward workspace differs.  ``blockwise_loss``: the output projection
    and cross-entropy run over chunks of this many tokens (``True``: the default chunk), so
    the logits are never whole (``blockwise_loss_buffers``).
    """

    training: bool = True
    precision: str = "bf16-mixed"
    optimizer: str = "adam"
    activation_checkpointing: bool = False
    param_shards: object = 1  # int, or "ring": sharded over the P devices of the ring
    query_chunks: int = 1
    kernel: str = "cudnn"
    # tokens per chunk of the fused output projection + cross-entropy (transform(blockwise_loss=...));
    # 0: the logits are computed whole, as the model writes them. True is read as the default chunk.
    blockwise_loss: int = 0

    def __post_init__(self):
        from ..blockwise import chunk_tokens

        object.__setattr__(self, "blockwise_loss", chunk_tokens(self.blockwise_loss))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if self.kernel not in KERNEL_BACKWARD_WORKSPACE:
            raise ValueError(f"kernel={self.kernel!r}: use one of {', '.join(KERNEL_BACKWARD_WORKSPACE)}")
        if self.param_shards != "ring" and (not isinstance(self.param_shards, int) or self.param_shards < 1):
            raise ValueError(f"param_shards={self.param_shards!r}: use a whole number >= 1 or 'ring' (FSDP/ZeRO-3 "
                             "over the ring's devices)")
        if self.query_chunks < 1:
            raise ValueError("query_chunks must be at least 1")

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.float32 if self.precision == "fp32" else (
            torch.float16 if self.precision == "fp16-mixed" else torch.bfloat16)

    def replace(self, **changes) -> "TrainingOptions":
        return dataclasses.replace(self, **changes)


# cuBLAS's default workspace on Hopper (32 MiB), allocated through PyTorch's allocator on the
# first matmul: the constant offset between predicted and measured peaks of a small model on
# H100 (torch 2.11, benchmarks/planner_accuracy.py).
CUDA_LIBRARY_WORKSPACE = 32 * 2**20


def static_terms(param_count: int, options: TrainingOptions) -> dict:
    """Bytes per device that do not depend on S or P: the persistent state of training.

    Gradients are *not* here: the simulation sees them appear during backward (at the
    moment of peak only part of them may exist).  Parameters are counted here (not by the
    simulation) so that ``param_shards`` can divide them.
    """
    n = sympy.Integer(param_count)
    shards = P if options.param_shards == "ring" else options.param_shards
    param_bytes = dtype_bytes(options.param_dtype)
    terms = {"parameters": n * param_bytes / shards,
             "library workspace (cuBLAS)": sympy.Integer(CUDA_LIBRARY_WORKSPACE)}
    if options.training:
        if options.precision.endswith("-mixed"):
            terms["master weights (fp32)"] = n * FP32 / shards
        if options.optimizer == "adam":
            terms["optimizer state (Adam, fp32)"] = n * 2 * FP32 / shards
    return terms


# -- the runtime contract -----------------------------------------------------------------------
#
# The buffers of ``ringfx.ring_attention`` on one rank, from the runtime contract
# (DESIGN.md §3; ringfx/runtime/algorithm.py allocates them): local shards q (B,Hq,s,D),
# k,v (B,Hkv,s,D), s = S/P, input dtype of `a` bytes.
#   forward : K and V travel packed as one (2,B,Hkv,s,D) buffer, double-buffered: 2 receive
#             buffers live plus the local one; output accumulated in float32 (B,Hq,s,D) plus
#             lse float32 (B,Hq,s); per step a block output (B,Hq,c,D) in the input dtype,
#             its lse, and the merge buffers: on CUDA (one fused pass folds up to
#             MERGE_GROUP blocks) the MERGE_GROUP - 1 block outputs and lses waiting for
#             it, elsewhere the float32 merge temporaries of one block (out - out_b and its
#             product with sigmoid(lse_b - lse)), whichever is larger; the last fold writes
#             the output in the input dtype.
#   saved   : q, k, v (the layer's own tensors), out (input dtype), lse (float32).
#   backward: KV travel again (local + 2), dK/dV accumulators travel in float32 (2,B,Hkv,s,D)
#             double-buffered, dq accumulator float32; per step the kernel's dq/dk/dv blocks
#             in the input dtype plus its workspace, and DQ_GROUP - 1 earlier dq blocks
#             waiting to be folded with it; at the end dq, dk, dv in the input dtype.
# (ringfx/runtime/algorithm.py of today holds one KV receive buffer fewer than this; the
#  contract is the conservative bound.)  Adjust the constants here, nowhere else.
# GQA (Hq > Hkv) under a causal mask: the runtime expands one block's K/V to Hq heads for the
# kernel call (ringfx/runtime/kernels.py gqa_forward/gqa_backward), and in backward sums the
# expanded dK/dV back: per-step temporaries of Hq-headed K/V (and dK/dV) blocks of the
# diagonal calls (s/2 keys under zigzag, the layout the planner picks for causal attention;
# measured on H100 the whole GQA rank stays within +8% with this, see BENCHMARKS).
GQA_EXPANDS_CAUSAL_BLOCKS = True
KV_BUFFERS_FORWARD = 3          # local packed KV + 2 receive buffers
KV_BUFFERS_BACKWARD = 3
DKV_BUFFERS_BACKWARD = 2        # float32 dK/dV accumulators travelling, double-buffered
MERGE_TEMPORARIES_FP32 = 2      # (out - out_b), sigmoid(...) * (out - out_b)
# Backward workspace of one kernel call in units of a float32 tensor the size of q's block
# (measured on H100, torch 2.11, bf16: SDPA fwd+bwd peaks minus q,k,v,dout,out,lse,dq,dk,dv
# were 2, 4 and 3 q-sized bf16 tensors for cuDNN, flash and efficient: a float32 dq
# accumulator, plus more for flash and efficient). ``math`` materialises the scores instead.
KERNEL_BACKWARD_WORKSPACE = {"cudnn": 1.0, "flash": 2.0, "efficient": 1.5, "math": 1.0}


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """One attention call as the planner sees it (local shapes, s = local sequence)."""

    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    causal: bool = False

    def q_block(self, tokens, nbytes=None):
        return self.batch * self.q_heads * tokens * self.head_dim * (nbytes or self.dtype_bytes)

    def kv_block(self, tokens, nbytes=None):  # K and V packed: (2, B, Hkv, tokens, D)
        return 2 * self.batch * self.kv_heads * tokens * self.head_dim * (nbytes or self.dtype_bytes)

    def rows(self, tokens, nbytes=FP32):  # (B, Hq, tokens): lse, softmax row sums
        return self.batch * self.q_heads * tokens * nbytes


def merge_buffers(att: AttentionShape, c):
    """Forward merge memory per kernel call of ``c`` queries: blocks waiting for a fused
    fold, or the eager merge's float32 temporaries, whichever is larger."""
    deferred = (MERGE_GROUP - 1) * (att.q_block(c) + att.rows(c))
    eager = MERGE_TEMPORARIES_FP32 * att.q_block(c, FP32)
    return deferred if (MERGE_GROUP - 1) * att.dtype_bytes > MERGE_TEMPORARIES_FP32 * FP32 else eager


def ring_attention_buffers(att: AttentionShape, s, *, query_chunks: int = 1, kernel: str = "cudnn") -> dict:
    """The ring op's allocations on one rank, in the order they are live (see the contract).

    Returns ``{"forward": [(name, bytes), ...] groups, ...}`` as four lists of named sizes:
    ``forward_persistent`` (live through the forward: accumulators), ``forward_steps``
    (live during the ring steps only), ``forward_result`` (out, lse; out is allocated while
    the float32 accumulator still lives), ``backward_persistent``, ``backward_steps``,
    ``backward_result`` (dq, dk, dv).
    """
    c = s / query_chunks if query_chunks > 1 else s  # queries per kernel call
    ws = sympy.Rational(str(KERNEL_BACKWARD_WORKSPACE[kernel]))
    expanded = []
    if GQA_EXPANDS_CAUSAL_BLOCKS and att.causal and att.q_heads != att.kv_heads:
        # the causal (diagonal) calls of the zigzag layout are on half chunks: s/2 keys
        expanded = [("GQA K/V expanded to Hq heads", 2 * att.q_block(s / 2))]
    return {
        "forward_persistent": [("out accumulator (fp32)", att.q_block(s, FP32)), ("lse (fp32, saved)", att.rows(s))],
        "forward_steps": [
            ("KV ring buffers", KV_BUFFERS_FORWARD * att.kv_block(s)),
            ("block output + lse", att.q_block(c) + att.rows(c)),
            ("merge buffers", merge_buffers(att, c)),
        ] + expanded,
        "forward_result": [("out", att.q_block(s))],
        "backward_persistent": [
            ("dq accumulator (fp32)", att.q_block(s, FP32)),
            ("dK/dV ring buffers (fp32)", DKV_BUFFERS_BACKWARD * att.kv_block(s, FP32)),
        ],
        "backward_steps": [
            ("KV ring buffers", KV_BUFFERS_BACKWARD * att.kv_block(s)),
            ("block dq/dk/dv", att.q_block(c) + att.kv_block(s)),
            ("deferred dq blocks", (DQ_GROUP - 1) * att.q_block(c)),
            ("kernel workspace", ws * att.q_block(c, FP32) + att.rows(c)),
        ] + [(name + " (and dK/dV)", 2 * n) for name, n in expanded],
        "backward_result": [("dq, dk, dv", att.q_block(s) + att.kv_block(s))],
    }


def sdpa_buffers(att: AttentionShape, s, *, kernel: str = "cudnn") -> dict:
    """One device, no ring (P = 1): a fused SDPA kernel (same keys as ``ring_attention_buffers``)."""
    ws = sympy.Rational(str(KERNEL_BACKWARD_WORKSPACE[kernel]))
    return {
        "forward_persistent": [],
        "forward_steps": [],
        "forward_result": [("out", att.q_block(s)), ("lse (fp32)", att.rows(s))],
        "backward_persistent": [("kernel workspace", ws * att.q_block(s, FP32))],
        "backward_steps": [],
        "backward_result": [("dq, dk, dv", att.q_block(s) + att.kv_block(s))],
    }


def attention_layer_peak(att: AttentionShape, s, *, ring: bool, query_chunks: int = 1, kernel: str = "cudnn"):
    """Peak bytes of one attention layer fwd+bwd on one device, inputs q,k,v and the
    incoming gradient included (what ``benchmarks/planner_accuracy.py`` measures).

    forward : q,k,v + persistent + max(steps, result)
    backward: q,k,v, out, lse (saved), dout + persistent + max(steps, result)
    """
    b = ring_attention_buffers(att, s, query_chunks=query_chunks, kernel=kernel) if ring else \
        sdpa_buffers(att, s, kernel=kernel)
    total = lambda key: sum((n for _, n in b[key]), sympy.Integer(0))  # noqa: E731
    inputs = att.q_block(s) + att.kv_block(s)
    saved = att.q_block(s) + att.rows(s)  # out, lse (for the ring, lse is the forward's float32 accumulator)
    fwd = inputs + total("forward_persistent") + sympy.Max(total("forward_steps"), total("forward_result"))
    bwd = inputs + saved + att.q_block(s) + total("backward_persistent") + sympy.Max(
        total("backward_steps"), total("backward_result"))
    return sympy.simplify(sympy.Max(fwd, bwd))


# -- the blockwise loss's contract (ringfx/blockwise.py) -------------------------------------------
#
# ringfx::linear_cross_entropy on one rank, `n` local tokens (batch x s), hidden H, vocabulary V,
# input dtype of `a` bytes, chunks of c tokens:
#   forward : per chunk the logits (c,V) in the input dtype, their float32 copy and the
#             float32 exp of logsumexp; nothing of size V saved (hidden, weight, labels are).
#   backward: a float32 dW accumulator (V,H) (and db) for the whole backward; per chunk the
#             logits again (input dtype + float32), the float32 softmax that becomes dlogits,
#             and dlogits in the input dtype; at the end dh (n,H) and dW (V,H) in the input dtype.
# The per-chunk terms are for a full chunk: a step of fewer than c local tokens is overestimated
# (the fit is a polynomial in s, and c <= s is the regime the option is for).
LOSS_CHUNK_FP32_FORWARD = 2    # float32 logits, exp(logits - max) inside logsumexp
LOSS_CHUNK_FP32_BACKWARD = 2   # float32 logits, softmax / dlogits


def blockwise_loss_buffers(hidden: int, vocab: int, dtype_bytes: int, chunk: int, *, bias: bool = False) -> dict:
    """The fused loss's allocations beside its inputs and outputs, as named byte counts
    (same keys as ``ring_attention_buffers``; constant in the sequence length)."""
    block = chunk * vocab
    return {
        "forward_steps": [("loss chunk logits", block * dtype_bytes),
                          ("loss chunk float32 temporaries", LOSS_CHUNK_FP32_FORWARD * block * FP32)],
        "backward_persistent": [("dW accumulator (fp32)", vocab * hidden * FP32 + (vocab * FP32 if bias else 0))],
        "backward_steps": [("loss chunk logits + dlogits", 2 * block * dtype_bytes),
                           ("loss chunk float32 temporaries", LOSS_CHUNK_FP32_BACKWARD * block * FP32)],
    }


# -- the model ------------------------------------------------------------------------------------


@dataclasses.dataclass
class MemoryModel:
    """Per-device bytes as sympy expressions in S and P.

    ``static``: name -> bytes that do not grow with the sequence (parameters, master
    weights, optimizer state; divided by P when ``param_shards="ring"``).
    ``envelope``: the step's candidate peak moments, each ``{category: polynomial in S/P}``
    (inputs, activations, attention buffers, backward temporaries, gradients); the peak is
    the largest.  ``peak`` is ``sum(static) + Max(envelope)``.
    ``ring``: the expression is for the ring program (P >= 2) or for one device (P = 1).
    """

    static: dict
    envelope: list
    param_count: int
    attention: list
    ring: bool = True
    exact: bool = True
    options: Optional[TrainingOptions] = None

    @property
    def peak(self) -> sympy.Expr:
        moments = [sum(m.values(), sympy.Integer(0)) for m in self.envelope] or [sympy.Integer(0)]
        return sum(self.static.values(), sympy.Integer(0)) + sympy.Max(*moments)

    def evaluate(self, seq_len: int, ring_size: int) -> dict:
        """Bytes per term at (S, P) at the peak moment, as ints (rounded up)."""
        static, envelope = self._laurent
        static = {n: math.ceil(f(seq_len, ring_size)) for n, f in static.items()}
        best, best_total = {}, -1
        for moment in envelope:
            row = {n: math.ceil(f(seq_len, ring_size)) for n, f in moment.items()}
            if sum(row.values()) > best_total:
                best, best_total = row, sum(row.values())
        return {**static, **best}

    def peak_bytes(self, seq_len: int, ring_size: int) -> int:
        return sum(self.evaluate(seq_len, ring_size).values())

    def in_s(self, ring_size: int) -> tuple:
        """At P = ``ring_size``: the static terms' sum and each moment's sum, as exact
        coefficients ``(c0, c1, c2)`` of ``c0 + c1 S + c2 S**2``."""
        static, envelope = self._laurent

        def total(terms):
            sums = [Fraction(0)] * 3
            for term in terms:
                for coefficient, s_power, p_power in term.terms:
                    sums[s_power] += coefficient * Fraction(ring_size) ** p_power
            return tuple(sums)

        return total(static.values()), [total(m.values()) for m in envelope]

    @functools.cached_property
    def _laurent(self) -> tuple:
        """``static`` and ``envelope`` with every expression as a ``Laurent`` polynomial: read
        off sympy once, evaluated in exact integers and fractions thereafter."""
        return ({n: Laurent.of(e) for n, e in self.static.items()},
                [{n: Laurent.of(e) for n, e in m.items()} for m in self.envelope])


@dataclasses.dataclass(frozen=True)
class Laurent:
    """A sympy expression in S and P that is a sum of ``coefficient * S**i * P**j`` (0 <= i <= 2,
    any integer j), as exact ``(Fraction, i, j)`` terms.  Every term of a memory model is one:
    a polynomial in s (degree <= 2) with s = S/P substituted, divided by P when sharded.  The
    plan's searches evaluate the model at thousands of (S, P); sympy's ``subs`` took seconds."""

    terms: tuple

    @classmethod
    def of(cls, expr) -> "Laurent":
        terms = []
        for term in sympy.Add.make_args(sympy.expand(sympy.sympify(expr))):
            coefficient, rest = term.as_coeff_Mul()
            powers = {} if rest == 1 else rest.as_powers_dict()
            i, j = powers.get(S, 0), powers.get(P, 0)
            if not coefficient.is_Rational or set(powers) - {S, P} or not (sympy.Integer(i) == i and 0 <= i <= 2) \
                    or sympy.Integer(j) != j:
                raise ValueError(f"memory model term {expr} is not a sum of c * S**i * P**j (0 <= i <= 2)")
            terms.append((Fraction(int(coefficient.p), int(coefficient.q)), int(i), int(j)))
        return cls(tuple(terms))

    def __call__(self, seq_len: int, ring_size: int) -> Fraction:
        return sum((c * Fraction(seq_len) ** i * Fraction(ring_size) ** j for c, i, j in self.terms), Fraction(0))
