"""ringfx: exact ring attention for any PyTorch model.

    model = ringfx.transform(model)                 # or torch.compile(model, backend="ringfx")
    out = ringfx.ring_attention(q, k, v, causal=True, layout="zigzag")
"""

from .runtime import LoopbackRing, positions, ring_attention, shard, unshard

__all__ = ["LoopbackRing", "positions", "ring_attention", "shard", "unshard"]
