"""ringfx.runtime: the ring attention op and what it stands on.

layout.py        sequence layouts (contiguous, zigzag): which positions a rank holds
ring.py          rings over a ProcessGroup or a loopback of virtual ranks; the drivers
blocks.py        per-step block plan: skipped / full / masked blocks, mask building
block_inputs.py  the tensors of one block call: K/V packed for the ring, slices and mask
kernels.py       per-block kernels returning the log-sum-exp (CPU flash, cuDNN, flash,
                 memory-efficient, math; the math kernel also soft-caps) and GQA folding
sinks.py         attention sinks: the correction of (out, lse) and the sinks' gradient
fold.py          folding block results into a running result (softmax merge / sum),
                 eager or one Triton pass
merge_triton.py  the Triton fold kernel (CUDA)
deferred.py      deferred accumulation: several blocks per fold, per row range
agreement.py     the ranks' agreement on shapes and options before any transfer
streams.py       the CUDA stream policy of a rank program
tuning.py        the benchmark switches, one settings object read once per call
algorithm.py     the forward and backward ring programs (shared prologue and rotation)
checks.py        what the op accepts: every input checked before the first transfer
op.py            torch.ops.ringfx.ring_attention (custom op) and the Python wrapper
sharding.py      shard / unshard / positions
collectives.py   whole-sequence moves called by graphs the sharding pass rewrote
gradients.py     parameter gradients averaged over the ring
"""

from .layout import LAYOUTS, chunk_ranges, layout_permutation, local_positions
from .op import ring_attention
from .ring import LoopbackRing, group_name_of, ring_size
from .sharding import positions, shard, unshard

__all__ = [
    "LAYOUTS", "LoopbackRing", "chunk_ranges", "group_name_of", "layout_permutation", "local_positions",
    "positions", "ring_attention", "ring_size", "shard", "unshard",
]
