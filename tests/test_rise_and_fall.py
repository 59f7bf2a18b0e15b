"""The learned-proxy study's measures on runs whose shape is known: a gold that rises then falls, one that only falls,
and the alarm replayed on them."""

import numpy as np
import pytest
from analysis.rise_and_fall import alarm_summary, peak_index, replay_alarm, rise_and_fall


def run(golds, proxies=None, seed=0, step=5):
    proxies = proxies if proxies is not None else np.linspace(0.5, 0.8, len(golds))
    return {
        "method": "m",
        "seed": seed,
        "learning_rate": 1e-3,
        "train_rewards": [{"step": 10, "reward": 0.5}, {"step": 20, "reward": 0.6}],
        "evals": [
            {"step": i * step, "gold": float(g), "proxy": float(p), "kl": 0.01 * i, "train_seconds": 10.0 * i}
            for i, (g, p) in enumerate(zip(golds, proxies))
        ],
    }


def rising_then_falling(seed):
    noise = np.random.default_rng(seed).normal(0, 0.005, 13)
    golds = [0.45, 0.48, 0.51, 0.54, 0.56, 0.57, 0.56, 0.53, 0.49, 0.45, 0.41, 0.38, 0.36]
    return run(np.array(golds) + noise, seed=seed)


def test_a_rise_then_fall_is_found_with_its_peak_and_intervals():
    runs = [rising_then_falling(seed) for seed in range(4)]
    shape = rise_and_fall(runs)
    assert shape.peak_step == 25  # the sixth evaluation, every 5 steps
    assert shape.rise[1] > 0.09 and shape.fall[1] > 0.15 and shape.rises_then_falls
    assert shape.final_proxy_gain[0] > 0  # the proxy kept rising after the gold's peak


def test_a_gold_that_only_falls_does_not_count_as_a_rise():
    runs = [run(0.45 - 0.01 * np.arange(13) + np.random.default_rng(s).normal(0, 0.005, 13), seed=s) for s in range(4)]
    shape = rise_and_fall(runs)
    assert peak_index(runs) <= 1 and not shape.rises_then_falls
    assert shape.rise[1] < 0.01  # no interval far above zero


def test_the_alarm_replay_stops_after_patience_and_keeps_the_best_weights():
    outcome = replay_alarm(rising_then_falling(0), tolerance=0.02, patience=2)
    # best at step 25 (0.57); the gold is more than 0.02 below it at steps 35 (0.53) and 40 (0.49), proxy rising
    assert outcome.stop_step == 40
    assert (
        outcome.restored_gold == pytest.approx(outcome.best_gold) and outcome.restored_gold > outcome.last_gold + 0.15
    )
    assert not outcome.false_alarm


def test_a_stop_where_the_gold_recovers_is_a_false_alarm():
    golds = [0.45, 0.50, 0.46, 0.46, 0.50, 0.51, 0.50, 0.52]  # a dip the gold comes back from
    outcome = replay_alarm(run(golds), tolerance=0.02, patience=2)
    assert outcome.stop_step == 15 and outcome.false_alarm


def test_no_stop_when_the_proxy_falls_with_the_gold():
    golds = [0.45, 0.50, 0.40, 0.35, 0.30]
    outcome = replay_alarm(run(golds, proxies=[0.5, 0.6, 0.5, 0.4, 0.3]), tolerance=0.02, patience=2)
    assert outcome.stop_step is None and outcome.restored_gold == 0.30


def test_alarm_summary_counts_stops_and_false_alarms():
    runs = [rising_then_falling(s) for s in range(3)] + [run([0.45, 0.50, 0.46, 0.46, 0.50, 0.51, 0.50, 0.52])]
    summary = alarm_summary(runs)
    assert summary["runs"] == 4 and summary["stopped"] == 4 and summary["false_alarms"] == 1
    assert summary["restored_minus_last"][0] > 0


def test_the_study_script_analyses_a_study_and_resumes_from_its_file(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    benchmarks = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    spec = importlib.util.spec_from_file_location("learned_proxy_study", benchmarks / "learned_proxy_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)

    runs = []
    for seed in range(1, 4):
        flow = rising_then_falling(seed)
        guard = rising_then_falling(seed + 10)
        guard["evals"] = [{**e, "gold": e["gold"] + 0.01 * i} for i, e in enumerate(guard["evals"])]
        runs += [{**flow, "method": "flow_grpo"}, {**guard, "method": "grpo_guard"}]
    table = study.analyse({"runs": runs})
    assert "| flow_grpo | 0.001 | 3 | 25 |" in table and "| grpo_guard | 0.001 | 3 |" in table
    assert "Claim 4 holds here" in table  # GRPO-Guard's gold is higher by 0.01 an evaluation at every proxy
    assert "| flow_grpo | 3/3 | 40, 40, 40 | 0 |" in table

    def fake_run(method, seed, rate, *args, **kwargs):
        calls.append(method)
        return {**runs[0], "method": method, "seed": seed, "learning_rate": rate}

    calls = []
    monkeypatch.setattr(study, "train_run", fake_run)
    path = str(tmp_path / "study.json")
    study.run_plan(path, [("flow_grpo", 1, 3e-3), ("grpo_guard", 1, 1e-3)], 10, 5, reward=None)
    study.run_plan(path, [("flow_grpo", 1, 3e-3), ("grpo_guard", 1, 1e-3)], 10, 5, reward=None)
    assert len(calls) == 2 and len(study.load(path)["runs"]) == 2  # the second pass trained nothing again


def test_proxy_gain_per_second_and_gold_at_a_kl_level():
    from analysis.rise_and_fall import proxy_gain_per_second

    from trl_guard.report.verdict import gold_at_proxy

    rising = rising_then_falling(0)  # proxy 0.5 -> 0.8 over 12 evaluations of 10 training seconds each
    assert proxy_gain_per_second(rising) == pytest.approx(0.3 / 120)
    golds = [e["gold"] for e in rising["evals"]]
    # KL grows 0.01 an evaluation: sqrt(KL) = 0.2 is reached at evaluation 4, KL = 0.065 halfway between 6 and 7
    assert gold_at_proxy(rising, 0.2**2, key="kl") == pytest.approx(golds[4])
    assert gold_at_proxy(rising, 0.065, key="kl") == pytest.approx((golds[6] + golds[7]) / 2)
    assert gold_at_proxy(rising, 1.0, key="kl") is None


def test_the_plot_draws_every_run(tmp_path):
    pytest.importorskip("matplotlib")
    from analysis.rise_and_fall import plot_rise_and_fall

    runs = {"flow_grpo": [rising_then_falling(s) for s in range(2)], "grpo_guard": [rising_then_falling(5)]}
    path = plot_rise_and_fall(runs, str(tmp_path))
    assert path is not None and (tmp_path / "learned_proxy.png").stat().st_size > 10_000


def test_the_goodhart_study_matches_proxy_past_each_seeds_own_base(monkeypatch):
    """The testbed's seeds start from different held-out proxies. GRPO-Guard's gold is 0.01 an evaluation above
    Flow-GRPO's at every proxy past the base: matched on gains over each seed's step 0, claim 4 holds. (Matched on
    absolute levels past the mean base, the levels lay below the high seeds' own base, where both methods share step
    0's gold: a difference of exactly 0.)"""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import goodhart_testbed

    runs = []
    for seed, base in zip(goodhart_testbed.STUDY_SEEDS, (0.40, 0.50, 0.42, 0.48)):
        proxies = base + np.linspace(0.0, 0.1, 13)
        golds = [e["gold"] for e in rising_then_falling(seed)["evals"]]
        flow = run(golds, proxies, seed=seed)
        guard = {**flow, "evals": [{**e, "gold": e["gold"] + 0.01 * i} for i, e in enumerate(flow["evals"])]}
        runs += [{**flow, "method": "flow_grpo"}, {**guard, "method": "grpo_guard"}]
    text = goodhart_testbed.analyse_study({"runs": runs})
    assert "Claim 4 holds here" in text, text
    assert "+0.000 [+0.000, +0.000]" not in text


def test_the_declared_shape_readings_wait_for_all_seeds_and_ask_awm_for_a_proxy_that_keeps_its_gain(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import goodhart_testbed

    seeds = goodhart_testbed.STUDY_SEEDS
    flow = [{**rising_then_falling(seed), "method": "flow_grpo"} for seed in seeds]
    text = goodhart_testbed.declared_shapes({"flow_grpo": flow, "awm": flow[:3]})
    assert "Flow-GRPO rises then falls (the declared target): yes" in text
    assert "under AWM (declared 2026-12-07): waits for its seeds (3 of 4)" in text
    # the same gold, but the proxy gives back after the gold's peak what it had gained: not over-optimisation
    peaked = np.concatenate([np.linspace(0.5, 0.8, 6), np.linspace(0.78, 0.5, 7)])
    awm = [{**run([e["gold"] for e in r["evals"]], peaked, seed=r["seed"]), "method": "awm"} for r in flow]
    assert "under AWM (declared 2026-12-07): no" in goodhart_testbed.declared_shapes({"awm": awm})
    awm = [{**r, "method": "awm"} for r in flow]
    assert "under AWM (declared 2026-12-07): yes" in goodhart_testbed.declared_shapes({"awm": awm})


def test_flow_dppos_declared_reading_decides_at_holms_level_for_a_fourth_reading(monkeypatch):
    """Seeds whose rise and fall clear 0 at 95% (t = 4.3 on 3 degrees of freedom) but not at 98.75% (t needs 5.39):
    Flow-DPPO's reading says no, and prints the 95% intervals beside as description; clearer seeds say yes."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import goodhart_testbed
    from analysis.rise_and_fall import rise_and_fall

    hump = np.array([0.45, 0.48, 0.51, 0.54, 0.56, 0.57, 0.56, 0.53, 0.49, 0.45, 0.41, 0.38, 0.36])
    seeds = goodhart_testbed.STUDY_SEEDS
    faint = [
        {**run(0.45 + k * (hump - 0.45), seed=s), "method": "flow_dppo"} for s, k in zip(seeds, (0.2, 0.4, 0.5, 0.7))
    ]
    assert rise_and_fall(faint).rises_then_falls and not rise_and_fall(faint, level=0.9875).rises_then_falls
    text = goodhart_testbed.declared_shapes({"flow_dppo": faint})
    assert "under Flow-DPPO (declared 2026-12-08): no" in text
    assert "intervals at 98.75%; at 95%, as description: rise +0.051 [+0.013, " in text, text
    clear = [{**rising_then_falling(s), "method": "flow_dppo"} for s in seeds]
    assert "under Flow-DPPO (declared 2026-12-08): yes" in goodhart_testbed.declared_shapes({"flow_dppo": clear})
    assert "waits for its seeds (3 of 4)" in goodhart_testbed.declared_shapes({"flow_dppo": clear[:3]})


def test_the_goodhart_alarm_record_counts_catches_misses_and_false_alarms(monkeypatch):
    """A run whose gold falls 0.03 below its smoothed peak is caught when the alarm fires at or after the peak, missed
    when it fires before it or never; firing in a run whose gold did not fall is a false alarm; unwatched runs are
    left out."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from goodhart_testbed import alarm_record

    falling = [0.45, 0.50, 0.55, 0.56, 0.55, 0.50, 0.45, 0.40]  # smoothed peak at step 15, end 0.425
    flat = [0.45, 0.46, 0.45, 0.46, 0.45, 0.46, 0.45, 0.46]

    def watched(golds, first_stop):
        return {**run(golds), "alarm": {"first_stop": first_stop, "best_step": None}}

    runs = [
        watched(falling, 25),  # caught
        watched(falling, 5),  # fired before the peak: missed
        watched(falling, None),  # never fired: missed
        watched(flat, 20),  # false alarm
        watched(flat, None),
        run(falling),  # not watched
    ]
    assert alarm_record(runs) == (1, 3, 1)


def test_the_same_rate_supplement_pairs_guards_study_seeds_at_its_rate_and_resumes(monkeypatch, tmp_path):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import goodhart_testbed

    flows, study = [], []
    for seed in goodhart_testbed.STUDY_SEEDS:
        flow = {**rising_then_falling(seed), "method": "flow_grpo", "seed": seed}
        better = [{**e, "gold": e["gold"] + 0.01 * i} for i, e in enumerate(flow["evals"])]
        worse = [{**e, "gold": e["gold"] - 0.01 * i} for i, e in enumerate(flow["evals"])]
        flows.append(flow)
        study += [
            {**flow, "method": "grpo_guard", "learning_rate": 1e-3, "evals": better},
            {**flow, "method": "grpo_guard", "learning_rate": 3e-4, "evals": worse},  # another rate: not read
        ]
    text = goodhart_testbed.analyse_same_rate({"runs": study}, {"runs": flows})
    assert "Claim 4 holds here" in text and "| flow_grpo | 0.001 | 4 | 25 |" in text

    calls = []
    monkeypatch.setattr(goodhart_testbed, "SAME_RATE_FILE", str(tmp_path / "same_rate.json"))
    monkeypatch.setattr(goodhart_testbed, "RUNS", str(tmp_path / "runs"))  # never the study's own checkpoints
    monkeypatch.setattr(
        goodhart_testbed, "study_run", lambda m, seed, rate: calls.append(seed) or {**flows[0], "seed": seed}
    )
    goodhart_testbed.append(goodhart_testbed.SAME_RATE_FILE, {**flows[0], "seed": 1})  # finished before a stop
    goodhart_testbed.run_same_rate()
    assert calls == [2, 3, 4]
    assert sorted(r["seed"] for r in goodhart_testbed.load(goodhart_testbed.SAME_RATE_FILE)["runs"]) == [1, 2, 3, 4]


def test_the_goodhart_plots_draw_every_seed_run_and_every_sweep_run(monkeypatch, tmp_path):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import goodhart_testbed

    monkeypatch.setattr(goodhart_testbed, "CALIBRATION_FILE", str(tmp_path / "no_calibration.json"))
    sweep = [{**rising_then_falling(0), "method": "grpo_guard", "learning_rate": rate} for rate in (3e-4, 1e-3)]
    seeds = [{**rising_then_falling(s), "method": m, "seed": s} for s in (1, 2) for m in ("flow_grpo", "grpo_guard")]
    text = goodhart_testbed.analyse_study({"runs": sweep + seeds}, plot_dir=str(tmp_path))
    assert (tmp_path / "goodhart_study.png").stat().st_size > 10_000
    assert (tmp_path / "goodhart_sweeps.png").stat().st_size > 10_000
    assert text.count("Plot: ") == 2
    sweeps = text.split("The sweeps (seed 0):")[1]
    base, late = rising_then_falling(0)["evals"][0], rising_then_falling(0)["evals"][-3:]
    gold = f"{base['gold']:.3f}, {np.mean([e['gold'] for e in late]):.3f}"
    assert sweeps.count("| grpo_guard |") == 2 and f"| grpo_guard | 0.0003 | 0.500, 0.775 | {gold} | 0.12 |" in sweeps


def test_the_study_runs_only_what_its_file_lacks_and_says_where_it_stands(monkeypatch, tmp_path):
    """A stopped study started again runs only the planned runs its results file lacks (seed runs at their method's
    swept rate), drops each finished run's checkpoints, and `status` counts what is done, under way and to run."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import goodhart_testbed

    for name, file in (("STUDY_FILE", "study.json"), ("CALIBRATION_FILE", "calibration.json"), ("RUNS", "runs")):
        monkeypatch.setattr(goodhart_testbed, name, str(tmp_path / file))
    late = {1e-3: 0.50, 3e-3: 0.40, 3e-4: 0.45}  # each rate's proxy: 1e-3 is the best swept rate of both methods

    def record(method, seed, rate, candidate=None):
        evals = [{"step": 10 * i, "proxy": late[rate], "gold": 0.5, "kl": 0.0} for i in range(4)]
        return {"method": method, "seed": seed, "learning_rate": rate, "evals": evals} | (
            {"candidate": candidate} if candidate else {}
        )

    for rate in (1e-3, 3e-3):
        goodhart_testbed.append(goodhart_testbed.CALIBRATION_FILE, record("flow_grpo", 0, rate, "stream"))
    for run in (record("grpo_guard", 0, 3e-4), record("grpo_guard", 0, 1e-3), record("flow_grpo", 1, 1e-3)):
        goodhart_testbed.append(goodhart_testbed.STUDY_FILE, run)  # finished before a stop
    under_way = Path(goodhart_testbed.run_dir("grpo_guard", 2, 1e-3)) / "checkpoint-40"
    under_way.mkdir(parents=True)
    status = goodhart_testbed.study_status(("flow_grpo", "grpo_guard"))
    assert status.startswith("10 planned runs: 3 done, 1 under way, 6 to run.")
    left = "seed 1 at 0.001, seed 3 at 0.001, seed 4 at 0.001"
    assert f"| grpo_guard | 2 | seed 2 at 0.001 (step 40, stopped) | {left} |" in status
    with goodhart_testbed.claimed(str(under_way.parent)) as held:  # as a worker training it holds it
        assert held and "seed 2 at 0.001 (step 40, training)" in goodhart_testbed.study_status(("grpo_guard",))

    calls = []
    monkeypatch.setattr(
        goodhart_testbed, "study_run", lambda m, seed, rate: calls.append((m, seed)) or record(m, seed, rate)
    )
    goodhart_testbed.run_study(("flow_grpo", "grpo_guard"), 0, 1)
    assert calls == [("grpo_guard", 1), ("flow_grpo", 2), ("grpo_guard", 2), ("flow_grpo", 3), ("grpo_guard", 3),
                     ("flow_grpo", 4), ("grpo_guard", 4)]  # fmt: skip
    assert not under_way.parent.exists()  # its checkpoints went once the run was in the file
    assert goodhart_testbed.study_status(("flow_grpo", "grpo_guard")).startswith("10 planned runs: 10 done,")


def test_the_seeded_calibration_runs_its_declared_plan_once_and_reads_the_shape_at_the_picked_rate(
    monkeypatch, tmp_path
):
    """The second calibration stage: candidate c's seeds 1-4 at both rates, then the control, each run once (a stopped
    stage resumes); the verdict waits for every run, then reads the rate with the higher late proxy."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import goodhart_testbed as g

    monkeypatch.setattr(g, "CALIBRATION_FILE", str(tmp_path / "calibration.json"))
    monkeypatch.setattr(g, "RUNS", str(tmp_path / "runs"))

    def fake(method, seed, rate, candidate):
        shaped = rising_then_falling(seed) if rate == 1e-3 else run(np.linspace(0.5, 0.3, 13), seed=seed)
        if candidate == "structure_only":
            shaped = run(np.linspace(0.45, 0.55, 13), seed=seed)
        proxy_lift = 0.1 if rate == 1e-3 else 0.0  # 1e-3 ends with the higher proxy: the picked rate
        evals = [{**e, "proxy": e["proxy"] + proxy_lift} for e in shaped["evals"]]
        return {**shaped, "method": method, "learning_rate": rate, "evals": evals}

    calls = []
    monkeypatch.setattr(g, "study_run", lambda *a: calls.append(a) or fake(*a))
    g.append(g.CALIBRATION_FILE, {**fake("flow_grpo", 1, 1e-3, "designed"), "candidate": "designed"})
    g.run_seeded(1, 2)
    assert "no verdict yet" in g.analyse_seeded(g.load(g.CALIBRATION_FILE))
    g.run_seeded(0, 2)
    assert len(calls) == 8 and ("flow_grpo", 1, 1e-3, "designed") not in calls  # the first was there before a stop
    assert calls[-1] == ("flow_grpo", 1, 3e-3, "structure_only")
    text = g.analyse_seeded(g.load(g.CALIBRATION_FILE))
    assert "| 0.001 (picked) | 4 |" in text and "| 0.003 | 4 |" in text
    assert "Verdict: candidate c shows the rise-then-fall at 0.001" in text and "control raised the gold" in text


def test_what_the_seeds_can_show_reads_the_rises_spread_and_the_early_change(monkeypatch):
    """Four seeds whose gold steps from 0.5 to a plateau 0.01-0.04 higher: the rises' sd is 0.0129, so 4 seeds show a
    mean rise of 3.182 * 0.0129 / 2 and 8 seeds 2.365 * 0.0129 / sqrt(8); the early change is the plateau's mean."""
    from pathlib import Path

    from analysis.rise_and_fall import early_change, smallest_visible_rise

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import goodhart_testbed

    lifts = (0.01, 0.02, 0.03, 0.04)
    runs = [{**run([0.5] + [0.5 + lift] * 12, seed=s), "method": "awm"} for s, lift in zip((1, 2, 3, 4), lifts)]
    sd = np.std(lifts, ddof=1)
    assert smallest_visible_rise(runs, 4) == pytest.approx(3.182 * sd / 2, abs=1e-4)
    assert smallest_visible_rise(runs, 8) == pytest.approx(2.365 * sd / np.sqrt(8), abs=1e-4)
    assert early_change(runs)[0] == pytest.approx(0.025)
    table = goodhart_testbed.what_seeds_can_show({"awm": runs, "nft": runs[:3]})
    assert "| awm | 0.021, 0.011 | +0.025 [+0.004, +0.046] |" in table and "nft" not in table
    assert goodhart_testbed.what_seeds_can_show({"nft": runs[:3]}) == ""
