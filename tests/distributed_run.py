"""Train the tiny pipeline for a few steps; run directly or under `accelerate launch` by test_distributed.py."""

import json
import sys

from conftest import blueness
from helpers import make_trainer

from trl_guard.testing import build_tiny_sd3_pipeline


def main(output_dir: str, per_device_train_batch_size: int) -> None:
    from datasets import Dataset

    prompts = Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(8)]})
    trainer = make_trainer(
        build_tiny_sd3_pipeline(seed=0),
        [blueness],
        prompts,
        output_dir,
        per_device_train_batch_size=per_device_train_batch_size,
        steps_per_generation=1,
        max_steps=3,
        optim="sgd",
        learning_rate=0.5,
        disable_tqdm=True,
    )
    trainer.train()
    trainer.save_model()
    if trainer.is_world_process_zero():
        rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
        with open(f"{output_dir}/rewards.json", "w") as f:
            json.dump({"rewards": rewards, "num_processes": trainer.accelerator.num_processes}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
