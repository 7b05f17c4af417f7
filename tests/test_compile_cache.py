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
the compile. All of it in a process of its own (``map_in_processes``): removing the probe
overload renews the objects of ``torch.ops.ringfx`` that other tests compare by identity.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import ringfx
from ringfx.testing import map_in_processes
from torch._dynamo.utils import counters

H, D = 2, 8  # (batch 1, 12 tokens)


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


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


def _four_compiles(cache_dir):
    """In a process of its own (the probe overload, once removed, leaves ``torch.ops.ringfx``
    with new op objects that other tests' identity checks would not recognise): the
    (hits, misses) of four compiles, the tags inductor saw, and the tag left afterwards."""
    import torch._inductor.compile_fx as compile_fx
    import torch._inductor.config as inductor_config

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # a cache of this test's own
    inductor_config.fx_graph_cache = True
    inductor_config.compile_threads = 1  # no pool of compile workers
    torch.compiler.config.cache_key_tag = "users-own"  # a user's tag is kept

    # the tags in effect when inductor compiles each graph (forward, then lazily backward)
    seen, original = [], compile_fx.compile_fx_inner

    def spy(*args, **kwargs):
        seen.append(torch.compiler.config.cache_key_tag)
        return original(*args, **kwargs)

    compile_fx.compile_fx_inner = spy
    counts = [_compile_and_run(), _compile_and_run()]
    lib = torch.library.Library("ringfx", "FRAGMENT")
    try:
        lib.define("ring_attention.schema_probe(Tensor q, int probe=0) -> Tensor")
        probe_seen = any("schema_probe" in str(s) for s in torch._C._jit_get_schemas_for_operator("ringfx::ring_attention"))
        counts.append(_compile_and_run())
    finally:
        lib._destroy()
    counts.append(_compile_and_run())
    return counts, probe_seen, seen, torch.compiler.config.cache_key_tag


def test_compile_cache_entries_are_not_shared_across_op_schemas(tmp_path):
    ((first, again, probe, back), probe_seen, seen, tag_after), = map_in_processes(_four_compiles, [str(tmp_path)])
    assert first == (0, 2), "the forward and the backward graph: compiled and stored"
    assert again == (2, 0), "the control: the same schema loads both entries"
    assert probe_seen, "the probe overload is a schema of ringfx::ring_attention"
    assert probe == (0, 2), "an entry compiled against another op schema was loaded"
    assert back == (2, 0), "the original schema: its entries again"

    assert len(seen) == 8 and all(t.startswith("users-own|ringfx-") and t.count("ringfx-") == 1 for t in seen), seen
    assert len(set(seen)) == 2 and seen[4] == seen[5] != seen[0], seen  # the probe's compiles: another tag
    assert tag_after == "users-own", "restored after the compile"
