"""`trl-guard demo`: Flow-GRPO and GRPO-Guard side by side on a tiny SD3 pipeline built locally (CPU, no download).

Each method trains a LoRA from the same base, seeds and prompts to make images bluer (a reward the tiny random model
can learn in a few dozen steps). The demo prints each reward curve and the per-timestep diagnostics the GRPO-Guard
paper plots (log-ratio mean/std, clip fractions above and below, gradient norm). It writes the LoRAs and an HTML
report comparing the runs, and checks that a fresh pipeline loads a LoRA and draws differently.

The tiny model is random, so this shows the mechanics and the clipping diagnostics, not over-optimisation of a
pretrained model; its "gold" score (JPEG compressibility, never trained on) is a stand-in.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np

DIAGNOSTICS = ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low", "grad_norm")


def blueness(prompts, images, **kwargs):
    """Mean blue channel of each image, in [0, 1]."""
    return [float(np.asarray(image, dtype=np.float32)[..., 2].mean() / 255) for image in images]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="trl-guard demo", description=__doc__)
    parser.add_argument("--output-dir", default="outputs/demo", help="One folder per method, and report/.")
    parser.add_argument("--loss-types", nargs="+", default=["flow_grpo", "grpo_guard"], help="GuardConfig.loss_type")
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps per method.")
    parser.add_argument("--learning-rate", type=float, default=0.1, help="High because the model is tiny.")
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


def train_one(loss_type: str, pipeline, options) -> str:
    from datasets import Dataset
    from peft import LoraConfig

    from trl_guard import GuardConfig, GuardGRPODiffusionTrainer

    output_dir = os.path.join(options.output_dir, loss_type)
    args = GuardConfig(
        output_dir=output_dir,
        loss_type=loss_type,
        num_generations=4,
        per_device_train_batch_size=16,
        steps_per_generation=2,  # two optimizer steps per sampling round: the second one is off-policy
        max_steps=options.steps,
        learning_rate=options.learning_rate,
        height=32,
        width=32,
        num_inference_steps=4,
        eval_num_inference_steps=8,
        max_sequence_length=16,
        guidance_scale=1.0,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=max(1, options.steps // 4),
        save_strategy="no",
        report_to="none",
        seed=options.seed,
    )
    trainer = GuardGRPODiffusionTrainer(
        model=pipeline,
        reward_funcs=[blueness],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [f"a picture, take {i}" for i in range(8)]}),
        eval_dataset=Dataset.from_dict({"prompt": [f"a picture, take {i}" for i in range(4)]}),
        peft_config=LoraConfig(
            r=8,
            lora_alpha=16,
            init_lora_weights="gaussian",
            target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_out"],
        ),
        gold_reward_funcs=["jpeg_compressibility"],
    )
    start = time.time()
    trainer.train()
    elapsed = time.time() - start
    trainer.save_model()

    history = trainer.state.log_history
    rewards = [(entry["step"], entry["reward"]) for entry in history if "reward" in entry]
    print(f"\nloss_type={loss_type}: {options.steps} optimizer steps in {elapsed:.1f} s")
    print("reward by step: " + ", ".join(f"{step}: {reward:.4f}" for step, reward in rewards))
    print("per-timestep diagnostics (mean over the run; step 0 is the noisiest):")
    print(format_timestep_table(history))
    return output_dir


def main(argv: list[str] | None = None) -> None:
    options = build_parser().parse_args(argv)
    import diffusers
    import torch

    from trl_guard.testing import build_tiny_sd3_pipeline

    base = build_tiny_sd3_pipeline(seed=0)
    runs = [train_one(loss_type, copy.deepcopy(base), options) for loss_type in options.loss_types]

    diffusers.utils.logging.set_verbosity_error()  # silences "no LoRA keys for the text encoders" notices
    base.set_progress_bar_config(disable=True)
    kwargs = dict(height=32, width=32, num_inference_steps=8, guidance_scale=1.0, max_sequence_length=16)
    plain = base("a picture, take 0", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    for run in runs:
        base.load_lora_weights(run)
        tuned = base(
            "a picture, take 0", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs
        ).images
        base.unload_lora_weights()
        print(
            f"\n{os.path.abspath(run)}: the LoRA, loaded into a fresh pipeline, changes the image by "
            f"{np.abs(tuned - plain).mean():.4f} on average (blue {plain[..., 2].mean():.3f} -> "
            f"{tuned[..., 2].mean():.3f})."
        )

    try:
        from trl_guard.report import build_report

        print("\nreport:", build_report(runs, os.path.join(options.output_dir, "report")))
    except ImportError as error:
        print(f"\nno report: {error}")


if __name__ == "__main__":
    main()
