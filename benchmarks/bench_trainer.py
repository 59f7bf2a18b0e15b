"""Where a generation round's time goes, on the tiny SD3 pipeline (CPU): sampling, decoding + scoring, training.

    python benchmarks/bench_trainer.py [--steps 10] [--images 32]

Prints seconds per phase and the ratios between them, plus the cost of per-timestep gradient-norm logging, all
measured in one run (the machine is shared: compare the ratios, not the absolute figures, across runs).
"""

from __future__ import annotations

import argparse
import copy
import time
from functools import partial

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig

from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
from trl_guard.testing import build_tiny_sd3_pipeline


def blueness(prompts, images, **kwargs):
    return [float(np.asarray(image, dtype=np.float32)[..., 2].mean() / 255) for image in images]


def make_trainer(pipeline, options, **overrides):
    args = GuardConfig(
        output_dir="/tmp/bench-trl-guard",
        num_generations=4,
        per_device_train_batch_size=options.images,
        max_steps=1,
        height=32,
        width=32,
        num_inference_steps=options.steps,
        max_sequence_length=16,
        guidance_scale=4.5,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        **overrides,
    )
    prompts = Dataset.from_dict({"prompt": [f"prompt {i}" for i in range(options.images // 4)]})
    lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian")
    return GuardGRPODiffusionTrainer(pipeline, [blueness], args=args, train_dataset=prompts, peft_config=lora)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def measure(trainer, options) -> dict[str, float]:
    """Median seconds of each phase of one generation round for this trainer."""
    from trl_guard.rollout import sample_sde

    adapter = trainer.adapter
    rows = [{"prompt": p} for p in trainer.train_dataset["prompt"] for _ in range(4)]
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1
    figures = {}
    figures["round"], batches = timed(partial(trainer._generate_and_score, rows, rollout_index=0), options.repeats)
    figures["train"], _ = timed(partial(trainer._train_on_batch, batches[0]), options.repeats)
    embeds = adapter.encode_prompts([r["prompt"] for r in rows])
    sample = partial(
        sample_sde,
        adapter,
        embeds,
        trainer._negative_embeddings(),
        trainer._initial_latents(list(range(len(rows))), 0, 0),
        adapter.sigmas(options.steps),
        noise_level=0.7,
        noise_schedule="flow_grpo",
    )
    figures["sample"], rollout = timed(sample, options.repeats)
    figures["decode"], _ = timed(partial(adapter.decode, rollout.final_latents), options.repeats)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    torch.set_num_threads(2)
    base = build_tiny_sd3_pipeline()
    on = measure(make_trainer(copy.deepcopy(base), options, log_timestep_grad_norm=True), options)
    off = measure(make_trainer(copy.deepcopy(base), options, log_timestep_grad_norm=False), options)

    n, steps = options.images, options.steps
    print(f"{n} images x {steps} steps, CFG 4.5, tiny SD3, 2 threads (median of {options.repeats})")
    print(f"  SDE sampling:                   {on['sample']:.3f} s ({on['sample'] / n * 1e3:.1f} ms/image)")
    print(f"  VAE decode:                     {on['decode']:.3f} s")
    print(f"  whole round (sample + score):   {on['round']:.3f} s")
    print(
        f"  training, {steps} timesteps:         {on['train']:.3f} s (train / sample = {on['train'] / on['sample']:.2f})"
    )
    print(
        f"  without grad-norm logging:      {off['train']:.3f} s (logging costs {on['train'] / off['train'] - 1:+.1%})"
    )


if __name__ == "__main__":
    main()
