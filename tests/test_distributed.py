"""A recipe run with `accelerate launch` on two CPU processes (gloo) ends where the one-process run ends, for the
SDE family (GRPO-Guard) and the forward-process family (DiffusionNFT, AWM) alike.

The shipped examples/accelerate_configs/ddp_cpu.yaml makes `accelerate launch` start the torch.distributed
processes; with ACCELERATE_USE_CPU=true and no visible GPU, Accelerate runs them as MULTI_CPU over gloo. Optimizer
SGD, so that weight differences stay proportional to gradient differences (Adam's first step is a sign step and
would amplify float noise in near-zero gradients).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import launch, one_process
from safetensors.torch import load_file

# Settings a loss type needs (or its recipe uses) on the launch recipe's 4-step grid: DGPO trains 2 of its first 3
# noise levels.
LOSS_ARGS = {
    "dgpo": ["--dgpo_max_train_step", "2", "--dgpo_num_train_timesteps", "2"],
    # Flow-DPPO as its recipe runs: SDE steps in a window, old means recomputed before a round's first update
    "flow_dppo": ["--sde_window_size", "2", "--sde_window_range", "0", "3", "--recompute_old_means", "true"],
    # online DPO with the reference refreshed every step, so that later rounds are sampled by trained weights
    "dpo": ["--dpo_ref_update_steps", "1"],
    # GARDO with its gate and KL (a built-in second reward as the auxiliary one, weighted 0: the JPEG size moves in
    # whole bytes, so it stays out of the compared reward total) and a refresh threshold every step's KL exceeds;
    # without image features, which need a feature model (tests/test_gardo.py runs them on two processes)
    **{
        loss_type: [
            *("--reward_funcs", "tests_rewards.blueness", "jpeg_compressibility", "--reward_weights", "1", "0"),
            *("--gardo_aux_rewards", "jpeg_compressibility", "--beta", "0.1", "--gardo_diversity", "false"),
            *("--gardo_reset_kl_threshold", "1e-12"),
        ]
        for loss_type in ("gardo",)
    },
}
# The one-process run's own layout, where a loss reads the micro-batch's composition: GARDO's KL is a mean over each
# micro-batch's gated samples (as officially, per process), so one process matches two when its micro-batches are the
# two processes' (two of 8 per optimizer step, accumulated, instead of one of 16).
ONE_PROCESS_ARGS = {
    loss_type: [
        "--per_device_train_batch_size",
        "8",
        "--gradient_accumulation_steps",
        "2",
        "--steps_per_generation",
        "2",
    ]
    for loss_type in ("gardo",)
}


@pytest.mark.slow
# gardo_nft's two-process run is tests/test_gardo.py's, with image features
@pytest.mark.parametrize("loss_type", ["grpo_guard", "nft", "awm", "dgpo", "flow_dppo", "dpo", "gardo"])
def test_two_processes_match_one(launch_recipe, tmp_path, loss_type):
    one_process(
        [
            *("--config", launch_recipe, "--output_dir", "one", "--per_device_train_batch_size", "16"),
            *("--loss_type", loss_type, *LOSS_ARGS.get(loss_type, []), *ONE_PROCESS_ARGS.get(loss_type, [])),
        ],
        tmp_path,
    )
    launch(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(Path(__file__).parents[1] / "examples" / "accelerate_configs" / "ddp_cpu.yaml"),
            "-m",
            "trl_guard.scripts.grpo",
            "--config",
            str(launch_recipe),
            "--output_dir",
            "two",
            "--per_device_train_batch_size",
            "8",
            "--loss_type",
            loss_type,
            *LOSS_ARGS.get(loss_type, []),
        ],
        tmp_path,
    )

    def rewards(run):
        state = json.loads((tmp_path / run / "checkpoint-3" / "trainer_state.json").read_text())
        return [entry["reward"] for entry in state["log_history"] if "reward" in entry]

    assert len(rewards("one")) == 3 and rewards("two") == pytest.approx(rewards("one"), abs=1e-6)
    assert (tmp_path / "two" / "checkpoint-3" / "rng_state_1.pth").exists()  # really two processes
    lora_one = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    lora_two = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert lora_one.keys() == lora_two.keys()
    for key in lora_one:
        torch.testing.assert_close(lora_two[key], lora_one[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gradients_are_all_reduced_once_per_optimizer_step(launch_recipe, tmp_path):
    """One all-reduce per optimizer step under DDP, however many timesteps each step backpropagates."""
    launch(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(Path(__file__).parents[1] / "examples" / "accelerate_configs" / "ddp_cpu.yaml"),
            str(Path(__file__).parent / "ddp_count_cpu.py"),
            "--config",
            str(launch_recipe),
            "--output_dir",
            "two",
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "2",
            "--steps_per_generation",
            "2",
        ],
        tmp_path,
        env={"ALLREDUCE_COUNT": str(tmp_path / "allreduce")},
    )
    state = json.loads((tmp_path / "two" / "checkpoint-3" / "trainer_state.json").read_text())
    first_log = next(entry for entry in state["log_history"] if "reward" in entry)
    trained_timesteps = {key.split("/")[1] for key in first_log if key.startswith("timestep/")}
    assert state["global_step"] == 3 and len(trained_timesteps) >= 3
    # 3 optimizer steps x 2 micro-batches x >= 3 timesteps = >= 18 backward passes per process
    assert [int((tmp_path / f"allreduce.{rank}").read_text()) for rank in (0, 1)] == [3, 3]


def _run(launch_recipe, cwd, output_dir, processes, *args):
    """The recipe's CLI run, on one process (in this one) or under `accelerate launch` on two."""
    flags = ["--config", str(launch_recipe), "--output_dir", output_dir, *args]
    if processes == 1:
        one_process(flags, cwd)
        return
    config = str(Path(__file__).parents[1] / "examples" / "accelerate_configs" / "ddp_cpu.yaml")
    launch(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            config,
            "-m",
            "trl_guard.scripts.grpo",
            *flags,
        ],
        cwd,
    )


@pytest.mark.slow
def test_two_processes_log_the_whole_batch_diagnostics(launch_recipe, tmp_path):
    """The per-timestep diagnostics two processes log are those of their whole batch: what one process logs when it
    trains the same 16 samples in one micro-batch. Two passes per round, so that the second is off-policy and the
    log-ratios are not all 0."""
    common = ("--loss_type", "grpo_guard", "--num_iterations", "2", "--max_steps", "4", "--save_steps", "4")
    _run(launch_recipe, tmp_path, "one", 1, "--per_device_train_batch_size", "16", *common)
    _run(launch_recipe, tmp_path, "two", 2, "--per_device_train_batch_size", "8", *common)

    def diagnostics(run):
        state = json.loads((tmp_path / run / "checkpoint-4" / "trainer_state.json").read_text())
        stats = ("log_ratio_mean", "log_ratio_std", "raw_log_ratio_mean", "clip_frac_high", "clip_frac_low")
        return [
            {key: value for key, value in entry.items() if key.split("/")[-1] in stats}
            for entry in state["log_history"]
            if "log_ratio_mean" in entry
        ]

    one, two = diagnostics("one"), diagnostics("two")
    assert (tmp_path / "two" / "checkpoint-4" / "rng_state_1.pth").exists()  # really two processes
    assert len(one) == 4 and [entry.keys() for entry in two] == [entry.keys() for entry in one]
    off_policy = one[1]  # the second pass of the first round
    assert off_policy["log_ratio_std"] > 0 and off_policy["clip_frac_high"] + off_policy["clip_frac_low"] > 0
    for entry_two, entry_one in zip(two, one):
        assert entry_two == pytest.approx(entry_one, rel=1e-3, abs=1e-9)  # log-ratios are ~1e-5 here


REDUCE_METRICS = """
import json
from collections import defaultdict
from types import SimpleNamespace

import torch
from accelerate import Accelerator

from trl_guard.trainer import GuardGRPODiffusionTrainer

accelerator = Accelerator()
rank = accelerator.process_index
samples = torch.load("samples.pt")[rank]  # (micro-batches, samples): this process's log-ratios at timestep 0
stats = {
    "timestep/00/log_ratio_mean": list(samples.mean(dim=1)),
    "timestep/00/log_ratio_std": list(samples.std(dim=1, unbiased=False)),
    "log_ratio_mean": list(samples.mean(dim=1)),
    "log_ratio_std": list(samples.std(dim=1, unbiased=False)),
    "reward": [torch.tensor(0.25)],  # gathered before it is logged: the same on every process
}
if rank == 1:
    stats = dict(reversed(stats.items()))  # the same keys, held in another order
trainer = SimpleNamespace(accelerator=accelerator, _metrics={"train": defaultdict(list, stats), "eval": {}})
trainer._whole_batch = lambda series: GuardGRPODiffusionTrainer._whole_batch(trainer, series)
reduced = GuardGRPODiffusionTrainer._reduce_metrics(trainer, "train")
assert GuardGRPODiffusionTrainer._reduce_metrics(trainer, "eval") == {}  # empty everywhere: no collective left waiting
# statistics that differ between the processes (which the trainer never logs): each key averaged where it is held
odd = {"timestep/05/clip_frac_high": [0.5, 1.0]} if rank == 1 else {"only_here": [3.0], "reward": [0.25]}
trainer._metrics["train"] = defaultdict(list, odd)
fallback = GuardGRPODiffusionTrainer._reduce_metrics(trainer, "train")
with open(f"reduced.{rank}.json", "w") as f:
    json.dump([reduced, fallback], f)
accelerator.end_training()  # destroys the process group: gloo left running can abort the exit
"""


@pytest.mark.slow
def test_reduced_metrics_are_the_whole_batch_of_every_process(tmp_path):
    """`_reduce_metrics` on two processes: each micro-batch's statistics become those of both processes' samples
    together (the log-ratio spread pooled, not averaged), then they are averaged over the logging window as on one
    process. Statistics that differ between the processes neither misalign nor hang: each is averaged where held."""
    samples = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([[[1.0]], [[3.0]]])
    samples[1] += 2.0  # the processes' means differ: a mean of their spreads would be far off
    torch.save(samples, tmp_path / "samples.pt")
    (tmp_path / "reduce_metrics.py").write_text(REDUCE_METRICS)
    config = Path(__file__).parents[1] / "examples" / "accelerate_configs" / "ddp_cpu.yaml"
    launch(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "reduce_metrics.py"],
        tmp_path,
    )
    reduced = [json.loads((tmp_path / f"reduced.{rank}.json").read_text()) for rank in (0, 1)]
    assert reduced[0] == reduced[1]
    whole = samples.permute(1, 0, 2).reshape(3, 8)  # each micro-batch's samples of both processes
    spread = whole.std(dim=1, unbiased=False).mean().item()
    expected = {
        "timestep/00/log_ratio_mean": samples.mean().item(),
        "timestep/00/log_ratio_std": spread,
        "log_ratio_mean": samples.mean().item(),
        "log_ratio_std": spread,
        "reward": 0.25,
    }
    assert reduced[0][0] == pytest.approx(expected, rel=1e-5)
    assert reduced[0][1] == pytest.approx({"timestep/05/clip_frac_high": 0.75, "only_here": 3.0, "reward": 0.25})


END_RUN = """
import atexit
import os
import sys

import torch
from accelerate import Accelerator

from trl_guard.distributed import end_run, prepare_run_end

prepare_run_end()  # as a script's first step
torch.distributed.init_process_group("gloo", init_method="file://" + os.path.abspath("store"), rank=0, world_size=1)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))  # keeps gloo's worker threads alive
model(torch.ones(1, 2)).sum().backward()
atexit.register(lambda: open("handler_ran", "w").close())  # as a tracker registers its own finish at its start


class Teardown:
    def __del__(self, write=os.write):  # runs when the interpreter tears the module down (its globals may be gone)
        write(1, b" torn down")


marker = Teardown()
print("trained", end="")  # unflushed: end_run's exit must not lose it
end_run(Accelerator(cpu=True))
if sys.argv[1:] == ["raise"]:
    raise RuntimeError("after the run")
"""


def test_end_run_under_gloo_runs_the_exit_handlers_then_skips_the_teardown(tmp_path):
    """`end_run` after a gloo run: the process group is gone, exit handlers registered during the run still run and
    buffered output is flushed, and the interpreter's teardown (where a gloo worker thread releasing a collective's
    tensors can abort the process) never starts; the exit status is 0, or 1 when the script raises after end_run."""
    (tmp_path / "end_run.py").write_text(END_RUN)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "end_run.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "trained"  # flushed, and no teardown
    assert (tmp_path / "handler_ran").exists()
    # an uncaught exception after end_run keeps a failure's status
    (tmp_path / "store").unlink(missing_ok=True)
    failed = subprocess.run([sys.executable, "end_run.py", "raise"], cwd=tmp_path, capture_output=True, env=env)
    assert failed.returncode == 1 and b"after the run" in failed.stderr
