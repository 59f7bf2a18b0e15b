"""The committed toy model loads like any diffusers checkpoint, draws its captions, and the demo runs on it."""

import json
import os

import numpy as np
import pytest
import torch

from trl_guard.scripts.demo import TOY_MODEL

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(TOY_MODEL, "model_index.json")), reason="toy model not trained in this checkout"
)

# Documented in docs/reproducing_the_paper.md: the base model's mean caption fidelity on these 48 captions, ODE
# 10 steps, seed 0, must stay above this.
FIDELITY_THRESHOLD = 0.45  # measured 0.521 for the committed model (0.455 for the first one)


def test_toy_model_loads_and_draws_its_captions():
    from trl_guard.toy import caption_fidelity, cleanliness
    from trl_guard.toy.model import XPredictionSD3Transformer, load_toy_pipeline
    from trl_guard.toy.train import MAX_SEQUENCE_LENGTH, all_captions

    pipe = load_toy_pipeline(TOY_MODEL)
    assert isinstance(pipe.transformer, XPredictionSD3Transformer)
    pipe.set_progress_bar_config(disable=True)
    captions = all_captions()[::5]  # 48 captions across the grammar
    images = pipe(
        captions,
        height=32,
        width=32,
        num_inference_steps=10,
        guidance_scale=1.0,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert np.mean(caption_fidelity(captions, images)) > FIDELITY_THRESHOLD
    assert np.mean(cleanliness(captions, images)) > 0.8
    sizes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(TOY_MODEL) for f in fs)
    assert sizes < 20 * 2**20


@pytest.mark.slow
def test_shortened_toy_demo_writes_every_plot(newcomers_demo):
    """`trl-guard demo --steps 2` on the toy world (the default here), in the fresh process test_demo checks for
    spurious warnings."""
    done, output_dir = newcomers_demo
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world: toy" in done.stdout
    report = output_dir / "report"
    for name in ("index.html", "rewards.png", "timesteps.png", "metrics.json", "timesteps.csv"):
        assert (report / name).exists(), name
    metrics = json.loads((report / "metrics.json").read_text())
    for run in metrics.values():
        assert {"eval_gold/caption_fidelity", "eval_gold/cleanliness", "rewards/colour_proxy/mean"} <= set(
            run["final"]
        )


@pytest.mark.slow
def toy_trainer(tmp_path, loss_type: str, learning_rate: float, max_steps: int, callbacks=(), **fields):
    """The toy world on a small budget: 4 images per caption, 16 per micro-step, 6 steps, LoRA r=8; trained on the
    colour proxy and watched by caption fidelity on held-out captions."""
    from datasets import Dataset
    from peft import LoraConfig

    from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
    from trl_guard.toy import caption_fidelity, colour_proxy
    from trl_guard.toy.model import load_toy_pipeline
    from trl_guard.toy.train import MAX_SEQUENCE_LENGTH, all_captions

    captions = all_captions()
    return GuardGRPODiffusionTrainer(
        model=load_toy_pipeline(TOY_MODEL),
        reward_funcs=[colour_proxy],
        args=GuardConfig(
            output_dir=str(tmp_path),
            loss_type=loss_type,
            learning_rate=learning_rate,
            num_generations=4,
            per_device_train_batch_size=16,
            steps_per_generation=2,
            num_inference_steps=6,
            eval_num_inference_steps=6,
            height=32,
            width=32,
            guidance_scale=1.0,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            max_steps=max_steps,
            per_device_eval_batch_size=32,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
            **fields,
        ),
        train_dataset=Dataset.from_dict({"prompt": captions[::8]}),
        eval_dataset=Dataset.from_dict({"prompt": captions[3::8]}),
        peft_config=LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian"),
        gold_reward_funcs=[caption_fidelity],
        callbacks=list(callbacks),
    )


def test_over_optimisation_alarm_stops_a_hacking_run_with_the_best_gold_weights(tmp_path):
    """Flow-GRPO at a high rate hacks the colour proxy; the alarm stops it and training ends with the weights of the
    best-gold evaluation, which re-evaluate to the best gold."""
    from trl_guard import OverOptimizationCallback

    alarm = OverOptimizationCallback("gold/caption_fidelity", tolerance=0.02, patience=2)
    trainer = toy_trainer(tmp_path, "flow_grpo", 2e-2, 40, [alarm], eval_strategy="steps", eval_steps=2)
    trainer.train()
    assert alarm.stop_reason is not None, "the run did not over-optimise within 40 steps"
    assert trainer.state.global_step < 40
    golds = [e["eval_gold/caption_fidelity"] for e in trainer.state.log_history if "eval_gold/caption_fidelity" in e]
    assert golds[-1] < alarm.best_gold - alarm.tolerance  # it stopped on a real drop...
    assert trainer.evaluate()["eval_gold/caption_fidelity"] == pytest.approx(alarm.best_gold)  # ...with the best back


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["nft", "awm"])
def test_forward_losses_raise_the_proxy_the_other_losses_raise(loss_type, tmp_path):
    """The colour proxy, which Flow-GRPO and GRPO-Guard raise on the toy world (docs/reproducing_the_paper.md), rises
    under DiffusionNFT and AWM too: the held-out proxy after 8 steps against the base, same ODE seeds (measured
    gains on this machine: +0.031 and +0.044)."""
    trainer = toy_trainer(tmp_path, loss_type, 1e-2, 8)
    before = trainer.evaluate()["eval_reward"]
    trainer.train()
    after = trainer.evaluate()["eval_reward"]
    print(f"{loss_type}: held-out proxy {before:.4f} -> {after:.4f}")
    assert after > before + 0.02, (before, after)
