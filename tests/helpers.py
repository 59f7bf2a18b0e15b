"""Small shared builders for trainer tests."""

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
