"""Our SD3.5-M and FLUX.1 Kontext recipes against the official configs they claim to reproduce.

Every value below was read from the official code and is recorded here with the file and config function it comes
from: Flow-GRPO and GRPO-Guard from zhtmike/flow_grpo at commit 9745241 (MIT; the merge of GRPO-Guard, PR #175);
DiffusionNFT from NVlabs/DiffusionNFT at commit 24af5554898d85e93efa492f42b5e9cdf4156e9b; Advantage Weighted Matching
from scxue/advantage_weighted_matching at commit be5137232e33a21b449ed65a533211d0deb97ed8. A field of our recipe that
has an official counterpart must equal it; the settings that differ on purpose are listed in docs/fidelity.md.
"""

import dataclasses
from pathlib import Path

import pytest
import yaml
from trl import ModelConfig, TrlParser

from trl_guard import GuardConfig
from trl_guard.scripts.grpo import GuardScriptArguments

RECIPES = Path(__file__).parents[1] / "examples" / "recipes"

# config/base.py get_config(); scripts/train_sd3.py and train_sd3_GRPO_Guard.py for the LoRA, the EMA wrapper and the
# text-embedding length. Our names on the left.
COMMON = {
    "model_name_or_path": "stabilityai/stable-diffusion-3.5-medium",  # pretrained.model in each config function
    "num_inference_steps": 10,  # sample.num_steps
    "eval_num_inference_steps": 40,  # sample.eval_num_steps
    "guidance_scale": 4.5,  # sample.guidance_scale
    "height": 512,  # resolution
    "width": 512,
    "num_generations": 24,  # sample.num_image_per_prompt
    "noise_level": 0.7,  # base: sample.noise_level
    "noise_schedule": "flow_grpo",  # sample.sde_type = "sde" (the default of sde_step_with_logprob)
    "timestep_fraction": 0.99,  # train.timestep_fraction
    "timestep_selection": "first",  # train_timesteps = range(num_train_timesteps) in the training loop
    "init_same_noise": False,  # sample.same_latent
    "ema_decay": 0.9,  # train.ema = True; EMAModuleWrapper(decay=0.9, update_step_interval=8)
    "ema_update_interval": 8,
    "adam_beta1": 0.9,  # base: train.adam_beta1
    "adam_beta2": 0.999,  # base: train.adam_beta2
    "weight_decay": 1e-4,  # base: train.adam_weight_decay
    "adam_epsilon": 1e-8,  # base: train.adam_epsilon
    "max_grad_norm": 1.0,  # base: train.max_grad_norm
    "lr_scheduler_type": "constant",  # the optimizer is built without a scheduler
    "warmup_steps": 0,
    "adv_clip_max": 5.0,  # base: train.adv_clip_max
    "max_sequence_length": 128,  # compute_text_embeddings(..., max_sequence_length=128)
    "negative_prompt": "",  # the negative embeddings are those of ""
    "lora_r": 32,  # LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian")
    "lora_alpha": 64,
    "lora_dropout": 0.0,  # not set there: peft's default, 0.0
}

OFFICIAL = {
    # config/grpo.py general_ocr_sd3()
    "sd35m_ocr_flow_grpo.yaml": {
        "loss_type": "flow_grpo",
        "learning_rate": 3e-4,  # base: train.learning_rate
        "epsilon": 1e-4,  # base: train.clip_range
        "beta": 0.04,  # train.beta
        "kl_type": "flow_grpo",  # kl_loss = MEAN((mean - ref_mean)**2) / (2 std_dev_t**2)
        "scale_rewards": "batch",  # sample.global_std = True
    },
    # config/grpo.py pickscore_sd3()
    "sd35m_pickscore_flow_grpo.yaml": {
        "loss_type": "flow_grpo",
        "learning_rate": 3e-4,
        "epsilon": 1e-4,
        "beta": 0.01,
        "kl_type": "flow_grpo",
        "scale_rewards": "batch",
    },
    # config/grpo.py geneval_sd3()
    "sd35m_geneval_flow_grpo.yaml": {
        "loss_type": "flow_grpo",
        "learning_rate": 3e-4,
        "epsilon": 1e-4,
        "beta": 0.04,
        "kl_type": "flow_grpo",
        "scale_rewards": "batch",
    },
    # config/grpo_guard.py general_ocr_sd3_rationorm()
    "sd35m_ocr_guard.yaml": {
        "loss_type": "grpo_guard",  # rationorm = True: RatioNorm and the 1/(-dt) weight
        "learning_rate": 1e-4,
        "epsilon": 2e-6,  # train.clip_range
        "beta": 0.0,
        "scale_rewards": "group",  # sample.global_std = False
    },
    # config/grpo_guard.py pickscore_hps_sd3_ratio_norm()
    "sd35m_pickscore_guard.yaml": {
        "loss_type": "grpo_guard",
        "learning_rate": 1e-4,
        "epsilon": 4e-6,
        "beta": 0.0,
        "scale_rewards": "group",
    },
    # config/grpo_guard.py geneval_sd3_rationorm()
    "sd35m_geneval_guard.yaml": {
        "loss_type": "grpo_guard",
        "learning_rate": 1e-4,
        "epsilon": 2e-6,
        "beta": 0.0,
        "scale_rewards": "group",
    },
}

# Each round: 48 prompt groups of 24 images (num_batches_per_epoch x train_batch_size x GPUs / 24 = 48), and two
# optimizer steps (gradient_accumulation_steps = num_batches_per_epoch // 2). Our recipes lay it out for 8 GPUs.
GROUPS_PER_ROUND, GPUS = 48, 8

# DiffusionNFT (NVlabs/DiffusionNFT 24af555: config/base.py get_config(), config/nft.py _get_config() and the sd3_*
# functions, scripts/train_nft_sd3.py) and AWM (scxue/advantage_weighted_matching be51372, under
# advantage_weighted_matching/: config/base_awm.py get_config(), config/dgx_awm.py, scripts/train_sd3_awm.py). What the
# two share; our names on the left.
FORWARD_COMMON = {
    "model_name_or_path": "stabilityai/stable-diffusion-3.5-medium",  # pretrained.model in each config function
    "eval_num_inference_steps": 40,  # sample.eval_num_steps
    "guidance_scale": 1.0,  # sample.guidance_scale = 1.0: no CFG in rollout, training or evaluation
    "height": 512,  # resolution
    "width": 512,
    "num_generations": 24,  # sample.num_image_per_prompt
    "max_sequence_length": 128,  # compute_text_embeddings(..., max_sequence_length=128) in both scripts
    "negative_prompt": "",  # the negative embeddings are those of "" (unused without CFG)
    "learning_rate": 3e-4,  # NFT base.py train.learning_rate; AWM dgx_awm.py train.learning_rate
    "adam_beta1": 0.9,  # base: train.adam_beta1
    "adam_beta2": 0.999,  # base: train.adam_beta2
    "weight_decay": 1e-4,  # base: train.adam_weight_decay
    "adam_epsilon": 1e-8,  # base: train.adam_epsilon
    "max_grad_norm": 1.0,  # base: train.max_grad_norm
    # NFT: AdamW without a scheduler; AWM: CosineAnnealingLR(T_max=train.decay_steps=1e10), constant in practice
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "adv_clip_max": 5.0,  # base: train.adv_clip_max
    "scale_rewards": "batch",  # sample.global_std = True (PerPromptStatTracker(global_std))
    "num_iterations": 1,  # train.num_inner_epochs = 1
    "seed": 42,  # base: seed
    "ema_update_interval": 1,  # EMAModuleWrapper(update_step_interval=1) / train.ema_update_step_interval = 1
    "lora_r": 32,  # LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", attention projections) in both
    "lora_alpha": 64,
    "lora_dropout": 0.0,  # not set there: peft's default, 0.0
    "lora_target_modules": None,  # ours: the SD3 adapter's default, the same 8 attention projections
    "reward_weights": None,  # reward_fn = {name: 1.0}: one reward, weight 1
}

# config/nft.py _get_config() (on config/base.py), shared by the three DiffusionNFT recipes
NFT_COMMON = {
    "loss_type": "nft",  # scripts/train_nft_sd3.py
    "num_inference_steps": 10,  # sample.num_steps = 10 (sample.solver = "dpm2" there, the Euler ODE here)
    "timestep_fraction": 0.99,  # base.py train.timestep_fraction; int(10 x 0.99) = 9 levels per sample
    "beta": 1e-4,  # train.beta = 0.0001: loss += train.beta x MEAN((v - v_ref)**2)
    "epsilon": None,  # NFT has no ratio to clip
    "per_device_train_batch_size": 9,  # bsz = 9: sample.train_batch_size = train.batch_size
    "ema_decay": 0.9,  # base.py train.ema = True; EMAModuleWrapper(decay=0.9, update_step_interval=1)
    "eval_on_start": True,  # train_nft_sd3.py evaluates when epoch % eval_freq == 0, epoch 0 included
    "eval_strategy": "steps",
}

FORWARD_OFFICIAL = {
    # config/nft.py sd3_geneval(): gradient_step_per_epoch=1
    "sd35m_geneval_nft.yaml": {
        **NFT_COMMON,
        "nft_beta": 1.0,  # _get_config: config.beta = 1.0
        "lagged_decay_schedule": "nft",  # _get_config: decay_type = 1
        "eval_steps": 10,  # base.py eval_freq = 10 rounds of one optimizer step
        "save_steps": 30,  # base.py save_freq = 30 rounds
        "per_device_eval_batch_size": 14,  # _get_config: sample.test_batch_size = 14 for geneval
        "reward_funcs": ["http://127.0.0.1:18085/geneval"],  # reward_fn = {"geneval": 1.0}
        "dataset_name": "geneval_train.jsonl",  # dataset/geneval/train_metadata.jsonl
        "eval_dataset_name": "geneval_test.jsonl",  # dataset/geneval/test_metadata.jsonl
    },
    # config/nft.py sd3_ocr(): gradient_step_per_epoch=2
    "sd35m_ocr_nft.yaml": {
        **NFT_COMMON,
        "nft_beta": 0.1,  # sd3_ocr: config.beta = 0.1
        "lagged_decay_schedule": "nft_ocr",  # sd3_ocr: decay_type = 2
        "eval_steps": 20,  # eval_freq = 10 rounds of two optimizer steps
        "save_steps": 60,  # save_freq = 30 rounds
        "per_device_eval_batch_size": 16,  # sample.test_batch_size = 16
        "reward_funcs": ["ocr"],  # reward_fn = {"ocr": 1.0}
        "dataset_name": "ocr_train.txt",  # dataset/ocr/train.txt
        "eval_dataset_name": "ocr_test.txt",  # dataset/ocr/test.txt
    },
    # config/nft.py sd3_pickscore(): gradient_step_per_epoch=1
    "sd35m_pickscore_nft.yaml": {
        **NFT_COMMON,
        "nft_beta": 1.0,
        "lagged_decay_schedule": "nft",
        "eval_steps": 10,
        "save_steps": 30,
        "per_device_eval_batch_size": 16,
        "reward_funcs": ["pickscore"],  # reward_fn = {"pickscore": 1.0}
        "dataset_name": "pickscore_train.txt",  # dataset/pickscore/train.txt
        "eval_dataset_name": "pickscore_test.txt",  # dataset/pickscore/test.txt
    },
    # config/dgx_awm.py pickscore_sd3_no_cfg_1node() (on compressibility() and config/base_awm.py)
    "sd35m_pickscore_awm.yaml": {
        "loss_type": "awm",  # scripts/train_sd3_awm.py, train.loss_type = 'exp_first'
        "num_inference_steps": 14,  # sample.num_steps = 14 (train.use_sa_solver = True there, the Euler ODE here)
        "epsilon": 1.0,  # train.clip_range = 1
        "beta": 1e-4,  # train.beta = 0.0001, train.kl_weight = 'Uniform'
        "awm_weighting": "ghuber",  # train.weighting
        "awm_ghuber_power": 0.25,  # train.ghuber_power
        "awm_lagged_weight": 1.0,  # train.ema_beta = 1, train.kl_ema_weight = 'Uniform'
        "lagged_decay_schedule": "awm",  # train.kl_ema_decay_type = 'linear', train.kl_ema_decay = 0.3
        "per_device_train_batch_size": 2,  # train.batch_size = 2
        "ema_decay": 0.99,  # train.ema = True, train.ema_decay = 0.99
        "eval_on_start": False,  # train_sd3_awm.py evaluates only when epoch > 0
        "eval_strategy": "steps",
        "eval_steps": 50,  # eval_freq = 50 rounds of one optimizer step
        "save_steps": 50,  # save_freq = 50 rounds
        "per_device_eval_batch_size": 6,  # sample.test_batch_size = 6
        "reward_funcs": ["pickscore"],  # reward_fn = {"pickscore": 1}
        "dataset_name": "pickscore_train.txt",  # dataset/pickscore/train.txt
        "eval_dataset_name": "pickscore_test.txt",  # dataset/pickscore/test.txt
    },
}

# Flow-DPPO: Tencent-Hunyuan/UniRL at commit 1a7b501e8fe8517b432a130220d2ff462f9b5afa (read again at b67c1766),
# examples/diffusion/sd3_flowdppo.yaml and unirl/algorithms/flowdppo.py; our names on the left.
DPPO_OFFICIAL = {
    "sd35m_pickscore_flow_dppo.yaml": {
        "model_name_or_path": "stabilityai/stable-diffusion-3.5-medium",  # bundle.config.pretrained_model_ckpt_path
        "loss_type": "flow_dppo",  # algorithm._target_: unirl.algorithms.flowdppo.FlowDPPO
        "dppo_kl_threshold": 1e-5,  # algorithm.kl_mask_threshold
        "dppo_kl_normalize": True,  # algorithm.add_kl_coefficient
        "epsilon": None,  # no clip_range: the KL mask replaces it
        "beta": 0.0,  # no KL to the reference (FlowDPPOConfig.beta = 0.0)
        "recompute_old_means": True,  # FlowDPPO.prepare_segment replays the old means before the first update
        "num_inference_steps": 10,  # sampling.num_inference_steps
        "guidance_scale": 1.0,  # sampling.guidance_scale
        "height": 512,  # sampling.height
        "width": 512,  # sampling.width
        "num_generations": 16,  # sampling.samples_per_prompt
        "noise_level": 0.7,  # sampling.eta
        "noise_schedule": "flow_grpo",  # pipeline.strategy: unirl.sde.kernels.FlowSDEStrategy (Flow-GRPO's SDE)
        "init_same_noise": False,  # sampling.init_same_noise
        # sampling.scheduler: AllSDEScheduler(timestep_fraction=[0.0, 0.5], num_sde_steps=3): 3 SDE steps of 0-4 per
        # round; ours the nearest, a window of 3 adjacent steps in [0, 5) (docs/fidelity.md D2)
        "sde_window_size": 3,
        "sde_window_range": [0, 5],
        "sde_window_schedule": "random",
        "scale_rewards": "batch",  # adv_use_global_std: true
        "adv_clip_max": 1000.0,  # no advantage clip: a bound |A| <= sqrt(768) never reaches
        "per_device_train_batch_size": 8,  # stack.micro_batch_size
        "per_device_sample_batch_size": 8,  # rollout.forward_batch_size
        "learning_rate": 3e-4,  # backend.optimizer_cfg.learning_rate
        "adam_beta1": 0.9,  # optimizer_cfg.adam_beta1
        "adam_beta2": 0.999,  # optimizer_cfg.adam_beta2
        "adam_epsilon": 1e-8,  # optimizer_cfg.adam_epsilon
        "weight_decay": 0.0,  # optimizer_cfg.weight_decay
        "max_grad_norm": 1.0,  # stack.max_grad_norm
        "lr_scheduler_type": "constant",  # scheduler_cfg.type
        "warmup_steps": 0,  # scheduler_cfg.warmup_steps
        "seed": 42,  # data_source run.seed, sampling.seed
        "ema_decay": 0.0,  # no EMA in the v2 recipe
        "activation_checkpointing": False,  # fsdp_cfg.activation_checkpointing
        "lora_r": 32,  # backend.lora_cfg.rank
        "lora_alpha": 64,  # lora_cfg.alpha
        "lora_dropout": 0.0,  # lora_cfg.dropout
        "lora_target_modules": [
            "attn.add_k_proj",
            "attn.add_q_proj",
            "attn.add_v_proj",
            "attn.to_add_out",
            "attn.to_k",
            "attn.to_out.0",
            "attn.to_q",
            "attn.to_v",
        ],  # lora_cfg.target_modules
        "reward_funcs": ["pickscore"],  # reward.backend: PickScoreRewardScorer (yuvalkirstain/PickScore_v1)
        "dataset_name": "pickscore_train.txt",  # data_source run.data_path: datasets/pickscore/train.txt
        "eval_dataset_name": "pickscore_test.txt",  # run.eval_data_path: datasets/pickscore/test.txt
    },
}

# Online Diffusion-DPO: yifan123/flow_grpo at commit ac4c86e4cae021841f1fde853d340e0db67690dd, config/dpo.py
# geneval_sd3() (on compressibility() and config/base.py get_config()), scripts/train_sd3_dpo.py and
# scripts/single_node/dpo.sh (--num_processes=1); our names on the left. (pickscore_sd3 sets
# train.gradient_accumulation_steps = 1 // 2 = 0 and cannot run as written: no recipe.)
DPO_OFFICIAL = {
    "sd35m_geneval_dpo.yaml": {
        # the same base.py, EMA wrapper, text embeddings and LoRA as Flow-GRPO's (train_sd3_dpo.py: r 32, alpha 64)
        **{key: value for key, value in COMMON.items() if key not in ("num_inference_steps", "timestep_selection")},
        "loss_type": "dpo",  # train.algorithm = 'dpo'
        "num_inference_steps": 40,  # sample.num_steps = 40 (the reference's SDE rollout)
        "dpo_beta": 100.0,  # train.beta = 100
        "dpo_ref_update_steps": None,  # train.ref_update_step = 10000000: never, the frozen base
        "noise_schedule": "flow_grpo",  # pipeline_with_logprob's SDE, noise_level from base.py (0.7)
        "epsilon": None,  # no ratio
        "beta": 0.0,  # no penalty besides DPO's own reference term
        "per_device_train_batch_size": 24,  # sample.train_batch_size = train.batch_size = 24
        "num_iterations": 1,  # train.num_inner_epochs = 1
        "learning_rate": 3e-4,  # base.py train.learning_rate
        "seed": 42,  # base.py seed
        "eval_steps": 40,  # eval_freq = 40 rounds of one optimizer step
        "save_steps": 40,  # save_freq = 40
        "per_device_eval_batch_size": 14,  # sample.test_batch_size = 14
        "lora_target_modules": None,  # ours: the SD3 adapter's default, the same 8 attention projections
        "reward_funcs": ["http://127.0.0.1:18085/geneval"],  # reward_fn = {"geneval": 1.0}
        "reward_weights": None,  # one reward, weight 1
        "dataset_name": "geneval_train.jsonl",  # dataset/geneval/train_metadata.jsonl
        "eval_dataset_name": "geneval_test.jsonl",  # dataset/geneval/test_metadata.jsonl
    },
}

# DGPO: Luo-Yihong/DGPO at commit 01ceb4b83c0bbc55d96246fe1b6d9a3d4749ebd6, config/dgpo.py general_ocr_sd3_4gpu() (on
# compressibility() and config/base.py get_config()), scripts/train_sd3_dgpo.py and scripts/single_node/sd3_dgpo_ocr.sh
# (--num_processes=4); our names on the left.
DGPO_OFFICIAL = {
    "sd35m_ocr_dgpo.yaml": {
        # the same base.py, eval EMA (train.ema: 0.9 every 8 steps) and text embeddings as Flow-GRPO's
        **{
            key: value
            for key, value in COMMON.items()
            if key not in ("eval_num_inference_steps", "num_generations", "noise_level", "noise_schedule")
            and key not in ("timestep_fraction", "timestep_selection", "lora_r", "lora_alpha")
        },
        "loss_type": "dgpo",  # scripts/train_sd3_dgpo.py
        "eval_num_inference_steps": 14,  # sample.eval_num_steps = 14
        "num_generations": 16,  # sample.num_image_per_prompt = 16
        "per_device_train_batch_size": 16,  # sample.train_batch_size = train.batch_size = 16
        "dgpo_beta": 100.0,  # train.beta_dpo = 100
        "beta": 0.02,  # train.beta = 0.02 (velocity MSE to the LoRA-off model)
        "epsilon": 1e-2,  # clip_range = 1e-2
        "dgpo_num_train_timesteps": 4,  # compressibility: num_train_timesteps = 4
        "dgpo_max_train_step": 6,  # compressibility: trunc_steps = 6
        "dgpo_shared_noise": True,  # compressibility: use_shared_noise = True
        "dgpo_clip_dsm": True,  # compressibility: clip_dsm = True
        "dgpo_clip_kl": False,  # compressibility: clip_kl = False
        "dgpo_lagged_reference": False,  # base.py: use_ema_ref = False
        "dgpo_lagged_sampling_after": 200,  # compressibility: switch_ema_ref = 200
        "timestep_fraction": 1.0,  # unread (train.timestep_fraction = 0.99 is unused there too)
        "scale_rewards": "batch",  # sample.global_std = True
        "num_iterations": 1,  # train.num_inner_epochs = 1
        "learning_rate": 3e-4,  # base.py train.learning_rate
        "seed": 42,  # base.py seed
        "lora_r": 64,  # train_sd3_dgpo.py: LoraConfig(r=64, lora_alpha=128, init_lora_weights="gaussian")
        "lora_alpha": 128,
        "lora_target_modules": None,  # ours: the SD3 adapter's default, the same 8 attention projections
        "eval_strategy": "steps",
        "eval_steps": 60,  # eval_freq = 60 rounds of one optimizer step
        "save_steps": 60,  # save_freq = 60
        "eval_on_start": False,  # train_sd3_dgpo.py evaluates only when epoch > 0
        "per_device_eval_batch_size": 16,  # sample.test_batch_size = 16
        "reward_funcs": ["ocr"],  # reward_fn = {"ocr": 1.0}
        "reward_weights": None,  # one reward, weight 1
        "dataset_name": "ocr_train.txt",  # dataset/ocr/train.txt
        "eval_dataset_name": "ocr_test.txt",  # dataset/ocr/test.txt
    },
}

# GARDO on Flow-GRPO: tinnerhrhe/GARDO at commit 1cc77fb341a8f84013cbb51e7685805acbef3425, config/gardo.py
# general_ocr_sd3() (on compressibility() and config/base.py get_config()) and scripts/train_sd3_grpo_gardo.py; our
# names on the left. The same base.py, EMA wrapper, text embeddings and LoRA as Flow-GRPO's.
GARDO_OFFICIAL = {
    "sd35m_ocr_gardo.yaml": {
        **COMMON,
        "loss_type": "gardo",  # train.algorithm = 'gardo'
        "timestep_fraction": 0.89,  # train.timestep_fraction = 0.89
        "learning_rate": 3e-4,  # base.py train.learning_rate
        "epsilon": 1e-4,  # base.py train.clip_range (clip_range_low/high are set but not read by the script)
        "beta": 0.04,  # train.beta = 0.04
        "kl_type": "flow_grpo",  # kl_loss = MEAN((mean - ref_mean)**2) / (2 std_dev_t**2) over the gated samples
        "scale_rewards": "group",  # unread: type='gardo' divides by no std (sample.global_std = True is unused)
        "gardo_aux_rewards": ["aesthetic", "image_reward"],  # the ranks of 'aesthetic' and 'imagereward'
        "gardo_gate_fraction": 0.1,  # RiskCompensator(base=0.1)
        "gardo_reset_kl_threshold": 3e-4,  # compressibility: kl_thres = 3e-4
        "gardo_reset_interval": 15,  # compressibility: reset_freq = 15
        "gardo_diversity": True,  # PerPromptStatTracker.update(..., type='gardo') with DINOv3 features
        "gardo_feature_model": "facebook/dinov3-vitl16-pretrain-lvd1689m",  # timm vit_large_patch16_dinov3.lvd1689m
        "reward_funcs": ["ocr", "aesthetic", "image_reward"],  # reward_fn: ocr, aesthetic, imagereward
        "reward_weights": [1.0, 0.1, 0.1],  # the main reward trains unweighted: rewards[config.main_reward]
        "num_iterations": 1,  # train.num_inner_epochs = 1
        "seed": 42,  # base.py seed
        "eval_steps": 120,  # eval_freq = 60 rounds of two optimizer steps
        "save_steps": 120,  # save_freq = 60
        "eval_on_start": False,  # evaluates only when epoch != 0
        "per_device_eval_batch_size": 16,  # sample.test_batch_size = 16
        "lora_target_modules": None,  # ours: the SD3 adapter's default, the same 8 attention projections
        "dataset_name": "ocr_train.txt",  # dataset/ocr/train.txt
        "eval_dataset_name": "ocr_test.txt",  # dataset/ocr/test.txt
    },
}

# Prompt groups of 24 images and optimizer steps per round, on 8 GPUs. NFT: num_groups = 48, num_batches_per_epoch =
# 48 x 24 // (8 x 9) = 16 and gradient_accumulation_steps = 16 // gradient_step_per_epoch. AWM: sample.train_batch_size
# 6 x num_batches_per_epoch 12 x 8 GPUs = 576 images = 24 groups, gradient_accumulation_steps = 6 // 2 x 12 = 36 = all
# of the round's micro-batches (train.num_batches_per_epoch).
ROUNDS = {
    **{name: (GROUPS_PER_ROUND, 2) for name in OFFICIAL},
    "sd35m_geneval_nft.yaml": (48, 1),
    "sd35m_ocr_nft.yaml": (48, 2),
    "sd35m_pickscore_nft.yaml": (48, 1),
    "sd35m_pickscore_awm.yaml": (24, 1),
    "sd35m_pickscore_flow_dppo.yaml": (48, 2),  # batch_size 48 prompts; stack.num_updates_per_batch 2
    "sd35m_geneval_dpo.yaml": (1, 1),  # one prompt x 24 images, one optimizer step, on the one GPU of dpo.sh
    "sd35m_ocr_dgpo.yaml": (8, 1),  # num_groups = 8 of 16 images; gradient_accumulation = num_batches_per_epoch
    "sd35m_ocr_gardo.yaml": (48, 2),  # 8 GPUs x 9 x num_batches_per_epoch 16 = 48 x 24; gradient_accumulation 16 // 2
}

#: Recipes laid out for another number of processes than GPUS (the official's own launch).
PROCESSES = {"sd35m_geneval_dpo.yaml": 1, "sd35m_ocr_dgpo.yaml": 4}

EXPECTED = {
    **{name: {**COMMON, **values} for name, values in OFFICIAL.items()},
    **{name: {**FORWARD_COMMON, **values} for name, values in FORWARD_OFFICIAL.items()},
    **DPPO_OFFICIAL,
    **DPO_OFFICIAL,
    **DGPO_OFFICIAL,
    **GARDO_OFFICIAL,
}

# Noise levels trained per sample and round. NFT: num_train_timesteps = int(sample.num_steps x train.timestep_fraction)
# = 9 of a per-sample permutation of the 10 grid levels (train_nft_sd3.py). AWM: train.train_timesteps = 6, one from
# each of 6 strata of grid levels 0-11 (time_type = 'discrete'); ours draws 6 of the 14 levels (docs/fidelity.md).
TRAINED_LEVELS = {
    "sd35m_geneval_nft.yaml": 9,
    "sd35m_ocr_nft.yaml": 9,
    "sd35m_pickscore_nft.yaml": 9,
    "sd35m_pickscore_awm.yaml": 6,
}


def parse(recipe: Path):
    parser = TrlParser((GuardScriptArguments, GuardConfig, ModelConfig))
    # bf16 needs the GPU the recipes are written for (the official uses fp16; docs/fidelity.md says why we do not)
    return parser.parse_args_and_config(["--config", str(recipe), "--bf16", "false"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_matches_the_official_config(name):
    script_args, config, model_args = parse(RECIPES / name)
    values = {**vars(script_args), **vars(config), **vars(model_args)}
    expected = EXPECTED[name]
    mismatched = {key: (values[key], want) for key, want in expected.items() if values[key] != want}
    assert not mismatched, f"{name}: (ours, official) = {mismatched}"
    groups, optimizer_steps = ROUNDS[name]
    round_images = config.per_device_train_batch_size * PROCESSES.get(name, GPUS) * config.steps_per_generation
    assert round_images == groups * config.num_generations
    assert config.steps_per_generation // config.gradient_accumulation_steps == optimizer_steps
    assert config.steps_per_generation % config.gradient_accumulation_steps == 0
    assert model_args.use_peft


def test_every_sd35m_recipe_is_checked():
    assert {p.name for p in RECIPES.glob("sd35m_*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(FORWARD_OFFICIAL))
def test_forward_recipe_trains_the_official_number_of_noise_levels(name):
    _, config, _ = parse(RECIPES / name)
    # ForwardProcessAlgorithm.plan: max(1, int(num_inference_steps x timestep_fraction)) levels per sample
    assert max(1, int(config.num_inference_steps * config.timestep_fraction)) == TRAINED_LEVELS[name]


@pytest.mark.parametrize("name", sorted(FORWARD_OFFICIAL))
def test_forward_recipe_leaves_the_other_family_fields_out(name):
    _, config, _ = parse(RECIPES / name)
    written = set(yaml.safe_load((RECIPES / name).read_text()))
    from trl_guard.algorithms import ForwardProcessAlgorithm, SDERatioAlgorithm

    owned = set(ForwardProcessAlgorithm.config_fields)
    refused = set(SDERatioAlgorithm.config_fields) | (
        owned - set(ForwardProcessAlgorithm.fields_read(config.loss_type))
    )
    if config.loss_type == "nft":
        refused |= {"epsilon"}
    assert not written & refused, (
        f"{name} sets {sorted(written & refused)}, which loss_type={config.loss_type} refuses"
    )
    defaults = {f.name: f.default for f in dataclasses.fields(GuardConfig)}
    assert all(getattr(config, field) == defaults[field] for field in SDERatioAlgorithm.config_fields)


@pytest.mark.parametrize("name", sorted(FORWARD_OFFICIAL))
def test_forward_recipe_refuses_an_sde_family_field(name):
    parser = TrlParser((GuardScriptArguments, GuardConfig, ModelConfig))
    with pytest.raises(ValueError, match="does not read noise_schedule='cps'"):
        parser.parse_args_and_config(["--config", str(RECIPES / name), "--bf16", "false", "--noise_schedule", "cps"])


# config/grpo.py counting_flux_kontext() on top of config/base.py, and scripts/train_flux_kontext.py (LoRA, EMA, the
# 128-token prompts). The loss and epsilon are GRPO-Guard's (no official editing run of it), so they are not here.
KONTEXT_OFFICIAL = {
    "model_name_or_path": "black-forest-labs/FLUX.1-Kontext-dev",  # pretrained.model
    "num_inference_steps": 6,  # sample.num_steps
    "eval_num_inference_steps": 28,  # sample.eval_num_steps
    "guidance_scale": 2.5,  # sample.guidance_scale (the guidance embedding)
    "height": 512,  # resolution; the source images are resized to it as well
    "width": 512,
    "num_generations": 21,  # sample.num_image_per_prompt
    "noise_level": 0.9,  # sample.noise_level
    "noise_schedule": "flow_grpo",
    "timestep_fraction": 0.99,  # train.timestep_fraction
    "timestep_selection": "first",
    "init_same_noise": False,  # sample.same_latent
    "beta": 0.0,  # train.beta
    "scale_rewards": "batch",  # sample.global_std = True
    "ema_decay": 0.9,  # EMAModuleWrapper(decay=0.9, update_step_interval=8)
    "ema_update_interval": 8,
    "learning_rate": 3e-4,  # base: train.learning_rate
    "weight_decay": 1e-4,  # base: train.adam_weight_decay
    "lr_scheduler_type": "constant",
    "max_sequence_length": 128,  # compute_text_embeddings(..., max_sequence_length=128)
    "reward_weights": [0.5, 0.5],  # reward_fn = {"image_similarity": 0.5, "geneval": 0.5}
    "lora_r": 64,  # LoraConfig(r=64, lora_alpha=128, init_lora_weights="gaussian", target_modules=[...])
    "lora_alpha": 128,
    "lora_target_modules": [
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
    ],  # fmt: skip
}


def test_kontext_recipe_matches_the_official_counting_edit_config():
    script_args, config, model_args = parse(RECIPES / "flux_kontext_counting_edit_guard.yaml")
    values = {**vars(script_args), **vars(config), **vars(model_args)}
    mismatched = {k: (values[k], want) for k, want in KONTEXT_OFFICIAL.items() if values[k] != want}
    assert not mismatched, f"(ours, official) = {mismatched}"
    assert "image_similarity" in script_args.reward_funcs and any("geneval" in r for r in script_args.reward_funcs)
    # 48 groups of 21 per round (num_batches_per_epoch x train_batch_size x 28 GPUs / 21), two optimizer steps
    assert config.per_device_train_batch_size * GPUS * config.steps_per_generation == 48 * config.num_generations
    assert config.steps_per_generation // config.gradient_accumulation_steps == 2
