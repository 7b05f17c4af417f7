"""``ringfx.runtime.token_moves``: shifts, rolls, pads and convolution halos of a sequence
sharded over a ring, against the same op on the whole sequence (float64, forward and
backward, padded lengths, both layouts). The graph pass's use of them (slices, ``F.pad``,
``torch.roll``, ``conv1d`` in models) is checked on loopback and real gloo rings in
``test_zero_touch.py`` (``mixing_zoo``: shifted_loss, roll_shift, causal_conv)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ringfx
from ringfx.runtime import collectives as C
from ringfx.runtime import token_moves as T

SHIFTS = [  # (new length - S, offset, wrap): x[1:], x[:-1], F.pad left 2, roll +1 and -3, a short window
    (-1, 1, False), (-1, 0, False), (2, -2, False), (0, -1, True), (0, 3, True), (-4, 4, False), (1, -1, False)]
CONVS = [(4, 1, 3), (3, 2, 2), (3, 1, 1), (5, 1, 0)]  # kernel, dilation, left padding (causal, same, ...)


def _shifted(x, length, offset, wrap):
    s = x.shape[1]
    cols = [x[:, (t + offset) % s] if wrap else (x[:, t + offset] if 0 <= t + offset < s else torch.zeros_like(x[:, 0]))
            for t in range(length)]
    return torch.stack(cols, 1)


def _grads(out, leaves, w):
    return torch.autograd.grad((out * w).sum(), leaves)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shifts_and_halos_equal_the_whole_sequence_op(world, layout):
    group = ringfx.LoopbackRing(world).group_name
    g = torch.Generator().manual_seed(world)
    failures = []
    for s in (2 * world * 3, 2 * world * 3 + 1, 7):
        x = torch.randn(2, s, 3, generator=g, dtype=torch.float64, requires_grad=True)
        for extra, offset, wrap in SHIFTS:
            n = s + extra
            ref = _shifted(x, n, offset, wrap)
            w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
            y = T.take_tokens(C.shard_sequence(x, 1, s, group, layout), 1, s, T.shift_spec(n, offset, wrap), 0.0,
                              group, layout)
            valid = C.valid_tokens(group, layout, n, "cpu")
            wl = C.shard_sequence(w, 1, n, group, layout)
            err = (y - C.shard_sequence(ref, 1, n, group, layout))[:, valid].abs().max().item()
            gerr = (_grads(y[:, valid], x, wl[:, valid])[0] - _grads(ref, x, w)[0]).abs().max().item()
            if not (err < 1e-12 and gerr < 1e-12):
                failures.append(("shift", s, extra, offset, wrap, err, gerr))
        for k, dilation, left in CONVS:
            right = dilation * (k - 1) - left
            weight = torch.randn(3, 1, k, generator=g, dtype=torch.float64, requires_grad=True)
            xt = x.transpose(1, 2)
            ref = F.conv1d(F.pad(xt, (left, right)), weight, dilation=dilation, groups=3)
            n = ref.shape[-1]
            w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
            y = T.conv1d_over_sequence(C.shard_sequence(xt, 2, s, group, layout), weight, None, left, right,
                                       dilation, 3, s, n, group, layout)
            valid = C.valid_tokens(group, layout, n, "cpu")
            wl = C.shard_sequence(w, 2, n, group, layout)
            err = (y - C.shard_sequence(ref, 2, n, group, layout))[..., valid].abs().max().item()
            got, want = _grads(y[..., valid], (x, weight), wl[..., valid]), _grads(ref, (x, weight), w)
            gerr = max((a - b).abs().max().item() for a, b in zip(got, want))
            if not (err < 1e-12 and gerr < 1e-12):
                failures.append(("conv", s, k, dilation, left, err, gerr))
    assert not failures, failures


def test_pad_tokens_of_a_move_hold_the_fill_and_take_no_gradient():
    group = ringfx.LoopbackRing(3).group_name
    x = torch.arange(7.0, dtype=torch.float64).view(1, 7, 1).requires_grad_()
    y = T.take_tokens(C.shard_sequence(x, 1, 7, group, "contiguous"), 1, 7, T.shift_spec(8, -1), -5.0, group,
                      "contiguous")
    # 8 tokens on 3 ranks: padded to 9; token 0 is the pad's fill, token 8 the ring's padding
    assert y.flatten().tolist() == [-5.0, 0, 1, 2, 3, 4, 5, 6, -5.0]
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.flatten().tolist() == [1.0] * 7


class _Edges(torch.nn.Module):
    """Hostile slices and pads along the sequence after attention: a crop by negative pads,
    a strided slice, an empty slice, a roll by more than S, a slice past the end."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24, dtype=torch.float64)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 4).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, 8)
        cropped = F.pad(h, (0, 0, -2, 1))             # drop 2 tokens in front, one zero token at the end
        strided = h[:, ::2].sum(1)                    # step 2: all-gathered (exact)
        empty = h[:, 3:3].sum(1)                      # no token at all
        rolled = torch.roll(h, s + 2, dims=1)         # more than S
        past = h[:, -3:100]                           # a stop past the end
        return cropped.sum(1) + strided + empty + rolled.mean(1) + past.mean(1)


@pytest.mark.parametrize("world,layout,s", [(3, "zigzag", 13), (2, "contiguous", 7)])
def test_hostile_slices_and_pads_are_exact(world, layout, s):
    import copy
    import warnings

    torch.manual_seed(0)
    torch.compiler.reset()
    model = _Edges()
    ref = copy.deepcopy(model)
    x = torch.randn(2, s, 8, dtype=torch.float64)
    w = torch.randn(2, 8, dtype=torch.float64)
    (ref(x) * w).sum().backward()
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(world), layout=layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ringfx.RingfxWarning)  # the strided slice gathers (exact, warned)
        out = ring(x)
    (out * w).sum().backward()
    torch.testing.assert_close(out, ref(x), atol=1e-10, rtol=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=0)
    (report,) = ring.reports
    forms = " | ".join(report.sharding.distributed)
    assert "pad by (-2, 1) tokens" in forms and "roll by" in forms and "slice [" in forms, forms
