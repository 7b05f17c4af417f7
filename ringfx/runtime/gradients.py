"""Parameter gradients of a model sharded along the sequence: averaged over the ring.

Each rank of a ring computes the gradient of its own tokens (and, by the convention of
``collectives``, of replicated values such that the ring's average is the true
gradient). One all-reduce per parameter after its gradient is accumulated makes every
rank's ``.grad`` the single-process gradient. Over a 2-D mesh (data parallel x ring) the
average runs over all its ranks, which is the data-parallel average of the true gradients.

Why hooks and not DDP or FSDP2: both need the model wrapped before it is captured, and
DDP under dynamo splits the graph at bucket boundaries; a post-accumulate hook needs no
wrapper, no change to the training loop, and is exact under gradient accumulation (the
average of an already averaged gradient plus a new one is the sum of both averages).
Users who wrap the model in DDP/FSDP over the whole mesh themselves pass
``reduce_gradients=False``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def average_gradients(params, group) -> list:
    """Register, on every parameter in ``params`` (a module's or an iterable) that requires
    grad, a hook that averages its accumulated gradient over ``group``; a parameter that has
    such a hook already (``transform`` and the compile backend may both see it) gets none.
    Returns the new hooks' handles."""
    world = dist.get_world_size(group)

    def hook(param: torch.Tensor) -> None:
        if param.grad is None:
            return
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)
        param.grad.div_(world)

    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    handles = []
    for p in params:
        if p.requires_grad and not getattr(p, _MARK, False):
            setattr(p, _MARK, True)
            handles.append(p.register_post_accumulate_grad_hook(hook))
    return handles


_MARK = "_ringfx_gradient_averaged"
