"""The study's statistics: matched-proxy interpolation, bootstrap intervals, and the tables on synthetic runs."""

import numpy as np
import pytest
from analysis.overoptimization import analyse, bootstrap, bootstrap_difference

from trl_guard.report.verdict import gold_at_proxy


def run(method, seed, slope):
    """Proxy rises linearly; gold falls with the proxy at `slope` (per unit of proxy), plus seed noise."""
    rng = np.random.default_rng(seed)
    proxies = np.linspace(0.1, 0.3, 11)
    evals = [
        {"step": 10 * i, "proxy": float(p), "gold": float(0.6 - slope * (p - 0.1) + rng.normal(0, 0.005)), "kl": 0.01 * i,
         "cleanliness": 0.99}
        for i, p in enumerate(proxies)
    ]  # fmt: skip
    return {"method": method, "seed": seed, "learning_rate": 1e-3, "evals": evals}


def test_gold_at_proxy_interpolates_the_first_crossing():
    r = {"evals": [{"proxy": 0.1, "gold": 0.6}, {"proxy": 0.3, "gold": 0.4}, {"proxy": 0.2, "gold": 0.1}]}
    assert gold_at_proxy(r, 0.2) == pytest.approx(0.5)  # the crossing between the first two, not the third
    assert gold_at_proxy(r, 0.05) == pytest.approx(0.6)
    assert gold_at_proxy(r, 0.35) is None


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_seeds():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1, 1, 4), rng.normal(1, 1, 400)
    for values in (small, large):
        mean, low, high = bootstrap(values)
        assert low <= mean <= high
    assert bootstrap(large)[2] - bootstrap(large)[1] < bootstrap(small)[2] - bootstrap(small)[1]
    diff, low, high = bootstrap_difference([1.0, 1.1, 0.9, 1.0], [0.0, 0.1, -0.1, 0.0])
    assert diff == pytest.approx(1.0) and low > 0.8 and high < 1.2


def test_analysis_separates_a_protective_method_from_a_hacking_one(tmp_path):
    study = {
        "runs": [run("flow_grpo", s, slope=2.0) for s in range(4)] + [run("grpo_guard", s, 0.5) for s in range(4)]
    }
    text = analyse(study, plot_dir=str(tmp_path))
    rows = [line for line in text.splitlines() if line.startswith("| 0.") and "[" in line]
    differences = [row for row in rows if row.count("|") == 3]  # the grpo_guard - flow_grpo table
    assert differences
    for row in differences:
        low = float(row.split("[")[1].split(",")[0])
        assert low > 0  # guard's gold is higher at every matched level, interval above 0
    assert (tmp_path / "overoptimization.png").exists()


@pytest.mark.parametrize(
    ("guard_slope", "expected"),
    [(0.5, "Claim 4 holds here"), (2.0, "Claim 4 is not shown here"), (4.0, "Claim 4 fails here")],
)
def test_verdict_is_stated_plainly_whichever_way_it_falls(guard_slope, expected):
    study = {
        "runs": [run("flow_grpo", s, slope=2.0) for s in range(4)]
        + [run("grpo_guard", s + 10, guard_slope) for s in range(4)]
    }
    text = analyse(study)
    assert text.startswith("### Verdict on claim 4") and expected in text


def test_sweep_runs_appear_in_the_plot(tmp_path):
    study = {"runs": [run("flow_grpo", s, 2.0) for s in range(2)] + [run("grpo_guard", s, 0.5) for s in range(2)]}
    sweep = {"runs": [dict(run("flow_grpo", 0, 2.0), learning_rate=lr) for lr in (1e-3, 3e-3)]}
    text = analyse(study, sweep, plot_dir=str(tmp_path))
    assert "Learning-rate sweep" in text and (tmp_path / "overoptimization.png").exists()


def test_shared_seeds_are_compared_in_pairs():
    from analysis.overoptimization import difference

    # seed effects far larger than the method effect: only pairing by seed sees the method effect
    flow = {s: 0.1 * s for s in range(4)}
    guard = {s: 0.1 * s + 0.01 + 0.001 * (s % 2) for s in range(4)}
    diff, low, high, paired = difference(guard, flow)
    assert paired and low > 0.009 and diff == pytest.approx(0.0105)
    diff, low, high, paired = difference(guard, {s + 10: v for s, v in flow.items()})
    assert not paired and low < 0 < high
    study = {"runs": [run("flow_grpo", s, 2.0) for s in range(4)] + [run("grpo_guard", s, 0.5) for s in range(4)]}
    assert "paired by seed" in analyse(study)


def test_t_interval_matches_the_textbook():
    from analysis.overoptimization import t_interval

    mean, low, high = t_interval([1.0, 2.0, 3.0])  # sd 1, n 3, t(0.975, 2) = 4.303
    assert mean == 2.0 and high - mean == pytest.approx(4.303 / np.sqrt(3), abs=1e-3)
    assert np.isnan(t_interval([1.0])[1])


def test_t_quantile_matches_the_tables_and_the_closed_form():
    """The 95% two-sided quantiles of the standard tables, and at another level the closed-form CDF of t on 3
    degrees of freedom: P(|T| <= t) = (2 / pi) (atan(t / sqrt 3) + sqrt(3) t / (3 + t^2))."""
    from analysis.overoptimization import t_interval, t_quantile

    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045}
    for df, expected in table.items():
        assert t_quantile(df) == pytest.approx(expected, abs=1e-3)
    t = t_quantile(3, 0.9875)
    assert 2 / np.pi * (np.arctan(t / np.sqrt(3)) + np.sqrt(3) * t / (3 + t**2)) == pytest.approx(0.9875, abs=1e-6)
    mean, low, high = t_interval([1.0, 2.0, 3.0, 4.0], level=0.9875)
    assert high - mean == pytest.approx(t * np.std([1, 2, 3, 4], ddof=1) / 2)


def test_a_run_that_reaches_only_some_matched_levels_is_left_out_of_the_average():
    """Claim 4 averages each run's gold over the common levels: a run that stops short of some of them is left out
    (it used to raise a KeyError), while the others are still compared."""
    from analysis.overoptimization import claim4_verdict

    runs = {"grpo_guard": [{"seed": s} for s in (1, 2, 3)], "flow_grpo": [{"seed": s} for s in (1, 2, 3)]}
    at_level = {
        0.1: {"grpo_guard": {1: 0.50, 2: 0.52, 3: 0.51}, "flow_grpo": {1: 0.40, 2: 0.41, 3: 0.40}},
        0.2: {"grpo_guard": {1: 0.48, 2: 0.50, 3: 0.49}, "flow_grpo": {1: 0.38, 2: 0.39}},  # seed 3 stops short
    }
    text = claim4_verdict(runs, [0.1, 0.2], at_level)
    assert "Claim 4 holds here" in text and "+0.100" in text


def test_the_goodhart_study_tests_each_declared_method_against_flow_grpo():
    """Claim 4's declared comparisons, GRPO-Guard and Flow-DPPO each minus Flow-GRPO, are both read, named as the
    methods are known, with a method keeping more gold found to keep it."""
    from goodhart_testbed import shape_and_claim4

    def runs(method, gold_slope):
        return [
            {"method": method, "seed": seed, "learning_rate": 1e-3, "evals": [
                {"step": 10 * i, "proxy": 0.4 + 0.02 * i + 0.001 * seed, "gold": 0.5 + gold_slope * i + 0.002 * seed,
                 "kl": 0.01 * i} for i in range(8)
            ]}
            for seed in (1, 2, 3, 4)
        ]  # fmt: skip

    text = shape_and_claim4(
        {
            "flow_grpo": runs("flow_grpo", -0.03),
            "grpo_guard": runs("grpo_guard", -0.03),
            "flow_dppo": runs("flow_dppo", 0.0),
        }
    )
    guard, dppo = text.split("Claim 4 (")[1:]
    assert "GRPO-Guard and Flow-GRPO keep the same gold" in guard
    assert "Claim 4 holds here: Flow-DPPO keeps more gold than Flow-GRPO" in dppo
