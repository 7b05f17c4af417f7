"""Running the suite on several workers (``pytest -n 2 --dist loadgroup``, as CI does).

A fixture of module or class scope is built once per worker that runs a test using it:
the expensive ones (a whole matrix of cases computed up front, a gloo spawn whose rows
several tests read) would be built on every worker. Every test that uses such a
fixture is put in one ``xdist_group`` named after its module, so ``--dist loadgroup``
sends them to one worker and the fixture is built once; the other tests are spread one
by one. Those groups, and the tests that spawn real rings (``@pytest.mark.gloo``), are
the longest: they are collected first, the ones measured longest (``LONGEST``) first of
all, and xdist's own reordering of groups by their number of tests is turned off, so
that no worker is left with one of them at the end while the others idle. Without xdist
the marks do nothing and only the order changes.

Each test process computes on one thread (``torch.set_num_threads(1)``, and
``OMP_NUM_THREADS=1`` for the processes it starts): the suite's tensors are small, and
OpenMP's threads, waiting at every op's barrier for a core that another worker or rank
holds, multiplied the CPU time of the loopback tests about tenfold on a busy 2-core machine.

The processes of ``ringfx.testing.spawn_gloo`` and ``map_in_processes`` are forked from a
server that imports ``ringfx.testing.PRELOAD`` once; the suite adds transformers' model
code to it (``TRANSFORMERS_PRELOAD``): importing transformers' modeling machinery cost
each process that builds a transformers model ~2.5 CPU-s (a dozen such processes per run).
"""

from __future__ import annotations

import inspect
import os
import pathlib

import pytest
import torch

_TESTS = pathlib.Path(__file__).resolve().parent
_SHARED_SCOPES = ("module", "class", "package", "session")


def _shared_fixture_module(item) -> str | None:
    """The module name when ``item`` uses a fixture of the suite's own (not a plugin's)
    that is built once per module, class, package or session; else None."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    for defs in info.name2fixturedefs.values():
        fixturedef = defs[-1]
        if fixturedef.scope in _SHARED_SCOPES and _TESTS in pathlib.Path(inspect.getfile(fixturedef.func)).parents:
            return item.module.__name__
    return None


# transformers' modeling machinery (the first model module pulls in most of it) and the
# models of tests/hf_zoo.py; a module that is not installed is skipped
TRANSFORMERS_PRELOAD = ("transformers.modeling_utils",) + tuple(
    f"transformers.models.{m}.modeling_{m}" for m in
    ("llama", "mistral", "qwen2", "gemma3", "gemma2", "phi3", "gpt_neox", "gpt2", "olmo2", "bert", "roberta", "vit",
     "whisper"))


def pytest_configure(config):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import ringfx.testing

    ringfx.testing.PRELOAD = tuple(dict.fromkeys(ringfx.testing.PRELOAD + TRANSFORMERS_PRELOAD))
    if hasattr(config.option, "loadscopereorder"):
        # --dist loadgroup would send the groups out by their number of tests (the planner's
        # seven quick tests before the longest ring); the order below is by expected cost
        config.option.loadscopereorder = False


# The longest items (CPU-seconds of one run on a 2-core machine, cold inductor cache;
# a group counts as one item): collected first, longest first, so that the two workers
# start on them together and the many short tests fill in at the end (the last long
# test started late had one worker idle for half a minute). A node id, or a module name
# for an xdist group.
LONGEST = {
    "tests/test_zero_touch_hf.py::test_gloo_ring[3]": 80,
    "tests/test_zero_touch_hf.py::test_gloo_ring[2]": 50,
    "test_hf_sweep": 50,
    "test_zero_touch_hf": 45,
    "tests/test_flex.py::test_explain_and_untransformed_flex_forward": 39,
    "tests/test_zero_touch.py::test_zero_touch_with_a_compiling_inner_compiler[inductor]": 31,
    "tests/test_transform.py::test_zoo_gloo_ring[4]": 29,
    "tests/test_zero_touch.py::test_zero_touch_on_real_gloo_ring_every_rank[3-contiguous]": 21,
    "tests/test_flex.py::test_transformers_flex_llama_on_a_gloo_ring": 18,
    "tests/test_zero_touch.py::test_zero_touch_on_real_gloo_ring_every_rank[2-zigzag]": 15,
    "tests/test_transform.py::test_zoo_gloo_ring[2]": 13,
    "tests/test_hf_models.py::test_llama_on_a_real_gloo_ring": 10,
    "tests/test_relative_bias.py::test_table_compiles_as_one_opaque_node[inductor]": 9,
    "tests/test_planner_models.py::test_transformers_config_json_in_a_subprocess": 8,
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    first, rest, cost = [], [], {}
    for item in items:
        module = _shared_fixture_module(item)
        if module is not None:
            item.add_marker(pytest.mark.xdist_group(module))
        cost[item] = LONGEST.get(item.nodeid, LONGEST.get(module, 0))
        (first if module is not None or item.get_closest_marker("gloo") else rest).append(item)
    items[:] = sorted(first, key=lambda item: -cost[item]) + sorted(rest, key=lambda item: -cost[item])
