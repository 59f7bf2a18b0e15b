"""The over-optimisation study's bookkeeping: resume by skipping finished runs, and each method's best rate."""

import importlib.util
import shutil
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "overoptimization_study", Path(__file__).parents[1] / "benchmarks" / "overoptimization.py"
)
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def run(method, lr, proxies, seed=0):
    return {"method": method, "seed": seed, "learning_rate": lr, "evals": [{"proxy": p} for p in proxies]}


def test_finished_runs_are_skipped_and_appends_keep_earlier_runs(tmp_path):
    path = str(tmp_path / "results.json")
    assert not study.done(path, "flow_grpo", 0, 1e-3)
    study.append(path, run("flow_grpo", 1e-3, [0.1]))
    study.append(path, run("grpo_guard", 1e-3, [0.1]))
    assert study.done(path, "flow_grpo", 0, 1e-3) and study.done(path, "grpo_guard", 0, 1e-3)
    assert not study.done(path, "flow_grpo", 1, 1e-3) and not study.done(path, "flow_grpo", 0, 3e-3)
    assert len(study.load(path)["runs"]) == 2
    study.append(path, run("flow_grpo", 1e-3, [0.2]), key=("method", "seed", "learning_rate"))  # kept already
    study.append(path, run("flow_grpo", 1e-3, [0.2], seed=1), key=("method", "seed", "learning_rate"))
    assert [(r["seed"], r["evals"][0]["proxy"]) for r in study.load(path)["runs"]] == [(0, 0.1), (0, 0.1), (1, 0.2)]


def test_best_rate_is_the_highest_late_proxy_and_kl_variants_inherit_it():
    sweep = {
        "runs": [
            run("flow_grpo", 1e-3, [0.1, 0.12, 0.13, 0.14]),
            run("flow_grpo", 1e-2, [0.1, 0.3, 0.1, 0.05, 0.05]),  # peaked early, ends low
            run("grpo_guard", 3e-4, [0.1, 0.2, 0.2, 0.2]),
        ]
    }
    best = study.best_rates(sweep)
    assert best["flow_grpo"] == pytest.approx(1e-3)
    assert best["flow_grpo_kl"] == best["flow_grpo"] and best["grpo_guard_kl"] == pytest.approx(3e-4)


def test_a_run_another_worker_holds_is_left_to_it_and_the_worker_ends_once_that_run_is_in(tmp_path, monkeypatch):
    import goodhart_testbed as testbed

    monkeypatch.setattr(testbed, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(testbed, "STUDY_FILE", str(tmp_path / "study.json"))
    monkeypatch.setattr(testbed, "study_plan", lambda methods: [("nft", 0, 1e-3), ("nft", 0, 3e-3)])
    trained = []

    def finished(rate, proxy):
        return {"method": "nft", "seed": 0, "learning_rate": rate, "evals": [{"step": 0, "proxy": proxy, "gold": 0.5}]}

    def study_run(method, seed, rate):
        trained.append(rate)
        return finished(rate, 0.1)

    monkeypatch.setattr(testbed, "study_run", study_run)
    other_worker = testbed.claimed(testbed.run_dir("nft", 0, 3e-3))
    assert other_worker.__enter__()

    def other_worker_finishes(seconds):
        if testbed.load(testbed.STUDY_FILE)["runs"][-1]["learning_rate"] == 3e-3:
            raise AssertionError("the worker waited again for a run that is in the results file")
        testbed.append(testbed.STUDY_FILE, finished(3e-3, 0.2))
        other_worker.__exit__(None, None, None)

    monkeypatch.setattr(testbed.time, "sleep", other_worker_finishes)
    testbed.run_study(("nft",), 0, 1)
    assert trained == [1e-3]  # the held run was never trained twice
    assert [r["evals"][0]["proxy"] for r in testbed.load(testbed.STUDY_FILE)["runs"]] == [0.1, 0.2]


def test_captions_are_disjoint_and_fixed():
    train, held_out = study.captions()
    assert len(train) == len(held_out) == 64 and not set(train) & set(held_out)
    assert study.captions() == (train, held_out)


def test_window_benchmark_compares_at_equal_training_time(tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import bench_window

    monkeypatch.setattr(bench_window, "WINDOW_FILE", str(tmp_path / "window.json"))

    def timed_run(window, seed, seconds_per_step, proxy_per_second):
        evals = [
            {"step": s, "train_seconds": s * seconds_per_step, "proxy": 0.1 + proxy_per_second * s * seconds_per_step,
             "gold": 0.5}
            for s in range(0, 41, 5)
        ]  # fmt: skip
        return {"method": "grpo_guard", "window": window, "seed": seed, "learning_rate": 1e-3, "evals": evals}

    for seed in range(2):
        bench_window.append(bench_window.WINDOW_FILE, timed_run("full", seed, 2.0, 0.001))
        bench_window.append(bench_window.WINDOW_FILE, timed_run("window2", seed, 1.0, 0.002))
    assert bench_window.done("grpo_guard", "window2", 1) and not bench_window.done("grpo_guard", "window3", 0)
    text = bench_window.analyse(plot_dir=None)
    assert "Equal training time: 40 s" in text  # window2's runs train 40 s; full ones 80 s
    full = next(line for line in text.splitlines() if "| full |" in line)
    window = next(line for line in text.splitlines() if "| window2 |" in line)
    assert "| 2.00 [2.00, 2.00] |" in full and "| 1.00 [1.00, 1.00] |" in window
    assert "0.140 [0.140, 0.140]" in full and "0.180 [0.180, 0.180]" in window  # proxy after 40 s
    assert "| grpo_guard | window2 | 0.50x | 2.00x |" in text  # half the cost per step, twice the gain per second
    # gold at matched proxy: both configurations keep gold 0.5 at every level
    matched = [line for line in text.splitlines() if line.startswith("| window2 | ")]
    assert matched and matched[0].count("0.500 [0.500, 0.500] (2)") == 4
    # with the idle one-process cost, equal time is read off the steps: 40 s is 20 full steps, 40 window steps
    monkeypatch.setattr(bench_window, "COST_FILE", str(tmp_path / "cost.json"))
    (tmp_path / "cost.json").write_text('{"seconds_per_step": {"full": [2.0, 2.2, 1.8], "window2": [1.0, 1.0, 1.1]}}')
    clean = bench_window.analyse(plot_dir=None)
    assert "equal time 40 s" in clean
    assert (
        "| grpo_guard | full | 20 | 0.140 [0.140, 0.140] | 0.500 [0.500, 0.500] | 0.00100 [0.00100, 0.00100] | 1.00x |"
        in clean
    )
    assert "| grpo_guard | window2 | 40 | 0.180 [0.180, 0.180] |" in clean and "| 2.00x |" in clean
    plotted = bench_window.analyse(plot_dir=str(tmp_path))
    assert (tmp_path / "window.png").stat().st_size > 0 and "window.png" in plotted


class _Stopped(Exception):
    pass


@pytest.mark.slow
def test_a_stopped_study_run_continues_from_its_checkpoint_to_the_evaluations_of_an_unstopped_one(
    tmp_path, monkeypatch
):
    import overoptimization
    from goodhart_testbed import _watching_alarm
    from transformers import TrainerCallback

    train, held_out = overoptimization.captions()
    monkeypatch.setattr(overoptimization, "captions", lambda: (train, held_out[:4]))

    class StopAfterCheckpoint(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:  # checkpoint-2 and its bookkeeping are written
                raise _Stopped

    class Evaluations(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_evaluate(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    def run(output_dir, *extra, resume=True):
        alarm = _watching_alarm()
        record = overoptimization.train_run(
            "flow_grpo", 0, 3e-3, 3, str(tmp_path / output_dir), 1, train_captions=train[:8],
            callbacks=[alarm, *extra], resume=resume, per_device_train_batch_size=4, num_generations=4,
            num_inference_steps=4, eval_num_inference_steps=4,  # a round: 2 captions x 4 images of 4 steps
            logging_steps=1,  # logs where checkpoints are, as the study's (a log averages the steps since the last)
        )  # fmt: skip
        for e in record["evals"]:
            e.pop("train_seconds")
        record.pop("minutes")  # wall time: the only part of a record that may differ
        return record, alarm.state()

    plain, plain_alarm = run("plain", resume=False)
    with pytest.raises(_Stopped):
        run("stopped", StopAfterCheckpoint())
    assert sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-*")) == ["checkpoint-2"]
    # a checkpoint whose bookkeeping is missing: the run starts afresh. That run, with checkpointing and never
    # stopped, is the unstopped run the resumed one is compared with (one run checked for both).
    shutil.copytree(tmp_path / "stopped", tmp_path / "unstopped")
    (tmp_path / "unstopped" / "run_progress-2.json").unlink()
    evaluated = Evaluations()
    unstopped, unstopped_alarm = run("unstopped", evaluated)
    assert evaluated.steps == [0, 1, 2, 3]
    evaluated = Evaluations()
    resumed, resumed_alarm = run("stopped", evaluated)
    assert evaluated.steps == [3]  # it continued: a restart would have evaluated at 0, 1 and 2 again
    assert [e["step"] for e in resumed["evals"]] == [0, 1, 2, 3]
    assert resumed["evals"] == unstopped["evals"] == plain["evals"]
    assert resumed["train_rewards"] == unstopped["train_rewards"] == plain["train_rewards"]
    assert resumed_alarm == unstopped_alarm == plain_alarm
    assert unstopped == plain  # the restart afresh gives the record of a run without checkpoints

    # stopped after its last checkpoint, before its record was kept: read from that checkpoint, not trained past it
    evaluated = Evaluations()
    again, again_alarm = run("unstopped", evaluated)
    assert evaluated.steps == [] and again == unstopped and again_alarm == unstopped_alarm
    fired, restored = _watching_alarm(), _watching_alarm()
    fired.first_stop = 40
    restored.load_state(fired.state(), None)
    assert restored.first_stop == 40  # the step the watching alarm would have stopped at travels in the checkpoint
