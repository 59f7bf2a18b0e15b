"""Flow-DPPO against Flow-GRPO on the tiny SD3 pipeline: how fast a reward rises, same seeds, same steps.

    nice -n 10 OMP_NUM_THREADS=1 python benchmarks/bench_flow_dppo.py [--steps 32] [--seeds 3] [--lr 0.03]

Each run trains the randomly initialised tiny SD3 pipeline (`trl_guard.testing.build_tiny_sd3_pipeline`) on 8
prompts x 4 samples per round and two optimizer steps per round (as the official Flow-DPPO and Flow-GRPO SD3.5
configs: the second step is off-policy, where the clip or the mask can act), with the `blueness` reward (the mean blue
channel, in [0, 1]), LoRA r=8 and AdamW at the same rate for both losses, no KL to the reference. Both sample with
Flow-GRPO's SDE (`noise_level` 0.7) and train the first 3 of 4 steps; Flow-GRPO clips at its `epsilon` 1e-4,
Flow-DPPO masks at its official threshold 1e-5 with the old means recomputed before each round's first update (its
recipe's setting). The gain per step is the least-squares slope of the round's mean reward against the optimizer step,
per seed; the script prints each run, the mean over seeds, and Flow-DPPO's share of the masked samples. A smoke-level
comparison (a random tiny model, a trivial reward), not a claim about SD3.5. At 0.1 the reward falls for both losses on
one seed of three; 0.03 (the default) rises on all three.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def blueness(prompts, images, **kwargs):
    return [float(np.asarray(image, dtype=np.float32)[..., 2].mean() / 255) for image in images]


LOSSES = {
    "flow_grpo": dict(loss_type="flow_grpo", epsilon=1e-4),
    "flow_dppo": dict(loss_type="flow_dppo", dppo_kl_threshold=1e-5, recompute_old_means=True),
}


def run(loss: str, seed: int, steps: int, lr: float) -> tuple[list[int], list[float], float]:
    """The optimizer steps at which a round's mean reward was logged, those rewards, and the mean masked fraction
    (both signs; 0 for Flow-GRPO)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback

    from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
    from trl_guard.metrics import Stat
    from trl_guard.testing import build_tiny_sd3_pipeline

    prompts = Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(8)]})
    with tempfile.TemporaryDirectory() as output_dir:
        args = GuardConfig(
            output_dir=output_dir,
            num_generations=4,
            per_device_train_batch_size=8,
            steps_per_generation=4,
            gradient_accumulation_steps=2,
            max_steps=steps,
            height=32,
            width=32,
            max_sequence_length=16,
            num_inference_steps=4,
            timestep_fraction=0.99,
            guidance_scale=1.0,
            learning_rate=lr,
            lr_scheduler_type="constant",
            scale_rewards="batch",
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
        trainer.remove_callback(PrinterCallback)  # the figures below, not every step's logs
        trainer.train()
        history = trainer.state.log_history
        rounds = [(entry["step"], entry["reward"]) for entry in history if "reward" in entry]
        masked = [entry.get(Stat.MASK_FRAC_POS, 0.0) + entry.get(Stat.MASK_FRAC_NEG, 0.0) for entry in history]
        masked = [value for entry, value in zip(history, masked) if "loss" in entry]
        return [s for s, _ in rounds], [r for _, r in rounds], float(np.mean(masked)) if masked else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.03)
    options = parser.parse_args()
    slopes: dict[str, list[float]] = {loss: [] for loss in LOSSES}
    for seed in range(options.seeds):
        for loss in LOSSES:
            start = time.perf_counter()
            steps, rewards, masked = run(loss, seed, options.steps, options.lr)
            slope = float(np.polyfit(steps, rewards, 1)[0])
            slopes[loss].append(slope)
            print(
                f"{loss:9s} seed {seed}: reward {rewards[0]:.4f} -> {rewards[-1]:.4f} over {options.steps} steps "
                f"({len(rewards)} rounds), gain per step {slope:+.5f}, masked {masked:.3f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    mean = {loss: float(np.mean(values)) for loss, values in slopes.items()}
    for loss, value in mean.items():
        print(f"{loss:9s} mean gain per step over {options.seeds} seeds (lr {options.lr:g}): {value:+.5f}")
    if mean["flow_grpo"] > 0:
        print(f"flow_dppo / flow_grpo: {mean['flow_dppo'] / mean['flow_grpo']:.2f}")


if __name__ == "__main__":
    main()
