"""The sequence-mixing guard: ops that combine tokens across the sequence (pooling, the
last token, a label shift, scans, convolutions over the tokens) see only this rank's
shard on a ring; ringfx notes each with its source line (``RingfxWarning``) and changes
nothing. Per-token models (the zoo) get no note."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ringfx
from ringfx import RingfxWarning
from zoo import ZOO, TinyGpt2, TinyLlama, tokens

E, H, V = 16, 2, 11


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(E, 3 * E, dtype=torch.float64)
        self.out = nn.Linear(E, E, dtype=torch.float64)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, H, E // H).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, s, E))


class MeanPool(Block):  # sentence embedding: the mean over the tokens
    def forward(self, x):
        return super().forward(x).mean(dim=1)


class LastToken(Block):  # classification from the last token
    def forward(self, x):
        return super().forward(x)[:, -1]


class ShiftedLoss(Block):  # HF causal LM loss: logits[:, :-1] against labels[:, 1:]
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(E, V, dtype=torch.float64)

    def forward(self, x, labels):
        logits = self.head(super().forward(x))
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))


class CumsumBefore(Block):  # a running sum over the tokens before attention
    def forward(self, x):
        return super().forward(x.cumsum(dim=1))


class ConvOverTokens(Block):  # a depthwise conv over the sequence (Mamba/Hyena-style mixing)
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(E, E, 3, padding=1, groups=E, dtype=torch.float64)

    def forward(self, x):
        h = super().forward(x)
        return self.conv(h.transpose(1, 2)).transpose(1, 2)


class PerTokenHead(Block):  # logits per token, a loss per token (reduction="none"): nothing to note
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(E, V, dtype=torch.float64)

    def forward(self, x, labels):
        logits = self.head(F.gelu(super().forward(x)))
        return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(labels.shape)


def _notes(model, *inputs, world=2):
    ring = ringfx.LoopbackRing(world)
    sharded = [ringfx.shard(t, 1, group=ring) for t in inputs]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ringfx.transform(model, ring, inputs="sharded")(*sharded)
    return [str(w.message) for w in caught if issubclass(w.category, RingfxWarning)]


def _x():
    return torch.randn(2, 12, E, dtype=torch.float64)


def _labels():
    return torch.randint(0, V, (2, 12))


@pytest.mark.parametrize("model,inputs,expected", [
    (MeanPool(), (_x(),), "'mean' over the sequence at"),
    (LastToken(), (_x(),), "token select along the sequence at"),
    (ShiftedLoss(), (_x(), _labels()), "slice [0:11] along the sequence at"),
    (CumsumBefore(), (_x(),), "'cumsum' along the sequence at"),
    (ConvOverTokens(), (_x(),), "conv1d over the sequence at"),
], ids=["mean-pool", "last-token", "label-shift", "cumsum", "conv1d"])
def test_mixing_ops_are_noted_with_their_source_line(model, inputs, expected):
    notes = _notes(model, *inputs)
    assert any(expected in n and "test_sequence_mixing.py" in n for n in notes), notes


def test_shifted_loss_notes_the_slice_and_the_reduction():
    notes = _notes(ShiftedLoss(), _x(), _labels())
    assert any("slice [0:11] along the sequence" in n for n in notes)
    assert any("slice [1:12] along the sequence" in n for n in notes)
    assert any("'cross_entropy' (reduction='mean') over the sequence at" in n for n in notes), notes


def test_per_token_model_has_no_note_and_runs_exactly():
    model, ring = PerTokenHead(), ringfx.LoopbackRing(3)
    x, labels = _x(), _labels()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RingfxWarning)
        out = ringfx.transform(model, ring, inputs="sharded")(ringfx.shard(x, 1, group=ring), ringfx.shard(labels, 1, group=ring))
    torch.testing.assert_close(ringfx.unshard(out, 1, group=ring), model(x, labels))


REAL_RING_ZOO = [e for e in ZOO if e.real_ring]  # a dense user mask runs on loopback rings only


@pytest.mark.parametrize("entry", REAL_RING_ZOO, ids=[e.name for e in REAL_RING_ZOO])
def test_zoo_models_get_no_note(entry):
    ring = ringfx.LoopbackRing(2)
    torch.manual_seed(0)
    model = entry.make_module().eval()
    inputs = [ringfx.shard(i.value, i.seq_dim, group=ring) if i.seq_dim is not None else i.value
              for i in entry.make_inputs(16, 0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RingfxWarning)
        ringfx.transform(model, ring, inputs="sharded")(*inputs)


@pytest.mark.parametrize("model_cls", [TinyGpt2, TinyLlama], ids=["tiny-gpt2", "tiny-llama"])
def test_guard_follows_the_sequence_through_whole_models(model_cls):
    # the zoo's per-token models, with a mean over the tokens appended: the guard must
    # have followed the sequence from the token ids through embeddings, norms, RoPE and
    # two attention layers to see it
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model_cls()

        def forward(self, input_ids, position_ids):
            return self.inner(input_ids, position_ids).mean(1)

    ids, pos = (i.value for i in tokens(16, 0))
    notes = _notes(Pooled().eval(), ids, pos)
    assert len(notes) == 1 and "'mean' over the sequence at" in notes[0], notes


def test_no_note_on_one_rank():
    assert _notes(MeanPool(), _x(), world=1) == []


def test_padding_the_features_is_per_token_padding_the_tokens_is_not():
    class PadFeatures(Block):
        def forward(self, x):
            return F.pad(super().forward(x), (0, 2))

    class PadTokens(Block):
        def forward(self, x):
            return F.pad(super().forward(x).transpose(1, 2), (1, 0))

    assert _notes(PadFeatures(), _x()) == []
    assert any("pad by (1, 0) tokens along the sequence at test_sequence_mixing.py" in n
               for n in _notes(PadTokens(), _x()))


def test_identity_cuts_are_per_token():
    # an empty KV cache concatenated in front (transformers' DynamicCache on its first
    # call), and slices that keep every token: not mixing
    class CacheAndSlices(Block):
        def forward(self, x):
            h = super().forward(x)
            cache = torch.zeros(h.shape[0], 0, h.shape[2], dtype=h.dtype)
            h = torch.cat([cache, h], dim=1)
            return h[:, 0:] + h[:, : h.shape[1]]

    assert _notes(CacheAndSlices(), _x()) == []
