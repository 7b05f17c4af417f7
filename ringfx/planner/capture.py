"""What ringfx will run: a module captured with dynamo and rewritten by ringfx's own passes.

The planner models the program that ``ringfx.transform`` runs, not the model's own code:
hand-written ``softmax(q kᵀ) v`` becomes one ring op (no S×S scores), a causal mask built
from sizes becomes the op's ``causal`` flag (and the zigzag layout), and the mask itself
is gone. So a module is captured at each fit length on small real inputs (the mask
analysis evaluates size-built masks), the pipeline runs with a loopback ring (every
value stays at the captured length, which the memory model reads as the local length
s = S/P), and the rewritten graph is what ``simulate.py`` steps through on ``meta``::

    captured:   scores = q @ k.transpose(-2, -1) / 8; scores.masked_fill(~tril, -inf); softmax(scores) @ v
    simulated:  torch.ops.ringfx.ring_attention(q, k, v, ..., causal=True, ...)

A model that dynamo splits into several graphs is simulated as written (eager), with the
sites the passes found still reported.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
import torch.nn as nn

log = logging.getLogger("ringfx.planner")

CAPTURE_RING = 2  # any P > 1: a ring of one rewrites nothing the memory model needs to see


@dataclasses.dataclass
class Capture:
    """One capture at one length: the rewritten graphs and the sites of every attention."""

    graphs: list        # [(GraphModule, example inputs as dynamo gave them)]
    sites: list         # SiteRecord of every attention the passes found (rewritten or not)
    fused_losses: int = 0  # losses the blockwise-loss pass fused (blockwise_loss=)

    @property
    def ring_ops(self) -> list:
        from ..passes.rewrite_attention import ring_attention_nodes

        return [n for gm, _ in self.graphs for n in ring_attention_nodes(gm, nested=True)]


def capture_rewritten(module: nn.Module, inputs: tuple, *, blockwise_loss: int = 0) -> Capture:
    """Capture ``module(*inputs)`` and rewrite it as ``transform`` would (full-length
    inputs, outputs kept on the shard, a loopback ring of ``CAPTURE_RING``; the loss fused
    over chunks of ``blockwise_loss`` tokens when not 0)."""
    from ..capture_once import capture_once
    from ..passes import PassOptions, run_passes

    graphs, sites, fused = [], [], []

    def ringfx_plan_backend(gm, example_inputs):
        options = PassOptions(group_name=f"loopback:{CAPTURE_RING}", ring_size=CAPTURE_RING, loopback=True,
                              inputs="full", gather_outputs=False, layout="contiguous",
                              example_inputs=list(example_inputs), blockwise_loss=blockwise_loss)
        original = gm.forward
        rewritten, reports = run_passes(gm, options=options)
        graphs.append((rewritten, list(example_inputs)))
        sites.extend(s for r in reports if r.name == "rewrite_attention" for s in r.sites)
        fused.extend(r.rewritten for r in reports if r.name == "blockwise_loss")
        return original

    with torch.no_grad():
        capture_once(module, ringfx_plan_backend, tuple(inputs), {})
    return Capture(graphs, sites, sum(fused))


class GraphStep(nn.Module):
    """A captured graph as a module of the user's inputs: the parameters dynamo lifted to
    graph inputs are this module's parameters again (so the simulation counts them as
    parameters, and their gradients as gradients), buffers its buffers."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: list, user_inputs: tuple):
        super().__init__()
        _on_meta(gm)
        self.gm = gm
        self.params = nn.ParameterList()
        self.slots = []  # ("param", i) | ("buffer", name) | ("input", i)
        user = {id(t): i for i, t in enumerate(user_inputs) if isinstance(t, torch.Tensor)}
        seen = {}
        for k, value in enumerate(example_inputs):
            if isinstance(value, nn.Parameter):
                if id(value) not in seen:  # a tied parameter is one parameter
                    seen[id(value)] = len(self.params)
                    self.params.append(nn.Parameter(torch.empty(value.shape, dtype=value.dtype, device="meta"),
                                                    requires_grad=value.requires_grad))
                self.slots.append(("param", seen[id(value)]))
            elif isinstance(value, torch.Tensor) and id(value) in user:
                self.slots.append(("input", user[id(value)]))
            elif isinstance(value, torch.Tensor):
                name = f"buffer_{k}"
                self.register_buffer(name, torch.empty(value.shape, dtype=value.dtype, device="meta"))
                self.slots.append(("buffer", name))
            else:
                self.slots.append(("const", value))

    def forward(self, *inputs):
        args = []
        for kind, where in self.slots:
            args.append(self.params[where] if kind == "param" else getattr(self, where) if kind == "buffer"
                        else inputs[where] if kind == "input" else where)
        return self.gm(*args)


def _on_meta(gm: torch.fx.GraphModule) -> None:
    """Tensors the graph makes (``arange(..., device=cpu)``) are made on ``meta``, beside
    the simulated parameters and inputs."""
    from ..passes.node_facts import hop_subgraphs

    from ..runtime import collectives

    meta = torch.device("meta")

    def move(a):
        return meta if isinstance(a, torch.device) else a

    for g in [gm] + [sub for _, _, sub in hop_subgraphs(gm)]:
        for node in list(g.graph.nodes):
            if node.op == "call_function" and node.target is collectives.shard_sequence:
                # the simulated inputs are this rank's tokens already, and a rank's shard is a
                # slice of them (the loopback ring's index copy is no rank's memory)
                node.replace_all_uses_with(node.args[0])
                g.graph.erase_node(node)
                continue
            node.args = torch.fx.node.map_aggregate(node.args, move)
            node.kwargs = torch.fx.node.map_aggregate(node.kwargs, move)
        g.recompile()


def single_graph_step(capture: Capture, user_inputs: tuple) -> Optional[GraphStep]:
    """The rewritten program as one module, or None when dynamo split the model."""
    if len(capture.graphs) != 1:
        return None
    gm, example = capture.graphs[0]
    return GraphStep(gm, example, user_inputs)
