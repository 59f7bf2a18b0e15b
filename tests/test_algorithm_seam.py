"""The algorithm seam (issue 29, item 0): a family is one class and one registration, and everything else (the config's
checks and defaults, the trainer, the rollout buffer, the model card) reads it from the registry."""

import ast
import copy
import dataclasses
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import blueness
from helpers import make_trainer, tiny_config

import trl_guard
from trl_guard import GuardConfig
from trl_guard.adapters import PromptEmbeddings
from trl_guard.algorithms import (
    SDERatioAlgorithm,
    algorithm_class,
    register_algorithm,
    unregister_algorithm,
)
from trl_guard.rollout import Rollout, TrainBatch, load_rollout_buffer, save_rollout_buffer


@dataclass
class ToyArguments:
    r"""
    The toy family's own fields.

    Parameters:
        toy_weight (`float`, *optional*, defaults to `1.0`):
            A weight only the toy family reads.
    """

    toy_weight: float = 1.0


@dataclass
class ToyConfig(ToyArguments, GuardConfig):
    """`GuardConfig` with the toy family's fields, as `GuardConfig` inherits each listed family's arguments."""


class ToyRollout(Rollout):
    """The toy family's rollout: a buffer is read back as this type only if the family's `rollout_type` is used."""


class ToyAlgorithm(SDERatioAlgorithm):
    """An extra family: the SDE family's sampling, its own loss type, field, checks, defaults, card and signal."""

    loss_types = ("toy_ratio",)
    description = "a toy loss"
    arguments = ToyArguments
    config_fields = (*SDERatioAlgorithm.config_fields, "toy_weight")
    rollout_type = ToyRollout
    card_fields = ("loss_type", "toy_weight", "epsilon")
    citation = "@misc{toy2026seam,\n  title = {A Toy Family for the Seam},\n  year = {2026}\n}"

    @classmethod
    def default_epsilon(cls, loss_type):
        return 3e-3

    @classmethod
    def validate(cls, args):
        if getattr(args, "toy_weight", 1.0) <= 0:
            raise ValueError(f"toy_weight={args.toy_weight} must be > 0.")

    @classmethod
    def training_signal(cls, rewards, weights, args):
        # the weighted reward totals themselves, not normalised: easy to recognise in a TrainBatch
        totals = (rewards * weights.to(rewards.device)).nansum(dim=1)
        return totals, rewards

    def loss(self, batch, unit):
        mean, _ = self._mean(batch, unit)
        weight = batch.advantages.to(mean.dtype).reshape(-1, *([1] * (mean.ndim - 1)))
        return -(weight * mean).mean(), {}


@pytest.fixture
def toy():
    register_algorithm(ToyAlgorithm)
    try:
        yield ToyAlgorithm
    finally:
        unregister_algorithm(ToyAlgorithm)


def test_a_registered_family_is_accepted_defaulted_validated_and_refuses_the_others_fields(toy, tmp_path):
    assert algorithm_class("toy_ratio") is toy and "toy_ratio" in trl_guard.LOSS_TYPES
    config = tiny_config(tmp_path, loss_type="toy_ratio")
    assert config.epsilon == 3e-3  # the family's default clip range
    assert tiny_config(tmp_path, loss_type="toy_ratio", noise_schedule="dance_grpo").noise_schedule == "dance_grpo"
    with pytest.raises(ValueError, match=r"loss_type='toy_ratio' \(a toy loss\) does not read nft_beta=0.5"):
        tiny_config(tmp_path, loss_type="toy_ratio", nft_beta=0.5)

    toy_config = dict(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4, report_to="none")
    assert ToyConfig(**toy_config, loss_type="toy_ratio", toy_weight=2.0).toy_weight == 2.0
    with pytest.raises(ValueError, match="toy_weight=-1.0 must be > 0"):
        ToyConfig(**toy_config, loss_type="toy_ratio", toy_weight=-1.0)
    # its field, refused by name under the families that do not read it
    for other in ("flow_grpo", "nft"):
        with pytest.raises(ValueError, match=rf"loss_type='{other}' \(.*\) does not read toy_weight=2.0"):
            ToyConfig(**toy_config, loss_type=other, toy_weight=2.0)

    with pytest.raises(ValueError, match=r"loss types another registered family implements: \['toy_ratio'\]"):
        register_algorithm(type("Again", (SDERatioAlgorithm,), {"loss_types": ("toy_ratio",)}))


def test_an_unregistered_loss_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="loss_type='toy_ratio' is unknown"):
        tiny_config(tmp_path, loss_type="toy_ratio")


def test_the_model_card_lists_the_familys_fields_and_citation(toy, tmp_path):
    from trl_guard.hub import write_model_card

    args = ToyConfig(
        output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4, report_to="none",
        loss_type="toy_ratio", toy_weight=2.5,
    )  # fmt: skip
    trainer = types.SimpleNamespace(
        args=args,
        adapter=types.SimpleNamespace(is_video=False, has_lora=True, lora_load_code=lambda repo: "pipe.load(...)"),
        state=types.SimpleNamespace(log_history=[], global_step=3),
        rewards=types.SimpleNamespace(names=["blueness"], weights=torch.ones(1)),
        gold_rewards=None,
    )
    card = Path(write_model_card(trainer, str(tmp_path), "some/base", "StableDiffusion3Pipeline")).read_text()
    assert "| `toy_weight` | `2.5` |" in card and "| `epsilon` | `0.003` |" in card
    assert "noise_schedule" not in card  # the SDE family's card fields are not the toy's
    assert "toy2026seam" in card and "vonwerra2022trl" in card and "2510.22319" not in card


class WholeGroups(SDERatioAlgorithm):
    loss_types = ("toy_groups",)
    needs_whole_groups = True


def test_a_family_that_needs_whole_groups_refuses_micro_batches_that_split_one(tmp_path):
    register_algorithm(WholeGroups)
    try:
        split = dict(num_generations=4, per_device_train_batch_size=2, steps_per_generation=4)
        with pytest.raises(ValueError, match=r"num_generations=4 must divide per_device_train_batch_size=2") as error:
            tiny_config(tmp_path, loss_type="toy_groups", **split)
        assert "Set per_device_train_batch_size to a multiple of num_generations" in str(error.value)
        assert tiny_config(tmp_path, loss_type="toy_groups", num_generations=4, per_device_train_batch_size=8)
    finally:
        unregister_algorithm(WholeGroups)
    assert tiny_config(tmp_path, loss_type="flow_grpo", **split)  # a family comparing no samples takes it


class ReadsReference(SDERatioAlgorithm):
    loss_types = ("toy_reference",)

    @classmethod
    def needs_reference(cls, args):
        return True  # for example a reference refreshed from, or compared with, whatever beta says


def test_full_fine_tuning_keeps_a_reference_copy_when_the_family_reads_it(
    tiny_pipeline, _base_pipeline, prompts, tmp_path
):
    register_algorithm(ReadsReference)
    try:
        reads = make_trainer(
            tiny_pipeline, [blueness], prompts, tmp_path / "a", peft_config=None, loss_type="toy_reference"
        )
    finally:
        unregister_algorithm(ReadsReference)
    assert reads.args.beta == 0 and reads.adapter.reference_denoiser is not None
    plain = make_trainer(copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path / "b", peft_config=None)
    assert plain.adapter.reference_denoiser is None  # beta = 0 and no eval_kl: no copy, as before


def _trl_guard_imports(path: Path, package: Path) -> set[str]:
    """The trl_guard modules a source file imports anywhere (functions included), outside `if TYPE_CHECKING:`."""
    module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
    current = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for statement in block.body
        for node in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = current.split(".")[: len(current.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [f"{target}.{alias.name}" for alias in node.names] + [target]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.startswith("trl_guard"))
    return found


def test_checkpoints_does_not_reach_the_rollout_module():
    # the circle checkpoints -> rollout -> adapters -> checkpoints: the buffer's save/load now sit in rollout.py
    package = Path(trl_guard.__file__).parent
    files = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = path
    graph = {name: {m for m in _trl_guard_imports(path, package) if m in files} for name, path in files.items()}
    reached, todo = set(), ["trl_guard.checkpoints"]
    while todo:
        for imported in graph[todo.pop()] - reached:
            reached.add(imported)
            todo.append(imported)
    assert "trl_guard.rollout" not in reached
    assert "trl_guard.checkpoints" in graph["trl_guard.rollout"]  # the direction that stays


def _batch(seed: int, rows: int = 4) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    rollout = Rollout(
        torch.randn(rows, 3, 2, generator=g), torch.randn(rows, 2, 2, generator=g), torch.linspace(1, 0, 3)
    )
    embeds = PromptEmbeddings({"prompt_embeds": torch.randn(rows, 5, 8, generator=g)})
    rewards = torch.randn(rows, generator=g)
    groups = torch.arange(seed * rows, (seed + 1) * rows) // 2
    return TrainBatch(rollout, embeds, None, torch.randn(rows, generator=g), [0, 1], rewards=rewards, group_ids=groups)


def test_rewards_and_groups_survive_the_rollout_buffer_and_the_rollout_type_is_the_familys(tmp_path):
    from safetensors.torch import load_file, save_file

    batches = [_batch(0), _batch(1)]
    path = str(tmp_path / "rollout_buffer_0.safetensors")
    layout = {"per_device_train_batch_size": 4}
    save_rollout_buffer(batches, path, layout)
    loaded = load_rollout_buffer(path, "cpu", layout, ToyAlgorithm.rollout_type)
    assert all(type(batch.rollout) is ToyRollout for batch in loaded)
    for original, back in zip(batches, loaded):
        torch.testing.assert_close(back.rewards, original.rewards, rtol=0, atol=0)
        assert back.group_ids.dtype == torch.long and back.group_ids.tolist() == original.group_ids.tolist()

    old = {k: v for k, v in load_file(path).items() if not k.endswith((".rewards", ".group_ids"))}
    save_file(old, path, metadata={"per_device_train_batch_size": "4"})
    with pytest.raises(ValueError, match="written by an older trl_guard, which kept no rewards or prompt groups"):
        load_rollout_buffer(path, "cpu", layout, Rollout)
    with pytest.raises(ValueError, match="3 group_ids for a batch of 4"):
        TrainBatch(
            batches[0].rollout, batches[0].prompt_embeds, None, torch.zeros(4), [0], torch.zeros(4), torch.zeros(3)
        )


def test_the_trainer_uses_the_familys_signal_and_reads_its_buffer_back_as_the_familys_rollout(
    toy, tiny_pipeline, _base_pipeline, prompts, tmp_path
):
    # Two optimizer steps per round: the checkpoint at step 1 falls between them and keeps the round's buffer.
    settings = dict(loss_type="toy_ratio", save_strategy="steps", save_steps=1, steps_per_generation=2)
    first = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path / "run", **settings, max_steps=1)
    first.train()
    batches = first._buffered_batches
    rewards = torch.cat([batch.rewards for batch in batches])
    # the trainer called the family's training_signal (the raw totals) and kept each sample's total and group
    torch.testing.assert_close(torch.cat([batch.advantages for batch in batches]), rewards, rtol=0, atol=0)
    assert torch.cat([batch.group_ids for batch in batches]).tolist() == [i // 4 for i in range(16)]

    resumed = make_trainer(copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path / "run", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert resumed.state.global_step == 2
    assert all(type(batch.rollout) is ToyRollout for batch in resumed._buffered_batches)
    torch.testing.assert_close(torch.cat([b.rewards for b in resumed._buffered_batches]), rewards, rtol=0, atol=0)
    groups = torch.cat([b.group_ids for b in resumed._buffered_batches])
    assert groups.tolist() == [i // 4 for i in range(16)]


def test_every_family_field_is_documented_in_guard_config():
    from trl_guard.algorithms import ALGORITHM_ARGUMENTS
    from trl_guard.config import docstring_entries

    entries = docstring_entries(GuardConfig.__doc__)
    for arguments in ALGORITHM_ARGUMENTS:
        for f in dataclasses.fields(arguments):
            assert entries.get(f.name), f.name
            assert f.name in {g.name for g in dataclasses.fields(GuardConfig)}


def test_every_loss_type_names_its_method():
    """Scripts print a method's name from its family (`method_names`), not from a list of loss types of their own."""
    from trl_guard.algorithms import loss_types, method_name

    names = {loss_type: method_name(loss_type) for loss_type in loss_types()}
    assert names["grpo_guard"] == "GRPO-Guard" and names["flow_dppo"] == "Flow-DPPO"
    assert all(name != loss_type for loss_type, name in names.items()), names
    assert len(set(names.values())) == len(names)
    with pytest.raises(ValueError, match="unknown"):
        method_name("not_a_loss")
