"""A prepared accelerator check: SD3.5 Medium and FLUX.1-dev at full width and depth, random weights, no download.

    python benchmarks/gpu_check.py --output gpu_check.json                      # one 80 GB GPU, bf16, 512 px
    python benchmarks/gpu_check.py --device cpu --layers 1 --text-layers 1 --resolution 64 --group 4 --steps 1

For each family it builds the pipeline from the published configs recorded in `trl_guard.testing.real_width`, trains
`--steps` GRPO-Guard steps (LoRA) on JPEG compressibility (a reward computed from the decoded image alone) once with
`recompute_old_means` off and once with it on, and writes one JSON with, per family and setting:

- seconds per step, split as `benchmarks/profile_toy.py` splits them (its `Timer`, wrapping the trainer's own methods):
  sampling (the SDE rollouts), scoring (the reward, in the worker thread that overlaps sampling), training (the
  per-timestep forwards and backwards), recompute (the extra no-grad forwards of `recompute_old_means`), and the wall
  time of the whole step;
- peak memory: `torch.cuda.max_memory_allocated()` on CUDA (reset before each run), else the process's peak resident
  set size (`resource.getrusage`, which cannot be reset: it is the peak of the process so far);
- the first-pass log-ratios: GRPO-Guard's normalised log-ratio (RatioNorm's, what it clips to 1 +- 2e-6) of every
  sample and trained step in the training passes before each round's first optimizer step, where the policy that
  trains is the policy that sampled and the ratio should be exactly 1. Reported as the largest |log r| and the share
  of samples outside 1 +- 2e-6, per round and over all rounds. Sampling runs the whole group in one forward and
  training in micro-batches of `--train-batch`: in half precision the two shapes can round differently, the drift of
  flow_grpo #204 and DanceGRPO #57 (measured on the toy model by `benchmarks/precision_drift.py`), which
  `recompute_old_means` removes.

What is reduced from the checkpoints (nothing else is): every text encoder keeps its real width, heads, MLP width and
depth (CLIP-L 12 layers, OpenCLIP-bigG 32, T5-XXL 24: `--text-layers` cuts them) but uses the offline tiny tokenizers'
vocabularies instead of 32k-49k entries; each VAE keeps its latent channels, compression and latent normalisation with
narrow blocks; SD3's sine-cosine position table is cut to the side the resolution needs (the real 384 patches cover
6144 px). Not run on a GPU here (no GPU on the machine that wrote it): the CPU path is what its test runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from precision_drift import GUARD_CLIP  # noqa: E402
from profile_toy import Timer  # noqa: E402

FAMILIES = ("sd3.5-medium", "flux.1-dev")
PARTS = ("sampling", "scoring", "training", "recompute")
PROMPTS = ["a red cat on a blue sofa", "a lighthouse at dawn", "two green apples", "a city street in the rain"]


@contextlib.contextmanager
def _building(device: str, dtype: torch.dtype):
    """Draw modules' weights directly on `device` in `dtype`: FLUX.1-dev's 12B float32 parameters drawn on the CPU
    would take 48 GB of host memory and minutes."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_pipeline(family: str, layers: int | None, text_layers: int | None, resolution: int, device, dtype):
    """`family`'s pipeline at real width, with `layers` transformer blocks (FLUX: that many double- and single-stream
    blocks; `None`: the published depth) and `text_layers` layers per text encoder (`None`: the published depth)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from trl_guard.testing import real_width as rw

    def depth(published: int) -> int:
        return published if layers is None else min(layers, published)

    def text_depth(spec: rw.Published, key: str, least: int = 1) -> int:
        return spec[key] if text_layers is None else max(least, min(text_layers, spec[key]))

    with _building(device, dtype):
        if family == "sd3.5-medium":
            # 16 = patch 2 x VAE 8: the side of the position table, in patches, that `resolution` px images crop from
            transformer = rw.build_real_width_sd3_transformer(
                0, "medium", depth(rw.SD35_MEDIUM_TRANSFORMER["num_layers"]), max(16, resolution // 16)
            )
            torch.manual_seed(1)
            # SD3 conditions on the CLIP towers' penultimate hidden state: at least 2 layers
            clip_l, tokenizer = rw.clip_text_encoder(rw.CLIP_L, text_depth(rw.CLIP_L, "num_hidden_layers", 2), True)
            clip_g, tokenizer_2 = rw.clip_text_encoder(rw.CLIP_G, text_depth(rw.CLIP_G, "num_hidden_layers", 2), True)
            t5, tokenizer_3 = rw.t5_encoder(rw.T5_XXL, text_depth(rw.T5_XXL, "num_layers"))
            vae = rw.narrow_autoencoder_kl(rw.SD35_VAE)
            components = dict(
                text_encoder=clip_l,
                tokenizer=tokenizer,
                text_encoder_2=clip_g,
                tokenizer_2=tokenizer_2,
                text_encoder_3=t5,
                tokenizer_3=tokenizer_3,
            )
        elif family == "flux.1-dev":
            spec = rw.FLUX_DEV_TRANSFORMER
            transformer = rw.build_real_width_flux_transformer(
                0, depth(spec["num_layers"]), depth(spec["num_single_layers"])
            )
            torch.manual_seed(1)
            clip_l, tokenizer = rw.clip_text_encoder(rw.CLIP_L, text_depth(rw.CLIP_L, "num_hidden_layers"), False)
            t5, tokenizer_2 = rw.t5_encoder(rw.T5_XXL, text_depth(rw.T5_XXL, "num_layers"))
            vae = rw.narrow_autoencoder_kl(rw.FLUX_VAE)
            components = dict(text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2)
        else:
            raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}.")
    for module in (transformer, vae, *(m for m in components.values() if isinstance(m, torch.nn.Module))):
        module.eval()
    # The scheduler is built outside the device context: its sigmas stay on the CPU, as from_pretrained leaves them.
    if family == "sd3.5-medium":
        scheduler = FlowMatchEulerDiscreteScheduler(**rw.SD35_SCHEDULER.values)
        return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, **components)
    scheduler = FlowMatchEulerDiscreteScheduler(**rw.FLUX_SCHEDULER.values)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, **components)


class FirstPass:
    """Collects GRPO-Guard's per-sample log-ratios of the training passes between a round's `before_first_update`
    and its first optimizer step, by wrapping the algorithm's loss and the schedule's `policy_loss` of one trainer."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        from trl_guard.losses import policy_log_ratio

        self.rounds: list[list[torch.Tensor]] = []
        self.open = False
        algorithm, schedule = trainer.algorithm, trainer.algorithm.schedule
        before_first_update, policy_loss = algorithm.before_first_update, schedule.policy_loss
        owner = self

        def opening(batches):
            before_first_update(batches)
            owner.rounds.append([])
            owner.open = True

        def recording(mean, old_mean, prev_sample, std, *args, **kwargs):
            if owner.open:
                with torch.no_grad():
                    # as compute_policy_loss computes it: in the policy's dtype, with `std` cast to it
                    ratio = policy_log_ratio(
                        mean.detach(), old_mean, prev_sample, std.to(mean.dtype), loss_type="grpo_guard"
                    )
                owner.rounds[-1].append(ratio.float().cpu())
            return policy_loss(mean, old_mean, prev_sample, std, *args, **kwargs)

        class Closing(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                owner.open = False

        class Recording:
            """The algorithm's schedule (a frozen dataclass) with `policy_loss` recorded, everything else its own."""

            def __getattr__(self, name):
                return getattr(schedule, name)

            policy_loss = staticmethod(recording)

        algorithm.before_first_update = opening
        algorithm.schedule = Recording()
        trainer.add_callback(Closing())

    def summary(self) -> dict:
        def figures(ratios: torch.Tensor) -> dict:
            return {
                "max_abs_log_ratio": float(ratios.abs().max()),
                "share_outside_clip": float((ratios.abs() > GUARD_CLIP).float().mean()),
                "samples": ratios.numel(),
            }

        rounds = [torch.cat(r) for r in self.rounds if r]
        if not rounds:
            raise RuntimeError("No first training pass was recorded: did the trainer take an optimizer step?")
        return {
            "clip": GUARD_CLIP,
            "all_rounds": figures(torch.cat(rounds)),
            "per_round": [figures(r) for r in rounds],
        }


def run(family: str, recompute: bool, options: argparse.Namespace, output_dir: str) -> dict:
    """Build `family`, train `options.steps` GRPO-Guard steps with `recompute_old_means=recompute`, measure."""
    from datasets import Dataset
    from peft import LoraConfig

    from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
    from trl_guard.testing.real_width import parameter_counts

    dtype = torch.bfloat16 if options.dtype == "bf16" else torch.float32
    cuda = options.device.startswith("cuda")
    micro_steps = options.group // options.train_batch  # one optimizer step per round: the whole round is first-pass
    args = GuardConfig(
        output_dir=output_dir,
        num_generations=options.group,
        per_device_train_batch_size=options.train_batch,
        per_device_sample_batch_size=options.group,
        steps_per_generation=micro_steps,
        gradient_accumulation_steps=micro_steps,
        max_steps=options.steps,
        height=options.resolution,
        width=options.resolution,
        num_inference_steps=options.inference_steps,
        max_sequence_length=options.max_sequence_length,
        loss_type="grpo_guard",
        epsilon=GUARD_CLIP,
        recompute_old_means=recompute,
        bf16=options.dtype == "bf16",
        use_cpu=not cuda,
        activation_checkpointing=options.gradient_checkpointing,  # transformers 5 deprecates the old name
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    start = time.perf_counter()
    pipeline = build_pipeline(family, options.layers, options.text_layers, options.resolution, options.device, dtype)
    build_seconds = time.perf_counter() - start
    counts = parameter_counts(pipeline)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = GuardGRPODiffusionTrainer(
        model=pipeline,
        reward_funcs=["jpeg_compressibility"],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian"),
    )
    first_pass = FirstPass(trainer)
    timer = Timer()
    timer.wrap(trainer.algorithm, "sample", "sampling")
    timer.wrap(trainer.algorithm, "before_first_update", "recompute")
    timer.wrap(trainer, "_train_on_batch", "training")
    # calling an instance looks `__call__` up on its class: wrapped there for this run, restored after it
    reward_class = type(trainer.rewards)
    reward_call = reward_class.__dict__["__call__"]
    timer.wrap(reward_class, "__call__", "scoring")
    try:
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    finally:
        reward_class.__call__ = reward_call
    steps = trainer.state.global_step
    if cuda:
        memory = {"kind": "torch.cuda.max_memory_allocated", "bytes": torch.cuda.max_memory_allocated()}
    else:
        memory = {
            "kind": "peak RSS of the process so far",
            "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
    result = {
        "family": family,
        "recompute_old_means": recompute,
        "optimizer_steps": steps,
        "build_seconds": build_seconds,
        "seconds_per_step": {
            **{part: timer.seconds[part] / steps for part in PARTS},
            "total": total / steps,
        },
        "peak_memory": memory,
        "first_pass": first_pass.summary(),
        "parameters": counts,
    }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the published depth)")
    parser.add_argument("--text-layers", type=int, default=None, help="layers per text encoder (default: published)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--group", type=int, default=8, help="images per prompt, sampled in one forward")
    parser.add_argument("--train-batch", type=int, default=2, help="training micro-batch; must divide --group")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (one per round) per family and setting")
    parser.add_argument("--inference-steps", type=int, default=10)
    parser.add_argument("--max-sequence-length", type=int, default=128)
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the denoiser's activations in the backward (if FLUX's training forward runs out of memory)",
    )
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--output", default="gpu_check.json")
    options = parser.parse_args(argv)
    if options.group % options.train_batch != 0:
        raise ValueError(
            f"--train-batch {options.train_batch} must divide --group {options.group}: a round's group is trained "
            "in whole micro-batches. Pick a divisor of --group."
        )
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {options.device}: no CUDA device is available; pass --device cpu.")
    if options.resolution % 16 != 0:
        raise ValueError(f"--resolution {options.resolution} must be a multiple of 16 (VAE 8 x patch 2).")
    runs = []
    for family in options.families:
        for recompute in (False, True):
            output_dir = os.path.join(os.path.dirname(os.path.abspath(options.output)), "gpu_check_runs", family)
            row = run(family, recompute, options, output_dir)
            # The run's trainer, pipeline and wrappers hold each other in cycles: free them before the next build, or
            # two FLUX.1-dev pipelines (34 GB each) would be alive at once.
            gc.collect()
            if options.device.startswith("cuda"):
                torch.cuda.empty_cache()
            runs.append(row)
            drift = row["first_pass"]["all_rounds"]
            print(
                f"{family:>13} recompute={str(recompute):5} {row['seconds_per_step']['total']:7.1f} s/step  "
                f"peak {row['peak_memory']['bytes'] / 2**30:6.1f} GiB  max|log r| {drift['max_abs_log_ratio']:.2e}  "
                f"outside 1+-2e-6: {drift['share_outside_clip']:.0%}",
                flush=True,
            )
    device_name = torch.cuda.get_device_name(options.device) if options.device.startswith("cuda") else "cpu"
    result = {
        "options": vars(options),
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "runs": runs,
    }
    with open(options.output, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
