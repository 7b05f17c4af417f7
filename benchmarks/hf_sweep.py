"""Coverage sweep: ringfx on every transformers architecture that builds from a tiny
random config (no download), with each attention implementation it offers.

For each (architecture, attention implementation):

* ``ringfx.explain``: the attention sites found, rewritten, and left alone (with reason);
* the zero-touch call ``ringfx.transform(model, mesh=ringfx.LoopbackRing(P), layout=...)``
  with exactly the untransformed model's inputs (full length, odd S) on P = 2 contiguous
  and P = 3 zigzag, compared with the untransformed model: every floating-point output,
  and for causal LMs called with ``labels`` every parameter's gradient after
  ``loss.backward()`` (float32, atol 2e-5, rtol 1e-4).

Each row is classified:

  ``exact``      every site rewritten, every ring's outputs (and gradients) match;
  ``left alone`` some site left alone (its reason printed), the transform refuses
                 (UnsupportedError) or, if it ran, still matched;
  ``no attention`` no site found (nothing to shard; the model ran unchanged);
  ``mismatch``   wrong numbers under the zero-touch call (max error printed);
  ``error``      an exception (its first line);
  ``build``      the model did not build / run untransformed at all (not counted).

    python benchmarks/hf_sweep.py                       # every architecture, sdpa and eager
    python benchmarks/hf_sweep.py --only llama,bert --attn sdpa
    python benchmarks/hf_sweep.py --attn flex_attention   # every architecture that offers flex
    python benchmarks/hf_sweep.py --json benchmarks/results/hf_sweep.json --doc docs/coverage.md

``tests/test_hf_sweep.py`` imports ``ARCHS``, ``build`` and ``run_case`` from here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ringfx.testing import float_outputs, gradient_errors, max_abs_error

ATOL, RTOL = 2e-5, 1e-4
S_DEFAULT = 13  # odd: padded to 14 (P = 2) and 18 (P = 3, zigzag); apart from every model dim
RINGS = ((2, "contiguous"), (3, "zigzag"))

# Model dims, kept apart from the test lengths (dynamo specialises equal sizes).
VOCAB = 96
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS  # 8
INTER = 64
LAYERS = 2
BATCH = 2
PAD = 3  # right-padded tokens of row 1 (text models)
PAD_ID = 0
MAX_POS = 128

# Every name a config may call these by; set only where the config has the attribute.
_GENERIC = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN, "embed_dim": HIDDEN, "dim": HIDDEN,
    "intermediate_size": INTER, "ffn_dim": INTER, "n_inner": INTER, "encoder_ffn_dim": INTER,
    "decoder_ffn_dim": INTER, "hidden_dim": INTER, "moe_intermediate_size": INTER // 2,
    "shared_expert_intermediate_size": INTER,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS,
    "encoder_layers": LAYERS, "decoder_layers": LAYERS,
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS, "encoder_attention_heads": HEADS,
    "decoder_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "max_position_embeddings": MAX_POS, "n_positions": MAX_POS, "max_seq_len": MAX_POS, "n_ctx": MAX_POS,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "pad_token_id": PAD_ID, "bos_token_id": 1, "eos_token_id": 2,
    "use_cache": False,
}


@dataclass(frozen=True)
class Arch:
    """One architecture: ``model_type`` (transformers' name), ``family`` (``causal``: a
    ...ForCausalLM called with labels; ``encoder``: the bare ...Model; ``vision``:
    pixel_values; ``speech``: raw audio ``input_values``; ``whisper``: the Whisper-style
    encoder with ``input_features``), config ``overrides``, the model class (default: the
    Auto class of the family) and a ``note`` for the table."""

    name: str
    model_type: str
    family: str
    overrides: dict = field(default_factory=dict)
    model_cls: Optional[str] = None  # "transformers.X" or "module:Class"
    note: str = ""
    attns: tuple = ("sdpa", "eager")


def _vis(**kw):
    # one row of patches: S = n patches (+ CLS); image (PATCH, PATCH * n)
    return dict(patch_size=2, num_channels=3, **kw)


ARCHS: list[Arch] = [
    # --- decoder LMs (…ForCausalLM with labels)
    Arch("llama", "llama", "causal"),
    Arch("mistral", "mistral", "causal", {"sliding_window": 5}, note="sliding window 5"),
    Arch("mixtral", "mixtral", "causal", {"sliding_window": None}, note="MoE"),
    Arch("qwen2", "qwen2", "causal"),
    Arch("qwen2_moe", "qwen2_moe", "causal", note="MoE"),
    Arch("qwen3", "qwen3", "causal"),
    Arch("qwen3_moe", "qwen3_moe", "causal", note="MoE"),
    Arch("gemma", "gemma", "causal"),
    Arch("gemma2", "gemma2", "causal", {"sliding_window": 7, "query_pre_attn_scalar": HEAD_DIM},
         note="logit soft-capping, sliding window"),
    Arch("gemma3_text", "gemma3_text", "causal",
         {"sliding_window": 7, "layer_types": ["sliding_attention", "full_attention"],
          "query_pre_attn_scalar": HEAD_DIM}),
    Arch("phi", "phi", "causal", {"partial_rotary_factor": 0.5}),
    Arch("phi3", "phi3", "causal", {"original_max_position_embeddings": MAX_POS}),
    Arch("gpt_neox", "gpt_neox", "causal", {"rotary_pct": 0.5}),
    Arch("gpt2", "gpt2", "causal"),
    Arch("gpt_bigcode", "gpt_bigcode", "causal", note="multi-query"),
    Arch("gptj", "gptj", "causal", {"rotary_dim": 4}),
    Arch("gpt_neo", "gpt_neo", "causal", {"attention_types": [[["global", "local"], 1]], "window_size": 5},
         note="local attention layer"),
    Arch("codegen", "codegen", "causal", {"rotary_dim": 4}),
    Arch("opt", "opt", "causal", {"word_embed_proj_dim": HIDDEN}),
    Arch("bloom", "bloom", "causal", note="ALiBi"),
    Arch("falcon", "falcon", "causal", {"new_decoder_architecture": False, "multi_query": True}),
    Arch("mpt", "mpt", "causal", {"expansion_ratio": 2}, note="ALiBi"),
    Arch("olmo", "olmo", "causal"),
    Arch("olmo2", "olmo2", "causal"),
    Arch("gpt_oss", "gpt_oss", "causal", {"num_local_experts": 2, "num_experts_per_tok": 1, "intermediate_size": 32,
                                          "experts_implementation": "batched_mm", "sliding_window": 7,
                                          "layer_types": ["sliding_attention", "full_attention"]},
         note="attention sinks, sliding/full layers, MoE", attns=("eager",)),  # transformers: no sdpa for it
    Arch("llama4_text", "llama4_text", "causal", {"attention_chunk_size": 4, "num_local_experts": 1, "num_experts_per_tok": 1,
                                                  "interleave_moe_layer_step": 3, "no_rope_layers": [1, 0],
                                                  "intermediate_size_mlp": 64},
         model_cls="transformers.Llama4ForCausalLM", note="chunked local attention"),
    Arch("olmoe", "olmoe", "causal", note="MoE"),
    Arch("stablelm", "stablelm", "causal", {"partial_rotary_factor": 0.5}),
    Arch("starcoder2", "starcoder2", "causal", {"sliding_window": None}),
    Arch("cohere", "cohere", "causal"),
    Arch("cohere2", "cohere2", "causal", {"sliding_window": 7, "layer_types": ["sliding_attention", "full_attention"]}),
    Arch("granite", "granite", "causal"),
    Arch("persimmon", "persimmon", "causal", {"partial_rotary_factor": 0.5}),
    Arch("helium", "helium", "causal"),
    Arch("glm", "glm", "causal"),
    Arch("glm4", "glm4", "causal"),
    Arch("smollm3", "smollm3", "causal"),
    Arch("nemotron", "nemotron", "causal", {"partial_rotary_factor": 0.5}),
    Arch("biogpt", "biogpt", "causal"),
    Arch("xglm", "xglm", "causal"),
    Arch("ernie4_5", "ernie4_5", "causal"),
    Arch("seed_oss", "seed_oss", "causal"),
    Arch("exaone4", "exaone4", "causal", {"sliding_window": 7, "layer_types": ["sliding_attention", "full_attention"]}),
    Arch("openai-gpt", "openai-gpt", "causal"),
    Arch("ctrl", "ctrl", "causal"),
    # --- text encoders (…Model)
    Arch("bert", "bert", "encoder"),
    Arch("roberta", "roberta", "encoder", {"max_position_embeddings": MAX_POS + 2}),
    Arch("xlm-roberta", "xlm-roberta", "encoder", {"max_position_embeddings": MAX_POS + 2}),
    Arch("camembert", "camembert", "encoder", {"max_position_embeddings": MAX_POS + 2}),
    Arch("data2vec-text", "data2vec-text", "encoder", {"max_position_embeddings": MAX_POS + 2}),
    Arch("electra", "electra", "encoder", {"embedding_size": HIDDEN}),
    Arch("albert", "albert", "encoder", {"embedding_size": 16}),
    Arch("distilbert", "distilbert", "encoder"),
    Arch("megatron-bert", "megatron-bert", "encoder"),
    Arch("ernie", "ernie", "encoder"),
    Arch("roformer", "roformer", "encoder", {"embedding_size": HIDDEN}),
    Arch("esm", "esm", "encoder", {"position_embedding_type": "rotary", "mask_token_id": 3}),
    Arch("mpnet", "mpnet", "encoder", {"max_position_embeddings": MAX_POS + 2}, note="relative position bias"),
    Arch("deberta", "deberta", "encoder", note="disentangled relative attention"),
    Arch("deberta-v2", "deberta-v2", "encoder", note="disentangled relative attention"),
    Arch("modernbert", "modernbert", "encoder", {"local_attention": 6, "global_attn_every_n_layers": 2},
         note="local/global layers"),
    Arch("xmod", "xmod", "encoder", {"max_position_embeddings": MAX_POS + 2}),
    Arch("rembert", "rembert", "encoder", {"input_embedding_size": 16, "output_embedding_size": 16}),
    Arch("roc_bert", "roc_bert", "encoder"),
    Arch("convbert", "convbert", "encoder", {"embedding_size": HIDDEN}, note="span conv + attention"),
    Arch("t5", "t5", "encoder", {"d_kv": HEAD_DIM, "d_ff": INTER, "relative_attention_num_buckets": 8,
                                 "relative_attention_max_distance": 16},
         model_cls="transformers.T5EncoderModel", note="learned bucketed relative position bias"),
    Arch("mt5", "mt5", "encoder", {"d_kv": HEAD_DIM, "d_ff": INTER, "relative_attention_num_buckets": 8,
                                   "relative_attention_max_distance": 16},
         model_cls="transformers.MT5EncoderModel", note="learned bucketed relative position bias"),
    Arch("umt5", "umt5", "encoder", {"d_kv": HEAD_DIM, "d_ff": INTER, "relative_attention_num_buckets": 8,
                                     "relative_attention_max_distance": 16},
         model_cls="transformers.UMT5EncoderModel", note="a learned relative position bias per layer"),
    # --- vision encoders
    Arch("vit", "vit", "vision", _vis()),
    Arch("deit", "deit", "vision", _vis(), note="CLS + distillation tokens"),
    Arch("beit", "beit", "vision", _vis(use_relative_position_bias=True, use_mask_token=False),
         note="relative position bias"),
    Arch("data2vec-vision", "data2vec-vision", "vision", _vis(use_relative_position_bias=False)),
    Arch("dinov2", "dinov2", "vision", _vis()),
    Arch("vit_msn", "vit_msn", "vision", _vis()),
    Arch("ijepa", "ijepa", "vision", _vis(), note="no CLS token"),
    Arch("yolos", "yolos", "vision", _vis(num_detection_tokens=3), note="detection tokens"),
    Arch("swin", "swin", "vision", dict(patch_size=2, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                       window_size=2),
         note="windowed attention"),
    # --- speech encoders
    Arch("whisper", "whisper", "whisper", model_cls="transformers.models.whisper.modeling_whisper:WhisperEncoder"),
    Arch("wav2vec2", "wav2vec2", "speech"),
    Arch("hubert", "hubert", "speech"),
    Arch("data2vec-audio", "data2vec-audio", "speech"),
    Arch("wavlm", "wavlm", "speech", note="gated relative position bias"),
    Arch("sew", "sew", "speech", {"squeeze_factor": 1}),
    Arch("unispeech", "unispeech", "speech"),
]
BY_NAME = {a.name: a for a in ARCHS}

# speech: a conv feature extractor with strides 5, 2 (kernels 10, 3): T samples -> tokens
_SPEECH = dict(conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
               num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
               do_stable_layer_norm=True, apply_spec_augment=False, mask_time_prob=0.0)
WHISPER_MELS = 10


def _no_dropout(cfg):
    for name in list(vars(cfg)):
        value = getattr(cfg, name)
        if isinstance(value, float) and ("dropout" in name or "pdrop" in name or name == "layerdrop"
                                         or name.endswith("_prob") and "mask" not in name):
            setattr(cfg, name, 0.0)
        elif hasattr(value, "to_dict") and value is not cfg and type(value).__name__.endswith("Config"):
            _no_dropout(value)
    return cfg


def make_config(arch: Arch, attn: str, seq_len: int, layers: int = LAYERS):
    import transformers

    cfg = transformers.AutoConfig.for_model(arch.model_type)
    over = dict(_GENERIC)
    if arch.family in ("vision", "speech", "whisper"):
        over.pop("vocab_size") if arch.family != "whisper" else None
    for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers"):
        over[k] = layers
    if arch.family == "speech":
        over.update(_SPEECH)
    if arch.family == "whisper":
        over.update(num_mel_bins=WHISPER_MELS, max_source_positions=seq_len, max_target_positions=MAX_POS,
                    begin_suppress_tokens=None, suppress_tokens=None, decoder_start_token_id=1)
    if arch.family == "vision":
        n = seq_len - _extra_tokens(arch)
        over["image_size"] = (2, 2 * n) if arch.name != "swin" else (2, 2 * n)
    over.update(arch.overrides)
    for k, v in over.items():
        if k in arch.overrides or hasattr(cfg, k):
            try:
                setattr(cfg, k, v)
            except Exception:  # noqa: BLE001  (a read-only alias)
                pass
    if "layer_types" in vars(cfg) and "layer_types" not in arch.overrides and isinstance(cfg.layer_types, list):
        cfg.layer_types = cfg.layer_types[:layers] if len(cfg.layer_types) >= layers else cfg.layer_types
    if hasattr(cfg, "rope_parameters") and isinstance(getattr(cfg, "rope_parameters", None), dict):
        pass
    cfg._attn_implementation = attn
    return _no_dropout(cfg)


def _extra_tokens(arch: Arch) -> int:
    """Tokens a vision model adds to its patches (CLS, distillation, detection)."""
    return {"deit": 2, "ijepa": 0, "yolos": 1 + arch.overrides.get("num_detection_tokens", 0),
            "swin": 0}.get(arch.name, 1)


def _resolve(spec: str):
    import importlib

    if ":" in spec:
        mod, name = spec.split(":")
        return getattr(importlib.import_module(mod), name)
    import transformers

    return getattr(transformers, spec.split(".", 1)[1])


def build(arch: Arch | str, attn: str = "sdpa", seq_len: int = S_DEFAULT, seed: int = 0, layers: int = LAYERS):
    """``(model, inputs, kind)``: the tiny random model (float32, eval, dropout 0) and its
    full-length inputs; ``kind`` is ``"loss"`` for causal LMs called with labels."""
    import transformers

    arch = BY_NAME[arch] if isinstance(arch, str) else arch
    cfg = make_config(arch, attn, seq_len, layers)
    torch.manual_seed(seed)
    if arch.model_cls:
        model = _resolve(arch.model_cls)(cfg)
    elif arch.family == "causal":
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    else:
        model = transformers.AutoModel.from_config(cfg, attn_implementation=attn)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model = model.float().eval()
    return model, make_inputs(arch, cfg, seq_len, seed), ("loss" if arch.family == "causal" else "hidden")


def speech_samples(tokens: int) -> int:
    """Raw audio length that the (10/5, 3/2) conv extractor turns into ``tokens`` frames."""
    frames1 = 2 * (tokens - 1) + 3
    return 5 * (frames1 - 1) + 10


def make_inputs(arch: Arch, cfg, seq_len: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    if arch.family == "vision":
        n = seq_len - _extra_tokens(arch)
        return {"pixel_values": torch.randn(BATCH, 3, 2, 2 * n, generator=g)}
    if arch.family == "whisper":
        return {"input_features": torch.randn(BATCH, WHISPER_MELS, 2 * seq_len, generator=g)}
    if arch.family == "speech":
        return {"input_values": torch.randn(BATCH, speech_samples(seq_len), generator=g)}
    ids = torch.randint(3, VOCAB, (BATCH, seq_len), generator=g)
    mask = torch.ones(BATCH, seq_len, dtype=torch.long)
    mask[1, seq_len - PAD:] = 0
    ids[1, seq_len - PAD:] = PAD_ID
    inputs = {"input_ids": ids, "attention_mask": mask}
    if arch.family == "causal":
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    return inputs


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:240] if text else ''}"


def reference(model, inputs, kind):
    """Untransformed outputs (and for ``loss`` the parameter gradients)."""
    params = dict(model.named_parameters())
    out = model(**{k: v.clone() for k, v in inputs.items()})
    ref = {k: v.detach().clone() for k, v in float_outputs(out).items()}
    grads = {}
    if kind == "loss":
        out.loss.backward()
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}
        model.zero_grad(set_to_none=True)
    return ref, grads


def compare(model, ring_model, inputs, kind, ref, ref_grads) -> tuple[dict, list[str], list]:
    """Run the transformed model once (and backward); ``(errors, problems, sites)``."""
    import ringfx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ringfx.RingfxWarning)
        out = ring_model(**{k: v.clone() for k, v in inputs.items()})
        got = float_outputs(out)
        if kind == "loss" and "loss" in got:
            got["loss"].backward()
    errors, problems = {}, []
    if sorted(got) != sorted(ref):
        problems.append(f"float outputs {sorted(got)}, expected {sorted(ref)}")
    for k, r in ref.items():
        if k in got:
            errors[k] = max_abs_error(got[k], r)
            if not (got[k].shape == r.shape and torch.allclose(got[k].detach(), r, rtol=RTOL, atol=ATOL)):
                problems.append(f"{k}: max err {errors[k]:.3g}")
    if kind == "loss":
        worst, errors["grads"], bad = gradient_errors(dict(model.named_parameters()), ref_grads, rtol=RTOL, atol=ATOL)
        if bad:
            problems.append(f"grads of {len(bad)} params differ (worst {worst}: {errors['grads']:.3g})")
        model.zero_grad(set_to_none=True)
    return errors, problems, list(getattr(ring_model, "sites", []))


def run_case(arch: Arch | str, attn: str, rings=RINGS, seq_len: int = S_DEFAULT, explain: bool = True,
             layers: int = LAYERS) -> dict:
    """One (architecture, attention implementation): a row of the table (a dict)."""
    import ringfx

    arch = BY_NAME[arch] if isinstance(arch, str) else arch
    row = {"arch": arch.name, "model_type": arch.model_type, "family": arch.family, "attn": attn,
           "seq_len": seq_len, "note": arch.note, "status": "", "detail": "", "sites": 0, "rewritten": 0,
           "left_alone": [], "rings": {}, "seconds": 0.0}
    start = time.monotonic()
    torch._dynamo.reset()
    try:
        model, inputs, kind = build(arch, attn, seq_len, layers=layers)
        if attn == "flex_attention" and not torch.cuda.is_available():
            # flex has no backward on CPU: outputs (the loss among them) compared, no gradients
            model.requires_grad_(False)
            kind = "hidden"
            row["note"] = (row["note"] + "; " if row["note"] else "") + "forward only: no flex backward on CPU"
        ref, ref_grads = reference(model, inputs, kind)
    except Exception as e:  # noqa: BLE001
        row.update(status="build", detail=_first_line(e), seconds=time.monotonic() - start)
        return row
    row["class"] = type(model).__name__
    sites = None
    if explain:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = ringfx.explain(model, **{k: v.clone() for k, v in inputs.items()})
            sites = rep.sites
            row["graph_breaks"] = len(rep.graph_breaks)
        except Exception as e:  # noqa: BLE001
            row["explain_error"] = _first_line(e)
    failures, mismatch, refused = [], [], []
    for world, layout in rings:
        torch._dynamo.reset()
        key = f"P{world}-{layout}"
        try:
            ring_model = ringfx.transform(model, mesh=ringfx.LoopbackRing(world), layout=layout)
            errors, problems, ring_sites = compare(model, ring_model, inputs, kind, ref, ref_grads)
            if sites is None:
                sites = ring_sites
            row["rings"][key] = {"ok": not problems, "errors": errors, "problems": problems}
            if problems:
                mismatch.append(f"{key}: " + "; ".join(problems))
        except ringfx.UnsupportedError as e:
            row["rings"][key] = {"ok": None, "refused": _first_line(e)}
            refused.append(_first_line(e))
        except Exception as e:  # noqa: BLE001
            where = traceback.extract_tb(e.__traceback__)[-1]
            line = f"{_first_line(e)} [{os.path.basename(where.filename)}:{where.lineno}]"
            row["rings"][key] = {"ok": False, "error": line}
            failures.append(f"{key}: {line}")
        model.zero_grad(set_to_none=True)
    sites = sites or []
    row["sites"] = len(sites)
    row["rewritten"] = sum(s.decision == "rewritten" for s in sites)
    row["left_alone"] = sorted({s.reason or "(no reason)" for s in sites if s.decision != "rewritten"})
    if refused and not row["left_alone"]:  # no explain: the refusal names the site and its reason
        row["left_alone"] = sorted({r.split("cannot be rewritten: ", 1)[-1] for r in refused})
    row["patterns"] = sorted({s.pattern for s in sites})
    if mismatch:
        row.update(status="mismatch", detail="; ".join(mismatch))
    elif failures:
        row.update(status="error", detail="; ".join(failures))
    elif row["left_alone"] or refused:
        row.update(status="left alone", detail="; ".join(row["left_alone"] or refused))
    elif not sites:
        row.update(status="no attention", detail="no attention site found")
    else:
        row.update(status="exact", detail="")
    row["seconds"] = round(time.monotonic() - start, 1)
    return row


# ------------------------------------------------------------------------- report

def table(rows) -> str:
    head = ("architecture", "attn", "sites", "rewritten", "status", "detail")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        detail = r["detail"].replace("|", "\\|")
        if r.get("note"):
            detail = f"({r['note']}) {detail}".strip()
        lines.append(f"| {r['arch']}{' †' if r.get('earlier') else ''} | {r['attn']} | {r['sites']} | {r['rewritten']} | {r['status']} | {detail} |")
    return "\n".join(lines)


def summary(rows) -> str:
    """``N architectures: R rewritten and exact, L left alone (reason), F failing``: an
    architecture counts as exact when every attention implementation run is exact, failing
    when any is a mismatch or an error."""
    by_arch: dict = {}
    for r in rows:
        if r["status"] != "build":
            by_arch.setdefault(r["arch"], []).append(r)
    exact = [a for a, rs in by_arch.items() if all(r["status"] == "exact" for r in rs)]
    failing = [a for a, rs in by_arch.items() if any(r["status"] in ("mismatch", "error") for r in rs)]
    none = [a for a, rs in by_arch.items() if all(r["status"] == "no attention" for r in rs)]
    left = [a for a in by_arch if a not in exact and a not in failing and a not in none]
    reasons = [f"{a}: {_short((r['left_alone'] or [r['detail']])[0])}" for a in left
               for r in by_arch[a][:1]]
    line = (f"{len(by_arch)} architectures: {len(exact)} rewritten and exact, {len(left)} left alone"
            + (f" ({'; '.join(reasons)})" if reasons else "") + f", {len(failing)} failing"
            + (f" ({', '.join(failing)})" if failing else ""))
    if none:
        line += f", {len(none)} with no attention site found ({', '.join(none)}: run unchanged, unsharded)"
    return line


def _short(reason: str) -> str:
    import re

    reason = re.sub(r"\b[a-z_]+_\d+\b \((\w+)\)", r"\1", reason)  # node names: "matmul_2 (matmul)" -> "matmul"
    return reason if len(reason) <= 90 else reason[:87] + "..."


def write_doc(path, rows, argv, elapsed, partial: str = "", note: str = ""):
    import transformers

    built = [r for r in rows if r["status"] != "build"]
    unbuilt = [r for r in rows if r["status"] == "build"]
    text = [
        "# Coverage: transformers architectures under the zero-touch call",
        "",
        "Generated by `benchmarks/hf_sweep.py` (do not edit by hand).",
        "",
        f"* command: `python benchmarks/hf_sweep.py {' '.join(argv)}`".rstrip() + "`" * 0,
        f"* date: {datetime.date.today().isoformat()}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; CPU, float32; {elapsed:.0f} s",
        f"* each row: a tiny random model ({LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, vocabulary {VOCAB}, "
        "dropout 0), full-length inputs with S odd (text: a right-padded row; causal LMs: `labels=`), "
        "`ringfx.explain`, then `ringfx.transform(model, mesh=ringfx.LoopbackRing(P), layout=...)` called "
        "like the model on P = 2 contiguous and P = 3 zigzag, compared with the untransformed model "
        f"(every float output; causal LMs: every parameter gradient after `loss.backward()`; atol {ATOL}, "
        f"rtol {RTOL})",
        "* status: `exact` (every site rewritten, outputs and gradients match on both rings), "
        "`left alone` (a site ringfx will not rewrite, with its reason; the transform refuses it on a ring), "
        "`mismatch` (wrong numbers: max error), `error` (an exception: its first line)",
        "",
        *([f"**Partial run:** {partial}", ""] if partial else []),
        *([note, ""] if note else []),
        f"**Summary: {summary(rows)}.**",
        "",
        table(built),
        "",
    ]
    if unbuilt:
        text += ["Not built from a tiny config (not counted):", ""]
        text += [f"* {r['arch']} ({r['attn']}): {r['detail'][:160]}" for r in unbuilt]
        text.append("")
    with open(path, "w") as f:
        f.write("\n".join(text))


def _attns_of(arch: Arch, wanted) -> list[str]:
    """The implementations of ``wanted`` the sweep runs ``arch`` with: its listed ones, and
    ``flex_attention`` for every architecture (one that does not offer it fails to build,
    a ``build`` row, not counted)."""
    return [a for a in arch.attns if a in wanted] + (["flex_attention"] if "flex_attention" in wanted else [])


def _worker_init():
    torch.set_num_threads(1)
    logging.getLogger("ringfx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated architecture names")
    p.add_argument("--attn", default="sdpa,eager")
    p.add_argument("--seq-len", type=int, default=S_DEFAULT)
    p.add_argument("--json", default="", help="write the rows here")
    p.add_argument("--doc", default="", help="write the table into this markdown file (docs/coverage.md)")
    p.add_argument("--no-explain", action="store_true")
    p.add_argument("--render", default="", help="write --doc from these JSONs (comma-separated; the first file "
                                                "that has a row wins) and stop")
    p.add_argument("--earlier", default="", help="with --render: JSONs of an earlier run that fill the gaps, "
                                                 "their rows marked †")
    p.add_argument("--note", default="", help="with --render: a paragraph on where the rows come from")
    p.add_argument("--workers", type=int, default=1, help="cases run in this many processes (one thread each)")
    args = p.parse_args(argv)
    logging.getLogger("ringfx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    archs = [BY_NAME[n] for n in args.only.split(",")] if args.only else ARCHS
    if args.render:
        rows, data, have = [], {}, set()
        files = [(path, False) for path in args.render.split(",")]
        files += [(path, True) for path in args.earlier.split(",") if path]
        for path, earlier in files:  # the first file that has a row wins; --earlier ones fill gaps (†)
            with open(path) as f:
                d = json.load(f)
            data = data or d
            for r in d["rows"]:
                if (r["arch"], r["attn"]) not in have:
                    have.add((r["arch"], r["attn"]))
                    if earlier:
                        r["arch"] += " †"
                        r["earlier"] = True
                    rows.append(r)
        for r in rows:
            r["arch"] = r["arch"].replace(" †", "")
        wanted = [(a.name, attn) for a in archs for attn in _attns_of(a, args.attn.split(","))]
        have = {(r["arch"], r["attn"]) for r in rows}
        missing = [f"{a} ({b})" for a, b in wanted if (a, b) not in have]
        order = {c: i for i, c in enumerate(wanted)}
        rows.sort(key=lambda r: order.get((r["arch"], r["attn"]), len(order)))
        partial = (f"{len(rows)} of {len(wanted)} cases ran before the run was stopped; not run: "
                   + ", ".join(missing)) if missing else ""
        shown = [a for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")]
        write_doc(args.doc, rows, shown + (['--note "..."'] if args.note else []),
                  sum(r.get("seconds", 0) for r in rows), partial, args.note)
        print(summary(rows))
        return rows
    rows, start = [], time.monotonic()
    cases = [(arch.name, attn) for arch in archs for attn in _attns_of(arch, args.attn.split(","))]

    def done(row):
        rows.append(row)
        print(f"{row['arch']:<16} {row['attn']:<6} sites {row['sites']:>2} rewritten {row['rewritten']:>2} "
              f"{row['status']:<12} {row['seconds']:>5.1f}s  {row['detail'][:200]}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"torch": torch.__version__, "argv": argv, "rows": rows}, f, indent=1, default=str)

    if args.workers > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init) as ex:
            futures = [ex.submit(run_case, name, attn, RINGS, args.seq_len, not args.no_explain)
                       for name, attn in cases]
            for f in cf.as_completed(futures):
                done(f.result())
        order = {c: i for i, c in enumerate(cases)}
        rows.sort(key=lambda r: order[(r["arch"], r["attn"])])
    else:
        for name, attn in cases:
            done(run_case(name, attn, seq_len=args.seq_len, explain=not args.no_explain))
    elapsed = time.monotonic() - start
    print()
    print(table([r for r in rows if r["status"] != "build"]))
    print()
    print(summary(rows))
    if args.doc:
        write_doc(args.doc, rows, argv, elapsed)
    return rows


if __name__ == "__main__":
    main()
