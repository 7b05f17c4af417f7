"""``ringfx.explain`` next to other compiled models, and the command line
(``python -m ringfx demo`` / ``plan``): argument errors name the flags."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import ringfx
from zoo import TwoGraphs


class OneAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, x):
        q = self.proj(x).view(2, -1, 2, 4).transpose(1, 2)
        return torch.softmax(q @ q.transpose(-2, -1) / 2.0, dim=-1) @ q


def _x(s=8):
    return torch.randn(2, s, 8, dtype=torch.float64)


# --------------------------------------------------------------------- explain

def test_explain_leaves_other_compiled_models_alone():
    """A transformed model keeps its compiled graphs across explain calls of other
    models and of itself: its reports do not grow and its backend is not called again."""
    torch.manual_seed(0)
    x = _x()
    model_a = TwoGraphs()
    ring_a = ringfx.transform(model_a, mesh=ringfx.LoopbackRing(1))
    ref = ring_a(x)
    assert len(ring_a.reports) == 2 and len(ring_a.sites) == 2

    report_b = ringfx.explain(OneAttention(), x)
    report_a = ringfx.explain(ring_a, x)
    report_a_plain = ringfx.explain(model_a, x)
    assert len(report_b.sites) == 1
    assert len(report_a.sites) == len(report_a_plain.sites) == 2
    assert report_a.graph_breaks and report_a_plain.graph_breaks

    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile of A raises
        torch.testing.assert_close(ring_a(x), ref)
    assert len(ring_a.reports) == 2 and len(ring_a.sites) == 2


def test_explain_twice_reports_the_same_and_leaves_no_cache_entries():
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    class Fresh(TwoGraphs):  # code objects no other test compiles
        def forward(self, x):
            x = self.attend(self.a, x)
            torch._dynamo.graph_break()
            return self.attend(self.b, x)

    m = Fresh()
    x = _x()
    first, second = ringfx.explain(m, x), ringfx.explain(m, x)
    assert str(first) == str(second) and len(first.rewritten) == 2 and len(first.graph_breaks) == 1
    assert _debug_get_cache_entry_list(Fresh.forward.__code__) == []


def test_explain_many_times_stays_within_the_recompile_limit():
    m = OneAttention()
    for _ in range(torch._dynamo.config.recompile_limit + 2):
        assert len(ringfx.explain(m, _x()).rewritten) == 1


@pytest.mark.parametrize("model", [42, "model", None])
def test_explain_rejects_a_model_that_is_not_callable(model):
    with pytest.raises(TypeError, match=r"explain\(model=\.\.\.\).*" + type(model).__name__):
        ringfx.explain(model, _x())


# ------------------------------------------------------------------ command line

def _cli_error(argv, capsys) -> str:
    """Run ``python -m ringfx <argv>`` in-process; it must fail with exit status 2 (an
    argument error) before doing any work. Returns its stderr."""
    from ringfx.__main__ import main

    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    assert status == 2, (status, captured)
    assert "OK" not in captured.out
    return captured.err


@pytest.mark.parametrize("ranks", ["0", "-1"])
def test_demo_refuses_an_empty_ring(ranks, capsys):
    err = _cli_error(["demo", "--ranks", ranks], capsys)
    assert "argument --ranks" in err and "at least 1" in err


@pytest.mark.parametrize("seq_len", ["0", "many"])
def test_demo_refuses_a_sequence_of_no_tokens(seq_len, capsys):
    err = _cli_error(["demo", "--seq-len", seq_len], capsys)
    assert "argument --seq-len" in err


PLAN = ["plan", "--model", "gpt2-like", "--seq-len", "64K", "--device", "H100", "--gpus", "8"]


def test_plan_device_memory_needs_a_unit(capsys):
    err = _cli_error(PLAN + ["--device-memory", "80"], capsys)
    assert "argument --device-memory" in err and "no unit" in err and "80GiB" in err
    assert "device_memory" not in err


@pytest.mark.parametrize("unit, expected", [("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("0.5TiB", 2**39)])
def test_plan_device_memory_with_a_unit_is_that_many_bytes(unit, expected, capsys):
    import json

    from ringfx.__main__ import main

    assert main(PLAN + ["--device-memory", unit, "--json", "--headroom", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["budget_bytes"] == expected


def test_plan_help_says_what_a_bare_number_means(capsys):
    from ringfx.__main__ import main

    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--device-memory" in text and "a bare number is refused" in text


@pytest.mark.parametrize("argv, flag", [
    (["--seq-len", "lots"], "--seq-len"),
    (["--seq-len", "0"], "--seq-len"),
    (["--gpus", "0"], "--gpus"),
    (["--flops", "fast"], "--flops"),
    (["--bandwidth", "-3GB/s"], "--bandwidth"),
    (["--headroom", "1.5"], "--headroom"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_plan_errors_name_the_flag(argv, flag, capsys):
    args = ["plan", "--model", "gpt2-like", "--seq-len", "64K", "--device-memory", "80GiB", "--device", "H100"]
    err = _cli_error(args + argv, capsys)
    assert f"argument {flag}:" in err
    for internal in ("parse_seq_len", "parse_bytes", "parse_rate", "seq_len=", "device_memory=", "world_size="):
        assert internal not in err


def test_plan_without_device_memory_names_the_flag(capsys):
    if torch.cuda.is_available():
        pytest.skip("with a CUDA device the planner reads --device-memory from it, so it is never missing")
    err = _cli_error(["plan", "--model", "gpt2-like", "--seq-len", "64K"], capsys)
    assert "--device-memory is required" in err and "device_memory" not in err


def test_plan_errors_from_the_planner_use_flag_names():
    from ringfx.planner.cli import _in_flags

    assert _in_flags("device memory is unknown: pass device_memory='80GiB'") == \
        "device memory is unknown: pass --device-memory '80GiB'"
    assert _in_flags("seq_len=7 is not divisible; give flops= and bandwidth=") == \
        "--seq-len 7 is not divisible; give --flops and --bandwidth"


def test_plan_shows_progress_on_stderr_only(capsys):
    import json

    from ringfx.__main__ import main

    # fits are kept per (config, batch size) for the process: a batch size no other test plans
    argv = PLAN + ["--device-memory", "80GiB", "--batch-size", "3"]
    assert main(argv + ["--json"]) == 0
    captured = capsys.readouterr()
    assert "ringfx plan: memory model of gpt2-like: simulating a training step" in captured.err
    assert "done (" in captured.err
    json.loads(captured.out)  # stdout holds the JSON alone
    assert main(PLAN + ["--device-memory", "80GiB", "--batch-size", "5", "--quiet"]) == 0
    assert "simulating" not in capsys.readouterr().err


def test_version_is_the_installed_one_and_the_pyprojects():
    import importlib.metadata
    import pathlib
    import re

    pyproject = (pathlib.Path(ringfx.__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert ringfx.__version__ == re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert ringfx.__version__ == importlib.metadata.version("ringfx")
