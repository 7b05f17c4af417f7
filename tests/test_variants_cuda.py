"""The attention variants (soft-capping, sinks, chunked attention, ALiBi, MLA) on CUDA: the
op on a loopback ring of one GPU against the float64 reference of ``test_variants`` (which
runs them on CPU), and transformers' Gemma 2, GPT-OSS, Llama 4 and MPT transformed on CUDA
against the untransformed model on the same GPU. Skipped without CUDA; run on a GPU machine."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch

import ringfx
from test_variants import SCALE, _inputs, _lm_run, _Mla, _slopes, _tiny_lm, assert_lm_close, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# float64: the math block kernel, exact; float32 and bf16: the fused kernels (cuDNN / flash /
# efficient, whichever takes the variant; the bias path for ALiBi), against float64
TOLERANCES = {torch.float64: 1e-10, torch.float32: 5e-5, torch.bfloat16: 0.08}
VARIANTS = {
    "softcap": dict(softcap=2.0),
    "sinks": dict(sinks=True),
    "chunk": dict(chunk=4),
    "alibi": dict(alibi=True),
    "chunk+alibi+sinks": dict(chunk=4, alibi=True, sinks=True),
    "window+padding+softcap": dict(window=3, padding=True, softcap=2.0),
}


def _variant_errors(world, layout, causal, dtype, *, softcap=0.0, sinks=False, chunk=0, alibi=False, window=0,
                    padding=False):
    """Max abs error of out, dq, dk, dv (and the sinks' gradient) of the op on CUDA, every
    rank's shard, against the float64 CPU reference on the whole sequence."""
    q, k, v, sink_logits, pad, dout = _inputs(world, layout, hq=4, hkv=2, seed=world, with_sinks=sinks,
                                              padding=padding, per_rank=5)
    slopes = _slopes(4) if alibi else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([sink_logits.clone().requires_grad_()] if sinks else [])
    ref = reference(*leaves[:3], causal=causal, softcap=softcap, sinks=leaves[3] if sinks else None, window=window,
                    pad=pad, chunk=chunk, slopes=slopes)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    group = ringfx.LoopbackRing(world)

    def shard(x, dim=2):
        return ringfx.shard(x, dim, layout=layout, group=group)

    cuda = [shard(t).to("cuda", dtype).requires_grad_() for t in (q, k, v)]
    cuda_sinks = sink_logits.to("cuda", dtype).requires_grad_() if sinks else None
    out = ringfx.ring_attention(
        *cuda, group=group, causal=causal, layout=layout, scale=SCALE, softcap=softcap or None, sinks=cuda_sinks,
        window=window or None, key_padding_mask=shard(pad, 1).cuda() if padding else None, chunk=chunk or None,
        alibi_slopes=None if slopes is None else slopes.to("cuda", dtype))
    grads = torch.autograd.grad(out, cuda + ([cuda_sinks] if sinks else []), shard(dout).to("cuda", dtype))
    scale = [ref.abs().max()] + [g.abs().max() for g in ref_grads]  # errors relative to each result's size
    errors = [(out.double().cpu() - shard(ref)).abs().max() / scale[0]]
    errors += [(a.double().cpu() - shard(b)).abs().max() / s for a, b, s in zip(grads[:3], ref_grads[:3], scale[1:])]
    if sinks:
        errors.append((grads[3].double().cpu() - ref_grads[3]).abs().max() / scale[4])
    return [e.item() for e in errors]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_on_cuda_matches_reference(variant, dtype):
    for world, layout, causal in itertools.product((1, 2, 3), ("contiguous", "zigzag"), (False, True)):
        errors = _variant_errors(world, layout, causal, dtype, **VARIANTS[variant])
        assert max(errors) < TOLERANCES[dtype], (world, layout, causal, errors)


@pytest.mark.parametrize("world,layout", [(1, "contiguous"), (2, "zigzag"), (3, "contiguous")])
def test_mla_on_cuda(world, layout):
    """A value head dim unlike the query/key one: zero-padded for the CUDA block kernels."""
    torch.compiler.reset()
    torch.manual_seed(0)
    model = _Mla(12, 8).float().cuda()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 13, 16, device="cuda")
    w = torch.randn(2, 13, 16, device="cuda")
    (ref(x) * w).sum().backward()
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(world), layout=layout)
    out = ring(x)
    (out * w).sum().backward()
    assert [s.decision for s in ring.sites] == ["rewritten"]
    torch.testing.assert_close(out, ref(x), atol=2e-5, rtol=2e-5)
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss"])
def test_transformers_variant_models_on_cuda(name):
    """Gemma 2 (soft-capping, a sliding-window layer) and GPT-OSS (sinks) in float32 on CUDA,
    a padded row, zero-touch on a loopback ring of 3: logits, loss and every gradient."""
    torch.compiler.reset()
    model, inputs = _tiny_lm(name)
    model = model.float().cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    params = list(model.named_parameters())
    ref = _lm_run(model, params, inputs)
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(3), layout="zigzag")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ringfx.RingfxWarning)  # GPT-OSS's expert routing runs all-gathered
        got = _lm_run(ring, params, inputs)
    assert ring.sites and all(s.decision == "rewritten" for s in ring.sites)
    _assert_lm_close(got, ref)


def test_gemma2_on_cuda_takes_the_flex_block_kernel():
    """Gemma 2 at a head dim flex's CUDA kernel is taken for (the soft-capped sites run
    flex per block inside the transformed model), float32, loopback ring of 3, a padded row:
    logits, loss and every gradient against the untransformed model."""
    from ringfx.runtime import kernels

    torch.compiler.reset()
    model, inputs = _tiny_lm("gemma2", head_dim=16)
    model = model.float().cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    params = list(model.named_parameters())
    ref = _lm_run(model, params, inputs)
    calls = []
    flex = kernels._flex_attend
    kernels._flex_attend = lambda *a: calls.append(1) or flex(*a)
    try:
        got = _lm_run(ringfx.transform(model, mesh=ringfx.LoopbackRing(3), layout="zigzag"), params, inputs)
    finally:
        kernels._flex_attend = flex
    assert calls, "the soft-capped sites did not run the flex block kernel"
    _assert_lm_close(got, ref)


def _assert_lm_close(got, ref, tol=1e-4):
    assert_lm_close(got, ref, tol)


@pytest.mark.parametrize("name", ["llama4", "mpt"])
def test_transformers_positional_variants_on_cuda(name):
    """Llama 4's chunked attention and MPT's ALiBi, float32 on CUDA, loopback ring of 2."""
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    torch.compiler.reset()
    torch.manual_seed(0)
    if name == "llama4":
        cfg = transformers.Llama4TextConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
            attention_chunk_size=4, num_local_experts=1, interleave_moe_layer_step=3, no_rope_layers=[1, 0],
            pad_token_id=0, attn_implementation="sdpa")
        model, kinds = transformers.Llama4ForCausalLM(cfg), ["causal+chunk(4)", "causal"]
    else:
        cfg = transformers.MptConfig(vocab_size=96, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                                     attn_implementation="eager")
        model, kinds = transformers.MptForCausalLM(cfg), ["causal+alibi"] * 2
    model = model.cuda().eval()
    ids = torch.randint(3, 96, (2, 13), device="cuda")
    inputs = dict(input_ids=ids, labels=ids, use_cache=False)
    params = list(model.named_parameters())
    ref = _lm_run(model, params, inputs)
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(2), layout="zigzag")
    got = _lm_run(ring, params, inputs)
    assert [(s.decision, s.mask_kind) for s in ring.sites] == [("rewritten", k) for k in kinds]
    _assert_lm_close(got, ref)


def test_flex_block_kernel_on_cuda():
    """Soft-capped scores take compiled flex per block on CUDA (``kernel="auto"`` at a head
    dim flex is taken for), its backward fed the merged log-sum-exp through its own lse
    gradient: every rank's shard against the float64 reference, with causal, a window, key
    padding, GQA and MQA; ALiBi computed inside flex from the blocks' positions (no mask).
    Each case compiles its own flex graphs (20-90 s on an H200; 3 min in all)."""
    from ringfx.runtime.kernels import choose_kernel

    assert choose_kernel("auto", torch.device("cuda"), torch.bfloat16, 64, False, 30.0).name == "flex"
    g = torch.Generator().manual_seed(3)
    cases = [  # (world, layout, causal, softcap, window, padding, hkv, alibi, dtype)
        (1, "contiguous", True, 5.0, 0, False, 2, False, torch.bfloat16),
        (2, "zigzag", True, 5.0, 0, True, 1, False, torch.bfloat16),
        (3, "zigzag", True, 0.0, 0, True, 2, True, torch.bfloat16),
        (2, "contiguous", False, 5.0, 0, False, 1, True, torch.float32),
        (2, "contiguous", True, 5.0, 40, False, 2, False, torch.float32),
    ]
    for world, layout, causal, softcap, window, padding, hkv, alibi, dtype in cases:
        s = 96 * world
        q = torch.randn(2, 4, s, 64, generator=g, dtype=torch.float64)
        k = torch.randn(2, hkv, s, 64, generator=g, dtype=torch.float64)
        v = torch.randn(2, hkv, s, 64, generator=g, dtype=torch.float64)
        dout = torch.randn(2, 4, s, 64, generator=g, dtype=torch.float64)
        pad = None
        if padding:
            pad = torch.rand(2, s, generator=g) > 0.3
            pad[:, ::2] = True
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        slopes = _slopes(4) if alibi else None
        ref = reference(*leaves, causal=causal, softcap=softcap, window=window, pad=pad, slopes=slopes)
        ref_grads = torch.autograd.grad(ref, leaves, dout)
        group = ringfx.LoopbackRing(world)

        def shard(x, dim=2):
            return ringfx.shard(x, dim, layout=layout, group=group)

        cuda = [shard(t).to("cuda", dtype).requires_grad_() for t in (q, k, v)]
        out = ringfx.ring_attention(*cuda, group=group, causal=causal, layout=layout, scale=SCALE,
                                    softcap=softcap or None, window=window or None,
                                    key_padding_mask=shard(pad, 1).cuda() if padding else None,
                                    alibi_slopes=None if slopes is None else slopes.to("cuda", dtype))
        grads = torch.autograd.grad(out, cuda, shard(dout).to("cuda", dtype))
        errors = [((a.double().cpu() - shard(b)).abs().max() / b.abs().max()).item()
                  for a, b in zip((out, *grads), (ref, *ref_grads))]
        assert max(errors) < TOLERANCES[dtype], (world, layout, causal, softcap, window, padding, hkv, alibi, errors)
