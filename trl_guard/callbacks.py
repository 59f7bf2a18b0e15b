"""Console progress for diffusion RL: one bar over optimizer steps showing the latest reward and clip fractions."""

from __future__ import annotations

from transformers.trainer_callback import ProgressCallback

_POSTFIX = {"reward": "reward", "clip_frac_high": "clip>", "clip_frac_low": "clip<", "loss": "loss"}


class GuardProgressCallback(ProgressCallback):
    """Like transformers' ProgressCallback, but the per-timestep diagnostics go to trackers, not the console:
    the bar shows the latest reward and clip fractions, and only the end-of-training summary is printed."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        postfix = {short: f"{logs[key]:.4g}" for key, short in _POSTFIX.items() if key in logs}
        if postfix:
            self.training_bar.set_postfix(postfix, refresh=False)
        if "train_runtime" in logs or any(key.startswith("eval_") for key in logs):
            summary = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items() if k != "total_flos"}
            self.training_bar.write(str(summary))
