"""Device facts for planning: memory, FLOP/s, link bandwidth, world size.

Read from the machine (``torch.cuda.mem_get_info``, the device name, the world size of an
initialised process group, peer access between GPUs) or given by hand for planning
offline (``device_memory="80GiB"``, ``flops="312T"``, ``bandwidth="300GB/s"``).

Default numbers and where they come from:

- FLOP/s: dense bf16 matmul rate.  H100/H200: ~790 TFLOP/s *measured* (DESIGN.md §6; the
  datasheet says 989).  A100: 312 TFLOP/s, TPUv4: 275 TFLOP/s (Ring Attention paper,
  Table 2).
- Bandwidth between ring neighbours, one direction: NVLink on H100/H200 450 GB/s
  (NVLink4, 900 GB/s both directions), on A100 300 GB/s (the paper's figure); across
  nodes 100 Gb/s InfiniBand = 12.5 GB/s per GPU (the paper's figure).  A ring that spans
  nodes runs at the speed of its slowest hop (``LOCAL_WORLD_SIZE`` from torchrun, else the
  local GPU count, says how many share a node); GPUs without peer access get PCIe's 25 GB/s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Optional, Union

import torch

log = logging.getLogger("ringfx.planner")

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*(?:/s)?\s*$", re.IGNORECASE)


def _named(what: str, value) -> str:
    return f"{what}={value!r}" if what else repr(value)


def _parse(value: Union[str, int, float], what: str, *, binary_counts: bool, require_unit: bool = False) -> float:
    """A number with an optional unit. ``what`` names the value in errors (a keyword or a
    command-line flag; empty: the value alone, for argparse, which names the flag itself)."""
    named = _named(what, value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise TypeError(f"{what or 'value'}: expected a number or a string like '80GiB', got {type(value).__name__}")
    match = _NUMBER.match(value.replace("_", "").replace(",", ""))
    if not match:
        raise ValueError(f"{named} is not understood; write a number with an optional unit, e.g. "
                         f"'80GiB', '1M', '128K', '300GB/s', '312T'")
    number, unit = float(match.group(1)), match.group(2).lower()
    if require_unit and not unit:
        raise ValueError(f"{named} has no unit: write {match.group(1)}GiB (2**30 bytes) or {match.group(1)}GB "
                         f"(10**9 bytes)")
    unit = {"flops": "", "flop": ""}.get(unit, unit)
    for suffix in ("flops", "flop"):
        if unit.endswith(suffix) and len(unit) > len(suffix):
            unit = unit[: -len(suffix)]
    if binary_counts and unit in ("k", "m", "g", "t"):
        unit += "i"  # sequence lengths: 1M = 2**20, 128K = 131072, as everyone writes them
    if unit not in _UNITS:
        raise ValueError(f"{named}: unknown unit {unit!r}; use one of K, M, G, T, KiB, MiB, GiB, TiB, GB")
    return number * _UNITS[unit]


def parse_bytes(value: Union[str, int, float], what: str = "device_memory", *, require_unit: bool = False) -> int:
    """``"80GiB"`` -> 85899345920, ``"80GB"`` -> 80e9, plain numbers are bytes
    (``require_unit=True``: a string without a unit is an error, as on the command line)."""
    return int(_parse(value, what, binary_counts=False, require_unit=require_unit))


def parse_seq_len(value: Union[str, int], what: str = "seq_len") -> int:
    """``"1M"`` -> 1048576, ``"128K"`` -> 131072, ``"1048576"`` -> 1048576 (K and M are powers of two)."""
    number = _parse(value, what, binary_counts=True)
    if number != int(number) or number <= 0:
        raise ValueError(f"{_named(what, value)} must be a positive whole number of tokens")
    return int(number)


def parse_rate(value: Union[str, int, float], what: str) -> float:
    """``"312T"``/``"312TFLOPS"`` -> 3.12e14; ``"300GB/s"`` -> 3e11 (decimal units)."""
    rate = _parse(value, what, binary_counts=False)
    if rate <= 0:
        raise ValueError(f"{_named(what, value)} must be positive")
    return rate


# name fragment -> (dense bf16 FLOP/s, neighbour bandwidth inside a node in bytes/s, one direction)
KNOWN_DEVICES = {
    "H200": (790e12, 450e9),
    "H100": (790e12, 450e9),
    "A100": (312e12, 300e9),
    "TPUV4": (275e12, 268e9),
}
INFINIBAND_BANDWIDTH = 12.5e9   # 100 Gb/s per GPU, the paper's cross-node figure
PCIE_BANDWIDTH = 25e9           # PCIe 4.0 x16, one direction, for GPUs without peer access
GPUS_PER_NODE = 8


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """What the planner needs to know about one device of the ring and its links.

    ``memory``: bytes usable on one device; ``flops``: dense FLOP/s in the compute dtype;
    ``bandwidth``: bytes/s to the next ring neighbour inside a node;
    ``inter_node_bandwidth``: bytes/s when the ring crosses nodes; ``world_size``: devices
    available for the ring (``None``: unbounded, plan offline); ``gpus_per_node``.
    """

    name: str = "unknown"
    memory: Optional[int] = None
    flops: Optional[float] = None
    bandwidth: Optional[float] = None
    inter_node_bandwidth: float = INFINIBAND_BANDWIDTH
    world_size: Optional[int] = None
    gpus_per_node: int = GPUS_PER_NODE
    source: str = "given"

    def link_bandwidth(self, ring_size: int) -> float:
        """Bandwidth of the slowest hop of a ring of ``ring_size`` devices."""
        if self.bandwidth is None:
            raise ValueError("bandwidth is unknown: pass bandwidth='300GB/s' (or a known device name)")
        if ring_size > self.gpus_per_node:
            return min(self.bandwidth, self.inter_node_bandwidth)
        return self.bandwidth


def _known(name: str):
    key = name.upper().replace(" ", "").replace("-", "")
    for fragment, facts in KNOWN_DEVICES.items():
        if fragment in key:
            return facts
    return None


def _machine_world_size() -> Optional[int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return None


def _peer_links(count: int) -> Optional[bool]:
    """Whether GPU 0 reaches every other local GPU by peer access (NVLink/PCIe P2P)."""
    if count < 2:
        return None
    try:
        return all(torch.cuda.can_device_access_peer(0, j) for j in range(1, count))
    except Exception:  # pragma: no cover - driver-dependent
        return None


def device_spec(
    device: Union[str, DeviceSpec, None] = None,
    *,
    device_memory: Union[str, int, None] = None,
    flops: Union[str, float, None] = None,
    bandwidth: Union[str, float, None] = None,
    world_size: Optional[int] = None,
    inter_node_bandwidth: Union[str, float, None] = None,
    gpus_per_node: Optional[int] = None,
) -> DeviceSpec:
    """Build a :class:`DeviceSpec`: given numbers win, then a known device name, then the machine.

    ``device`` may be a ``DeviceSpec``, a name like ``"H100"``/``"A100"``/``"TPUv4"`` (fills
    FLOP/s and bandwidth; memory must still be given), ``"cuda"`` or ``None`` (read the
    local CUDA device when there is one).
    """
    if isinstance(device, DeviceSpec):
        spec = device
    elif device in (None, "cuda", "auto") and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
        known = _known(name) or (None, None)
        count = _machine_world_size()
        peer = _peer_links(torch.cuda.device_count())
        # torchrun tells how many ranks share a node: a ring longer than that crosses nodes
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()) or GPUS_PER_NODE)
        bandwidth = known[1]
        if peer is False and bandwidth is not None:
            bandwidth = min(bandwidth, PCIE_BANDWIDTH)  # no peer access: no NVLink between these GPUs
        spec = DeviceSpec(name=name, memory=free, flops=known[0], bandwidth=bandwidth, world_size=count,
                          gpus_per_node=per_node,
                          source=f"machine (cuda: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
                                 f"{', peer access' if peer else ''})")
    elif isinstance(device, str) and device not in ("cuda", "auto"):
        known = _known(device)
        if known is None:
            raise ValueError(f"device={device!r} is not a known device ({', '.join(KNOWN_DEVICES)}); give "
                             "flops= and bandwidth= instead")
        spec = DeviceSpec(name=device, flops=known[0], bandwidth=known[1], source="table")
    else:
        spec = DeviceSpec()
    changes = {}
    if device_memory is not None:
        changes["memory"] = parse_bytes(device_memory, "device_memory")
    if flops is not None:
        changes["flops"] = parse_rate(flops, "flops")
    if bandwidth is not None:
        changes["bandwidth"] = parse_rate(bandwidth, "bandwidth")
    if inter_node_bandwidth is not None:
        changes["inter_node_bandwidth"] = parse_rate(inter_node_bandwidth, "inter_node_bandwidth")
    if world_size is not None:
        if int(world_size) < 1:
            raise ValueError(f"world_size={world_size} must be at least 1")
        changes["world_size"] = int(world_size)
    if gpus_per_node is not None:
        changes["gpus_per_node"] = int(gpus_per_node)
    if changes:
        spec = dataclasses.replace(spec, **changes)
    if spec.memory is None:
        raise ValueError("device memory is unknown (no CUDA device here): pass device_memory='80GiB'")
    if spec.flops is None:
        log.info("no FLOP/s known for %s; time predictions are skipped (pass flops='790T')", spec.name)
    return spec
