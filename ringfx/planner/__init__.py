"""ringfx.planner: how big a ring, which layout, what block size — from device memory.

device.py    device facts (memory, FLOP/s, link bandwidth, world size), read or given
memory.py    the symbolic per-device memory model in S and P, and the runtime contract's buffers
simulate.py  a training step run on the meta device, live bytes tracked, attention modelled
layer_extrapolation.py  a stack of L identical layers simulated with 3 and 4 of them, extrapolated in L
timing.py    the time model: per-step FLOPs vs link bytes, c >= F/B (Ring Attention paper §3)
presets.py   model configs given as numbers (llama-8b-like, ...), built as ringfx.reference_model.LlamaLike
models.py    models from where users have them: presets, transformers configs (meta device), module:factory
capture.py   a module captured with dynamo and rewritten by ringfx's passes: the program the plan models
plan.py      ``plan(...) -> Plan``: the smallest ring that fits, with its numbers and reasons
cli.py       ``python -m ringfx plan ...``

A preset plans in under 5 s on a 2-core CPU, of which ~3 s is importing torch and the dynamo
modules torch's meta kernels pull in (BENCHMARKS.md, "time to plan a preset").  Not yet done:
a transformers config (or a module) is still simulated whole, layer by layer, at four lengths
(5-15 s for a 7B-class config): its layers are not known to be identical, which the layer
extrapolation needs.
"""

from .device import DeviceSpec, device_spec, parse_bytes, parse_seq_len
from .memory import MemoryModel, TrainingOptions
from .plan import Plan, memory_model, plan, plan_from_inputs
from .presets import PRESETS, ModelConfig
from .timing import min_block_size

__all__ = [
    "DeviceSpec", "MemoryModel", "ModelConfig", "PRESETS", "Plan", "TrainingOptions", "device_spec",
    "memory_model", "min_block_size", "parse_bytes", "parse_seq_len", "plan", "plan_from_inputs",
]
