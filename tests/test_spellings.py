"""Held-out attention spellings from real model code, recognised by the matcher and
exact under the zero-touch call.

Each spelling is a small module (projections in, projection out, float64) written the way
the model's code writes its attention. ``ringfx.transform(model, mesh=LoopbackRing(P))``
called like the model (full-length input, odd S) must rewrite every site and return the
untransformed model's output and, after backward, its parameter and input gradients
(float64, 1e-10), on rings of 2 (contiguous) and 3 (zigzag).

* GPT-NeoX / Pythia (transformers < 4.40): ``torch.baddbmm`` of a zeros buffer with
  ``beta=0`` (and the older ``beta=1.0``), ``alpha=1/sqrt(d)``, heads folded into the
  batch, the scores viewed back to 4-D, ``torch.where(causal, scores, finfo.min)`` and
  ``probs @ v`` in 4-D;
* T5: unscaled scores plus a position bias, ``softmax(scores.float(), -1).type_as(scores)``;
* Falcon: the scores divided in place, ``scores /= sqrt(d)``;
* mixed spellings: matmul for the scores, einsum for probs × V (and the converse).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ringfx

E, H, D, B = 16, 2, 8, 2
DTYPE = torch.float64
TOL = 1e-10


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E, dtype=DTYPE)
        self.out = nn.Linear(E, E, dtype=DTYPE)

    def heads(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split(E, dim=-1)
        return tuple(t.view(b, s, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)

    def forward(self, x):
        q, k, v = self.heads(x)
        o = self.attend(q, k, v)
        return self.out(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], E))


class NeoXBaddbmm(_Attn):
    """transformers' GPT-NeoX ``_attn`` before the attention-interface refactor."""

    beta = 0.0

    def __init__(self, max_pos: int = 64):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(max_pos, max_pos, dtype=torch.bool))
                             .view(1, 1, max_pos, max_pos), persistent=False)
        self.norm_factor = math.sqrt(D)

    def attend(self, q, k, v):
        b, h, s, d = q.shape
        causal = self.bias[:, :, :s, :s]
        q3, k3 = q.reshape(b * h, s, d), k.reshape(b * h, s, d)
        scores = torch.zeros(b * h, s, s, dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(scores, q3, k3.transpose(1, 2), beta=self.beta, alpha=1.0 / self.norm_factor)
        scores = scores.view(b, h, s, s)
        mask_value = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype, device=scores.device)
        scores = torch.where(causal, scores, mask_value)
        probs = F.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(probs, v)


class NeoXBaddbmmBeta1(NeoXBaddbmm):
    beta = 1.0


class T5Unscaled(_Attn):
    """T5: no 1/sqrt(d) (folded into the initialisation), a position bias added, softmax in
    float32 cast back with ``type_as``. The bias here is zeros (T5's encoder without
    relative attention bias in layers > 0 adds the first layer's; a learned one is refused)."""

    def attend(self, q, k, v):
        scores = torch.matmul(q, k.transpose(3, 2))
        s = q.shape[2]
        position_bias = torch.zeros((1, H, s, s), device=scores.device, dtype=scores.dtype)
        scores += position_bias
        attn_weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        attn_weights = F.dropout(attn_weights, p=0.1, training=False)
        return torch.matmul(attn_weights, v)


class FalconInplaceDiv(_Attn):
    """Falcon (transformers < 4.36, eager): ``scores /= sqrt(d)`` in place, then an additive
    causal mask and ``softmax(..., dtype=float32)``."""

    def attend(self, q, k, v):
        s = q.shape[2]
        scores = q @ k.transpose(-1, -2)
        scores /= math.sqrt(D)
        causal = torch.triu(torch.full((s, s), torch.finfo(scores.dtype).min, dtype=scores.dtype), diagonal=1)
        probs = F.softmax(scores + causal, dim=-1, dtype=scores.dtype)
        return probs @ v


class FalconInplaceDivBmm(_Attn):
    """Falcon-style in-place division on (B*H, S, S) scores from bmm, causal via masked_fill."""

    def attend(self, q, k, v):
        b, h, s, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, s, d) for t in (q, k, v))
        scores = torch.bmm(q3, k3.transpose(1, 2))
        scores.div_(math.sqrt(d))
        keep = torch.ones(s, s, dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
        return torch.bmm(scores.softmax(-1), v3).view(b, h, s, d)


class MatmulThenEinsum(_Attn):
    """Scores by matmul, probs × V by einsum, heads-last output."""

    def attend(self, q, k, v):
        s = q.shape[2]
        scores = torch.matmul(q, k.transpose(-2, -1)) * D ** -0.5
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        o = torch.einsum("bhqk,bhkd->bqhd", scores.softmax(-1), v)
        return o.transpose(1, 2)


class EinsumThenMatmul(_Attn):
    """Scores by einsum, probs × V by matmul."""

    def attend(self, q, k, v):
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(D)
        return torch.softmax(scores, dim=-1) @ v


SPELLINGS = {
    "neox-baddbmm-beta0-where": NeoXBaddbmm,
    "neox-baddbmm-beta1-where": NeoXBaddbmmBeta1,
    "t5-unscaled-float-type_as": T5Unscaled,
    "falcon-inplace-div": FalconInplaceDiv,
    "falcon-inplace-div_-bmm": FalconInplaceDivBmm,
    "matmul-scores-einsum-pv": MatmulThenEinsum,
    "einsum-scores-matmul-pv": EinsumThenMatmul,
}
RINGS = [(2, "contiguous", 11), (3, "zigzag", 13)]
# T5's ``scores.float()`` rounds float64 scores to float32 in the reference (in a float32
# model it is the identity); the ring op keeps float64, so the two agree to float32's precision
TOLS = {"t5-unscaled-float-type_as": 1e-6}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()


def _run(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=DTYPE).view(out.shape)).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("name", SPELLINGS)
@pytest.mark.parametrize("world,layout,seq_len", RINGS, ids=[f"P{p}-{lay}-S{s}" for p, lay, s in RINGS])
def test_spelling_rewritten_and_exact_zero_touch(name, world, layout, seq_len):
    torch.manual_seed(0)
    model = SPELLINGS[name]()
    x = torch.randn(B, seq_len, E, dtype=DTYPE)
    ref_out, ref_dx = _run(model, x)
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(world), layout=layout)
    out, dx = _run(ring, x)
    assert ring.sites and all(s.decision == "rewritten" for s in ring.sites), [
        (s.pattern, s.decision, s.reason) for s in ring.sites]
    tol = TOLS.get(name, TOL)
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(dx, ref_dx, atol=tol, rtol=tol)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=tol, rtol=tol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", SPELLINGS)
def test_spelling_named_by_explain(name):
    torch.manual_seed(0)
    model = SPELLINGS[name]()
    report = ringfx.explain(model, torch.randn(B, 9, E, dtype=DTYPE))
    assert len(report.sites) == 1 and not report.left_alone, str(report)
