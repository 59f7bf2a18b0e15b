"""`trl-guard demo`: Flow-GRPO and GRPO-Guard side by side on CPU, offline, from the same base, seeds and prompts.

Two worlds:

- `toy` (default when the pretrained toy model is installed, `trl_guard/toy/pretrained`): a small SD3-architecture
  model pretrained on scenes of coloured shapes. It trains on a hackable colour proxy
  (`trl_guard.toy.colour_proxy`) and is watched by gold scores it never trains on: caption fidelity, cleanliness,
  and diversity across seeds. About 4 minutes on 2 CPU cores.
- `tiny`: a randomly initialised tiny SD3 pipeline built on the spot, trained to make images bluer. It shows the
  mechanics and the clipping diagnostics, not over-optimisation of a pretrained model. About 20 seconds on
  2 CPU cores.

The demo prints each reward curve and the per-timestep diagnostics the GRPO-Guard paper plots (log-ratio mean/std,
clip fractions above and below, gradient norm), writes the LoRAs and an HTML report comparing the runs, and checks
that a fresh pipeline loads a LoRA and draws differently. It ends by judging the paper's claims 1-3 from the
run's own numbers, with the thresholds it uses:

  1. under Flow-GRPO the per-timestep mean log-ratio is below 0 and its spread differs across timesteps; under
     GRPO-Guard the mean is about 0 and the spread similar;
  2. under Flow-GRPO clipping above 1 + epsilon almost never happens while clipping below concentrates in the last
     steps; under GRPO-Guard the two clip fractions are about equal;
  3. per-timestep gradient norms vary about 20x under Flow-GRPO and about 2.5x under GRPO-Guard.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trl_guard import metrics
from trl_guard.algorithms import method_name
from trl_guard.metrics import Stat

DIAGNOSTICS = (Stat.LOG_RATIO_MEAN, Stat.LOG_RATIO_STD, Stat.CLIP_FRAC_HIGH, Stat.CLIP_FRAC_LOW, Stat.GRAD_NORM)
TOY_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "toy", "pretrained")  # = toy.model.PRETRAINED


def blueness(prompts, images, **kwargs):
    """Mean blue channel of each image, in [0, 1]."""
    return [float(np.asarray(image, dtype=np.float32)[..., 2].mean() / 255) for image in images]


@dataclass
class World:
    """Everything the demo needs to know about one world."""

    build_pipeline: Callable[[], Any]
    reward_funcs: list
    reward_weights: list[float]
    gold_reward_funcs: list
    train_prompts: list[str]
    eval_prompts: list[str]
    config: dict = field(default_factory=dict)
    lora: dict = field(default_factory=dict)
    steps: int = 40
    learning_rate: float = 0.1
    name: str = ""
    summary: str = ""


def tiny_world() -> World:
    from trl_guard.testing import build_tiny_sd3_pipeline

    return World(
        build_pipeline=lambda: build_tiny_sd3_pipeline(seed=0),
        reward_funcs=[blueness],
        reward_weights=[1.0],
        gold_reward_funcs=["jpeg_compressibility"],  # a stand-in: the random model has nothing to lose
        train_prompts=[f"a picture, take {i}" for i in range(8)],
        eval_prompts=[f"a picture, take {i}" for i in range(4)],
        config=dict(
            num_generations=4,
            per_device_train_batch_size=16,
            num_inference_steps=4,
            eval_num_inference_steps=8,
            max_sequence_length=16,
        ),
        lora=dict(
            r=8, lora_alpha=16, target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_out"]
        ),
        steps=40,
        learning_rate=0.1,
        name="tiny",
        summary="a randomly initialised tiny SD3 pipeline; proxy reward: blueness; gold: JPEG compressibility",
    )


def toy_world() -> World:
    from trl_guard.toy import caption_fidelity, cleanliness, colour_proxy, seed_diversity
    from trl_guard.toy.model import load_toy_pipeline
    from trl_guard.toy.train import MAX_SEQUENCE_LENGTH, all_captions

    captions = all_captions()
    rng = random.Random(0)
    train, held_out = rng.sample(captions, 64), rng.sample(captions, 16)
    return World(
        build_pipeline=lambda: load_toy_pipeline(TOY_MODEL),
        # seed_diversity rides along with weight 0: logged for every rollout, never trained on
        reward_funcs=[colour_proxy, seed_diversity],
        reward_weights=[1.0, 0.0],
        gold_reward_funcs=[caption_fidelity, cleanliness],
        train_prompts=train,
        eval_prompts=held_out,
        config=dict(
            num_generations=8,
            # 4 prompts x 8 samples a round (two optimizer steps of 16): half the 8 x 8 of the studies, for half the
            # time, with the same verdict on claims 1-3 (docs/performance.md, "The toy world's time")
            per_device_train_batch_size=16,
            num_inference_steps=10,
            eval_num_inference_steps=10,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        ),
        lora=dict(r=16, lora_alpha=32),
        steps=60,
        learning_rate=3e-3,
        name="toy",
        summary=(
            "a small SD3-architecture model pretrained on coloured shapes; proxy reward: colour_proxy; gold: caption "
            "fidelity and cleanliness, never trained on"
        ),
    )


WORLDS: dict[str, Callable[[], World]] = {"toy": toy_world, "tiny": tiny_world}


# Thresholds of the verdict on the paper's claims 1-3; the verdict prints each one next to the measured value.
SHIFTED_SHARE = 2 / 3  # claim 1: Flow-GRPO's mean log-ratio is below 0 at this share of the timesteps or more
CENTRED = 0.2  # claim 1: GRPO-Guard's |mean log-ratio| is at most this many of its stds at every timestep
UNEVEN = 10.0  # claims 1 and 3: "varies across timesteps" is a max/min ratio of at least this
EVEN = 5.0  # claims 1 and 3: "similar across timesteps" is a max/min ratio of at most this
ONE_SIDED = 0.5  # claim 2: Flow-GRPO clips above at most this many times as often as below
LATE = 2.0  # claim 2: Flow-GRPO's clip-below fraction in its last third of timesteps is this many times the first's
BALANCED = (0.75, 1 / 0.75)  # claim 2: GRPO-Guard's above/below clip ratio lies in this range


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"must be > 0, got {text} (a learning rate of 0 trains nothing; leave --learning-rate out for the "
            "world's default)"
        )
    return value


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    # read from the registry at call time: it may grow, and the demo should offer whatever the trainer accepts
    from trl_guard.algorithms import loss_types

    LOSS_TYPES = loss_types()

    parser = parser or argparse.ArgumentParser(
        prog="trl-guard demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--world",
        choices=["toy", "tiny"],
        default=None,
        help="toy (pretrained shapes model; default when installed) or tiny (random model)",
    )
    parser.add_argument("--output-dir", default="outputs/demo", help="One folder per method, and report/.")
    parser.add_argument(
        "--loss-types",
        nargs="+",
        choices=LOSS_TYPES,
        metavar="LOSS_TYPE",
        default=["flow_grpo", "grpo_guard"],
        help=f"The methods to train, in order (GuardConfig.loss_type), one or more of: {', '.join(LOSS_TYPES)}. "
        "Default: flow_grpo grpo_guard, the two that claims 1-3 compare.",
    )
    parser.add_argument(
        "--steps", type=_positive_int, default=None, help="Optimizer steps per method (world's default)."
    )
    parser.add_argument(
        "--learning-rate",
        type=_learning_rate,
        default=None,
        help="A learning rate > 0 for every method; the world's default if unset (toy 3e-3, tiny 0.1).",
    )
    parser.add_argument("--seed", type=int, default=1, help="The seed of every method's run (default 1).")
    return parser


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's options, refused before anything is built or trained: an unknown or repeated loss type, a
    learning rate <= 0, the toy world without its model."""
    parser = build_parser()
    options = parser.parse_args(argv)
    repeated = sorted({t for t in options.loss_types if options.loss_types.count(t) > 1})
    if repeated:
        parser.error(
            f"--loss-types lists {', '.join(repeated)} more than once: each method trains into "
            f"{os.path.join(options.output_dir, '<loss_type>')}, so give each once."
        )
    toy_installed = os.path.exists(os.path.join(TOY_MODEL, "model_index.json"))
    if options.world == "toy" and not toy_installed:
        parser.error(f"--world toy needs the pretrained toy model in {TOY_MODEL}, which is missing; use --world tiny.")
    options.world = options.world or ("toy" if toy_installed else "tiny")
    return options


def plan(world: World, options: argparse.Namespace) -> str:
    """What the demo is about to run."""
    steps, _ = run_settings(world, options)
    methods = ", then ".join(f"{t} ({method_name(t)})" for t in options.loss_types)
    return (
        f"world: {world.name} ({world.summary}).\n"
        f"It trains {methods}: {steps} optimizer steps each, from the same base, seeds and prompts, then compares "
        "them and judges the GRPO-Guard paper's claims 1-3 from the numbers. Each method shows a progress bar with "
        "the time left."
    )


def format_timestep_table(history: list[dict]) -> str:
    from trl_guard.report.runs import timestep_table

    table = timestep_table(history)
    steps = sorted({t for stat in table.values() for t in stat})
    lines = ["step " + "".join(f"{name:>16}" for name in DIAGNOSTICS)]
    for step in steps:
        lines.append(f"{step:>4} " + "".join(f"{table.get(n, {}).get(step, np.nan):>16.3e}" for n in DIAGNOSTICS))
    return "\n".join(lines)


def run_settings(world: World, options: argparse.Namespace) -> tuple[int, float]:
    """Optimizer steps and learning rate per method: the options', else the world's defaults. Only None means
    unset: the parser has already refused a learning rate <= 0."""
    steps = world.steps if options.steps is None else options.steps
    learning_rate = world.learning_rate if options.learning_rate is None else options.learning_rate
    return steps, learning_rate


@dataclass
class Run:
    """One trained method: where its LoRA is, and what it logged (the base model's evaluation first)."""

    loss_type: str
    output_dir: str
    history: list[dict]


def demo_trainer(loss_type: str, world: World, options):
    """The demo's trainer for one method: the world's model, rewards, prompts and settings."""
    from datasets import Dataset
    from peft import LoraConfig

    from trl_guard import GuardConfig, GuardGRPODiffusionTrainer

    steps, learning_rate = run_settings(world, options)
    args = GuardConfig(
        output_dir=os.path.join(options.output_dir, loss_type),
        loss_type=loss_type,
        steps_per_generation=2,  # two optimizer steps per sampling round: the second one is off-policy
        max_steps=steps,
        learning_rate=learning_rate,
        reward_weights=world.reward_weights,
        height=32,
        width=32,
        guidance_scale=1.0,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=max(2, steps // 6 // 2 * 2),
        per_device_eval_batch_size=16,
        save_strategy="no",
        report_to="none",
        seed=options.seed,
        **world.config,
    )
    return GuardGRPODiffusionTrainer(
        model=world.build_pipeline(),
        reward_funcs=world.reward_funcs,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": world.train_prompts}),
        eval_dataset=Dataset.from_dict({"prompt": world.eval_prompts}),
        peft_config=LoraConfig(init_lora_weights="gaussian", **world.lora),
        gold_reward_funcs=world.gold_reward_funcs,
    )


def train_one(loss_type: str, world: World, options, position: tuple[int, int] = (1, 1)) -> Run:
    """Train one method and print its summary."""
    output_dir = os.path.join(options.output_dir, loss_type)
    steps, learning_rate = run_settings(world, options)
    print(
        f"\n[{position[0]}/{position[1]}] {loss_type} ({method_name(loss_type)}): {steps} optimizer "
        f"steps at learning rate {learning_rate:g}, into {output_dir}",
        flush=True,
    )
    trainer = demo_trainer(loss_type, world, options)
    start = time.time()
    base_scores = trainer.evaluate()  # the base model's scores; train() starts a fresh log, so keep them
    trainer.train()
    elapsed = time.time() - start
    trainer.state.log_history.insert(0, {**base_scores, "step": 0})
    trainer.save_model()

    history = trainer.state.log_history
    rewards = [(entry["step"], entry[Stat.REWARD]) for entry in history if Stat.REWARD in entry]
    print(f"\nloss_type={loss_type}: {steps} optimizer steps in {elapsed:.1f} s")
    print("proxy reward by step: " + ", ".join(f"{step}: {reward:.4f}" for step, reward in rewards))
    for entry in history:
        gold = {k: v for k, v in entry.items() if k.startswith((metrics.EVAL_GOLD, metrics.EVAL_REWARD))}
        if gold:
            print(f"  eval at step {entry['step']}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in gold.items()))
    print("per-timestep diagnostics (mean over the run; step 0 is the noisiest):")
    print(format_timestep_table(history))
    return Run(loss_type, output_dir, history)


@dataclass
class ClaimVerdict:
    """The verdict on one of the paper's claims, with the measured value against each threshold."""

    claim: int
    statement: str
    verdict: str  # "reproduced", "partly reproduced", "reproduced in direction only", "not reproduced", "not judged"
    checks: list[str] = field(default_factory=list)


def _ratio(values: list[float]) -> float | None:
    """max/min of the positive values; None when fewer than two timesteps have one."""
    positive = [v for v in values if v > 0]
    return max(positive) / min(positive) if len(positive) >= 2 else None


def _spread(by_step: dict[int, float]) -> tuple[float | None, str]:
    """max/min across timesteps, and the same without the last timestep (which often stands apart), as text."""
    steps = sorted(by_step)
    ratio = _ratio([by_step[t] for t in steps])
    without_last = _ratio([by_step[t] for t in steps[:-1]])
    if ratio is None:
        return None, "n/a"
    return ratio, f"{ratio:.1f}x" + (f" ({without_last:.1f}x without the last timestep)" if without_last else "")


def _timesteps(count: int) -> str:
    return "timestep" if count == 1 else f"{count} timesteps"


def _mark(passed: bool) -> str:
    return "yes" if passed else "NO"


def _verdict(parts: list[bool]) -> str:
    return "reproduced" if all(parts) else "partly reproduced" if any(parts) else "not reproduced"


def judge_claims(tables: dict[str, dict[str, dict[int, float]]]) -> list[ClaimVerdict]:
    """Judge the GRPO-Guard paper's claims 1-3 from per-timestep means (`{loss_type: {stat: {timestep: value}}}`,
    as `trl_guard.report.runs.timestep_table` gives them) against the thresholds at the top of this module.

    A claim that the numbers cannot speak to (a method missing, no off-policy update logged, a statistic not logged)
    is "not judged", with the reason.
    """
    statements = {
        1: "under Flow-GRPO the mean log-ratio is below 0 and its spread differs across timesteps; under GRPO-Guard "
        "the mean is about 0 and the spread similar",
        2: "under Flow-GRPO clipping above 1+eps almost never happens and clipping below concentrates in the last "
        "steps; under GRPO-Guard the two clip fractions are about equal",
        3: "per-timestep gradient norms vary about 20x under Flow-GRPO and about 2.5x under GRPO-Guard",
    }
    missing = [t for t in ("flow_grpo", "grpo_guard") if t not in tables]
    if missing:
        reason = f"the claims compare flow_grpo with grpo_guard, and this run did not train {' or '.join(missing)}"
        return [ClaimVerdict(n, statements[n], "not judged", [reason]) for n in statements]
    flow, guard = tables["flow_grpo"], tables["grpo_guard"]
    verdicts = []

    # Claim 1: the log-ratio's per-timestep mean and spread.
    stds = {name: table.get(Stat.LOG_RATIO_STD, {}) for name, table in (("flow_grpo", flow), ("grpo_guard", guard))}
    if not all(any(v > 0 for v in std.values()) for std in stds.values()):
        verdicts.append(
            ClaimVerdict(
                1,
                statements[1],
                "not judged",
                ["every logged ratio was exactly 1: no off-policy update happened (run 2 or more steps)"],
            )
        )
    else:
        means = flow.get(Stat.LOG_RATIO_MEAN, {})
        below = sum(means[t] < 0 for t in means)
        shifted = bool(means) and below >= SHIFTED_SHARE * len(means)
        guard_means, guard_stds = guard.get(Stat.LOG_RATIO_MEAN, {}), stds["grpo_guard"]
        offsets = [abs(guard_means[t]) / guard_stds[t] for t in guard_means if guard_stds.get(t, 0) > 0]
        centred = bool(offsets) and max(offsets) <= CENTRED
        flow_ratio, flow_text = _spread(stds["flow_grpo"])
        guard_ratio, guard_text = _spread(guard_stds)
        uneven = flow_ratio is not None and flow_ratio >= UNEVEN
        even = guard_ratio is not None and guard_ratio <= EVEN
        verdicts.append(
            ClaimVerdict(
                1,
                statements[1],
                _verdict([shifted and centred, uneven and even]),
                [
                    f"flow_grpo: mean log-ratio below 0 at {below} of {len(means)} timesteps "
                    f"(needs {SHIFTED_SHARE:.0%} or more): {_mark(shifted)}",
                    f"grpo_guard: |mean| at most {CENTRED:g} std at every timestep (largest "
                    f"{max(offsets, default=float('nan')):.2f}): {_mark(centred)}",
                    f"flow_grpo: the std varies {flow_text} across timesteps (needs {UNEVEN:g}x or more): "
                    f"{_mark(uneven)}",
                    f"grpo_guard: the std varies {guard_text} across timesteps (needs {EVEN:g}x or less): "
                    f"{_mark(even)}",
                ],
            )
        )

    # Claim 2: clip fractions above and below.
    def clip_totals(table: dict[str, dict[int, float]]) -> tuple[float, float]:
        return sum(table.get(Stat.CLIP_FRAC_HIGH, {}).values()), sum(table.get(Stat.CLIP_FRAC_LOW, {}).values())

    (flow_high, flow_low), (guard_high, guard_low) = clip_totals(flow), clip_totals(guard)
    if flow_low == 0 or guard_low == 0:
        verdicts.append(
            ClaimVerdict(
                2,
                statements[2],
                "not judged",
                ["a method never clipped below 1-eps: no off-policy update happened (run 2 or more steps)"],
            )
        )
    else:
        one_sided = flow_high <= ONE_SIDED * flow_low
        low = flow.get(Stat.CLIP_FRAC_LOW, {})
        steps = sorted(low)
        third = max(1, round(len(steps) / 3))
        first = sum(low[t] for t in steps[:third]) / third
        last = sum(low[t] for t in steps[-third:]) / third
        late = last >= LATE * first and len(steps) > third
        balance = guard_high / guard_low
        balanced = BALANCED[0] <= balance <= BALANCED[1]
        verdicts.append(
            ClaimVerdict(
                2,
                statements[2],
                _verdict([one_sided, late, balanced]),
                [
                    f"flow_grpo: clips above {flow_high / flow_low:.2f} times as often as below (needs "
                    f"{ONE_SIDED:g} or less): {_mark(one_sided)}",
                    f"flow_grpo: clip-below fraction {last:.3f} in the last {_timesteps(third)} against {first:.3f} "
                    f"in the first (needs {LATE:g}x or more): {_mark(late)}",
                    f"grpo_guard: clips above {balance:.2f} times as often as below (needs {BALANCED[0]:.2f} to "
                    f"{BALANCED[1]:.2f}): {_mark(balanced)}",
                ],
            )
        )

    # Claim 3: per-timestep gradient norms.
    flow_ratio, flow_text = _spread(flow.get(Stat.GRAD_NORM, {}))
    guard_ratio, guard_text = _spread(guard.get(Stat.GRAD_NORM, {}))
    if flow_ratio is None or guard_ratio is None:
        verdicts.append(
            ClaimVerdict(
                3,
                statements[3],
                "not judged",
                ["per-timestep gradient norms were not logged for two timesteps or more (log_timestep_grad_norm)"],
            )
        )
    else:
        uneven, even = flow_ratio >= UNEVEN, guard_ratio <= EVEN
        if uneven and even:
            verdict = "reproduced"
        elif guard_ratio <= flow_ratio / 2:  # clearly more even, though not by the paper's margins
            verdict = "reproduced in direction only"
        else:
            verdict = "not reproduced"
        verdicts.append(
            ClaimVerdict(
                3,
                statements[3],
                verdict,
                [
                    f"flow_grpo: gradient norm varies {flow_text} across timesteps (needs {UNEVEN:g}x or more): "
                    f"{_mark(uneven)}",
                    f"grpo_guard: gradient norm varies {guard_text} across timesteps (needs {EVEN:g}x or less): "
                    f"{_mark(even)}",
                    f"grpo_guard's variation is {guard_ratio / flow_ratio:.2f} of flow_grpo's (in direction "
                    "needs 0.5 or less)",
                ],
            )
        )
    return verdicts


def format_claims(verdicts: list[ClaimVerdict]) -> str:
    """The verdicts as text, one claim per paragraph, the evidence indented under it."""
    lines = []
    for verdict in verdicts:
        lines.append(f"claim {verdict.claim}: {verdict.verdict.upper()}: {verdict.statement}.")
        lines.extend(f"    {check}" for check in verdict.checks)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    import diffusers
    import torch

    from trl_guard.report.runs import timestep_table

    world = WORLDS[options.world]()
    print(plan(world, options), flush=True)
    runs = [
        train_one(loss_type, world, options, (i, len(options.loss_types)))
        for i, loss_type in enumerate(options.loss_types, start=1)
    ]

    diffusers.utils.logging.set_verbosity_error()  # silences "no LoRA keys for the text encoders" notices
    base = world.build_pipeline()
    base.set_progress_bar_config(disable=True)
    prompt = world.eval_prompts[0]
    kwargs = dict(
        height=32,
        width=32,
        num_inference_steps=8,
        guidance_scale=1.0,
        max_sequence_length=world.config["max_sequence_length"],
        output_type="np",
    )
    plain = base(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    for run in runs:
        base.load_lora_weights(run.output_dir)
        tuned = base(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
        base.unload_lora_weights()
        print(
            f"\n{os.path.abspath(run.output_dir)}: the LoRA, loaded into a fresh pipeline, changes the image of "
            f"{prompt!r} by {np.abs(tuned - plain).mean():.4f} on average."
        )

    steps, _ = run_settings(world, options)
    try:
        from trl_guard.report import build_report

        report = build_report(
            [run.output_dir for run in runs],
            os.path.join(options.output_dir, "report"),
            eval_prompts=world.eval_prompts,  # one process: the grids hold the first prompts in order
        )
        with open(os.path.join(os.path.dirname(report), "verdict.txt")) as f:
            verdict = f.read()
        if verdict:
            print(f"\nverdict of this demo on gold against proxy (one seed, {steps} steps per method):\n{verdict}")
            print(
                "The multi-seed answer, with intervals, is in docs/reproducing_the_paper.md "
                "(benchmarks/overoptimization.py reruns it)."
            )
        print("\nreport:", report)
    except ImportError as error:
        print(f"\nno report: {error}")

    tables = {run.loss_type: timestep_table(run.history) for run in runs}
    print(
        f"\nThe GRPO-Guard paper's claims 1-3, judged from this run's per-timestep means (one seed, {steps} steps per "
        "method; about half of the updates are a round's on-policy first step, where every ratio is 1):"
    )
    print(format_claims(judge_claims(tables)))


if __name__ == "__main__":
    main()
