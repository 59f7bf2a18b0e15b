"""Console progress for diffusion RL: one bar over optimizer steps showing the latest reward and clip fractions."""

from __future__ import annotations

import json

from transformers.trainer_callback import ProgressCallback

from .metrics import Stat

_POSTFIX = {Stat.REWARD: "reward", Stat.CLIP_FRAC_HIGH: "clip>", Stat.CLIP_FRAC_LOW: "clip<", "loss": "loss"}


class GuardProgressCallback(ProgressCallback):
    """Like transformers' ProgressCallback, but the per-timestep diagnostics go to trackers, not the console:
    the bar shows the latest reward and clip fractions, and only the end-of-training summary is printed."""

    def set_phase(self, phase: str) -> None:
        """Show what the current optimizer step is doing ("sampling", "scoring", "training") left of the bar."""
        if self.training_bar is not None:
            self.training_bar.set_description(phase, refresh=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        postfix = {short: f"{logs[key]:.4g}" for key, short in _POSTFIX.items() if key in logs}
        if postfix:
            self.training_bar.set_postfix(postfix, refresh=False)
        if "train_runtime" in logs or any(key.startswith("eval_") for key in logs):
            summary = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items() if k != "total_flos"}
            self.training_bar.write(str(summary))


def _tensorboard_callback_cls():
    from transformers.integrations import TensorBoardCallback

    class DiffusersTensorBoardCallback(TensorBoardCallback):
        """transformers' TensorBoard callback, which writes `model.config.to_json_string()` at train start: a
        diffusers config is a dict without that method, so the config is written as JSON here instead."""

        def on_train_begin(self, args, state, control, **kwargs):
            model = kwargs.pop("model", None)
            super().on_train_begin(args, state, control, **kwargs)
            if self.tb_writer is not None and model is not None and isinstance(getattr(model, "config", None), dict):
                self.tb_writer.add_text("model_config", json.dumps(dict(model.config), default=str, indent=2))

    return TensorBoardCallback, DiffusersTensorBoardCallback


def adapt_tracker_callbacks(trainer) -> None:
    """Swap the console progress bar and the tracker callbacks that assume a transformers model.

    Only TensorBoard's needs it: wandb's and trackio's callbacks take a `model.config` that is a dict (a diffusers
    config is one) as it is. Not covered: wandb's WANDB_LOG_MODEL, which calls `model.config.to_dict()` and saves
    the model through a plain Trainer; the trainer writes its own checkpoints."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(GuardProgressCallback)
    if any(type(cb).__name__ == "TensorBoardCallback" for cb in trainer.callback_handler.callbacks):
        original, replacement = _tensorboard_callback_cls()
        trainer.pop_callback(original)
        trainer.add_callback(replacement)
