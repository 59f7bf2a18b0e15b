"""A memory model per process, fitted on the CPU measurements of bench_memory_sharded.py, checked against them, and
extrapolated to GPUs of 80 GB.

    python benchmarks/memory_model.py    # reads docs/results/memory_sharded.json

Per process, training's peak is

    start  = runtime + frozen modules (text encoders, VAE) + weight_bytes x local parameters
    peak   = start + state_bytes x local trained parameters (full fine-tuning) + activations

where `local` is what the process holds (all of it in one process, about 1/N under FSDP2 over N processes). Three
numbers are read off the measurements (`fit`), each from a pair of runs that differ in one thing only:

- bytes per weight: the resident size at the start of training, one process against two (the same family, LoRA);
- bytes per trained parameter (gradient and AdamW's two moments, and what the step allocates on the way): the growth
  of full fine-tuning during training, less its activations, over its local trained parameters;
- activation bytes per token per sample, in two parts: per block (SD3.5-L's LoRA training at 256 px with two blocks
  against one) and outside the blocks (embeddings, the output layer, the loss: the rest of the growth from 128 px to
  256 px with two blocks). Without the one-block run, all of it is charged per block, which overstates a deep model.

The GPU table applies them with bf16 in place of float32 (weights and activations at 2 bytes, float32 AdamW state)
at the recipes' resolutions and per-GPU batches; it is arithmetic, not a measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parents[1] / "docs" / "results" / "memory_sharded.json"
#: Layers of the 2-layer builds, and their width (activations scale with it), by family of the benchmark.
LAYERS = {"sd35l": 2, "sd35m": 2, "flux": 2, "wan22": 1}
WIDTH = {"sd35l": 2432, "sd35m": 1536, "flux": 3072, "wan22": 5120}
#: Text tokens in the joint sequence at `max_sequence_length` 16 (SD3: 77 CLIP + 16 T5; FLUX: 16 T5; Wan: cross
#: attention only).
TEXT_TOKENS = {"sd35l": 93, "sd35m": 93, "flux": 16, "wan22": 0}
SAMPLES = 4  # per configuration, over its processes
FLOAT32_BYTES = 4  # every measurement ran in float32 (CPU)
#: Parameters of the largest block of each 2-layer build (counted on the meta device): what FSDP2 gathers at once.
BLOCK_PARAMS = {"sd35l": 213.0e6, "sd35m": 101.5e6, "flux": 339.8e6, "wan22": 351.4e6}


def tokens(config: dict) -> int:
    side = config["size"] // 16
    return side * side * (2 if config["family"] == "wan22" else 1) + TEXT_TOKENS[config["family"]]


def _mean(values):
    values = list(values)
    return sum(values) / len(values)


def _rank_mean(result: dict, key: str) -> float:
    return _mean(r[key] * (1024 if key.endswith("_kib") else 1) for r in result["ranks"])


def fit(results: dict) -> dict:
    measured = {k: v for k, v in results.items() if v.get("status") == "measured"}
    model = {}
    # bytes per weight: start of training, one process against two
    pairs = [(f"{f}-1p-lora-128px", f"{f}-2p-lora-128px") for f in ("sd35l", "flux")]
    slopes = []
    for one, two in pairs:
        if one in measured and two in measured:
            drop = _rank_mean(measured[one], "start_kib") - _rank_mean(measured[two], "start_kib")
            held = _rank_mean(measured[one], "local_params") - _rank_mean(measured[two], "local_params")
            slopes.append(drop / held)
    model["weight_bytes"] = _mean(slopes) if slopes else 4.0
    # activations per token per sample (float32 on CPU), per unit of width: per block, and outside the blocks
    small, large, shallow = "sd35l-1p-lora-128px", "sd35l-1p-lora-256px", "sd35l-1p-lora-256px-1block"
    model["activation_bytes_per_width"] = model["outside_bytes_per_width"] = 0.0
    if small in measured and large in measured:
        grow = {n: _rank_mean(measured[n], "peak_kib") - _rank_mean(measured[n], "start_kib") for n in measured}
        per_token = (grow[large] - grow[small]) / ((tokens(measured[large]) - tokens(measured[small])) * SAMPLES)
        per_block = per_token / LAYERS["sd35l"]
        if shallow in measured:
            per_block = (grow[large] - grow[shallow]) / (tokens(measured[large]) * SAMPLES)
        outside = max(per_token - LAYERS["sd35l"] * per_block, 0.0)
        model["activation_bytes_per_width"] = max(per_block, 0.0) / WIDTH["sd35l"]
        model["outside_bytes_per_width"] = outside / WIDTH["sd35l"]
    # what FSDP2's gathers hold at the peak, in blocks of the largest kind (two-process LoRA runs)
    blocks = []
    for family in ("sd35l", "flux"):
        name = f"{family}-2p-lora-128px"
        if name in measured:
            result = measured[name]
            grow = _rank_mean(result, "peak_kib") - _rank_mean(result, "start_kib") - activations(model, result)
            blocks.append(grow / (BLOCK_PARAMS[family] * model["weight_bytes"]))
    model["gathered_blocks"] = _mean(blocks) if blocks else 2.0
    # bytes per trained parameter in full fine-tuning (AdamW)
    states = []
    for name in ("sd35m-1p-full-128px", "sd35m-2p-full-128px"):
        if name in measured:
            result = measured[name]
            grow = _rank_mean(result, "peak_kib") - _rank_mean(result, "start_kib")
            trained_local = _rank_mean(result, "local_params")
            grow -= activations(model, result) + gathered(model, result)
            states.append(grow / trained_local)
    model["state_bytes"] = _mean(states) if states else 12.0
    model["state_bytes_runs"] = states  # one process, two: their spread is the model's uncertainty
    return model


def activation_bytes_per_token(model: dict, layers: int, width: int, checkpointing: bool) -> float:
    """Activation bytes per token per sample of a `layers`-block model of `width`, in the measured float32 (halve for
    bf16). Checkpointing keeps each block's input (`width` float32 values) and one block's activations at a time
    (while it is recomputed), not every block's."""
    per_block = model["activation_bytes_per_width"] * width
    blocks = layers * width * FLOAT32_BYTES + per_block if checkpointing else layers * per_block
    return blocks + model["outside_bytes_per_width"] * width


def activations(model: dict, config: dict) -> float:
    per_process = SAMPLES / config["world"]
    layers = config.get("layers", LAYERS[config["family"]])
    per_token = activation_bytes_per_token(model, layers, WIDTH[config["family"]], config.get("checkpointing", False))
    return per_token * tokens(config) * per_process


def gathered(model: dict, config: dict) -> float:
    if config["world"] == 1:
        return 0.0
    return model.get("gathered_blocks", 2.0) * BLOCK_PARAMS[config["family"]] * model["weight_bytes"]


def predict(model: dict, result: dict) -> float:
    """The peak per process from the measured start of training and the model's growth."""
    start = _rank_mean(result, "start_kib")
    state = model["state_bytes"] * _rank_mean(result, "local_params") if result["tuning"] == "full" else 0.0
    return start + state + activations(model, result) + gathered(model, result)


def check_model(results: dict) -> dict:
    model = fit(results)
    print()
    print(
        f"model: {model['weight_bytes']:.2f} bytes per weight (float32 on CPU), {model['state_bytes']:.1f} bytes per "
        f"trained parameter (AdamW; {', '.join(f'{b:.1f}' for b in model['state_bytes_runs'])} in 1 / 2 processes), "
        f"{model['activation_bytes_per_width'] * 2432 / 1024:.1f} KiB of activations per token per block per sample "
        f"and {model['outside_bytes_per_width'] * 2432 / 1024:.1f} KiB outside the blocks at SD3.5-L's width 2432 "
        "(float32); at the peak FSDP2 holds "
        f"{model['gathered_blocks']:.1f} gathered blocks over gloo on CPU"
    )
    print("| configuration | measured peak (MiB, mean per process) | predicted | error |")
    print("|---|---|---|---|")
    for name, result in results.items():
        if result.get("status") != "measured":
            continue
        measured, predicted = _rank_mean(result, "peak_kib"), predict(model, result)
        error = (predicted - measured) / measured
        print(f"| {name} | {measured / 2**20:.0f} | {predicted / 2**20:.0f} | {error:+.1%} |")
    return model


# ---- GPUs of 80 GB, on paper -------------------------------------------------------------------------------------
#: Published sizes (billions of parameters): the transformer(s), the text encoders; blocks, width, and the recipes'
#: image (video) tokens plus joint text tokens and per-GPU batch.
GPU_MODELS = {
    "SD3.5-Large": dict(params=8.1, text=5.6, layers=38, width=2432, tokens=1024 + 333, batch=9),
    "FLUX.1-dev": dict(params=11.9, text=4.9, layers=57, width=3072, tokens=1024 + 512, batch=4),
    "FLUX.2-dev": dict(params=32.2, text=24.0, layers=56, width=6144, tokens=1024 + 512, batch=1),
    "Qwen-Image": dict(params=20.4, text=8.3, layers=60, width=3072, tokens=1024 + 256, batch=4),
    "Wan2.2-T2V-A14B": dict(params=2 * 14.3, text=5.7, layers=40, width=5120, tokens=1800, batch=1, active=0.5),
}


def gpu_gib(model: dict, spec: dict, gpus: int, full: bool, checkpointing: bool) -> float:
    """Per GPU, in GiB: bf16 weights (or, in full fine-tuning, float32 master weights and AdamW state) sharded over
    `gpus` under FSDP2; bf16 text encoders whole on every GPU; one block gathered at a time (two with prefetch); and
    the activations of one micro-batch's forward (bf16, half the measured float32 bytes)."""
    params = spec["params"] * 1e9
    weights = params * (4 + model["state_bytes"] if full else 2) / gpus
    text = spec["text"] * 1e9 * 2
    gathered = 2 * 2 * params * spec.get("active", 1.0) / spec["layers"] if gpus > 1 else 0.0
    per_token = activation_bytes_per_token(model, spec["layers"], spec["width"], checkpointing) / 2
    acts = per_token * spec["tokens"] * spec["batch"]
    return (weights + text + gathered + acts) / 2**30


def gpu_table(model: dict) -> None:
    print()
    print("| model | tuning | 1 GPU | 8 GPUs | 16 GPUs | with checkpointing, 8 GPUs |")
    print("|---|---|---|---|---|---|")
    for name, spec in GPU_MODELS.items():
        for full in (False, True):
            cells = [f"{gpu_gib(model, spec, g, full, False):.0f}" for g in (1, 8, 16)]
            cells.append(f"{gpu_gib(model, spec, 8, full, True):.0f}")
            print(f"| {name} | {'full, AdamW' if full else 'LoRA'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    gpu_table(check_model(json.loads(RESULTS.read_text())))
