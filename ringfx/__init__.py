"""ringfx: exact ring attention for any PyTorch model.

    model = ringfx.transform(model)                 # or torch.compile(model, backend="ringfx")
    print(ringfx.explain(model, *inputs))           # what was rewritten, what was not, and why
    out = ringfx.ring_attention(q, k, v, causal=True, layout="zigzag")
    plan = ringfx.plan("llama-8b-like", seq_len=1_000_000, device_memory="80GiB", world_size=8)
"""

from importlib import metadata as _metadata

from .errors import RingfxWarning, UnsupportedError
from .planner import DeviceSpec, Plan, plan
from .runtime import LoopbackRing, positions, ring_attention, shard, unshard


def __getattr__(name: str):
    # transform and explain load the passes on first use: the planner (python -m ringfx plan) runs
    # without them, and their import is a tenth of its time
    if name in ("explain", "transform"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ringfx' has no attribute {name!r}")

try:
    __version__ = _metadata.version("ringfx")
except _metadata.PackageNotFoundError:  # a source tree that was not installed: its pyproject.toml's version
    import pathlib as _pathlib
    import re as _re

    _pyproject = _pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
    _found = _re.search(r'^version\s*=\s*"([^"]+)"', _pyproject.read_text(), _re.M) if _pyproject.is_file() else None
    __version__ = _found.group(1) if _found else "0+unknown"

__all__ = [
    "DeviceSpec", "LoopbackRing", "Plan", "RingfxWarning", "UnsupportedError", "explain", "plan", "positions",
    "ring_attention", "shard", "transform", "unshard",
]
