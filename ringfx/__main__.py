"""``python -m ringfx {demo,plan}``."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ringfx")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="transform a small model and check it on a local gloo ring", add_help=False)
    plan = sub.add_parser("plan", help="choose ring size and block size for a model and sequence length")
    from .planner.cli import add_plan_arguments, run_plan

    add_plan_arguments(plan)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo

        return demo(rest)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    return run_plan(args)


if __name__ == "__main__":
    sys.exit(main())
