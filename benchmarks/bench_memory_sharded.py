"""Peak resident memory per process of training at real width, 2 layers: one process against two FSDP2 processes.

    nice -n 10 python benchmarks/bench_memory_sharded.py            # every configuration not yet in the results
    python benchmarks/bench_memory_sharded.py --only sd35l-2p-full  # one configuration (names: --list)
    python benchmarks/bench_memory_sharded.py --table                # print the table and the memory model

SD3.5-Large (2 blocks; SD3.5-Medium's 2 blocks in full fine-tuning, where Large exceeds the limit), FLUX.1-dev (1 double-stream + 1 single-stream block) and Wan2.2-T2V-A14B (1 block per
expert) are built from their published configs with random weights (`trl_guard.testing`). Each configuration trains
one optimizer step (one round: sampling, scoring, training) with LoRA or in full (AdamW), in one process or in two CPU
processes over gloo under accelerate's FSDP2 (the shipped `fsdp2.yaml`, through the test harness
`tests/fsdp2_cpu.py`, since accelerate turns FSDP on only for GPUs), optionally with `fsdp_offload_params: true` and
`gradient_checkpointing: true`. Each configuration runs in its own processes, one at a time.

What is measured: each process's peak resident set size (Linux `VmHWM`) from the start of training, after accelerate
has sharded the denoiser (`on_train_begin`; the peak is reset there through `/proc/self/clear_refs`, after returning
freed memory with `malloc_trim`), to its end. Loading is left out: on CPU every process builds the whole pipeline
before sharding it, which a GPU run does in host memory. The table also gives the resident size at the start of
training, the denoiser's parameter counts and each process's local share of them.

On a CPU-only machine "CPU offload" moves shards from host memory to host memory (and the harness unpins them:
pinned memory needs an accelerator), so it cannot lower the resident size here; it is run to show what it costs.

Every finished configuration is written to docs/results/memory_sharded.json at once; a rerun skips those already
there. A configuration whose estimate exceeds `--limit-gb` (all its processes together) is recorded as skipped.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "docs" / "results" / "memory_sharded.json"
FSDP2_CONFIG = ROOT / "examples" / "accelerate_configs" / "fsdp2.yaml"
HARNESS_DIR = ROOT / "tests"

#: Rough parameter counts (billions) of the 2-layer builds, for the skip estimate only.
_PARAMS_B = {"sd35l": 0.39, "sd35m": 0.19, "flux": 0.52, "wan22": 1.23}
#: Bytes per parameter the estimate charges: frozen weights, and full AdamW training (weights, gradient, 2 moments).
_DTYPE_BYTES = {"sd35l": 4, "sd35m": 4, "flux": 4, "wan22": 2}


def configurations() -> dict[str, dict]:
    """Every configuration, by name: family, processes, LoRA or full, image side, offload, checkpointing, KL."""
    configs = {}

    def add(family, world, tuning, size, offload=False, checkpointing=False, beta=0.0, layers=None):
        name = f"{family}-{world}p-{tuning}-{size}px"
        name += "-offload" * offload + "-ckpt" * checkpointing + "-kl" * (beta > 0)
        configs[name] = dict(
            family=family,
            world=world,
            tuning=tuning,
            size=size,
            offload=offload,
            checkpointing=checkpointing,
            beta=beta,
        )
        if layers is not None:  # away from the family's build (2 SD3 blocks): how memory grows per block
            configs[name + f"-{layers}block"] = {**configs.pop(name), "layers": layers}

    for world in (1, 2):
        add("sd35l", world, "lora", 128)
        add("sd35l", world, "lora", 256)
        add("sd35l", world, "lora", 256, checkpointing=True)
        add("sd35l", world, "full", 128)
        # SD3.5-Large in full exceeds the limit in one process and in two: SD3.5-Medium's 2 blocks stand in for it
        add("sd35m", world, "full", 128)
        add("sd35m", world, "full", 128, checkpointing=True)
        add("sd35m", world, "full", 128, beta=0.01)
        add("flux", world, "lora", 128)
        add("flux", world, "lora", 128, checkpointing=True)
        add("flux", world, "full", 128)
        add("wan22", world, "lora", 64)
        add("wan22", world, "full", 64)
    add("sd35m", 2, "full", 128, offload=True)
    add("flux", 2, "lora", 128, offload=True)
    # one SD3.5-Large block against two: the activations that grow with depth, apart from those that do not
    add("sd35l", 1, "lora", 256, layers=1)
    return configs


def estimate_gb(config: dict) -> float:
    """All processes together: each holds the whole pipeline once before sharding, then its share of the training
    state (AdamW in full: 16 bytes per parameter, a reference copy 4 more), plus ~1.5 GB of text encoders, VAE and
    runtime per process."""
    params = _PARAMS_B[config["family"]] * 1e9
    weights = params * _DTYPE_BYTES[config["family"]]
    trained = params * (12 + 4 * (config["beta"] > 0)) if config["tuning"] == "full" else 0
    per_process = max(weights, (weights + trained) / config["world"]) + 1.5e9
    return config["world"] * per_process / 1e9


# ---- one process of one configuration ----------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _build(family: str, layers: int | None = None):
    import torch

    from trl_guard.testing.real_width import build_real_width_flux_pipeline, build_real_width_sd3_pipeline
    from trl_guard.testing.wan22 import build_wan22_pipeline_at_real_width

    if family in ("sd35l", "sd35m"):
        variant = "large" if family == "sd35l" else "medium"
        return build_real_width_sd3_pipeline(seed=0, variant=variant, num_layers=layers or 2)
    if family == "flux":
        return build_real_width_flux_pipeline(seed=0, num_layers=1, num_single_layers=1)
    return build_wan22_pipeline_at_real_width(num_layers=1, seed=0, dtype=torch.bfloat16)


def worker(config: dict, report: str) -> None:
    """Train one step of `config` in this process (launched alone or by `accelerate launch`) and write its memory."""
    if config["world"] > 1:
        sys.path.insert(0, str(HARNESS_DIR))
        import fsdp2_cpu  # noqa: F401  (switches accelerate's state to FSDP2 on CPU processes)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback

    from trl_guard import GuardConfig, GuardGRPODiffusionTrainer

    def brightness(prompts, images, **kwargs):
        """Mean pixel value in [0, 1]; a video (Wan2.2: a list of frames) is the mean over its frames."""
        samples = [sample if isinstance(sample, list) else [sample] for sample in images]
        return [
            float(torch.stack([torch.as_tensor(list(f.getdata())).float() for f in s]).mean()) / 255 for s in samples
        ]

    pipeline = _build(config["family"], config.get("layers"))
    video = config["family"] == "wan22"
    samples = 4
    with tempfile.TemporaryDirectory() as output_dir:
        args = GuardConfig(
            output_dir=output_dir,
            num_generations=2,
            per_device_train_batch_size=samples // config["world"],
            steps_per_generation=1,
            max_steps=1,
            height=config["size"],
            width=config["size"],
            num_frames=5 if video else 1,
            max_sequence_length=16,
            num_inference_steps=2,
            guidance_scale=1.0,
            beta=config["beta"],
            optim="adamw_torch",
            learning_rate=1e-5,
            gradient_checkpointing=config["checkpointing"],
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        )
        peft = None if config["tuning"] == "full" else LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0)
        trainer = GuardGRPODiffusionTrainer(
            model=pipeline,
            reward_funcs=[brightness],
            args=args,
            train_dataset=Dataset.from_dict({"prompt": [f"a drawing number {i}" for i in range(8)]}),
            peft_config=peft,
        )
        measured: dict = {}

        class Measure(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # after `prepare` and the copies' sharding
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                measured["start_kib"] = _status_kib("VmRSS")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS

            def on_train_end(self, args, state, control, **kwargs):
                measured["peak_kib"] = _status_kib("VmHWM")

        trainer.add_callback(Measure())
        trainer.train()
        params = list(trainer.adapter.denoiser.parameters())
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        measured.update(
            params=sum(p.numel() for p in params),
            trained=sum(p.numel() for p in params if p.requires_grad),
            local_params=local,
            rank=trainer.accelerator.process_index,
        )
        trainer.accelerator.end_training()
    Path(f"{report}.{measured['rank']}.json").write_text(json.dumps(measured))


def tokens_per_sample(config: dict) -> int:
    """Image (video) tokens per sample the transformer attends over: 8x VAE compression and 2x2 patches (FLUX packs
    2x2 latents into one token: the same count); Wan2.2's 5 frames are 2 latent frames."""
    side = config["size"] // 16
    return side * side * (2 if config["family"] == "wan22" else 1)


# ---- the driver --------------------------------------------------------------------------------------------------
def run(name: str, config: dict) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "rank")
        command = [__file__, "--worker", json.dumps(config), "--report", report]
        if config["world"] == 1:
            env["OMP_NUM_THREADS"] = "2"
            launch = [sys.executable, *command]
        else:
            env["OMP_NUM_THREADS"] = "1"
            accelerate_config = yaml.safe_load(FSDP2_CONFIG.read_text())
            accelerate_config["fsdp_config"]["fsdp_offload_params"] = config["offload"]
            path = os.path.join(tmp, "fsdp2.yaml")
            Path(path).write_text(yaml.safe_dump(accelerate_config))
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", path]
            launch += ["--num_processes", str(config["world"]), *command]
        done = subprocess.run(launch, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return {**config, "status": "failed", "error": done.stderr.strip().splitlines()[-3:]}
        ranks = [json.loads(Path(f"{report}.{rank}.json").read_text()) for rank in range(config["world"])]
    return {**config, "status": "measured", "ranks": ranks}


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help="configuration names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the configurations and their estimates")
    parser.add_argument("--table", action="store_true", help="print the table and the model from the results")
    parser.add_argument("--limit-gb", type=float, default=8.0, help="skip configurations estimated above this")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(json.loads(options.worker), options.report)
        return
    configs = configurations()
    if options.list:
        for name, config in configs.items():
            print(f"{name}: about {estimate_gb(config):.1f} GB")
        return
    if not options.table:
        for name in options.only or list(configs):
            results = load_results()
            if name in results and results[name]["status"] != "failed":
                continue
            config = configs[name]
            if estimate_gb(config) > options.limit_gb:
                result = {**config, "status": "skipped", "estimate_gb": round(estimate_gb(config), 1)}
            else:
                print(f"running {name} ...", flush=True)
                result = run(name, config)
            results = load_results()  # re-read: written after every configuration
            results[name] = result
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
            print(f"{name}: {result['status']}", flush=True)
    print_table(load_results())


def print_table(results: dict) -> None:
    try:
        from memory_model import check_model  # benchmarks/memory_model.py
    except ImportError:
        check_model = None

    print("| configuration | status | start (MiB, per process) | peak (MiB, per process) | local params |")
    print("|---|---|---|---|---|")
    for name, result in results.items():
        if result["status"] != "measured":
            detail = result.get("estimate_gb", "") or " ".join(result.get("error", []))[-120:]
            print(f"| {name} | {result['status']} {detail} | | | |")
            continue
        ranks = result["ranks"]
        start = "/".join(f"{r['start_kib'] / 1024:.0f}" for r in ranks)
        peak = "/".join(f"{r['peak_kib'] / 1024:.0f}" for r in ranks)
        local = "/".join(f"{r['local_params'] / 1e6:.0f}M" for r in ranks)
        print(f"| {name} | measured | {start} | {peak} | {local} of {ranks[0]['params'] / 1e6:.0f}M |")
    if check_model is not None:
        check_model(results)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
