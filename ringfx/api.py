"""``ringfx.transform`` and ``ringfx.explain``: capture -> passes -> runtime.

    model = ringfx.transform(model, mesh=mesh)        # same call signature
    out = model(ringfx.shard(ids, 1), ringfx.shard(pos, 1))
    print(ringfx.explain(model, ids, pos))            # per-site table, graph breaks

``transform`` captures with dynamo (static shapes unless ``dynamic=True``), rewrites every
attention in every captured graph and runs the rest eagerly (``inner="eager"``, the
default here; ``"inductor"`` / ``"aot_eager"`` to compile it). ``explain`` captures the
same way but runs the *original* graphs, recording the rewritten ones.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ._compat import backend_compiler_failed, fail_past_recompile_limit, recompile_limit_hit, tree_map
from .backend import BackendConfig, CompiledGraph, resolve_group_name, ringfx_backend
from .errors import RingfxWarning, UnsupportedError
from .passes.sites import Decision, SiteRecord
from .runtime import shard, unshard

__all__ = ["ExplainReport", "RingModule", "explain", "transform"]

log = logging.getLogger("ringfx.api")

# graphs one transformed model may compile (one per distinct input shape) before it refuses
RECOMPILE_LIMIT = 64


@dataclass
class ExplainReport:
    """What ringfx found in a model: one row per attention site, the rewritten graphs and
    the graph breaks dynamo made."""

    sites: list[SiteRecord] = field(default_factory=list)
    graph_modules: list[fx.GraphModule] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the guards could not prove right on a ring
    # per graph, what the sharding pass did (inputs sharded, distributed forms, all-gather fallbacks)
    sharding: list[str] = field(default_factory=list)

    @property
    def rewritten(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.decision is Decision.REWRITE]

    @property
    def left_alone(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.decision is not Decision.REWRITE]

    def __str__(self) -> str:
        head = ("graph", "source line", "pattern", "mask", "decision")
        rows = [(str(s.graph_index), s.source_line, s.pattern, s.mask_kind,
                 str(s.decision) + (f": {s.reason}" if s.reason else "")) for s in self.sites]
        widths = [min(60, max(len(r[i]) for r in [head] + rows)) for i in range(4)]
        fmt = lambda r: "  ".join(c[:w].ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4]
        lines = [f"ringfx: {len(self.sites)} attention site(s) in {len(self.graph_modules)} graph(s), "
                 f"{len(self.rewritten)} rewritten, {len(self.left_alone)} left alone, "
                 f"{len(self.graph_breaks)} graph break(s)", fmt(head), fmt(tuple("-" * w for w in widths) + ("-" * 8,))]
        lines += [fmt(r) for r in rows]
        lines += [f"graph break: {b}" for b in self.graph_breaks]
        lines += [f"note: {n}" for n in self.notes]
        lines += self.sharding
        return "\n".join(lines)


@contextlib.contextmanager
def mha_fast_path_off():
    """nn.MultiheadAttention / nn.TransformerEncoderLayer without their fused inference
    kernels (one opaque op with the attention inside): the captured graph then holds the
    attention as ops the passes can find and rewrite. The fused kernel is an inference
    optimisation only; the unfused path computes the same values."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class RingModule(nn.Module):
    """``transform``'s result: calls the compiled model; ``reports`` holds one
    ``CompiledGraph`` per graph compiled so far (sites and rewritten graph module)."""

    def __init__(self, module: nn.Module, compiled, reports: list[CompiledGraph], sequence: "_Sequence" = None):
        super().__init__()
        self.module = module
        self._compiled = compiled
        self.reports = reports
        self._warned = False
        self._sequence = sequence
        self.ring_options: dict = {}  # the ring and layout it was transformed for (read by explain)
        self.__signature__ = inspect.signature(module.forward if isinstance(module, nn.Module) else module)

    def forward(self, *args, **kwargs):
        if self._sequence is not None:
            args, kwargs, local = self._sequence.shard(self.__signature__, args, kwargs)
        # a recompile past dynamo's limit would silently run the unrewritten model: raise
        # instead, after as many graphs as RECOMPILE_LIMIT (one per sequence length)
        try:
            with fail_past_recompile_limit(RECOMPILE_LIMIT), mha_fast_path_off():
                out = self._compiled(*args, **kwargs)
        except recompile_limit_hit() as e:
            raise RuntimeError(
                f"ringfx.transform: this model has been compiled for {RECOMPILE_LIMIT} different input shapes "
                "(each new sequence length or batch size compiles the model again: shapes are static so that "
                "the sequence can be sharded exactly); pad batches to a few bucket lengths, or raise "
                "ringfx.api.RECOMPILE_LIMIT") from e
        except backend_compiler_failed() as e:
            # the backend's own exception, without dynamo's wrapper around it; a refusal that
            # names the user's source line needs no traceback, anything else keeps its own
            inner = getattr(e, "inner_exception", None)
            if isinstance(inner, (UnsupportedError, RingfxWarning)):
                raise inner.with_traceback(None) from None
            if isinstance(inner, (ValueError, TypeError)):
                raise inner from None
            raise
        if self.ring_options.get("gather_outputs") is False and len(self.reports) > 1 and \
                self.ring_options.get("inputs") == "full":
            # a graph's outputs feed the next graph after a break: kept sharded, the next graph
            # would take them for the full sequence
            raise UnsupportedError(
                f"transform(gather_outputs=False): the model was captured in {len(self.reports)} graphs (graph "
                "breaks), and values passed from one graph to the next must be full length; remove the graph "
                "breaks (see ringfx.explain) or keep gather_outputs=True")
        if not self._warned and not self.sites:
            self._warned = True
            log.warning("ringfx.transform: no attention found in %d captured graph(s) of %s; it runs unchanged "
                        "(see ringfx.explain)", len(self.reports), type(self.module).__name__)
        if self._sequence is not None:
            out = self._sequence.gather(out, local)
        return out

    @property
    def sites(self) -> list[SiteRecord]:
        return [s for g in self.reports for s in g.sites]


@dataclass
class _Sequence:
    """Full-length inputs in, full-length outputs out: ``transform(shard_inputs=...,
    gather_outputs=...)``."""

    inputs: object  # argument name -> sequence dim, or "auto"
    output_dim: Optional[int]
    layout: str
    group: str  # the ring's name (ringfx.runtime.group_name_of)
    position_ids: Optional[str] = None  # argument filled with (B, S) global positions when not given

    def shard(self, signature, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        local = None
        inputs = self._auto(bound) if self.inputs == "auto" else self.inputs
        if self.position_ids is not None and bound.arguments.get(self.position_ids) is None:
            bound.arguments[self.position_ids] = self._positions(bound, inputs)
            inputs = {**inputs, self.position_ids: 1}
        for name, dim in inputs.items():
            x = bound.arguments.get(name)
            if x is None:
                continue
            if not isinstance(x, torch.Tensor) or not -x.dim() <= dim < x.dim():
                raise ValueError(f"shard_inputs: argument {name!r} is not a tensor with a dim {dim} "
                                 f"({type(x).__name__}{tuple(x.shape) if isinstance(x, torch.Tensor) else ''})")
            if local is not None and x.shape[dim] != local[0]:
                raise ValueError(f"shard_inputs: {name!r} has {x.shape[dim]} tokens at dim {dim}, other inputs "
                                 f"{local[0]}: every sharded input must hold the same sequence")
            sharded = shard(x, dim, layout=self.layout, group=self.group)
            local = (x.shape[dim], sharded.shape[dim])
            bound.arguments[name] = sharded
        return bound.args, bound.kwargs, local

    @staticmethod
    def _auto(bound) -> dict:
        """``shard_inputs="auto"``: the tensor arguments of two or more dims whose dim 1 has
        the length of the first such argument's (ids, masks, positions, labels, embeddings)."""
        tensors = [(n, x) for n, x in bound.arguments.items() if isinstance(x, torch.Tensor) and x.dim() >= 2]
        if not tensors:
            return {}
        length = tensors[0][1].shape[1]
        return {n: 1 for n, x in tensors if x.shape[1] == length}

    def _positions(self, bound, inputs):
        """0 .. S-1 for every sequence of the batch, from the first sharded input (B, S, ...)."""
        for name, dim in inputs.items():
            x = bound.arguments.get(name)
            if isinstance(x, torch.Tensor) and name != self.position_ids and x.dim() > max(dim, 0):
                return torch.arange(x.shape[dim], device=x.device).expand(x.shape[0], x.shape[dim])
        raise ValueError(f"position_ids={self.position_ids!r}: none of the shard_inputs "
                         f"{sorted(inputs)} was given, so the sequence length is unknown")

    def gather(self, out, local):
        """Every tensor of ``out`` holding the local tokens at ``output_dim``, unsharded."""
        if self.output_dim is None or local is None:
            return out
        d = self.output_dim

        def full(t):
            if isinstance(t, torch.Tensor) and -t.dim() <= d < t.dim() and t.shape[d] == local[1]:
                return unshard(t, d, layout=self.layout, group=self.group)
            return t

        return tree_map(full, out)


def transform(model: nn.Module, mesh=None, **options) -> RingModule:
    """Wrap ``model`` so that it runs on a ring with every attention exact ring attention.

    Called exactly as the untransformed model (full-length inputs, the same on every
    rank, as a data loader yields them), it returns what the untransformed model returns:
    the graph pass shards the sequence inside the captured graphs, gives ops that combine
    tokens (losses, pooling, token selection) their distributed forms, all-gathers where
    it has no exact sharded form (reported by ``ringfx.explain``), and gathers per-token
    outputs back. On a real ring of P > 1 in training, parameter gradients are averaged
    over the ring after each backward (gradient hooks), so they equal single-process
    gradients on every rank with no code in the training loop.

    Args:
        model: any ``nn.Module`` (or callable); not copied, its parameters are shared.
        mesh: the ring: None (default process group), a ProcessGroup, a 1-D DeviceMesh,
            ``(mesh, dim)``, a 2-D DeviceMesh (data parallel x ring: the ring is its
            dim named "cp" or else its last dim; gradients are averaged over the whole
            mesh) or ``ringfx.LoopbackRing(P)``.
        **options: ``layout`` ("contiguous" | "zigzag"), ``inner`` ("eager" default,
            "aot_eager", "inductor", or a backend), ``strict`` (True: raise
            ``UnsupportedError`` for attention that cannot be rewritten on P > 1),
            ``kernel``, ``dynamic`` (passed to torch.compile; default False),
            ``gather_outputs`` (default True; False keeps per-token outputs as each
            rank's tokens), ``inputs`` ("full" default; "sharded": the caller passes
            each rank's tokens from ``ringfx.shard`` and gets its tokens' outputs back,
            as data loaders that read shards do), ``reduce_gradients`` (default True on
            a real ring), ``plan`` ("auto" with ``example_inputs=`` full-length inputs
            and planner keywords such as ``device_memory="80GiB"``, or a
            ``ringfx.Plan``): check the ring against the planner and take its layout,
            ``blockwise_loss`` (True or tokens per chunk: the output projection and its
            cross-entropy run as one op over chunks of tokens, so the logits never exist
            whole; a logits output becomes None; ``explain`` lists what was fused).

    Legacy (with ``inputs="sharded"`` semantics inside): ``shard_inputs={"input_ids": 1}``
    / ``"auto"``, ``gather_outputs=1`` (an int dim) and ``position_ids="position_ids"``
    shard the named arguments in the wrapper instead of in the graph.
    """
    if not callable(model):
        raise TypeError(f"transform(model=...) needs an nn.Module or callable, got {type(model).__name__}")
    dynamic = options.pop("dynamic", False)
    shard_inputs = options.pop("shard_inputs", None)
    gather_outputs = options.pop("gather_outputs", None)
    position_ids = options.pop("position_ids", None)
    reduce_gradients = options.pop("reduce_gradients", True)
    mesh, gradient_group = _ring_and_gradient_group(mesh)
    legacy = shard_inputs is not None or position_ids is not None or (
        gather_outputs is not None and not isinstance(gather_outputs, bool))
    inputs = options.setdefault("inputs", "sharded" if legacy else "full")
    if inputs not in ("full", "sharded"):
        raise ValueError(f"inputs={inputs!r}: use 'full' (the model's own inputs) or 'sharded' (each rank's tokens)")
    if legacy and inputs == "full":
        raise ValueError("shard_inputs= / position_ids= / gather_outputs=<dim> shard in the wrapper; with "
                         "inputs='full' (the default) the graph pass shards by itself: drop them")
    if isinstance(gather_outputs, bool):
        options["gather_outputs"] = gather_outputs
    chosen = _apply_plan(model, mesh, options)
    options.setdefault("inner", "eager")
    reports: list[CompiledGraph] = []
    config = BackendConfig.from_options({**options, "mesh": mesh, "collector": reports})
    backend = _bound_backend(config)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    sequence = None
    if legacy:
        sequence = _sequence_options(model, shard_inputs, gather_outputs, config.pass_options.layout,
                                     config.pass_options.group_name, position_ids)
    ring = RingModule(model, compiled, reports, sequence)
    ring.ring_options = {"group": config.pass_options.group_name, "layout": config.pass_options.layout,
                         "inputs": config.pass_options.inputs,
                         "gather_outputs": config.pass_options.gather_outputs,
                         "blockwise_loss": config.pass_options.blockwise_loss}
    ring.plan = chosen
    ring.gradient_hooks = []
    if (reduce_gradients and inputs == "full" and isinstance(model, nn.Module)
            and not config.pass_options.loopback and config.pass_options.ring_size > 1):
        from .runtime.gradients import average_gradients

        group = gradient_group if gradient_group is not None else _group_of(config.pass_options.group_name)
        ring.gradient_hooks = average_gradients(model, group)
    return ring


def _group_of(name: str):
    from .runtime.ring import resolve_group

    return resolve_group(name)


def _ring_and_gradient_group(mesh):
    """A 2-D DeviceMesh (data parallel x ring) -> (its ring dim, the group of all its
    ranks, over which gradients are averaged); anything else -> (mesh, None)."""
    if type(mesh).__name__ != "DeviceMesh" or mesh.ndim == 1:
        return mesh, None
    if mesh.ndim != 2:
        raise ValueError(f"transform(mesh=...): a {mesh.ndim}-D DeviceMesh; pass a 1-D ring or a 2-D "
                         "(data parallel, ring) mesh")
    names = mesh.mesh_dim_names or ()
    ring_dim = names.index("cp") if "cp" in names else 1
    import torch.distributed as dist

    ranks = mesh.mesh.flatten().tolist()
    everyone = dist.new_group(ranks) if sorted(ranks) != list(range(dist.get_world_size())) else dist.group.WORLD
    return (mesh, names[ring_dim] if names else ring_dim), everyone


def _sequence_options(model, shard_inputs, gather_outputs, layout: str, group_name: str,
                      position_ids=None) -> _Sequence:
    if gather_outputs is not None and (isinstance(gather_outputs, bool) or not isinstance(gather_outputs, int)):
        raise TypeError(f"gather_outputs= takes the outputs' sequence dim (an int), not {gather_outputs!r}")
    params = inspect.signature(model.forward if isinstance(model, nn.Module) else model).parameters
    if isinstance(shard_inputs, str) and shard_inputs != "auto":
        raise ValueError(f"shard_inputs={shard_inputs!r}: pass 'auto' or a dict of argument name -> sequence dim")
    inputs = "auto" if shard_inputs == "auto" else dict(shard_inputs or {})
    for name, dim in (inputs.items() if isinstance(inputs, dict) else ()):
        if name not in params:
            raise ValueError(f"shard_inputs: the model takes no argument {name!r}; its arguments are {list(params)}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"shard_inputs[{name!r}] must be the argument's sequence dim (an int), not {dim!r}")
    if position_ids is not None:
        if position_ids not in params:
            raise ValueError(f"position_ids={position_ids!r}: the model takes no such argument; its arguments "
                             f"are {list(params)}")
        if not inputs:
            raise ValueError("position_ids= fills positions for full-length calls: name the sequence inputs "
                             "with shard_inputs= too")
        if isinstance(inputs, dict):
            inputs.setdefault(position_ids, 1)
    return _Sequence(inputs, gather_outputs, layout, group_name, position_ids)


_PLAN_KEYS = ("example_inputs", "seq_dim", "device_memory", "flops", "bandwidth", "headroom", "causal",
              "batch_size", "loss_fn", "training", "precision", "optimizer", "activation_checkpointing",
              "param_shards")


def _apply_plan(model, mesh, options: dict):
    """``plan="auto"`` (with ``example_inputs=``: full-length inputs) or a ``Plan``: check
    that the ring fits the plan and take its layout. The chosen plan is returned (and
    kept as ``transform(...).plan``); shard the inputs with ``plan.layout``."""
    chosen = options.pop("plan", None)
    plan_kwargs = {k: options.pop(k) for k in _PLAN_KEYS if k in options}
    if chosen is None:
        if plan_kwargs:
            raise ValueError(f"{sorted(plan_kwargs)} are planner options; pass them with plan='auto'")
        return None
    from .planner import Plan, plan_from_inputs
    from .runtime import ring_size

    world = ring_size(resolve_group_name(mesh))
    if isinstance(chosen, str) and chosen == "auto":
        if "example_inputs" not in plan_kwargs:
            raise ValueError("plan='auto' needs example_inputs=(...): the model's full-length inputs "
                             "(on the meta device is fine), from which the planner reads S and traces memory")
        example = plan_kwargs.pop("example_inputs")
        plan_kwargs.setdefault("blockwise_loss", options.get("blockwise_loss", False))  # the program transform runs
        chosen = plan_from_inputs(model, example, world_size=world, **plan_kwargs)
    elif not isinstance(chosen, Plan):
        raise TypeError(f"plan= must be 'auto' or a ringfx.Plan, not {type(chosen).__name__}")
    if not chosen.feasible:
        raise ValueError(f"the planner finds no ring that fits:\n{chosen}")
    if chosen.ring_size > world:
        raise ValueError(f"the plan needs a ring of {chosen.ring_size} devices but the mesh has {world}:\n{chosen}")
    if chosen.ring_size < world:
        # more devices never need more memory per device: the whole mesh fits too
        logging.getLogger("ringfx.api").info(
            "the plan fits on %d devices; running on the whole ring of %d", chosen.ring_size, world)
    if chosen.layout in ("contiguous", "zigzag"):  # a plan for one device names no layout
        if "layout" in options and options["layout"] != chosen.layout:
            raise ValueError(f"layout={options['layout']!r} contradicts the plan's layout {chosen.layout!r}")
        options["layout"] = chosen.layout
    if chosen.options.blockwise_loss and not options.get("blockwise_loss"):
        options["blockwise_loss"] = chosen.options.blockwise_loss  # the plan's memory assumes the fused loss
    return chosen


def explain(model, *args, **kwargs) -> ExplainReport:
    """Capture ``model(*args, **kwargs)``, find and classify its attention, and report.

    The model runs unchanged (the rewritten graphs are recorded, not run). Decisions are
    those for the default ring (the default process group if initialised, else one rank),
    or, for a ``transform``'s result, for its ring and layout (its ``shard_inputs`` shard
    the arguments first), with the guards' notes (``ExplainReport.notes``). Other compiled
    models, a ``transform``'s result included, keep their compiled graphs: the capture
    leaves dynamo's caches as it found them (``ringfx.capture_once``).
    """
    from .capture_once import capture_once

    if not callable(model):
        raise TypeError(f"explain(model=...) needs an nn.Module or callable, got {type(model).__name__}")
    ring_options = {}
    if isinstance(model, RingModule):
        ring_options = dict(model.ring_options)
        if model._sequence is not None:
            args, kwargs, _ = model._sequence.shard(model.__signature__, args, kwargs)
        model = model.module
    collected: list[CompiledGraph] = []
    config = BackendConfig.from_options({**ring_options, "inner": "eager", "strict": False, "execute": "original",
                                         "collector": collected})
    breaks: list[str] = []

    def ringfx_explain_backend(gm, example_inputs):
        reason = getattr(gm, "compile_subgraph_reason", None)  # set by dynamo on every graph it hands over
        if reason is not None and reason.graph_break:
            breaks.append(_first_line(reason.reason))
        return ringfx_backend(gm, example_inputs, options=config)

    with mha_fast_path_off():
        capture_once(model, ringfx_explain_backend, args, kwargs)
    sites = [s for g in collected for s in g.sites]
    names = pattern_names()
    for s in sites:
        name = names.get((s.pattern, s.mask_kind))
        if name is not None and name != s.pattern:
            s.pattern = f"{name} [{s.pattern}]"
    sharding = [f"graph {g.index} {line}" for g in collected if g.sharding is not None for line in g.sharding.summary()]
    sharding += [f"graph {g.index} {line}" for g in collected if g.blockwise_loss is not None
                 for line in g.blockwise_loss.summary()]
    return ExplainReport(sites, [g.graph_module for g in collected], breaks, [n for g in collected for n in g.notes],
                         sharding)


@functools.lru_cache(maxsize=1)
def pattern_names() -> dict:
    """``(spelling, mask kind) -> table name`` for the spellings of ``passes.patterns``,
    found by tracing each pattern function as a model would be traced."""
    from .capture_once import capture_once
    from .passes.patterns import PATTERNS

    names = {}
    for pattern in PATTERNS:
        found: list[CompiledGraph] = []
        config = BackendConfig.from_options({"inner": "eager", "strict": False, "execute": "original",
                                             "collector": found})
        capture_once(pattern.fn, _bound_backend(config), pattern.example_inputs(8), {})
        for site in (s for g in found for s in g.sites):
            names.setdefault((site.pattern, site.mask_kind), pattern.name)
    return names


def _first_line(reason) -> str:
    lines = [l.strip() for l in str(reason).splitlines() if l.strip()]
    return lines[0] if lines else "unknown"


def _bound_backend(config: BackendConfig):
    def ringfx_bound_backend(gm, example_inputs):
        return ringfx_backend(gm, example_inputs, options=config)

    return ringfx_bound_backend
