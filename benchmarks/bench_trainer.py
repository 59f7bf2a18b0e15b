"""Where a generation round's time goes, on the tiny SD3 pipeline (CPU), and what the trainer adds to the model work.

    python benchmarks/bench_trainer.py [--steps 10] [--images 32]      # phases of one round
    python benchmarks/bench_trainer.py overhead [--optimizer-steps 6] [--profile]   # trainer against a bare loop

The first prints seconds per phase and the ratios between them, plus the cost of per-timestep gradient-norm logging.
`overhead` times `trainer.train()` against a hand-written loop doing the same model work (6 optimizer steps, 8
images, 8 sampling steps, CFG, LoRA, one thread), alternating the two. It prints the ratio of the medians for the whole call and
separately for its fixed setup (before the first step) and for one optimizer step in the steady state (the median
gap between step ends), since a real run amortises the setup over hundreds of steps;
`--profile` adds a cProfile of one trainer run, grouped by where the time goes. Everything is measured in one run
(the machine is shared: compare the ratios, not the absolute figures, across runs).
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
from transformers import PrinterCallback, TrainerCallback

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
    from trl_guard.schedule import SDESchedule

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
        SDESchedule(0.7),
    )
    figures["sample"], rollout = timed(sample, options.repeats)
    figures["decode"], _ = timed(partial(adapter.decode, rollout.final_latents), options.repeats)
    return figures


OVERHEAD = dict(images=8, steps=8, optimizer_steps=6, group=4)


class StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step, to separate `train()`'s fixed setup from its steps."""

    def __init__(self, stamps: list[float]):
        self.stamps = stamps

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def overhead_trainer(pipeline, output_dir: str, **overrides):
    args = GuardConfig(
        output_dir=output_dir,
        num_generations=OVERHEAD["group"],
        per_device_train_batch_size=OVERHEAD["images"],
        max_steps=overrides.pop("max_steps", OVERHEAD["optimizer_steps"]),
        height=32,
        width=32,
        num_inference_steps=OVERHEAD["steps"],
        max_sequence_length=16,
        guidance_scale=4.5,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        overlap_reward_scoring=False,
        **overrides,
    )
    prompts = Dataset.from_dict({"prompt": [f"prompt {i}" for i in range(OVERHEAD["images"])]})
    lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian")
    trainer = GuardGRPODiffusionTrainer(pipeline, [blueness], args=args, train_dataset=prompts, peft_config=lora)
    trainer.remove_callback(PrinterCallback)  # printing every log dict to stdout is not part of the work measured
    return trainer


def bare_loop(pipeline, optimizer_steps: int, stamps: list[float]) -> None:
    """The model work of `overhead_trainer(...).train()` written out: per round, encode, sample with the SDE,
    decode, score, advantages; per trained step, one forward and backward; one AdamW step per round."""
    from trl_guard.adapters import SamplingSettings, get_adapter
    from trl_guard.losses import compute_advantages, compute_policy_loss
    from trl_guard.rollout import sample_sde
    from trl_guard.schedule import SDESchedule
    from trl_guard.sde import sde_step_with_logprob

    adapter = get_adapter(pipeline)
    adapter.configure(SamplingSettings(32, 32, 4.5, max_sequence_length=16))
    adapter.add_lora(LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian"))
    params = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    n, group, steps = OVERHEAD["images"], OVERHEAD["group"], OVERHEAD["steps"]
    sigmas = adapter.sigmas(steps)
    negative = adapter.encode_prompts([""])
    for round_index in range(optimizer_steps):
        prompts = [f"prompt {(round_index * 2 + i // group) % n}" for i in range(n)]
        embeds = adapter.encode_prompts(sorted(set(prompts))).index(
            torch.tensor([sorted(set(prompts)).index(p) for p in prompts])
        )
        generators = [torch.Generator().manual_seed(round_index * n + i) for i in range(n)]
        latents = torch.stack([torch.randn(adapter.latent_shape(), generator=g) for g in generators])
        adapter.denoiser.eval()
        rollout = sample_sde(
            adapter,
            embeds,
            negative,
            latents,
            sigmas,
            SDESchedule(0.7),
            generators=generators,
        )
        rewards = torch.tensor(blueness(prompts, adapter.decode(rollout.final_latents)))
        advantages = compute_advantages(rewards, group, scale_rewards="group", adv_clip_max=5.0)
        adapter.denoiser.train()
        for step in range(steps):
            x, x_next, old_mean, sigma, sigma_next = rollout.step(step)
            sigma, sigma_next = sigma.expand(n), sigma_next.expand(n)
            velocity = adapter.predict_velocity(x, sigma, embeds, negative)
            _, _, mean, std = sde_step_with_logprob(
                velocity, x, sigma, sigma_next, noise_level=0.7, noise_schedule="flow_grpo", prev_sample=x_next
            )
            loss, _ = compute_policy_loss(
                mean, old_mean, x_next, std, advantages, sigma, sigma_next, loss_type="grpo_guard", epsilon=2e-6,
                noise_level=0.7, noise_schedule="flow_grpo",
            )  # fmt: skip
            (loss / steps).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        stamps.append(time.perf_counter())


def overhead(options) -> None:
    import cProfile
    import pstats
    import tempfile

    if options.optimizer_steps < 2:
        raise SystemExit("--optimizer-steps must be at least 2: the steady state is the gap between step ends.")
    torch.set_num_threads(1)
    base = build_tiny_sd3_pipeline()
    n_steps = options.optimizer_steps
    variants = {
        "trainer.train()": {},
        "trainer.train(), no per-timestep grad norms": {"log_timestep_grad_norm": False},
        "trainer.train(), logging_steps=10": {"logging_steps": 10},
    }
    runs: dict[str, list] = {"bare loop": [], **{name: [] for name in variants}}

    def record(name, start, stamps, end):
        # setup: start to the end of the first step, minus one step; per step: median gap between step ends
        per_step = float(np.median(np.diff(stamps)))
        runs[name].append((end - start, stamps[0] - start - per_step, per_step))

    def run_trainer(overrides, output_dir):
        # built outside the timing, as the bare loop's model is
        trainer = overhead_trainer(
            copy.deepcopy(base), output_dir, overwrite_output_dir=True, max_steps=n_steps, **overrides
        )
        stamps: list[float] = []
        trainer.add_callback(StepClock(stamps))
        start = time.perf_counter()
        trainer.train()
        return start, stamps, time.perf_counter()

    def run_bare(output_dir):
        pipeline, stamps = copy.deepcopy(base), []
        start = time.perf_counter()
        bare_loop(pipeline, n_steps, stamps)
        return start, stamps, time.perf_counter()

    names = ["bare loop", *variants]
    with tempfile.TemporaryDirectory() as output_dir:
        for repeat in range(options.repeats):
            # the order rotates, so that no variant always runs first or right after another one
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                timing = run_bare(output_dir) if name == "bare loop" else run_trainer(variants[name], output_dir)
                record(name, *timing)
        print(
            f"{n_steps} optimizer steps, {OVERHEAD['images']} images, {OVERHEAD['steps']} sampling steps, CFG, LoRA, "
            f"1 thread, {options.repeats} rounds of every variant in rotating order. Medians; the last column is the "
            "median of the per-round ratios to the bare loop (the variants of one round ran within about half a minute of each other), "
            "with their range:"
        )
        print(f"  {'':46s} {'total s':>8s} {'setup s':>8s} {'s/step':>8s}   per-step ratio [range]")
        bare = np.array(runs["bare loop"])
        for name, rows in runs.items():
            rows = np.array(rows)
            total, setup, per_step = np.median(rows, axis=0)
            ratios = rows[:, 2] / bare[:, 2]
            print(
                f"  {name:46s} {total:8.2f} {setup:8.2f} {per_step:8.3f}   {np.median(ratios):.3f}x "
                f"[{ratios.min():.3f}, {ratios.max():.3f}]"
            )
        if options.profile:
            trainer = overhead_trainer(copy.deepcopy(base), output_dir, overwrite_output_dir=True, max_steps=n_steps)
            profiler = cProfile.Profile()
            profiler.runcall(trainer.train)
            stats = pstats.Stats(profiler)
            total = stats.total_tt
            print(f"  profile of one trainer run: {total:.2f} s of CPU in Python frames")
            for name, (calls, _, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:25]:
                print(
                    f"    {ct:7.3f} s cumulative  {tt:7.3f} s own  {calls:6d} calls  {name[2]} ({name[0].split('/')[-1]})"
                )


def main() -> None:
    import sys

    if sys.argv[1:2] == ["overhead"]:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("overhead")
        parser.add_argument("--repeats", type=int, default=3)
        parser.add_argument("--profile", action="store_true")
        parser.add_argument("--optimizer-steps", type=int, default=OVERHEAD["optimizer_steps"])
        overhead(parser.parse_args())
        return
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
