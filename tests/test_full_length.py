"""Full-length inputs in, full-length outputs out: ``transform(shard_inputs=...,
gather_outputs=...)`` shards the named arguments itself and gathers the per-token
outputs, so a model is called exactly as without ringfx."""

import copy

import pytest
import torch

import ringfx
from ringfx.testing import spawn_gloo
from zoo import TinyBert, TinyLlama, tokens, tokens_pad

SHARD = {"input_ids": 1, "position_ids": 1, "attention_mask": 1}


def _compare(model_cls, make_inputs, group, layout, all_reduce=False):
    """Output and parameter-gradient errors of the full-length call against the model."""
    import torch.distributed as dist

    torch.compiler.reset()
    torch.manual_seed(0)
    model = model_cls().eval()
    ref = copy.deepcopy(model)
    inputs = [i.value for i in make_inputs(24, 1)]
    ref_out = ref(*inputs)
    w = torch.randn(ref_out.shape, dtype=ref_out.dtype, generator=torch.Generator().manual_seed(3))
    (ref_out * w).sum().backward()
    names = list(SHARD)[: len(inputs)]
    ring_model = ringfx.transform(model, group, layout=layout, shard_inputs={n: SHARD[n] for n in names},
                                  gather_outputs=1)
    out = ring_model(*inputs)
    assert out.shape == ref_out.shape
    # each rank's loss covers its own tokens: the full gradient is the sum over the ring
    (ringfx.shard(out * w, 1, layout=layout, group=group)).sum().backward()
    grad_err = 0.0
    for p, p_ref in zip(model.parameters(), ref.parameters()):
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if all_reduce:
            dist.all_reduce(g)
        grad_err = max(grad_err, (g - p_ref.grad).abs().max().item())
    return (out - ref_out).abs().max().item(), grad_err, [s.decision for s in ring_model.sites]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("model_cls,make_inputs", [(TinyLlama, tokens), (TinyBert, tokens_pad)],
                         ids=["tiny-llama", "tiny-bert"])
def test_full_length_call_matches_the_model_on_a_loopback_ring(model_cls, make_inputs, layout):
    out_err, grad_err, decisions = _compare(model_cls, make_inputs, ringfx.LoopbackRing(3), layout)
    assert decisions == ["rewritten", "rewritten"]
    assert out_err < 1e-5 and grad_err < 1e-5, (out_err, grad_err)


def _gloo_worker(rank, world):
    import torch.distributed as dist

    torch.set_num_threads(1)
    return [_compare(TinyLlama, tokens, dist.group.WORLD, layout, all_reduce=True)[:2]
            for layout in ("contiguous", "zigzag")]


@pytest.mark.gloo
def test_full_length_call_on_a_real_gloo_ring():
    for rank_result in spawn_gloo(3, _gloo_worker):
        for out_err, grad_err in rank_result:
            assert out_err < 1e-5 and grad_err < 1e-5, rank_result


def test_outputs_without_the_token_dim_come_back_as_computed():
    class WithPooled(TinyLlama):
        def forward(self, input_ids, position_ids):
            h = super().forward(input_ids, position_ids)
            return h, h.sum()

    ring = ringfx.LoopbackRing(2)
    model = WithPooled().eval()
    ids, pos = (i.value for i in tokens(16, 0))
    ref_h, _ = model(ids, pos)
    with pytest.warns(ringfx.RingfxWarning, match="'sum' over the sequence at"):
        h, total = ringfx.transform(model, ring, layout="zigzag", shard_inputs={"input_ids": 1, "position_ids": 1},
                                    gather_outputs=1)(ids, pos)
    torch.testing.assert_close(h, ref_h)  # per-token: gathered back to full length
    # not per-token: the sum over the rank's own tokens (the loopback ring's rank holds all P shards)
    assert total.dim() == 0
    # (float32 sums of the same values in another order: the op's output layout decides it)
    torch.testing.assert_close(total, ringfx.shard(ref_h, 1, layout="zigzag", group=ring).sum(), rtol=1e-5, atol=1e-5)


def test_bad_options_are_refused():
    model = TinyLlama()
    ring = ringfx.LoopbackRing(2)
    with pytest.raises(ValueError, match="no argument 'ids'"):
        ringfx.transform(model, ring, shard_inputs={"ids": 1})
    with pytest.raises(TypeError, match="sequence dim"):
        ringfx.transform(model, ring, shard_inputs={"input_ids": "seq"})
    with pytest.raises(TypeError, match="gather_outputs"):
        ringfx.transform(model, ring, gather_outputs="1")
    ids, pos = (i.value for i in tokens(16, 0))
    with pytest.raises(ValueError, match="same sequence"):
        ringfx.transform(model, ring, shard_inputs={"input_ids": 1, "position_ids": 1})(ids, pos[:, :8])
    with pytest.raises(ValueError, match="divisible"):
        ringfx.transform(model, ring, shard_inputs={"input_ids": 1, "position_ids": 1})(ids[:, :15], pos[:, :15])


def test_position_ids_filled_in_when_left_out():
    class Positions(TinyLlama):  # position ids optional, as in transformers models
        def forward(self, input_ids, position_ids=None):
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            return super().forward(input_ids, position_ids)

    ring, model = ringfx.LoopbackRing(3), Positions().eval()
    ids, _ = (i.value for i in tokens(24, 0))
    ring_model = ringfx.transform(model, ring, layout="zigzag", shard_inputs={"input_ids": 1}, gather_outputs=1,
                                  position_ids="position_ids")
    torch.testing.assert_close(ring_model(ids), model(ids))
    with pytest.raises(ValueError, match="no such argument"):
        ringfx.transform(model, ring, shard_inputs={"input_ids": 1}, position_ids="pos")
    with pytest.raises(ValueError, match="shard_inputs"):
        ringfx.transform(model, ring, position_ids="position_ids")


def test_auto_shards_the_tensor_arguments_of_the_sequence_length():
    ring, model = ringfx.LoopbackRing(2), TinyBert().eval()
    inputs = [i.value for i in tokens_pad(16, 0)]
    ring_model = ringfx.transform(model, ring, layout="zigzag", shard_inputs="auto", gather_outputs=1)
    torch.testing.assert_close(ring_model(*inputs), model(*inputs))
    with pytest.raises(ValueError, match="'auto' or a dict"):
        ringfx.transform(model, ring, shard_inputs="all")
