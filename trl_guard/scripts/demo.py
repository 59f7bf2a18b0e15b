"""`trl-guard demo`: Flow-GRPO and GRPO-Guard side by side on CPU, offline, from the same base, seeds and prompts.

Two worlds:

- `toy` (default when the pretrained toy model is installed, `trl_guard/toy/pretrained`): a small SD3-architecture
  model pretrained on scenes of coloured shapes. It trains on a hackable colour proxy
  (`trl_guard.toy.colour_proxy`) and is watched by gold scores it never trains on: caption fidelity, cleanliness,
  and diversity across seeds.
- `tiny`: a randomly initialised tiny SD3 pipeline built on the spot, trained to make images bluer. It shows the
  mechanics and the clipping diagnostics, not over-optimisation of a pretrained model.

The demo prints each reward curve and the per-timestep diagnostics the GRPO-Guard paper plots (log-ratio mean/std,
clip fractions above and below, gradient norm), writes the LoRAs and an HTML report comparing the runs, and checks
that a fresh pipeline loads a LoRA and draws differently.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trl_guard import metrics

DIAGNOSTICS = ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low", "grad_norm")
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
            per_device_train_batch_size=32,
            num_inference_steps=10,
            eval_num_inference_steps=10,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        ),
        lora=dict(r=16, lora_alpha=32),
        steps=60,
        learning_rate=3e-3,
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="trl-guard demo", description=__doc__)
    parser.add_argument(
        "--world",
        choices=["toy", "tiny"],
        default=None,
        help="toy (pretrained shapes model; default when installed) or tiny (random model)",
    )
    parser.add_argument("--output-dir", default="outputs/demo", help="One folder per method, and report/.")
    parser.add_argument("--loss-types", nargs="+", default=["flow_grpo", "grpo_guard"], help="GuardConfig.loss_type")
    parser.add_argument(
        "--steps", type=_positive_int, default=None, help="Optimizer steps per method (world's default)."
    )
    parser.add_argument("--learning-rate", type=float, default=None, help="World's default if unset.")
    parser.add_argument("--seed", type=int, default=1)
    return parser


def format_timestep_table(history: list[dict]) -> str:
    from trl_guard.report.build import timestep_table

    table = timestep_table(history)
    steps = sorted({t for stat in table.values() for t in stat})
    lines = ["step " + "".join(f"{name:>16}" for name in DIAGNOSTICS)]
    for step in steps:
        lines.append(f"{step:>4} " + "".join(f"{table.get(n, {}).get(step, np.nan):>16.3e}" for n in DIAGNOSTICS))
    return "\n".join(lines)


def train_one(loss_type: str, world: World, options) -> str:
    from datasets import Dataset
    from peft import LoraConfig

    from trl_guard import GuardConfig, GuardGRPODiffusionTrainer

    output_dir = os.path.join(options.output_dir, loss_type)
    steps = options.steps or world.steps
    args = GuardConfig(
        output_dir=output_dir,
        loss_type=loss_type,
        steps_per_generation=2,  # two optimizer steps per sampling round: the second one is off-policy
        max_steps=steps,
        learning_rate=options.learning_rate or world.learning_rate,
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
    trainer = GuardGRPODiffusionTrainer(
        model=world.build_pipeline(),
        reward_funcs=world.reward_funcs,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": world.train_prompts}),
        eval_dataset=Dataset.from_dict({"prompt": world.eval_prompts}),
        peft_config=LoraConfig(init_lora_weights="gaussian", **world.lora),
        gold_reward_funcs=world.gold_reward_funcs,
    )
    start = time.time()
    base_scores = trainer.evaluate()  # the base model's scores; train() starts a fresh log, so keep them
    trainer.train()
    elapsed = time.time() - start
    trainer.state.log_history.insert(0, {**base_scores, "step": 0})
    trainer.save_model()

    history = trainer.state.log_history
    rewards = [(entry["step"], entry["reward"]) for entry in history if "reward" in entry]
    print(f"\nloss_type={loss_type}: {steps} optimizer steps in {elapsed:.1f} s")
    print("proxy reward by step: " + ", ".join(f"{step}: {reward:.4f}" for step, reward in rewards))
    for entry in history:
        gold = {k: v for k, v in entry.items() if k.startswith((metrics.EVAL_GOLD, metrics.EVAL_REWARD))}
        if gold:
            print(f"  eval at step {entry['step']}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in gold.items()))
    print("per-timestep diagnostics (mean over the run; step 0 is the noisiest):")
    print(format_timestep_table(history))
    return output_dir


def main(argv: list[str] | None = None) -> None:
    options = build_parser().parse_args(argv)
    import diffusers
    import torch

    world_name = options.world or ("toy" if os.path.exists(os.path.join(TOY_MODEL, "model_index.json")) else "tiny")
    world = toy_world() if world_name == "toy" else tiny_world()
    print(f"world: {world_name}")
    runs = [train_one(loss_type, world, options) for loss_type in options.loss_types]

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
        base.load_lora_weights(run)
        tuned = base(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
        base.unload_lora_weights()
        print(
            f"\n{os.path.abspath(run)}: the LoRA, loaded into a fresh pipeline, changes the image of {prompt!r} by "
            f"{np.abs(tuned - plain).mean():.4f} on average."
        )

    try:
        from trl_guard.report import build_report

        report = build_report(runs, os.path.join(options.output_dir, "report"))
        with open(os.path.join(os.path.dirname(report), "verdict.txt")) as f:
            verdict = f.read()
        if verdict:
            print(f"\nverdict of this demo (one seed, {options.steps or world.steps} steps per method):\n{verdict}")
            print(
                "The multi-seed answer, with intervals, is in docs/reproducing_the_paper.md "
                "(benchmarks/overoptimization.py reruns it)."
            )
        print("\nreport:", report)
    except ImportError as error:
        print(f"\nno report: {error}")


if __name__ == "__main__":
    main()
