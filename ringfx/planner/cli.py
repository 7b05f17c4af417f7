"""``python -m ringfx plan ...``: print a plan for a preset model, offline or on this machine.

    python -m ringfx plan --model llama-8b-like --seq-len 1M --device-memory 80GiB --gpus 8

``ringfx/__main__.py`` wires the ``plan`` subcommand to ``add_plan_arguments`` and
``run_plan``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Callable

import torch

from .device import parse_bytes, parse_rate, parse_seq_len
from .memory import KERNEL_BACKWARD_WORKSPACE, OPTIMIZERS, PRECISIONS
from .presets import PRESETS


def flag_type(parse: Callable, **options) -> Callable[[str], object]:
    """An argparse ``type=`` from a ``parse_*`` function: a bad value is an argparse error
    ("argument --seq-len: 'abc' is not understood ..."), naming the flag, not a keyword."""

    def convert(text: str):
        try:
            return parse(text, "", **options)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def positive_int(text: str) -> int:
    """argparse ``type=``: a whole number >= 1."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} must be at least 1")
    return number


def _fraction(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"{number} must be in [0, 1): the fraction of device memory kept free")
    return number


def _seq_len(text: str):
    if text.strip().lower() == "max":
        return "max"
    return flag_type(parse_seq_len)(text)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help=f"a preset ({', '.join(sorted(PRESETS))}), a transformers config.json path, "
                             "TYPE:key=value,... (e.g. llama:hidden_size=4096,num_hidden_layers=32, built on the meta "
                             "device, no download) or module:factory (your code; returns a module and example inputs)")
    parser.add_argument("--seq-len", required=True, type=_seq_len,
                        help="tokens: 1M, 128K or 1048576 (K and M are powers of two), or max: the longest that fits")
    parser.add_argument("--device-memory", type=flag_type(parse_bytes, require_unit=True),
                        help="per-device memory with its unit: 80GiB (2**30 bytes) or 80GB (10**9 bytes); a bare "
                             "number is refused (default: this machine's GPU)")
    parser.add_argument("--gpus", type=positive_int, help="devices available for the ring (world size)")
    parser.add_argument("--device", help="device name for FLOP/s and bandwidth defaults: H100, H200, A100, TPUv4")
    parser.add_argument("--flops", type=flag_type(parse_rate), help="dense FLOP/s of one device, e.g. 790T")
    parser.add_argument("--bandwidth", type=flag_type(parse_rate),
                        help="link bandwidth to the ring neighbour, e.g. 450GB/s")
    parser.add_argument("--headroom", type=_fraction, default=0.1, help="fraction of memory kept free (default 0.1)")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--inference", action="store_true", help="plan a forward pass only")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    parser.add_argument("--fsdp", action="store_true", help="shard params/grads/optimizer state over the ring")
    parser.add_argument("--kernel", choices=sorted(KERNEL_BACKWARD_WORKSPACE), default="cudnn")
    parser.add_argument("--blockwise-loss", nargs="?", const=True, default=False, type=positive_int,
                        metavar="TOKENS", help="the LM head and its loss over chunks of tokens (transform("
                        "blockwise_loss=...)): the logits are never whole; TOKENS per chunk (default 1024)")
    parser.add_argument("--layout", choices=("contiguous", "zigzag"), help="default: zigzag when causal")
    parser.add_argument("--json", action="store_true", help="print the plan's numbers as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


# plan()'s keywords as this command spells them, for the errors plan() raises
_FLAGS = {"seq_len": "--seq-len", "device_memory": "--device-memory", "world_size": "--gpus", "device": "--device",
          "flops": "--flops", "bandwidth": "--bandwidth", "headroom": "--headroom", "batch_size": "--batch-size",
          "layout": "--layout", "kernel": "--kernel", "precision": "--precision", "optimizer": "--optimizer"}
_KEYWORD = re.compile(r"\b(" + "|".join(_FLAGS) + r")=(?=([\w'\"\-.])?)")


def _in_flags(message: str) -> str:
    """``"pass device_memory='80GiB'"`` -> ``"pass --device-memory '80GiB'"``."""
    return _KEYWORD.sub(lambda m: _FLAGS[m.group(1)] + (" " if m.group(2) else ""), message)


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; exit status 0 when it fits, 1 when it does not, 2 on bad input.
    Progress (the simulations behind the memory model take a while for large presets)
    goes to stderr."""
    from .plan import plan

    def error(message: str) -> int:
        print(f"python -m ringfx plan: error: {message}", file=sys.stderr)
        return 2

    if args.device_memory is None and not torch.cuda.is_available():
        return error("--device-memory is required: there is no CUDA device here to read it from "
                     "(e.g. --device-memory 80GiB)")
    device = args.device
    if device is None and not torch.cuda.is_available():
        device = "H100"
        print("ringfx plan: no CUDA device here and no --device: assuming H100 FLOP/s and NVLink bandwidth",
              file=sys.stderr)
    try:
        result = plan(
            args.model, args.seq_len, device=device, device_memory=args.device_memory, flops=args.flops,
            bandwidth=args.bandwidth, world_size=args.gpus, headroom=args.headroom, batch_size=args.batch_size,
            layout=args.layout, training=not args.inference, precision=args.precision, optimizer=args.optimizer,
            activation_checkpointing=args.checkpointing, param_shards="ring" if args.fsdp else 1, kernel=args.kernel,
            blockwise_loss=args.blockwise_loss, progress=not args.quiet,
        )
    except (ValueError, TypeError) as err:
        return error(_in_flags(str(err)))
    if args.json:
        print(json.dumps({
            "feasible": result.feasible, "ring_size": result.ring_size, "layout": result.layout,
            "seq_len": result.seq_len, "block_size": result.block_size, "dominant": result.dominant, "query_chunks": result.query_chunks,
            "predicted_peak_bytes": result.predicted_peak, "budget_bytes": result.budget,
            "breakdown": result.breakdown, "min_block": result.min_block, "overlap": result.overlap,
            "step_time_s": result.step_time, "reasons": result.reasons, "suggestions": result.suggestions,
            "memory_expression": str(result.memory_expression),
        }, indent=2))
    else:
        print(result)
    return 0 if result.feasible else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ringfx plan", description=__doc__.splitlines()[0])
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
