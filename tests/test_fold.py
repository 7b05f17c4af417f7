"""The accumulation folds of the ring programs: several blocks folded into a float32
accumulator in one pass (``fold``), their bookkeeping (``Deferred``), and the Triton
kernel that does it on CUDA, checked here under Triton's CPU interpreter."""

import os
import random
import subprocess
import sys

import pytest
import torch

from ringfx.runtime.algorithm import Deferred, fold


def _partials(s, v, cuts):
    """Partial attention results of scores ``s`` over key ranges split at ``cuts``."""
    outs, lses = [], []
    for a, b in zip(cuts, cuts[1:]):
        lses.append(torch.logsumexp(s[..., a:b], -1))
        outs.append(torch.softmax(s[..., a:b], -1) @ v[..., a:b, :])
    return outs, lses


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("with_acc", [False, True])
def test_fold_merge_equals_joint_softmax(n, with_acc):
    torch.manual_seed(n)
    s = torch.randn(2, 3, 5, 20, dtype=torch.float64)
    v = torch.randn(2, 3, 20, 8, dtype=torch.float64)
    cuts = sorted(random.Random(n).sample(range(1, 20), n)) + [20]
    outs, lses = _partials(s, v, [0] + cuts if with_acc else [0] + cuts[1:])
    dst = torch.empty(2, 3, 5, 8, dtype=torch.float64)
    dst_lse = torch.empty(2, 3, 5, dtype=torch.float64)
    acc, acc_lse = (outs.pop(0), lses.pop(0)) if with_acc else (None, None)
    fold(dst, acc, outs, dst_lse=dst_lse, acc_lse=acc_lse, lses=lses)
    torch.testing.assert_close(dst, torch.softmax(s, -1) @ v)
    torch.testing.assert_close(dst_lse, torch.logsumexp(s, -1))


def test_fold_merge_rows_nobody_saw_are_zero_with_lse_minus_inf():
    blocks = [torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 3)]
    lses = [torch.full((1, 1, 2), float("-inf"))] * 2
    dst, dst_lse = torch.full((1, 1, 2, 3), 7.0), torch.empty(1, 1, 2)
    fold(dst, None, blocks, dst_lse=dst_lse, lses=lses)
    assert (dst == 0).all() and (dst_lse == float("-inf")).all()


def test_fold_sum_writes_the_result_dtype():
    blocks = [torch.randn(2, 2, 4, 8).bfloat16() for _ in range(3)]
    acc = torch.randn(2, 2, 4, 8)
    dst = torch.empty(2, 2, 4, 8, dtype=torch.bfloat16)
    fold(dst, acc, blocks)
    expected = acc + sum(b.float() for b in blocks)
    torch.testing.assert_close(dst, expected.bfloat16())


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("group", [1, 2, 3, 4])
def test_deferred_equals_folding_everything_at_once(merge, group):
    # blocks over whole and partial row ranges (as the zigzag layout makes them), in a
    # random order; the first fold may be partial
    rng = random.Random(group * 2 + merge)
    torch.manual_seed(group)
    s, v = torch.randn(1, 2, 8, 24, dtype=torch.float64), torch.randn(1, 2, 24, 4, dtype=torch.float64)
    ranges = [(0, 8), (4, 8), (0, 8), (4, 8), (0, 8), (0, 8), (4, 8)]
    rng.shuffle(ranges)
    acc = torch.empty(1, 2, 8, 4, dtype=torch.float64)
    acc_lse = torch.empty(1, 2, 8, dtype=torch.float64) if merge else None
    deferred = Deferred(acc, acc_lse, group, merge=merge)
    total = torch.zeros(1, 2, 8, 4, dtype=torch.float64)
    scores = torch.full((1, 2, 8, 24 * len(ranges)), float("-inf"), dtype=torch.float64)
    values = torch.cat([v] * len(ranges), 2)
    for i, (a, b) in enumerate(ranges):
        block = torch.randn(1, 2, b - a, 4, dtype=torch.float64)
        if merge:
            scores[:, :, a:b, 24 * i:24 * (i + 1)] = s[:, :, a:b]
            outs, lses = _partials(s[:, :, a:b], v, [0, 24])
            deferred.add(slice(a, b), outs[0], lses[0])
        else:
            total[:, :, a:b] += block
            deferred.add(slice(a, b), block)
    dst = torch.empty(1, 2, 8, 4, dtype=torch.float32)
    dst_lse = torch.empty(1, 2, 8, dtype=torch.float64) if merge else None
    if not deferred.finish(dst, dst_lse):
        dst.copy_(acc)
        if merge:
            dst_lse.copy_(acc_lse)
    expected = torch.softmax(scores, -1) @ values if merge else total
    torch.testing.assert_close(dst, expected.float())
    if merge:
        torch.testing.assert_close(dst_lse, torch.logsumexp(scores, -1))


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def test_triton_fold_under_interpreter():
    """Runs the cases below in a fresh interpreter with TRITON_INTERPRET=1 (Triton reads
    it when the kernel is defined, so it cannot be switched on inside this process)."""
    pytest.importorskip("triton", reason="needs Triton (pip install triton) to run the fused fold on its interpreter")
    if INTERPRETED:
        return
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k",
                          "triton_fold_matches_eager"], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-1000:]


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("with_acc", [False, True])
@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.skipif(not INTERPRETED, reason="run by test_triton_fold_under_interpreter with TRITON_INTERPRET=1")
def test_triton_fold_matches_eager(merge, n, with_acc, dst_dtype):
    from ringfx.runtime.merge_triton import fold_triton
    torch.manual_seed(n)
    b, h, s, d = 2, 3, 10, 16

    def block():  # strided like a kernel's (B, S, H, D)-laid-out output
        return torch.randn(b, s, h, d).bfloat16().transpose(1, 2)

    blocks = [block() for _ in range(n)]
    lses = [torch.randn(b, h, s) * 3 for _ in range(n)] if merge else None
    if merge:  # rows some blocks did not see, and rows nobody saw
        for x in lses:
            x[0, 0, :2] = float("-inf")
        lses[0][0, 0, 2] = float("-inf")
    acc = torch.randn(b, h, s, d) if with_acc else None
    acc_lse = torch.randn(b, h, s) if with_acc and merge else None
    if acc_lse is not None:  # rows the accumulator has not seen hold output 0
        acc_lse[0, 0, :2] = float("-inf")
        acc[0, 0, :2] = 0
    results = []
    for run in (fold_triton, lambda *a, **kw: fold(*a, **kw)):
        dst = torch.empty(b, h, s, d, dtype=dst_dtype)
        dst_lse = torch.empty(b, h, s) if merge else None
        run(dst, acc, blocks, dst_lse=dst_lse, acc_lse=acc_lse, lses=lses)
        results.append((dst, dst_lse))
    (got, got_lse), (want, want_lse) = results
    torch.testing.assert_close(got, want)
    if merge:
        torch.testing.assert_close(got_lse, want_lse)
        assert (got_lse[0, 0, :2] == float("-inf")).all() and (got[0, 0, :2] == 0).all()
