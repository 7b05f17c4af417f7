"""The recognition tables of ``ringfx/passes/spellings.py`` are the source of truth:

* every example of ``patterns.PATTERNS`` fires exactly the rules it names;
* every rule of every table is named by some example (a table entry without a test fails);
* adding a spelling is one table entry: a normaliser the matcher does not know (softmax
  written as ``e / e.sum(-1, keepdim=True)``) is not found, and is found, rewritten and
  exact once one ``Rule`` is registered.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx

import ringfx
from ringfx.api import transform
from ringfx.passes import PassOptions, find_attention_pass, run_passes, sites_of
from ringfx.passes.node_facts import arg, op_name, shape_of
from ringfx.passes.normalise import normalise_pass
from ringfx.passes.patterns import PATTERNS
from ringfx.passes.spellings import NORMALISERS, NOT_ATTENTION, TABLES, Normalised, Rule, rule_named

OPTIONS = PassOptions(group_name="loopback:2", ring_size=2, loopback=True)


def _found(table_name: str, result) -> bool:
    """Whether a rule's result means its spelling was recognised at the node."""
    if table_name == "QK_PRODUCTS":
        return result[0] == ""
    if table_name == "PV_PRODUCTS":
        return result == ""
    return result is not None and result is not NOT_ATTENTION


@pytest.fixture
def fired():
    """The names of the rules whose spelling was recognised while the test ran (every
    table entry wrapped, restored afterwards)."""
    names, saved = set(), {name: list(table) for name, table in TABLES.items()}

    def recording(table_name, rule):
        def match(*args):
            result = rule.match(*args)
            if _found(table_name, result):
                names.add(rule.name)
            return result
        return dataclasses.replace(rule, match=match)

    for table_name, table in TABLES.items():
        table[:] = [recording(table_name, rule) for rule in table]
    yield names
    for table_name, table in TABLES.items():
        table[:] = saved[table_name]


def analyse(fn, *args) -> list:
    """The sites find_attention records in the graph dynamo captures for ``fn(*args)``."""
    sites = []

    def backend(gm, example_inputs):
        gm, _ = run_passes(gm, options=OPTIONS, passes=[normalise_pass, find_attention_pass])
        sites.extend(sites_of(gm))
        return gm.forward

    torch.compiler.reset()
    torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)(*args)
    return sites


@pytest.mark.parametrize("pattern", PATTERNS, ids=[p.name for p in PATTERNS])
def test_each_example_fires_exactly_the_rules_it_names(pattern, fired):
    (site,) = analyse(pattern.fn, *pattern.example_inputs(8))
    assert site.decision == "rewritten", site.reason
    assert fired == set(pattern.rules), f"{pattern.name}: fired {sorted(fired)}, names {sorted(pattern.rules)}"


def test_every_rule_is_exercised_by_an_example_and_says_where_it_comes_from():
    named = {name for p in PATTERNS for name in p.rules}
    for name in named:
        rule_named(name)  # a name that is no rule (or two) raises
    rules = [rule for table in TABLES.values() for rule in table]
    assert len({r.name for r in rules}) == len(rules), "rule names must be unique across the tables"
    assert sorted(r.name for r in rules if r.name not in named) == [], "rules no example in patterns.PATTERNS names"
    assert all(r.origin for r in rules)


# ------------------------------------------------ adding a spelling: one table entry

# softmax written out by hand, without the max subtraction (a toy spelling; exact in float64
# for small scores): p = e / e.sum(-1, keepdim=True), e = s.exp()
def exp_over_sum(node: fx.Node):
    if len(node.args) < 2 or op_name(node.args[0]) != "exp" or op_name(node.args[1]) != "sum":
        return None
    e, total = node.args
    if total.args[0] is not e or arg(total, 1, "dim") not in (-1, [-1], (-1,)) \
            or arg(total, 2, "keepdim", False) is not True or set(e.users) != {total, node}:
        return None
    scores = e.args[0]
    if not isinstance(scores, fx.Node) or len(shape_of(scores) or ()) < 3:
        return None
    return Normalised(scores, e, (e, total, node), -1)


EXP_OVER_SUM = Rule("exp-sum", frozenset({"div"}), exp_over_sum, "a hand-written softmax (toy: no max subtracted)")


@pytest.fixture
def with_exp_over_sum():
    NORMALISERS.append(EXP_OVER_SUM)
    yield
    NORMALISERS.remove(EXP_OVER_SUM)


def hand_softmax_attention(q, k, v):
    e = (q @ k.transpose(-2, -1) / 8.0).exp()
    return (e / e.sum(-1, keepdim=True)) @ v


def _qkv(s=12):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, s, 4, generator=g, dtype=torch.float64) for _ in range(3)]


def test_an_unknown_normaliser_is_not_found():
    assert analyse(hand_softmax_attention, *_qkv()) == []


def test_one_table_entry_makes_the_new_spelling_found_rewritten_and_exact(with_exp_over_sum):
    (site,) = analyse(hand_softmax_attention, *_qkv())
    assert (site.decision, site.pattern, site.scale) == ("rewritten", "matmul/scale(scores)/exp-sum/matmul", 1 / 8)

    ring = ringfx.LoopbackRing(3)
    q, k, v = _qkv()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = hand_softmax_attention(*leaves)
    ref.sum().backward()
    torch.compiler.reset()
    shard = lambda t: ringfx.shard(t, 2, group=ring)
    sharded = [shard(t).requires_grad_() for t in (q, k, v)]
    model = transform(hand_softmax_attention, mesh=ring, inputs="sharded")
    out = model(*sharded)
    out.sum().backward()
    assert [s.decision for s in model.sites] == ["rewritten"]
    torch.testing.assert_close(out, shard(ref.detach()), atol=1e-10, rtol=1e-10)
    for leaf, s in zip(leaves, sharded):
        torch.testing.assert_close(s.grad, shard(leaf.grad), atol=1e-10, rtol=1e-10)


# ----------------------------------------- normalisation before matching (normalise.py)

def _normalised(fn, *args) -> tuple[fx.GraphModule, tuple]:
    """The graph dynamo captures for ``fn(*args)`` after ``normalise_pass``, and what it
    returns on the example inputs (in its placeholders' order)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(normalise_pass(gm)[0])
        graphs.append(graphs[0](*example_inputs))
        return gm.forward

    torch.compiler.reset()
    torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)(*args)
    return graphs[0], graphs[1]


def inplace_scalings(q, k, v):
    s = q @ k.transpose(-2, -1)
    s.div_(2.0)  # result unused: later readers of s see the division
    s *= 0.5
    return torch.softmax(s, -1) @ v


def inplace_through_a_shared_view(q, k, v):
    b = q @ k.transpose(-2, -1)
    s = b.view(b.shape)
    s /= 2.0  # also divides b, which is returned
    return torch.softmax(s, -1) @ v, b


def test_inplace_arithmetic_on_the_scores_becomes_functional():
    args = _qkv()
    gm, (out,) = _normalised(inplace_scalings, *args)
    names = [op_name(n) for n in gm.graph.nodes]
    assert "div_" not in names and "imul" not in names and names.count("div") == names.count("mul") == 1
    torch.testing.assert_close(out, inplace_scalings(*args))
    (site,) = analyse(inplace_scalings, *args)
    assert site.decision == "rewritten" and site.scale == 0.25


def test_a_write_another_tensor_sees_stays_in_place():
    args = _qkv()
    gm, outs = _normalised(inplace_through_a_shared_view, *args)
    assert "itruediv" in [op_name(n) for n in gm.graph.nodes]
    for got, want in zip(outs, inplace_through_a_shared_view(*args)):
        torch.testing.assert_close(got, want)
