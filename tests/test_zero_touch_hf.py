"""Zero-touch sharding of Hugging Face transformers models.

On a ring of P > 1 ranks, ``model = ringfx.transform(model)`` (default process group,
or ``mesh=``) is called with exactly the inputs the untransformed model takes — full
length, identical on every rank — and returns what the untransformed model returns
(full-length logits / hidden states, the pooled vector, the same loss); after
``loss.backward()`` every rank's parameter gradients equal the single-process ones.

Every case builds a tiny random model (``hf_zoo``), runs it untransformed for the
reference (outputs, and for causal LMs with labels every parameter's gradient), then
transformed on the same parameters and inputs, and compares every floating-point
tensor of the output and every gradient (atol 2e-5, rtol 1e-4, float32).

* real gloo rings (``@pytest.mark.gloo``): one spawn per ring size (2, 3) runs a matrix
  covering every model; each model meets both attention implementations and both
  layouts (the ring of 3 runs the other pair); LLaMA also at a prime length (both rings)
  and checkpointed in train mode (ring of 2); every rank compares its own outputs and
  gradients with the untransformed model in the same process and reports each case;
* loopback rings (``ringfx.LoopbackRing(P)``): every model at P = 2 (contiguous) and
  P = 3 (zigzag) with the attention implementation alternating, less the cases the gloo
  matrix runs with the same model, implementation, ring size, layout and length (the
  same rank program, driven by real processes there; ``RINGFX_ZT_FULL=1``: every model
  x both implementations x both rings); LLaMA with gradient checkpointing in train mode,
  with S = 1 + a multiple of P, and with a prime S. They run in one worker process per
  core (``ringfx.testing.map_in_processes``), each reporting its row.

Checking the harness itself: ``RINGFX_ZT_SELFCHECK=1`` replaces ``ringfx.transform`` by
the identity (every case must pass, on every rank); ``RINGFX_ZT_SELFCHECK=compile`` by
``torch.compile(model, backend="eager")`` (the same, with dynamo's tracing cost, a proxy
for the transform's compile time); ``RINGFX_ZT_SELFCHECK=broken`` by a wrong model (every
case must fail, with a table, and no hang).
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
import warnings

import pytest
import torch

import ringfx
from ringfx.testing import gradient_errors, map_in_processes, max_abs_error

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install transformers)")

import hf_zoo  # noqa: E402  (needs transformers)

ATOL, RTOL = 2e-5, 1e-4
S = 24  # divisible by P and 2P for P = 2, 3 (both layouts); apart from every model dim
SELFCHECK = os.environ.get("RINGFX_ZT_SELFCHECK", "")
GLOO_TIMEOUT = 60  # seconds: a hang on the ring raises instead of stalling the suite
GLOO_BUDGET = 400  # seconds per spawn: cases left when it is spent are reported as not run


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch.compiler.reset()


def transform(model, mesh, layout, selfcheck=SELFCHECK):
    """``ringfx.transform`` (``mesh=None``: the default process group), or its stand-in
    for checking the harness."""
    if selfcheck == "1":
        return model
    if selfcheck == "compile":
        return torch.compile(model, backend="eager", dynamic=False)
    if selfcheck == "broken":
        return _Broken(model)
    if selfcheck:
        raise ValueError(f"RINGFX_ZT_SELFCHECK={selfcheck!r}: use 1, compile or broken")
    return ringfx.transform(model, mesh, layout=layout)


class _Broken(torch.nn.Module):
    """RINGFX_ZT_SELFCHECK=broken: the harness must catch this. The last rank (every
    loopback case) gets its first float output off by 1e-3; Whisper raises on rank 0 only
    (the other ranks must not hang, and the cases after it must still run)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if "input_features" in kwargs and rank == 0:
            raise RuntimeError("broken on purpose")
        out = self.module(**kwargs)
        if rank == world - 1:
            first = next(iter(hf_zoo.float_outputs(out)))
            out[first] = out[first] + 1e-3
        return out


def _close(a, b) -> bool:
    return a.shape == b.shape and torch.allclose(a.detach(), b.detach(), rtol=RTOL, atol=ATOL)


def case_name(name, attn, layout, world, seq_len=S, checkpointing=False):
    extra = (f"-S{seq_len}" if seq_len != S else "") + ("-ckpt" if checkpointing else "")
    return f"{name}-{attn}-P{world}-{layout}{extra}"


def check(name, attn, layout, mesh, world, *, seq_len=S, checkpointing=False, rank=0, selfcheck=SELFCHECK):
    """Run one case; return ``{"case", "rank", "ok", "errors": {output: max abs err},
    "problems": [str]}``. Exceptions propagate (the caller decides)."""
    model, inputs, kind = hf_zoo.build(name, attn, seq_len)
    if checkpointing:
        # transformers 5.x: gradient_checkpointing_enable is a deprecated alias
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        assert model.model.gradient_checkpointing
        model.train()
    params = dict(model.named_parameters())

    ref = model(**{k: v.clone() for k, v in inputs.items()})
    ref_out = {k: v.detach().clone() for k, v in hf_zoo.float_outputs(ref).items()}
    ref_grads = {}
    if kind == "loss":
        ref.loss.backward()
        ref_grads = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}
        model.zero_grad(set_to_none=True)
    ref_type = type(ref)
    del ref

    ring_model = transform(model, mesh, layout, selfcheck)
    with warnings.catch_warnings(record=True) as caught:
        # ringfx's notes (e.g. "exact, but not sharded") are recorded, not failures: the
        # numbers decide (the suite's filter would turn them into errors)
        warnings.simplefilter("always", ringfx.RingfxWarning)
        out = ring_model(**{k: v.clone() for k, v in inputs.items()})
        got = hf_zoo.float_outputs(out)
        if kind == "loss" and "loss" in got:
            got["loss"].backward()
    notes = sorted({str(w.message).splitlines()[0][:300] for w in caught
                    if issubclass(w.category, ringfx.RingfxWarning)})

    errors, problems = {}, []
    if type(out) is not ref_type:
        problems.append(f"returned {type(out).__name__}, expected {ref_type.__name__}")
    if sorted(got) != sorted(ref_out):
        problems.append(f"float outputs {sorted(got)}, expected {sorted(ref_out)}")
    for k, r in ref_out.items():
        if k not in got:
            continue
        errors[k] = max_abs_error(got[k], r)
        if not _close(got[k], r):
            problems.append(f"{k}: max abs err {errors[k]:.3g}"
                            + (f" (shape {tuple(got[k].shape)}, expected {tuple(r.shape)})"
                               if got[k].shape != r.shape else ""))
    if kind == "loss":
        if "loss" not in got:
            problems.append("no loss to backpropagate")
        else:
            worst, errors["grads"], bad = gradient_errors(params, ref_grads, rtol=RTOL, atol=ATOL)
            if bad:
                problems.append(f"grads of {len(bad)}/{len(ref_grads)} params differ (worst {worst}: "
                                f"{errors['grads']:.3g}): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    return {"case": case_name(name, attn, layout, world, seq_len, checkpointing), "rank": rank,
            "ok": not problems, "errors": errors, "problems": problems, "warnings": notes}


def _describe(r) -> str:
    errs = " ".join(f"{k}={v:.2g}" for k, v in r["errors"].items())
    line = f"{r['case']:<36} rank {r['rank']}  {'ok  ' if r['ok'] else 'FAIL'}  {errs}  {'; '.join(r['problems'])}"
    return line + "".join(f"\n    ringfx warning: {w}" for w in r.get("warnings", ()))


def _assert_ok(r):
    assert r["ok"], _describe(r)
    if r["warnings"]:
        print(_describe(r))


# ---- the two matrices ----------------------------------------------------------------

def gloo_cases(world):
    """(name, attn, layout, seq_len[, checkpointing]) for a ring of ``world``: every
    model once, the attention implementation and the layout alternating and shifted by
    ring size (the rings of 2 and 3 run each model with opposite implementations and
    layouts, so every model meets both of each); LLaMA at a prime length, and (ring of 2)
    checkpointed in train mode."""
    cases, shift = [], world % 2
    for i, name in enumerate(hf_zoo.MODELS):
        cases.append((name, ("sdpa", "eager")[(i + shift) % 2], ("contiguous", "zigzag")[(i // 2 + shift) % 2], S))
    cases.append(("llama", "sdpa", "zigzag", 23))
    if world == 2:
        cases.append(("llama", "eager", "zigzag", S, True))  # checkpointed, train mode
    return cases


# ---- loopback rings -------------------------------------------------------------------

LOOPBACK_RINGS = [(2, "contiguous"), (3, "zigzag")]


def loopback_cases(full=os.environ.get("RINGFX_ZT_FULL") == "1"):
    """(name, attn, world, layout): every model at both rings, its attention
    implementation alternating between them, less the cases ``gloo_cases`` runs on a
    real ring of the same size (the same rank program; CI time). RINGFX_ZT_FULL=1: every
    model x {sdpa, eager} x both rings, none left out."""
    cases = []
    for i, name in enumerate(hf_zoo.MODELS):
        for j, (world, layout) in enumerate(LOOPBACK_RINGS):
            attns = ("sdpa", "eager") if full else (("sdpa", "eager")[(i + j) % 2],)
            cases += [(name, attn, world, layout) for attn in attns]
    if full:
        return cases
    on_gloo = {(name, attn, world, layout) for world, _ in LOOPBACK_RINGS
               for name, attn, layout, seq_len, *checkpointed in gloo_cases(world)
               if seq_len == S and not any(checkpointed)}
    return [c for c in cases if c not in on_gloo]


UNEVEN = [  # (P, layout, attn, S): S = 1 + a multiple of P, and prime S
    (2, "contiguous", "sdpa", 21), (3, "zigzag", "eager", 25),
    (2, "zigzag", "eager", 23), (3, "contiguous", "sdpa", 19),
]


def _raised(e, case) -> dict:
    """A case that raised, as a failing row (where, and the exception's first line)."""
    where = traceback.extract_tb(e.__traceback__)[-1]
    return {"case": case, "rank": 0, "ok": False, "errors": {}, "warnings": [],
            "problems": [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                         f"[{os.path.basename(where.filename)}:{where.lineno}]"]}


def _loopback_case(case):
    """One loopback case, ``(name, attn, world, layout, seq_len, checkpointing)``, in a
    worker process: its row, failing with the exception if it raised."""
    name, attn, world, layout, seq_len, checkpointing = case
    torch.compiler.reset()
    try:
        return check(name, attn, layout, ringfx.LoopbackRing(world), world, seq_len=seq_len,
                     checkpointing=checkpointing)
    except Exception as e:  # noqa: BLE001  (reported as the case's failure)
        return _raised(e, case_name(name, attn, layout, world, seq_len, checkpointing))


LOOPBACK = ([(name, attn, world, layout, S, False) for name, attn, world, layout in loopback_cases()]
            + [("llama", "sdpa", world, layout, S, True) for world, layout in LOOPBACK_RINGS]
            + [("llama", attn, world, layout, seq_len, False) for world, layout, attn, seq_len in UNEVEN])


@pytest.fixture(scope="module")
def loopback():
    """Every loopback case's row, the cases spread over one worker process per core
    (each compiles on one core)."""
    return dict(zip(LOOPBACK, map_in_processes(_loopback_case, LOOPBACK)))


@pytest.mark.parametrize("name,attn,world,layout", loopback_cases(),
                         ids=[f"{n}-{a}-P{p}-{lay}" for n, a, p, lay in loopback_cases()])
def test_loopback(loopback, name, attn, world, layout):
    _assert_ok(loopback[name, attn, world, layout, S, False])


@pytest.mark.parametrize("world,layout", LOOPBACK_RINGS, ids=[f"P{p}-{lay}" for p, lay in LOOPBACK_RINGS])
def test_loopback_llama_gradient_checkpointing_train_mode(loopback, world, layout):
    _assert_ok(loopback["llama", "sdpa", world, layout, S, True])


@pytest.mark.parametrize("world,layout,attn,seq_len", UNEVEN, ids=[f"P{p}-{lay}-{a}-S{s}" for p, lay, a, s in UNEVEN])
def test_loopback_llama_uneven_length(loopback, world, layout, attn, seq_len):
    _assert_ok(loopback["llama", attn, world, layout, seq_len, False])


# ---- real gloo rings -------------------------------------------------------------------

def _ring_matrix(rank, world, cases, selfcheck):
    """Inside a spawned rank: run every case on the default process group; a case that
    raises on any rank is reported and the following cases run on a fresh group (the
    default one may hold unmatched transfers)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=GLOO_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=timeout)
    mesh, start, results = None, time.monotonic(), []
    for name, attn, layout, seq_len, *checkpointed in cases:
        checkpointing = bool(checkpointed and checkpointed[0])
        elapsed = [None] * world
        dist.all_gather_object(elapsed, time.monotonic() - start, group=control)
        if max(elapsed) > GLOO_BUDGET:
            results.append({"case": case_name(name, attn, layout, world, seq_len, checkpointing), "rank": rank,
                            "ok": False, "warnings": [], "errors": {},
                            "problems": [f"not run: the {GLOO_BUDGET} s budget is spent"]})
            continue
        torch.compiler.reset()
        try:
            r = check(name, attn, layout, mesh, world, seq_len=seq_len, checkpointing=checkpointing, rank=rank,
                      selfcheck=selfcheck)
            raised = None
        except Exception as e:  # noqa: BLE001  (reported per case and rank)
            r = {**_raised(e, case_name(name, attn, layout, world, seq_len, checkpointing)), "rank": rank}
            raised = r["problems"][0]
        r["group"] = "default" if mesh is None else "fresh"
        everyone = [None] * world
        dist.all_gather_object(everyone, raised, group=control)
        if any(everyone):
            mesh = dist.new_group(backend="gloo", timeout=timeout)
            if raised is None:
                r["ok"] = False
                r["problems"].append(f"ranks {[i for i, x in enumerate(everyone) if x]} raised")
        results.append(r)
    return results


@pytest.mark.gloo
@pytest.mark.parametrize("world", [2, 3])
def test_gloo_ring(world):
    from ringfx.testing import spawn_gloo

    cases = gloo_cases(world)
    per_rank = spawn_gloo(world, _ring_matrix, cases, SELFCHECK, timeout=GLOO_TIMEOUT)
    rows = [r for results in per_rank for r in (results or [])]
    missing = [rank for rank, results in enumerate(per_rank) if results is None or len(results) != len(cases)]
    failures = [r for r in rows if not r["ok"]]
    table = "\n".join(_describe(r) for r in sorted(failures, key=lambda r: (r["case"], r["rank"])))
    ok_cases = {r["case"] for r in rows} - {r["case"] for r in failures}
    print(f"\nring of {world}: {len(ok_cases)}/{len(cases)} cases pass on every rank")
    if failures:
        print(table)
    for case in sorted({r["case"] for r in rows if r.get("warnings")}):
        print(f"{case}: ringfx warnings: {sorted({w for r in rows if r['case'] == case for w in r['warnings']})}")
    assert not missing, f"ranks {missing} returned no (or incomplete) results"
    assert not failures, f"{len({r['case'] for r in failures})}/{len(cases)} cases fail on some rank:\n{table}"
