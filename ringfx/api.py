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

import functools
import inspect
import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from .backend import BackendConfig, CompiledGraph, resolve_group_name, ringfx_backend
from .errors import RingfxWarning, UnsupportedError
from .passes.sites import SiteRecord

__all__ = ["ExplainReport", "RingModule", "explain", "transform"]

log = logging.getLogger("ringfx.api")


@dataclass
class ExplainReport:
    """What ringfx found in a model: one row per attention site, the rewritten graphs and
    the graph breaks dynamo made."""

    sites: list[SiteRecord] = field(default_factory=list)
    graph_modules: list[fx.GraphModule] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the guards could not prove right on a ring

    @property
    def rewritten(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.decision == "rewritten"]

    @property
    def left_alone(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.decision != "rewritten"]

    def __str__(self) -> str:
        head = ("graph", "source line", "pattern", "mask", "decision")
        rows = [(str(s.graph_index), s.source_line, s.pattern, s.mask_kind,
                 s.decision + (f": {s.reason}" if s.reason else "")) for s in self.sites]
        widths = [min(60, max(len(r[i]) for r in [head] + rows)) for i in range(4)]
        fmt = lambda r: "  ".join(c[:w].ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4]
        lines = [f"ringfx: {len(self.sites)} attention site(s) in {len(self.graph_modules)} graph(s), "
                 f"{len(self.rewritten)} rewritten, {len(self.left_alone)} left alone, "
                 f"{len(self.graph_breaks)} graph break(s)", fmt(head), fmt(tuple("-" * w for w in widths) + ("-" * 8,))]
        lines += [fmt(r) for r in rows]
        lines += [f"graph break: {b}" for b in self.graph_breaks]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class RingModule(nn.Module):
    """``transform``'s result: calls the compiled model; ``reports`` holds one
    ``CompiledGraph`` per graph compiled so far (sites and rewritten graph module)."""

    def __init__(self, module: nn.Module, compiled, reports: list[CompiledGraph]):
        super().__init__()
        self.module = module
        self._compiled = compiled
        self.reports = reports
        self._warned = False
        self.__signature__ = inspect.signature(module.forward if isinstance(module, nn.Module) else module)

    def forward(self, *args, **kwargs):
        # a recompile past dynamo's limit would silently run the unrewritten model
        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                out = self._compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None)
            if isinstance(inner, (UnsupportedError, RingfxWarning, ValueError, TypeError)):
                raise inner.with_traceback(None) from None
            raise
        if not self._warned and not self.sites:
            self._warned = True
            log.warning("ringfx.transform: no attention found in %d captured graph(s) of %s; it runs unchanged "
                        "(see ringfx.explain)", len(self.reports), type(self.module).__name__)
        return out

    @property
    def sites(self) -> list[SiteRecord]:
        return [s for g in self.reports for s in g.sites]


def transform(model: nn.Module, mesh=None, **options) -> RingModule:
    """Wrap ``model`` so that every attention runs as exact ring attention on ``mesh``.

    Args:
        model: any ``nn.Module`` (or callable); not copied, its parameters are shared.
        mesh: the ring: None (default process group), a ProcessGroup, a 1-D DeviceMesh,
            ``(mesh, dim)`` or ``ringfx.LoopbackRing(P)``.
        **options: ``layout`` ("contiguous" | "zigzag"), ``inner`` ("eager" default,
            "aot_eager", "inductor", or a backend), ``strict`` (True: raise
            ``UnsupportedError`` for attention that cannot be rewritten on P > 1),
            ``kernel``, ``dynamic`` (passed to torch.compile; default False),
            ``plan`` ("auto" with ``example_inputs=`` full-length inputs and planner
            keywords such as ``device_memory="80GiB"``, or a ``ringfx.Plan``): check the
            ring against the planner and take its layout (kept as ``.plan``).

    The caller shards the sequence inputs with ``ringfx.shard`` (same layout and ring).
    """
    if not callable(model):
        raise TypeError(f"transform(model=...) needs an nn.Module or callable, got {type(model).__name__}")
    dynamic = options.pop("dynamic", False)
    chosen = _apply_plan(model, mesh, options)
    options.setdefault("inner", "eager")
    reports: list[CompiledGraph] = []
    config = BackendConfig.from_options({**options, "mesh": mesh, "collector": reports})
    backend = _bound_backend(config)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    ring = RingModule(model, compiled, reports)
    ring.plan = chosen
    return ring


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
    return chosen


def explain(model, *args, **kwargs) -> ExplainReport:
    """Capture ``model(*args, **kwargs)``, find and classify its attention, and report.

    The model runs unchanged (the rewritten graphs are recorded, not run). Decisions are
    those for the default ring (the default process group if initialised, else one rank).
    """
    if isinstance(model, RingModule):
        model = model.module
    collected: list[CompiledGraph] = []
    config = BackendConfig.from_options({"inner": "eager", "strict": False, "execute": "original",
                                         "collector": collected})
    torch._dynamo.reset()
    torch.compile(model, backend=_bound_backend(config), dynamic=False)(*args, **kwargs)
    breaks: list[str] = []
    if len(collected) > 1:
        torch._dynamo.reset()
        out = torch._dynamo.explain(model)(*args, **kwargs)
        breaks = [_first_line(getattr(b, "reason", b)) for b in out.break_reasons]
    torch._dynamo.reset()
    sites = [s for g in collected for s in g.sites]
    names = pattern_names()
    for s in sites:
        name = names.get((s.pattern, s.mask_kind))
        if name is not None and name != s.pattern:
            s.pattern = f"{name} [{s.pattern}]"
    return ExplainReport(sites, [g.graph_module for g in collected], breaks, [n for g in collected for n in g.notes])


@functools.lru_cache(maxsize=1)
def pattern_names() -> dict:
    """``(spelling, mask kind) -> table name`` for the spellings of ``passes.patterns``,
    found by tracing each pattern function as a model would be traced."""
    from .passes.patterns import PATTERNS

    names = {}
    for pattern in PATTERNS:
        found: list[CompiledGraph] = []
        config = BackendConfig.from_options({"inner": "eager", "strict": False, "execute": "original",
                                             "collector": found})
        torch._dynamo.reset()
        torch.compile(pattern.fn, backend=_bound_backend(config), dynamic=False)(*pattern.example_inputs(8))
        for site in (s for g in found for s in g.sites):
            names.setdefault((site.pattern, site.mask_kind), pattern.name)
    torch._dynamo.reset()
    return names


def _first_line(reason) -> str:
    lines = [l.strip() for l in str(reason).splitlines() if l.strip()]
    return lines[0] if lines else "unknown"


def _bound_backend(config: BackendConfig):
    def ringfx_bound_backend(gm, example_inputs):
        return ringfx_backend(gm, example_inputs, options=config)

    return ringfx_bound_backend
