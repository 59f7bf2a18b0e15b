"""The `trl-guard` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="trl-guard", description="GRPO-Guard for flow-matching diffusion models.")
    parser.add_argument(
        "command",
        choices=["demo", "grpo"],
        help="demo: a short offline training run on a tiny pipeline; grpo: train from a YAML recipe and flags",
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return
    command, rest = argv[0], argv[1:]
    parser.parse_args([command])
    if command == "demo":
        from .scripts.demo import main as demo

        demo(rest)
    elif command == "grpo":
        from .scripts.grpo import main as grpo

        grpo(rest)


if __name__ == "__main__":
    main()
