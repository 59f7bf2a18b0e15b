"""Reward functions the command-line tests name by dotted path (`cli_rewards.<name>`, with tests/ on PYTHONPATH)."""

import os
import signal

from conftest import blueness


def step_recording_blueness(prompts, images, trainer_state=None, **kwargs):
    """`blueness`, which also appends the optimizer step it is scored at to `$REWARD_LOG`, and kills its own process
    (SIGKILL, no cleanup) when that step is `$KILL_AT_STEP`."""
    step = trainer_state.global_step
    with open(os.environ["REWARD_LOG"], "a") as log:
        log.write(f"{step}\n")
    if os.environ.get("KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    return blueness(prompts, images)


def video_blueness(prompts, images, **kwargs):
    """`blueness` of each video's frames, averaged (for video families, each entry of `images` is a list of frames)."""
    return [sum(blueness([p] * len(frames), frames)) / len(frames) for p, frames in zip(prompts, images)]
