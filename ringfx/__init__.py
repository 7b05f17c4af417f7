"""ringfx: exact ring attention for any PyTorch model.

    model = ringfx.transform(model)                 # or torch.compile(model, backend="ringfx")
    print(ringfx.explain(model, *inputs))           # what was rewritten, what was not, and why
    out = ringfx.ring_attention(q, k, v, causal=True, layout="zigzag")
    plan = ringfx.plan("llama-8b-like", seq_len=1_000_000, device_memory="80GiB", world_size=8)
"""

from .api import explain, transform
from .errors import RingfxWarning, UnsupportedError
from .planner import DeviceSpec, Plan, plan
from .runtime import LoopbackRing, positions, ring_attention, shard, unshard

__all__ = [
    "DeviceSpec", "LoopbackRing", "Plan", "RingfxWarning", "UnsupportedError", "explain", "plan", "positions",
    "ring_attention", "shard", "transform", "unshard",
]
