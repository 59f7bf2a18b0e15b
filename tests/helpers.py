"""Small shared builders for trainer tests."""

import contextlib
import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from peft import LoraConfig

from trl_guard import GuardConfig, GuardGRPODiffusionTrainer


def tiny_config(output_dir, **overrides) -> GuardConfig:
    kwargs = dict(
        output_dir=str(output_dir),
        num_generations=4,
        per_device_train_batch_size=8,
        steps_per_generation=2,
        gradient_accumulation_steps=1,
        max_steps=2,
        height=32,
        width=32,
        max_sequence_length=16,
        num_inference_steps=4,
        guidance_scale=1.0,
        learning_rate=1e-1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    kwargs.update(overrides)
    return GuardConfig(**kwargs)


def lora_config(**overrides) -> LoraConfig:
    kwargs = dict(
        r=8,
        lora_alpha=16,
        init_lora_weights="gaussian",
        target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_out"],
    )
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def make_trainer(
    model,
    reward_funcs,
    dataset,
    output_dir,
    peft_config="default",
    eval_dataset=None,
    gold_reward_funcs=None,
    **overrides,
):
    return GuardGRPODiffusionTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=tiny_config(output_dir, **overrides),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        peft_config=lora_config() if peft_config == "default" else peft_config,
        gold_reward_funcs=gold_reward_funcs,
    )


def resume_mid_round(
    new_pipeline: Callable[[], object], reward_funcs, dataset, tmp_path, **settings
) -> tuple[GuardGRPODiffusionTrainer, GuardGRPODiffusionTrainer]:
    """Train a run into `tmp_path / "full"`, saving every step, then a second trainer on its own folder resumed from
    its `checkpoint-3`, and check that both end on the same LoRA weights (atol 1e-6). With 4 steps in rounds of 2,
    step 3 is the middle of the second round: the resumed run must replay the rollout buffer saved there, not sample
    the round again with updated weights. `new_pipeline()` gives each trainer a fresh pipeline (or a path);
    `settings` go to `make_trainer` and override the defaults below. Returns `(full, resumed)` for further checks."""
    import torch

    settings = dict(max_steps=4, save_strategy="steps", save_steps=1, steps_per_generation=2) | settings
    full = make_trainer(new_pipeline(), reward_funcs, dataset, tmp_path / "full", **settings)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "rollout_buffer_0.safetensors").exists()
    resumed = make_trainer(new_pipeline(), reward_funcs, dataset, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert full.state.global_step == resumed.state.global_step == settings["max_steps"]
    final_full, final_resumed = full.adapter.lora_state_dict(), resumed.adapter.lora_state_dict()
    assert final_full.keys() == final_resumed.keys()
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=0, atol=1e-6)
    return full, resumed


def train_on_policy(trainer) -> None:
    """Train `trainer` and check what each family's "every algorithm family trains it" test checks: the LoRA moved,
    every loss is finite, and the first pass was exactly on-policy (NFT's old copy is the policy, an SDE-ratio loss's
    log-ratios are all 0)."""
    import numpy as np
    import torch

    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    trainer.train()
    after = trainer.adapter.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(np.isfinite(logged(trainer, "loss")))
    if trainer.args.loss_type == "nft":
        assert logged(trainer, "old_deviation")[0] == 0.0
    else:
        assert all(v == 0.0 for v in logged(trainer, "log_ratio_mean"))


def denoiser_kwargs(adapter, transformer, condition: dict) -> tuple:
    """The keyword arguments `transformer` receives in one `adapter.forward` on "a cat" with the `condition` tensors
    (an image-to-video family's first-frame states) added to the prompt's, and the noise that forward was given."""
    import torch

    from trl_guard.adapters import PromptEmbeddings

    seen = []
    hook = transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    text = adapter.encode_prompts(["a cat"])
    noise = torch.randn(1, *adapter.latent_shape())
    adapter.forward(transformer, noise, torch.tensor([0.5]), PromptEmbeddings({**text.tensors, **condition}))
    hook.remove()
    (kwargs,) = seen
    return kwargs, noise


def logged(trainer, key):
    """Every logged value of `key`, in order."""
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def guided_and_branches(adapter, prompts, negative_prompt):
    """For a configured adapter with CFG on: the guided velocity of `prompts`, each branch's velocity computed on its
    own, and the batch sizes the denoiser saw during the guided call."""
    import torch

    prompt, negative = adapter.encode_prompts(prompts), adapter.encode_prompts([negative_prompt])
    latents = torch.randn(len(prompts), *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    sigma = torch.full((len(prompts),), 0.6)
    batch_sizes = []
    hook = adapter.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        try:
            guided = adapter.predict_velocity(latents, sigma, prompt, negative)
        finally:
            hook.remove()
        cond = adapter.forward(adapter.denoiser, latents, sigma, prompt)
        uncond = adapter.forward(adapter.denoiser, latents, sigma, negative.expand(len(prompts)))
    return guided, cond, uncond, batch_sizes


# ---- multi-process runs of the CLI (test_distributed.py, test_fsdp2.py) ----------------------------------------
RECIPE = """
model_name_or_path: {pipeline}
model_init_kwargs: {{"text_encoder_3": null, "tokenizer_3": null}}
dataset_name: {prompts}
reward_funcs: [tests_rewards.blueness]
use_peft: true
lora_r: 8
lora_alpha: 16
lora_dropout: 0.0
lora_target_modules: [attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, proj_out]
num_generations: 4
steps_per_generation: 1
max_steps: 3
optim: sgd
learning_rate: 0.5
height: 32
width: 32
num_inference_steps: 4
max_sequence_length: 16
guidance_scale: 1.0
save_strategy: steps
save_steps: 3
report_to: none
disable_tqdm: true
"""

REWARD = """
import numpy as np

def blueness(prompts, images, **kwargs):
    return [float(np.asarray(image, dtype=np.float32)[..., 2].mean() / 255) for image in images]
"""


def launch(command, cwd, env=None):
    """Run `command` in `cwd` on the CPU (one thread per process), as `accelerate launch` runs it there."""
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": str(cwd),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "ACCELERATE_USE_CPU": "true",
    }
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def one_process(args, cwd):
    """Run `python -m trl_guard.scripts.grpo ARGS` in `cwd` with one thread, as `launch` would, but in this process:
    the one-process reference of a distributed test, without a new interpreter's imports (about 4.5 of the 5.5 s a
    tiny run takes here). Modules the test wrote into `cwd` (reward functions) are imported afresh and forgotten
    after, so the next test's files of the same name are the ones it reads."""
    import sys

    import torch

    from trl_guard.scripts.grpo import main

    def forget_modules_of_cwd():
        for name in [p.stem for p in Path(cwd).glob("*.py")]:
            sys.modules.pop(name, None)

    threads, here = torch.get_num_threads(), os.getcwd()
    cpu_only = {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}  # as `launch` runs the other side
    environment = {name: os.environ.get(name) for name in cpu_only}
    forget_modules_of_cwd()
    sys.path.insert(0, str(cwd))
    os.chdir(cwd)
    os.environ.update(cpu_only)
    torch.set_num_threads(1)
    try:
        main([str(arg) for arg in args])
    finally:
        torch.set_num_threads(threads)
        for name, value in environment.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
        os.chdir(here)
        sys.path.remove(str(cwd))
        forget_modules_of_cwd()


@contextlib.contextmanager
def loopback_server(handler):
    """An HTTP server on a free 127.0.0.1 port, serving `handler` (a `BaseHTTPRequestHandler` class) from a thread:
    yields its `http://127.0.0.1:PORT` and shuts it down after."""
    from http.server import ThreadingHTTPServer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def random_image(seed: int, width: int = 32, height: int = 32):
    """A `height` x `width` RGB image of uniform noise drawn from `seed`: a first frame or an edit's source."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_first_frame_jsonl(folder, prompts: list[str]):
    """Flow-Factory's image-to-video layout in `folder`: `train.jsonl`, one row per prompt with the path of its first
    frame (`images/<i>.png`, `random_image(i)`) relative to the file. Returns the file's path."""
    from pathlib import Path

    folder = Path(folder)
    (folder / "images").mkdir(parents=True)
    with open(folder / "train.jsonl", "w") as f:
        for i, prompt in enumerate(prompts):
            random_image(i).save(folder / "images" / f"{i}.png")
            f.write(json.dumps({"prompt": prompt, "image": f"images/{i}.png"}) + "\n")
    return folder / "train.jsonl"
