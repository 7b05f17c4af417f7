"""``flex_attention`` on the ring (``passes/lower_flex.py``).

transformers' ``attn_implementation="flex_attention"`` and hand-written
``flex_attention(q, k, v, score_mod=..., block_mask=create_block_mask(...))`` calls are
lowered before attention finding: the mask_mod becomes a dense boolean mask built from
aranges and its buffers (classified causal / window / key padding / segment ids), the
identity score_mod becomes SDPA and a soft-cap Gemma 2's eager spelling; the ring op then
runs them on global positions. A score_mod ringfx does not know is left alone and refused
on a ring of P > 1 (warned with ``strict=False``).

On CPU torch refuses flex_attention with inputs that need a gradient *before* tracing it
(``_validate_device``: there is no CPU backward kernel) and computes no float64. The tests
that train lift that Python check (``flex_capture_with_grad``): the transformed graph never
runs flex, its gradients come from the ring op. Their reference is the same model and
weights with transformers' SDPA (LLaMA, Mistral) or eager (Gemma 2) attention, which is
what flex computes; one test checks the untransformed flex forward against it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import ringfx
from ringfx.passes.lower_flex import lower_flex_attention_pass
from ringfx.passes.sites import Decision
from ringfx.testing import gradient_errors, max_abs_error

flex_module = pytest.importorskip("torch.nn.attention.flex_attention", reason="needs torch's flex_attention")
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

ATOL, RTOL = 2e-5, 1e-4  # float32
S = 24  # divisible by P and 2P for P = 2, 3 (both layouts)
RINGS = ((2, "zigzag"), (3, "contiguous"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch.compiler.reset()


@pytest.fixture
def flex_capture_with_grad(monkeypatch):
    """Let dynamo capture flex_attention on CPU inputs that need a gradient (see the
    module docstring): the lowered graph runs the ring op, never flex."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)


def _run(model, inputs):
    """Logits, loss and every parameter gradient of one forward and backward."""
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach()


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


# ------------------------------------------------------------------ transformers' flex implementation

def _gemma2():
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    if not hasattr(transformers, "Gemma2ForCausalLM"):
        pytest.skip("transformers has no Gemma 2")
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=128, sliding_window=5, attn_implementation="eager", pad_token_id=0,
        intermediate_size=64, num_hidden_layers=2, query_pre_attn_scalar=8, attn_logit_softcapping=1.0,
        final_logit_softcapping=None)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():  # scores large enough for tanh to bend them
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, S), generator=g)
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, S - 4:] = 0  # a right-padded row
    ids[1, S - 4:] = 0
    return model, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)


def build(name):
    """``(model, inputs, reference attention implementation, mask kind per site)``."""
    if name == "gemma2":
        model, inputs = _gemma2()
        return model, inputs, "eager", ["causal+window(5)+key_padding", "causal+key_padding"]
    pytest.importorskip("transformers", reason="needs transformers")
    import hf_zoo

    model, inputs, _ = hf_zoo.build(name, "sdpa", S)
    window = f"+window({hf_zoo.MISTRAL_WINDOW})" if name == "mistral" else ""
    return model, inputs, "sdpa", [f"causal{window}+key_padding"] * hf_zoo.LAYERS


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_transformers_flex_exact_on_loopback_rings(name, flex_capture_with_grad):
    """Mistral (sliding window), Gemma 2 (soft-capping, sliding and global layers) with flex
    attention and a right-padded row, zero-touch on rings of 3 (contiguous) and 2 (zigzag):
    every site rewritten with its mask kind; logits, loss and every parameter gradient equal
    to the untransformed model. LLaMA (GQA) on a ring of 2 (zigzag), the same rank program
    with the same checks: the gloo ring test below (on a loopback ring as well it was
    the same case twice, CI time); LLaMA on a ring of 3: the checkpointed and explain tests."""
    model, inputs, reference, kinds = build(name)
    model.set_attn_implementation(reference)
    ref_logits, ref_loss = _run(model, inputs)
    ref_grads = _grads(model)
    model.set_attn_implementation("flex_attention")
    # one ring per model (each transform traces ~15 s of create_block_mask): both layouts and
    # an odd ring across the three (LLaMA's ring of 2, zigzag: the gloo test below)
    for world, layout in [RINGS[["llama", "mistral", "gemma2"].index(name) % 2]]:
        torch.compiler.reset()
        copied = copy.deepcopy(model)
        ring = ringfx.transform(copied, mesh=ringfx.LoopbackRing(world), layout=layout)
        logits, loss = _run(ring, inputs)
        case = f"{name} P={world} {layout}"
        assert [s.mask_kind for s in ring.sites] == kinds, case
        assert all(s.decision is Decision.REWRITE for s in ring.sites), (case, ring.sites)
        assert max_abs_error(logits, ref_logits) < ATOL, case
        assert max_abs_error(loss, ref_loss) < ATOL, case
        worst, err, bad = gradient_errors(dict(copied.named_parameters()), ref_grads, rtol=RTOL, atol=ATOL)
        assert not bad, f"{case}: grads of {bad} differ (worst {worst}: {err:.3g})"


def test_transformers_flex_in_checkpointed_layers(flex_capture_with_grad):
    """Gradient checkpointing in train mode: the flex calls sit in checkpointed bodies
    (``tag_activation_checkpoint``), lowered and rewritten there; loss and every gradient
    exact on a ring of 3 (zigzag)."""
    from ringfx.passes.node_facts import hop_subgraphs

    model, inputs, reference, kinds = build("llama")
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    model.set_attn_implementation(reference)
    ref_logits, ref_loss = _run(model, inputs)
    ref_grads = _grads(model)
    model.set_attn_implementation("flex_attention")
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(3), layout="zigzag")
    logits, loss = _run(ring, inputs)
    assert [s.mask_kind for s in ring.sites] == kinds and all(s.decision is Decision.REWRITE for s in ring.sites)
    bodies = [sub for r in ring.reports for _, _, sub in hop_subgraphs(r.graph_module)]
    assert any("ring_attention" in sub.code for sub in bodies), "no ring op in a checkpointed body"
    assert max_abs_error(logits, ref_logits) < ATOL and max_abs_error(loss, ref_loss) < ATOL
    worst, err, bad = gradient_errors(dict(model.named_parameters()), ref_grads, rtol=RTOL, atol=ATOL)
    assert not bad, f"grads of {bad} differ (worst {worst}: {err:.3g})"


def test_explain_and_untransformed_flex_forward():
    """``explain`` names the flex sites, their mask kind, and that they are rewritten; the
    tests' reference is what flex computes: transformers' untransformed flex forward
    (compiled by torch on CPU) equals its SDPA forward and the transformed one."""
    model, inputs, reference, _ = build("llama")
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        model.set_attn_implementation(reference)
        ref = model(**inputs).logits
        model.set_attn_implementation("flex_attention")
        ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(3), layout="zigzag")
        transformed = ring(**inputs).logits
        report = ringfx.explain(ring, **inputs)
        torch.compiler.reset()
        untransformed = model(**inputs).logits
    text = str(report)
    assert len(report.rewritten) == 2 and not report.left_alone, text
    rows = [line for line in text.splitlines() if "flex_attention" in line]
    assert len(rows) == 2 and all("causal+key_padding" in r and "rewritten" in r for r in rows), text
    assert max_abs_error(untransformed, ref) < ATOL
    assert max_abs_error(transformed, untransformed) < ATOL


# ------------------------------------------------------------------ hand-written flex_attention

H, D, E = 4, 8, 32


def causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def sigmoid_gate(score, b, h, q_idx, kv_idx):  # a score_mod ringfx does not know
    return score * torch.sigmoid(score)


def head_temperature(score, b, h, q_idx, kv_idx):  # a score_mod ringfx does not know
    return score * (1.0 + 0.5 * h)


def distance_bias(score, b, h, q_idx, kv_idx):  # a function of j - i: a relative bias
    return score + 0.1 * (q_idx - kv_idx)


def alibi(score, b, h, q_idx, kv_idx):  # ALiBi: one slope per head
    return score + (h + 1) * 0.25 * (kv_idx - q_idx)


def soft_cap(score, b, h, q_idx, kv_idx):
    return 2.0 * torch.tanh(score / 2.0)


class FlexBlock(nn.Module):
    """One attention block written against torch's flex_attention API."""

    def __init__(self, mask="causal", score_mod=None):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, E)
        self.mask, self.score_mod = mask, score_mod

    def forward(self, x, doc):
        B, S_, _ = x.shape
        q, k, v = self.qkv(x).view(B, S_, 3, H, D).permute(2, 0, 3, 1, 4)
        if self.mask == "document":
            def mask_mod(b, h, q_idx, kv_idx):  # packed documents, causal within each
                return (doc[b, q_idx] == doc[b, kv_idx]) & (kv_idx <= q_idx)
        else:
            mask_mod = causal
        block_mask = create_block_mask(mask_mod, B, None, S_, S_, device=x.device)
        o = flex_attention(q, k, v, score_mod=self.score_mod, block_mask=block_mask)
        return self.out(o.transpose(1, 2).reshape(B, S_, E))


def _block_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, E, dtype=torch.float64, generator=g)
    doc = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 4 + [2] * 5])
    return x, doc


def _dense_reference(block, x, doc, score_mod=None):
    """The block in plain PyTorch: the mask evaluated densely, softmax in float64."""
    B, S_, _ = x.shape
    q, k, v = block.qkv(x).view(B, S_, 3, H, D).permute(2, 0, 3, 1, 4)
    i, j = torch.arange(S_)[:, None], torch.arange(S_)[None, :]
    keep = (j <= i)[None, None]
    if block.mask == "document":
        keep = keep & (doc[:, None, :, None] == doc[:, None, None, :])
    s = q @ k.transpose(-1, -2) * D ** -0.5
    if score_mod is not None:
        s = score_mod(s, None, torch.arange(H)[:, None, None], i, j)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    return block.out((p @ v).transpose(1, 2).reshape(B, S_, E))


@pytest.mark.parametrize("mask, score_mod, kind", [("causal", None, "causal"),
                                                   ("document", None, "causal+segment_ids"),
                                                   ("causal", soft_cap, "causal"),
                                                   ("causal", distance_bias, "causal+relative"),
                                                   ("document", alibi, "causal+alibi+segment_ids")])
@pytest.mark.parametrize("world, layout", RINGS)
def test_hand_written_flex_exact(mask, score_mod, kind, world, layout, flex_capture_with_grad):
    """create_block_mask + flex_attention, float64: the causal and the document mask_mod
    (from a captured ids tensor) classified; the soft-cap and added biases (a function of
    j - i, per-head ALiBi) lowered and proven; output and gradients equal to the dense
    reference (forward also to flex itself) to 1e-10."""
    torch.manual_seed(0)
    block = FlexBlock(mask, score_mod).double()
    x, doc = _block_inputs()
    ref = _dense_reference(block, x, doc, score_mod)
    ref.square().sum().backward()
    ref_grads = _grads(block)
    with torch.no_grad():
        flex_out = block(x, doc)  # torch's own flex (eager, CPU: its math reference)
    assert max_abs_error(flex_out, ref) < 1e-10
    ring = ringfx.transform(block, mesh=ringfx.LoopbackRing(world), layout=layout)
    out = ring(x, doc)
    out.square().sum().backward()
    assert [(s.mask_kind, s.decision) for s in ring.sites] == [(kind, Decision.REWRITE)]
    assert max_abs_error(out, ref) < 1e-10
    worst, err, bad = gradient_errors(dict(block.named_parameters()), ref_grads, rtol=1e-10, atol=1e-10)
    assert not bad, f"grads of {bad} differ (worst {worst}: {err:.3g})"


@pytest.mark.parametrize("mask, score_mod, kind", [("causal", None, "causal"),
                                                   ("document", None, "causal+segment_ids"),
                                                   ("causal", alibi, "causal+alibi")])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_hand_written_flex_caller_sharded(mask, score_mod, kind, layout):
    """``inputs="sharded"``: the caller passes each rank's tokens (and document ids); the
    mask_mod, built on the shard's aranges, is classified and run on global positions
    (before lowering each rank attended only to its own shard)."""
    torch.manual_seed(0)
    block = FlexBlock(mask, score_mod).double()
    x, doc = _block_inputs()
    ring = ringfx.LoopbackRing(2)
    shard = lambda t: ringfx.shard(t, 1, layout=layout, group=ring)
    with torch.no_grad():
        ref = block(x, doc)
        model = ringfx.transform(block, mesh=ring, layout=layout, inputs="sharded")
        out = model(shard(x), shard(doc))
    assert [(s.mask_kind, s.decision) for s in model.sites] == [(kind, Decision.REWRITE)]
    assert max_abs_error(out, shard(ref)) < 1e-10


@pytest.mark.parametrize("score_mod, shown", [(sigmoid_gate, "mul(score, sigmoid(score))"),
                                              (head_temperature, "mul(score, add(1.0, mul(0.5, h)))")])
def test_unknown_score_mod_is_refused_never_silently_wrong(score_mod, shown, flex_capture_with_grad):
    """A score_mod ringfx does not know is left alone and reported with its body: strict
    (the default) raises UnsupportedError naming it on a ring of 2; strict=False warns and
    runs; a ring of 1 runs it unchanged."""
    torch.manual_seed(0)
    block = FlexBlock("causal", score_mod).double()
    x, doc = _block_inputs()
    with pytest.raises(ringfx.UnsupportedError, match="score_mod ringfx does not know") as raised:
        ringfx.transform(block, mesh=ringfx.LoopbackRing(2))(x, doc)
    assert shown in str(raised.value) and "flex_attention" in str(raised.value)

    torch.compiler.reset()
    with torch.no_grad():
        ref = block(x, doc)
        with pytest.warns(ringfx.RingfxWarning, match="score_mod ringfx does not know") as caught:
            out = ringfx.transform(block, mesh=ringfx.LoopbackRing(2), strict=False)(x, doc)
    assert any(shown in str(w.message) for w in caught)
    # the sharding pass all-gathers the operands of an op it has no rule for: still exact
    assert max_abs_error(out, ref) < 1e-10


def test_pass_leaves_graph_without_flex_unchanged_and_reports_unknown_mods():
    """Graph inspection: the lowered graph holds SDPA and no flex_attention; a graph with
    an unknown score_mod keeps its flex call, recorded as a site left alone."""
    captured = []

    def backend(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    x, doc = _block_inputs()
    for score_mod in (None, sigmoid_gate):
        torch.compiler.reset()
        with torch.no_grad():
            torch.compile(FlexBlock("causal", score_mod).double(), backend=backend)(x, doc)
    known, unknown = (lower_flex_attention_pass(gm)[1] for gm in captured[-2:])
    targets = [str(n.target) for n in captured[-2].graph.nodes]
    assert known.rewritten == 1 and not known.sites
    assert not any("flex_attention" in t for t in targets)
    assert any("scaled_dot_product_attention" in t for t in targets)
    assert unknown.rewritten == 0 and [s.decision for s in unknown.sites] == [Decision.LEAVE]
    assert any("flex_attention" in str(n.target) for n in captured[-1].graph.nodes)


def _no_block_mask(q, k, v):
    return flex_attention(q, k, v)


def _blocks_only(q, k, v):  # block-diagonal blocks of 4 tokens, no mask_mod
    blocks = torch.arange(3, dtype=torch.int32).view(1, 1, 3, 1).expand(1, 1, 3, 3).contiguous()
    block_mask = flex_module.BlockMask.from_kv_blocks(torch.ones(1, 1, 3, dtype=torch.int32), blocks, BLOCK_SIZE=4)
    return flex_attention(q, k, v, block_mask=block_mask)


def test_block_masks_without_mask_mod():
    """No block_mask: flex's one all-covering block, lowered to SDPA with no mask (equal
    to flex). A BlockMask of blocks alone (its mask is the block pattern) is left alone."""
    captured = []

    def backend(gm, example_inputs):
        captured.append(lower_flex_attention_pass(gm))
        return gm.forward

    q = torch.randn(1, 2, 12, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = torch.compile(_no_block_mask, backend=backend)(q, q, q)
        torch.compiler.reset()
        torch.compile(_blocks_only, backend=backend)(q, q, q)
        ref = _no_block_mask(q, q, q)
    (_, lowered), (_, blocks) = captured
    assert lowered.rewritten == 1 and max_abs_error(out, ref) < 1e-6
    assert blocks.rewritten == 0 and "no mask_mod" in blocks.sites[0].reason


# ------------------------------------------------------------------ a real ring

def _gloo_rank(rank, world):
    """On one rank of a gloo ring: transformers' flex LLaMA zero-touch on the default
    process group against the same model untransformed (SDPA) in this process."""
    flex_module._validate_device = lambda *tensors: None  # this process only (see the module docstring)
    model, inputs, reference, _ = build("llama")
    model.set_attn_implementation(reference)
    ref_logits, ref_loss = _run(model, inputs)
    ref_grads = _grads(model)
    model.set_attn_implementation("flex_attention")
    ring = ringfx.transform(model, layout="zigzag")
    logits, loss = _run(ring, inputs)
    worst, err, bad = gradient_errors(dict(model.named_parameters()), ref_grads, rtol=RTOL, atol=ATOL)
    return {"kinds": [s.mask_kind for s in ring.sites], "rewritten": [s.decision == "rewritten" for s in ring.sites],
            "logits": max_abs_error(logits, ref_logits), "loss": max_abs_error(loss, ref_loss), "bad": bad,
            "worst": (worst, err)}


@pytest.mark.gloo
def test_transformers_flex_llama_on_a_gloo_ring():
    """A real ring of 2: every rank's loss and every gradient equal the untransformed model's."""
    pytest.importorskip("transformers", reason="needs transformers")
    from ringfx.testing import spawn_gloo

    for rank, r in enumerate(spawn_gloo(2, _gloo_rank, timeout=60)):
        assert r is not None, f"rank {rank} returned nothing"
        assert r["kinds"] == ["causal+key_padding"] * 2 and all(r["rewritten"]), (rank, r)
        assert r["logits"] < ATOL and r["loss"] < ATOL and not r["bad"], (rank, r)


class LearnedBiasBlock(nn.Module):
    """A score_mod reading a learned per-head table by distance (T5-like, written for flex)."""

    def __init__(self, seq_len):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.table = nn.Parameter(torch.randn(H, 2 * seq_len - 1))

    def forward(self, x):
        B, S_, _ = x.shape
        q, k, v = self.qkv(x).view(B, S_, 3, H, D).permute(2, 0, 3, 1, 4)
        table = self.table

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, q_idx - kv_idx + S_ - 1]

        block_mask = create_block_mask(causal, B, None, S_, S_, device=x.device)
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)


def test_learned_bias_in_a_score_mod_is_refused(flex_capture_with_grad):
    """A bias the mask analysis cannot prove (a learned table indexed by the distance, in
    flex's spelling) is lowered but refused on a ring of 2, naming the parameter-built mask."""
    x = torch.randn(2, 12, E, dtype=torch.float64)
    ring = ringfx.transform(LearnedBiasBlock(12).double(), mesh=ringfx.LoopbackRing(2))
    with pytest.raises(ringfx.UnsupportedError, match="computed from parameters"):
        ring(x)
