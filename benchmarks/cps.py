"""CPS (Coefficients-Preserving Sampling) on the toy world: which log-probability, and does GRPO-Guard's weight hold?

    python benchmarks/cps.py [--seeds 2] [--steps 12]

Trains the pretrained toy model (trl_guard/toy/pretrained) on the colour proxy with `noise_schedule="cps"`
(noise_level 0.7, 10 steps, the last one noiseless and never trained) under:

- Flow-GRPO with CPS's official log-probability `-MEAN((x_next - mean)**2)`, clip 1e-5 (Flow-GRPO's CPS configs);
- Flow-GRPO with the normalised Gaussian log-density, clip 1e-4 (its SDE configs' range);
- RatioNorm without a per-step weight, and GRPO-Guard with the CPS weight `1/|d mean/d v|`, clip 2e-6.

For each it prints, per timestep, the fraction of off-policy samples clipped above `1+epsilon` and below `1-epsilon`
(only the second optimizer step of each round is off-policy) and the mean gradient norm of the step's loss, with the
spread of gradient norms across timesteps (max/min), the paper's Fig. 3 quantity.
"""

from __future__ import annotations

import argparse
import copy
import random

import numpy as np
from datasets import Dataset
from peft import LoraConfig
from transformers.trainer_callback import PrinterCallback

from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
from trl_guard.metrics import timestep_values
from trl_guard.toy import colour_proxy
from trl_guard.toy.model import load_toy_pipeline
from trl_guard.toy.train import MAX_SEQUENCE_LENGTH, all_captions

VARIANTS = {
    "flow_grpo, official log-prob, clip 1e-5": dict(loss_type="flow_grpo", cps_log_prob="official", epsilon=1e-5),
    "flow_grpo, Gaussian log-prob, clip 1e-4": dict(loss_type="flow_grpo", cps_log_prob="gaussian", epsilon=1e-4),
    "ratio_norm (no weight), clip 2e-6": dict(loss_type="ratio_norm", epsilon=2e-6),
    "grpo_guard (weight 1/|d mean/d v|), clip 2e-6": dict(loss_type="grpo_guard", epsilon=2e-6),
}
STATS = ("clip_frac_high", "clip_frac_low", "grad_norm")


def run(base, prompts: list[str], options, seed: int, **variant) -> dict[str, dict[int, float]]:
    args = GuardConfig(
        output_dir="/tmp/bench-cps",
        noise_schedule="cps",
        noise_level=0.7,
        num_generations=8,
        per_device_train_batch_size=32,
        steps_per_generation=2,
        max_steps=options.steps,
        learning_rate=3e-3,
        height=32,
        width=32,
        num_inference_steps=10,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        guidance_scale=1.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
        **variant,
    )
    trainer = GuardGRPODiffusionTrainer(
        copy.deepcopy(base),
        [colour_proxy],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        peft_config=LoraConfig(r=16, lora_alpha=32, init_lora_weights="gaussian"),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    # every update's gradient norm; clip fractions of the off-policy updates only (the second of each round)
    everything = timestep_values(trainer.state.log_history)
    off_policy = timestep_values(trainer.state.log_history, keep=lambda entry: entry.get("step", 0) % 2 == 0)
    values = {stat: (everything if stat == "grad_norm" else off_policy)[stat] for stat in STATS}
    return {stat: {t: float(np.mean(v)) for t, v in sorted(by_step.items())} for stat, by_step in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--variants", nargs="+", type=int, help="indices into the list above (default: all)")
    parser.add_argument("--model", default=None, help="a toy pipeline folder (default: the committed one)")
    options = parser.parse_args()
    base = load_toy_pipeline(options.model) if options.model else load_toy_pipeline()
    base.set_progress_bar_config(disable=True)
    prompts = random.Random(0).sample(all_captions(), 16)
    print(f"toy world, CPS noise_level 0.7, 10 steps, {options.steps} optimizer steps x {options.seeds} seeds")
    chosen = [list(VARIANTS)[i] for i in options.variants] if options.variants else list(VARIANTS)
    for name in chosen:
        variant = VARIANTS[name]
        runs = [run(base, prompts, options, seed, **variant) for seed in range(options.seeds)]
        steps = sorted(runs[0]["grad_norm"])
        print(f"\n{name}")
        print(f"  {'step':<15}" + "".join(f"{t:>9}" for t in steps))
        for stat in STATS:
            row = [np.mean([r[stat].get(t, np.nan) for r in runs]) for t in steps]
            print(f"  {stat:<15}" + "".join(f"{v:>9.2e}" if stat == "grad_norm" else f"{v:>9.3f}" for v in row))
        norms = np.array([[r["grad_norm"][t] for t in steps] for r in runs])
        spread = norms.max(axis=1) / norms.min(axis=1)
        seeds = ", ".join(f"{s:.2f}" for s in spread)
        print(f"  grad-norm max/min across timesteps: {spread.mean():.2f} (seeds: {seeds})")


if __name__ == "__main__":
    main()
