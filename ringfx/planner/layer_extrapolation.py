"""A model of L identical layers simulated with 3 and 4 of them: each event extrapolated in L.

The trace of a step (live bytes by category after every op, ``simulate.py``) is, for a stack
of identical layers,

    prefix | forward of layers 0 .. L-1 | middle (head, loss, its backward) | backward of layers L-1 .. 0 | suffix

and the live bytes at event j of the k-th block of a pass are affine in (k, L): each earlier
layer leaves its saved tensors (forward) or its gradients (backward), each later one its
saved tensors still to be used (backward)::

    bytes(L, k, j) = a_j + b_j k + c_j L        (per category, at one sequence length; 0 < k < L-1)

The first and last blocks of each pass have laws of their own (a'_j + c'_j L): the gradient
that reaches the last layer is the head's, counted with the logits, and the first layer's
backward frees what the layers shared (RoPE's cos and sin). So the peak over k is at block
0, 1, L-2 or L-1, and the trace of L layers is replaced by its events at those four blocks
(plus prefix, middle and suffix), the laws read off the simulations with 3 layers (blocks
0, 1, 2) and 4 layers (blocks 0..3) at the three fitting lengths. The reduced trace is a
subsequence of the trace of L layers with its exact values, so the envelope fitted on it
(``fit_peak_envelope``) is the one the L-layer simulation gives.

One direct simulation checks both laws at once: with 5 layers at the fourth length, every
event of every block (the middle one, which no law was read off, included) must be what the
laws in L predict at the three fitting lengths, carried to the fourth by the quadratic in
the length. When a check fails (layers that differ, a trace not in blocks, tensors that do
not grow polynomially) the caller simulates the whole model, at four lengths.

    before:  simulate_step(model with L layers, n) at 4 lengths                # ~4 L x 20 ms
    here:    reduced_trace(simulate_step(3 layers, n), simulate_step(4 layers, n), L) at 3 lengths,
             simulate_step(5 layers, 4th length) to check                      # ~(3 x 7 + 5) x 20 ms
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from .simulate import CATEGORIES, StepPeak, quadratic_predicts

log = logging.getLogger("ringfx.planner")

FIT_LAYERS = (3, 4)   # the layer counts the laws are read off
CHECK_LAYERS = 5      # the layer count they are checked against, at the fourth length
# below this many layers the whole model is simulated: 3 + 4 layers at three lengths and 5 once
# cost about as much as 8 layers at four lengths
EXTRAPOLATE_FROM = 9


class NotExtrapolable(Exception):
    """The trace is not one of identical layer blocks, or the affine law in L does not hold."""


def _pieces(run: StepPeak) -> dict:
    """The trace cut into prefix, forward blocks (layer order), middle, backward blocks (the
    order backward runs them: last layer first) and suffix, as lists of events."""
    marks, trace = run.marks, run.trace
    if marks is None:
        raise NotExtrapolable("no layer list found")
    layers = len(marks.forward)
    if marks.forward_end is None:
        raise NotExtrapolable("the last layer's forward did not finish")
    starts = marks.forward + [marks.forward_end]
    forward = [trace[starts[k]:starts[k + 1]] for k in range(layers)]
    if marks.backward_end is None or None in marks.backward:
        backward, middle_end, suffix = [], len(trace), []
    else:
        order = marks.backward[::-1] + [marks.backward_end]  # layer L-1 first: ascending trace indices
        if order != sorted(order):
            raise NotExtrapolable("the layers' backward does not run in reverse order")
        backward = [trace[order[r]:order[r + 1]] for r in range(layers)]
        middle_end, suffix = order[0], trace[marks.backward_end:]
    pieces = {"prefix": trace[:marks.forward[0]], "forward": forward, "middle": trace[marks.forward_end:middle_end],
              "backward": backward, "suffix": suffix}
    for name in ("forward", "backward"):
        if len({len(block) for block in pieces[name]}) > 1:
            raise NotExtrapolable(f"the layers' {name} blocks differ in length")
    return pieces


def _shape(pieces: dict) -> tuple:
    return (len(pieces["prefix"]), len(pieces["forward"][0]) if pieces["forward"] else 0, len(pieces["middle"]),
            len(pieces["backward"][0]) if pieces["backward"] else 0, len(pieces["suffix"]))


def _affine(y3: tuple, y4: tuple, layers: int) -> tuple:
    """An event of prefix, middle, suffix or an end block at ``layers`` layers: a + c L."""
    return tuple(v3 + (v4 - v3) * (layers - 3) for v3, v4 in zip(y3, y4))


def _blocks(three: list, four: list, layers: int) -> tuple:
    """The blocks that can hold the peak at ``layers`` layers: the first and the last (a' + c' L
    each), the second and the last but one (a + b k + c L, fitted on block 1 of 3 layers and
    blocks 1, 2 of 4)."""
    first, second, before_last, last = [], [], [], []
    for y30, y31, y32, y40, y41, y42, y43 in zip(*three, *four):
        first.append(_affine(y30, y40, layers))
        last.append(_affine(y32, y43, layers))
        # b: block 1 -> 2 of 4 layers; c: block 1 of 3 -> 4 layers; v(L, k) = v(3, 1) + b (k - 1) + c (L - 3)
        law = [(v31, v42 - v41, v41 - v31) for v31, v41, v42 in zip(y31, y41, y42)]
        second.append(tuple(v + c * (layers - 3) for v, b, c in law))
        before_last.append(tuple(v + b * (layers - 3) + c * (layers - 3) for v, b, c in law))
    return first, second, before_last, last


def reduced_trace(three: StepPeak, four: StepPeak, layers: int) -> list:
    """The events of blocks 0, 1, L-2 and L-1 (and the rest) of the trace of ``layers`` layers,
    in trace order, from the simulations with 3 and 4 layers."""
    p3, p4 = _pieces(three), _pieces(four)
    if _shape(p3) != _shape(p4) or len(p3["forward"]) != 3 or len(p4["forward"]) != 4:
        raise NotExtrapolable("the traces of 3 and 4 layers are not the same blocks")
    trace = [_affine(y3, y4, layers) for y3, y4 in zip(p3["prefix"], p4["prefix"])]
    for block in _blocks(p3["forward"], p4["forward"], layers):
        trace += block
    trace += [_affine(y3, y4, layers) for y3, y4 in zip(p3["middle"], p4["middle"])]
    if p3["backward"]:
        for block in _blocks(p3["backward"], p4["backward"], layers):  # block 0: the last layer's backward
            trace += block
    trace += [_affine(y3, y4, layers) for y3, y4 in zip(p3["suffix"], p4["suffix"])]
    return trace


def _attention(three: StepPeak, four: StepPeak, layers: int) -> list:
    per_layer = len(four.attention) - len(three.attention)
    if len(three.attention) != 3 * per_layer or len(set(four.attention)) > 1:
        raise NotExtrapolable("the layers' attention calls differ")
    return four.attention[:1] * (per_layer * layers)


def _step(trace: list, attention: list) -> StepPeak:
    peak_at = max(range(len(trace)), key=lambda i: sum(trace[i])) if trace else 0
    split = {c: v for c, v in zip(CATEGORIES, trace[peak_at]) if v} if trace else {}
    return StepPeak(peak=sum(split.values()), split=split, attention=attention, trace=trace)


def extrapolated_runs(simulate: Callable[[int, int], StepPeak], layers: int, points: Sequence[int]) -> list:
    """The steps of ``layers`` layers at the three lengths ``points[:3]`` for
    ``fit_peak_envelope``, as reduced traces from ``simulate(n, layer_count)`` (with layer
    marks) with 3 and 4 layers, checked at the fourth length ``points[3]`` against a direct
    simulation with ``CHECK_LAYERS`` layers: every event of it, the middle layers' included,
    must be the quadratic in n through the reduced traces of ``CHECK_LAYERS`` layers at the
    three lengths. Raises ``NotExtrapolable`` when a check fails."""
    fits = [tuple(simulate(int(n), k) for k in FIT_LAYERS) for n in points[:3]]
    five = simulate(int(points[3]), CHECK_LAYERS)
    direct = _pieces(five)
    if _shape(direct) != _shape(_pieces(fits[0][1])):
        raise NotExtrapolable(f"the trace of {CHECK_LAYERS} layers is not the same blocks")
    # every block of 5 layers as the laws predict it: the reduced trace at 5 holds blocks 0, 1, 3
    # and 4, and block 2 lies on the line between 1 and 3
    actual = list(direct["prefix"])
    for name in ("forward", "middle", "backward"):
        if name == "middle":
            actual += direct["middle"]
        elif direct[name]:
            actual += [event for k in (0, 1, 3, 4) for event in direct[name][k]]
    actual += direct["suffix"]
    inner = all(2 * m == f + l
                for name in ("forward", "backward") if direct[name]
                for ef, em, el in zip(direct[name][1], direct[name][2], direct[name][3])
                for f, m, l in zip(ef, em, el))
    predicted = [reduced_trace(three, four, CHECK_LAYERS) for three, four in fits]
    if not inner or not quadratic_predicts(predicted, points[:3], int(points[3]), actual) or \
            _attention(*fits[0], CHECK_LAYERS) != five.attention:
        raise NotExtrapolable(f"the simulation with {CHECK_LAYERS} layers at {points[3]} tokens differs from the "
                              "extrapolation")
    return [_step(reduced_trace(three, four, layers), _attention(three, four, layers)) for three, four in fits]
