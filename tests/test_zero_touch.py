"""Zero-touch: ``ringfx.transform(model)`` called exactly like the model (full-length
inputs, the same on every rank) returns what the model returns, forward and backward.

Loopback rings carry the numerical matrix (every zoo attention spelling, every
sequence-mixing construct, odd and prime lengths); real gloo rings of 2 and 3 processes
run a representative set in one spawn per ring size and check every rank, including the
distributed forms' all-reduces and the gradient averaging over the ring.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn as nn

import ringfx
from ringfx.errors import RingfxWarning
from ringfx.testing import spawn_gloo

from mixing_zoo import CASES, E, DTYPE, Attention, gloo_mixing_worker, run_case
from zoo import ZOO, _gen

BY_CASE = {c.name: c for c in CASES}
# (ring size, layout, sequence length): divisible, S = 1 + a multiple of P (padded inside), prime
CONFIGS = [(2, "contiguous", 12), (3, "zigzag", 19), (4, "contiguous", 13)]


def _zoo_case(entry, group, layout, seq_len):
    torch.compiler.reset()
    torch.manual_seed(0)
    model = entry.make_module().eval()
    ref = copy.deepcopy(model)
    inputs = [i.value for i in entry.make_inputs(seq_len, 0)]
    ref_out = ref(*inputs)
    w = torch.randn(ref_out.shape, generator=_gen(7), dtype=ref_out.dtype)
    (ref_out * w).sum().backward()
    ring = ringfx.transform(model, mesh=group, layout=layout)
    out = ring(*inputs)
    (out * w).sum().backward()
    grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None]
    assert all(g is not None for g, _ in grads)
    return ring, (out - ref_out).abs().max().item(), max((g - r).abs().max().item() for g, r in grads)


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
@pytest.mark.parametrize("config", CONFIGS[1:], ids=lambda c: f"P{c[0]}-{c[1]}-S{c[2]}")
def test_zoo_attention_exact_with_full_length_inputs(entry, config):
    world, layout, seq_len = config
    ring, out_err, grad_err = _zoo_case(entry, ringfx.LoopbackRing(world), layout, seq_len)
    tol = max(entry.tol, 1e-10)
    assert out_err < tol and grad_err < 10 * tol, (out_err, grad_err)
    assert ring.sites and all(s.decision == "rewritten" for s in ring.sites)
    (sharding,) = [g.sharding for g in ring.reports]
    assert sharding.sharded_inputs, "the sequence input is sharded where it enters"


@pytest.mark.parametrize("entry", [e for e in ZOO if e.name.startswith("mha")], ids=lambda e: e.name)
def test_a_parameter_as_long_as_the_sequence_is_not_taken_for_tokens(entry):
    """nn.MultiheadAttention with embed dim 16 at S = 16: the in-projection's bias chunks are
    (16,) vectors made from parameters alone; they were sharded as tokens "made inside the
    model", and the projections then all-gathered their activations (exact, warned)."""
    ring, out_err, grad_err = _zoo_case(entry, ringfx.LoopbackRing(2), "zigzag", 16)
    assert out_err < 1e-10 and grad_err < 1e-9, (out_err, grad_err)
    (sharding,) = [g.sharding for g in ring.reports]
    assert not sharding.costly_fallbacks and not any("made inside" in x for x in sharding.sharded_inputs), sharding


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"P{c[0]}-{c[1]}-S{c[2]}")
def test_sequence_mixing_ops_exact(case, config):
    world, layout, seq_len = config
    r = run_case(case, ringfx.LoopbackRing(world), layout, seq_len)
    assert r["shape_ok"] and r["out_err"] < case.tol and r["grad_err"] < case.tol, r
    assert r["rewritten"] == (2 if case.name == "checkpointed_layers" else 1)
    # the op without a sharded form runs all-gathered (exact) and says so, once; the others do not
    assert bool(r["fallbacks"]) == case.costly_fallback, r["fallbacks"]
    assert r["warned"] == (1 if case.costly_fallback else 0)


def test_distributed_forms_are_named():
    ring = ringfx.LoopbackRing(3)
    assert "over the sequence" in run_case(BY_CASE["mean_pool_classifier"], ring, "zigzag", 12)["distributed"][0]
    assert "token select" in run_case(BY_CASE["first_token_pooler"], ring, "zigzag", 12)["distributed"][0]
    forms = " | ".join(run_case(BY_CASE["padded_shift_sum_loss"], ring, "zigzag", 12)["distributed"])
    assert "'cross_entropy' (reduction='sum')" in forms and "pad by (0, 1) tokens" in forms, forms
    # shifts, rolls and convolutions along the sequence move boundary tokens, not the sequence
    assert "slice [0:12]" in run_case(BY_CASE["shifted_loss"], ring, "zigzag", 13)["distributed"][0]
    assert "roll by 1" in run_case(BY_CASE["roll_shift"], ring, "zigzag", 13)["distributed"][0]
    assert "conv1d over the sequence (kernel 4, a halo of 3" in run_case(
        BY_CASE["causal_conv"], ring, "zigzag", 13)["distributed"][0]


def test_tokens_made_inside_the_model_are_sharded_where_they_are_made():
    r = run_case(BY_CASE["patches_with_class_token"], ringfx.LoopbackRing(3), "zigzag", 13)
    assert r["out_err"] < 1e-10 and r["grad_err"] < 1e-10, r
    made = [x for x in r["sharded_inputs"] if "made inside the model" in x]
    assert made and "'cat'" in made[0], r["sharded_inputs"]


def test_sequence_inputs_names_what_is_sharded_where_it_enters():
    torch.compiler.reset()
    torch.manual_seed(0)
    model = BY_CASE["mse_loss"].make()
    x, target = torch.randn(2, 11, E, dtype=DTYPE), torch.randn(2, 11, E, dtype=DTYPE)
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(3), sequence_inputs={"x": 1})
    torch.testing.assert_close(ring(x, target), model(x, target))
    (sharding,) = [g.sharding for g in ring.reports]
    assert [s.split()[0] for s in sharding.sharded_inputs] == ["L['x']"]
    torch.compiler.reset()
    with pytest.raises(ValueError, match="sequence_inputs: dim 2"):
        ringfx.transform(model, mesh=ringfx.LoopbackRing(3), sequence_inputs={"x": 2})(x, target)
    with pytest.raises(TypeError, match="sequence_inputs="):
        ringfx.transform(model, mesh=ringfx.LoopbackRing(3), sequence_inputs=["x"])


def test_fallbacks_error_refuses_an_op_with_no_sharded_form_naming_its_line():
    torch.compiler.reset()
    model = BY_CASE["hand_written_softmax"].make()
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(2), fallbacks="error")
    with pytest.raises(ringfx.UnsupportedError, match="mixing_zoo.py:.*has no sharded form"):
        ring(torch.randn(2, 12, E, dtype=DTYPE))


class LossAfterGraphBreak(nn.Module):
    """Attention, a graph break, then a token mean in a graph with no attention."""

    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x):
        h = self.attn(x)
        torch._dynamo.graph_break()
        return h.mean(dim=1).pow(2).sum()


def test_graph_after_a_break_runs_on_the_whole_sequence():
    torch.compiler.reset()
    torch.manual_seed(0)
    model = LossAfterGraphBreak()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 13, E, dtype=DTYPE)
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(3), layout="zigzag")
    loss, ref_loss = ring(x), ref(x)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert len(ring.reports) == 2 and ring.reports[1].sharding.sharded_inputs == []


def test_gather_outputs_false_with_a_graph_break_is_refused_not_wrong():
    torch.compiler.reset()
    ring = ringfx.transform(LossAfterGraphBreak(), mesh=ringfx.LoopbackRing(3), gather_outputs=False)
    with pytest.raises(ringfx.UnsupportedError, match="captured in 2 graphs"):
        ring(torch.randn(2, 12, E, dtype=DTYPE))


class PerToken(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x):
        return self.attn(x)


def test_gather_outputs_false_keeps_each_ranks_tokens():
    torch.compiler.reset()
    torch.manual_seed(0)
    model = PerToken()
    x = torch.randn(2, 12, E, dtype=DTYPE)
    ring = ringfx.LoopbackRing(3)
    out = ringfx.transform(model, mesh=ring, layout="zigzag", gather_outputs=False)(x)
    # a loopback ring holds every rank's tokens, in layout order: what ringfx.shard gives
    torch.testing.assert_close(out, ringfx.shard(model(x), 1, layout="zigzag", group=ring))


def test_explain_lists_sharded_inputs_distributed_forms_and_fallbacks():
    torch.compiler.reset()
    ring_model = ringfx.transform(BY_CASE["roll_shift"].make(), mesh=ringfx.LoopbackRing(2))
    report = ringfx.explain(ring_model, torch.randn(2, 8, E, dtype=DTYPE))
    text = str(report)
    assert "sharded input: " in text and "(2, 8, 16) along dim 1" in text
    assert "distributed: roll by 1 along the sequence (boundary tokens from the neighbours) at mixing_zoo.py" in text
    torch.compiler.reset()
    ring_model = ringfx.transform(BY_CASE["hand_written_softmax"].make(), mesh=ringfx.LoopbackRing(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ringfx.RingfxWarning)
        text = str(ringfx.explain(ring_model, torch.randn(2, 8, E, dtype=DTYPE)))
    assert re.search(r"all-gather fallback: '\w+' at mixing_zoo.py:\d+", text), text
    torch.compiler.reset()
    ring_model = ringfx.transform(BY_CASE["mean_pool_classifier"].make(), mesh=ringfx.LoopbackRing(2))
    assert "distributed: 'mean' over the sequence" in str(ringfx.explain(ring_model, torch.randn(2, 8, E,
                                                                                                  dtype=DTYPE)))


def test_inputs_option_is_checked():
    with pytest.raises(ValueError, match="inputs="):
        ringfx.transform(PerToken(), mesh=ringfx.LoopbackRing(2), inputs="half")
    with pytest.raises(ValueError, match="drop them"):
        ringfx.transform(PerToken(), mesh=ringfx.LoopbackRing(2), inputs="full", shard_inputs={"x": 1})


def test_nan_in_one_token_reaches_only_the_tokens_that_attend_to_it():
    """Causal attention: a NaN token 8 makes tokens 8.. NaN; tokens 0..7 equal the model on
    the first 8 tokens alone (CPU SDPA itself spreads the NaN to every row of a block through
    masked zero weights, so the NaN starts a rank's block here; the ring skips masked blocks)."""
    torch.compiler.reset()
    torch.manual_seed(0)
    model = PerToken()
    x = torch.randn(1, 12, E, dtype=DTYPE)
    x[0, 8] = float("nan")
    out = ringfx.transform(model, mesh=ringfx.LoopbackRing(3))(x)
    assert out[:, 8:].isnan().all()
    torch.testing.assert_close(out[:, :8], model(x[:, :8]))


# ------------------------------------------------------------------ real gloo rings

def _zoo_on_ring(rank, world, names, layout, seq_len):
    torch.set_num_threads(1)
    by_name = {e.name: e for e in ZOO}
    out = []
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RingfxWarning)
            _, out_err, grad_err = _zoo_case(by_name[name], None, layout, seq_len)
        out.append({"name": name, "rank": rank, "out_err": out_err, "grad_err": grad_err, "tol": by_name[name].tol})
    return out


def _both_workers(rank, world, layout):
    zoo = ["tiny_llama", "tiny_bert", "tiny_gpt2", "causal_plus_padding", "dense_user_mask", "mha_seq_first_causal"]
    return (_zoo_on_ring(rank, world, zoo, layout, 4 * world + 1)
            + gloo_mixing_worker(rank, world, [layout]))


@pytest.mark.gloo
@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (3, "contiguous")])
def test_zero_touch_on_real_gloo_ring_every_rank(world, layout):
    results = spawn_gloo(world, _both_workers, layout)
    assert all(r is not None for r in results), "a rank returned nothing"
    failures = []
    for rank, rows in enumerate(results):
        for r in rows:
            tol = max(r.get("tol", 1e-10), 1e-10)
            if not (r["out_err"] < tol and r["grad_err"] < 10 * tol):
                failures.append((rank, r["name"], r["out_err"], r["grad_err"]))
    assert not failures, failures
    assert len(results[0]) == 6 + len(CASES)


def _train_on_mesh(rank, world, steps, batch_per_replica, seq_len):
    """Data parallel x ring on a 2-D mesh: each data-parallel replica takes its half of
    the batch, the ring shards the sequence; AdamW steps with no ringfx code in the loop."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    model = BY_CASE["mse_loss"].make()
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "cp"))
    dp = mesh.get_local_rank("dp")
    ring_model = ringfx.transform(model, mesh=mesh, layout="zigzag")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(2 * batch_per_replica, seq_len, E, generator=g, dtype=DTYPE)
        t = torch.randn(2 * batch_per_replica, seq_len, E, generator=g, dtype=DTYPE)
        mine = slice(dp * batch_per_replica, (dp + 1) * batch_per_replica)
        opt.zero_grad()
        ring_model(x[mine], t[mine]).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.gloo
def test_three_optimizer_steps_on_a_2x2_mesh_equal_single_process_training():
    steps, per_replica, seq_len = 3, 1, 11
    results = spawn_gloo(4, _train_on_mesh, steps, per_replica, seq_len)
    torch.manual_seed(0)
    model = BY_CASE["mse_loss"].make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(2 * per_replica, seq_len, E, generator=g, dtype=DTYPE)
        t = torch.randn(2 * per_replica, seq_len, E, generator=g, dtype=DTYPE)
        opt.zero_grad()
        model(x, t).backward()
        opt.step()
    for rank, params in enumerate(results):
        for p, q in zip(params, model.parameters()):
            torch.testing.assert_close(p, q.detach(), atol=1e-10, rtol=1e-10, msg=f"rank {rank}")



def test_many_sequence_lengths_each_exact_and_a_clear_error_past_the_limit(monkeypatch):
    import ringfx.api

    torch.compiler.reset()
    torch.manual_seed(0)
    model = PerToken()
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(2))
    for seq_len in range(5, 16):  # more lengths than dynamo's default recompile limit (8)
        x = torch.randn(1, seq_len, E, dtype=DTYPE)
        torch.testing.assert_close(ring(x), model(x))
    monkeypatch.setattr(ringfx.api, "RECOMPILE_LIMIT", 11)
    with pytest.raises(RuntimeError, match="pad batches to a few bucket lengths"):
        ring(torch.randn(1, 17, E, dtype=DTYPE))


class InPlaceWrites(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.attn, self.how = Attention(), how

    def forward(self, x, scale):
        h = self.attn(x)
        if self.how == "add_":
            h.add_(scale)  # a (B, S, E) replicated input added in place into the shard
        elif self.how == "iadd":
            h += 1.0
        elif self.how == "setitem_all":
            h[..., 0] = 0.0  # every token's first feature
        elif self.how == "setitem_token":
            h[:, 0] = 0.0  # one token: refused
        return h * 2


@pytest.mark.parametrize("how", ["add_", "iadd", "setitem_all"])
def test_in_place_writes_into_sharded_tensors_are_exact(how):
    torch.compiler.reset()
    torch.manual_seed(0)
    model = InPlaceWrites(how)
    x, scale = torch.randn(2, 11, E, dtype=DTYPE), torch.randn(2, 11, E, dtype=DTYPE)
    out = ringfx.transform(model, mesh=ringfx.LoopbackRing(3), layout="zigzag")(x, scale)
    torch.testing.assert_close(out, model(x, scale))


def test_in_place_write_into_part_of_the_sequence_is_refused_not_wrong():
    torch.compiler.reset()
    model = InPlaceWrites("setitem_token")
    with pytest.raises(ringfx.UnsupportedError, match="in-place 'setitem' at test_zero_touch.py"):
        ringfx.transform(model, mesh=ringfx.LoopbackRing(3))(torch.randn(2, 11, E, dtype=DTYPE),
                                                            torch.randn(2, 11, E, dtype=DTYPE))


def _compile_backend_training(rank, world):
    """torch.compile(backend="ringfx") with no transform: gradients averaged all the same."""
    torch.manual_seed(0)
    model = BY_CASE["padded_shift_sum_loss"].make()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    ids, labels = BY_CASE["padded_shift_sum_loss"].inputs(13, g)
    ref(ids, labels).backward()
    torch.compile(model, backend="ringfx", options={"inner": "eager", "layout": "zigzag"})(ids, labels).backward()
    return max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))


@pytest.mark.gloo
def test_compile_backend_gradients_equal_single_process_on_every_rank():
    errors = spawn_gloo(2, _compile_backend_training)
    assert all(e is not None and e < 1e-6 for e in errors), errors


def test_dynamic_shapes_with_full_length_inputs_are_refused_with_what_to_do():
    torch.compiler.reset()
    ring = ringfx.transform(PerToken(), mesh=ringfx.LoopbackRing(2), dynamic=True)
    with pytest.raises(ringfx.UnsupportedError, match="static sequence lengths"):
        ring(torch.randn(2, 12, E, dtype=DTYPE))


def test_per_row_token_index_out_of_bounds_raises_not_zeros():
    class PickPast(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

        def forward(self, x, where):
            return self.attn(x)[torch.arange(x.shape[0]), where]

    torch.compiler.reset()
    model = PickPast()
    x = torch.randn(2, 12, E, dtype=DTYPE)
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(3))
    torch.testing.assert_close(ring(x, torch.tensor([11, -12])), model(x, torch.tensor([11, -12])))
    with pytest.raises(RuntimeError, match="out of bounds for a sequence of 12 tokens"):
        ring(x, torch.tensor([3, 12]))


def test_every_sharded_value_records_its_sequence_axis():
    from ringfx.passes.rewrite_attention import ring_attention_nodes
    from ringfx.passes.shard_sequence import SEQUENCE_KEY, Sharded

    torch.compiler.reset()
    ring = ringfx.transform(BY_CASE["mean_pool_classifier"].make(), mesh=ringfx.LoopbackRing(3), layout="zigzag")
    ring(torch.randn(2, 13, E, dtype=DTYPE))
    (report,) = ring.reports
    gm = report.graph_module
    (op,) = ring_attention_nodes(gm)
    assert op.meta[SEQUENCE_KEY] == (Sharded(2, 13), Sharded(2, 13))  # (out, lse): tokens on axis 2
    placed = {n.name: n.meta[SEQUENCE_KEY] for n in gm.graph.nodes if SEQUENCE_KEY in n.meta}
    assert Sharded(1, 13) in placed.values()  # the input's tokens, where it enters
    assert not any(SEQUENCE_KEY in n.meta for n in gm.graph.nodes if n.op == "output")  # gathered back


def test_moe_routing_scatter_is_per_token():
    """Llama 4's router: per-token expert scores, top-k, then ``full_like(-inf).scatter_(1, idx,
    top)``: an in-place scatter along the experts of a tensor sharded along the tokens, which
    was refused (in-place write ringfx could not follow); it is per token."""

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.router = Attention(), nn.Linear(E, 4, dtype=DTYPE)
            self.experts = nn.Linear(E, 4 * E, dtype=DTYPE)

        def forward(self, x):
            h = self.attn(x)
            b, s, _ = h.shape
            flat = h.reshape(b * s, E)
            logits = self.router(flat)
            top, idx = torch.topk(logits, 2, dim=1)
            scores = torch.full_like(logits, float("-inf")).scatter_(1, idx, top).softmax(1)
            picked = torch.gather(scores, 1, idx)
            mixed = (self.experts(flat).view(b * s, 4, E) * scores[..., None]).sum(1)
            return (mixed + picked.sum(1, keepdim=True)).view(b, s, E)

    torch.compiler.reset()
    torch.manual_seed(0)
    model = Router()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 13, E, dtype=DTYPE)
    w = torch.randn(2, 13, E, dtype=DTYPE)
    (ref(x) * w).sum().backward()
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(3), layout="zigzag")
    out = ring(x)
    (out * w).sum().backward()
    torch.testing.assert_close(out, ref(x), atol=1e-10, rtol=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=0)
    assert not ring.reports[0].sharding.costly_fallbacks, ring.reports[0].sharding.costly_fallbacks


# -- which axis is the sequence: traced back from the attention, not guessed from sizes ----------


class SequenceFirst(nn.Module):
    """``nn.MultiheadAttention`` without ``batch_first``: inputs are (S, B, E)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, 2, dtype=DTYPE)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class ConditionAsWideAsTheSequence(Attention):
    """A per-example conditioning vector (B, C) with C == S, projected and added to every token."""

    def __init__(self, width):
        super().__init__()
        self.cond = nn.Linear(width, E, dtype=DTYPE)

    def forward(self, x, cond):
        return super().forward(x + self.cond(cond)[:, None])


def _sharded_and_exact(model, inputs, world, layout="contiguous"):
    """``transform``'s sharded-input lines; outputs and input gradients exact against ``model``."""
    torch.compiler.reset()
    ref_inputs = [t.clone().requires_grad_() for t in inputs]
    ring_inputs = [t.clone().requires_grad_() for t in inputs]
    ref = model(*ref_inputs)
    ring = ringfx.transform(copy.deepcopy(model), mesh=ringfx.LoopbackRing(world), layout=layout)
    out = ring(*ring_inputs)
    dout = torch.randn_like(ref)
    torch.autograd.backward(ref, dout)
    torch.autograd.backward(out, dout)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    for a, b in zip(ring_inputs, ref_inputs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=0)
    return ring.reports[0].sharding.sharded_inputs


@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (3, "contiguous")])
def test_sequence_first_input_with_batch_equal_to_length_is_sharded_along_the_sequence(world, layout):
    """(S, B, E) with B == S: the axis is traced back from the attention (dim 0); a size
    heuristic picked dim 1, the batch (exact only because the attention gathered it again)."""
    torch.manual_seed(0)
    x = torch.randn(12, 12, E, dtype=DTYPE)
    lines = _sharded_and_exact(SequenceFirst(), [x], world, layout)
    assert lines == ["L['x'] (12, 12, 16) along dim 0 (traced back from an attention)"], lines


def test_an_input_whose_width_equals_the_length_is_not_sharded():
    """A (B, C) input with C == S that never meets the sequence axis stays whole: sharding it
    by its size only to gather it back at its linear layer is dropped."""
    torch.manual_seed(0)
    x, cond = torch.randn(2, 12, E, dtype=DTYPE), torch.randn(2, 12, dtype=DTYPE)
    lines = _sharded_and_exact(ConditionAsWideAsTheSequence(12), [x, cond], 3)
    assert lines == ["L['x'] (2, 12, 16) along dim 1 (traced back from an attention)"], lines


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_zero_touch_with_a_compiling_inner_compiler(inner):
    """Full-length inputs with the graph compiled by AOTAutograd (and inductor): the sharding
    runs inside the traced graph. Its token positions were cached while AOTAutograd traced
    them (functional tensors), and the gather op's real kernel was then handed one:
    "Attempting to use FunctionalTensor on its own" on every such model."""
    for name in ("shifted_loss", "mean_pool_classifier", "causal_conv"):
        r = run_case(BY_CASE[name], ringfx.LoopbackRing(3), "zigzag", 13, inner=inner)
        assert r["rewritten"] and r["out_err"] < r["tol"] and r["grad_err"] < r["tol"], r
