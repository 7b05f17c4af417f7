"""``plan(model_or_graph_or_config, seq_len, ...) -> Plan``: the smallest ring that fits.

For each ring size P (divisors of the world size, or powers of two offline) the memory
model gives the predicted peak per device at (S, P); the first P whose peak is within
``(1 - headroom)`` of device memory wins, with query chunking raised only when the ring's
per-step temporaries are what keeps it from fitting.  The plan carries its numbers (peak,
split, time per step, the c >= F/B overlap test) and the reasons for each choice; an
infeasible request says what would make it fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time
from fractions import Fraction
from typing import Callable, Optional, Union

import sympy
import torch

from . import presets as _presets
from .device import DeviceSpec, device_spec, parse_seq_len
from .layer_extrapolation import EXTRAPOLATE_FROM, NotExtrapolable, extrapolated_runs
from .memory import MemoryModel, P, S, TrainingOptions, s_local, static_terms
from .simulate import GRADIENTS, LOGITS, _layer_list, fit_peak_envelope, simulate_step
from .timing import attention_time, other_matmul_time

log = logging.getLogger("ringfx.planner")

CONFIG_FIT_POINTS = (256, 512, 768, 1024)  # three to fit the polynomials, the fourth to check them
MIN_QUERY_CHUNK = 256
SLOW_STEP_S = 0.5  # a simulation longer than this gets a progress line of its own
MAX_QUERY_CHUNKS = 64


@contextlib.contextmanager
def progress_on_stderr(enabled: bool = True):
    """The planner's progress lines (logger ``ringfx.planner`` at INFO) on stderr while the
    block runs, as ``ringfx plan: <line>``; nothing when not ``enabled``."""
    if not enabled:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ringfx plan: %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _gib(n) -> str:
    n = float(n)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _seconds(t: float) -> str:
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


# -- the memory model of a model, a graph or a config --------------------------------------------


@dataclasses.dataclass
class _Target:
    name: str
    module: torch.nn.Module
    make_inputs: Callable[[int], tuple]
    points: tuple
    loss_fn: Optional[Callable]
    matmul_flops_per_token: Optional[float]
    causal: Optional[bool]
    fits: dict = dataclasses.field(default_factory=dict)  # envelope fits, shared by every plan of a config
    sites: Optional[list] = None   # attention the passes found (None: not captured, a config's SDPA)
    steps: dict = dataclasses.field(default_factory=dict)  # fit length -> the rewritten program as a module
    notes: list = dataclasses.field(default_factory=list)
    layers: Optional[int] = None
    # chunk tokens -> an ``inputs -> loss`` module with the LM head and loss fused (configs); None:
    # a module's own program, where the capture fuses what transform would (``fused_losses``)
    blockwise: Optional[Callable[[int], torch.nn.Module]] = None
    fused_losses: Optional[int] = None
    # layer count -> (the same model with that many layers, its ``blockwise``): the simulation
    # extrapolates in the layer count (``layer_extrapolation.py``); None: the whole model is simulated
    with_layers: Optional[Callable[[int], tuple]] = None


# configs build the same reference module every time: their fits are kept for the process
_CONFIG_FITS: dict = {}


def _resolve(model, *, example_inputs, seq_dim, loss_fn, batch_size, blockwise_loss: int = 0) -> _Target:
    if isinstance(model, str):
        from .models import resolve_model

        if model not in _presets.PRESETS:
            log.info("loading model %s ...", model)
        model = resolve_model(model)
        if isinstance(model, tuple):  # a factory's (module, example_inputs)
            model, example_inputs = model[0], example_inputs if example_inputs is not None else model[1]
    if isinstance(model, _presets.ModelConfig):
        cfg = model
        module = _presets.build_reference_model(cfg)
        fits = _CONFIG_FITS.setdefault((cfg, batch_size), {}) if loss_fn is None else {}
        return _Target(cfg.name, module, lambda n: _presets.example_ids(cfg, n, batch_size), CONFIG_FIT_POINTS,
                       loss_fn or _presets.lm_loss, _presets.flops_per_token(cfg) * batch_size, cfg.causal, fits,
                       layers=cfg.layers,
                       blockwise=None if loss_fn else lambda chunk: _presets.BlockwiseLossStep(module, chunk),
                       with_layers=None if loss_fn else _preset_with_layers(cfg))
    if _is_transformers_config(model):
        from .models import transformers_target_parts

        log.info("building %s from its config on the meta device ...", model.model_type)
        name, module, make_inputs, hf_loss, flops, fused_step = transformers_target_parts(model, batch_size)
        layers = _layer_list(module)
        return _Target(name, module, make_inputs, CONFIG_FIT_POINTS, loss_fn or hf_loss, flops, None,
                       layers=len(layers) if layers is not None else None, blockwise=None if loss_fn else fused_step)
    if isinstance(model, torch.nn.Module):  # an nn.Module or an fx.GraphModule
        if example_inputs is None:
            raise ValueError("example_inputs is required to plan a module or graph: pass the tuple of inputs of "
                             "one forward at any sequence length (the planner resizes the sequence dimension)")
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        first = next((t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() > seq_dim), None)
        if first is None:
            raise ValueError(f"no example input has a dimension seq_dim={seq_dim}; pass seq_dim=")
        length = first.shape[seq_dim]
        # lengths long enough for every program to be the same one (a few tokens may take other branches)
        base = length // 4 if length % 4 == 0 and length >= 256 else max(length, 64)
        points = tuple(base * k for k in (1, 2, 3, 4))
        params = sum(p.numel() for p in model.parameters())
        layers = _layer_list(model)
        target = _Target(type(model).__name__, model, _resizer(example_inputs, seq_dim, length, meta=True), points,
                         loss_fn, 2.0 * params, None, layers=len(layers) if layers is not None else None)
        if not isinstance(model, torch.fx.GraphModule):
            _rewrite_target(target, _resizer(example_inputs, seq_dim, length, meta=False), blockwise_loss)
        return target
    raise TypeError(f"model: expected an nn.Module, an fx.GraphModule, a ModelConfig, a transformers config or a "
                    f"preset name ({', '.join(_presets.PRESETS)}); got {type(model).__name__}")


def _preset_with_layers(cfg: _presets.ModelConfig) -> Callable[[int], tuple]:
    built = {}

    def with_layers(count: int) -> tuple:
        if count not in built:
            module = _presets.build_reference_model(dataclasses.replace(cfg, layers=count))
            built[count] = (module, lambda chunk: _presets.BlockwiseLossStep(module, chunk))
        return built[count]

    return with_layers


def _is_transformers_config(model) -> bool:
    return any(c.__name__.lower() == "pretrainedconfig" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def _resizer(example_inputs: tuple, seq_dim: int, length: int, *, meta: bool) -> Callable[[int], tuple]:
    """The example inputs at ``n`` tokens: meta tensors for the simulation, or real ones
    (the given values cut or tiled along the sequence) for a capture."""
    def resize(t, n):
        if not (isinstance(t, torch.Tensor) and t.dim() > seq_dim and t.shape[seq_dim] == length):
            return t
        if meta:
            shape = list(t.shape)
            shape[seq_dim] = n
            return torch.empty(shape, dtype=t.dtype, device="meta").requires_grad_(t.requires_grad)
        if t.device.type == "meta":
            raise ValueError("example_inputs on the meta device: ringfx's passes evaluate size-built masks on real "
                             "values; pass small real inputs (any length)")
        reps = -(-n // length)
        out = torch.cat([t.detach()] * reps, dim=seq_dim) if reps > 1 else t.detach()
        return out.narrow(seq_dim, 0, n).clone()

    return lambda n: tuple(resize(t, n) for t in example_inputs)


def _rewrite_target(target: _Target, real_inputs: Callable[[int], tuple], blockwise_loss: int = 0) -> None:
    """Plan the program ringfx runs: capture the module at each fit length, rewrite it with
    ringfx's passes and simulate the rewritten graph (``capture.py``).  Sets the target's
    ``sites``; a model dynamo splits into several graphs stays simulated as written."""
    from .capture import capture_rewritten, single_graph_step

    steps = {}
    for i, n in enumerate(target.points):
        start = time.perf_counter()
        inputs = real_inputs(n)
        captured = capture_rewritten(target.module, inputs, blockwise_loss=blockwise_loss)
        log.info("captured %s at %d tokens and rewrote it with ringfx's passes (%.1f s)", target.name, n,
                 time.perf_counter() - start)
        if i == 0:
            target.sites = captured.sites
            target.fused_losses = captured.fused_losses if blockwise_loss else None
            if not captured.ring_ops:
                return  # nothing rewritten: the module as written is what runs
        step = single_graph_step(captured, inputs)
        if step is None:
            target.notes.append(f"dynamo splits the model into {len(captured.graphs)} graphs: simulated as "
                                "written, its attention budgeted as the model computes it")
            return
        steps[n] = step
    target.steps = steps


def _unique_param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() already skips tied duplicates


def _build_model(target: _Target, options: TrainingOptions, ring: bool, fits: Optional[dict] = None) -> MemoryModel:
    if target.steps and options.activation_checkpointing:
        raise ValueError("activation_checkpointing: the planner checkpoints the layers of a module's ModuleList, "
                         "and the rewritten graph of this model has none; checkpoint the layers in the model "
                         "(torch.utils.checkpoint) and plan without the option")

    fused = target.blockwise(options.blockwise_loss) if options.blockwise_loss and target.blockwise else None

    def simulate(module, n, mark_layers=False):
        return simulate_step(module, target.make_inputs(n), training=options.training, ring=ring,
                             query_chunks=options.query_chunks, kernel=options.kernel,
                             activation_checkpointing=options.activation_checkpointing,
                             loss_fn=_loss_itself if fused is not None else target.loss_fn, mark_layers=mark_layers)

    def run(n):
        return simulate(fused if fused is not None else target.steps.get(n, target.module), n)

    def run_with_layers(n, count):
        module, blockwise = target.with_layers(count)
        return simulate(blockwise(options.blockwise_loss) if fused is not None else module, n, mark_layers=True)

    def fit():
        points = target.points
        if target.with_layers is not None and (target.layers or 0) >= EXTRAPOLATE_FROM:
            try:
                return fit_peak_envelope(extrapolated_runs(run_with_layers, target.layers, points), points[:3])
            except NotExtrapolable as why:
                log.info("memory model of %s: simulating every layer (%s)", target.name, why)
        runs = []
        for n in points:
            start = time.perf_counter()
            runs.append(run(int(n)))
            if time.perf_counter() - start > SLOW_STEP_S:  # a large model simulated whole: a line per length
                log.info("memory model of %s: simulated at %d tokens (%d of %d, %.1f s)", target.name, n, len(runs),
                         len(points), time.perf_counter() - start)
        return fit_peak_envelope(runs[:3], points[:3], check=(points[3], runs[3]))

    # precision, optimizer and parameter sharding change only the static terms: one fit serves them all
    key = (options.training, options.activation_checkpointing, options.query_chunks, options.kernel, ring,
           options.blockwise_loss if target.blockwise else 0)
    if fits is not None and key in fits:
        envelope, attention, exact = fits[key]
    else:
        # progress: a large model simulated whole takes tens of seconds (the CLI shows these lines)
        what = ("training step" if options.training else "forward") + (" on a ring" if ring else " on one device") \
            + (", checkpointed" if options.activation_checkpointing else "") \
            + (f", {options.query_chunks} query chunks" if options.query_chunks > 1 else "")
        log.info("memory model of %s: simulating a %s (at %s tokens) ...", target.name, what,
                 ", ".join(map(str, target.points)))
        start = time.perf_counter()
        envelope, attention, exact = fit()
        log.info("memory model of %s: %s done (%.1f s)", target.name, what, time.perf_counter() - start)
        if fits is not None:
            fits[key] = (envelope, attention, exact)
    shards = P if options.param_shards == "ring" else options.param_shards
    local = S / P
    moments = []
    for moment in envelope:
        row = {}
        for name, poly in moment.items():
            expr = poly.subs(s_local, local)
            if name == GRADIENTS and shards != 1:
                expr = expr / shards  # FSDP/ZeRO: each device keeps its shard of the gradients
            row[name] = sympy.expand(expr)
        moments.append(row)
    count = _unique_param_count(target.module)
    return MemoryModel(static=static_terms(count, options), envelope=moments, param_count=count,
                       attention=attention, ring=ring, exact=exact, options=options)


def _loss_itself(loss, inputs):
    return loss


def memory_model(model, *, ring: bool = True, options: Optional[TrainingOptions] = None, example_inputs=None,
                 seq_dim: int = 1, loss_fn=None, batch_size: int = 1, **option_overrides) -> MemoryModel:
    """The symbolic per-device memory of ``model`` (a module, graph, config or preset name).

    ``MemoryModel.peak`` is a sympy expression in ``ringfx.planner.memory.S`` and ``P``.
    """
    options = (options or TrainingOptions()).replace(**option_overrides)
    target = _resolve(model, example_inputs=example_inputs, seq_dim=seq_dim, loss_fn=loss_fn, batch_size=batch_size,
                      blockwise_loss=options.blockwise_loss)
    return _build_model(target, options, ring, target.fits)


# -- the plan --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """The planner's answer.  ``str(plan)`` is a readable table."""

    feasible: bool
    model: str
    seq_len: int
    ring_size: Optional[int]
    layout: Optional[str]
    block_size: Optional[int]
    query_chunks: int
    predicted_peak: Optional[int]
    budget: int
    breakdown: dict
    device: DeviceSpec
    options: TrainingOptions
    headroom: float
    memory: Optional[MemoryModel] = None
    min_block: Optional[float] = None
    overlap: Optional[bool] = None
    attention_time: Optional[float] = None      # all attention calls, fwd (+bwd when training)
    step_time: Optional[float] = None           # attention + the other matmuls
    reasons: list = dataclasses.field(default_factory=list)
    suggestions: list = dataclasses.field(default_factory=list)
    layers: Optional[int] = None
    dominant: Optional[str] = None              # the largest term of the peak and what would shrink it

    @property
    def memory_expression(self) -> Optional[sympy.Expr]:
        return None if self.memory is None else self.memory.peak

    def __str__(self) -> str:
        o, d = self.options, self.device
        ckpt = "on" if o.activation_checkpointing else "off"
        mode = (f"training ({o.precision}, optimizer {o.optimizer}, checkpointing {ckpt}, param shards "
                f"{o.param_shards})") if o.training else f"forward only ({o.param_dtype})".replace("torch.", "")
        if o.blockwise_loss:
            mode += f", blockwise loss (chunks of {o.blockwise_loss:,} tokens)"
        lines = [
            f"ringfx plan: {self.model}, S = {self.seq_len:,} tokens, {mode}",
            f"device: {d.name} ({d.source}): {_gib(d.memory)}, budget {_gib(self.budget)} "
            f"({self.headroom:.0%} headroom)"
            + (f", {d.flops / 1e12:.0f} TFLOP/s" if d.flops else "")
            + (f", {d.bandwidth / 1e9:.0f} GB/s link" if d.bandwidth else "")
            + (f", world size {d.world_size}" if d.world_size else ""),
        ]
        rows = []
        if self.feasible:
            rows += [
                ("ring size P", f"{self.ring_size}"),
                ("layout", f"{self.layout}"),
                ("block c = S/P", f"{self.block_size:,} tokens"),
                ("query chunks", f"{self.query_chunks} (kernel calls of "
                                 f"{self.block_size // self.query_chunks:,} queries)"),
                ("predicted peak / device", f"{_gib(self.predicted_peak)} of {_gib(self.budget)}"),
            ]
            for name, value in self.breakdown.items():
                if value:
                    per_layer = f" ({self.layers} layers, {_gib(value / self.layers)} per layer)" \
                        if name == "activations" and self.layers else ""
                    rows.append((f"  {name}", _gib(value) + per_layer))
            if self.min_block is not None and self.ring_size > 1:
                verdict = "yes" if self.overlap else "no"
                rows.append(("comm. overlap (c >= F/B)", f"{verdict}: c = {self.block_size:,}, c_min = "
                                                        f"{self.min_block:,.0f} tokens"))
            if self.attention_time is not None:
                rows.append(("attention time / step", _seconds(self.attention_time)))
            if self.step_time is not None:
                rows.append(("predicted step time", _seconds(self.step_time)))
        else:
            rows.append(("result", "DOES NOT FIT"))
            if self.predicted_peak is not None:
                rows.append(("smallest peak tried", f"{_gib(self.predicted_peak)} at P = {self.ring_size}"))
        width = max(len(k) for k, _ in rows)
        lines.append("-" * (width + 40))
        lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
        lines.append("-" * (width + 40))
        if self.dominant:
            lines.append(f"where the memory goes: {self.dominant}")
        if self.reasons:
            lines.append("reasons:")
            lines += [f"  - {r}" for r in self.reasons]
        if self.suggestions:
            lines.append("what would make it fit:")
            lines += [f"  - {s}" for s in self.suggestions]
        return "\n".join(lines)


def _ring_sizes(world_size: Optional[int], max_ring_size: int) -> list:
    """Every ring size up to the world size (a ring need not use every device: the rest can
    hold data-parallel replicas or stay idle, so more devices never force a larger ring);
    offline, powers of two."""
    if world_size:
        return list(range(1, world_size + 1))
    sizes, p = [], 1
    while p <= max_ring_size:
        sizes.append(p)
        p *= 2
    return sizes


def _query_chunk_options(block: int, start: int) -> list:
    options, n = [start], start * 2
    while n <= MAX_QUERY_CHUNKS and block % n == 0 and block // n >= MIN_QUERY_CHUNK:
        options.append(n)
        n *= 2
    return options


class _Search:
    """Memory models per (options, ring) — one simulation set each — and the ring search."""

    def __init__(self, target: _Target, seq_len: int, budget: int, layout: Optional[str], causal: bool):
        self.target, self.seq_len, self.budget, self.layout, self.causal = target, seq_len, budget, layout, causal
        self.cache = {}
        self.fits = target.fits

    def model(self, options: TrainingOptions, ring: bool) -> MemoryModel:
        key = (options, ring)
        if key not in self.cache:
            self.cache[key] = _build_model(self.target, options, ring, self.fits)
        return self.cache[key]

    def layout_for(self, ring_size: int) -> str:
        if ring_size == 1:
            return "none"
        return self.layout or ("zigzag" if self.causal else "contiguous")

    def divisible(self, ring_size: int, layout: str) -> bool:
        return self.seq_len % (2 * ring_size if layout == "zigzag" else ring_size) == 0

    def tries_one_device(self, options: TrainingOptions, sizes) -> bool:
        """Whether the searches simulate one device (P = 1, another program: no ring): only when it
        is the only size, or when the state (parameters, optimizer, master weights) fits it."""
        return sizes[0] == 1 and (len(sizes) == 1 or _static_bytes(self.target, options, 1) <= self.budget)

    def first_fit(self, options: TrainingOptions, sizes, reasons: Optional[list] = None, chunking: bool = True):
        """(ring size, query chunks, peak, model) of the first ring size that fits, else the
        smallest peak seen as (ring size, None, peak, model)."""
        smallest = None
        skipped = []
        for p in sizes:
            layout = self.layout_for(p)
            if not self.divisible(p, layout):
                skipped.append(p)
                continue
            if p == 1 and not self.tries_one_device(options, sizes):
                if reasons is not None:
                    reasons.append(f"P=1: parameters, gradients' master copy and optimizer state alone take "
                                   f"{_gib(_static_bytes(self.target, options, 1))} > budget {_gib(self.budget)}")
                continue
            block = self.seq_len // p
            chunk_options = _query_chunk_options(block, options.query_chunks) if (chunking and p > 1) else \
                [options.query_chunks]
            for chunks in chunk_options:
                opts = options.replace(query_chunks=chunks)
                model = self.model(opts, ring=p > 1)
                peak = model.peak_bytes(self.seq_len, p)
                if peak > self.budget and chunks == chunk_options[0] and \
                        peak - _chunkable_bytes(model, block, chunks) > self.budget:
                    chunk_options = chunk_options[:1]  # chunking the queries cannot close the gap
                    if smallest is None or peak < smallest[2]:
                        smallest = (p, None, peak, model)
                    break
                if smallest is None or peak < smallest[2]:
                    smallest = (p, None, peak, model)
                if peak <= self.budget:
                    if reasons is not None:
                        _note_skipped(reasons, skipped, self.seq_len)
                        extra = f" with {chunks} query chunks" if chunks > 1 else ""
                        reasons.append(f"P={p}: predicted peak {_gib(peak)} <= budget {_gib(self.budget)}{extra}: fits")
                    return p, chunks, peak, model
            if reasons is not None:
                tried = f" (query chunks up to {chunk_options[-1]})" if len(chunk_options) > 1 else ""
                reasons.append(f"P={p}: predicted peak {_gib(smallest[2] if smallest[0] == p else peak)} > budget "
                               f"{_gib(self.budget)}{tried}")
        if reasons is not None:
            _note_skipped(reasons, skipped, self.seq_len)
        return smallest


def _static_bytes(target: _Target, options: TrainingOptions, ring_size: int) -> int:
    values = {P: ring_size}
    terms = static_terms(_unique_param_count(target.module), options)
    return sum(int(sympy.ceiling(sympy.sympify(e).subs(values))) for e in terms.values())


def _note_skipped(reasons: list, skipped: list, seq_len: int):
    if skipped:
        shown = ", ".join(map(str, skipped[:12])) + (", ..." if len(skipped) > 12 else "")
        reasons.append(f"P={shown}: skipped, S={seq_len} is not divisible by P (2P for zigzag)")


def _chunkable_bytes(model: MemoryModel, block: int, chunks: int) -> int:
    """Upper bound on what more query chunks could save: the per-step temporaries that
    scale with the queries of one kernel call (``memory.ring_attention_buffers``)."""
    from .memory import DQ_GROUP, FP32, KERNEL_BACKWARD_WORKSPACE, merge_buffers

    if not model.attention or not model.ring:
        return 0
    att = max(model.attention, key=lambda a: a.q_block(1))
    c = block // chunks
    ws = KERNEL_BACKWARD_WORKSPACE[model.options.kernel] if model.options else 2.0
    fwd = att.q_block(c) + att.rows(c) + merge_buffers(att, c)
    bwd = DQ_GROUP * att.q_block(c) + ws * att.q_block(c, FP32) + att.rows(c)
    return int(max(fwd, bwd))


def plan(
    model,
    seq_len: Union[int, str],
    *,
    device: Union[str, DeviceSpec, None] = None,
    device_memory: Union[str, int, None] = None,
    flops: Union[str, float, None] = None,
    bandwidth: Union[str, float, None] = None,
    world_size: Optional[int] = None,
    headroom: float = 0.1,
    causal: Optional[bool] = None,
    layout: Optional[str] = None,
    batch_size: int = 1,
    example_inputs=None,
    seq_dim: int = 1,
    loss_fn: Optional[Callable] = None,
    max_ring_size: int = 1024,
    options: Optional[TrainingOptions] = None,
    progress: bool = False,
    **option_overrides,
) -> Plan:
    """Plan ring attention for ``model`` at ``seq_len`` tokens.

    ``model``: an ``nn.Module`` or ``fx.GraphModule`` (with ``example_inputs`` at any
    length, sequence on ``seq_dim``), a :class:`ModelConfig` or a preset name
    (``"llama-8b-like"``).  Device facts come from ``device`` (a ``DeviceSpec``, a name
    like ``"H100"``, or the local CUDA device) and are overridden by ``device_memory``,
    ``flops``, ``bandwidth``, ``world_size``.  Training options (``training``,
    ``precision``, ``optimizer``, ``activation_checkpointing``, ``param_shards``,
    ``kernel``) go in ``options`` or as keywords.  ``progress=True`` prints what the planner
    is doing on stderr as it goes (the simulations behind a memory model take seconds for a
    large model), as ``python -m ringfx plan`` does; or configure the ``ringfx.planner``
    logger at INFO.
    """
    with progress_on_stderr(progress):
        longest = isinstance(seq_len, str) and seq_len.strip().lower() == "max"
        seq_len = 0 if longest else parse_seq_len(seq_len)
        if not 0 <= headroom < 1:
            raise ValueError(f"headroom={headroom} must be in [0, 1): the fraction of device memory kept free")
        if layout not in (None, "contiguous", "zigzag"):
            raise ValueError(f"layout={layout!r}: use 'contiguous', 'zigzag' or None (zigzag when causal)")
        options = (options or TrainingOptions()).replace(**option_overrides)
        spec = device_spec(device, device_memory=device_memory, flops=flops, bandwidth=bandwidth,
                           world_size=world_size)
        target = _resolve(model, example_inputs=example_inputs, seq_dim=seq_dim, loss_fn=loss_fn,
                          batch_size=batch_size, blockwise_loss=options.blockwise_loss)
        budget = int(spec.memory * (1 - headroom))
        sizes = _ring_sizes(spec.world_size, max_ring_size)

        search = _Search(target, seq_len, budget, layout, causal)
        # the program the search simulates first also tells what attention the model has (the same
        # calls in both): one device when P = 1 is tried, which may be the answer and spare the ring's
        probe = search.model(options, ring=not search.tries_one_device(options, sizes))
        if causal is None:
            causal = target.causal if target.causal is not None else any(a.causal for a in probe.attention)
            search.causal = causal
        reasons = _attention_reasons(target, probe) + _blockwise_reasons(target, options)
        if longest:
            seq_len, p_max = max_seq_len(search, options, sizes)
            if seq_len == 0:
                raise ValueError(f"seq_len='max': not even {2 * max(sizes)} tokens fit {_gib(budget)} per device on "
                                 f"up to {max(sizes)} devices with these options")
            search.seq_len = seq_len
            unit = "2P" if search.layout_for(p_max) == "zigzag" else "P"
            reasons.append(f"S = {seq_len:,}: the longest sequence that fits (the largest root of the memory "
                           f"polynomial at P = {p_max}, rounded down to a multiple of {unit})")
        found = search.first_fit(options, sizes, reasons)
        if found is None:
            raise ValueError(f"seq_len={seq_len} is not divisible by any ring size in {sizes}; pick a multiple of 2*P")
        p, chunks, peak, mem = found
        plan_ = Plan(feasible=chunks is not None, model=target.name, seq_len=seq_len, ring_size=p,
                     layout=search.layout_for(p), block_size=seq_len // p,
                     query_chunks=chunks or options.query_chunks,
                     predicted_peak=peak, budget=budget, breakdown=mem.evaluate(seq_len, p), device=spec,
                     options=options.replace(query_chunks=chunks or options.query_chunks), headroom=headroom,
                     memory=mem, reasons=reasons)
        plan_.dominant = _dominant(plan_.breakdown, target)
        plan_.layers = target.layers
        if not mem.exact:
            reasons.append("memory fit not exact: the model's tensors do not grow polynomially with the sequence")
        if plan_.feasible:
            if p > 1:
                reasons.append(f"layout {plan_.layout}: " + ("causal attention; zigzag gives every rank equal work"
                                                             if plan_.layout == "zigzag" and causal else "as asked"
                                                             if layout else "non-causal attention, no imbalance"))
            _add_time(plan_, target, causal, reasons)
        else:
            plan_.suggestions = _suggestions(search, options, spec, max_ring_size)
        log.info("plan for %s at S=%d: %s", target.name, seq_len,
                 f"P={p}, peak {_gib(peak)}" if plan_.feasible else "infeasible")
        return plan_


def _add_time(plan_: Plan, target: _Target, causal: bool, reasons: list):
    spec, p = plan_.device, plan_.ring_size
    missing = [name for name, value in (("FLOP/s", spec.flops), ("link bandwidth", spec.bandwidth)) if value is None]
    if missing:
        reasons.append(f"no {' or '.join(missing)} known for device {spec.name!r}: time not predicted (pass "
                       + " and ".join({"FLOP/s": "flops=", "link bandwidth": "bandwidth="}[m] for m in missing) + ")")
        return
    if not plan_.memory.attention:
        plan_.step_time = other_matmul_time(target.matmul_flops_per_token, plan_.seq_len // p, spec.flops,
                                            training=plan_.options.training)
        reasons.append("no attention: the predicted step time is the other matmuls' alone")
        return
    link = spec.link_bandwidth(p)
    calls = plan_.memory.attention
    total = 0.0
    first = None
    for att in calls:
        att = dataclasses.replace(att, causal=att.causal or causal)
        t = attention_time(att, plan_.seq_len, p, spec.flops, link, training=plan_.options.training)
        first = first or t
        total += t.forward + t.backward
    plan_.min_block, plan_.overlap = first.min_block, first.overlap
    plan_.attention_time = total
    plan_.step_time = total + other_matmul_time(target.matmul_flops_per_token, plan_.seq_len // p, spec.flops,
                                                training=plan_.options.training)
    where = "inside a node" if p <= spec.gpus_per_node else "across nodes"
    if p > 1:
        reasons.append(
            f"overlap: c = S/P = {plan_.block_size:,} {'>=' if first.overlap else '<'} c_min = {first.min_block:,.0f} "
            f"(F/B rule, Ring Attention paper §3; F = {spec.flops / 1e12:.0f} TFLOP/s at the kernel's efficiency, "
            f"B = {link / 1e9:.1f} GB/s {where})")


def _attention_reasons(target: _Target, probe: MemoryModel) -> list:
    if target.sites is None:  # a config: the reference module's SDPA calls are the ring op's
        if not probe.attention:
            return ["no attention found in the model: the ring changes nothing but the sequence sharding"]
        kinds = sorted({"causal" if a.causal else "full" for a in probe.attention})
        return [f"attention: {len(probe.attention)} SDPA calls ({', '.join(kinds)}), each planned as the ring op"]
    rewritten = [s for s in target.sites if s.decision.value == "rewritten"]
    left = [s for s in target.sites if s.decision.value != "rewritten"]
    if not target.sites:
        return ["no attention found by ringfx's passes: the ring changes nothing but the sequence sharding"]
    kinds = sorted({("causal" if s.causal else "full") + (f", window {s.window}" if s.window else "") for s in rewritten})
    out = []
    if rewritten:
        out.append(f"attention: ringfx's passes rewrite {len(rewritten)} site(s) into the ring op ({'; '.join(kinds)}; "
                   f"{rewritten[0].pattern} at {rewritten[0].source_line.strip()}); planned as the ring op runs them"
                   + ("" if target.steps else " (simulated as written: " + "; ".join(target.notes) + ")"))
    for site in left:
        out.append(f"attention left alone at {site.source_line.strip()}: {site.reason} (budgeted as written)")
    return out


def _blockwise_reasons(target: _Target, options: TrainingOptions) -> list:
    if not options.blockwise_loss:
        return []
    chunk = f"chunks of {options.blockwise_loss:,} tokens"
    if target.blockwise is not None:
        return [f"blockwise loss: the LM head and its cross-entropy in {chunk} (ringfx::linear_cross_entropy; the "
                "logits are never whole, the logits output is None)"]
    if target.fused_losses and target.steps:
        return [f"blockwise loss: ringfx's pass fuses {target.fused_losses} loss(es) of the captured program into "
                f"{chunk}"]
    if target.sites is None:
        why = "loss_fn= computes the loss outside the model"
    elif not target.fused_losses:
        why = "the captured program has no linear -> cross_entropy to fuse (a loss_fn= outside the model is not)"
    else:
        why = "the model is simulated as written (" + "; ".join(target.notes or ["no attention rewritten"]) + ")"
    return [f"blockwise loss asked but not planned: {why}; the logits are budgeted whole"]


# what each term of the peak is, and what shrinks it
_SHRINK = {
    "parameters": "FSDP (param_shards='ring', --fsdp) divides it by P",
    "master weights (fp32)": "FSDP divides it by P; pure bf16 (precision='bf16') drops it",
    "optimizer state (Adam, fp32)": "FSDP (param_shards='ring', --fsdp) divides it by P",
    "gradients": "FSDP divides it by P",
    "activations": "activation checkpointing (--checkpointing) keeps one input per layer; more devices divide it by P",
    LOGITS: "the logits (S/P x vocab, and their float32 copy in the loss) grow with the vocabulary: more devices, or "
            "blockwise_loss=True (--blockwise-loss): the loss over chunks of tokens, the logits never whole",
    "attention buffers": "more devices (÷P); query chunks bound the per-step part",
    "backward temporaries": "more devices (÷P); activation checkpointing",
    "inputs": "more devices (÷P)",
}


def _dominant(breakdown: dict, target: _Target) -> Optional[str]:
    if not breakdown:
        return None
    name, value = max(breakdown.items(), key=lambda kv: kv[1])
    total = sum(breakdown.values()) or 1
    line = f"{name} dominates ({_gib(value)}, {value / total:.0%} of the peak)"
    if name in _SHRINK:
        line += f": {_SHRINK[name]}"
    if name == LOGITS:
        line = "the logits and loss dominate" + line[len(name) + len(" dominates"):]
    return line


def max_seq_len(search: "_Search", options: TrainingOptions, sizes) -> tuple:
    """The longest S (a multiple of the layout's unit) whose predicted peak fits the budget
    on some ring size in ``sizes``, and that ring size (the smallest reaching it).

    For a fixed P every moment of the envelope is a polynomial in S (degree <= 2) plus the
    static terms: each moment's largest real root of ``peak(S) = budget`` bounds S; the
    smallest bound, rounded down to the unit (P, or 2P for zigzag), is checked against the
    exact evaluation and stepped down while it does not fit (rounding up of fractional bytes).
    """
    best = (0, None)
    for p in sizes:
        if p == 1 and not search.tries_one_device(options, sizes):
            continue  # state alone does not fit one device: its program is not simulated
        model = search.model(options, ring=p > 1)
        unit = 2 * p if search.layout_for(p) == "zigzag" else p
        s_max = _largest_fitting(model, p, search.budget, unit)
        if s_max > best[0]:
            best = (s_max, p)
    return best


def _largest_fitting(model: MemoryModel, p: int, budget: int, unit: int) -> int:
    static, moments = model.in_s(p)
    bound = None
    for moment in moments or [(0, 0, 0)]:
        limit = _largest_root_floor(*(a + b for a, b in zip(static, moment)), budget)
        if limit is not _NO_LIMIT:
            bound = limit if bound is None else min(bound, limit)
    if bound is None:
        raise ValueError("the memory model does not grow with the sequence: there is no longest sequence")
    n = bound // unit * unit
    while n > 0 and model.peak_bytes(n, p) > budget:
        n -= unit
    return max(n, 0)


_NO_LIMIT = object()


def _largest_root_floor(c0: Fraction, c1: Fraction, c2: Fraction, budget: int):
    """The largest S at which ``c0 + c1 S + c2 S**2`` reaches ``budget``, rounded down
    (exactly: integer square roots): 0 when it never fits, ``_NO_LIMIT`` when it fits beyond
    its largest root (or everywhere)."""
    c0 = c0 - budget
    if c2 == 0 and c1 == 0:
        return 0 if c0 > 0 else _NO_LIMIT  # constant: never fits, or no limit from this moment
    if c2 == 0:
        return math.floor(-c0 / c1) if c1 > 0 else _NO_LIMIT
    if c2 < 0:
        return _NO_LIMIT  # opens downwards: fits beyond its largest root
    # c2 > 0: the largest root (-b + sqrt(b² - 4ac)) / 2a in integers a, b, c (same roots)
    scale = math.lcm(c0.denominator, c1.denominator, c2.denominator)
    a, b, c = int(c2 * scale), int(c1 * scale), int(c0 * scale)
    discriminant = b * b - 4 * a * c
    if discriminant < 0:
        return 0  # above the budget at every S
    # floor((-b + sqrt(D)) / 2a) = floor((-b + floor(sqrt(D))) / 2a), as 2a > 0
    return (-b + math.isqrt(discriminant)) // (2 * a)


def _suggestions(search: _Search, options: TrainingOptions, spec: DeviceSpec, max_ring_size: int) -> list:
    out = []
    far = _ring_sizes(None, max(max_ring_size, 2**16))

    def describe(opts, what):
        log.info("does not fit: trying %s", what)
        try:
            found = search.first_fit(opts, far, chunking=True)
        except ValueError as err:  # e.g. checkpointing asked of a model without a layer list
            log.info("suggestion %r not evaluated: %s", what, err)
            return True
        if found and found[1] is not None:
            out.append(f"{what}: fits on a ring of {found[0]} devices (peak {_gib(found[2])})")
            return True
        return False

    if not describe(options, "more devices"):
        out.append(f"more devices: no ring up to {far[-1]} devices fits with these options (the parameters, "
                   "gradients and optimizer state alone may not fit one device)")
    if not options.activation_checkpointing and options.training:
        if not describe(options.replace(activation_checkpointing=True), "activation checkpointing on"):
            out.append("activation checkpointing alone: not enough")
    if options.param_shards == 1 and options.training:
        describe(options.replace(param_shards="ring"), "shard parameters/grads/optimizer over the ring (FSDP)")
    if options.precision == "fp32":
        describe(options.replace(precision="bf16-mixed"), "bf16 mixed precision")
    elif options.precision.endswith("-mixed") and options.training:
        describe(options.replace(precision="bf16"), "pure bf16 (no fp32 master weights)")
    if options.training and not options.activation_checkpointing and options.param_shards == 1:
        describe(options.replace(activation_checkpointing=True, param_shards="ring"), "checkpointing + FSDP")
    return out


def plan_from_inputs(model: torch.nn.Module, example_inputs, *, seq_dim: int = 1, world_size: Optional[int] = None,
                     **kwargs) -> Plan:
    """Plan for one call of ``model`` on full-length ``example_inputs`` (what
    ``ringfx.transform(model, plan="auto")`` has at its first call): the sequence length
    is the size of ``seq_dim`` of the first tensor input; ``world_size`` the ring's devices.
    Other keywords as :func:`plan`.
    """
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    first = next((t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() > seq_dim), None)
    if first is None:
        raise ValueError(f"example_inputs: no tensor has a dimension seq_dim={seq_dim}; pass seq_dim=")
    return plan(model, int(first.shape[seq_dim]), example_inputs=example_inputs, seq_dim=seq_dim,
                world_size=world_size, **kwargs)
