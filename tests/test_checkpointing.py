"""Attention inside activation checkpointing: dynamo captures a checkpointed region as a
higher-order op (``tag_activation_checkpoint(wrap_body_0, ...)``) whose body is a subgraph
module. The attention passes run on those bodies too: every site is found and rewritten,
the checkpointing stays (the ring op is recomputed in backward), and the sites are
reported with the index of the graph that calls the body."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import ringfx
from ringfx.passes.node_facts import hop_subgraphs
from ringfx.passes.rewrite_attention import ring_attention_nodes
from zoo import TinyLlama, tokens

S = 12  # divisible by 2P for P = 2, 3: both layouts


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch.compiler.reset()


def _ring_ops(gm) -> int:
    return len(ring_attention_nodes(gm)) + sum(len(ring_attention_nodes(sub)) for _, _, sub in hop_subgraphs(gm))


def _has_checkpoint(gm) -> bool:
    return any(n.op == "call_function" and "activation_checkpoint" in str(n.target) for n in gm.graph.nodes)


def _compare(model, inputs: dict, seq_inputs: set, ring, layout: str, out_of=lambda o: o):
    """Run ``model`` untransformed on full inputs and transformed on the ring's shards;
    return (transformed model, output error, largest parameter-gradient error)."""
    ref = copy.deepcopy(model)
    ref_out = out_of(ref(**inputs))
    w = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(7), dtype=ref_out.dtype)
    (ref_out * w).sum().backward()
    shard = lambda t: ringfx.shard(t, 1, layout=layout, group=ring)
    ring_model = ringfx.transform(model, mesh=ring, layout=layout, inputs="sharded")  # the caller shards
    out = out_of(ring_model(**{k: shard(v) if k in seq_inputs else v for k, v in inputs.items()}))
    (out * shard(w)).sum().backward()
    grad_err = max((p.grad - p_ref.grad).abs().max().item()
                   for p, p_ref in zip(model.parameters(), ref.parameters()) if p_ref.grad is not None)
    assert all(p.grad is not None for p, p_ref in zip(model.parameters(), ref.parameters()) if p_ref.grad is not None)
    return ring_model, (out - shard(ref_out)).abs().max().item(), grad_err


transformers = pytest.importorskip("transformers", reason="needs transformers (pip install transformers)")


def _hf_llama(attn):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation=attn, attention_dropout=0.0, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).float()
    with pytest.warns(FutureWarning) if hasattr(model, "activation_checkpointing_enable") else _nothing():
        model.gradient_checkpointing_enable()
    return model.train()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# each pair of (attention implementation, ring size, layout) once: the full cube costs
# twice the CI time and meets no code path these four do not
HF_CHECKPOINTED = [("sdpa", 2, "contiguous"), ("eager", 2, "zigzag"), ("sdpa", 3, "zigzag"), ("eager", 3, "contiguous")]


@pytest.mark.parametrize("attn,world,layout", HF_CHECKPOINTED, ids=[f"{a}-P{p}-{lay}" for a, p, lay in HF_CHECKPOINTED])
def test_hf_llama_gradient_checkpointing_is_rewritten_and_exact(attn, world, layout):
    model = _hf_llama(attn)
    ids = torch.randint(0, 100, (2, S), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(S).expand(2, S)
    # an attention mask given: without one, transformers infers packed documents from the
    # position ids (a cumsum over the sequence, rightly warned on caller-sharded inputs)
    mask = torch.ones(2, S, dtype=torch.long)
    ring_model, out_err, grad_err = _compare(model, {"input_ids": ids, "position_ids": pos, "attention_mask": mask},
                                             {"input_ids", "position_ids", "attention_mask"},
                                             ringfx.LoopbackRing(world), layout, out_of=lambda o: o.logits)
    assert [s.decision for s in ring_model.sites] == ["rewritten"] * 2
    assert {s.graph_index for s in ring_model.sites} == {0}
    gm = ring_model.reports[0].graph_module
    assert _has_checkpoint(gm) and _ring_ops(gm) == 2 and not ring_attention_nodes(gm)
    assert out_err < 1e-5 and grad_err < 1e-4, (out_err, grad_err)


class CheckpointedLlama(TinyLlama):
    """The zoo's TinyLlama with each layer in ``torch.utils.checkpoint``."""

    def forward(self, input_ids, position_ids):
        x = self.embed_tokens(input_ids)
        freqs = position_ids[:, :, None].to(self.inv_freq.dtype) * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None].to(x.dtype), emb.sin()[:, None].to(x.dtype)
        for layer in self.layers:
            x = checkpoint(layer, x, cos, sin, use_reentrant=False)
        return self.norm(x)


class NestedCheckpointLlama(TinyLlama):
    """Checkpointed layers inside one checkpointed stack (nested regions)."""

    def _stack(self, x, cos, sin):
        for layer in self.layers:
            x = checkpoint(layer, x, cos, sin, use_reentrant=False)
        return x

    def forward(self, input_ids, position_ids):
        x = self.embed_tokens(input_ids)
        freqs = position_ids[:, :, None].to(self.inv_freq.dtype) * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None].to(x.dtype), emb.sin()[:, None].to(x.dtype)
        return self.norm(checkpoint(self._stack, x, cos, sin, use_reentrant=False))


@pytest.mark.parametrize("make", [CheckpointedLlama, NestedCheckpointLlama], ids=["per_layer", "nested"])
@pytest.mark.parametrize("world", [2, 3])
def test_zoo_tiny_llama_checkpointed_per_layer(make, world):
    torch.manual_seed(0)
    model = make(layers=2)
    ids, pos = (i.value for i in tokens(S, 0))
    ring_model, out_err, grad_err = _compare(model, {"input_ids": ids, "position_ids": pos},
                                             {"input_ids", "position_ids"}, ringfx.LoopbackRing(world), "zigzag")
    assert [(s.mask_kind, s.decision) for s in ring_model.sites] == [("causal", "rewritten")] * 2
    assert _ring_ops(ring_model.reports[0].graph_module) == 2
    assert out_err < 1e-5 and grad_err < 1e-4, (out_err, grad_err)  # its eager layer upcasts softmax to float32


def test_explain_lists_sites_inside_checkpointed_regions():
    torch.manual_seed(0)
    model = CheckpointedLlama(layers=2)
    ids, pos = (i.value for i in tokens(S, 0))
    report = ringfx.explain(model, ids, pos)
    assert len(report.sites) == 2 and all(s.decision == "rewritten" for s in report.sites)
    assert all("reference_model.py" in s.source_line for s in report.sites)  # the model's code, not torch's


class CheckpointedEscape(nn.Module):
    """Probabilities returned from inside a checkpointed region: must not be rewritten."""

    def _attn(self, x):
        p = torch.softmax(x @ x.transpose(-2, -1), -1)
        return p @ x, p

    def forward(self, x):
        return checkpoint(self._attn, x, use_reentrant=False)


def test_left_alone_inside_a_checkpointed_region_is_refused_on_a_ring():
    model = ringfx.transform(CheckpointedEscape(), mesh=ringfx.LoopbackRing(2), inputs="sharded")
    with pytest.raises(ringfx.UnsupportedError, match="attention probabilities escape"):
        model(torch.randn(2, 8, 4, dtype=torch.float64))
