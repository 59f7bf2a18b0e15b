"""The `trl-guard` command."""

from __future__ import annotations

import argparse
import os
import sys

_COMMANDS = """commands:
  demo    Flow-GRPO and GRPO-Guard side by side, offline on CPU: the toy world (about 4 min) or --world tiny.
          Prints the diagnostics, writes the LoRAs and a report, and judges the paper's claims 1-3.
  grpo    Train a diffusers pipeline from a YAML recipe and flags (--config RECIPE.yaml).
  report  Plots and an HTML page from one or more run folders.

`trl-guard COMMAND --help` describes each."""


def main(argv: list[str] | None = None) -> None:
    """Dispatch `trl-guard COMMAND ...` to the command's own parser."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="trl-guard",
        usage="trl-guard {demo,grpo,report} [--help] [ARGS ...]",
        description="GRPO-Guard for flow-matching diffusion models.",
        epilog=_COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["demo", "grpo", "report"], help="what to run (see below)")
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
    parser = argparse.ArgumentParser(
        prog="trl-guard report",
        description="Draw the logged diagnostics of one or more runs side by side, as an HTML page with its plots.",
    )
    parser.add_argument("run_dirs", nargs="+", help="output_dir of each run to compare")
    parser.add_argument("--output", default=None, help="report folder (default: report/ inside the first RUN_DIR)")
    parser.add_argument(
        "--labels",
        nargs="*",
        default=None,
        help="one distinct name per run, in order (default: folder names, with parents when two share a name)",
    )
    parser.add_argument(
        "--eval-prompts",
        default=None,
        help="text file of the evaluation prompts, one per line in the eval dataset's order: captions each sample",
    )
    options = parser.parse_args(argv)
    from .report import ReportInputError, build_report

    output = options.output or os.path.join(options.run_dirs[0], "report")
    try:
        prompts = None
        if options.eval_prompts is not None:
            with open(options.eval_prompts) as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        page = build_report(options.run_dirs, output, options.labels, eval_prompts=prompts)
    except (FileNotFoundError, ReportInputError) as error:  # the user's input, not a bug: no traceback
        raise SystemExit(f"trl-guard report: {error}") from error
    print(page)


if __name__ == "__main__":
    main()
