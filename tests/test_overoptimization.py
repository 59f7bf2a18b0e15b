"""The over-optimisation alarm: stops a hacking run, never a noisy one, and restores the best-gold weights."""

import pytest
import torch
from transformers import TrainerControl, TrainerState

from trl_guard import OverOptimizationCallback


def run(golds, proxies, **kwargs):
    """Feed an evaluation sequence; returns the step it stopped at (None if it ran through) and the callback."""
    callback = OverOptimizationCallback("gold/fidelity", **kwargs)
    for step, (gold, proxy) in enumerate(zip(golds, proxies), start=1):
        state, control = TrainerState(global_step=step * 10), TrainerControl()
        callback.on_evaluate(None, state, control, metrics={"eval_gold/fidelity": gold, "eval_reward": proxy})
        if control.should_training_stop:
            return step * 10, callback
    return None, callback


def test_stops_a_hacking_run():
    golds = [0.60, 0.62, 0.61, 0.57, 0.52, 0.45, 0.40]
    proxies = [0.10, 0.11, 0.12, 0.14, 0.16, 0.19, 0.22]
    stopped, callback = run(golds, proxies)
    assert stopped == 50  # 0.57 and 0.52 are both more than 0.02 below the best 0.62, with the proxy up
    assert callback.best_step == 20 and callback.best_gold == pytest.approx(0.62)
    assert "step 50" in callback.stop_reason and "0.5200" in callback.stop_reason


def test_noise_within_tolerance_never_stops():
    g = torch.Generator().manual_seed(0)
    golds = (0.6 + 0.009 * torch.randn(200, generator=g)).clamp(0.591, 0.609).tolist()  # peak-to-peak < 0.02
    proxies = torch.linspace(0.1, 0.3, 200).tolist()
    stopped, _ = run(golds, proxies)  # default tolerance 0.02
    assert stopped is None


def test_a_single_dip_or_a_falling_proxy_does_not_stop():
    dip = [0.60, 0.55, 0.60, 0.55, 0.61]
    assert run(dip, [0.1, 0.2, 0.3, 0.4, 0.5])[0] is None  # never two bad evaluations in a row
    failing = [0.60, 0.50, 0.40, 0.30]
    assert run(failing, [0.10, 0.09, 0.08, 0.07])[0] is None  # gold and proxy both fall: not over-optimisation


def test_patience_and_tolerance_are_respected():
    golds, proxies = [0.6, 0.55, 0.55, 0.55], [0.1, 0.2, 0.3, 0.4]
    assert run(golds, proxies, patience=3)[0] == 40
    assert run(golds, proxies, tolerance=0.06)[0] is None


def test_missing_metric_names_what_was_logged():
    callback = OverOptimizationCallback("eval_gold/fidelity")
    with pytest.raises(KeyError, match="eval_reward"):
        callback.on_evaluate(None, TrainerState(), TrainerControl(), metrics={"eval_reward": 0.1})


def test_restores_the_best_weights_at_the_end():
    model = torch.nn.Linear(2, 1)
    callback = OverOptimizationCallback("eval_gold", patience=1)
    for step, (value, gold, proxy) in enumerate([(1.0, 0.6, 0.1), (2.0, 0.5, 0.2)], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        control = callback.on_evaluate(
            None, TrainerState(global_step=step), TrainerControl(), metrics={"eval_gold": gold, "eval_reward": proxy},
            model=model,
        )  # fmt: skip
    assert control.should_training_stop
    callback.on_train_end(None, TrainerState(), TrainerControl(), model=model)
    assert torch.equal(model.weight, torch.ones_like(model.weight))
