"""Peak memory per trained parameter: full fine-tuning against LoRA, on CPU, at SD3.5-Medium's real width.

    OMP_NUM_THREADS=1 python benchmarks/bench_full_finetune.py [--layers 2] [--optim adamw_torch]

Each configuration runs in its own process: `trl_guard.testing.real_width.build_real_width_sd3_pipeline` (SD3.5-M's
widths, `--layers` transformer blocks, 1-2 layer text encoders) trains one optimizer step at 32 px (4 images, 2
sampling steps) with the given optimizer, in full or with a rank-32 LoRA on the default targets. The peak resident
memory of `train()` (Linux `VmHWM`, reset just before training) minus the resident memory before it is what training
added; divided by the transformer's parameter count, it is the bytes per parameter a full fine-tune pays on top of
holding the weights. Activations at 32 px are small, so this is close to the weights' gradient and optimizer state:
AdamW keeps two float32 moments (8 bytes) and the gradient is 4 more.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def measure(mode: str, layers: int, optim: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
    from trl_guard.testing.real_width import build_real_width_sd3_pipeline

    torch.manual_seed(0)
    pipeline = build_real_width_sd3_pipeline(num_layers=layers)
    parameters = sum(p.numel() for p in pipeline.transformer.parameters())
    with tempfile.TemporaryDirectory() as output_dir:
        args = GuardConfig(
            output_dir=output_dir,
            num_generations=4,
            per_device_train_batch_size=4,
            steps_per_generation=1,
            max_steps=1,
            height=32,
            width=32,
            num_inference_steps=2,
            guidance_scale=1.0,
            max_sequence_length=16,
            optim=optim,
            learning_rate=1e-5,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            log_timestep_grad_norm=False,
        )
        trainer = GuardGRPODiffusionTrainer(
            model=pipeline,
            reward_funcs=[lambda prompts, images, **kw: [float(i) for i in range(len(images))]],
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["a cat"]}),
            peft_config=LoraConfig(r=32, lora_alpha=64) if mode == "lora" else None,
        )
        trained = sum(p.numel() for p in trainer.adapter.denoiser.parameters() if p.requires_grad)
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        trainer.train()
        peak = _status("VmHWM")
    added = (peak - before) * 1024
    return {
        "mode": mode,
        "optim": optim,
        "layers": layers,
        "transformer_parameters": parameters,
        "trained_parameters": trained,
        "rss_before_train_mib": round(before / 1024, 1),
        "peak_added_mib": round(added / 2**20, 1),
        "bytes_per_trained_parameter": round(added / trained, 2),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--optim", default="adamw_torch")
    parser.add_argument("--mode", choices=["full", "lora"], help="measure one configuration (internal)")
    parser.add_argument("--output", default=os.path.join("docs", "results", "full_finetune_memory.json"))
    options = parser.parse_args()
    if options.mode:
        print(json.dumps(measure(options.mode, options.layers, options.optim)))
        return
    rows = []
    for mode in ("full", "lora"):
        command = [sys.executable, __file__, "--mode", mode, "--layers", str(options.layers), "--optim", options.optim]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{mode:>4}: {row['trained_parameters'] / 1e6:.1f}M trained of {row['transformer_parameters'] / 1e6:.1f}M; "
            f"training added {row['peak_added_mib']:.0f} MiB = {row['bytes_per_trained_parameter']:.1f} bytes per "
            "trained parameter",
            flush=True,
        )
    with open(options.output, "w") as f:
        json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
