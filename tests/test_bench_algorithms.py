"""benchmarks/bench_algorithms.py's bookkeeping and analysis on synthetic results: the sweep and the runs resume and
use the declared settings and the swept rate; the table reads every method at step 20 with the measured cost."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import bench_algorithms  # noqa: E402


def synthetic(method, seed, rate, slope, steps=20, seconds_per_step=3.0, **extra):
    """A run whose proxy rises by `slope` per step from 0.1 and whose gold falls as the proxy rises."""
    evals = [
        {"step": s, "proxy": 0.1 + slope * s, "gold": 0.5 - slope * s, "train_seconds": s * seconds_per_step}
        for s in range(0, steps + 1, 5)
    ]
    return {"method": method, "seed": seed, "learning_rate": rate, "evals": evals, **extra}


@pytest.fixture
def files(tmp_path, monkeypatch):
    paths = {name: str(tmp_path / f"{name}.json") for name in ("window", "forward", "sweep", "runs", "cost")}
    monkeypatch.setattr(bench_algorithms, "WINDOW_FILE", paths["window"])
    monkeypatch.setattr(bench_algorithms, "FORWARD_FILE", paths["forward"])
    monkeypatch.setattr(bench_algorithms, "SWEEP_FILE", paths["sweep"])
    monkeypatch.setattr(bench_algorithms, "RUN_FILE", paths["runs"])
    monkeypatch.setattr(bench_algorithms, "COST_FILE", paths["cost"])
    return paths


def test_sweep_then_run_resume_with_the_declared_settings_and_the_swept_rate(files, monkeypatch):
    calls = []

    def fake_train_run(method, seed, rate, steps, output_dir, eval_steps, **fields):
        calls.append((method, seed, rate, steps, fields))
        slope = 0.01 if (method, rate) == ("dgpo", 3e-3) else 0.001
        return synthetic(method, seed, rate, slope)

    monkeypatch.setattr(bench_algorithms, "train_run", fake_train_run)
    bench_algorithms.append(files["sweep"], synthetic("dpo", 0, 1e-2, 0.004))  # finished before a stop
    bench_algorithms.sweep(None)
    assert len(calls) == 3 * len(bench_algorithms.METHODS) - 1 and ("dpo", 0, 1e-2) not in [c[:3] for c in calls]
    dgpo = next(c for c in calls if c[0] == "dgpo")
    # dgpo gets its declared fields; the loss type comes from the study's table, which knows every new method
    assert dgpo[3] == 20 and dgpo[4]["dgpo_num_train_timesteps"] == 4 and dgpo[4]["timestep_fraction"] == 1.0
    assert "loss_type" not in dgpo[4] and bench_algorithms.study.METHODS["dgpo"] == {"loss_type": "dgpo", "beta": 0.0}
    saved = bench_algorithms.load(files["sweep"])["runs"]
    assert next(r for r in saved if r["method"] == "dpo" and r["seed"] == 0 and r["learning_rate"] == 1e-3)[
        "settings"
    ] == {"dpo_beta": 100.0, "dpo_ref_update_steps": 2}

    calls.clear()
    bench_algorithms.run(None)
    by_method = {}
    for method, seed, rate, _, _ in calls:
        by_method.setdefault(method, []).append((seed, rate))
    assert by_method["dgpo"] == [(1, 3e-3), (2, 3e-3), (3, 3e-3)]  # the highest late proxy
    assert by_method["dpo"] == [(1, 1e-2), (2, 1e-2), (3, 1e-2)]  # the run finished before the stop counts
    calls.clear()
    bench_algorithms.run(None)
    assert calls == []  # everything is in: nothing runs again


def test_analysis_reads_every_method_at_step_20_with_the_measured_cost(files, tmp_path):
    for seed in range(3):  # the window benchmark's runs go to step 40; only their first 20 steps count
        bench_algorithms.append(files["window"], synthetic("flow_grpo", seed, 3e-3, 0.004, steps=40, window="full"))
        bench_algorithms.append(files["window"], synthetic("flow_grpo", seed, 3e-3, 0.1, window="window2"))
        bench_algorithms.append(files["window"], synthetic("grpo_guard", seed, 3e-3, 0.004, steps=40, window="full"))
        bench_algorithms.append(files["forward"], synthetic("awm", seed + 1, 3e-3, 0.004, seconds_per_step=4.0))
        bench_algorithms.append(files["runs"], synthetic("dgpo", seed + 1, 3e-3, 0.004))
    bench_algorithms.append(files["runs"], synthetic("dpo", 1, 1e-2, 0.004, steps=10))  # cut short: left out
    for rate, slope in ((1e-3, 0.001), (3e-3, 0.004), (1e-2, 0.002)):
        bench_algorithms.append(files["sweep"], synthetic("dgpo", 0, rate, slope))
    with open(files["cost"], "w") as f:
        json.dump({"seconds_per_step": {"flow_grpo": [2.0, 2.2, 1.8], "dgpo": [1.0, 1.0]}}, f)

    compared = bench_algorithms.groups()
    assert [r["evals"][-1]["step"] for r in compared["flow_grpo"]] == [20, 20, 20]  # window2 runs are not compared
    text = bench_algorithms.analyse(plot_dir=str(tmp_path))
    assert "- dgpo lr 0.003: 0.160 *" in text and "- dgpo lr 0.01: 0.130\n" in text
    table = text.split("Gold at matched proxy")[0]
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    # proxy 0.18 at step 20; gain 0.08 over 20 steps, 0.004 a step, at 2 s (Flow-GRPO, GRPO-Guard) or 1 s (DGPO)
    assert rows["flow_grpo"] == (
        "| flow_grpo | 0,1,2 | 0.003 | 2.00 | 0.180 [0.180, 0.180] | 0.420 [0.420, 0.420] "
        "| 0.0040 [0.0040, 0.0040] | 1.00x | 0.00200 [0.00200, 0.00200] | 1.00x |"
    )
    assert "| 2.00 |" in rows["grpo_guard"] and rows["grpo_guard"].endswith(
        "| 1.00x | 0.00200 [0.00200, 0.00200] | 1.00x |"
    )
    # the same gain per step, at half the cost per step
    assert rows["dgpo"].startswith("| dgpo | 1,2,3 | 0.003 | 1.00 |")
    assert rows["dgpo"].endswith("| 1.00x | 0.00400 [0.00400, 0.00400] | 2.00x |")
    # AWM has no measured cost here: its runs' own 4 s per step, marked
    assert "| 4.00* |" in rows["awm"] and rows["awm"].endswith("| 1.00x | 0.00100 [0.00100, 0.00100] | 0.50x |")
    assert "| dpo |" not in text
    matched = [line for line in text.splitlines() if line.startswith("| dgpo | ") and "(3)" in line]
    assert matched and matched[0].count("(3)") == 4  # gold at four matched proxy levels, every run reaching each
    assert (tmp_path / "algorithms.png").stat().st_size > 0 and "algorithms.png" in text
