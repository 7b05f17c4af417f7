"""Planner: the memory model against hand counts, monotonicity, the paper's block sizes, the CLI."""

from __future__ import annotations

import argparse

import pytest
import sympy
from hypothesis import given, settings, strategies as st
import torch
import torch.nn as nn
import torch.nn.functional as F

from ringfx.planner import (DeviceSpec, ModelConfig, Plan, TrainingOptions, device_spec, memory_model,
                            min_block_size, parse_bytes, parse_seq_len, plan)
from ringfx.planner.cli import add_plan_arguments, run_plan
from ringfx.planner.memory import (CUDA_LIBRARY_WORKSPACE, AttentionShape, P, S, attention_layer_peak,
                                   ring_attention_buffers)

# -- a toy whose memory is counted by hand ---------------------------------------------------------


class Toy(nn.Module):
    """x (B, L, h) -> fused qkv projection -> causal attention -> output projection."""

    def __init__(self, h=16, heads=2):
        super().__init__()
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.o = nn.Linear(h, h, bias=False)
        self.heads = heads

    def forward(self, x):
        b, n, h = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b, n, h))


def toy_hand_count(s, h=16, heads=2, B=1, a=4):
    """Peak bytes of the toy's fwd+bwd on one ring device, counted by hand (fp32, a = 4).

    The peak is inside the attention backward. Alive then:
      input x                       B*s*h*a
      qkv output (q, k, v saved)    3*B*s*h*a
      attention out, lse (saved)    B*s*h*a + B*heads*s*4
      loss                          4
      grad of the loss (ones)       4
      grad of the attention output  B*s*h*a        (o's backward has run)
      grad of o.weight              h*h*a          (accumulated already)
      ring buffers (the contract):  dq acc fp32, dK/dV fp32 x2, KV x3, block dq/dk/dv,
                                    one deferred dq block,
                                    kernel workspace (cuDNN: one fp32 q block) + row sums
      parameters (static)           4*h*h*a, cuBLAS workspace
    """
    q = B * s * h * a                  # q-sized block, fp32 here
    kv = 2 * B * s * h * a             # K and V packed
    rows = B * heads * s * 4
    ring = q + 2 * kv + 3 * kv + (q + kv) + q + (q + rows)
    return (B * s * h * a) + 3 * B * s * h * a + (q + rows) + 4 + 4 + q + h * h * a + ring \
        + 4 * h * h * a + CUDA_LIBRARY_WORKSPACE


def toy_model():
    return memory_model(Toy(), example_inputs=(torch.randn(1, 64, 16),), precision="fp32", optimizer="none")


def test_toy_memory_expression_matches_hand_count():
    model = toy_model()
    for seq, ring in [(256, 2), (1024, 4), (4096, 8), (12288, 3)]:
        assert model.peak_bytes(seq, ring) == toy_hand_count(seq // ring)
    # symbolically, too: the expression is linear in S/P with the hand-counted slope
    expr = sympy.expand(model.peak.subs({S: sympy.Symbol("x") * P}))
    assert isinstance(model.peak, sympy.Expr)
    assert expr.subs(sympy.Symbol("x"), 1000) == toy_hand_count(1000)


def test_toy_breakdown_names_the_ring_buffers():
    parts = toy_model().evaluate(4096, 4)
    s = 1024
    assert parts["attention buffers"] == toy_hand_count(s) - toy_hand_count(0) - (
        4 * s * 16 * 4 + (s * 16 * 4 + 2 * s * 4) + s * 16 * 4)
    assert parts["parameters"] == 4 * 16 * 16 * 4


def test_attention_layer_peak_sdpa_properties():
    att = AttentionShape(batch=1, q_heads=32, kv_heads=32, head_dim=128, dtype_bytes=2, causal=True)
    peak = lambda n, kernel="cudnn": attention_layer_peak(att, n, ring=False, kernel=kernel)  # noqa: E731
    # no S x S score matrix: the memory of a fused kernel is linear in the length
    for s in (4096, 65536):
        assert peak(2 * s) - peak(s) == peak(3 * s) - peak(2 * s) > 0
    # more than the tensors that must exist: q, k, v, out, dout (bf16) and the fp32 lse
    s, x = 65536, 65536 * 32 * 128 * 2
    assert peak(s) > 5 * x + 32 * s * 4
    # flash keeps more than cuDNN in its backward (measured on an H100, see memory.py)
    assert peak(s, "flash") > peak(s)
    # DESIGN.md §6: 786,432 tokens fit one H100 (80 GB) at H=32, D=128; 1,048,576 does not
    fits = lambda n: peak(n) < 79.2 * 2**30  # noqa: E731
    assert fits(786432) and not fits(1048576)


def _buffers(att, s, **kw):
    return {name: n for group in ring_attention_buffers(att, s, **kw).values() for name, n in group}


def test_ring_buffers_follow_the_contract():
    att = AttentionShape(batch=2, q_heads=8, kv_heads=2, head_dim=64, dtype_bytes=2)
    b = _buffers(att, 1000)
    # K and V travel packed (2, B, Hkv, s, D) in the input dtype: the local block plus two
    # receive buffers (double-buffered), counted by hand
    assert b["KV ring buffers"] == 3 * (2 * 2 * 2 * 1000 * 64 * 2)
    # GQA: K/V are never expanded to the query heads before they travel
    more_q_heads = _buffers(AttentionShape(batch=2, q_heads=32, kv_heads=2, head_dim=64, dtype_bytes=2), 1000)
    assert more_q_heads["KV ring buffers"] == b["KV ring buffers"]
    assert more_q_heads["out accumulator (fp32)"] == 4 * b["out accumulator (fp32)"]
    # accumulators are float32 whatever the input dtype
    fp32 = _buffers(AttentionShape(batch=2, q_heads=8, kv_heads=2, head_dim=64, dtype_bytes=4), 1000)
    for name in ("out accumulator (fp32)", "dK/dV ring buffers (fp32)", "lse (fp32, saved)"):
        assert fp32[name] == b[name], name
    assert fp32["KV ring buffers"] == 2 * b["KV ring buffers"]
    # every buffer is linear in the local length (nothing s x s)
    b2 = _buffers(att, 2000)
    assert all(b2[name] == 2 * n for name, n in b.items()), {k: (v, b2[k]) for k, v in b.items()}
    # query chunks shrink the per-call merge buffers, not the accumulators
    chunked = _buffers(att, 1000, query_chunks=4)
    assert chunked["merge buffers"] * 4 == b["merge buffers"]
    assert chunked["out accumulator (fp32)"] == b["out accumulator (fp32)"]


# -- monotonicity ------------------------------------------------------------------------------------

SMALL = ModelConfig("small", layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512, vocab=1024)


@pytest.fixture(scope="module")
def small_plans():
    def run(memory, gpus, **kw):
        return plan(SMALL, "256K", device="H100", device_memory=memory, world_size=gpus, **kw)
    return run


@pytest.mark.parametrize("gpus", [8, 16, 64])
def test_more_memory_never_needs_a_larger_ring(small_plans, gpus):
    sizes = [small_plans(mem, gpus).ring_size for mem in ("4GiB", "8GiB", "16GiB", "48GiB", "80GiB")]
    assert all(a >= b for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[0] > sizes[-1]


@pytest.mark.parametrize("memory", ["3GiB", "10GiB", "40GiB"])
def test_more_devices_never_needs_a_larger_ring(small_plans, memory):
    results = [small_plans(memory, gpus) for gpus in (8, 16, 32, 64)]
    fitted = [r.ring_size for r in results if r.feasible]
    assert fitted, "some world size should fit"
    assert all(a >= b for a, b in zip(fitted, fitted[1:]))
    # once feasible, it stays feasible with more devices
    feasible = [r.feasible for r in results]
    assert feasible == sorted(feasible)


def test_a_world_size_that_is_not_a_power_of_two_never_forces_a_larger_ring(small_plans):
    for memory in ("3GiB", "6GiB", "12GiB"):
        r8, r9, r12 = (small_plans(memory, gpus) for gpus in (8, 9, 12))
        if r8.feasible:
            assert r9.feasible and r12.feasible
            assert r9.ring_size <= r8.ring_size and r12.ring_size <= r8.ring_size


def test_peak_decreases_with_ring_size():
    model = memory_model(SMALL)
    peaks = [model.peak_bytes(262144, p) for p in (2, 4, 8, 16, 32)]
    assert peaks == sorted(peaks, reverse=True)


# -- the time model: the Ring Attention paper's Table 2 -------------------------------------------


@pytest.mark.parametrize("flops,bandwidth,expected", [
    (312e12, 300e9, 1.0e3),     # A100, NVLink
    (312e12, 12.5e9, 24.5e3),   # A100, InfiniBand 100 Gb/s (the paper rounds to 24.5K)
    (275e12, 268e9, 1.0e3),     # TPUv4
])
def test_paper_minimum_block_sizes(flops, bandwidth, expected):
    c = min_block_size(flops, bandwidth)
    assert c == pytest.approx(expected, rel=0.05)


def test_min_block_scales_with_gqa_and_causal():
    base = min_block_size(312e12, 300e9, q_heads=32, kv_heads=32)
    assert min_block_size(312e12, 300e9, q_heads=32, kv_heads=8) == pytest.approx(base / 4)
    assert min_block_size(312e12, 300e9, q_heads=32, kv_heads=32, causal=True) == pytest.approx(2 * base)


def test_plan_reports_overlap_from_the_link():
    nvlink = plan(SMALL, "64K", device="A100", device_memory="1GiB", world_size=4)
    assert nvlink.feasible and nvlink.ring_size > 1
    slow = plan(SMALL, "64K", device="A100", device_memory="1GiB", world_size=4, bandwidth="0.01GB/s")
    assert nvlink.overlap and not slow.overlap
    assert slow.step_time > nvlink.step_time


# -- plan, infeasible, parsing, CLI -----------------------------------------------------------------


def test_plan_table_and_fields():
    result = plan(SMALL, "128K", device="H100", device_memory="2GiB", world_size=8)
    assert isinstance(result, Plan) and result.feasible
    assert result.layout == "zigzag"  # causal
    assert result.block_size * result.ring_size == 131072
    assert result.predicted_peak <= result.budget == int(2 * 2**30 * 0.9)
    text = str(result)
    for needle in ("ring size P", "zigzag", "predicted peak", "c >= F/B", "reasons"):
        assert needle in text


def test_infeasible_plan_says_what_would_fit():
    result = plan(SMALL, "1M", device="H100", device_memory="1GiB", world_size=2)
    assert not result.feasible
    assert any("fits on a ring of" in s for s in result.suggestions)
    assert "DOES NOT FIT" in str(result)


def test_checkpointing_lowers_the_peak():
    plain = memory_model(SMALL)
    ckpt = memory_model(SMALL, activation_checkpointing=True)
    assert ckpt.peak_bytes(262144, 4) < plain.peak_bytes(262144, 4)


def test_fsdp_divides_static_terms_by_ring_size():
    whole, sharded = memory_model(SMALL), memory_model(SMALL, param_shards="ring")
    # Adam keeps two float32 moments per parameter, counted by hand
    assert whole.evaluate(65536, 8)["optimizer state (Adam, fp32)"] == 2 * 4 * SMALL.param_count
    for ring in (2, 8, 32):
        full, shard = whole.evaluate(65536, ring), sharded.evaluate(65536, ring)
        for name in ("parameters", "master weights (fp32)", "optimizer state (Adam, fp32)"):
            assert shard[name] * ring == full[name], (name, ring)
        assert shard["library workspace (cuBLAS)"] == full["library workspace (cuBLAS)"]  # not state
        assert sharded.peak_bytes(65536, ring) < whole.peak_bytes(65536, ring)


def test_parsing():
    assert parse_seq_len("1M") == 1048576 and parse_seq_len("128K") == 131072 and parse_seq_len(1048576) == 1048576
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("80GB") == 80 * 10**9
    with pytest.raises(ValueError, match="seq_len"):
        parse_seq_len("lots")
    with pytest.raises(ValueError, match="device_memory"):
        device_spec("H100")  # no memory given and no CUDA here
    with pytest.raises(ValueError, match="precision"):
        TrainingOptions(precision="fp8")
    assert isinstance(device_spec("A100", device_memory="40GiB"), DeviceSpec)


def test_module_needs_example_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        plan(Toy(), 1024, device_memory="1GiB")


def test_cli(capsys):
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    args = parser.parse_args(["--model", "gpt2-like", "--seq-len", "64K", "--device-memory", "80GiB", "--gpus", "8",
                              "--device", "H100"])
    assert run_plan(args) == 0
    out = capsys.readouterr().out
    assert "ring size P" in out and "gpt2-like" in out


class ToyRing(Toy):
    """The toy after the rewrite: the attention is ringfx's op (a loopback ring here)."""

    def forward(self, x):
        import ringfx

        b, n, h = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = ringfx.ring_attention(q, k, v, group=ringfx.LoopbackRing(2), causal=True)
        return self.o(a.transpose(1, 2).reshape(b, n, h))


def test_graph_module_and_rewritten_op_are_modelled_like_the_module():
    expected = toy_model().peak_bytes(4096, 4)
    x = (torch.randn(1, 64, 16),)
    graph = torch.fx.symbolic_trace(Toy())
    assert memory_model(graph, example_inputs=x, precision="fp32", optimizer="none").peak_bytes(4096, 4) == expected
    ring = memory_model(ToyRing(), example_inputs=x, precision="fp32", optimizer="none")
    assert ring.peak_bytes(4096, 4) == expected
    assert len(ring.attention) == 1 and ring.attention[0].causal


@settings(max_examples=15, deadline=None)
@given(memory_gib=st.integers(1, 60), extra_gib=st.integers(0, 40), gpus=st.integers(1, 40),
       extra_gpus=st.integers(0, 40))
def test_monotone_in_memory_and_devices(memory_gib, extra_gib, gpus, extra_gpus):
    def ring(mem, n):
        r = plan(SMALL, "256K", device="H100", device_memory=f"{mem}GiB", world_size=n)
        return r.ring_size if r.feasible else None

    base = ring(memory_gib, gpus)
    if base is None:
        return
    more_memory, more_devices = ring(memory_gib + extra_gib, gpus), ring(memory_gib, gpus + extra_gpus)
    assert more_memory is not None and more_memory <= base
    assert more_devices is not None and more_devices <= base


def test_plan_from_inputs_reads_the_sequence_length():
    x = torch.randn(1, 4096, 16)
    result = __import__("ringfx.planner", fromlist=["plan_from_inputs"]).plan_from_inputs(
        Toy(), (x,), world_size=4, device="H100", device_memory="1MiB", headroom=0.0)
    assert result.seq_len == 4096
    expected = toy_model()
    sizes = [p for p in (1, 2, 3, 4) if 4096 % (2 * p) == 0 and p > 1]
    fits = [p for p in sizes if expected.peak_bytes(4096, p) <= 2**20]
    assert result.feasible == bool(fits) and (not fits or result.ring_size == fits[0])
