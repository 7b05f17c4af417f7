"""Zero-touch on CUDA (loopback rings of one GPU): transformers' flex-attention models (lowered
to the ring op) against the same weights with transformers' sdpa / eager attention, and a
transformers LLaMA with each inner compiler, training loss and every gradient. Skipped
without CUDA; run on a GPU machine."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import ringfx
from ringfx.passes.sites import Decision
from ringfx.testing import gradient_errors, max_abs_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ATOL, RTOL = 1e-4, 1e-3  # float32; flex on CUDA runs its own Triton kernels (TF32 off)


def _to_cuda(model, inputs):
    return model.cuda(), {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _step(model, inputs):
    out = model(**inputs)
    out.loss.backward()
    # the transformed model holds the original as ``module``
    grads = {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), out.loss.detach(), grads


def _assert_same(got, ref, case):
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = got, ref
    assert max_abs_error(logits, ref_logits) < ATOL, case
    assert max_abs_error(loss, ref_loss) < ATOL, case
    as_params = {n: SimpleNamespace(grad=g) for n, g in grads.items()}
    worst, err, bad = gradient_errors(as_params, ref_grads, rtol=RTOL, atol=ATOL)
    assert not bad, f"{case}: grads of {bad} differ (worst {worst}: {err:.3g})"


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_transformers_flex_models_on_cuda(name):
    from test_flex import build

    torch.compiler.reset()
    model, inputs, reference, kinds = build(name)
    model, inputs = _to_cuda(model, inputs)
    # the reference: the same weights with transformers' sdpa / eager attention (what flex
    # computes; these tiny models' head dim of 8 is below what flex's CUDA kernels take)
    model.set_attn_implementation(reference)
    ref = _step(model, inputs)
    model.set_attn_implementation("flex_attention")
    for world, layout in ((2, "zigzag"), (3, "contiguous")):
        torch.compiler.reset()
        copied = copy.deepcopy(model)
        ring = ringfx.transform(copied, mesh=ringfx.LoopbackRing(world), layout=layout)
        got = _step(ring, inputs)
        assert [s.mask_kind for s in ring.sites] == kinds and all(s.decision is Decision.REWRITE for s in ring.sites)
        _assert_same(got, ref, f"{name} P={world} {layout}")


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_transformers_llama_with_each_inner_compiler_on_cuda(inner):
    """The README's advice (inner="inductor" for training) on a ring of 2: the sharding runs
    inside the compiled graph."""
    pytest.importorskip("transformers", reason="needs transformers")
    import hf_zoo

    torch.compiler.reset()
    model, inputs, _ = hf_zoo.build("llama", "sdpa", 24)
    model, inputs = _to_cuda(model, inputs)
    ref = _step(model, inputs)
    ring = ringfx.transform(copy.deepcopy(model), mesh=ringfx.LoopbackRing(2), layout="zigzag", inner=inner)
    got = _step(ring, inputs)
    assert ring.sites and all(s.decision is Decision.REWRITE for s in ring.sites)
    _assert_same(got, ref, f"llama inner={inner}")
