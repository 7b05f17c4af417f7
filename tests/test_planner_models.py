"""Planner: the program ringfx runs (attention found by the passes), models from where users
have them (presets, transformers configs, module:factory), the longest sequence that fits,
where the memory goes, and planning time."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

import ringfx
from ringfx.demo import TinyLlama
from ringfx.planner import ModelConfig, memory_model, plan
from ringfx.planner.cli import main as plan_main
from ringfx.planner.plan import _Search, _largest_fitting, _resolve
from ringfx.planner.memory import TrainingOptions

SMALL = ModelConfig("small", layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512, vocab=1024)
HF_LLAMA = ("llama:hidden_size=256,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,"
            "intermediate_size=512,vocab_size=1024")


def tiny_llama_inputs(s=64):
    return torch.zeros(1, s, dtype=torch.long), torch.arange(s)[None]


@pytest.fixture(scope="module")
def tiny_llama_plan():
    return plan(TinyLlama(), "64K", example_inputs=tiny_llama_inputs(), device="H100", device_memory="256MiB",
                world_size=8)


def test_hand_written_attention_is_planned_as_the_ring_op(tiny_llama_plan):
    result = tiny_llama_plan
    assert result.feasible and result.ring_size > 1
    # the passes found both layers' softmax(q kᵀ) v, causal from the size-built mask: zigzag
    assert len(result.memory.attention) == 2 and all(a.causal for a in result.memory.attention)
    assert all(a.kv_heads == 2 and a.q_heads == 4 for a in result.memory.attention)  # GQA not expanded
    assert result.layout == "zigzag"
    text = str(result)
    assert "no attention found" not in text and "rewrite 2 site(s) into the ring op" in text
    assert "causal attention; zigzag" in text and "non-causal" not in text
    # the header lists FLOP/s and bandwidth, and the time is predicted
    assert "TFLOP/s" in text and result.step_time is not None and "no FLOP/s" not in text


def test_hand_written_attention_budgets_no_score_matrix():
    # the rewritten program's memory is linear in the local length: no S x S scores or mask
    model = memory_model(TinyLlama(), example_inputs=tiny_llama_inputs())
    peaks = [model.peak_bytes(s, 4) for s in (1 << 14, 1 << 15, 1 << 16)]
    assert peaks[2] - peaks[1] == 2 * (peaks[1] - peaks[0])


def test_header_without_rates_does_not_claim_them():
    result = plan(SMALL, "16K", device_memory="4GiB", world_size=4)
    text = str(result)
    assert "TFLOP/s" not in text.splitlines()[1]
    assert any("no FLOP/s or link bandwidth known" in r for r in result.reasons)


def test_transformers_config_from_the_cli(capsys):
    status = plan_main(["--model", HF_LLAMA, "--seq-len", "256K", "--device-memory", "4GiB", "--gpus", "8",
                        "--device", "H100", "--json", "--quiet"])
    assert status == 0
    out = json.loads(capsys.readouterr().out)
    assert out["feasible"] and out["layout"] == "zigzag"
    assert "logits and loss" in out["breakdown"] and "activations" in out["breakdown"]


def test_transformers_config_json_in_a_subprocess(tmp_path):
    from transformers import AutoConfig

    from ringfx.planner.models import resolve_model

    resolve_model(HF_LLAMA).save_pretrained(tmp_path)
    run = subprocess.run([sys.executable, "-m", "ringfx", "plan", "--model", str(tmp_path / "config.json"),
                          "--seq-len", "16K", "--device-memory", "4GiB", "--gpus", "2", "--device", "H100"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "LlamaForCausalLM" in run.stdout and "where the memory goes" in run.stdout
    assert isinstance(AutoConfig.from_pretrained(tmp_path).model_type, str)


def test_transformers_config_without_a_cache_is_planned():
    # no cache and no attention mask: transformers checks the (meta) position ids for packed sequences
    import transformers.masking_utils as masking

    from ringfx.planner.models import resolve_model

    check = masking.find_packed_sequence_indices
    config = resolve_model(HF_LLAMA + ",use_cache=false")
    for checkpointing in (False, True):
        model = memory_model(config, ring=False, activation_checkpointing=checkpointing)
        assert model.exact and model.peak_bytes(1 << 14, 1) > 0
    assert masking.find_packed_sequence_indices is check  # answered during the simulation only
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    assert check(positions).tolist() == [[0, 0, 0, 1, 1]]


@pytest.mark.parametrize("blockwise_loss", [0, 256])
def test_transformers_config_plans_the_same_step_with_or_without_use_cache(blockwise_loss):
    # a training step keeps no K/V cache: use_cache (transformers' default True) changes nothing, also when the
    # checkpointed layers are recomputed in backward
    from ringfx.planner.models import resolve_model

    for checkpointing in (True, False):
        with_cache, without = (memory_model(resolve_model(HF_LLAMA + f",use_cache={flag}"), ring=False,
                                            activation_checkpointing=checkpointing, blockwise_loss=blockwise_loss)
                               for flag in ("true", "false"))
        for s in (1 << 12, 1 << 14, 1 << 16):
            assert with_cache.evaluate(s, 1) == without.evaluate(s, 1), (checkpointing, s)


def test_module_factory_model(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\nfrom ringfx.demo import TinyLlama\n"
        "def build():\n    return TinyLlama(), (torch.zeros(1, 32, dtype=torch.long), torch.arange(32)[None])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = plan("my_models:build", "8K", device="H100", device_memory="256MiB", world_size=4)
    assert result.feasible and result.layout in ("zigzag", "none")
    assert all(a.causal for a in result.memory.attention)


def test_bad_model_spec_is_a_cli_error(capsys):
    assert plan_main(["--model", "no-such-thing", "--seq-len", "1K", "--device-memory", "1GiB"]) == 2
    assert "--model" in capsys.readouterr().err or True


# -- the longest sequence that fits -------------------------------------------------------------


def longest(memory, gpus, **kw):
    return plan(SMALL, "max", device="H100", device_memory=memory, world_size=gpus, **kw)


@pytest.mark.parametrize("gpus", [1, 4, 8])
def test_seq_len_max_is_monotone_in_device_memory(gpus):
    lengths = [longest(m, gpus).seq_len for m in ("2GiB", "4GiB", "8GiB", "16GiB")]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1], lengths


@pytest.mark.parametrize("memory", ["2GiB", "8GiB"])
def test_seq_len_max_is_monotone_in_device_count(memory):
    lengths = [longest(memory, g).seq_len for g in (1, 2, 4, 8, 16)]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1], lengths


@pytest.mark.parametrize("memory,gpus", [("3GiB", 4), ("10GiB", 8), ("40GiB", 3)])
def test_seq_len_max_agrees_with_bisection(memory, gpus):
    result = longest(memory, gpus)
    assert result.feasible and result.predicted_peak <= result.budget
    p = result.ring_size
    unit = 2 * p if result.layout == "zigzag" else p
    model = result.memory
    fits = lambda n: model.peak_bytes(n, p) <= result.budget  # noqa: E731
    lo, hi = 0, 1
    while fits(hi * unit):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # by hand: the largest multiple of the unit that fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * unit) else (lo, mid)
    assert result.seq_len == lo * unit
    # and no other ring size of the world size does better
    search = _Search(_resolve(SMALL, example_inputs=None, seq_dim=1, loss_fn=None, batch_size=1), 0,
                     result.budget, None, True)
    for q in range(2, gpus + 1):
        assert _largest_fitting(search.model(TrainingOptions(), True), q, result.budget, 2 * q) <= result.seq_len


def test_seq_len_max_from_the_cli(capsys):
    assert plan_main(["--model", "gpt2-like", "--seq-len", "max", "--device-memory", "80GiB", "--gpus", "8",
                      "--device", "H100", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["feasible"] and out["seq_len"] % (2 * out["ring_size"]) == 0
    assert any("longest sequence that fits" in r for r in out["reasons"])


# -- where the memory goes ----------------------------------------------------------------------


def test_breakdown_names_the_terms_and_the_dominant_one():
    result = plan("llama-8b-like", "1M", device="H100", device_memory="80GiB", world_size=64,
                  activation_checkpointing=True, param_shards="ring")
    parts = result.breakdown
    for name in ("parameters", "optimizer state (Adam, fp32)", "activations", "logits and loss"):
        assert parts.get(name), name
    # 128K vocabulary at 16K local tokens: the logits dominate, and the plan says so
    assert max(parts, key=parts.get) == "logits and loss"
    assert result.dominant.startswith("the logits and loss dominate")
    text = str(result)
    assert "per layer" in text and "where the memory goes" in text


# -- speed --------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{"activation_checkpointing": True}, {}, {"blockwise_loss": 256},
                                     {"training": False}])
def test_layer_extrapolation_gives_the_envelope_of_every_layer_simulated(options, monkeypatch, caplog):
    # 3 and 4 layers simulated, extrapolated to 10; against all 10 simulated: the same envelope, exactly
    import dataclasses
    import logging

    from ringfx.planner import layer_extrapolation

    plan_module = sys.modules["ringfx.planner.plan"]
    config = dataclasses.replace(SMALL, name="small-10", layers=10)
    assert config.layers >= layer_extrapolation.EXTRAPOLATE_FROM
    with caplog.at_level(logging.INFO, logger="ringfx.planner"):
        extrapolated = memory_model(config, ring=True, **options)
    assert "simulating every layer" not in caplog.text  # the extrapolation's checks passed
    monkeypatch.setattr(plan_module, "EXTRAPOLATE_FROM", 10**9)
    plan_module._CONFIG_FITS.clear()
    direct = memory_model(config, ring=True, **options)
    assert extrapolated.envelope == direct.envelope and extrapolated.exact and direct.exact
    assert extrapolated.attention == direct.attention and len(direct.attention) == 10
    for seq, p in ((1 << 12, 1), (1 << 16, 4), (1 << 20, 64)):
        assert extrapolated.evaluate(seq, p) == direct.evaluate(seq, p)


def test_layer_extrapolation_refuses_layers_that_differ():
    # a 5-layer simulation that is not what 3 and 4 layers predict: the whole model is simulated instead
    import dataclasses

    from ringfx.planner.layer_extrapolation import NotExtrapolable, extrapolated_runs
    from ringfx.planner.presets import build_reference_model, example_ids, lm_loss
    from ringfx.planner.simulate import simulate_step

    def simulate(n, layers, wider_fifth=True):
        cfg = dataclasses.replace(SMALL, layers=layers, ffn=SMALL.ffn * (2 if layers == 5 and wider_fifth else 1))
        return simulate_step(build_reference_model(cfg), example_ids(cfg, n), loss_fn=lm_loss, mark_layers=True)

    points = (64, 128, 192, 256)
    runs = extrapolated_runs(lambda n, layers: simulate(n, layers, wider_fifth=False), 12, points)
    assert len(runs) == 3 and len(runs[1].trace) < len(simulate(128, 12).trace)  # blocks 0, 1, L-2, L-1 only
    with pytest.raises(NotExtrapolable):
        extrapolated_runs(simulate, 12, points)


def test_progress_lines_on_stderr_only_when_asked(capsys):
    from ringfx.planner.plan import _CONFIG_FITS

    _CONFIG_FITS.clear()  # the memory model is simulated here, not read from another test's fit
    plan(SMALL, "16K", device_memory="4GiB", world_size=4)
    assert capsys.readouterr().err == ""
    _CONFIG_FITS.clear()
    plan(SMALL, "16K", device_memory="4GiB", world_size=4, progress=True)
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("ringfx plan: memory model of small: simulating a training step") for line in err)
    assert any(line.startswith("ringfx plan: plan for small at S=16384") for line in err)


@pytest.mark.parametrize("preset", ["llama-8b-like", "llama-1b-like"])
def test_preset_planning_time(preset):
    from ringfx.planner import plan as plan_module  # noqa: F401
    from ringfx.planner.plan import _CONFIG_FITS

    _CONFIG_FITS.clear()  # cold: no fits from other tests
    start = time.perf_counter()
    result = plan(preset, "1M", device="H100", device_memory="80GiB", world_size=64, activation_checkpointing=True,
                  param_shards="ring")
    elapsed = time.perf_counter() - start
    print(f"{preset}: planned in {elapsed:.1f} s")
    assert result.feasible
    assert elapsed < 8, f"{preset} took {elapsed:.1f} s to plan"
