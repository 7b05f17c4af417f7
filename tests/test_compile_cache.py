"""torch.compile's on-disk caches and the ring op's schema.

Inductor's FX graph cache keys a compiled graph by its code and torch's state; the code
calls ``torch.ops.ringfx.ring_attention`` by name. A ringfx whose op takes other
arguments (an upgrade, another checkout) must not load an entry compiled against the
old op (seen once: an 18-argument call loaded into a 17-argument checkout). ringfx puts
its version and a hash of its ops' schemas into ``torch.compiler.config.cache_key_tag``
while its inner compiler runs (``ringfx/backend.py``).

Checked on torch's own cache, through its hit and miss counters, in a fresh cache
directory: a model transformed with ``inner="inductor"`` (forward and backward) is
compiled, then compiled again (the control: ringfx's graphs are cached and their keys
are the same from one compile to the next), then compiled with the schemas torch
reports for ``ringfx::ring_attention`` changed (an overload added through
``torch.library``): no entry may be loaded, neither the forward's nor the lazily
compiled backward's. With the overload removed again the first entries are loaded
again. A user's own tag is kept in front of ringfx's, and is all that is left after
the compile.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ringfx
from torch._dynamo.utils import counters

H, D = 2, 8  # (batch 1, 12 tokens)


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A cache directory of this test's own, inductor's FX graph cache on."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", True)
    monkeypatch.setattr(inductor_config, "compile_threads", 1)  # no pool of compile workers
    yield tmp_path
    torch.compiler.reset()


def _compile_and_run():
    """Transform, run forward and backward; return (hits, misses) of the FX graph cache."""
    torch.compiler.reset()
    counters.clear()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, 12, D, requires_grad=True) for _ in range(3))
    model = ringfx.transform(Attention(), mesh=ringfx.LoopbackRing(2), inner="inductor")
    model(q, k, v).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def test_compile_cache_entries_are_not_shared_across_op_schemas(fresh_cache, monkeypatch):
    import torch._inductor.compile_fx as compile_fx

    # the tags in effect when inductor compiles each graph (forward, then lazily backward)
    seen, original = [], compile_fx.compile_fx_inner

    def spy(*args, **kwargs):
        seen.append(torch.compiler.config.cache_key_tag)
        return original(*args, **kwargs)

    monkeypatch.setattr(compile_fx, "compile_fx_inner", spy)
    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "users-own")  # a user's tag is kept

    hits, misses = _compile_and_run()
    assert (hits, misses) == (0, 2), "the forward and the backward graph: compiled and stored"
    assert _compile_and_run() == (2, 0), "the control: the same schema loads both entries"

    lib = torch.library.Library("ringfx", "FRAGMENT")
    try:
        lib.define("ring_attention.schema_probe(Tensor q, int probe=0) -> Tensor")
        assert any("schema_probe" in str(s) for s in torch._C._jit_get_schemas_for_operator("ringfx::ring_attention"))
        assert _compile_and_run() == (0, 2), "an entry compiled against another op schema was loaded"
    finally:
        lib._destroy()
    assert _compile_and_run() == (2, 0), "the original schema: its entries again"

    assert len(seen) == 8 and all(t.startswith("users-own|ringfx-") and t.count("ringfx-") == 1 for t in seen), seen
    assert len(set(seen)) == 2 and seen[4] == seen[5] != seen[0], seen  # the probe's compiles: another tag
    assert torch.compiler.config.cache_key_tag == "users-own", "restored after the compile"
