"""Which GRPO-Guard weight evens out per-timestep gradient norms under DanceGRPO's constant-noise schedule?

    python benchmarks/dance_weighting.py [--seeds 3] [--steps 20] [--noise-level 0.7]

Trains a tiny FLUX pipeline (guidance-distilled, no CFG, init_same_noise) with loss_type="grpo_guard" and
noise_schedule="dance_grpo" under both readings of the paper's weight, `beta_t/(-dt)` ("paper") and
`1/(beta_t*(-dt))` ("inverse"), plus unweighted RatioNorm and plain Flow-GRPO for reference. For each it prints the
mean gradient norm of every timestep's loss over the run, and the spread across timesteps as max/min and as the
coefficient of variation (std/mean): the smaller, the more even (the paper's Fig. 3 quantity).
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
from datasets import Dataset
from peft import LoraConfig

from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
from trl_guard.metrics import timestep_values
from trl_guard.testing import build_tiny_flux_pipeline

VARIANTS = {
    "grpo_guard, paper beta/(-dt)": dict(loss_type="grpo_guard", dance_weighting="paper"),
    "grpo_guard, inverse 1/(beta*(-dt))": dict(loss_type="grpo_guard", dance_weighting="inverse"),
    "ratio_norm (no weight)": dict(loss_type="ratio_norm"),
    "flow_grpo": dict(loss_type="flow_grpo"),
}


def blueness(prompts, images, **kwargs):
    return [float(np.asarray(image, dtype=np.float32)[..., 2].mean() / 255) for image in images]


def per_timestep_grad_norms(base, options, seed: int, **variant) -> np.ndarray:
    args = GuardConfig(
        output_dir="/tmp/bench-dance-weighting",
        num_generations=4,
        per_device_train_batch_size=16,
        steps_per_generation=2,
        max_steps=options.steps,
        learning_rate=1e-2,
        height=32,
        width=32,
        num_inference_steps=options.inference_steps,
        max_sequence_length=16,
        noise_schedule="dance_grpo",
        noise_level=options.noise_level,
        init_same_noise=True,
        guidance_scale=3.5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
        **variant,
    )
    prompts = Dataset.from_dict({"prompt": [f"a picture, take {i}" for i in range(8)]})
    lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian")
    trainer = GuardGRPODiffusionTrainer(
        copy.deepcopy(base), [blueness], args=args, train_dataset=prompts, peft_config=lora
    )
    trainer.train()
    norms = timestep_values(trainer.state.log_history)["grad_norm"]
    return np.array([np.mean(norms[t]) for t in sorted(norms)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--inference-steps", type=int, default=10)
    parser.add_argument("--noise-level", type=float, default=0.7)
    options = parser.parse_args()
    base = build_tiny_flux_pipeline()
    print(
        f"tiny FLUX, dance_grpo schedule, noise_level={options.noise_level}, {options.inference_steps} steps, "
        f"{options.steps} optimizer steps x {options.seeds} seeds"
    )
    for name, variant in VARIANTS.items():
        runs = np.stack([per_timestep_grad_norms(base, options, seed, **variant) for seed in range(options.seeds)])
        mean = runs.mean(axis=0)
        spread = runs.max(axis=1) / runs.min(axis=1)
        cv = runs.std(axis=1) / runs.mean(axis=1)
        print(f"\n{name}")
        print("  per-timestep grad norm (step 0 = noisiest): " + " ".join(f"{v:.3g}" for v in mean))
        print(f"  max/min across timesteps: {spread.mean():.2f} (seeds: {', '.join(f'{s:.2f}' for s in spread)})")
        print(f"  coefficient of variation: {cv.mean():.3f}")


if __name__ == "__main__":
    main()
