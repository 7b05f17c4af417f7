"""The ``torch.compile`` backend: ``torch.compile(model, backend="ringfx")``.

Registered through the ``torch_dynamo_backends`` entry point, so the name resolves
without importing ringfx. Dynamo hands over each captured (torch-level) graph; the
attention passes rewrite it and the result goes to an inner compiler (inductor unless
``options={"inner": "aot_eager" | "eager" | callable}``).

Options (``torch.compile(..., options={...})`` arrives here as ``options``):

    group / mesh   the ring: None (default process group if initialised, else a ring of
                   one), a ProcessGroup, a 1-D DeviceMesh, (mesh, dim), a LoopbackRing, a name
    layout         "contiguous" (default) or "zigzag"; must match how inputs were sharded
    inner          "inductor" (default), "aot_eager", "eager", or a backend callable
    strict         True (default): on a ring of P > 1, an attention that cannot be
                   rewritten raises UnsupportedError instead of running wrongly on shards
    kernel         per-block kernel of the ring op ("auto")
    inputs         "full" (default): the model is called as it is, with full-length inputs on
                   every rank; the graph is sharded along the sequence by the pass and
                   per-token outputs are gathered back. "sharded": the caller passes each
                   rank's tokens (ringfx.shard) and gets its tokens' outputs
    gather_outputs with inputs="full": False keeps per-token outputs sharded (long logits)
    sequence_inputs with inputs="full": {"input_ids": 1, ...} names the inputs to shard where they
                   enter (default: every input with an axis of an attention's sequence length)
    fallbacks      with inputs="full": "gather" (default: an op with no sharded form gets its
                   activations all-gathered, exact and warned) or "error" (UnsupportedError)
    blockwise_loss True or tokens per chunk: the output projection and its cross-entropy run as
                   one op over chunks of tokens (the logits never exist whole; a logits output
                   of the graph becomes None). False (default): as the model writes it
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.distributed as dist
import torch.fx as fx

from ._compat import inductor_compile, lookup_backend
from .errors import RingfxWarning, UnsupportedError
from .passes import PassOptions, run_passes
from .blockwise import chunk_tokens
from .passes.sites import Decision, SiteRecord

log = logging.getLogger("ringfx.backend")

_KNOWN = {"group", "mesh", "layout", "inner", "strict", "kernel", "collector", "execute", "inputs",
          "gather_outputs", "sequence_inputs", "fallbacks", "blockwise_loss"}


@dataclass
class CompiledGraph:
    """One graph the backend saw: its rewritten module and its attention sites."""

    index: int
    graph_module: fx.GraphModule
    sites: list[SiteRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the guards could not prove right
    sharding: Any = None  # the sharding pass's ShardingReport (inputs="full" on a ring of P > 1)
    blockwise_loss: Any = None  # the blockwise-loss pass's report (what was fused, what was not and why)


@dataclass
class BackendConfig:
    pass_options: PassOptions
    inner: Any = "inductor"
    strict: bool = True
    # explain() runs the original graph while it records the rewritten one
    execute: str = "rewritten"
    collector: Optional[list] = None

    @staticmethod
    def from_options(options: Optional[dict]) -> "BackendConfig":
        options = dict(options or {})
        unknown = set(options) - _KNOWN
        if unknown:
            raise ValueError(f"unknown ringfx option(s) {sorted(unknown)}; known: {sorted(_KNOWN - {'collector', 'execute'})}")
        if "group" in options and "mesh" in options and options["group"] is not options["mesh"]:
            raise ValueError("pass the ring as either group= or mesh=, not both")
        group = options.get("group", options.get("mesh"))
        name = resolve_group_name(group)
        from .runtime import ring_size

        size = ring_size(name)
        inner = options.get("inner", "inductor")
        if not (callable(inner) or inner in ("inductor", "aot_eager", "eager")):
            raise ValueError(f"inner={inner!r}: use 'inductor', 'aot_eager', 'eager' or a backend callable")
        execute = options.get("execute", "rewritten")
        if execute not in ("rewritten", "original"):
            raise ValueError(f"execute={execute!r}: use 'rewritten' or 'original'")
        return BackendConfig(
            PassOptions(group_name=name, layout=options.get("layout", "contiguous"), ring_size=size,
                        loopback=name.startswith("loopback:"), kernel=options.get("kernel", "auto"),
                        inputs=options.get("inputs", "full"),
                        gather_outputs=bool(options.get("gather_outputs", True)),
                        sequence_inputs=_sequence_inputs(options.get("sequence_inputs")),
                        fallbacks=options.get("fallbacks", "gather"),
                        blockwise_loss=chunk_tokens(options.get("blockwise_loss"))),
            inner=inner, strict=bool(options.get("strict", True)), execute=execute,
            collector=options.get("collector"))


_warned_no_group = False  # the ring-of-one warning is logged once per process


def _sequence_inputs(named) -> tuple:
    """``{"input_ids": 1}`` -> ``(("input_ids", 1),)``, checked."""
    if named is None:
        return ()
    if not isinstance(named, dict) or not all(isinstance(k, str) and isinstance(d, int) and not isinstance(d, bool)
                                              for k, d in named.items()):
        raise TypeError(f"sequence_inputs= takes a dict of argument name -> sequence dim, e.g. "
                        f"{{'input_ids': 1}}; got {named!r}")
    return tuple(sorted(named.items()))


def resolve_group_name(group: Any) -> str:
    """The ring op's group name for ``group`` (None: the default process group when
    torch.distributed is initialised, otherwise a loopback ring of one rank)."""
    from .runtime import group_name_of

    if group is None and not (dist.is_available() and dist.is_initialized()):
        global _warned_no_group
        if not _warned_no_group:
            _warned_no_group = True
            log.warning("ringfx: no ring given and torch.distributed is not initialised: running as a ring of "
                        "one rank (call torch.distributed.init_process_group, or pass mesh= / group=)")
        return "loopback:1"
    return group_name_of(group)


def ringfx_backend(gm: fx.GraphModule, example_inputs, **kwargs) -> Callable:
    """Dynamo backend: rewrite attention in ``gm``, then compile it with the inner backend."""
    options = kwargs.pop("options", None)
    if kwargs:
        options = {**(options or {}), **kwargs}
    config = options if isinstance(options, BackendConfig) else BackendConfig.from_options(options)
    original = None
    if config.execute == "original":
        graph, values = fx.Graph(), {}
        graph.output(graph.graph_copy(gm.graph, values))
        original = fx.GraphModule(gm, graph)
    pass_options = dataclasses.replace(config.pass_options, example_inputs=list(example_inputs))
    gm, reports = run_passes(gm, options=pass_options)
    records = next(r for r in reports if r.name == "rewrite_attention").sites
    notes = [n for r in reports for n in r.notes]
    if config.collector is not None:
        index = len(config.collector)
        for r in records:
            r.graph_index = index
        sharding = next((r for r in reports if r.name == "shard_sequence"), None)
        fused = next((r for r in reports if r.name == "blockwise_loss"), None)
        config.collector.append(CompiledGraph(index, gm, records, notes, sharding, fused))
    if config.execute != "original":  # explain() reports them instead
        for note in notes:
            _warn_at(f"ringfx: {note}", getattr(note, "filename", ""), getattr(note, "lineno", 0))
        if not records and config.collector is None:  # transform() says it once per model
            log.warning("ringfx backend: no attention found in this captured graph (%d nodes); it runs unchanged "
                        "(see ringfx.explain)", len(gm.graph.nodes))
    _check_strict(records, config)
    if original is not None:
        return original.forward
    _average_parameter_gradients(example_inputs, config.pass_options)
    return compile_inner(gm, example_inputs, config.inner)


def _average_parameter_gradients(example_inputs, options) -> None:
    """With full-length inputs on a real ring, a rank's parameter gradients average to the
    true ones over the ring (``runtime/collectives.py``): the parameters this graph reads
    get averaging hooks (once each; ``transform`` registers them first for its model)."""
    if options.inputs != "full" or options.loopback or options.ring_size == 1:
        return
    import torch

    from .runtime.gradients import average_gradients
    from .runtime.ring import resolve_group

    params = [t for t in example_inputs if isinstance(t, torch.nn.Parameter)]
    if params:
        average_gradients(params, resolve_group(options.group_name))


def _warn_at(message: str, filename: str, lineno: int) -> None:
    """A RingfxWarning that points at the user's source line (not at ringfx's own code)."""
    if filename:
        warnings.warn_explicit(message, RingfxWarning, filename, lineno, module=filename.rsplit("/", 1)[-1][:-3])
    else:
        warnings.warn(message, RingfxWarning, stacklevel=3)


def _check_strict(sites, config: BackendConfig) -> None:
    if config.pass_options.ring_size == 1 or config.execute == "original":
        return
    left = [s for s in sites if s.decision is not Decision.REWRITE]
    if not config.strict:  # run as asked, but never wrong without a word
        for s in left:
            _warn_at(f"ringfx: attention at {s.source_line} ({s.pattern}) is left alone: {s.reason}. strict=False: "
                     f"on a ring of {config.pass_options.ring_size} ranks it runs on this rank's shard only "
                     "(wrong unless the model needs no other rank's tokens)", s.filename, s.lineno)
        return
    if left:
        s = left[0]
        raise UnsupportedError(
            f"attention at {s.source_line} ({s.pattern}) cannot be rewritten: {s.reason}. On a ring of "
            f"{config.pass_options.ring_size} ranks it would attend only to this rank's shard. Change the "
            "model as the reason says, or pass strict=False to run it unrewritten (wrong on shards)")


def compile_inner(gm: fx.GraphModule, example_inputs, inner) -> Callable:
    if callable(inner):
        return inner(gm, example_inputs)
    if inner == "eager":
        return eager_checkpointing(token_major_outputs(gm)).forward
    with compile_cache_tag():
        if inner == "inductor":
            return _tagged_inductor(gm, example_inputs)
        return lookup_backend(inner)(gm, example_inputs)


# ---- torch.compile's on-disk caches ------------------------------------------------------
#
# Inductor's FX graph cache and AOTAutograd's cache key a compiled graph by its code, its
# inputs and torch's own state, not by the schemas of the custom ops the code calls: a
# graph compiled against one ringfx's ``ringfx::ring_attention`` could be loaded by a
# ringfx whose op takes other arguments (seen: an 18-argument call into a 17-argument
# checkout). ``torch.compiler.config.cache_key_tag`` is torch's documented part of every
# such key; while ringfx's inner compiler runs, ringfx appends its version and a hash of
# every ``ringfx::`` op schema to it. Scoped, not global: the user's other compiles keep
# their keys (and their cache entries). AOTAutograd compiles a backward lazily, at the
# first backward call, outside this scope: inductor's per-graph compiler is wrapped so
# that the backward graph's key carries the tag too.


def ringfx_cache_tag() -> str:
    """``ringfx-<version>-<hash>``: the hash (sha256, 16 hex digits) of the schema of every
    registered ``ringfx::`` op, every overload, sorted."""
    import hashlib

    import torch

    from . import __version__, blockwise  # noqa: F401  (every module that defines a ringfx op)
    from .runtime import collectives, op, token_moves  # noqa: F401

    names = sorted({n.split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("ringfx::")})
    schemas = sorted(str(s) for n in names for s in torch._C._jit_get_schemas_for_operator(n))
    digest = hashlib.sha256("\n".join(schemas).encode()).hexdigest()[:16]
    return f"ringfx-{__version__}-{digest}"


class compile_cache_tag:
    """Context manager: ``torch.compiler.config.cache_key_tag`` is the user's tag (if any)
    followed by ``ringfx_cache_tag()`` inside, restored on exit. A no-op on a torch
    without that option."""

    def __enter__(self):
        import torch.compiler

        config = getattr(torch.compiler, "config", None)
        self._patch = None
        if config is not None and hasattr(config, "cache_key_tag"):
            user = config.cache_key_tag
            ours = ringfx_cache_tag()
            if ours not in user.split("|"):
                self._patch = config.patch(cache_key_tag=f"{user}|{ours}" if user else ours)
                self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        if self._patch is not None:
            self._patch.__exit__(*exc)
        return False


def _tagged_inductor(gm: fx.GraphModule, example_inputs) -> Callable:
    """Inductor (as ``inductor_compile``), its forward and (lazy) backward graphs each
    compiled under ``compile_cache_tag``."""
    try:
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    except ImportError:  # another torch layout: the forward's keys carry the tag (we are inside it)
        return inductor_compile(gm, example_inputs)

    def inner_compile(*args, **kwargs):
        with compile_cache_tag():
            return compile_fx_inner(*args, **kwargs)

    return compile_fx(gm, example_inputs, inner_compile=inner_compile)


def token_major_outputs(gm: fx.GraphModule) -> fx.GraphModule:
    """Ask every ring op of ``gm`` (and of its checkpointed bodies) for its output laid out
    (B, S, H, D) in memory, as SDPA's fused kernels return theirs: a model's
    ``out.transpose(1, 2).reshape(B, S, H * D)`` is then a view, and the output projection
    saves the op's output rather than a copy of it (measured on an H200: 1 GiB at 16K and
    4 GiB at 64K of a 16-layer 1B LLaMA without checkpointing). Only for the eager inner
    compiler, which runs the graph as it is; inductor plans its own layouts."""
    from .passes.node_facts import hop_subgraphs
    from .passes.rewrite_attention import ring_attention_nodes

    for module in [gm, *(sub for _, _, sub in hop_subgraphs(gm))]:
        for node in ring_attention_nodes(module):
            node.kwargs = {**node.kwargs, "token_major": True}
        module.recompile()
    return gm


def eager_checkpointing(gm: fx.GraphModule) -> fx.GraphModule:
    """Run a captured graph's checkpointed regions as ``torch.utils.checkpoint`` calls.

    Dynamo captures ``checkpoint(fn, ...)`` as ``tag_activation_checkpoint(body, ...)``, a tag
    that AOTAutograd's partitioner turns into recomputation. Run eagerly (the default inner
    compiler), torch 2.11's version of that op saves every activation of the body (measured:
    3x the memory of the untransformed model on a 1B LLaMA); calling the body through
    non-reentrant ``checkpoint`` keeps the recomputation on every torch version::

        tag_activation_checkpoint(wrap_body_0, x, w, use_reentrant=False)
        ->  checkpoint_body(wrap_body_0, x, w)
    """
    import torch

    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    if hop is None or not any(n.op == "call_function" and n.target is hop for n in gm.graph.nodes):
        return gm
    graph = fx.Graph()  # a copy: the graph reported by explain keeps the op dynamo captured
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in graph.nodes:
        if node.op == "call_function" and node.target is hop:
            node.target = checkpoint_body
            node.kwargs = {}
    graph.lint()
    return fx.GraphModule(gm, graph)


def checkpoint_body(body, *args):
    """``body(*args)`` under non-reentrant activation checkpointing, returning a tuple."""
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint(body, *args, use_reentrant=False)
