"""Stop a run when the gold score falls while the proxy reward keeps climbing, and keep the best-gold weights.

Reward over-optimisation shows as a gold score (a reward the policy never trains on) falling while the proxy (the
reward it trains on) still rises. `OverOptimizationCallback` watches both at every evaluation and ends training once
the pattern has held for `patience` evaluations in a row, which is a fair, pre-declared stopping rule for comparing
methods.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .metrics import EVAL_GOLD

logger = logging.getLogger(__name__)


def _eval_name(metric: str) -> str:
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def check_alarm_metric(metric: str, logged: Collection[str], field: str) -> None:
    """Refuse, before training, a metric the alarm watches that evaluation will not log (a typo, or no
    `gold_reward_funcs`): the first evaluation would otherwise raise, after training steps and with nothing saved.

    Args:
        metric: The metric as given; the `eval_` prefix may be left out.
        logged: The keys evaluation will log (`metrics.eval_keys`).
        field: How the error names the setting, for example `"overoptimization_gold_metric"`.
    """
    if _eval_name(metric) in logged:
        return
    hint = "" if any(key.startswith(EVAL_GOLD) for key in logged) else " Gold scores need gold_reward_funcs."
    raise ValueError(
        f"{field}={metric!r}: evaluation will not log {_eval_name(metric)!r}. It logs {', '.join(logged)}; name one "
        f"of these.{hint}"
    )


class OverOptimizationCallback(TrainerCallback, ExportableState):
    """Early stopping on over-optimisation, for [`GuardGRPODiffusionTrainer`] (or any Trainer that evaluates).

    At each evaluation the callback tracks the best value of `gold_metric`. When gold has stayed more than `tolerance`
    below its best for `patience` consecutive evaluations while `proxy_metric` is above its value at the best-gold
    evaluation, it sets `control.should_training_stop` and logs the step, the best and current gold and the proxy.
    Gold noise within `tolerance` never stops a run, nor does a gold drop that comes with a falling proxy (that is
    a failing run, not over-optimisation).

    With `restore_best`, the trainable weights of the best-gold evaluation are kept in CPU memory (the LoRA, or the
    whole denoiser when it is trained in full) and put back at the end of training, so `save_model()` writes them.
    Under an EMA (`GuardConfig.ema_decay > 0`) the kept weights are the EMA weights that were evaluated, and the
    trainer restarts its EMA from them.

    Its state goes into every checkpoint (the counts in `trainer_state.json`'s `stateful_callbacks`, the kept weights
    in `overoptimization_best_<i>.safetensors`), and [`GuardGRPODiffusionTrainer`] restores it in place on resume, so a
    resumed run stops at the same step, with the same weights, as an uninterrupted one.

    Args:
        gold_metric (`str`):
            The logged evaluation metric to protect, for example `"eval_gold/caption_fidelity"`; the `eval_` prefix
            may be left out.
        proxy_metric (`str`, *optional*, defaults to `"eval_reward"`):
            The trained reward as evaluated (the weighted sum of the reward functions).
        tolerance (`float`, *optional*, defaults to `0.02`):
            How far below its best gold may fall before an evaluation counts against the run.
        patience (`int`, *optional*, defaults to `2`):
            Consecutive counting evaluations before training stops.
        restore_best (`bool`, *optional*, defaults to `True`):
            End training with the best-gold weights.

    Example:
        ```python
        from trl_guard import OverOptimizationCallback

        alarm = OverOptimizationCallback("eval_gold/caption_fidelity", tolerance=0.02, patience=2)
        trainer = GuardGRPODiffusionTrainer(..., callbacks=[alarm])  # with eval_dataset and gold_reward_funcs
        trainer.train()
        print(alarm.stop_reason)  # None if training ran to the end
        ```
    """

    def __init__(
        self,
        gold_metric: str,
        proxy_metric: str = "eval_reward",
        tolerance: float = 0.02,
        patience: int = 2,
        restore_best: bool = True,
    ):
        if tolerance < 0:
            raise ValueError(f"tolerance={tolerance} must be >= 0.")
        if patience < 1:
            raise ValueError(f"patience={patience} must be >= 1.")
        self.gold_metric = _eval_name(gold_metric)
        self.proxy_metric = _eval_name(proxy_metric)
        self.tolerance = tolerance
        self.patience = patience
        self.restore_best = restore_best
        self.best_gold: float | None = None
        self.best_step: int | None = None
        self.proxy_at_best: float | None = None
        self.bad_evaluations = 0
        self.stop_reason: str | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None

    #: What a checkpoint keeps of the bookkeeping (the kept weights go into a safetensors file beside it).
    _STATE_ATTRIBUTES = ("best_gold", "best_step", "proxy_at_best", "bad_evaluations", "stop_reason")

    def state(self) -> dict[str, Any]:
        """The bookkeeping, as transformers writes stateful callbacks into `trainer_state.json`."""
        return {
            "args": {
                "gold_metric": self.gold_metric,
                "proxy_metric": self.proxy_metric,
                "tolerance": self.tolerance,
                "patience": self.patience,
                "restore_best": self.restore_best,
            },
            "attributes": {name: getattr(self, name) for name in self._STATE_ATTRIBUTES},
        }

    def load_state(self, state: dict[str, Any], best_weights: dict[str, torch.Tensor] | None) -> None:
        """Continue from a checkpoint's `state()` and kept weights, in place: whoever holds this callback keeps
        reading its `stop_reason`. The settings stay this run's own."""
        for name in self._STATE_ATTRIBUTES:
            setattr(self, name, state.get("attributes", {}).get(name))
        self.bad_evaluations = self.bad_evaluations or 0
        self.best_weights = best_weights

    def update(self, step: int, gold: float, proxy: float) -> bool:
        """Record one evaluation; returns True when training should stop. Pure bookkeeping, no weights."""
        if self.best_gold is None or gold > self.best_gold:
            self.best_gold, self.best_step, self.proxy_at_best = gold, step, proxy
            self.bad_evaluations = 0
            return False
        if gold < self.best_gold - self.tolerance and proxy > self.proxy_at_best:
            self.bad_evaluations += 1
        else:
            self.bad_evaluations = 0
        if self.bad_evaluations >= self.patience:
            self.stop_reason = (
                f"over-optimisation at step {step}: {self.gold_metric} = {gold:.4f} has stayed more than "
                f"{self.tolerance} below its best {self.best_gold:.4f} (step {self.best_step}) for {self.patience} "
                f"evaluations while {self.proxy_metric} rose from {self.proxy_at_best:.4f} to {proxy:.4f}"
            )
            return True
        return False

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        metrics = metrics or {}
        missing = [name for name in (self.gold_metric, self.proxy_metric) if name not in metrics]
        if missing:
            raise KeyError(
                f"OverOptimizationCallback: the evaluation logged no {missing} (it logged {sorted(metrics)}). Pass "
                "gold_reward_funcs and an eval_dataset to the trainer, and name a logged metric."
            )
        previous_best = self.best_step
        stop = self.update(state.global_step, float(metrics[self.gold_metric]), float(metrics[self.proxy_metric]))
        if self.restore_best and model is not None and self.best_step == state.global_step != previous_best:
            self.best_weights = {
                name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad
            }
        if stop:
            logger.warning(self.stop_reason)
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.restore_best and self.stop_reason is not None and self.best_weights and model is not None:
            restore_weights(model, self.best_weights)
            logger.warning(f"Restored the weights of step {self.best_step} ({self.gold_metric} {self.best_gold:.4f}).")


@torch.no_grad()
def restore_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` (name -> tensor) into the model's parameters of the same names."""
    parameters = dict(model.named_parameters())
    for name, value in weights.items():
        parameters[name].copy_(value.to(parameters[name].device))
