"""A loss type against Flow-GRPO on the tiny SD3 pipeline: how fast a reward rises, same seeds, same steps.

    nice -n 10 OMP_NUM_THREADS=1 python benchmarks/bench_loss_rate.py LOSS [LOSS ...] [--steps N] [--seeds 3]
        [--lr R] [--loss-lr R] [--reward_scale S] [--set FIELD=VALUE ...] [--no-baseline]

LOSS is one of `flow_dppo`, `dgpo`, `dpo`, `gardo`, `gardo_nft` (`gardo gardo_nft` share one Flow-GRPO baseline, as
they did in one script). Each run trains the randomly initialised tiny SD3 pipeline
(`trl_guard.testing.build_tiny_sd3_pipeline`) on 8 prompts x 4 samples per round with the `blueness` reward (the mean
blue channel, in [0, 1]), LoRA r=8 and constant-rate AdamW. Everything else (steps, rate, optimizer steps per round,
each loss's fields and its Flow-GRPO baseline's) is the loss type's row of `SETUPS`. The gain per step is the
least-squares slope of the round's mean reward against the optimizer step, per seed; the script prints each run, the
mean over seeds, the ratio to Flow-GRPO's, and the loss's own figure where it has one (Flow-DPPO's masked fraction,
GARDO's gated fraction). A smoke-level comparison (a random tiny model, a trivial reward), not a claim about SD3.5.

Measured with the defaults (3 seeds, shared 2-core CPU):
- flow_dppo (32 steps): at lr 0.1 the reward falls for both losses on one seed of three; 0.03 rises on all three.
- dgpo (20 steps, about 2.5 min): both at lr 0.3, Flow-GRPO +0.00103, DGPO +0.00249 (ratio 2.41); both at lr 0.1,
  Flow-GRPO +0.00062, DGPO +0.00038 (ratio 0.61).
- gardo, gardo_nft (32 steps, lr 0.03): at `--reward_scale` 100, gardo 1.46x Flow-GRPO's gain and gardo_nft 0.23x; at
  1000, 1.53x and 0.64x. Plain NFT (batch std) gains 0.36x Flow-GRPO's here at 0.03.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Setup:
    """One loss type's comparison: its fields, its Flow-GRPO baseline's, and the command line's defaults."""

    loss: dict  # GuardConfig fields of the loss's runs
    baseline: dict  # GuardConfig fields of the Flow-GRPO runs it is compared with
    steps: int
    lr: float
    reward_scale: float = 1.0  # the trained blueness' factor; the printed figures are unscaled
    gardo: bool = False  # GARDO's auxiliary rewards and feature model
    figure: str | None = None  # the loss's own printed figure: "masked" or "gated"
    common: dict = field(default_factory=dict)  # fields of both runs

    def shared(self) -> tuple:
        """What two loss types must agree on to share one Flow-GRPO baseline and one command line."""
        return (sorted(self.baseline.items()), self.steps, self.lr, self.reward_scale, self.gardo, self.figure)


#: GARDO's advantage is not divided by a standard deviation, so it carries the reward's scale, and NFT maps it to
#: `r_hat = A / 10 + 1/2`: the tiny model's blueness spreads by ~0.003 within a group, which leaves `r_hat` at 1/2 and
#: GARDO-NFT nothing to learn from. Times 1000 (a spread of ~3, inside the advantage clip 5) it is a reward on the scale
#: GARDO's advantages are made for. A no-op for Flow-GRPO, whose advantages are divided by the round's std.
GARDO_REWARD_SCALE = 1000.0
#: The KL weight of the official OCR configs, with `redness` and `greenness` as the uncertainty gate's auxiliary rewards.
GARDO = dict(beta=0.04, gardo_aux_rewards=["redness", "greenness"])
GARDO_BASELINE = dict(loss_type="flow_grpo", epsilon=1e-4, beta=0.04, scale_rewards="batch", timestep_fraction=0.99)

#: Each loss type's settings exactly as its own script (bench_flow_dppo.py, bench_dgpo.py, bench_dpo.py,
#: bench_gardo.py, folded into this one) set them, so the figures measured with those scripts (above, and in
#: docs/method.md) are reproduced by the defaults. Each follows the official configs of that loss where they differ:
#: - flow_dppo: two optimizer steps per round (the second is off-policy, where the clip or the mask can act), no KL;
#:   Flow-GRPO clips at its `epsilon` 1e-4, Flow-DPPO masks at its official threshold 1e-5 with the old means
#:   recomputed before each round's first update (its recipe's setting); both SDE, first 3 of 4 steps.
#: - dgpo: one optimizer step per round; Flow-GRPO samples with its SDE and trains its first 3 of 4 steps; DGPO samples
#:   with the ODE and trains 2 of the first 3 grid levels with its official loss settings; `beta` 0.02 for both.
#:   lr 0.3 is the rate recommended here.
#: - dpo: one optimizer step per round; both sample with the SDE and train 3 units per sample (Flow-GRPO its first 3
#:   steps, DPO 3 noise levels per pair, `dpo_beta` 100, the official value). The official default reference (the
#:   frozen base) never changes the rollouts, so the rollout reward could not show learning: this is the official
#:   "OnlineDPO" mode, the reference refreshed at every step, so each round samples the weights the last step left.
#: - gardo, gardo_nft: two optimizer steps per round; Flow-GRPO (batch-std advantages) puts its KL on every sample, to
#:   the frozen base; GARDO's KL is to its adaptive reference (official threshold and interval), its diversity-aware
#:   advantages from a tiny random DINOv3. `gardo` samples with the SDE and trains the first 3 of 4 steps, as
#:   Flow-GRPO here; `gardo_nft` samples with NFT's ODE and trains 3 noise levels.
SETUPS = {
    "flow_dppo": Setup(
        loss=dict(loss_type="flow_dppo", dppo_kl_threshold=1e-5, recompute_old_means=True),
        baseline=dict(loss_type="flow_grpo", epsilon=1e-4),
        common=dict(gradient_accumulation_steps=2, timestep_fraction=0.99, scale_rewards="batch"),
        steps=32,
        lr=0.03,
        figure="masked",
    ),
    "dgpo": Setup(
        loss=dict(loss_type="dgpo", beta=0.02, dgpo_max_train_step=2, dgpo_num_train_timesteps=2),
        baseline=dict(loss_type="flow_grpo", beta=0.02, timestep_fraction=0.99),
        common=dict(gradient_accumulation_steps=4),
        steps=20,
        lr=0.3,
    ),
    "dpo": Setup(
        loss=dict(loss_type="dpo", dpo_beta=100.0, dpo_ref_update_steps=1, timestep_fraction=0.99),
        baseline=dict(loss_type="flow_grpo", beta=0.02, timestep_fraction=0.99),
        common=dict(gradient_accumulation_steps=4),
        steps=12,
        lr=0.03,
    ),
    "gardo": Setup(
        loss=dict(loss_type="gardo", epsilon=1e-4, timestep_fraction=0.99, **GARDO),
        baseline=GARDO_BASELINE,
        common=dict(gradient_accumulation_steps=2),
        steps=24,
        lr=0.03,
        reward_scale=GARDO_REWARD_SCALE,
        gardo=True,
        figure="gated",
    ),
    "gardo_nft": Setup(
        loss=dict(loss_type="gardo_nft", timestep_fraction=0.75, **GARDO),
        baseline=GARDO_BASELINE,
        common=dict(gradient_accumulation_steps=2),
        steps=24,
        lr=0.03,
        reward_scale=GARDO_REWARD_SCALE,
        gardo=True,
        figure="gated",
    ),
}

#: The trained blueness' factor of the current command (`--reward_scale`); the reward functions read it.
_scale = {"blueness": 1.0}


def _channel(images, channel: int) -> list[float]:
    return [float(np.asarray(image, dtype=np.float32)[..., channel].mean() / 255) for image in images]


def blueness(prompts, images, **kwargs):
    return [_scale["blueness"] * value for value in _channel(images, 2)]


def redness(prompts, images, **kwargs):
    return _channel(images, 0)


def greenness(prompts, images, **kwargs):
    return _channel(images, 1)


def tiny_dinov3(folder: str) -> str:
    """A randomly initialised tiny DINOv3 ViT (2 register tokens), written with `save_pretrained`: the shape of GARDO's
    official extractor, not its weights (only the cosine geometry of the features is used)."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_register_tokens=2
    )
    DINOv3ViTModel(config).save_pretrained(folder)
    return folder


def run(
    setup: Setup, fields: dict, seed: int, steps: int, lr: float, features: str | None
) -> tuple[list[int], list[float], float]:
    """The optimizer steps at which a round's mean `blueness` (as trained, scaled) was logged, those values, and the
    mean of the setup's own figure (the masked fraction, both signs, or the gated fraction; 0 if it has none)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback

    from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
    from trl_guard.metrics import Stat, reward_key
    from trl_guard.testing import build_tiny_sd3_pipeline

    gardo = fields["loss_type"].startswith("gardo")
    prompts = Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(8)]})
    with tempfile.TemporaryDirectory() as output_dir:
        args = GuardConfig(
            output_dir=output_dir,
            num_generations=4,
            per_device_train_batch_size=8,
            steps_per_generation=4,
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
            **({"gardo_feature_model": features} if gardo else {}),
            **{**setup.common, **fields},
        )
        lora = LoraConfig(
            r=8,
            lora_alpha=16,
            init_lora_weights="gaussian",
            target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_out"],
        )
        trainer = GuardGRPODiffusionTrainer(
            model=build_tiny_sd3_pipeline(seed=0),
            reward_funcs=[blueness, redness, greenness] if setup.gardo else [blueness],
            args=args,
            train_dataset=prompts,
            peft_config=lora,
        )
        trainer.remove_callback(PrinterCallback)  # the figures below, not every step's logs
        trainer.train()
        history = trainer.state.log_history
        # With the auxiliary rewards the total is not blueness; alone, the total is blueness
        key = reward_key("blueness", "mean") if setup.gardo else Stat.REWARD
        rounds = [(entry["step"], entry[key]) for entry in history if key in entry]
        if setup.figure == "masked":
            masked = [entry.get(Stat.MASK_FRAC_POS, 0.0) + entry.get(Stat.MASK_FRAC_NEG, 0.0) for entry in history]
            values = [value for entry, value in zip(history, masked) if "loss" in entry]
        elif setup.figure == "gated":
            values = [entry["gardo_gated"] for entry in history if "gardo_gated" in entry]
        else:
            values = []
        return [s for s, _ in rounds], [r for _, r in rounds], float(np.mean(values)) if values else 0.0


def _field(text: str) -> tuple[str, object]:
    """`FIELD=VALUE` of `--set`, the value a Python literal where it parses as one (`1e-5`, `True`, `[1, 2]`)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--set takes FIELD=VALUE (e.g. dppo_kl_threshold=1e-4), not {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("losses", nargs="+", choices=list(SETUPS), metavar="LOSS", help=f"one of {list(SETUPS)}")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the loss type's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=None, help="the rate of every run (default: the loss type's)")
    parser.add_argument("--loss-lr", type=float, default=None, help="the loss's own rate (default: --lr)")
    parser.add_argument("--reward_scale", type=float, default=None, help="the trained blueness' factor (GARDO: 1000)")
    parser.add_argument(
        "--set",
        type=_field,
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a GuardConfig field of the loss",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the Flow-GRPO runs")
    options = parser.parse_args()
    losses = list(dict.fromkeys(options.losses))
    setup = SETUPS[losses[0]]
    for loss in losses[1:]:
        if SETUPS[loss].shared() != setup.shared():
            parser.error(
                f"{losses[0]} and {loss} are compared with differently set Flow-GRPO runs; run them one by one"
            )
    from trl_guard import GuardConfig

    known = {f.name for f in dataclasses.fields(GuardConfig)}
    for name, _ in options.set:
        if name not in known:
            parser.error(f"--set {name}=...: GuardConfig has no field {name!r}")
    steps = options.steps if options.steps is not None else setup.steps
    lr = options.lr if options.lr is not None else setup.lr
    _scale["blueness"] = scale = options.reward_scale if options.reward_scale is not None else setup.reward_scale
    runs = {loss: {**SETUPS[loss].loss, **dict(options.set)} for loss in losses}
    if not options.no_baseline:
        runs = {"flow_grpo": setup.baseline, **runs}
    rates = {loss: lr if loss == "flow_grpo" or options.loss_lr is None else options.loss_lr for loss in runs}
    print(f"learning rates: {rates}; {steps} steps; seeds 0-{options.seeds - 1}; reward scale {scale:g}", flush=True)
    slopes: dict[str, list[float]] = {loss: [] for loss in runs}
    with tempfile.TemporaryDirectory() as folder:
        features = tiny_dinov3(folder) if setup.gardo else None
        for seed in range(options.seeds):
            for loss, fields in runs.items():
                start = time.perf_counter()
                logged, rewards, figure = run(setup, fields, seed, steps, rates[loss], features)
                rewards = [r / scale for r in rewards]  # blueness in [0, 1]
                slope = float(np.polyfit(logged, rewards, 1)[0])
                slopes[loss].append(slope)
                extra = f", {setup.figure} {figure:.3f}" if setup.figure else ""
                print(
                    f"{loss:9s} seed {seed} lr {rates[loss]:g}: blueness {rewards[0]:.4f} -> {rewards[-1]:.4f} over "
                    f"{steps} steps ({len(rewards)} rounds), gain per step {slope:+.5f}{extra} "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    mean = {loss: float(np.mean(values)) for loss, values in slopes.items()}
    for loss, value in mean.items():
        print(f"{loss:9s} mean gain per step over {options.seeds} seeds (lr {rates[loss]:g}): {value:+.5f}")
    if mean.get("flow_grpo", 0) > 0:
        for loss in losses:
            print(f"{loss} / flow_grpo: {mean[loss] / mean['flow_grpo']:.2f}")


if __name__ == "__main__":
    main()
