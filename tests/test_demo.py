"""The README's main job: `trl-guard demo` trains the methods side by side and writes the report."""

import json

import pytest

from trl_guard.cli import main


@pytest.mark.slow
def test_demo_on_the_tiny_world_writes_loras_and_the_report(tmp_path, capsys):
    main(["demo", "--world", "tiny", "--steps", "2", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "world: tiny" in out and "loss_type=flow_grpo" in out and "loss_type=grpo_guard" in out
    assert "progress bar" in out and out.index("[1/2] flow_grpo") < out.index("[2/2] grpo_guard")
    assert all(f"claim {n}: " in out for n in (1, 2, 3))  # the verdict, computed from this run's numbers
    for method in ("flow_grpo", "grpo_guard"):
        assert (tmp_path / method / "pytorch_lora_weights.safetensors").exists()
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics) == {"flow_grpo", "grpo_guard"}
    assert (tmp_path / "report" / "index.html").exists() and (tmp_path / "report" / "timesteps.png").exists()


@pytest.mark.slow
def test_newcomers_demo_prints_no_spurious_warnings(newcomers_demo):
    """A fresh process, as a newcomer runs it: no toy-VAE type warning, no pin_memory warning, no torchvision
    fallback notice. The toy world's two-step runs load the toy pipeline, CLIP-importing diffusers and the loaders
    (the run is shared with test_toy_model's check of the report)."""
    done, _ = newcomers_demo
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for noise in ("Expected types for vae", "pin_memory", "requires torchvision", "FutureWarning"):
        assert noise not in output, noise
    assert "loss_type=grpo_guard" in output


def test_known_noise_filters_drop_one_message_shape_only_inside_their_block(caplog):
    import logging

    from trl_guard._logging import quiet_known_noise

    logger = logging.getLogger("transformers.utils.import_utils")
    noise = "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
    other = "`CLIPImageProcessor` requires sentencepiece (not installed)"
    with caplog.at_level(logging.WARNING, logger=logger.name):
        with quiet_known_noise("torchvision_fallback"):
            logger.warning(noise)
            logger.warning(other)
        logger.warning(noise)  # outside the block the library's logger is as it was
    assert [r.getMessage() for r in caplog.records] == [other, noise]


# What a newcomer meets before and after the training: options refused up front, the help, the plan and the verdict.


@pytest.mark.parametrize("rate", ["0", "-1e-3", "nan"])
def test_a_learning_rate_that_trains_nothing_is_refused_before_anything_runs(rate, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(
            ["demo", "--world", "tiny", "--steps", "1", f"--learning-rate={rate}", "--output-dir", str(tmp_path / "o")]
        )
    err = capsys.readouterr().err
    assert error.value.code == 2 and "--learning-rate" in err and "must be > 0" in err
    assert not (tmp_path / "o").exists()


def test_an_explicit_learning_rate_is_used_and_unset_means_the_worlds():
    from trl_guard.scripts.demo import World, build_parser, run_settings

    world = World(lambda: None, [], [], [], [], [], steps=40, learning_rate=0.1)
    assert run_settings(world, build_parser().parse_args(["--learning-rate", "1e-5"])) == (40, 1e-5)
    assert run_settings(world, build_parser().parse_args(["--steps", "3"])) == (3, 0.1)


def test_every_loss_type_is_checked_before_the_first_one_trains(tmp_path, capsys):
    from trl_guard.losses import LOSS_TYPES

    out = tmp_path / "o"
    with pytest.raises(SystemExit):
        main(
            ["demo", "--world", "tiny", "--steps", "1", "--loss-types", "flow_grpo", "bogus", "--output-dir", str(out)]
        )
    err = capsys.readouterr().err
    assert "--loss-types" in err and "'bogus'" in err and all(repr(name) in err for name in LOSS_TYPES)
    assert not (out / "flow_grpo").exists()

    with pytest.raises(SystemExit):
        main(["demo", "--world", "tiny", "--loss-types", "grpo_guard", "grpo_guard", "--output-dir", str(out)])
    assert "lists grpo_guard more than once" in capsys.readouterr().err


def test_the_loss_types_offered_are_read_from_the_library():
    from trl_guard.algorithms import SDERatioAlgorithm, register_algorithm, unregister_algorithm
    from trl_guard.scripts.demo import build_parser

    class Extra(SDERatioAlgorithm):  # a family registered after import is offered too
        loss_types = ("extra_loss",)

    register_algorithm(Extra)
    try:
        parser = build_parser()
    finally:
        unregister_algorithm(Extra)
    assert parser.parse_args(["--loss-types", "extra_loss", "nft"]).loss_types == ["extra_loss", "nft"]
    assert "extra_loss" in next(a.help for a in parser._actions if a.dest == "loss_types")


def test_help_keeps_its_lists_and_names_the_loss_types(capsys):
    from trl_guard.losses import LOSS_TYPES

    with pytest.raises(SystemExit) as error:
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert error.value.code == 0
    # the description's list items each start their own line, as written
    assert "\n- `toy` (default" in out and "\n- `tiny`: " in out and "\n  3. per-timestep gradient norms" in out
    loss_help = " ".join(out[out.index("--loss-types LOSS_TYPE") :].split())
    assert all(name in loss_help for name in LOSS_TYPES)


def test_toy_world_without_its_model_is_refused_with_the_way_out(monkeypatch, tmp_path, capsys):
    import trl_guard.scripts.demo as demo

    monkeypatch.setattr(demo, "TOY_MODEL", str(tmp_path / "missing"))
    with pytest.raises(SystemExit):
        main(["demo", "--world", "toy"])
    assert "use --world tiny" in capsys.readouterr().err
    assert demo.parse_options([]).world == "tiny"  # the default falls back instead


def test_plan_names_the_methods_in_order_and_no_machine_measured_time():
    from trl_guard.scripts.demo import World, build_parser, plan

    world = World(lambda: None, [], [], [], [], [], steps=60, name="toy", summary="shapes")
    text = plan(world, build_parser().parse_args(["--steps", "30", "--loss-types", "grpo_guard", "flow_grpo"]))
    assert "world: toy (shapes)" in text and "30 optimizer steps each" in text
    assert text.index("grpo_guard (GRPO-Guard)") < text.index("flow_grpo (Flow-GRPO)")
    assert "progress bar with the time left" in text and " s " not in text and "min" not in text


def paper_like_tables(steps=6):
    """Per-timestep means that show claims 1-3 as the paper states them."""
    last = steps - 1
    flow = {
        "log_ratio_mean": {t: -(10.0**t) * 1e-7 for t in range(steps)},
        "log_ratio_std": {t: 2.0**t * 1e-5 for t in range(steps)},  # 32x from first to last
        "clip_frac_high": {t: 0.01 for t in range(steps)},
        "clip_frac_low": {t: 0.02 + 0.06 * t for t in range(steps)},
        "grad_norm": {t: 1e-3 * 1.8**t for t in range(steps)},  # 19x
    }
    guard = {
        "log_ratio_mean": {t: (-1) ** t * 1e-7 for t in range(steps)},
        "log_ratio_std": {t: 2e-5 + 1e-6 * t for t in range(steps)},
        "clip_frac_high": {t: 0.23 for t in range(steps)},
        "clip_frac_low": {t: 0.22 for t in range(steps)},
        "grad_norm": {t: 6e-3 * (2.5 if t == last else 1.0) for t in range(steps)},
    }
    return {"flow_grpo": flow, "grpo_guard": guard}


def test_claims_verdict_reproduces_all_three_on_paper_like_numbers():
    from trl_guard.scripts.demo import format_claims, judge_claims

    verdicts = judge_claims(paper_like_tables())
    assert [(v.claim, v.verdict) for v in verdicts] == [(1, "reproduced"), (2, "reproduced"), (3, "reproduced")]
    text = format_claims(verdicts)
    assert "claim 3: REPRODUCED" in text and f"varies {1.8**5:.1f}x" in text and "needs 10x or more" in text


def test_claims_verdict_follows_the_numbers_it_is_given():
    from trl_guard.scripts.demo import judge_claims

    tables = paper_like_tables()
    guard = tables["grpo_guard"]
    guard["grad_norm"] = {t: 1e-3 * 1.5**t for t in guard["grad_norm"]}  # 7.6x: more even than 19x, not 2.5x
    guard["log_ratio_mean"] = dict(tables["flow_grpo"]["log_ratio_mean"])  # shifted like Flow-GRPO's
    guard["clip_frac_low"] = {t: 0.5 for t in guard["clip_frac_low"]}  # one-sided
    verdicts = {v.claim: v for v in judge_claims(tables)}
    assert verdicts[1].verdict == "partly reproduced" and "largest" in verdicts[1].checks[1]
    assert verdicts[1].checks[1].endswith("NO") and verdicts[1].checks[3].endswith("yes")
    assert verdicts[2].verdict == "partly reproduced" and verdicts[2].checks[2].endswith("NO")
    assert verdicts[3].verdict == "reproduced in direction only"

    tables["grpo_guard"]["grad_norm"] = dict(tables["flow_grpo"]["grad_norm"])
    assert {v.claim: v.verdict for v in judge_claims(tables)}[3] == "not reproduced"


def test_claims_not_judged_without_both_methods_or_an_off_policy_update():
    from trl_guard.scripts.demo import judge_claims

    tables = paper_like_tables()
    only_guard = judge_claims({"grpo_guard": tables["grpo_guard"]})
    assert {v.verdict for v in only_guard} == {"not judged"} and "did not train flow_grpo" in only_guard[0].checks[0]

    for table in tables.values():  # one on-policy update: every ratio is 1
        for stat in ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low"):
            table[stat] = {t: 0.0 for t in table[stat]}
    verdicts = {v.claim: v.verdict for v in judge_claims(tables)}
    assert verdicts == {1: "not judged", 2: "not judged", 3: "reproduced"}
