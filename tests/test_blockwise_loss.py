"""Blockwise loss: ``transform(..., blockwise_loss=...)`` fuses the output projection and its
cross-entropy into ``ringfx::linear_cross_entropy`` (chunks of tokens, no whole logits).

The op against ``F.cross_entropy(F.linear(...))`` (forward, every gradient, opcheck); the
pass on a hand-written LM in float64 (graph, exactness, the spellings: shifted logits,
``nll_loss(log_softmax)``, sums, label smoothing) and on transformers' LLaMA in float32;
the logits are not saved for backward; negative cases stay as written, with the reason.
All at P = 1 (no ring).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ringfx
from ringfx.blockwise import chunk_tokens, chunked_linear_cross_entropy
from ringfx.passes.node_facts import op_name

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def op_counts(gm) -> dict:
    counts = {}
    for n in gm.graph.nodes:
        name = op_name(n)
        if name:
            counts[name] = counts.get(name, 0) + 1
    return counts


def assert_op_counts(gm, expected: dict) -> None:
    counts = op_counts(gm)
    got = {k: counts.get(k, 0) for k in expected}
    assert got == expected, f"op counts {got} != {expected}\n{gm.code}"


def assert_close(a, b, tol, what=""):
    assert a.shape == b.shape, what
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol * max(1.0, b.abs().max().item()), f"{what}: max error {err}"


# -- the op -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
def test_op_equals_linear_then_cross_entropy(dtype, reduction, smoothing, bias):
    torch.manual_seed(0)
    h = torch.randn(2, 13, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(11, 8, dtype=dtype, requires_grad=True)
    b = torch.randn(11, dtype=dtype, requires_grad=True) if bias else None
    y = torch.randint(0, 11, (2, 13))
    y[0, :3] = -100
    ref = F.cross_entropy(F.linear(h, w, b).view(-1, 11), y.view(-1), reduction=reduction, label_smoothing=smoothing)
    got = chunked_linear_cross_entropy(h, w, b, y, reduction=reduction, label_smoothing=smoothing, chunk=5)
    assert got.dtype == ref.dtype
    assert_close(got, ref, TOL[dtype], "loss")
    params = [h, w] + ([b] if bias else [])
    for g_ref, g_got, name in zip(torch.autograd.grad(ref, params), torch.autograd.grad(got, params), "hwb"):
        assert_close(g_got, g_ref, TOL[dtype], f"d{name}")


def test_op_count_output_and_all_ignored():
    h, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([1, -100, 2, -100, 4, 0])
    loss, count = torch.ops.ringfx.linear_cross_entropy(h, w, None, y, -100, "sum", 0.0, 4, torch.float64)
    assert count.item() == 4 and count.dtype == torch.int64
    assert_close(loss, F.cross_entropy(h @ w.T, y, reduction="sum"), 1e-12)
    everything_ignored = torch.full((6,), -100)
    ref = F.cross_entropy(h @ w.T, everything_ignored)
    got = chunked_linear_cross_entropy(h, w, None, everything_ignored, chunk=4)
    assert torch.isnan(ref) and torch.isnan(got)


def test_op_passes_opcheck():
    h = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 2, 3, 4, 0, 1])
    torch.library.opcheck(torch.ops.ringfx.linear_cross_entropy.default,
                          (h, w, b, y, -100, "mean", 0.1, 3, torch.float32))


def test_option_values():
    assert chunk_tokens(None) == 0 and chunk_tokens(False) == 0 and chunk_tokens(64) == 64
    assert chunk_tokens(True) > 0
    with pytest.raises(ValueError, match="blockwise_loss"):
        chunk_tokens("yes")
    with pytest.raises(ValueError, match="chunk"):
        chunked_linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), None, torch.zeros(2, dtype=torch.long),
                                     chunk=0)


# -- the pass on a hand-written LM --------------------------------------------------------------


class TinyLM(nn.Module):
    """Embedding, one causal attention layer, an LM head with a bias; the loss in several spellings."""

    def __init__(self, vocab=40, hidden=12, spelling="cross_entropy", dtype=torch.float64):
        super().__init__()
        self.spelling = spelling
        self.embed = nn.Embedding(vocab, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.mlp = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab)
        self.to(dtype)

    def forward(self, ids, labels):
        x = self.embed(ids)
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        h = x + torch.tanh(self.mlp(x + a))
        logits = self.head(h)
        vocab = logits.shape[-1]
        if self.spelling == "cross_entropy":          # transformers' ForCausalLMLoss, labels pre-shifted
            return F.cross_entropy(logits.view(-1, vocab), labels.reshape(-1), ignore_index=-100)
        if self.spelling == "shifted_logits":         # GPT-2's older loss: shift the logits, not the labels
            shift = logits[..., :-1, :].contiguous()
            return F.cross_entropy(shift.view(-1, vocab), labels[..., 1:].reshape(-1), label_smoothing=0.1)
        if self.spelling == "nll_log_softmax":        # nanoGPT-style log_softmax + nll_loss, summed
            return F.nll_loss(F.log_softmax(logits.flatten(0, 1), dim=-1), labels.flatten(), reduction="sum")
        if self.spelling == "with_accuracy":          # the logits have another use: not fused
            acc = (logits.argmax(-1) == labels).double().mean()
            return F.cross_entropy(logits.view(-1, vocab), labels.reshape(-1)), acc
        if self.spelling == "per_token":              # reduction="none": not fused
            return F.cross_entropy(logits.view(-1, vocab), labels.reshape(-1), reduction="none").sum()
        if self.spelling == "returns_logits":         # loss and logits, as transformers returns them
            return F.cross_entropy(logits.view(-1, vocab), labels.reshape(-1)), logits
        raise ValueError(self.spelling)


def _lm_inputs(vocab=40, batch=2, seq=18, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[1, -5:] = -100
    return ids, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _run(model, ids, labels):
    """(outputs, loss, parameter gradients by the untransformed model's names)."""
    model.zero_grad()
    out = model(ids, labels)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return out, loss, _grads(getattr(model, "module", model))


@pytest.mark.parametrize("spelling", ["cross_entropy", "shifted_logits", "nll_log_softmax"])
def test_hand_written_lm_is_fused_and_exact_in_float64(spelling):
    torch.manual_seed(0)
    model = TinyLM(spelling=spelling)
    ids, labels = _lm_inputs()
    _, ref, ref_grads = _run(model, ids, labels)
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(1), blockwise_loss=5)
    _, got, got_grads = _run(ring, ids, labels)
    gm = ring.reports[0].graph_module
    assert_op_counts(gm, {"linear_cross_entropy": 1, "cross_entropy": 0, "nll_loss": 0, "log_softmax": 0,
                          "linear": 2})
    assert ring.reports[0].blockwise_loss.rewritten == 1
    assert_close(got, ref, 1e-10, "loss")
    for name, g in ref_grads.items():
        assert_close(got_grads[name], g, 1e-10, f"grad of {name}")


@pytest.mark.parametrize("spelling", ["with_accuracy", "per_token"])
def test_loss_left_alone_when_the_logits_have_another_use_or_per_token(spelling):
    torch.manual_seed(0)
    model = TinyLM(spelling=spelling)
    ids, labels = _lm_inputs()
    ref_out, _, ref_grads = _run(model, ids, labels)
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(1), blockwise_loss=True)
    got_out, _, got_grads = _run(ring, ids, labels)
    assert_op_counts(ring.reports[0].graph_module, {"linear_cross_entropy": 0, "cross_entropy": 1})
    report = ring.reports[0].blockwise_loss
    assert report.rewritten == 0 and report.skipped == 1
    assert ("another use" if spelling == "with_accuracy" else "reduction='none'") in report.left_alone[0]
    for a, b in zip(ref_out if isinstance(ref_out, tuple) else (ref_out,),
                    got_out if isinstance(got_out, tuple) else (got_out,)):
        assert_close(b, a, 1e-12)
    for name, g in ref_grads.items():
        assert_close(got_grads[name], g, 1e-12, f"grad of {name}")


def test_off_by_default_and_logits_output_becomes_none():
    torch.manual_seed(0)
    model = TinyLM(spelling="returns_logits")
    ids, labels = _lm_inputs()
    (ref_loss, ref_logits), _, ref_grads = _run(model, ids, labels)
    plain = ringfx.transform(model, mesh=ringfx.LoopbackRing(1))
    loss, logits = plain(ids, labels)
    assert plain.reports[0].blockwise_loss.rewritten == 0 and logits is not None
    torch.compiler.reset()
    fused = ringfx.transform(model, mesh=ringfx.LoopbackRing(1), blockwise_loss=True)
    (loss, logits), _, grads = _run(fused, ids, labels)
    assert logits is None
    assert_close(loss, ref_loss, 1e-10)
    for name, g in ref_grads.items():
        assert_close(grads[name], g, 1e-10, f"grad of {name}")
    text = str(ringfx.explain(fused, ids, labels))
    assert "blockwise loss:" in text and "returned as None" in text


def test_no_logits_saved_for_backward():
    """The (B, S, V) logits (and their float32 copies) are not among the tensors autograd
    saves: the largest saved tensor is a hidden-sized one."""
    torch.manual_seed(0)
    vocab, hidden, batch, seq = 512, 12, 2, 64
    model = TinyLM(vocab=vocab, hidden=hidden, dtype=torch.float32)
    ids, labels = _lm_inputs(vocab, batch, seq)

    def saved_bytes(m):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(ids, labels)
        return sizes

    plain = saved_bytes(ringfx.transform(model, mesh=ringfx.LoopbackRing(1)))
    torch.compiler.reset()
    fused = saved_bytes(ringfx.transform(model, mesh=ringfx.LoopbackRing(1), blockwise_loss=16))
    logits_bytes = batch * seq * vocab * 4
    assert max(plain) >= logits_bytes  # the unfused loss saves the logits
    assert max(fused) < logits_bytes // 8, sorted(fused)[-3:]
    assert sum(fused) < sum(plain) - logits_bytes


# -- transformers LLaMA ---------------------------------------------------------------------------


def test_transformers_llama_is_fused_and_exact_in_float32():
    hf_zoo = pytest.importorskip("hf_zoo", reason="needs transformers (hf_zoo builds tiny transformers models)")
    model, inputs, _ = hf_zoo.build("llama", attn="sdpa", seq_len=18)
    ref = model(**inputs)
    ref.loss.backward()
    ref_grads = _grads(model)
    model.zero_grad()
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(1), blockwise_loss=7)
    out = ring(**inputs)
    out.loss.backward()
    assert out.logits is None
    assert_op_counts(ring.reports[0].graph_module, {"linear_cross_entropy": 1, "cross_entropy": 0})
    assert_close(out.loss, ref.loss, 1e-5, "loss")
    for name, g in ref_grads.items():
        assert_close(model.get_parameter(name).grad, g, 1e-5, f"grad of {name}")
    fused = ring.reports[0].blockwise_loss.fused
    assert len(fused) == 1 and "loss_utils.py" in fused[0] and "chunks of 7 tokens" in fused[0]


# -- the planner ------------------------------------------------------------------------------------


def test_planner_logits_term_with_blockwise_loss_stays_constant_in_the_sequence():
    from ringfx.planner import memory_model
    from ringfx.planner.simulate import LOGITS

    whole = memory_model("tiny-llama", ring=True)
    fused = memory_model("tiny-llama", ring=True, blockwise_loss=256)
    at = lambda model, s: model.evaluate(s, 2).get(LOGITS, 0)  # noqa: E731
    # whole logits: (S/P, V) in bf16 plus float32 copies, growing with S; fused: one chunk's worth
    assert at(whole, 1 << 16) >= (1 << 15) * 8192 * 6
    assert at(fused, 1 << 16) == at(fused, 1 << 17) < 256 * 8192 * 24
    assert fused.peak_bytes(1 << 17, 2) < whole.peak_bytes(1 << 17, 2)


def test_plan_and_cli_take_blockwise_loss():
    import argparse

    from ringfx.planner.cli import add_plan_arguments

    result = ringfx.plan("tiny-llama", "64K", device="H100", device_memory="8GiB", world_size=8, blockwise_loss=True)
    assert result.options.blockwise_loss > 0 and "blockwise loss (chunks of" in str(result)
    assert any(r.startswith("blockwise loss: the LM head") for r in result.reasons)
    plain = ringfx.plan("tiny-llama", "64K", device="H100", device_memory="8GiB", world_size=8)
    assert result.ring_size <= plain.ring_size and result.predicted_peak < plain.predicted_peak
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    base = ["--model", "tiny-llama", "--seq-len", "1K"]
    assert parser.parse_args(base).blockwise_loss is False
    assert parser.parse_args(base + ["--blockwise-loss"]).blockwise_loss is True
    assert parser.parse_args(base + ["--blockwise-loss", "2048"]).blockwise_loss == 2048


# -- on a ring: each rank's chunks over its own tokens, then the ring's sum -------------------------


@pytest.mark.parametrize("spelling", ["cross_entropy", "shifted_logits", "nll_log_softmax"])
@pytest.mark.parametrize("world,layout,seq", [(2, "zigzag", 18), (3, "contiguous", 19), (4, "zigzag", 17)])
def test_blockwise_loss_on_a_ring_is_exact_and_sharded(spelling, world, layout, seq):
    """Full-length inputs on loopback rings (odd and padded lengths): the fused loss runs on
    each rank's tokens (no all-gather of the hidden states) and equals the untransformed
    model's loss and every parameter gradient in float64."""
    torch.compiler.reset()
    torch.manual_seed(0)
    model = TinyLM(spelling=spelling)
    ids, labels = _lm_inputs(seq=seq)
    _, ref, ref_grads = _run(model, ids, labels)
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(world), layout=layout, blockwise_loss=4)
    _, got, got_grads = _run(ring, ids, labels)
    (report,) = ring.reports
    assert report.blockwise_loss.rewritten == 1
    assert any("blockwise loss" in d for d in report.sharding.distributed), report.sharding.distributed
    assert not report.sharding.costly_fallbacks, report.sharding.costly_fallbacks
    assert_close(got, ref, 1e-10, "loss")
    for name, g in ref_grads.items():
        assert_close(got_grads[name], g, 1e-10, f"grad of {name}")


def test_transformers_llama_blockwise_loss_on_a_ring_of_3():
    hf_zoo = pytest.importorskip("hf_zoo", reason="needs transformers (hf_zoo builds tiny transformers models)")
    torch.compiler.reset()
    model, inputs, _ = hf_zoo.build("llama", attn="sdpa", seq_len=19)
    ref = model(**inputs)
    ref.loss.backward()
    ref_grads = _grads(model)
    model.zero_grad()
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(3), layout="zigzag", blockwise_loss=5)
    out = ring(**inputs)
    out.loss.backward()
    assert out.logits is None
    assert_close(out.loss, ref.loss, 1e-5, "loss")
    for name, g in ref_grads.items():
        assert_close(model.get_parameter(name).grad, g, 1e-5, f"grad of {name}")
    assert not ring.reports[0].sharding.costly_fallbacks
