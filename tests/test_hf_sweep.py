"""CI slice of the coverage sweep (``benchmarks/hf_sweep.py``, table in docs/coverage.md).

A fixed list of transformers architectures, each built from a tiny random config (one
layer, hidden 32, no download) with one attention implementation, called zero-touch on
``ringfx.LoopbackRing(2)`` (zigzag) with an odd sequence length and compared with the
untransformed model (every float output; causal LMs with ``labels``: every parameter
gradient; float32, atol 2e-5, rtol 1e-4). Asserted: every architecture whose attention
is plain softmax self-attention has every site rewritten and is exact; every one that is
left alone names its reason (and the transform refuses it on the ring rather than run
something wrong); the summary line, as ``hf_sweep`` prints it, says so. The cases run in
one worker process per core (``ringfx.testing.map_in_processes``). Budget: about a
minute on a 2-core CPU machine.
"""

from __future__ import annotations

import time

import pytest

from ringfx.testing import map_in_processes

pytest.importorskip("transformers", reason="needs transformers (pip install transformers)")

from hf_zoo import hf_sweep  # noqa: E402  (benchmarks/hf_sweep.py, loaded once)

RING = ((2, "zigzag"),)
S = 13  # odd: the ring pads it to 16 (2P) and trims the pad on the way out
LAYERS = 1

# (architecture, attention implementation): plain softmax self-attention, rewritten and exact
EXACT = [
    # decoder LMs, called with labels (loss, logits and every parameter gradient). GPT-2 and
    # the rest of the sweep's LMs: tests/test_zero_touch_hf.py and the sweep itself (CI time)
    ("llama", "sdpa"), ("mistral", "eager"), ("mixtral", "sdpa"), ("qwen2", "eager"), ("gemma", "eager"),
    ("gemma3_text", "sdpa"), ("phi", "sdpa"), ("gpt_neox", "eager"), ("gpt_bigcode", "eager"), ("gptj", "sdpa"),
    ("codegen", "eager"), ("opt", "sdpa"), ("falcon", "eager"), ("olmo2", "eager"), ("starcoder2", "eager"),
    ("cohere", "sdpa"), ("granite", "eager"), ("glm", "sdpa"), ("nemotron", "sdpa"), ("gpt_neo", "eager"),
    ("gemma2", "eager"),  # tanh logit soft-capping, computed by the ring op's math block kernel
    # text encoders (padding mask)
    ("bert", "eager"), ("roberta", "sdpa"), ("xlm-roberta", "eager"), ("electra", "sdpa"), ("albert", "eager"),
    ("distilbert", "sdpa"), ("ernie", "eager"), ("esm", "sdpa"),
    # vision and speech encoders
    ("vit", "eager"), ("deit", "sdpa"), ("data2vec-vision", "eager"), ("vit_msn", "sdpa"), ("ijepa", "eager"),
    ("yolos", "sdpa"), ("whisper", "eager"), ("hubert", "sdpa"),
    # ALiBi as a per-key float bias sliced from a max_seq_len table
    ("mpt", "eager"),
    # ALiBi as the bias of a baddbmm on the heads folded into the batch (per key, from the mask's cumsum)
    ("bloom", "eager"),
]

# left alone on purpose: (architecture, attention implementation, words the reason must contain)
LEFT_ALONE = [
    ("openai-gpt", "eager", "the ops between w"),  # multiplicative causal mask: w * b + -1e4 * (1 - b)
    ("beit", "sdpa", "computed from parameters"),  # learned relative position bias
]

def _case(arch_attn):
    arch, attn = arch_attn
    start = time.monotonic()
    row = hf_sweep.run_case(arch, attn, rings=RING, seq_len=S, explain=False, layers=LAYERS)
    row["seconds"] = round(time.monotonic() - start, 1)
    return row


@pytest.fixture(scope="module")
def rows():
    """Every case's row, the cases spread over one worker process per core (each case
    compiles on one core; run_case catches what a case raises into its row)."""
    cases = [(arch, attn) for arch, attn in EXACT] + [(arch, attn) for arch, attn, _ in LEFT_ALONE]
    return dict(zip(cases, map_in_processes(_case, cases)))


def _exact_params():
    return [pytest.param(arch, attn, id=f"{arch}-{attn}") for arch, attn in EXACT]


def test_fixed_list_has_at_least_40_architectures():
    names = {a for a, _ in EXACT} | {a for a, _, _ in LEFT_ALONE}
    assert len(names) >= 40 and names <= set(hf_sweep.BY_NAME)


@pytest.mark.parametrize("arch,attn", _exact_params())
def test_rewritten_and_exact(rows, arch, attn):
    row = rows[arch, attn]
    assert row["status"] == "exact", f"{arch} ({attn}): {row['status']}: {row['detail']} ({row['seconds']} s)"
    assert row["sites"] >= LAYERS and row["rewritten"] == row["sites"], row


@pytest.mark.parametrize("arch,attn,reason", LEFT_ALONE, ids=[f"{a}-{b}" for a, b, _ in LEFT_ALONE])
def test_left_alone_names_its_reason(rows, arch, attn, reason):
    row = rows[arch, attn]
    assert row["status"] == "left alone", f"{arch} ({attn}): {row['status']}: {row['detail']}"
    assert row["left_alone"] and all(r and r != "(no reason)" for r in row["left_alone"]), row
    assert any(reason in r for r in row["left_alone"]), row["left_alone"]
    # refused on the ring (UnsupportedError naming the site), never run on shards unproven
    assert all(r.get("refused") or r.get("ok") for r in row["rings"].values()), row["rings"]


def test_sweep_summary(rows):
    line = hf_sweep.summary(list(rows.values()))
    print(f"\n{line}")
    assert line.startswith(f"{len({a for a, _ in rows})} architectures: ") and ", 0 failing" in line, line


def test_summary_line():
    rows = [
        {"arch": "a", "attn": "sdpa", "status": "exact", "left_alone": [], "detail": ""},
        {"arch": "a", "attn": "eager", "status": "exact", "left_alone": [], "detail": ""},
        {"arch": "b", "attn": "eager", "status": "left alone", "left_alone": ["a learned bias"], "detail": ""},
        {"arch": "c", "attn": "sdpa", "status": "mismatch", "left_alone": [], "detail": "logits: max err 0.1"},
        {"arch": "d", "attn": "sdpa", "status": "build", "left_alone": [], "detail": "no"},
    ]
    assert hf_sweep.summary(rows) == "3 architectures: 1 rewritten and exact, 1 left alone (b: a learned bias), 1 failing (c)"
