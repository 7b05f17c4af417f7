"""Attention variants on a loopback ring vs the monolithic kernels a model would use, on one device.

For each sequence length and KV-head count (B=1, H=32, D=128, bf16, causal by default),
seven variants, each timed forward and forward+backward, side by side in one process. The ring
rows are ``ringfx.ring_attention`` on a loopback ring of P=1 and P=4 (zigzag); the monolithic
rows are what a model computes on the whole sequence:

* plain attention: ``F.scaled_dot_product_attention`` (the backend SDPA picks, and cuDNN and
  flash forced);
* logit soft-capping (cap 50, Gemma 2; ``softcap=``, the ring's flex block kernel on CUDA):
  transformers' Gemma 2 eager spelling (matmul, scale, tanh cap, additive mask, float32
  softmax, matmul) and ``flex_attention`` compiled with a tanh ``score_mod`` (transformers'
  flex spelling);
* attention sinks (one logit per head, GPT-OSS; ``sinks=``): transformers' GPT-OSS eager
  spelling (the sink column joined to the scores, softmax, dropped) and compiled
  ``flex_attention`` returning its log-sum-exp, renormalised outside the kernel:
  ``out * sigmoid(lse - sink)`` (what transformers' flex integration does; flex's
  ``score_mod`` cannot add a term to the denominator, and SDPA has no public
  log-sum-exp output);
* chunked local attention (Llama 4; ``chunk=``; chunk = --chunk, Llama 4's 8192, or S/4 when
  that is smaller, so that every S has chunks): SDPA with the dense boolean chunked-causal
  mask (1, 1, S, S) (transformers' sdpa path: K/V repeated to the query heads, as
  ``sdpa_attention_forward`` does when a mask is given) and compiled ``flex_attention``
  with a chunked-causal ``mask_mod`` BlockMask (transformers' flex path);
* ALiBi (BLOOM, MPT, Falcon; ``alibi_slopes=``, BLOOM's slopes): SDPA with the float mask
  (1, H, S, S) = slope_h * (j - i) where causal, dtype min elsewhere, in the model dtype
  (Falcon's sdpa path adds the ALiBi bias to its float mask; K/V repeated) and compiled
  ``flex_attention`` with an ALiBi ``score_mod`` and a causal BlockMask;
* T5's bucketed relative-position bias (``relative_bias=``): both sides start from the learned
  embedding (32 buckets x H, max distance 128, unidirectional when causal), which requires grad
  and gets its gradient in forward+backward. The ring gathers the (H, 2S - 1) table from it
  each call (bucketing the distances 1-S..S-1, as the rewrite builds it); T5's sdpa path gathers
  the (1, H, S, S) position bias from the (S, S) bucket index (built once per problem, not
  timed; T5 rebuilds it every call), joins the causal mask (``torch.where``, transformers'
  ``create_position_bias_mask``) and calls SDPA with it as ``attn_mask``; T5's flex path
  indexes the same position bias in a ``score_mod`` with a causal BlockMask;
* MLA (DeepSeek-V2/V3: query/key head dim D + D/2 = 192 at D = 128, value head dim D = 128;
  K and V decompressed per head, so Hkv = H whatever --kv-heads says): the ring runs what the
  rewrite makes of it (``_padded`` in ``passes/rewrite_attention.py``): V zero-padded to the
  query/key head dim, the op, the output sliced back to D (pad and slice timed); SDPA with
  V's own head dim (its own pick, and cuDNN, flash and memory-efficient forced: a backend
  that refuses it says so in its row) and SDPA on V zero-padded as the ring does.

A dense S x S mask is made only for a monolithic row that needs it, once per problem (each
variant gets a fresh problem, so one variant's masks are freed before the next); its size is
in the row's note and not in the row's memory. At long S a (1, H, S, S) mask is tens of GiB:
a row that runs out of memory says OOM.

A loopback ring of P runs every rank's blocks one after another on this device (the
transfers are free), so its time is the whole problem's; "per-rank" = loopback time / P
is what each GPU of a real ring of P would spend computing, communication not counted.
"mono/row" = the fastest monolithic baseline's time for the same variant and pass /
this row's time (> 1: this row is faster). "fwd" is the forward of a training step
(inputs require grad; no backward), so one compiled flex graph serves both passes
(on CPU, where flex has no backward, an inference forward: --inference-fwd).
Peak memory: max_memory_allocated during one call minus what was allocated before it
(the inputs, and any dense mask built once). "max err": max |out - float32 reference| of
the forward output, at the smallest sequence length only. Times: CUDA events (wall clock on
CPU), median of --iters calls (at least 3, fewer than --iters only for a pass slower than
--row-seconds / --iters) after two untimed ones; a row's error (OOM, unsupported, a failed
compile) is its note.

    python benchmarks/variants_speed.py --kv-heads 8 --json benchmarks/results/variants_speed_h200.json
    # the four variants after plain / softcap / sinks, one H200, about 3-5 minutes:
    python benchmarks/variants_speed.py --seq 8192 32768 --kv-heads 8 --variants chunk alibi relbias mla \\
        --json benchmarks/results/variants_speed_more_h200.json
    python benchmarks/variants_speed.py --device cpu --dtype float32 --seq 256 --heads 4 \\
        --kv-heads 2 --dim 32 --iters 2        # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ringfx  # noqa: E402

SOFTCAP = 50.0  # Gemma 2's attn_logit_softcapping
QUERY_GAIN = 4.0  # scores ~ N(0, 4²): the cap moves the largest logits (~15 at 8K keys) by ~0.4, so it shows
LLAMA4_CHUNK = 8192  # Llama 4's attention_chunk_size
T5_BUCKETS, T5_MAX_DISTANCE = 32, 128  # T5's relative_attention_num_buckets / _max_distance
RINGS = (1, 4)
VARIANTS = ("plain", "softcap", "sinks", "chunk", "alibi", "relbias", "mla")
MASKED_SDPA = ("chunk", "alibi", "relbias")  # monolithic SDPA rows that need a dense mask
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Problem:
    """One (S, Hkv, variant) problem: full-sequence inputs, shared by every row of the variant."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor  # MLA: a smaller head dim than q and k
    sinks: torch.Tensor
    dout: torch.Tensor
    causal: bool
    scale: float
    chunk: int  # Llama 4's chunk size for this S
    slopes: torch.Tensor  # ALiBi slopes (Hq,), float32
    rel_weight: torch.Tensor  # T5's relative_attention_bias.weight (buckets, Hq)
    rel_buckets: torch.Tensor  # the bucket of each distance j - i = 1-S .. S-1, (2S - 1,)
    built: dict = field(default_factory=dict)  # dense masks and BlockMasks, each made on first use

    @property
    def gqa(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    @property
    def seq(self) -> int:
        return self.q.shape[2]

    def once(self, key, build):
        """``build()``, made on the first call for ``key`` and kept for every row of this problem."""
        if key not in self.built:
            self.built[key] = build()
        return self.built[key]


@dataclass
class Prepared:
    """A contender made ready for one problem: ``attend(*inputs)`` returns the output (for a
    ring, its ranks' shards) and ``to_global`` puts it back in sequence order; ``notes`` go to
    the row (e.g. the size of a dense mask built for it)."""

    inputs: list
    attend: Callable
    dout: torch.Tensor
    to_global: Callable = lambda out: out
    notes: list = field(default_factory=list)
    no_backward: str | None = None  # why the forward+backward pass is not run, or None


@dataclass
class Contender:
    """A way to compute one variant: ``prepare(problem) -> Prepared``."""

    name: str
    variant: str
    ring: int  # 0: monolithic
    prepare: Callable
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------- monolithic spellings

def repeat_kv(x, n_rep):
    # transformers' repeat_kv (modeling_gemma2.py, modeling_gpt_oss.py; integrations/sdpa_attention.py
    # repeats K/V this way whenever a mask is given)
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def gemma2_eager(q, k, v, mask, scale, softcap, gqa):
    # transformers' Gemma 2 eager_attention_forward (dropout 0; the final transpose left out)
    k, v = repeat_kv(k, gqa), repeat_kv(v, gqa)
    w = torch.matmul(q, k.transpose(2, 3)) * scale
    w = w / softcap
    w = torch.tanh(w)
    w = w * softcap
    if mask is not None:
        w = w + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def gpt_oss_eager(q, k, v, sinks, mask, scale, gqa):
    # transformers' GPT-OSS eager_attention_forward (dropout 0; the final transpose left out)
    k, v = repeat_kv(k, gqa), repeat_kv(v, gqa)
    w = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        w = w + mask
    sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    logits = torch.cat([w, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = F.softmax(logits, dim=-1, dtype=logits.dtype)
    return torch.matmul(probs[..., :-1].to(v.dtype), v)


def alibi_slopes(heads: int) -> torch.Tensor:
    # BLOOM's build_alibi_tensor slopes (Press et al., ALiBi, section 3): a geometric sequence per
    # power of two of heads, interleaved for the remainder
    closest = 2 ** math.floor(math.log2(heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** p for p in range(1, 1 + 2 * (heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def t5_bucket(relative_position, bidirectional, num_buckets=T5_BUCKETS, max_distance=T5_MAX_DISTANCE):
    # transformers' T5Attention._relative_position_bucket (Mesh TensorFlow's)
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    if_large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                            * (num_buckets - max_exact)).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    return relative_buckets + torch.where(is_small, relative_position, if_large)


def relative_table(pb: Problem, weight):
    """The ring's ``relative_bias`` (Hq, 2S - 1): T5's embedding applied to the buckets of the
    distances 1-S .. S-1 (how the rewrite builds it), so its gradient reaches ``weight``."""
    return F.embedding(pb.rel_buckets, weight).t()


def distances(s, device):
    """(S, S) j - i."""
    pos = torch.arange(s, device=device)
    return pos[None, :] - pos[:, None]


def causal_keep(s, device):
    """(S, S) bool, True where query i sees key j (j <= i)."""
    return torch.ones(s, s, dtype=torch.bool, device=device).tril()


def chunk_keep(s, chunk, causal, device):
    """(S, S) bool: Llama 4's chunked attention (same chunk; and causal)."""
    block = torch.arange(s, device=device) // chunk
    keep = block[:, None] == block[None, :]
    return keep & causal_keep(s, device) if causal else keep


def additive_mask(pb: Problem):
    """transformers' eager models add a (B, 1, S, S) mask of the model dtype: 0 or dtype min."""
    def build():
        s = pb.seq
        mask = torch.full((s, s), torch.finfo(pb.q.dtype).min, dtype=pb.q.dtype, device=pb.q.device)
        return mask.triu(1)[None, None]
    return pb.once("additive causal", build) if pb.causal else None


def chunk_bool_mask(pb: Problem):
    """transformers' sdpa mask for Llama 4's chunked layers: bool (1, 1, S, S), True = attend."""
    return pb.once("chunk bool", lambda: chunk_keep(pb.seq, pb.chunk, pb.causal, pb.q.device)[None, None])


def alibi_float_mask(pb: Problem):
    """The float mask (1, H, S, S) an ALiBi model hands SDPA: slope_h * (j - i) where attended, dtype
    min elsewhere, in the model dtype; built a head at a time (no float32 (H, S, S) temporary)."""
    def build():
        s, hq, dev = pb.seq, pb.q.shape[1], pb.q.device
        dist = distances(s, dev).float()
        keep = causal_keep(s, dev) if pb.causal else None
        mask = torch.empty(1, hq, s, s, dtype=pb.q.dtype, device=dev)
        low = torch.finfo(pb.q.dtype).min
        for h in range(hq):
            bias = pb.slopes[h].item() * dist
            mask[0, h] = torch.where(keep, bias, low) if keep is not None else bias
        return mask
    return pb.once("alibi float", build)


def t5_bucket_index(pb: Problem):
    """T5's (S, S) relative_position_bucket (compute_bias makes it every call; here once)."""
    s = pb.seq
    return pb.once("t5 buckets", lambda: pb.rel_buckets[distances(s, pb.q.device) + (s - 1)])


def t5_position_bias(pb: Problem, weight):
    # T5Attention.compute_bias: the embedding of the buckets, (1, H, S, S)
    return F.embedding(t5_bucket_index(pb), weight).permute(2, 0, 1).unsqueeze(0)


def dense_note(what, t) -> str:
    return f"{what} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} {t.numel() * t.element_size() / 2**30:.2f} GiB, built once"


def softcap_score(score, b, h, q_idx, kv_idx):
    # transformers' flex_attention_forward score_mod for Gemma 2
    return SOFTCAP * torch.tanh(score / SOFTCAP)


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


_compiled_flex = None


def compiled_flex():
    """``torch.compile(flex_attention)`` once, static shapes (each S / Hkv gets its own kernels:
    automatic dynamic shapes would time a generic kernel after the second shape)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention
        import torch._dynamo.config as dynamo_config
        # one compiled function serves every (variant, S, Hkv): more entries than the default limit of 8
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_block_mask(pb: Problem, chunked=False):
    """The BlockMask of the problem's mask: causal (or None), or Llama 4's chunked-causal."""
    from torch.nn.attention.flex_attention import create_block_mask
    s, chunk, causal = pb.seq, pb.chunk, pb.causal

    def chunked_causal(b, h, q_idx, kv_idx):
        # transformers' chunked_causal_mask_function: the same chunk, and causal
        same = (q_idx // chunk) == (kv_idx // chunk)
        return same & (q_idx >= kv_idx) if causal else same

    if chunked:
        return pb.once("chunk block mask", lambda: create_block_mask(chunked_causal, None, None, s, s,
                                                                     device=pb.q.device))
    if not causal:
        return None
    return pb.once("causal block mask", lambda: create_block_mask(causal_mask, None, None, s, s, device=pb.q.device))


def flex_lse_kwargs():
    """torch >= 2.9 asks for the log-sum-exp with ``return_aux``, earlier ones with ``return_lse``."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return {"return_lse": True}, lambda res: res
    return {"return_aux": AuxRequest(lse=True)}, lambda res: (res[0], res[1].lse)


# ----------------------------------------------------------------------- contenders

RING_NOTES = {
    "softcap": "flex block kernel on CUDA (math elsewhere)",
    "chunk": "blocks sharing no chunk skipped, the rest cut at chunk boundaries (no mask)",
    "alibi": "per-block ALiBi bias from global positions, in row parts",
    "relbias": "per-block bias gathered from the table; its gradient from the math kernel's dS",
    "mla": "v zero-padded to the qk head dim and the output sliced (the rewrite's _padded)",
}


def ring_contender(variant, world):
    ring = ringfx.LoopbackRing(world)
    layout = "zigzag"  # balances causal work over the ranks; P=1: the whole sequence

    def prepare(pb: Problem):
        def shard(x):
            return ringfx.shard(x, 2, layout=layout, group=ring).contiguous()

        options = {"softcap": SOFTCAP} if variant == "softcap" else {}
        if variant == "chunk":
            options["chunk"] = pb.chunk
        if variant == "alibi":
            options["alibi_slopes"] = pb.slopes  # a constant: the op refuses slopes that require grad
        learned = {"sinks": [pb.sinks], "relbias": [pb.rel_weight]}.get(variant, [])
        d_v = pb.v.shape[-1]

        def attend(q, k, v, *params):
            extra = dict(options)
            if variant == "sinks":
                extra["sinks"] = params[0]
            if variant == "relbias":
                extra["relative_bias"] = relative_table(pb, params[0])
            if variant == "mla":  # the op takes one head dim: the rewrite pads V to it and slices the output
                v = F.pad(v, (0, q.shape[-1] - d_v))
            out = ringfx.ring_attention(q, k, v, group=ring, causal=pb.causal, layout=layout, scale=pb.scale,
                                        **extra)
            return out[..., :d_v] if variant == "mla" else out

        notes = [f"chunk {pb.chunk}"] if variant == "chunk" else []
        return Prepared([shard(pb.q), shard(pb.k), shard(pb.v)] + learned, attend, shard(pb.dout),
                        lambda out: ringfx.unshard(out, 2, layout=layout, group=ring), notes)

    notes = [RING_NOTES.get(variant, "fused SDPA block kernels (kernel=auto)")]
    return Contender(f"ringfx loopback P={world}", variant, world, prepare, notes)


def sdpa_contender(variant, backends, label, pad_v=False):
    """SDPA on the whole sequence: plain and MLA with ``is_causal``; MLA's V zero-padded to the
    qk head dim when ``pad_v``."""
    def prepare(pb: Problem):
        d_v = pb.v.shape[-1]

        def attend(q, k, v):
            if pad_v:
                v = F.pad(v, (0, q.shape[-1] - d_v))
            with sdpa_kernel(backends) if backends is not None else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(q, k, v, is_causal=pb.causal, scale=pb.scale,
                                                     enable_gqa=pb.gqa > 1)
            return out[..., :d_v] if pad_v else out

        return Prepared([pb.q, pb.k, pb.v], attend, pb.dout)

    return Contender(label, variant, 0, prepare)


def masked_sdpa_contender(variant):
    """What transformers' ``sdpa_attention_forward`` runs for a variant SDPA only takes as a mask:
    K/V repeated to the query heads (a mask rules out ``enable_gqa``), the dense mask as ``attn_mask``."""
    def prepare(pb: Problem):
        gqa = pb.gqa
        if variant == "chunk":
            mask = chunk_bool_mask(pb)

            def attend(q, k, v):
                return F.scaled_dot_product_attention(q, repeat_kv(k, gqa), repeat_kv(v, gqa), attn_mask=mask,
                                                      scale=pb.scale)
            return Prepared([pb.q, pb.k, pb.v], attend, pb.dout, notes=[f"chunk {pb.chunk}",
                                                                        dense_note("bool mask", mask)])
        if variant == "alibi":
            mask = alibi_float_mask(pb)

            def attend(q, k, v):
                return F.scaled_dot_product_attention(q, repeat_kv(k, gqa), repeat_kv(v, gqa), attn_mask=mask,
                                                      scale=pb.scale)
            return Prepared([pb.q, pb.k, pb.v], attend, pb.dout, notes=[dense_note("float mask", mask)])
        # relbias: T5's sdpa path, the position bias gathered from the learned embedding every call
        index = t5_bucket_index(pb)
        keep = pb.once("causal keep", lambda: causal_keep(pb.seq, pb.q.device)[None, None]) if pb.causal else None

        def attend(q, k, v, weight):
            bias = t5_position_bias(pb, weight)
            if keep is not None:  # transformers' create_position_bias_mask
                bias = torch.where(keep, bias, torch.finfo(bias.dtype).min)
            return F.scaled_dot_product_attention(q, repeat_kv(k, gqa), repeat_kv(v, gqa),
                                                  attn_mask=bias.contiguous(), scale=pb.scale)
        return Prepared([pb.q, pb.k, pb.v, pb.rel_weight], attend, pb.dout,
                        notes=[dense_note("bucket index", index), "(1, H, S, S) bias gathered each call"])

    label = {"chunk": "SDPA + bool chunk mask", "alibi": "SDPA + float ALiBi mask",
             "relbias": "SDPA + T5 position bias"}[variant]
    return Contender(label, variant, 0, prepare, ["K/V repeated (transformers' sdpa path with a mask)"])


def eager_contender(variant):
    def prepare(pb: Problem):
        mask = additive_mask(pb)
        if variant == "softcap":
            def attend(q, k, v):
                return gemma2_eager(q, k, v, mask, pb.scale, SOFTCAP, pb.gqa)
            return Prepared([pb.q, pb.k, pb.v], attend, pb.dout)

        def attend(q, k, v, sinks):
            return gpt_oss_eager(q, k, v, sinks, mask, pb.scale, pb.gqa)
        return Prepared([pb.q, pb.k, pb.v, pb.sinks], attend, pb.dout)

    source = "Gemma 2" if variant == "softcap" else "GPT-OSS"
    return Contender(f"eager ({source} spelling)", variant, 0, prepare)


FLEX_NOTES = {
    "softcap": "tanh score_mod",
    "sinks": "lse renorm: out*sigmoid(lse-sink)",
    "chunk": "chunked-causal mask_mod BlockMask",
    "alibi": "ALiBi score_mod",
    "relbias": "T5 position bias indexed in score_mod (gathered each call)",
}


def flex_contender(variant):
    def prepare(pb: Problem):
        prepared = flex_prepare(pb)
        if pb.q.device.type == "cpu":
            # flex has no backward on CPU, and its failed compile in grad mode leaves every later
            # flex call of the process running eagerly (the unfused reference, not the kernel)
            prepared.no_backward = "flex_attention has no backward on CPU"
        return prepared

    def flex_prepare(pb: Problem):
        flex = compiled_flex()
        block_mask = flex_block_mask(pb, chunked=variant == "chunk")
        gqa = pb.gqa > 1
        qkv = [pb.q, pb.k, pb.v]
        if variant == "softcap":
            def attend(q, k, v):
                return flex(q, k, v, score_mod=softcap_score, block_mask=block_mask, scale=pb.scale, enable_gqa=gqa)
            return Prepared(qkv, attend, pb.dout)
        if variant == "chunk":
            def attend(q, k, v):
                return flex(q, k, v, block_mask=block_mask, scale=pb.scale, enable_gqa=gqa)
            return Prepared(qkv, attend, pb.dout, notes=[f"chunk {pb.chunk}"])
        if variant == "alibi":
            slopes = pb.slopes

            def alibi_score(score, b, h, q_idx, kv_idx):
                return score + slopes[h] * (kv_idx - q_idx)

            def attend(q, k, v):
                return flex(q, k, v, score_mod=alibi_score, block_mask=block_mask, scale=pb.scale, enable_gqa=gqa)
            return Prepared(qkv, attend, pb.dout)
        if variant == "relbias":
            index = t5_bucket_index(pb)

            def attend(q, k, v, weight):
                bias = t5_position_bias(pb, weight)

                def t5_score(score, b, h, q_idx, kv_idx):
                    # transformers' flex_attention_forward with position_bias
                    return score + bias[0, h, q_idx, kv_idx]
                return flex(q, k, v, score_mod=t5_score, block_mask=block_mask, scale=pb.scale, enable_gqa=gqa)
            return Prepared(qkv + [pb.rel_weight], attend, pb.dout, notes=[dense_note("bucket index", index)])

        lse_kwargs, unpack = flex_lse_kwargs()

        def attend(q, k, v, sinks):
            out, lse = unpack(flex(q, k, v, block_mask=block_mask, scale=pb.scale, enable_gqa=gqa, **lse_kwargs))
            # the sink joins each row's denominator: exp(L) / (exp(L) + exp(sink)) = sigmoid(L - sink)
            weight = torch.sigmoid(lse.float() - sinks.float()[None, :, None])
            return (out.float() * weight[..., None]).to(q.dtype)
        return Prepared(qkv + [pb.sinks], attend, pb.dout)

    return Contender("flex_attention (compiled)", variant, 0, prepare, [FLEX_NOTES[variant]])


def contenders(device):
    cuda = device.type == "cuda"
    forced = [(SDPBackend.CUDNN_ATTENTION, "SDPA cuDNN"), (SDPBackend.FLASH_ATTENTION, "SDPA flash")]
    rows = []
    for variant in VARIANTS:
        rows += [ring_contender(variant, p) for p in RINGS]
        if variant == "plain":
            rows.append(sdpa_contender(variant, None, "SDPA (its own pick)"))
            if cuda:
                rows += [sdpa_contender(variant, [backend], label) for backend, label in forced]
        elif variant == "mla":
            rows.append(sdpa_contender(variant, None, "SDPA (its own pick)"))
            if cuda:
                rows += [sdpa_contender(variant, [backend], label) for backend, label in
                         forced + [(SDPBackend.EFFICIENT_ATTENTION, "SDPA efficient")]]
            rows.append(sdpa_contender(variant, None, "SDPA, v padded (own pick)", pad_v=True))
        elif variant in MASKED_SDPA:
            rows += [masked_sdpa_contender(variant), flex_contender(variant)]
        else:
            rows += [eager_contender(variant), flex_contender(variant)]
    return rows


# ------------------------------------------------------------------------ reference

def reference(pb: Problem, variant: str) -> torch.Tensor:
    """The variant in float32 on the full sequence, a few heads at a time (bounded memory), written
    out from its definition (no ringfx, no fused kernel)."""
    q, k, v = pb.q.float(), pb.k.float(), pb.v.float()
    b, hq, s, _ = q.shape
    out = q.new_empty(b, hq, s, v.shape[-1])
    step = max(1, min(hq, (1 << 29) // max(1, b * s * s)))  # ~2 GiB of float32 scores per chunk
    if variant == "chunk":
        keep = chunk_keep(s, pb.chunk, pb.causal, q.device)
    else:
        keep = causal_keep(s, q.device) if pb.causal else None
    dist = distances(s, q.device) if variant in ("alibi", "relbias") else None
    table = relative_table(pb, pb.rel_weight).float() if variant == "relbias" else None
    for h0 in range(0, hq, step):
        heads = torch.arange(h0, min(hq, h0 + step), device=q.device)
        kv = heads // pb.gqa
        scores = q[:, heads] @ k[:, kv].transpose(-2, -1) * pb.scale
        if variant == "softcap":
            scores = SOFTCAP * torch.tanh(scores / SOFTCAP)
        if variant == "alibi":  # slope_h * (j - i)
            scores = scores + pb.slopes.to(q.device)[heads][:, None, None] * dist
        if variant == "relbias":  # table[h, j - i + S - 1]
            scores = scores + table[heads][:, dist + (s - 1)]
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        if variant == "sinks":
            sink = pb.sinks.float()[heads].reshape(1, -1, 1, 1).expand(b, -1, s, 1)
            scores = torch.cat([scores, sink], dim=-1)
        p = torch.softmax(scores, dim=-1)
        if variant == "sinks":
            p = p[..., :-1]
        out[:, heads] = p @ v[:, kv]
        del scores, p
    return out


# ---------------------------------------------------------------------------- timing

class Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def peak_delta(self, fn):
        """(fn's result, bytes allocated at its peak beyond what was allocated before it)."""
        if not self.cuda:
            return fn(), None
        self.sync()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        self.sync()
        return result, torch.cuda.max_memory_allocated() - before


def measure(clock: Clock, inputs, attend, dout, backward: bool, args):
    """One pass: {first_call_s, ms, iters, peak_bytes}, and the output of a call."""
    leaves = [t.detach().requires_grad_(backward or not args.inference_fwd) for t in inputs]

    def step():
        out = attend(*leaves)
        if backward:
            torch.autograd.grad(out, leaves, dout)
        return out

    t0 = time.perf_counter()
    step()  # compiles, if anything does
    clock.sync()
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    out, peak = clock.peak_delta(step)
    call_s = time.perf_counter() - t0
    out = out.detach()
    # slow rows (the math kernel at long S) take fewer calls: median of at least 3
    iters = max(min(3, args.iters), min(args.iters, int(args.row_seconds / max(call_s, 1e-9))))
    ms = statistics.median(clock.time_ms(step) for _ in range(iters))
    return {"first_call_s": first_s, "ms": ms, "iters": iters, "peak_bytes": peak}, out


def release(clock):
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()


def error_text(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "OOM"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:160]}"


def refusal_reason(warning) -> str | None:
    """The reason in one of SDPA's backend-selection warnings ("Flash attention requires q,k,v to
    have the same last dimension ..."), or None for another warning or the bare "... not used
    because:" line before it."""
    text = str(warning.message)
    if "(Triggered internally" not in text or "not used because" in text:
        return None
    return text.split("(Triggered internally")[0].strip()[:200]


def run_row(clock, pb, contender, ref, args):
    row = {"variant": contender.variant, "impl": contender.name, "ring": contender.ring,
           "notes": list(contender.notes)}
    try:
        prepared = contender.prepare(pb)
    except Exception as exc:  # noqa: BLE001 -- a row that cannot be built is reported, the table goes on
        row["notes"].append(f"setup: {error_text(exc)}")
        if args.raise_errors:
            raise
        return row
    row["notes"] += prepared.notes
    for tag, backward in (("fwd", False), ("fwd_bwd", True)):
        if tag == "fwd_bwd" and "fwd_ms" not in row:
            row["notes"].append("fwd+bwd: not run (forward failed)")
            break
        if tag == "fwd_bwd" and prepared.no_backward:
            row["notes"].append(f"fwd+bwd: not run ({prepared.no_backward})")
            break
        try:
            with warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                res, out = measure(clock, prepared.inputs, prepared.attend, prepared.dout, backward, args)
        except Exception as exc:  # noqa: BLE001 -- OOM, an unsupported backend, a failed compile: per row
            # SDPA says why a forced backend refuses the inputs only in its warnings
            why = [refusal_reason(w) for w in warned if refusal_reason(w)][:2]
            row["notes"].append(f"{tag.replace('_', '+')}: {error_text(exc)}" + "".join(f" [{w}]" for w in why))
            if args.raise_errors:
                raise
            if args.verbose:
                traceback.print_exc()
            del exc
            release(clock)
            continue
        row[f"{tag}_ms"] = res["ms"]
        row[f"{tag}_iters"] = res["iters"]
        row[f"{tag}_first_call_s"] = res["first_call_s"]
        row[f"{tag}_peak_bytes"] = res["peak_bytes"]
        if contender.ring:
            row[f"{tag}_per_rank_ms"] = res["ms"] / contender.ring
        if tag == "fwd" and ref is not None:
            row["max_abs_err"] = (prepared.to_global(out).float() - ref).abs().max().item()
        del out
        release(clock)
    return row


def make_problem(b, hq, hkv, s, d, dtype, device, causal, seed, chunk, d_v=None):
    """Random inputs for one problem; ``d_v``: the value head dim when it differs from ``d`` (MLA)."""
    g = torch.Generator(device=device).manual_seed(seed)
    d_v = d_v or d

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32, generator=g)

    q = (QUERY_GAIN * randn(b, hq, s, d)).to(dtype)
    k, v, dout = randn(b, hkv, s, d).to(dtype), randn(b, hkv, s, d_v).to(dtype), randn(b, hq, s, d_v).to(dtype)
    # about a row's log-sum-exp (scores ~ N(0, QUERY_GAIN²): lse ~ QUERY_GAIN²/2 + log(keys)), so the
    # sink takes a visible share of the rows
    sinks = (QUERY_GAIN ** 2 / 2 + math.log(s) + randn(hq)).to(dtype)
    # T5's embedding of the buckets, about as large as the scores' spread so that the bias shows
    rel_weight = (QUERY_GAIN * randn(T5_BUCKETS, hq)).to(dtype)
    rel_buckets = t5_bucket(torch.arange(1 - s, s, device=device), bidirectional=not causal)
    return Problem(q, k, v, sinks, dout, causal, 1.0 / math.sqrt(d), chunk, alibi_slopes(hq).to(device),
                   rel_weight, rel_buckets)


def add_ratios(rows):
    """mono/row: the fastest monolithic time of the same (S, Hkv, variant, pass) / this row's."""
    for tag in ("fwd", "fwd_bwd"):
        best = {}
        for r in rows:
            if not r["ring"] and r.get(f"{tag}_ms") is not None:
                key = (r["seq"], r["kv_heads"], r["variant"])
                best[key] = min(best.get(key, math.inf), r[f"{tag}_ms"])
        for r in rows:
            key = (r["seq"], r["kv_heads"], r["variant"])
            if r.get(f"{tag}_ms") is not None and key in best:
                r[f"{tag}_mono_over_row"] = best[key] / r[f"{tag}_ms"]
                if r["ring"]:  # a real ring of P, ideally: each GPU spends loopback time / P
                    r[f"{tag}_mono_over_per_rank"] = best[key] / r[f"{tag}_per_rank_ms"]


def print_table(rows, header):
    def num(x, spec):
        return format(x, spec) if x is not None else format("-", ">" + spec.split(".")[0])

    def mib(x):
        return format(x / 2**20, ".0f") if x is not None else "-"

    cols = (f"{'S':>6} {'Hkv':>3} {'variant':<7} {'implementation':<26} | {'fwd ms':>8} {'/rank':>8} "
            f"{'mono/row':>8} | {'f+b ms':>8} {'/rank':>8} {'mono/row':>8} | {'fwd MiB':>8} {'f+b MiB':>8} | "
            f"{'max err':>8} | note")
    print(header)
    print(cols)
    print("-" * len(cols))
    last = None
    for r in rows:
        key = (r["seq"], r["kv_heads"], r["variant"])
        if last is not None and key != last:
            print()
        last = key
        print(f"{r['seq']:>6} {r['kv_heads']:>3} {r['variant']:<7} {r['impl']:<26} | "
              f"{num(r.get('fwd_ms'), '8.2f')} {num(r.get('fwd_per_rank_ms'), '8.2f')} "
              f"{num(r.get('fwd_mono_over_row'), '8.3f')} | "
              f"{num(r.get('fwd_bwd_ms'), '8.2f')} {num(r.get('fwd_bwd_per_rank_ms'), '8.2f')} "
              f"{num(r.get('fwd_bwd_mono_over_row'), '8.3f')} | "
              f"{mib(r.get('fwd_peak_bytes')):>8} {mib(r.get('fwd_bwd_peak_bytes')):>8} | "
              f"{num(r.get('max_abs_err'), '8.1e')} | {'; '.join(r['notes'])}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[8192, 32768], help="total sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8], help="one row set per value (8: GQA)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-causal", action="store_true", help="full (non-causal) attention")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--chunk", type=int, default=LLAMA4_CHUNK,
                   help="chunked attention's chunk size (default: Llama 4's); S/4 where that is smaller")
    p.add_argument("--iters", type=int, default=5, help="timed calls per pass (median)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed calls beyond the two every pass makes (the first compiles, if anything does; "
                        "the second measures peak memory)")
    p.add_argument("--row-seconds", type=float, default=3.0,
                   help="a pass whose calls would take longer than this gets fewer (at least 3) timed calls")
    p.add_argument("--inference-fwd", action=argparse.BooleanOptionalAction, default=None,
                   help="time the forward with inputs that do not require grad (default: on CPU only, where "
                        "flex_attention has no backward; on CUDA it would compile flex once more per shape)")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--raise-errors", action="store_true", help="re-raise a row's error instead of reporting it")
    p.add_argument("--verbose", action="store_true", help="print each row error's traceback")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.inference_fwd is None:
        args.inference_fwd = device.type == "cpu"
    dtype = DTYPES[args.dtype]
    causal = not args.no_causal
    clock = Clock(device)
    for s in args.seq:
        if s % (2 * max(RINGS)):
            p.error(f"--seq {s}: the zigzag loopback ring of {max(RINGS)} needs S divisible by {2 * max(RINGS)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fwd_kind = "an inference forward (no grad)" if args.inference_fwd else "the forward of a training step"
    header = (f"# {name}, torch {torch.__version__}, {args.dtype}, B={args.batch} H={args.heads} D={args.dim}, "
              f"{'causal' if causal else 'full'}, softcap {SOFTCAP}, chunk min({args.chunk}, S/4), BLOOM's ALiBi "
              f"slopes, T5 bias ({T5_BUCKETS} buckets, max distance {T5_MAX_DISTANCE}), MLA qk/v head dims "
              f"{args.dim * 3 // 2}/{args.dim} with Hkv = H\n"
              "# loopback ring of P: all P ranks' blocks run one after another on this device, so 'ms' is the\n"
              "# whole problem's time; '/rank' = loopback ms / P = what each GPU of a real ring of P would spend\n"
              "# computing (communication not counted). mono/row = fastest monolithic ms (same S, Hkv, variant,\n"
              f"# pass) / this row's ms. fwd = {fwd_kind}. MiB = peak allocation beyond the inputs (and a dense\n"
              "# mask built once: its size is in the note).\n"
              f"# max err = max |out - float32 reference| at S={min(args.seq)} only.")
    print(header.splitlines()[0], flush=True)
    started = time.perf_counter()
    rows, done = [], set()
    for s in args.seq:
        for hkv in args.kv_heads:
            for variant in args.variants:
                # MLA: K and V decompressed per head (DeepSeek), qk head dim D + D/2, value head dim D
                kv_heads, d, d_v = (args.heads, args.dim * 3 // 2, args.dim) if variant == "mla" else \
                    (hkv, args.dim, args.dim)
                if (s, kv_heads, variant) in done:
                    continue
                done.add((s, kv_heads, variant))
                # a problem per variant: one variant's dense masks are freed before the next builds its own
                pb = make_problem(args.batch, args.heads, kv_heads, s, d, dtype, device, causal, seed=s + kv_heads,
                                  chunk=min(args.chunk, s // 4), d_v=d_v)
                ref = reference(pb, variant) if s == min(args.seq) else None
                for c in contenders(device):
                    if c.variant != variant:
                        continue
                    t0 = time.perf_counter()
                    row = run_row(clock, pb, c, ref, args)
                    row.update(seq=s, kv_heads=kv_heads, heads=args.heads, dim=d, v_dim=d_v, batch=args.batch,
                               dtype=args.dtype, causal=causal, seconds=time.perf_counter() - t0)
                    if variant == "chunk":
                        row["chunk"] = pb.chunk
                    rows.append(row)
                    print(f"#  S={s} Hkv={kv_heads} {variant:<7} {c.name:<26} fwd {row.get('fwd_ms', '-')} ms, "
                          f"f+b {row.get('fwd_bwd_ms', '-')} ms ({row['seconds']:.1f} s) "
                          f"{'; '.join(row['notes'])}", flush=True)
                del ref, pb
                release(clock)
    add_ratios(rows)
    total = time.perf_counter() - started
    print()
    print_table(rows, header)
    print(f"# total {total:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        meta = {"device": name, "torch": torch.__version__, "softcap": SOFTCAP, "query_gain": QUERY_GAIN,
                "chunk": args.chunk, "t5_buckets": T5_BUCKETS, "t5_max_distance": T5_MAX_DISTANCE,
                "rings": RINGS, "iters": args.iters, "warmup": args.warmup, "total_s": total,
                "command": " ".join(sys.argv)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
