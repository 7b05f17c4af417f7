"""Options shared by the passes: which ring the rewritten graph runs on, in which layout.

``PassOptions`` is plain data so that passes stay pure functions of ``(gm, options)``.
``group_name`` is the ring op's group argument (``"loopback:P"`` for a LoopbackRing, the
ProcessGroup's ``group_name`` otherwise); ``ring_size`` and ``loopback`` let the mask
analysis decide what is correct on shards (a dense mask holding only this rank's key
columns is not, on a real ring of P > 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class PassOptions:
    group_name: str = "loopback:1"
    layout: str = "contiguous"
    ring_size: int = 1
    loopback: bool = True
    # Values of the graph's placeholders, in order (only needed for graphs that do not
    # come from dynamo; dynamo records them on the placeholders).
    example_inputs: Optional[Sequence[Any]] = None
    kernel: str = "auto"  # per-block kernel of the ring op
    # "full": the graph takes full-length inputs and the sharding pass shards it (zero-touch);
    # "sharded": the caller passes this rank's tokens (the guards note what that gets wrong)
    inputs: str = "sharded"
    gather_outputs: bool = True  # with inputs="full": per-token outputs come back full length
    # with inputs="full": ((argument name, sequence dim), ...) sharded where they enter, instead
    # of every input with an axis of an attention's sequence length
    sequence_inputs: tuple = ()
    # with inputs="full": what an op with no sharded form does with activations: "gather"
    # (all-gather them, exact, warned) or "error" (ringfx.UnsupportedError naming the op)
    fallbacks: str = "gather"
    # tokens per chunk of the fused output projection + cross-entropy (blockwise_loss_pass);
    # 0: off, the loss is computed as the model writes it
    blockwise_loss: int = 0

    def __post_init__(self):
        if self.layout not in ("contiguous", "zigzag"):
            raise ValueError(f"layout must be 'contiguous' or 'zigzag', got {self.layout!r}")
        if self.fallbacks not in ("gather", "error"):
            raise ValueError(f"fallbacks must be 'gather' or 'error', got {self.fallbacks!r}")
        if self.inputs not in ("full", "sharded"):
            raise ValueError(f"inputs must be 'full' or 'sharded', got {self.inputs!r}")
        if isinstance(self.blockwise_loss, bool) or not isinstance(self.blockwise_loss, int) \
                or self.blockwise_loss < 0:
            raise ValueError(f"blockwise_loss must be a number of tokens >= 0 (0: off), got {self.blockwise_loss!r}")
        if not isinstance(self.ring_size, int) or self.ring_size < 1:
            raise ValueError(f"ring_size must be a positive int, got {self.ring_size!r}")
