"""Peak memory of training against the number of sampling steps: flat, apart from the recorded trajectories.

    python benchmarks/bench_memory.py [--steps 10 20] [--size 64]

Each configuration runs in its own process (so no allocator cache carries over): a tiny SD3 pipeline trains two
optimizer steps (one round) with LoRA. The peak resident memory of `train()` is read from Linux's `VmHWM`, reset just
before training through `/proc/self/clear_refs`. The rollout stores, per image, `T + 1` latents and `T` means in
float32; the script prints that part next to the peak, so "flat apart from the latents" can be read off: the peak
minus the rollout should not grow with `T` (every trained step runs its own backward, and only one step's
activations are alive at a time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def one(steps: int, size: int) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
    from trl_guard.rewards import jpeg_compressibility
    from trl_guard.testing import build_tiny_sd3_pipeline

    torch.set_num_threads(1)
    images = 8
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = GuardGRPODiffusionTrainer(
            model=build_tiny_sd3_pipeline(seed=0),
            reward_funcs=[jpeg_compressibility],
            args=GuardConfig(
                output_dir=output_dir,
                num_generations=4,
                per_device_train_batch_size=images // 2,
                steps_per_generation=2,
                max_steps=2,
                height=size,
                width=size,
                max_sequence_length=16,
                num_inference_steps=steps,
                guidance_scale=1.0,
                report_to="none",
                save_strategy="no",
                disable_tqdm=True,
            ),
            train_dataset=Dataset.from_dict({"prompt": [f"a drawing number {i}" for i in range(8)]}),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["attn.to_q", "attn.to_v"]),
        )
        latent_numel = int(torch.Size(trainer.adapter.latent_shape()).numel())
        before = rss_kib()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        trainer.train()
        peak = peak_kib() - before
    rollout = images * (2 * steps + 1) * latent_numel * 4 / 1024  # one round is alive at a time
    return {"steps": steps, "peak_kib": peak, "rollout_kib": rollout, "peak_minus_rollout_kib": peak - rollout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one is not None:
        print(json.dumps(one(options.one, options.size)))
        return
    rows = []
    for steps in options.steps:
        command = [sys.executable, __file__, "--one", str(steps), "--size", str(options.size)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"tiny SD3, {options.size} px, 8 images per round, peak resident memory of train() above its start (MiB):")
    print("| sampling steps | peak | recorded rollout | peak minus rollout |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['steps']} | {row['peak_kib'] / 1024:.1f} | {row['rollout_kib'] / 1024:.2f} | "
            f"{row['peak_minus_rollout_kib'] / 1024:.1f} |"
        )
    first, last = rows[0]["peak_minus_rollout_kib"], rows[-1]["peak_minus_rollout_kib"]
    print(f"peak minus rollout, {rows[-1]['steps']} steps against {rows[0]['steps']}: {last / first:.2f}x")


if __name__ == "__main__":
    main()
