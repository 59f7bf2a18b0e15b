"""The `trl-guard` command."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="trl-guard", description="GRPO-Guard for flow-matching diffusion models.")
    parser.add_argument(
        "command",
        choices=["demo", "grpo", "report"],
        help="demo: a short offline training run on a tiny pipeline; grpo: train from a YAML recipe and flags; "
        "report: plots and an HTML page from one or more run folders",
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
    elif command == "report":
        report(rest)


def report(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="trl-guard report", description="Draw a run's logged diagnostics.")
    parser.add_argument("run_dirs", nargs="+", help="output_dir of each run to compare")
    parser.add_argument("--output", default=None, help="report folder (default: RUN_DIR/report for one run)")
    parser.add_argument("--labels", nargs="*", default=None, help="a name per run (default: folder names)")
    options = parser.parse_args(argv)
    from .report import build_report

    output = options.output or os.path.join(options.run_dirs[0], "report")
    print(build_report(options.run_dirs, output, options.labels))


if __name__ == "__main__":
    main()
