"""Online Diffusion-DPO against Flow-GRPO on the tiny SD3 pipeline: how fast a reward rises, same seeds, same steps.

    nice -n 10 OMP_NUM_THREADS=1 python benchmarks/bench_dpo.py [--steps 12] [--seeds 3] [--lr 0.03]

Each run trains the randomly initialised tiny SD3 pipeline (`trl_guard.testing.build_tiny_sd3_pipeline`) on 8
prompts x 4 samples per round, one optimizer step per round (as every official Flow-GRPO and DPO SD3.5 config), with
the `blueness` reward (the mean blue channel, in [0, 1]), LoRA r=8 and AdamW at the same rate for both losses. Both
sample with Flow-GRPO's SDE (`noise_level` 0.7, 4 steps) and train 3 units per sample (Flow-GRPO: its first 3 steps,
`beta` 0.02; DPO: 3 noise levels per pair, `dpo_beta` 100, the official value).

DPO samples with its reference. With the official default (the frozen base, `dpo_ref_update_steps` unset) the
rollouts never change, so the rollout reward cannot show learning; the comparison runs the official "OnlineDPO" mode
with the reference refreshed at every step (`dpo_ref_update_steps=1`), so each round is sampled with the weights the
previous step left, as Flow-GRPO's. The gain per step is the least-squares slope of the round's mean reward against
the step, per seed; the script prints each run and the mean over seeds. This is a smoke-level comparison (a random
tiny model, a trivial reward), not a claim about SD3.5.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def blueness(prompts, images, **kwargs):
    return [float(np.asarray(image, dtype=np.float32)[..., 2].mean() / 255) for image in images]


LOSSES = {
    "flow_grpo": dict(loss_type="flow_grpo", beta=0.02, timestep_fraction=0.99),
    "dpo": dict(loss_type="dpo", dpo_beta=100.0, dpo_ref_update_steps=1, timestep_fraction=0.99),
}


def run(loss: str, seed: int, steps: int, lr: float) -> list[float]:
    """The mean reward of each round (one optimizer step each)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback

    from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
    from trl_guard.testing import build_tiny_sd3_pipeline

    prompts = Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(8)]})
    with tempfile.TemporaryDirectory() as output_dir:
        args = GuardConfig(
            output_dir=output_dir,
            num_generations=4,
            per_device_train_batch_size=8,
            steps_per_generation=4,
            gradient_accumulation_steps=4,
            max_steps=steps,
            height=32,
            width=32,
            max_sequence_length=16,
            num_inference_steps=4,
            guidance_scale=1.0,
            learning_rate=lr,
            lr_scheduler_type="constant",
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=1,
            seed=seed,
            **LOSSES[loss],
        )
        lora = LoraConfig(
            r=8,
            lora_alpha=16,
            init_lora_weights="gaussian",
            target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_out"],
        )
        trainer = GuardGRPODiffusionTrainer(
            model=build_tiny_sd3_pipeline(seed=0),
            reward_funcs=[blueness],
            args=args,
            train_dataset=prompts,
            peft_config=lora,
        )
        trainer.remove_callback(PrinterCallback)  # the per-step log lines; this script prints its own
        trainer.train()
        return [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.03, help="the rate of both losses")
    parser.add_argument("--dpo-lr", type=float, default=None, help="DPO's own rate (default: --lr)")
    options = parser.parse_args()
    rates = {"flow_grpo": options.lr, "dpo": options.dpo_lr or options.lr}
    slopes: dict[str, list[float]] = {loss: [] for loss in LOSSES}
    for seed in range(options.seeds):
        for loss in LOSSES:
            start = time.perf_counter()
            rewards = run(loss, seed, options.steps, rates[loss])
            slope = float(np.polyfit(np.arange(len(rewards)), rewards, 1)[0])
            slopes[loss].append(slope)
            print(
                f"{loss:9s} seed {seed} lr {rates[loss]:g}: reward {rewards[0]:.4f} -> {rewards[-1]:.4f} over "
                f"{len(rewards)} steps, gain per step {slope:+.5f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    mean = {loss: float(np.mean(values)) for loss, values in slopes.items()}
    for loss, value in mean.items():
        print(f"{loss:9s} mean gain per step over {options.seeds} seeds: {value:+.5f}")
    if mean["flow_grpo"] > 0:
        print(f"dpo / flow_grpo: {mean['dpo'] / mean['flow_grpo']:.2f}")


if __name__ == "__main__":
    main()
