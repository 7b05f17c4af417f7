"""Hugging Face transformers models (tiny configs, random weights, no download) through
``ringfx.transform`` with full-length inputs: exact against the untransformed model
where ringfx can make them so, and warned where the model's own code mixes tokens.
Optional: skipped unless ``transformers`` is installed (it is not a ringfx dependency)."""

import warnings

import pytest
import torch

import ringfx

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install transformers)")

S = 16


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles the same transformers forward again for a new model instance:
    start from an empty dynamo cache so the recompile limit counts this test only."""
    torch.compiler.reset()


def _llama(attn):
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg).eval().double()


def _gpt2(attn):
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  attn_implementation=attn, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval().double()


def _inputs():
    torch.manual_seed(0)
    return torch.randint(0, 100, (2, S)), torch.arange(S).expand(2, S)


def _run(model, layout, **call):
    ring = ringfx.LoopbackRing(2)
    ring_model = ringfx.transform(model, ring, layout=layout, gather_outputs=1,
                                  shard_inputs={k: 1 for k in ("input_ids", "position_ids", "attention_mask")
                                                if k in call})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ring_model(**call)
    notes = [str(w.message) for w in caught if issubclass(w.category, ringfx.RingfxWarning)]
    return out, ring_model, notes


# each pair of (model, attention implementation, layout) once (the full cube: twice the CI time)
QUIET = [(_llama, "sdpa", "contiguous"), (_llama, "eager", "zigzag"), (_gpt2, "sdpa", "zigzag"),
         (_gpt2, "eager", "contiguous")]


@pytest.mark.parametrize("make,attn,layout", QUIET, ids=[f"{m.__name__[1:]}-{a}-{lay}" for m, a, lay in QUIET])
def test_exact_and_quiet_with_positions_given(make, attn, layout):
    torch.manual_seed(0)
    model = make(attn)
    ids, pos = _inputs()
    out, ring_model, notes = _run(model, layout, input_ids=ids, position_ids=pos)
    ref = model(input_ids=ids, position_ids=pos)
    assert [(s.mask_kind, s.decision) for s in ring_model.sites] == [("causal", "rewritten")] * 2
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-6)  # eager: float32 softmax
    assert notes == []


def test_positions_made_by_the_model_are_warned():
    model = _llama("sdpa")
    ids, _ = _inputs()
    _, _, notes = _run(model, "contiguous", input_ids=ids)  # positions from arange inside the model
    assert any("torch.arange(16)" in n and "modeling_llama" in n for n in notes), notes


def test_packed_sequence_inference_under_zigzag_is_warned():
    # without a cache, transformers infers packed documents from jumps in the position ids;
    # a zigzag shard's positions jump, so the model builds a document mask: wrong, and the
    # guard says where
    model = _llama("sdpa")
    ids, pos = _inputs()
    out, _, notes = _run(model, "zigzag", input_ids=ids, position_ids=pos, use_cache=False)
    # the first op of that inference to cross the shard's edge is named (a slice of the positions)
    assert any("along the sequence at masking_utils" in n for n in notes), notes
    ref = model(input_ids=ids, position_ids=pos, use_cache=False)
    assert (out.logits - ref.logits).abs().max() > 1e-3  # what the warning is about


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_bert_padding_mask_is_key_padding(layout):
    # transformers 5 builds the padding mask by indexing the attention mask with aranges
    # and expanding it to (B, 1, S, S): classified as key padding, which travels the ring
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa")
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval().double()
    ids, pos = _inputs()
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, 11:] = 0
    types = torch.zeros(2, S, dtype=torch.long)
    ring = ringfx.LoopbackRing(2)
    ring_model = ringfx.transform(model, ring, layout=layout, gather_outputs=1,
                                  shard_inputs={k: 1 for k in ("input_ids", "attention_mask", "token_type_ids",
                                                               "position_ids")})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ringfx.RingfxWarning)
        out = ring_model(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=pos)
    ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=pos)
    assert [s.mask_kind for s in ring_model.sites] == ["key_padding"] * 2
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_causal_lm_with_padding_is_causal_plus_key_padding(make, layout):
    model = make("sdpa")
    ids, pos = _inputs()
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, :3] = 0  # left padding: those three queries see no key, their rows are not compared
    out, ring_model, notes = _run(model, layout, input_ids=ids, position_ids=pos, attention_mask=mask)
    ref = model(input_ids=ids, position_ids=pos, attention_mask=mask)
    assert [s.mask_kind for s in ring_model.sites] == ["causal+key_padding"] * 2
    torch.testing.assert_close(out.logits[0], ref.logits[0])
    torch.testing.assert_close(out.logits[1, 3:], ref.logits[1, 3:])
    assert notes == []


def _gloo_llama(rank, world, layout):
    import torch.distributed as dist

    torch.compiler.reset()
    torch.manual_seed(0)
    model = _llama("sdpa")
    ids, pos = _inputs()
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, 13:] = 0  # right padding
    ref = model(input_ids=ids, position_ids=pos, attention_mask=mask)
    w = torch.randn(ref.logits.shape, dtype=ref.logits.dtype, generator=torch.Generator().manual_seed(1))
    (ref.logits * w).sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ring_model = ringfx.transform(model, layout=layout, gather_outputs=1,
                                  shard_inputs={"input_ids": 1, "position_ids": 1, "attention_mask": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ringfx.RingfxWarning)
        out = ring_model(input_ids=ids, position_ids=pos, attention_mask=mask)
    ringfx.shard(out.logits * w, 1, layout=layout).sum().backward()
    grad_err = 0.0
    for p, g_ref in zip(model.parameters(), ref_grads):
        dist.all_reduce(p.grad)
        grad_err = max(grad_err, (p.grad - g_ref).abs().max().item())
    return (out.logits - ref.logits).abs().max().item(), grad_err, [s.mask_kind for s in ring_model.sites]


def _gloo_llama_both_layouts(rank, world):
    torch.set_num_threads(1)
    return {layout: _gloo_llama(rank, world, layout) for layout in ("contiguous", "zigzag")}


@pytest.mark.gloo
def test_llama_on_a_real_gloo_ring():
    """Both layouts in one spawn of a ring of 2; every rank's logits and all-reduced
    gradients against the untransformed model."""
    from ringfx.testing import spawn_gloo

    for rank, by_layout in enumerate(spawn_gloo(2, _gloo_llama_both_layouts)):
        assert sorted(by_layout) == ["contiguous", "zigzag"], (rank, by_layout)
        for layout, (out_err, grad_err, kinds) in by_layout.items():
            assert kinds == ["causal+key_padding"] * 2, (rank, layout, kinds)
            assert out_err < 1e-10 and grad_err < 1e-10, (rank, layout, out_err, grad_err)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_positions_filled_in_for_the_model(layout):
    # a caller who passes no position_ids: transform(position_ids=...) supplies the global ones
    model = _llama("sdpa")
    ids, _ = _inputs()
    ring = ringfx.LoopbackRing(2)
    ring_model = ringfx.transform(model, ring, layout=layout, gather_outputs=1, shard_inputs={"input_ids": 1},
                                  position_ids="position_ids")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ringfx.RingfxWarning)
        out = ring_model(input_ids=ids)
    torch.testing.assert_close(out.logits, model(input_ids=ids).logits)


def test_zero_configuration_call():
    # shard_inputs="auto" and position_ids filled in: called exactly like the model
    model = _llama("sdpa")
    ids, _ = _inputs()
    mask = torch.ones(2, S, dtype=torch.long)
    mask[0, 14:] = 0
    ring_model = ringfx.transform(model, ringfx.LoopbackRing(2), layout="zigzag", shard_inputs="auto",
                                  gather_outputs=1, position_ids="position_ids")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ringfx.RingfxWarning)
        out = ring_model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.logits, model(input_ids=ids, attention_mask=mask).logits)
    assert [s.mask_kind for s in ring_model.sites] == ["causal+key_padding"] * 2


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_mistral_sliding_window(layout):
    cfg = transformers.MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     attn_implementation="sdpa", sliding_window=5)
    model = transformers.MistralForCausalLM(cfg).eval().double()
    ids, pos = _inputs()
    out, ring_model, notes = _run(model, layout, input_ids=ids, position_ids=pos)
    assert [s.mask_kind for s in ring_model.sites] == ["causal+window(5)"] * 2
    torch.testing.assert_close(out.logits, model(input_ids=ids, position_ids=pos).logits)
    # the sliding-window cache keeps the last tokens it sees: on a ring, the shard's (right
    # for this forward, not for decoding from that cache): warned
    assert notes and all("cache_utils" in n for n in notes), notes
