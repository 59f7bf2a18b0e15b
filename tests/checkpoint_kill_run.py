"""Train with checkpoints every 2 steps and die (os._exit) in the middle of writing the checkpoint at step 4."""

import os
import sys

from conftest import blueness
from datasets import Dataset
from helpers import make_trainer

from trl_guard.testing import build_tiny_sd3_pipeline


def main(output_dir: str) -> None:
    prompts = Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(8)]})
    trainer = make_trainer(
        build_tiny_sd3_pipeline(),
        [blueness],
        prompts,
        output_dir,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        steps_per_generation=1,
    )
    write_rng_state = trainer._save_rng_state

    def die_mid_save(folder):
        if trainer.state.global_step == 4:  # weights and optimizer are written, RNG and trainer state are not
            os._exit(3)
        write_rng_state(folder)

    trainer._save_rng_state = die_mid_save
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1])
