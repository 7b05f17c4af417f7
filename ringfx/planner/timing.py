"""The time model: per ring step, attention FLOPs against FLOP/s, KV bytes against bandwidth.

Ring Attention paper (Liu, Zaharia, Abbeel 2023), §3: a step on a block of c tokens
computes 4·d·c² FLOPs (d = heads·head_dim) and sends the next K and V block, 4·c·d bytes
in 16-bit; the send hides behind the compute when 4·d·c²/F >= 4·c·d/B, i.e. c >= F/B.
In general (B batch, Hq query and Hkv key/value heads, a bytes per element):

    compute per step  4·B·Hq·c²·D / F        (half on average under a causal mask)
    transfer per step 2·B·Hkv·c·D·a / B_link
    c_min = (2·Hkv·a) / (4·Hq) · F / B_link   (x2 causal)

Backward: 2.5x the forward FLOPs (fwd+bwd = 3.5x, DESIGN.md §6) and K, V (a bytes) plus
dK, dV (float32) on the wire.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

# fraction of the dense matmul rate a fused attention kernel reaches: cuDNN fwd+bwd ran at
# 493-568 of ~790 TFLOP/s on H100 (DESIGN.md §6)
ATTENTION_EFFICIENCY = 0.65
# fraction reached by the model's other matmuls (assumed, not measured here)
MATMUL_EFFICIENCY = 0.75
BACKWARD_FLOP_RATIO = 2.5


def min_block_size(flops: float, bandwidth: float, *, q_heads: int = 1, kv_heads: int = 1, dtype_bytes: int = 2,
                   causal: bool = False) -> float:
    """The smallest per-device block c (tokens) whose compute hides the KV transfer.

    With the defaults this is the paper's ``F / B``: A100 (312 TFLOP/s) over NVLink
    (300 GB/s) -> 1040 tokens; over 100 Gb/s InfiniBand (12.5 GB/s) -> 24960.
    """
    if flops <= 0 or bandwidth <= 0:
        raise ValueError("flops and bandwidth must be positive")
    c = (2 * kv_heads * dtype_bytes) / (4 * q_heads) * flops / bandwidth
    return 2 * c if causal else c


@dataclasses.dataclass(frozen=True)
class StepTime:
    """Seconds for one attention call on one ring device, and whether transfers hide."""

    block: int
    min_block: float
    compute_per_step: float
    transfer_per_step: float
    forward: float
    backward: float

    @property
    def overlap(self) -> bool:
        return self.block >= self.min_block


def attention_time(att, seq_len: int, ring_size: int, flops: float, bandwidth: float, *, training: bool = True,
                   efficiency: float = ATTENTION_EFFICIENCY) -> StepTime:
    """One attention call (one layer) over a ring of ``ring_size``: P steps of c = S/P tokens,
    each as long as the slower of its compute and its transfer."""
    c = seq_len // ring_size
    causal_factor = 0.5 if att.causal else 1.0
    compute = 4.0 * att.batch * att.q_heads * c * c * att.head_dim * causal_factor / (flops * efficiency)
    kv_elements = 2.0 * att.batch * att.kv_heads * c * att.head_dim
    transfer = 0.0 if ring_size == 1 else kv_elements * att.dtype_bytes / bandwidth
    steps = ring_size
    forward = steps * max(compute, transfer)
    backward = 0.0
    if training:
        transfer_b = 0.0 if ring_size == 1 else kv_elements * (att.dtype_bytes + 4) / bandwidth
        backward = steps * max(BACKWARD_FLOP_RATIO * compute, transfer_b)
    c_min = min_block_size(flops * efficiency, bandwidth, q_heads=att.q_heads, kv_heads=att.kv_heads,
                           dtype_bytes=att.dtype_bytes, causal=att.causal)
    return StepTime(block=c, min_block=c_min, compute_per_step=compute, transfer_per_step=transfer,
                    forward=forward, backward=backward)


def other_matmul_time(matmul_flops_per_token: Optional[float], tokens: int, flops: float, *, training: bool = True,
                      efficiency: float = MATMUL_EFFICIENCY) -> float:
    """The model's non-attention matmuls on the local tokens (x3 for fwd+bwd when training)."""
    if not matmul_flops_per_token:
        return 0.0
    return matmul_flops_per_token * tokens * (3.0 if training else 1.0) / (flops * efficiency)
