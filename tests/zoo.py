"""A zoo of attention implementations and tiny models, written as plain nn.Modules.

Each ``ZooEntry`` says how to build the module and its inputs, how many attention sites
the graph has, the mask kind ringfx must report, and whether every site must be rewritten.
Inputs are ``ZooInput(tensor, seq_dim)``: the caller shards those with a ``seq_dim`` along
it with ``ringfx.shard``; position ids are inputs, as ``context_parallel`` requires.

All modules use float64 unless noted, B=2, model width 16, 4 heads of 4 (GQA: 2 KV heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ringfx.reference_model import Attention, LlamaLike, ModelConfig, repeat_kv

E, H, HKV, D, VOCAB = 16, 4, 2, 4, 50
DTYPE = torch.float64


@dataclass
class ZooInput:
    value: torch.Tensor
    seq_dim: Optional[int] = 1


@dataclass
class ZooEntry:
    name: str
    make_module: Callable[[], nn.Module]
    make_inputs: Callable[[int, int], list]  # (seq_len, seed) -> [ZooInput]
    sites: int
    mask_kind: str
    rewrite: bool = True
    real_ring: bool = True  # False: correct on loopback rings only (a dense user mask)
    tol: float = 1e-10  # float32 softmax upcasts need 1e-5


# ------------------------------------------------------------------ inputs

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def hidden(s, seed):
    return [ZooInput(torch.randn(2, s, E, generator=_gen(seed), dtype=DTYPE))]


def keep_mask(s):
    keep = torch.ones(2, s, dtype=torch.bool)
    keep[0, s - s // 4:] = False  # right padding of sample 0
    keep[1, :2] = False  # left padding of sample 1
    return keep


def hidden_pad(s, seed):
    return hidden(s, seed) + [ZooInput(keep_mask(s))]


def hidden_right_pad(s, seed):
    """Right padding only: with a causal mask, left padding leaves query rows that see no
    key at all, whose output is arbitrary (uniform weights in the model, 0 from the ring)."""
    keep = torch.ones(2, s, dtype=torch.bool)
    keep[0, s - s // 4:] = False
    return hidden(s, seed) + [ZooInput(keep)]


def hidden_seg(s, seed):
    seg = torch.stack([torch.arange(s) * 3 // s, torch.arange(s) * 2 // s])
    return hidden(s, seed) + [ZooInput(seg)]


def hidden_dense(s, seed):
    g = _gen(seed + 1)
    return hidden(s, seed) + [ZooInput(torch.randn(2, 1, s, s, generator=g, dtype=DTYPE), None)]


def tokens(s, seed):
    return [ZooInput(torch.randint(0, VOCAB, (2, s), generator=_gen(seed))),
            ZooInput(torch.arange(s).expand(2, s).contiguous())]


def tokens_pad(s, seed):
    return tokens(s, seed) + [ZooInput(keep_mask(s).long())]


# ------------------------------------------------------- attention modules

class Heads(nn.Module):
    """Projections shared by the attention spellings: x (B, S, E) -> q, k, v (B, H, S, D)."""

    def __init__(self, kv_heads=H):
        super().__init__()
        self.kv_heads = kv_heads
        self.q = nn.Linear(E, H * D, dtype=DTYPE)
        self.kv = nn.Linear(E, 2 * kv_heads * D, dtype=DTYPE)
        self.o = nn.Linear(H * D, E, dtype=DTYPE)

    def split(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, H, D).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2 * self.kv_heads, D).transpose(1, 2).chunk(2, dim=1)
        return q, k, v

    def merge(self, o):
        b, h, s, d = o.shape
        return self.o(o.transpose(1, 2).reshape(b, s, h * d))


class SdpaPlain(Heads):  # torch SDPA, no mask, explicit dropout_p=0
    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, dropout_p=0.0))


class SdpaCausalScale(Heads):  # SDPA is_causal with a custom scale
    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3))


class SdpaBoolPadding(Heads):  # HF sdpa attention with a bool key padding mask
    def forward(self, x, keep):
        q, k, v = self.split(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :]))


class SdpaEnableGqa(Heads):  # SDPA's own GQA (enable_gqa=True)
    def __init__(self):
        super().__init__(HKV)

    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


class SdpaSegments(Heads):  # sequence packing: attend within a document (segment ids)
    def forward(self, x, seg):
        q, k, v = self.split(x)
        same = seg[:, None, :, None] == seg[:, None, None, :]
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=same))


class MatmulDiv(Heads):  # textbook: softmax(q kᵀ / sqrt(d)) v
    def forward(self, x):
        q, k, v = self.split(x)
        s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D)
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))


class MatmulScaleQkTril(Heads):  # scale on q and k (d**-0.25), tril(ones) causal, masked_fill(-inf)
    def forward(self, x):
        q, k, v = self.split(x)
        s_len = x.shape[1]
        s = (q * D ** -0.25) @ (k * D ** -0.25).transpose(-1, -2)
        causal = torch.tril(torch.ones(s_len, s_len, device=x.device)).view(1, 1, s_len, s_len)
        s = s.masked_fill(causal == 0, float("-inf"))
        return self.merge(s.softmax(dim=-1) @ v)


class BmmTriuAdditive(Heads):  # fairseq / MBart: heads folded into batch, bmm, triu(-inf) added
    def forward(self, x):
        q, k, v = self.split(x)
        b, h, s_len, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, s_len, d) for t in (q * d ** -0.5, k, v))
        s = torch.bmm(q3, k3.transpose(1, 2))
        s = s + torch.triu(torch.full((s_len, s_len), float("-inf"), dtype=s.dtype), diagonal=1)
        o = torch.bmm(F.softmax(s, dim=-1), v3)
        return self.merge(o.view(b, h, s_len, d))


class EinsumWindow(nn.Module):  # heads split by einsum; causal sliding window from aranges (Mistral-like)
    def __init__(self, window=5):
        super().__init__()
        self.window = window
        self.qkv = nn.Linear(E, 3 * H * D, dtype=DTYPE)
        self.o = nn.Linear(H * D, E, dtype=DTYPE)

    def forward(self, x):
        b, s_len, _ = x.shape
        q, k, v = self.qkv(x).view(b, s_len, 3, H, D).unbind(2)  # (B, S, H, D) each
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5
        i = torch.arange(s_len, device=x.device)[:, None]
        j = torch.arange(s_len, device=x.device)[None, :]
        allowed = (j <= i) & (i - j < self.window)
        s = torch.where(allowed, s, torch.finfo(s.dtype).min)
        o = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
        return self.o(o.reshape(b, s_len, H * D))


class NonCausalWindow(Heads):  # left-only local window, future visible (j > i - W), additive
    def forward(self, x):
        q, k, v = self.split(x)
        s_len = x.shape[1]
        pos = torch.arange(s_len, device=x.device)
        bias = torch.zeros(s_len, s_len, dtype=x.dtype).masked_fill(pos[None, :] <= pos[:, None] - 6, float("-inf"))
        s = q @ k.transpose(-2, -1) * D ** -0.5 + bias
        return self.merge(s.softmax(-1) @ v)


class BaddbmmPadding(Heads):  # Bloom: baddbmm(bias, q, kᵀ, beta=1, alpha=scale), additive key padding bias
    def forward(self, x, keep):
        q, k, v = self.split(x)
        b, h, s_len, d = q.shape
        bias = ((~keep).to(x.dtype) * -1e9)[:, None, None, :].expand(b, h, 1, s_len).reshape(b * h, 1, s_len)
        s = torch.baddbmm(bias, q.reshape(b * h, s_len, d), k.reshape(b * h, s_len, d).transpose(1, 2),
                          beta=1.0, alpha=1.0 / math.sqrt(d))
        o = torch.bmm(s.softmax(-1), v.reshape(b * h, s_len, d))
        return self.merge(o.view(b, h, s_len, d))


class BertAdditivePadding(Heads):  # HF BERT eager: (1 - mask) * finfo.min added, dropout in eval
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, x, keep):
        q, k, v = self.split(x)
        ext = (1.0 - keep[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        s = q @ k.transpose(-1, -2) / math.sqrt(D) + ext
        return self.merge(self.drop(F.softmax(s, dim=-1)) @ v)


class Gpt2Attention(nn.Module):  # HF GPT-2 eager: Conv1D c_attn, buffer bias[:, :, :S, :S], where(finfo.min), fp32 upcast
    def __init__(self, max_positions=64):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(max_positions, max_positions, dtype=torch.bool))
                             .view(1, 1, max_positions, max_positions), persistent=False)
        self.c_attn = nn.Linear(E, 3 * E, dtype=DTYPE)
        self.c_proj = nn.Linear(E, E, dtype=DTYPE)
        self.attn_dropout = nn.Dropout(0.1)

    def forward(self, x):
        b, s_len, _ = x.shape
        q, k, v = self.c_attn(x).split(E, dim=2)
        q, k, v = (t.view(b, s_len, H, D).permute(0, 2, 1, 3) for t in (q, k, v))
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device).item() \
            if False else w / (v.size(-1) ** 0.5)
        key_len, query_len = k.size(-2), q.size(-2)
        causal = self.bias[:, :, key_len - query_len:key_len, :key_len]
        mask_value = torch.finfo(w.dtype).min
        w = torch.where(causal, w.to(w.dtype), mask_value)
        w = F.softmax(w.float(), dim=-1).type(v.dtype)
        w = self.attn_dropout(w)
        o = torch.matmul(w, v)
        return self.c_proj(o.permute(0, 2, 1, 3).reshape(b, s_len, E))


class RepeatInterleavePadding(Heads):  # GQA by repeat_interleave, masked_fill(mask == 0, -inf)
    def __init__(self):
        super().__init__(HKV)

    def forward(self, x, keep):
        q, k, v = self.split(x)
        k, v = k.repeat_interleave(H // HKV, dim=1), v.repeat_interleave(H // HKV, dim=1)
        s = q @ k.transpose(-2, -1) * D ** -0.5
        s = s.masked_fill(keep[:, None, None, :] == 0, float("-inf"))
        return self.merge(s.softmax(dim=-1) @ v)


class RepeatKvFp32(Heads):  # HF LLaMA eager: repeat_kv, additive causal triu(finfo.min), softmax(dtype=float32)
    def __init__(self):
        super().__init__(HKV)

    def forward(self, x):
        q, k, v = self.split(x)
        s_len = x.shape[1]
        k, v = repeat_kv(k, H // HKV), repeat_kv(v, H // HKV)
        s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D)
        causal = torch.full((s_len, s_len), torch.finfo(torch.float32).min, dtype=s.dtype).triu(1)
        p = F.softmax(s + causal[None, None], dim=-1, dtype=torch.float32).to(q.dtype)
        return self.merge(torch.matmul(p, v))


class CausalPlusPadding(Heads):  # HF-style 4-D mask: where(causal & padding, 0, finfo.min) added to the scores
    def forward(self, x, keep):
        q, k, v = self.split(x)
        s_len = x.shape[1]
        causal = torch.tril(torch.ones(s_len, s_len, dtype=torch.bool, device=x.device))
        allowed = causal[None, None, :, :] & keep[:, None, None, :]
        bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        s = q @ k.transpose(-2, -1) / math.sqrt(D) + bias
        return self.merge(s.softmax(-1) @ v)


class DenseUserMask(Heads):  # an arbitrary additive (B, 1, S, S) mask from the caller
    def forward(self, x, bias):
        q, k, v = self.split(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(D) + bias
        return self.merge(s.softmax(-1) @ v)


class MhaBatchFirst(nn.Module):  # nn.MultiheadAttention(batch_first=True), need_weights=False
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=DTYPE)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class MhaSeqFirstCausal(nn.Module):  # nn.MultiheadAttention (S, B, E), bool causal attn_mask, weights dropped
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, dtype=DTYPE)

    def forward(self, x):
        s_len = x.shape[1]
        mask = torch.triu(torch.ones(s_len, s_len, dtype=torch.bool, device=x.device), diagonal=1)
        y = x.transpose(0, 1)
        out, _ = self.mha(y, y, y, attn_mask=mask)
        return out.transpose(0, 1)


# --------------------------------------------------------------- tiny models

class Gpt2Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(E, dtype=DTYPE), nn.LayerNorm(E, dtype=DTYPE)
        self.attn = Gpt2Attention()
        self.mlp = nn.Sequential(nn.Linear(E, 4 * E, dtype=DTYPE), nn.GELU(), nn.Linear(4 * E, E, dtype=DTYPE))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGpt2(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, E, dtype=DTYPE)
        self.wpe = nn.Embedding(64, E, dtype=DTYPE)
        self.h = nn.ModuleList(Gpt2Block() for _ in range(layers))
        self.ln_f = nn.LayerNorm(E, dtype=DTYPE)

    def forward(self, input_ids, position_ids):
        x = self.wte(input_ids) + self.wpe(position_ids)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class TinyLlama(LlamaLike):
    """transformers' LLaMA at toy size: layers alternate its eager and sdpa attention paths (all
    sdpa with ``sdpa=True``), RMSNorm written out, RoPE from position ids, no LM head: returns
    the final norm's output. ``ringfx.reference_model`` is the one definition."""

    def __init__(self, layers=2, sdpa=False):
        cfg = ModelConfig("zoo-tiny-llama", layers=layers, hidden=E, heads=H, kv_heads=HKV, head_dim=D, ffn=32,
                          vocab=VOCAB, dtype="fp64")
        super().__init__(cfg, attention=(Attention.HF_SDPA,) if sdpa else (Attention.HF_EAGER, Attention.HF_SDPA),
                         position_ids=True, fused_norm=False, lm_head=False)


class BertLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = BertAdditivePadding()
        self.ln1, self.ln2 = nn.LayerNorm(E, dtype=DTYPE), nn.LayerNorm(E, dtype=DTYPE)
        self.ffn = nn.Sequential(nn.Linear(E, 32, dtype=DTYPE), nn.GELU(), nn.Linear(32, E, dtype=DTYPE))

    def forward(self, x, keep):
        x = self.ln1(x + self.attn(x, keep))
        return self.ln2(x + self.ffn(x))


class TinyBert(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.word = nn.Embedding(VOCAB, E, dtype=DTYPE)
        self.pos = nn.Embedding(64, E, dtype=DTYPE)
        self.layers = nn.ModuleList(BertLayer() for _ in range(layers))

    def forward(self, input_ids, position_ids, attention_mask):
        x = self.word(input_ids) + self.pos(position_ids)
        keep = attention_mask.bool()
        for layer in self.layers:
            x = layer(x, keep)
        return x



class TwoGraphs(nn.Module):
    """Two causal attentions with a graph break between them: two graphs, one site each
    (``x``: (2, S, 8) float64)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8, dtype=DTYPE), nn.Linear(8, 8, dtype=DTYPE)

    def attend(self, lin, x):
        q = lin(x).view(2, -1, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(x.shape)

    def forward(self, x):
        x = self.attend(self.a, x)
        torch._dynamo.graph_break()
        return self.attend(self.b, x)

ZOO: list[ZooEntry] = [
    ZooEntry("sdpa_plain", SdpaPlain, hidden, 1, "none"),
    ZooEntry("sdpa_causal_scale", SdpaCausalScale, hidden, 1, "causal"),
    ZooEntry("sdpa_bool_padding", SdpaBoolPadding, hidden_pad, 1, "key_padding"),
    ZooEntry("sdpa_enable_gqa", SdpaEnableGqa, hidden, 1, "causal"),
    ZooEntry("sdpa_segment_ids", SdpaSegments, hidden_seg, 1, "segment_ids"),
    ZooEntry("matmul_div", MatmulDiv, hidden, 1, "none"),
    ZooEntry("matmul_scale_qk_tril", MatmulScaleQkTril, hidden, 1, "causal"),
    ZooEntry("bmm_triu_additive", BmmTriuAdditive, hidden, 1, "causal"),
    ZooEntry("einsum_window", EinsumWindow, hidden, 1, "causal+window(5)"),
    ZooEntry("noncausal_window", NonCausalWindow, hidden, 1, "window(6)"),
    ZooEntry("baddbmm_padding", BaddbmmPadding, hidden_pad, 1, "key_padding"),
    ZooEntry("bert_additive_padding", BertAdditivePadding, hidden_pad, 1, "key_padding"),
    ZooEntry("gpt2_attention", Gpt2Attention, hidden, 1, "causal", tol=1e-5),
    ZooEntry("repeat_interleave_padding", RepeatInterleavePadding, hidden_pad, 1, "key_padding"),
    ZooEntry("repeat_kv_fp32", RepeatKvFp32, hidden, 1, "causal", tol=1e-5),
    ZooEntry("causal_plus_padding", CausalPlusPadding, hidden_right_pad, 1, "causal+key_padding"),
    ZooEntry("dense_user_mask", DenseUserMask, hidden_dense, 1, "dense", real_ring=False),
    ZooEntry("mha_batch_first", MhaBatchFirst, hidden, 1, "none"),
    ZooEntry("mha_seq_first_causal", MhaSeqFirstCausal, hidden, 1, "causal"),
    ZooEntry("tiny_gpt2", TinyGpt2, tokens, 2, "causal", tol=1e-5),
    ZooEntry("tiny_llama", TinyLlama, tokens, 2, "causal", tol=1e-5),
    ZooEntry("tiny_bert", TinyBert, tokens_pad, 2, "key_padding"),
]


# ------------------------------------------------------------ comparison

def compare_case(entry: ZooEntry, group, layout: str = "contiguous", seq_len: int = 16, seed: int = 0,
                 all_reduce: bool = False, dtype: torch.dtype = DTYPE, reduce_group=None) -> dict:
    """Run ``entry`` untransformed on the full sequence and transformed on this process's
    shard; return the largest output and parameter-gradient errors.

    The loss is ``(out * w).sum()`` for a fixed random ``w``: each rank backpropagates
    the loss of its own output shard, so the full gradient is the sum over ranks
    (``all_reduce=True`` on a real ring)."""
    import copy

    import torch.distributed as dist

    import ringfx
    from ringfx.api import transform

    torch.compiler.reset()
    torch.manual_seed(seed)
    model = entry.make_module().eval().to(dtype)
    ref = copy.deepcopy(model)
    inputs = entry.make_inputs(seq_len, seed)
    for i in inputs:
        if i.value.is_floating_point():
            i.value = i.value.to(dtype)
    ref_out = ref(*[i.value for i in inputs])
    w = torch.randn(ref_out.shape, generator=_gen(seed + 7), dtype=ref_out.dtype)
    (ref_out * w).sum().backward()

    ring = transform(model, mesh=group, layout=layout, inputs="sharded")
    shard = lambda x, dim: ringfx.shard(x, dim, layout=layout, group=group)
    out = ring(*[shard(i.value, i.seq_dim) if i.seq_dim is not None else i.value for i in inputs])
    (out * shard(w, 1)).sum().backward()
    grad_err = 0.0
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if all_reduce:
            dist.all_reduce(g, group=reduce_group or group)
        g_ref = p_ref.grad if p_ref.grad is not None else torch.zeros_like(p_ref)
        grad_err = max(grad_err, (g - g_ref).abs().max().item())
    return {
        "name": entry.name,
        "sites": len(ring.sites),
        "rewritten": sum(s.decision == "rewritten" for s in ring.sites),
        "mask_kinds": sorted({s.mask_kind for s in ring.sites}),
        "out_err": (out - shard(ref_out, 1)).abs().max().item(),
        "grad_err": grad_err,
    }


def gloo_zoo_worker(rank: int, world: int, cases: list) -> list:
    """Runs on each rank of a real gloo ring: every ``(zoo entry name, layout)`` case."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    results = []
    by_name = {e.name: e for e in ZOO}
    for name, layout in cases:
        r = compare_case(by_name[name], dist.group.WORLD, layout=layout, all_reduce=True)
        r["layout"] = layout
        results.append(r)
    # the ring given as a 1-D DeviceMesh, as torch's context_parallel takes it
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    r = compare_case(by_name["tiny_llama"], mesh, layout="zigzag", all_reduce=True, reduce_group=mesh.get_group())
    r["layout"] = "zigzag (DeviceMesh)"
    results.append(r)
    return results
