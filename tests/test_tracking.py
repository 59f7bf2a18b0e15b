"""Metrics and evaluation images reach a real tracker (TensorBoard event files) through the Trainer's callbacks."""

from conftest import blueness
from datasets import Dataset
from helpers import make_trainer


def test_tensorboard_gets_rewards_diagnostics_and_images(tiny_pipeline, prompts, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = make_trainer(
        tiny_pipeline,
        [blueness],
        prompts,
        tmp_path,
        max_steps=2,
        report_to=["tensorboard"],
        eval_strategy="steps",
        eval_steps=2,
        eval_num_inference_steps=3,
        eval_dataset=Dataset.from_dict({"prompt": ["a red square", "a blue circle"]}),
    )
    trainer.train()
    trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)  # flush the writer
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {
        "train/reward",
        "train/timestep/00/clip_frac_high",
        "train/timestep/03/grad_norm",
        "eval/reward",
    } <= scalars
    assert "eval_images" in events.Tags()["images"]


def test_progress_bar_shows_phases_and_reward(tiny_pipeline, prompts, tmp_path):
    from trl_guard.callbacks import GuardProgressCallback

    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, max_steps=2, disable_tqdm=False)
    bar = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GuardProgressCallback))
    phases, postfixes = [], []
    original_on_log = bar.on_log

    def record_phase(phase):
        phases.append(phase)

    def record_log(args, state, control, logs=None, **kwargs):
        original_on_log(args, state, control, logs=logs, **kwargs)
        if bar.training_bar is not None:
            postfixes.append(str(bar.training_bar.postfix))

    bar.set_phase, bar.on_log = record_phase, record_log
    trainer.train()
    assert phases[:3] == ["sampling", "scoring", "training"] and phases.count("training") == 2
    assert any("reward=" in p and "clip>" in p for p in postfixes)
