"""Running the suite on several workers (``pytest -n 2 --dist loadgroup``, as CI does).

A fixture of module or class scope is built once per worker that runs a test using it:
the expensive ones (a whole matrix of cases computed up front, a gloo spawn whose rows
several tests read) would be built on every worker. Every test that uses such a
fixture is put in one ``xdist_group`` named after its module, so ``--dist loadgroup``
sends them to one worker and the fixture is built once; the other tests are spread one
by one. Those groups, and the tests that spawn real rings (``@pytest.mark.gloo``), are
the longest: they are collected first, so that no worker is left with one of them at
the end while the others idle. Without xdist the marks do nothing and only the order
changes.

Each test process computes on one thread (``torch.set_num_threads(1)``, and
``OMP_NUM_THREADS=1`` for the processes it starts): the suite's tensors are small, and
OpenMP's threads, waiting at every op's barrier for a core that another worker or rank
holds, multiplied the CPU time of the loopback tests about tenfold on a busy 2-core machine.
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


def pytest_configure(config):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    first, rest = [], []
    for item in items:
        module = _shared_fixture_module(item)
        if module is not None:
            item.add_marker(pytest.mark.xdist_group(module))
        (first if module is not None or item.get_closest_marker("gloo") else rest).append(item)
    items[:] = first + rest
