"""ringfx.runtime: the ring attention op and what it stands on.

layout.py     sequence layouts (contiguous, zigzag): which positions a rank holds
ring.py       rings over a ProcessGroup or a loopback of virtual ranks; the drivers
blocks.py     per-step block plan: skipped / full / masked blocks, mask building
kernels.py    per-block kernels returning the log-sum-exp (CPU flash, cuDNN, flash,
              memory-efficient, math) and GQA folding
algorithm.py  the forward and backward ring programs, the float32 merge
checks.py     what the op accepts: every input checked before the first transfer
op.py         torch.ops.ringfx.ring_attention (custom op) and the Python wrapper
sharding.py   shard / unshard / positions
"""

from .layout import LAYOUTS, chunk_ranges, layout_permutation, local_positions
from .op import ring_attention
from .ring import LoopbackRing, group_name_of, ring_size
from .sharding import positions, shard, unshard

__all__ = [
    "LAYOUTS", "LoopbackRing", "chunk_ranges", "group_name_of", "layout_permutation", "local_positions",
    "positions", "ring_attention", "ring_size", "shard", "unshard",
]
