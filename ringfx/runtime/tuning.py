"""The runtime's tuning switches: one settings object, read once per call.

Every switch defaults to the fastest measured choice; turning one off is for measuring
what it buys (``benchmarks/ring_attention.py --ablate``). Benchmarks set them through
the environment, which is read here and nowhere else:

    RINGFX_FUSED_MERGE=0   fold block results with the eager float32 ops, not the Triton pass
    RINGFX_FOLD_GROUPS=0   fold every block on its own, not several per accumulator pass
    RINGFX_SIDE_STREAM=0   run the float32 accumulation on the main stream, not a side stream
    RINGFX_TWO_STREAMS=0   run block kernels on one compute stream, not alternating two

Only the CUDA paths read them: on the CPU the folds are eager and everything is inline.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Tuning:
    fused_merge: bool = True  # one Triton pass per fold (CUDA, float32 accumulation)
    fold_groups: bool = True  # several blocks per fold where the fold is fused
    side_stream: bool = True  # accumulation on a side stream (CUDA)
    two_streams: bool = True  # block kernels alternate between two compute streams (CUDA, long kernels)

    @classmethod
    def from_environment(cls) -> "Tuning":
        """The switches as the environment sets them (unset: on)."""
        def on(name: str) -> bool:
            return os.environ.get(name, "1") != "0"

        return cls(fused_merge=on("RINGFX_FUSED_MERGE"), fold_groups=on("RINGFX_FOLD_GROUPS"),
                   side_stream=on("RINGFX_SIDE_STREAM"), two_streams=on("RINGFX_TWO_STREAMS"))
