"""GPU cost on paper for SD3.5-Medium and FLUX.1-dev at 512 px: parameters, FLOPs, rollout bytes, optimizer state.

    python benchmarks/gpu_estimate.py

The transformers are built on PyTorch's `meta` device from their published configs (no weights, no memory) and run
once under `torch.utils.flop_counter.FlopCounterMode`, which counts the FLOPs of every matmul and attention call:
a forward pass, and a backward pass with the weights frozen and the gradient flowing to the input, which is the work
of a LoRA backward (LoRA's own weight gradients are negligible next to it). Everything else is arithmetic on those
counts, under the assumptions printed with it. Nothing here was run on a GPU: a GPU run can check these figures.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from trl_guard.adapters.base import ATTENTION_PROJECTIONS

# Published transformer configs (the `transformer/config.json` of each Hub repository).
SD35_MEDIUM = dict(
    attention_head_dim=64,
    caption_projection_dim=1536,
    in_channels=16,
    joint_attention_dim=4096,
    num_attention_heads=24,
    num_layers=24,
    out_channels=16,
    patch_size=2,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    sample_size=128,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
FLUX_DEV = dict(
    attention_head_dim=128,
    guidance_embeds=True,
    in_channels=64,
    joint_attention_dim=4096,
    num_attention_heads=24,
    num_layers=19,
    num_single_layers=38,
    patch_size=1,
    pooled_projection_dim=768,
)
GiB = 2**30
PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16, NVIDIA's datasheet
ASSUMED_MFU = 0.35  # an assumption, not a measurement


def sd35_inputs(height: int = 512, width: int = 512, text_tokens: int = 77 + 128):
    """SD3 joins 77 CLIP tokens and `max_sequence_length` T5 tokens (128, as Flow-GRPO)."""
    latents = torch.randn(1, 16, height // 8, width // 8)
    return latents, dict(
        encoder_hidden_states=torch.randn(1, text_tokens, 4096),
        pooled_projections=torch.randn(1, 2048),
        timestep=torch.ones(1),
    )


def flux_inputs(height: int = 512, width: int = 512, text_tokens: int = 512):
    tokens = (height // 16) * (width // 16)  # 2x2 packed latent patches
    latents = torch.randn(1, tokens, 64)
    return latents, dict(
        encoder_hidden_states=torch.randn(1, text_tokens, 4096),
        pooled_projections=torch.randn(1, 768),
        timestep=torch.ones(1),
        guidance=torch.ones(1),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text_tokens, 3),
    )


def count(model_cls, config: dict, make_inputs) -> dict[str, float]:
    with torch.device("meta"):
        model = model_cls(**config).requires_grad_(False)
        latents, kwargs = make_inputs()
    latents.requires_grad_(True)
    with FlopCounterMode(display=False) as forward_counter:
        out = model(hidden_states=latents, **kwargs).sample
    with FlopCounterMode(display=False) as backward_counter:
        out.sum().backward()
    targets = tuple(ATTENTION_PROJECTIONS)
    lora_shapes = [
        (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.endswith(targets)
    ]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "forward": forward_counter.get_total_flops(),
        "backward": backward_counter.get_total_flops(),
        "lora_per_rank": sum(i + o for i, o in lora_shapes),
        "latent_numel": latents.numel(),
    }


def report(name: str, c: dict, *, cfg: bool, steps: int, trained: int, window: int, lora_r: int, images: int) -> None:
    branches = 2 if cfg else 1  # CFG's two branches run as one batch, in sampling and in training
    sample = steps * branches * c["forward"]

    def train(k: int) -> float:
        return k * branches * (c["forward"] + c["backward"])

    latent_bytes = 4 * c["latent_numel"]  # float32, as the rollout stores them

    def rollout(k: int) -> float:
        return (2 * k + 1) * latent_bytes  # k + 1 states and k means per image

    lora = lora_r * c["lora_per_rank"]
    print(f"\n## {name}: {c['params'] / 1e9:.2f} B transformer parameters")
    print(
        f"forward at 512 px, batch 1: {c['forward'] / 1e12:.2f} TFLOP; LoRA-style backward {c['backward'] / 1e12:.2f}"
    )
    print(f"per image per round, {steps} sampling steps{' with CFG' if cfg else ''}:")
    # Without a window every sampling step is recorded; with one, only the window's steps.
    for label, k, recorded in (
        (f"every step recorded, {trained} trained", trained, steps),
        (f"SDE window of {window}", window, window),
    ):
        total = sample + train(k)
        seconds = images * total / (PEAK_BF16_FLOPS * ASSUMED_MFU)
        print(
            f"  {label}: sampling {sample / 1e12:.1f} + training {train(k) / 1e12:.1f} = {total / 1e12:.1f} TFLOP; "
            f"rollout {rollout(recorded) / 2**20:.2f} MiB/image, {images * rollout(recorded) / GiB:.2f} GiB for {images} "
            "images; "
            f"~{seconds:.0f} s per round of {images} images on one H100 at {ASSUMED_MFU:.0%} MFU"
        )
    print(
        f"weights in bf16: {2 * c['params'] / GiB:.1f} GiB; LoRA r={lora_r} on the attention projections: "
        f"{lora / 1e6:.1f} M parameters, {16 * lora / GiB:.2f} GiB as fp32 weights + grads + AdamW moments; "
        f"full fine-tuning would hold {16 * c['params'] / GiB:.0f} GiB of that state"
    )


def main() -> None:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    sd35 = count(SD3Transformer2DModel, SD35_MEDIUM, sd35_inputs)
    report("SD3.5-Medium (Flow-GRPO recipe)", sd35, cfg=True, steps=10, trained=9, window=2, lora_r=32, images=144)
    flux = count(FluxTransformer2DModel, FLUX_DEV, flux_inputs)
    report(
        "FLUX.1-dev (DanceGRPO-style recipe)", flux, cfg=False, steps=16, trained=16, window=2, lora_r=32, images=24
    )
    print(
        "\nAssumptions: 512x512 images; SD3.5 text of 77 CLIP + 128 T5 tokens, FLUX 512 T5 tokens; activation "
        "checkpointing would add one forward per trained step; text encoders and VAE run once per round and are left "
        "out; images per GPU per round are the recipes' (per_device_train_batch_size x steps_per_generation)."
    )


if __name__ == "__main__":
    main()
