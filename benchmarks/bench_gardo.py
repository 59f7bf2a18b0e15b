"""GARDO (on Flow-GRPO and on DiffusionNFT) against Flow-GRPO on the tiny SD3 pipeline: how fast a reward rises, same
seeds, same steps.

    nice -n 10 OMP_NUM_THREADS=1 python benchmarks/bench_gardo.py [--steps 24] [--seeds 3] [--lr 0.03]

Each run trains the randomly initialised tiny SD3 pipeline (`trl_guard.testing.build_tiny_sd3_pipeline`) on 8
prompts x 4 samples per round and two optimizer steps per round (as the official SD3.5 configs), LoRA r=8, AdamW at
the same rate for every loss, a constant learning rate, and the KL weight of the official OCR configs, `beta` 0.04.
The trained reward is `blueness` (the mean blue channel, in [0, 1]), times `--reward_scale` (1000: see
`REWARD_SCALE`); the printed figures are the unscaled blueness. Flow-GRPO (`epsilon` 1e-4, batch-std advantages)
puts its KL on every sample, to the frozen base model. GARDO trains on `blueness` alone, with `redness` and `greenness`
as the auxiliary rewards of its uncertainty gate, its KL to the adaptive reference (official threshold and interval),
and its diversity-aware advantages from a tiny random DINOv3 (the shape of the official extractor, not its weights;
only the cosine geometry of the features is used). `gardo` samples with Flow-GRPO's SDE and trains the first 3 of 4
steps, as Flow-GRPO here; `gardo_nft` samples with NFT's ODE and trains 3 noise levels. The gain per step is the
least-squares slope of the round's mean `blueness` against the optimizer step, per seed; the script prints each run,
the mean over seeds, and the ratio to Flow-GRPO's. A smoke-level comparison (a random tiny model, a trivial reward),
not a claim about SD3.5.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def _channel(images, channel: int) -> list[float]:
    return [float(np.asarray(image, dtype=np.float32)[..., channel].mean() / 255) for image in images]


#: The trained reward's scale (`--reward_scale`). GARDO's advantage is not divided by a standard deviation, so it
#: carries the reward's scale, and NFT maps it to `r_hat = A / 10 + 1/2`: the tiny model's blueness spreads by ~0.003
#: within a group, which leaves `r_hat` at 1/2 and GARDO-NFT nothing to learn from. Times 1000 (a spread of ~3, inside
#: the advantage clip 5) it is a reward on the scale GARDO's advantages are made for. A no-op for Flow-GRPO, whose
#: advantages are divided by the round's std. Measured (32 steps, 3 seeds, lr 0.03): at 100, gardo 1.46x Flow-GRPO's
#: gain and gardo_nft 0.23x; at 1000, 1.53x and 0.64x. Plain NFT (batch std) gains 0.36x Flow-GRPO's here at 0.03.
REWARD_SCALE = 1000.0


def blueness(prompts, images, **kwargs):
    return [REWARD_SCALE * value for value in _channel(images, 2)]


def redness(prompts, images, **kwargs):
    return _channel(images, 0)


def greenness(prompts, images, **kwargs):
    return _channel(images, 1)


GARDO = dict(beta=0.04, gardo_aux_rewards=["redness", "greenness"])
LOSSES = {
    "flow_grpo": dict(loss_type="flow_grpo", epsilon=1e-4, beta=0.04, scale_rewards="batch"),
    "gardo": dict(loss_type="gardo", epsilon=1e-4, **GARDO),
    "gardo_nft": dict(loss_type="gardo_nft", **GARDO),
}


def tiny_dinov3(folder: str) -> str:
    """A randomly initialised tiny DINOv3 ViT (2 register tokens), written with `save_pretrained`."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_register_tokens=2
    )
    DINOv3ViTModel(config).save_pretrained(folder)
    return folder


def run(loss: str, seed: int, steps: int, lr: float, features: str) -> tuple[list[int], list[float], float]:
    """The optimizer steps at which a round's mean `blueness` was logged, those values, and the mean gated fraction
    of the micro-batches (0 for Flow-GRPO)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback

    from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
    from trl_guard.metrics import reward_key
    from trl_guard.testing import build_tiny_sd3_pipeline

    prompts = Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(8)]})
    gardo = loss.startswith("gardo")
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
            timestep_fraction=0.99 if loss != "gardo_nft" else 0.75,
            guidance_scale=1.0,
            learning_rate=lr,
            lr_scheduler_type="constant",
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=1,
            seed=seed,
            **({"gardo_feature_model": features} if gardo else {}),
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
            reward_funcs=[blueness, redness, greenness] if gardo else [blueness],
            args=args,
            train_dataset=prompts,
            peft_config=lora,
        )
        trainer.remove_callback(PrinterCallback)  # the figures below, not every step's logs
        trainer.train()
        history = trainer.state.log_history
        key = reward_key("blueness", "mean")
        rounds = [(entry["step"], entry[key]) for entry in history if key in entry]
        gated = [entry["gardo_gated"] for entry in history if "gardo_gated" in entry]
        return [s for s, _ in rounds], [r for _, r in rounds], float(np.mean(gated)) if gated else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--reward_scale", type=float, default=REWARD_SCALE)
    options = parser.parse_args()
    globals()["REWARD_SCALE"] = options.reward_scale
    slopes: dict[str, list[float]] = {loss: [] for loss in options.losses}
    with tempfile.TemporaryDirectory() as folder:
        features = tiny_dinov3(folder)
        for seed in range(options.seeds):
            for loss in options.losses:
                start = time.perf_counter()
                steps, rewards, gated = run(loss, seed, options.steps, options.lr, features)
                rewards = [r / options.reward_scale for r in rewards]  # blueness in [0, 1]
                slope = float(np.polyfit(steps, rewards, 1)[0])
                slopes[loss].append(slope)
                print(
                    f"{loss:9s} seed {seed}: blueness {rewards[0]:.4f} -> {rewards[-1]:.4f} over {options.steps} steps "
                    f"({len(rewards)} rounds), gain per step {slope:+.5f}, gated {gated:.3f} "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    mean = {loss: float(np.mean(values)) for loss, values in slopes.items()}
    for loss, value in mean.items():
        print(f"{loss:9s} mean gain per step over {options.seeds} seeds (lr {options.lr:g}): {value:+.5f}")
    if mean.get("flow_grpo", 0) > 0:
        for loss in mean:
            if loss != "flow_grpo":
                print(f"{loss} / flow_grpo: {mean[loss] / mean['flow_grpo']:.2f}")


if __name__ == "__main__":
    main()
