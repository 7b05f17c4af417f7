"""Tiny random Hugging Face transformers models (no download) and their inputs, for
checking ``ringfx.transform`` "zero-touch": the transformed model takes exactly the
inputs the untransformed one takes (full length, identical on every rank) and returns
the same outputs and, after ``backward``, the same parameter gradients.

    model, inputs, kind = hf_zoo.build("llama", attn="sdpa", seq_len=18)
    out = model(**inputs)

Every builder is seeded (same weights and inputs on every rank of a real ring), float32,
with every dropout at 0, and takes the sequence length S (odd lengths are fine). The
model's dims are kept apart from the test lengths (hidden 32, 4 heads, head dim 8,
intermediate 64, vocabulary 96, batch 2): dynamo specialises sizes that are equal.

``kind`` says what to compare:
  "loss"              causal LM called with labels: logits and loss, and every
                      parameter's gradient after ``loss.backward()``
  "pooler_output"     encoder with a pooler: last_hidden_state and pooler_output
  "last_hidden_state" encoder without a pooler
(compare every floating-point tensor of the returned ModelOutput in any case).

Padding: causal LMs and text encoders get an attention_mask whose second row is right
padded (``PAD`` tokens), the padded ids set to the pad token, and (causal LMs) labels
= input_ids with -100 at the padding.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

import transformers

from ringfx.testing import float_outputs  # noqa: F401  (the tests import it from here)


def _load_sweep():
    """``benchmarks/hf_sweep.py`` (a script, not a package) as the module ``hf_sweep``."""
    if "hf_sweep" not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks", "hf_sweep.py")
        spec = importlib.util.spec_from_file_location("hf_sweep", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["hf_sweep"] = module
        spec.loader.exec_module(module)
    return sys.modules["hf_sweep"]


hf_sweep = _load_sweep()
# the sweep's tiny dims, kept apart from every test length (dynamo specialises equal sizes)
from hf_sweep import BATCH, HEAD_DIM, HEADS, HIDDEN, INTER, KV_HEADS, LAYERS, MAX_POS, PAD_ID, VOCAB  # noqa: E402
from hf_sweep import WHISPER_MELS  # noqa: E402

PAD = 4  # right-padded tokens of row 1

CAUSAL_LMS = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt_neox", "gpt2", "olmo2")
ENCODERS = ("bert", "roberta", "vit", "whisper")
MODELS = CAUSAL_LMS + ENCODERS
MISTRAL_WINDOW = 5  # smaller than every test length


def _no_dropout(cfg):
    """Every dropout-like probability of the config (and its sub-configs) to 0."""
    for name in list(vars(cfg)):
        value = getattr(cfg, name)
        if isinstance(value, float) and ("dropout" in name or "pdrop" in name or name == "layerdrop"):
            setattr(cfg, name, 0.0)
    return cfg


def _finish(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.float().eval()


def _make(cls, cfg, **kwargs):
    return cls(_no_dropout(cfg), **kwargs)


def _common(attn):
    return dict(attn_implementation=attn, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)


def _llama(attn):
    return _make(transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS, **_common(attn)))


def _mistral(attn):
    return _make(transformers.MistralForCausalLM, transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
        sliding_window=MISTRAL_WINDOW, head_dim=HEAD_DIM, **_common(attn)))


def _qwen2(attn):
    return _make(transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
        **_common(attn)))


def _gemma(attn):
    # Gemma3 text: query/key norms, pre-attention scalar, alternating sliding-window layers
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=MAX_POS,
        sliding_window=MISTRAL_WINDOW + 2, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=HEAD_DIM, **_common(attn))
    return transformers.Gemma3ForCausalLM(_no_dropout(cfg))


def _phi3(attn):
    return _make(transformers.Phi3ForCausalLM, transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
        original_max_position_embeddings=MAX_POS, **_common(attn)))


def _gpt_neox(attn):
    return _make(transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=MAX_POS, rotary_pct=0.5, **_common(attn)))


def _gpt2(attn):
    return _make(transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTER, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POS,
        **_common(attn)))


def _olmo2(attn):
    return _make(transformers.Olmo2ForCausalLM, transformers.Olmo2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
        **_common(attn)))


def _bert(attn):
    return _make(transformers.BertModel, transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=MAX_POS, attn_implementation=attn, pad_token_id=PAD_ID),
        add_pooling_layer=True)


def _roberta(attn):
    # positions come from the ids (cumsum of non-pad tokens, offset by the pad id)
    return _make(transformers.RobertaModel, transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=MAX_POS + 2, attn_implementation=attn,
        pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2), add_pooling_layer=False)


VIT_PATCH = 2
VIT_CHANNELS = 3


def _vit(attn, seq_len):
    # one row of S - 1 patches (+ the CLS token = S tokens)
    return _make(transformers.ViTModel, transformers.ViTConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=(VIT_PATCH, VIT_PATCH * (seq_len - 1)), patch_size=VIT_PATCH, num_channels=VIT_CHANNELS,
        attn_implementation=attn), add_pooling_layer=True)


def _whisper(attn, seq_len):
    # the encoder alone: input_features (B, mels, 2 S), S = max_source_positions tokens
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=WHISPER_MELS, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=1,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=INTER, decoder_ffn_dim=INTER,
        max_source_positions=seq_len, max_target_positions=MAX_POS, attn_implementation=attn,
        pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
        suppress_tokens=None)
    return WhisperEncoder(_no_dropout(cfg))


_TEXT = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gemma": _gemma, "phi3": _phi3,
         "gpt_neox": _gpt_neox, "gpt2": _gpt2, "olmo2": _olmo2, "bert": _bert, "roberta": _roberta}


def _with_no_dropout(make, attn, *args):
    """Build with a config whose dropouts are 0 (config classes take them as keywords,
    but their names differ per model: patch the built model's config and modules)."""
    model = make(attn, *args)
    _no_dropout(model.config)
    return _finish(model)


def build(name: str, attn: str = "sdpa", seq_len: int = 18, seed: int = 0):
    """``(model, inputs, kind)`` for model ``name`` (one of ``MODELS``) with attention
    implementation ``attn`` ("sdpa" | "eager") and S = ``seq_len`` tokens."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; one of {MODELS}")
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"attn must be 'sdpa' or 'eager', got {attn!r}")
    if seq_len < PAD + 2:
        raise ValueError(f"seq_len must be at least {PAD + 2}")
    torch.manual_seed(seed)
    if name == "vit":
        model = _with_no_dropout(_vit, attn, seq_len)
    elif name == "whisper":
        model = _with_no_dropout(_whisper, attn, seq_len)
    else:
        model = _with_no_dropout(_TEXT[name], attn)
    return model, make_inputs(name, seq_len, seed), kind_of(name)


def kind_of(name: str) -> str:
    if name in CAUSAL_LMS:
        return "loss"
    return "pooler_output" if name in ("bert", "vit") else "last_hidden_state"


def make_inputs(name: str, seq_len: int, seed: int = 0) -> dict:
    """Full-length inputs (identical on every rank for the same seed)."""
    g = torch.Generator().manual_seed(1000 + seed)
    if name == "vit":
        return {"pixel_values": torch.randn(BATCH, VIT_CHANNELS, VIT_PATCH, VIT_PATCH * (seq_len - 1), generator=g)}
    if name == "whisper":
        return {"input_features": torch.randn(BATCH, WHISPER_MELS, 2 * seq_len, generator=g)}
    ids = torch.randint(3, VOCAB, (BATCH, seq_len), generator=g)  # no pad/bos/eos ids inside the text
    mask = torch.ones(BATCH, seq_len, dtype=torch.long)
    mask[1, seq_len - PAD:] = 0
    ids[1, seq_len - PAD:] = PAD_ID
    inputs = {"input_ids": ids, "attention_mask": mask}
    if name in CAUSAL_LMS:
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    return inputs
