"""Models from where users have them: a preset, a transformers config, or their own code.

    resolve_model("llama-8b-like")                               # a preset (ModelConfig)
    resolve_model("path/to/config.json")                         # a transformers config file
    resolve_model("llama:hidden_size=4096,num_hidden_layers=32") # a model type with overrides
    resolve_model("mypackage.models:build")                      # module:factory, your own code

A transformers config becomes ``AutoModelForCausalLM.from_config`` on the ``meta``
device (no download, no memory), run with ``labels`` so its own loss is in the step.
A factory is called with no arguments and returns a module, or ``(module,
example_inputs)``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Any

import torch

from . import presets as _presets


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def resolve_model(spec: str):
    """A preset name, a ``config.json`` path, ``type:key=value,...`` or ``module:factory``.

    Returns a ``ModelConfig``, a transformers ``PretrainedConfig``, or what the factory
    returns (a module, or ``(module, example_inputs)``)."""
    if spec in _presets.PRESETS:
        return _presets.PRESETS[spec]
    if spec.endswith(".json") or os.path.isdir(spec):
        if not os.path.exists(spec):
            raise ValueError(f"model={spec!r}: no such file")
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(spec if os.path.isdir(spec) else os.path.dirname(os.path.abspath(spec)))
    head, sep, tail = spec.partition(":")
    if sep and ("=" in tail or not tail):
        from transformers import AutoConfig

        overrides = {}
        for item in filter(None, (t.strip() for t in tail.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"model={spec!r}: {item!r} is not key=value")
            overrides[key.strip()] = _value(value.strip())
        try:
            return AutoConfig.for_model(head, **overrides)
        except ValueError as err:
            raise ValueError(f"model={spec!r}: {err}") from None
    if sep:
        try:
            factory = getattr(importlib.import_module(head), tail)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"model={spec!r}: cannot import {tail} from {head}: {err}") from None
        return factory()
    raise ValueError(f"model={spec!r}: use a preset ({', '.join(_presets.PRESETS)}), a config.json path, "
                     "type:key=value,... (a transformers model type, e.g. llama:num_hidden_layers=32) or "
                     "module:factory")


@contextlib.contextmanager
def unpacked_sequences_on_meta():
    """transformers' packed-sequence check answered on ``meta`` position ids as it answers for
    one unpacked sequence per row (None: not packed); on real tensors it runs as written.

    Without a cache and an attention mask (a training step) transformers (5.x) looks for
    several sequences packed in one row by calling ``.item()`` on the position ids, which a
    meta tensor cannot answer. The planner's steps feed ids alone (transformers makes the
    positions 0..n-1: one sequence), so "not packed" is the real model's answer.
    """
    masking = sys.modules.get("transformers.masking_utils")
    original = getattr(masking, "find_packed_sequence_indices", None)
    if original is None:  # transformers not imported (a preset or a plain module), or a version without the check
        yield
        return

    def find_packed_sequence_indices(position_ids):
        return None if position_ids.device.type == "meta" else original(position_ids)

    masking.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


class _CausalLMStep(torch.nn.Module):
    """``ids -> loss``: a transformers causal LM with its own loss (labels = the ids).

    No K/V cache, whatever the config's ``use_cache`` says: a training step never reads it
    (transformers turns it off under gradient checkpointing), and a cache kept in the
    simulation holds every layer's K/V through the forward and, when checkpointed layers
    are recomputed in backward, appends their K/V to it again (keys of twice the length)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss


class _CausalLMBlockwiseStep(torch.nn.Module):
    """``ids -> loss`` with the LM head and its loss fused into ringfx's blockwise loss (what
    ``transform(..., blockwise_loss=chunk)`` makes of transformers' ``ForCausalLMLoss``; a head
    that is not a plain linear, such as a logit soft-cap, is not fused by transform)."""

    def __init__(self, model, chunk: int):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, ids):
        from ..blockwise import chunked_linear_cross_entropy

        hidden = self.model.base_model(input_ids=ids, use_cache=False)[0]  # no cache: see _CausalLMStep
        head = self.model.get_output_embeddings()
        labels = torch.nn.functional.pad(ids, (0, 1), value=-100)[..., 1:]  # ForCausalLMLoss's shift
        return chunked_linear_cross_entropy(hidden, head.weight, head.bias, labels, chunk=self.chunk,
                                            loss_dtype=torch.float32)


def transformers_target_parts(config, batch_size: int):
    """(name, module on meta, inputs at n tokens, loss, matmul FLOPs per token, the fused-loss
    step for a chunk size) of a config."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(config, "dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    name = f"{config.model_type} ({type(model).__name__})"
    step = _CausalLMStep(model)
    params = sum(p.numel() for p in model.parameters())

    def make_inputs(n):
        return (torch.zeros(batch_size, n, dtype=torch.long, device="meta"),)

    return (name, step, make_inputs, lambda loss, inputs: loss, 2.0 * params * batch_size,
            lambda chunk: _CausalLMBlockwiseStep(model, chunk))
