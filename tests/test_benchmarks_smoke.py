"""benchmarks/variants_speed.py's rows for chunked attention, ALiBi, T5's relative bias and MLA,
tiny, on CPU: the ring rows (P = 1 and 4) and the monolithic SDPA rows agree with the float32
reference in the forward, and with each other in every gradient the benchmark times (T5's
embedding weight included). The compiled flex rows are left to the benchmark itself (a compile
takes longer than this whole test)."""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

import pytest
import torch


def _load_benchmark():
    """``benchmarks/variants_speed.py`` (a script, not a package) as the module ``variants_speed``."""
    if "variants_speed" not in sys.modules:
        path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "variants_speed.py"
        spec = importlib.util.spec_from_file_location("variants_speed", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["variants_speed"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["variants_speed"]


variants_speed = _load_benchmark()

CPU = torch.device("cpu")
ARGS = argparse.Namespace(iters=1, warmup=0, row_seconds=0.0, inference_fwd=False, raise_errors=True,
                          verbose=False)


def _problem(variant):
    # S = 32 (chunk 8, four chunks), H = 2; MLA: qk head dim 12, value head dim 8, Hkv = H
    hkv, d, d_v = (2, 12, 8) if variant == "mla" else (1, 8, 8)
    return variants_speed.make_problem(1, 2, hkv, 32, d, torch.float32, CPU, True, seed=7, chunk=8, d_v=d_v)


def _grads(contender, pb):
    """The output (in sequence order) and the gradients of every timed input, in sequence order."""
    prepared = contender.prepare(pb)
    leaves = [t.detach().requires_grad_() for t in prepared.inputs]
    out = prepared.attend(*leaves)
    grads = torch.autograd.grad(out, leaves, prepared.dout)
    if contender.ring:  # q, k, v are the ranks' shards; a learned parameter is whole
        grads = [prepared.to_global(g) for g in grads[:3]] + list(grads[3:])
    return prepared.to_global(out.detach()), grads


@pytest.mark.parametrize("variant", ["chunk", "alibi", "relbias", "mla"])
def test_variant_rows_exact(variant):
    pb = _problem(variant)
    ref = variants_speed.reference(pb, variant)
    rows = [c for c in variants_speed.contenders(CPU) if c.variant == variant and "flex" not in c.name]
    assert [c.ring for c in rows][:2] == [1, 4] and len(rows) >= 3
    row = variants_speed.run_row(variants_speed.Clock(CPU), pb, rows[1], ref, ARGS)  # the ring of 4, as timed
    assert row["max_abs_err"] < 1e-5 and row["fwd_bwd_ms"] > 0, row
    expected = None
    for c in rows[2:] + rows[:2]:  # the monolithic SDPA rows first: their gradients are the expected ones
        out, grads = _grads(c, pb)
        assert (out - ref).abs().max() < 1e-5, c.name
        if expected is None:
            expected = grads
            if variant == "relbias":  # T5's embedding weight is timed with its gradient
                assert len(grads) == 4 and grads[3].abs().max() > 0
        assert len(grads) == len(expected), c.name
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{c.name}: {m}")


def test_dense_masks_match_the_reference():
    """The float ALiBi mask SDPA is handed and T5's bucket index are the reference's bias."""
    pb = _problem("alibi")
    mask = variants_speed.alibi_float_mask(pb)
    dist = variants_speed.distances(32, CPU)
    keep = dist <= 0
    assert torch.equal(mask[0][:, keep], (pb.slopes[:, None, None] * dist)[:, keep])
    assert (mask[0][:, ~keep] == torch.finfo(torch.float32).min).all()
    index = variants_speed.t5_bucket_index(pb)
    table = variants_speed.relative_table(pb, pb.rel_weight)
    assert torch.equal(variants_speed.t5_position_bias(pb, pb.rel_weight)[0], table[:, dist + 31])
    assert index.shape == (32, 32) and variants_speed.t5_bucket_index(pb) is index  # built once
