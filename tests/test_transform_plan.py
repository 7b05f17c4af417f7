"""transform(model, plan="auto"): the planner checks the ring before anything runs."""

import pytest
import torch

import ringfx
from ringfx.demo import TinyLlama

RING = ringfx.LoopbackRing(3)


def _model_and_inputs(s=48):
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (1, s))
    return TinyLlama(layers=1).double(), ids, torch.arange(s)[None]


def test_auto_plan_that_fits_runs_exactly():
    model, ids, pos = _model_and_inputs()
    ring_model = ringfx.transform(model, RING, plan="auto", example_inputs=(ids, pos), device_memory="1GiB",
                                  causal=True, layout="zigzag", inputs="sharded")
    assert ring_model.plan.feasible and ring_model.plan.ring_size <= RING.size
    shard = lambda x: ringfx.shard(x, 1, layout="zigzag", group=RING)  # noqa: E731
    out = ringfx.unshard(ring_model(shard(ids), shard(pos)), 1, layout="zigzag", group=RING)
    torch.testing.assert_close(out, model(ids, pos))


def test_auto_plan_that_cannot_fit_says_so_before_running():
    model, ids, pos = _model_and_inputs()
    with pytest.raises(ValueError, match="no ring that fits"):
        ringfx.transform(model, RING, plan="auto", example_inputs=(ids, pos), device_memory="300KiB")


def test_auto_plan_needs_example_inputs():
    model, _, _ = _model_and_inputs()
    with pytest.raises(ValueError, match="example_inputs"):
        ringfx.transform(model, RING, plan="auto")


def test_planner_options_without_a_plan_are_refused():
    model, _, _ = _model_and_inputs()
    with pytest.raises(ValueError, match="planner options"):
        ringfx.transform(model, RING, device_memory="80GiB")
