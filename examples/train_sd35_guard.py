"""GRPO-Guard on SD3.5-Medium with a LoRA, the paper's hyperparameters scaled to one node.

    accelerate launch examples/train_sd35_guard.py --prompts prompts.txt --output-dir sd35m-guard

Needs a GPU with bf16 and the SD3.5-Medium weights (gated on the Hub: accept the licence and `hf auth login`).
Bring your own reward: `my_reward(prompts, images, **kwargs) -> list[float]`.
"""

import argparse

from datasets import load_dataset
from peft import LoraConfig

from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
from trl_guard.rewards import jpeg_compressibility


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", required=True, help="A text file with one prompt per line.")
    parser.add_argument("--output-dir", default="sd35m-guard")
    parser.add_argument("--model", default="stabilityai/stable-diffusion-3.5-medium")
    options = parser.parse_args()

    dataset = load_dataset("text", data_files=options.prompts, split="train").rename_column("text", "prompt")
    args = GuardConfig(
        output_dir=options.output_dir,
        loss_type="grpo_guard",
        epsilon=2e-6,
        learning_rate=1e-4,
        num_generations=24,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=3,
        steps_per_generation=6,  # two optimizer steps per sampling round, as Flow-GRPO
        num_inference_steps=10,
        noise_level=0.7,
        guidance_scale=4.5,
        height=512,
        width=512,
        bf16=True,
        model_init_kwargs={"dtype": "bfloat16"},
        max_steps=1000,
        save_steps=100,
        report_to="tensorboard",
    )
    trainer = GuardGRPODiffusionTrainer(
        model=options.model,
        reward_funcs=[jpeg_compressibility],
        args=args,
        train_dataset=dataset,
        peft_config=LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian"),
    )
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
