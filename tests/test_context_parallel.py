"""Context parallelism (`context_parallel_degree`) through diffusers' `enable_parallelism`, on two CPU processes over
gloo: one context-parallel group of two (data-parallel size 1) samples and trains what one process does.

The two-process runs launch this file under `accelerate launch` with examples/accelerate_configs/ddp_cpu.yaml. As a
script it is a harness, not part of the library: diffusers 0.42 places a context-parallel model on
`torch.device(device_type, rank % torch.accelerator.device_count())`, and a CPU-only torch counts 0 accelerators
(`ZeroDivisionError: integer modulo by zero` in `ModelMixin._resolve_parallel_config`), so the harness counts one, the
CPU. Everything else (the mesh, diffusers' split and gather hooks, Ulysses' all-to-all over gloo, the trainer) is the
code a GPU launch runs. It also records the longest token sequence `proj_out` saw on each process, to show that the
forwards were really split, and the prompts each process sampled.

    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate_configs/ddp_cpu.yaml \\
        tests/test_context_parallel.py --config recipe.yaml --context_parallel_degree 2
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
DDP_CONFIG = str(ROOT / "examples" / "accelerate_configs" / "ddp_cpu.yaml")
FSDP2_CONFIG = str(ROOT / "examples" / "accelerate_configs" / "fsdp2.yaml")

RECIPE = """
model_name_or_path: {pipeline}
dataset_name: {prompts}
reward_funcs: [cp_rewards.blueness]
use_peft: true
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
lora_target_modules: {targets}
num_generations: 4
per_device_train_batch_size: 4
steps_per_generation: 1
max_steps: 2
optim: sgd
learning_rate: 0.5
height: 32
width: 32
num_frames: {frames}
num_inference_steps: 4
max_sequence_length: 16
guidance_scale: 1.0
save_strategy: "no"
report_to: none
disable_tqdm: true
logging_steps: 1
"""

REWARD = """
import numpy as np

def _blue(image):
    return np.asarray(image, dtype=np.float32)[..., 2].mean() / 255

def blueness(prompts, images, **kwargs):
    return [float(np.mean([_blue(f) for f in x]) if isinstance(x, list) else _blue(x)) for x in images]
"""

FAMILIES = {
    # family: (builder, LoRA targets, frames, tokens of one sample at 32 px)
    "wan22": (
        "trl_guard.testing.wan22.build_tiny_wan22_pipeline",
        "[attn1.to_q, attn1.to_k, attn1.to_v, attn1.to_out.0, proj_out]",
        5,
        8,
    ),
    "flux": (
        "trl_guard.testing.build_tiny_flux_pipeline",
        "[attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, proj_out]",
        1,
        64,
    ),
    "qwenimage": (
        "trl_guard.testing.build_tiny_qwenimage_pipeline",
        "[attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, proj_out]",
        1,
        16,
    ),
}


# ---- refusals and bookkeeping (fast) -------------------------------------------------------------------------------
def test_degree_without_a_distributed_launch_is_refused(tmp_path):
    from trl_guard import GuardConfig

    with pytest.raises(ValueError, match=r"context_parallel_degree=2 .* one process.*accelerate launch"):
        GuardConfig(str(tmp_path), context_parallel_degree=2, report_to="none")


def test_degree_that_does_not_divide_the_processes_is_refused():
    from trl_guard.context_parallel import check_launch

    with pytest.raises(ValueError, match=r"context_parallel_degree=3 must divide the number of processes \(4\)"):
        check_launch(3, "ulysses", 4)
    with pytest.raises(ValueError, match=r"context_parallel_degree=0 must be >= 1"):
        check_launch(0, "ulysses", 4)
    check_launch(2, "ring", 4)  # a divisor: accepted


def test_family_without_a_cp_plan_is_refused_before_loading(tmp_path, monkeypatch):
    """SD3's transformer has no `_cp_plan` in diffusers: refused, naming the field, for a pipeline object and for a
    local folder, before the pipeline is loaded (`from_pretrained` is never called)."""
    import diffusers

    from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
    from trl_guard.testing import build_tiny_sd3_pipeline

    pipeline = build_tiny_sd3_pipeline()
    folder = tmp_path / "sd3"
    pipeline.save_pretrained(folder)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what the config sees under a two-process launch
    monkeypatch.setattr(GuardConfig, "world_size", property(lambda self: 2))
    args = GuardConfig(
        str(tmp_path / "out"),
        context_parallel_degree=2,
        num_generations=2,
        per_device_train_batch_size=2,
        height=32,
        width=32,
        report_to="none",
    )

    def no_loading(*a, **k):
        raise AssertionError("the pipeline was loaded before the refusal")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_loading)
    for model in (pipeline, str(folder)):
        with pytest.raises(ValueError, match=r"context_parallel_degree=2, but StableDiffusion3Pipeline's transformer"):
            GuardGRPODiffusionTrainer(
                model,
                reward_funcs=lambda p, i, **k: [0.0] * len(i),
                args=args,
                train_dataset=[{"prompt": "a"}, {"prompt": "b"}],
            )


def test_families_with_a_cp_plan_pass_the_check(tmp_path):
    from trl_guard.context_parallel import check_before_loading, check_family, denoiser_classes
    from trl_guard.testing import build_tiny_flux_pipeline, build_tiny_wan_pipeline
    from trl_guard.testing.wan22 import build_tiny_wan22_pipeline

    class Args:
        context_parallel_degree = 2
        model_init_kwargs = None

    for pipeline in (build_tiny_wan_pipeline(), build_tiny_flux_pipeline()):
        check_before_loading(pipeline, type(pipeline).__name__, Args())
    wan22 = build_tiny_wan22_pipeline()
    folder = tmp_path / "wan22"
    wan22.save_pretrained(folder)
    classes = denoiser_classes(str(folder), ("transformer", "transformer_2"))
    assert [c.__name__ for c in classes.values()] == ["WanTransformer3DModel"] * 2  # both experts are checked
    check_family(classes, "WanPipeline", 2)
    with pytest.raises(ValueError, match="transformer_2 \\(SD3Transformer2DModel\\) has no context-parallel plan"):
        check_family({**classes, "transformer_2": "SD3Transformer2DModel"}, "WanPipeline", 2)


def test_a_sequence_the_degree_does_not_divide_is_named_with_the_fields():
    """diffusers' split asserts without naming a setting when a sequence is not a multiple of the degree: the adapter
    turns that into an error naming the fields and the shapes; other assertion errors pass through unchanged."""
    from diffusers.hooks.context_parallel import EquipartitionSharder

    from trl_guard.adapters import SamplingSettings, get_adapter
    from trl_guard.testing import build_tiny_flux_pipeline

    class ThreeProcesses:  # all the split reads of its mesh before its assertion
        def size(self):
            return 3

    adapter = get_adapter(build_tiny_flux_pipeline())
    adapter.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: EquipartitionSharder.shard(kwargs["hidden_states"], 1, ThreeProcesses()),
        with_kwargs=True,
    )
    latents = torch.randn(1, 64, 4)  # 64 latent tokens at 32 px: 3 does not divide them
    sigma = torch.full((1,), 0.5)
    adapter.configure(SamplingSettings(32, 32, max_sequence_length=16))  # no context parallelism: left as it is
    with pytest.raises(AssertionError, match="divisible by mesh size"), torch.no_grad():
        adapter.predict_velocity(latents, sigma, adapter.encode_prompts(["a cat"]), None)
    adapter.configure(SamplingSettings(32, 32, max_sequence_length=18, sequence_multiple=3))
    named = r"context_parallel_degree=3 .*'hidden_states': \(1, 64, 4\).*a height and width .* multiple of 3"
    with pytest.raises(ValueError, match=named), torch.no_grad():
        adapter.predict_velocity(latents, sigma, adapter.encode_prompts(["a cat"]), None)


def test_a_text_length_the_degree_does_not_divide_is_refused_where_the_text_is_split():
    """FLUX.1, FLUX.2, Qwen-Image and LTX-2 split their text tokens too: `max_sequence_length` must be a multiple of
    the degree, refused before loading (`check_settings`) with the length to use; Wan's text is not split."""
    from trl_guard.adapters import FluxAdapter, QwenImageAdapter, SamplingSettings, WanAdapter

    odd = SamplingSettings(32, 32, max_sequence_length=77, sequence_multiple=2)
    for family in (FluxAdapter, QwenImageAdapter):
        with pytest.raises(ValueError, match="max_sequence_length=77 with context_parallel_degree=2: .* to 78"):
            family.check_settings(odd, family.pipeline_classes[0])
    WanAdapter.check_settings(odd, "WanPipeline")
    FluxAdapter.check_settings(SamplingSettings(32, 32, max_sequence_length=77), "FluxPipeline")  # degree 1


def test_generation_batch_counts_data_parallel_ranks(monkeypatch, tmp_path):
    """With 4 processes in groups of 2, a round samples for 2 data-parallel ranks, not 4."""
    from trl_guard import GuardConfig

    monkeypatch.setattr(GuardConfig, "world_size", property(lambda self: 4))
    args = GuardConfig(
        str(tmp_path), context_parallel_degree=2, num_generations=4, per_device_train_batch_size=4, report_to="none"
    )
    assert args.data_parallel_size == 2 and args.generation_batch_size == 8
    plain = GuardConfig(str(tmp_path), num_generations=4, per_device_train_batch_size=4, report_to="none")
    assert plain.data_parallel_size == 4 and plain.generation_batch_size == 16


def test_layout_gives_a_group_the_same_prompts_and_keeps_its_values_once():
    """4 processes in groups of 2: the sampler deals each data-parallel slice to both processes of its group (as
    accelerate deals batch k to process k % 4), and gathered values are kept once per group."""
    from trl_guard.context_parallel import ContextParallelLayout

    layout = ContextParallelLayout(degree=2, process_index=2, num_processes=4)
    assert (layout.data_parallel_rank, layout.data_parallel_size, layout.context_parallel_rank) == (1, 2, 0)
    sampler = layout.repeat_for_groups(list(range(12)), slice_size=3)  # two rounds of 2 slices of 3
    stream = list(sampler)
    batches = [stream[i : i + 3] for i in range(0, len(stream), 3)]
    per_process = {rank: [b for k, b in enumerate(batches) if k % 4 == rank] for rank in range(4)}
    assert per_process[0] == per_process[1] == [[0, 1, 2], [6, 7, 8]]
    assert per_process[2] == per_process[3] == [[3, 4, 5], [9, 10, 11]]
    assert len(sampler) == 24
    gathered = torch.tensor([[0.0], [0.0], [1.0], [1.0], [2.0], [2.0], [3.0], [3.0]])  # 2 rows per process
    assert layout.one_per_group(gathered).flatten().tolist() == [0.0, 0.0, 2.0, 2.0]
    off = ContextParallelLayout(degree=1, process_index=1, num_processes=2)
    assert off.one_per_group(gathered) is gathered and off.repeat_for_groups(stream, 3) is stream


# ---- two processes, one context-parallel group (slow) ---------------------------------------------------------------
def _pipeline_dir(tmp_path_factory, family):
    import importlib

    module, _, builder = FAMILIES[family][0].rpartition(".")
    path = tmp_path_factory.mktemp(f"tiny-{family}")
    getattr(importlib.import_module(module), builder)(seed=0).save_pretrained(path)
    return path


def _recipe(tmp_path, pipeline, family):
    (tmp_path / "cp_rewards.py").write_text(REWARD)
    # Qwen-Image trims the text to the batch's longest prompt: "prompt {i}" is 13 tokens, not a multiple of the
    # degree, so the adapter must pad it to one
    pattern = "prompt {}" if family == "qwenimage" else "prompt number {}"
    (tmp_path / "prompts.txt").write_text("\n".join(pattern.format(i) for i in range(4)))
    _, targets, frames, _ = FAMILIES[family]
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(pipeline=pipeline, prompts=tmp_path / "prompts.txt", targets=targets, frames=frames))
    return path


def _runs(tmp_path, recipe, *flags, fsdp2=False, processes=2):
    """One process, then `processes` in context-parallel groups of 2 with the same samples per optimizer step (each
    of the `processes / 2` data-parallel ranks samples its share of the recipe's 4). The reports, one per process."""
    from helpers import launch, one_process

    base = ["--config", str(recipe), *flags]
    one_process([*base, "--output_dir", "one"], tmp_path)
    config = FSDP2_CONFIG if fsdp2 else DDP_CONFIG
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    launcher += ["--num_processes", str(processes)]
    report = str(tmp_path / "cp_report")
    env = {"CP_REPORT": report, **({"CP_FSDP2": "1", "SHARD_REPORT": report + ".shards"} if fsdp2 else {})}
    split = ["--context_parallel_degree", "2", "--per_device_train_batch_size", str(4 // (processes // 2))]
    launch([*launcher, __file__, *base, "--output_dir", "two", *split], tmp_path, env=env)
    return [json.loads(Path(f"{report}.{rank}.json").read_text()) for rank in range(processes)]


def _rewards(folder: Path) -> list[float]:
    history = json.loads((folder / "log_history.json").read_text())
    return [entry["reward"] for entry in history if "reward" in entry]


@pytest.mark.slow
@pytest.mark.parametrize(
    # FLUX.1 and Qwen-Image cover DDP, Wan2.2 (both experts, the Wan2.1 transformer each) covers FSDP2
    ("family", "fsdp2", "processes"),
    [("flux", False, 4), ("wan22", True, 2), ("qwenimage", False, 2)],
    ids=["flux-2x2", "wan22-fsdp2", "qwenimage"],
)
def test_context_parallel_groups_match_one_process(family, fsdp2, processes, tmp_path, tmp_path_factory):
    """Processes in context-parallel groups of 2 (FLUX.1: 4 processes, 2 data-parallel ranks of 2; the others: one
    group of 2) log the same rewards and end on the same LoRA as one process training the same 4 samples a step;
    each process's `proj_out` saw half of every sequence, so the forwards were split, and the processes of a group
    sampled the same prompts. Wan2.2 runs under FSDP2 (tests/fsdp2_cpu.py's switch): every block of both experts is
    also split between the two processes, both experts' forwards are split, and both LoRA files match."""
    from safetensors.torch import load_file

    recipe = _recipe(tmp_path, _pipeline_dir(tmp_path_factory, family), family)
    reports = _runs(tmp_path, recipe, fsdp2=fsdp2, processes=processes)
    if fsdp2:
        shards = [json.loads((tmp_path / f"cp_report.shards.{rank}.json").read_text()) for rank in (0, 1)]
        blocks = [name for name in shards[0] if "blocks." in name]
        assert blocks and all(shards[0][n]["sharded"] for n in blocks)
        assert all(shards[0][n]["local"] + shards[1][n]["local"] == shards[0][n]["global"] for n in blocks)
    tokens = FAMILIES[family][3]
    assert [r["max_tokens"] for r in reports] == [tokens // 2] * processes
    assert reports[0]["forwards"] > 0 and all(r["forwards"] == reports[0]["forwards"] for r in reports)
    assert len(reports[0]["rounds"]) == 2
    if family == "wan22":  # both experts ran, split: every sample's steps straddle the boundary
        assert all(r["parts_called"] == ["transformer", "transformer_2"] for r in reports)
    assert all(reports[rank]["rounds"] == reports[rank + 1]["rounds"] for rank in range(0, processes, 2))  # a group's
    one, two = _rewards(tmp_path / "one"), _rewards(tmp_path / "two")
    assert len(one) == 2 and two == pytest.approx(one, abs=1e-6)
    files = sorted(path.name for path in (tmp_path / "one").glob("*lora*.safetensors"))  # Wan2.2: one per expert
    assert files == sorted(path.name for path in (tmp_path / "two").glob("*lora*.safetensors"))
    assert len(files) == (2 if family == "wan22" else 1)
    lora_one = {f"{name}/{k}": t for name in files for k, t in load_file(tmp_path / "one" / name).items()}
    lora_two = {f"{name}/{k}": t for name in files for k, t in load_file(tmp_path / "two" / name).items()}
    assert lora_one.keys() == lora_two.keys()
    update = max(t.abs().max().item() for k, t in lora_one.items() if "lora_B" in k)  # lora_B starts at zero
    assert update > 1e-4
    for key in lora_one:
        torch.testing.assert_close(lora_two[key], lora_one[key], rtol=0, atol=1e-3 * update)


# ---- the harness: run as `accelerate launch tests/test_context_parallel.py ...` ----------------------------------
def _harness() -> None:
    import runpy

    if not torch.cuda.is_available() and torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1  # the CPU (see the module docstring)

    if os.environ.get("CP_FSDP2"):
        import fsdp2_cpu  # noqa: F401  (switches accelerate's CPU state to FSDP2, tests/fsdp2_cpu.py)
    from trl_guard.trainer import GuardGRPODiffusionTrainer

    original_train = GuardGRPODiffusionTrainer.train
    original_generate = GuardGRPODiffusionTrainer._generate_and_score
    rounds = []

    def generate_and_record(self, rows, rollout_index):
        rounds.append([row["prompt"] for row in rows])
        return original_generate(self, rows, rollout_index)

    def train_and_report(self, *args, **kwargs):
        seen = {"max_tokens": 0, "forwards": 0, "rounds": rounds, "parts_called": []}

        def recorder(name):
            def record(module, inputs):
                seen["max_tokens"] = max(seen["max_tokens"], inputs[0].shape[1])
                seen["forwards"] += 1
                seen["parts_called"] = sorted({*seen["parts_called"], name})

            return record

        # every part of the denoiser: both experts of Wan2.2
        parts = self.adapter.denoiser_parts.items()
        handles = [part.proj_out.register_forward_pre_hook(recorder(name)) for name, part in parts]
        try:
            output = original_train(self, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        with open(f"{os.environ['CP_REPORT']}.{self.accelerator.process_index}.json", "w") as f:
            json.dump(seen, f)
        return output

    GuardGRPODiffusionTrainer.train = train_and_report
    GuardGRPODiffusionTrainer._generate_and_score = generate_and_record
    runpy.run_module("trl_guard.scripts.grpo", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _harness()
