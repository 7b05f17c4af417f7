"""Shared test cases for the ring attention op: inputs, the full-sequence reference,
and a checker that runs on any ring (loopback or a real gloo group).

Every check draws fresh random inputs (seeded per case so that all ranks of a real
ring draw the same full tensors), shards them with ``ringfx.shard``, runs
``ringfx.ring_attention`` forward and backward, and compares this rank's shard of the
output and of dq/dk/dv with the same shard of ``F.scaled_dot_product_attention`` on
the full sequence.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F

import ringfx

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclasses.dataclass(frozen=True)
class Case:
    layout: str = "contiguous"
    causal: bool = False
    hq: int = 4
    hkv: int = 4
    d: int = 8
    batch: int = 2
    chunk: int = 3  # tokens per layout chunk: S = chunk * P (contiguous) or 2 * chunk * P (zigzag)
    window: int | None = None
    padding: bool = False
    segments: bool = False
    bias: bool = False
    kernel: str = "auto"

    def seq_len(self, world: int) -> int:
        return self.chunk * world * (2 if self.layout == "zigzag" else 1)


def make_inputs(case: Case, world: int, dtype, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev = torch.get_default_device()
    s = case.seq_len(world)
    shape_q, shape_kv = (case.batch, case.hq, s, case.d), (case.batch, case.hkv, s, case.d)
    q, k, v = (torch.randn(sh, generator=g, dtype=torch.float64, device="cpu").to(dev, dtype)
               for sh in (shape_q, shape_kv, shape_kv))
    extras = {}
    if case.padding:
        # keep key 0 so every query sees at least one key (also under causal)
        pad = torch.rand(case.batch, s, generator=g, device="cpu") > 0.3
        pad[:, 0] = True
        extras["key_padding_mask"] = pad.to(dev)
    if case.segments:
        # packed documents: sorted ids, some documents crossing shard boundaries
        cuts = torch.rand(case.batch, s, generator=g, device="cpu") < 0.2
        cuts[:, 0] = False
        extras["segment_ids"] = torch.cumsum(cuts.long(), dim=1).to(dev)
    if case.bias:
        extras["attn_bias"] = torch.randn(case.batch, case.hq, s, s, generator=g, dtype=torch.float64,
                                          device="cpu").to(dev, dtype)
    dout = torch.randn(shape_q, generator=g, dtype=torch.float64, device="cpu").to(dev, dtype)
    return q, k, v, extras, dout


def reference_mask(case: Case, s: int, extras):
    i = torch.arange(s)
    allowed = torch.ones(s, s, dtype=torch.bool)
    if case.causal:
        allowed &= i[:, None] >= i[None, :]
    if case.window:
        allowed &= i[:, None] - i[None, :] < case.window
    allowed = allowed[None, None]
    if "key_padding_mask" in extras:
        allowed = allowed & extras["key_padding_mask"][:, None, None, :]
    if "segment_ids" in extras:
        seg = extras["segment_ids"]
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
    return allowed


def reference(q, k, v, case: Case, extras):
    """F.scaled_dot_product_attention on the full sequence (math backend, upcast)."""
    allowed = reference_mask(case, q.shape[2], extras)
    mask = allowed
    if "attn_bias" in extras:
        mask = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, float("-inf")) + extras["attn_bias"]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=case.hq != case.hkv)


def run_case(case: Case, group, dtype=torch.float64, seed: int = 0):
    """Max abs errors (out, dq, dk, dv) of this rank's shards against the reference."""
    world = ringfx.runtime.ring_size(group)
    q, k, v, extras, dout = make_inputs(case, world, dtype, seed)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_dtype = torch.float64
    ref_leaves = [t.to(ref_dtype).requires_grad_() for t in (q, k, v)]
    ref_extras = {n: (t.to(ref_dtype) if t.is_floating_point() else t) for n, t in extras.items()}
    ref = reference(*ref_leaves, case, ref_extras)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.to(ref_dtype))

    def shard(x, dim=2):
        return ringfx.shard(x, dim, layout=case.layout, group=group)

    local = [shard(t).detach().requires_grad_() for t in leaves]
    kwargs = {}
    for name, t in extras.items():
        kwargs[name] = shard(t, 1) if name != "attn_bias" else shard(t, 2)
    out = ringfx.ring_attention(*local, group=group, causal=case.causal, layout=case.layout, window=case.window,
                                kernel=case.kernel, **kwargs)
    grads = torch.autograd.grad(out, local, shard(dout))
    errors = [(out.double() - shard(ref)).abs().max().item()]
    errors += [(g.double() - shard(rg)).abs().max().item() for g, rg in zip(grads, ref_grads)]
    return errors


def matrix(quick: bool = False) -> list[Case]:
    """A representative matrix: both layouts, causal and not, GQA and MQA, every mask
    kind, uneven head dims, batch > 1."""
    cases = []
    for layout, causal in itertools.product(("contiguous", "zigzag"), (False, True)):
        base = Case(layout=layout, causal=causal)
        cases += [
            base,
            dataclasses.replace(base, hq=8, hkv=2),  # GQA
            dataclasses.replace(base, hq=4, hkv=1, d=40),  # MQA, uneven head dim
            dataclasses.replace(base, d=72, batch=1),
            dataclasses.replace(base, window=4),
            dataclasses.replace(base, padding=True, hq=8, hkv=2),
            dataclasses.replace(base, segments=True),
            dataclasses.replace(base, bias=True),
        ]
        if not quick:
            cases += [
                dataclasses.replace(base, window=7, padding=True),
                dataclasses.replace(base, kernel="math", hq=6, hkv=3),
            ]
    return cases
