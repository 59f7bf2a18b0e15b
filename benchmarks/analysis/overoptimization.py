"""Over-optimisation analysis of runs evaluated on a proxy and a gold score: tables, intervals and plots.

Used by `benchmarks/overoptimization.py analyse` (the multi-seed study) and the other benchmarks' analyses. A run
is a dict with `method` and `evals`, a list of `{"step", "proxy", "gold", "kl", ...}` evaluations in step order.

Intervals are 95% percentile bootstrap intervals over seeds (2,000 resamples). "Gold at matched proxy" reads, for each
run, the gold score where its evaluation proxy first reaches a level (linear interpolation between the two evaluations
around the crossing, `trl_guard.report.verdict.gold_at_proxy`); runs that never reach a level are left out of it,
and the tables say how many reached it.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from trl_guard.report.verdict import gold_at_proxy


def bootstrap(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95% percentile bootstrap interval."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return (np.nan, np.nan, np.nan)
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(resamples, len(values)), replace=True).mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def bootstrap_difference(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0):
    """Mean of a minus mean of b, with its 95% bootstrap interval (seeds resampled independently per method)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return (np.nan, np.nan, np.nan)
    rng = np.random.default_rng(seed)
    diffs = rng.choice(a, (resamples, len(a))).mean(1) - rng.choice(b, (resamples, len(b))).mean(1)
    return float(a.mean() - b.mean()), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def fmt(mean_low_high: tuple[float, float, float], digits: int = 3, sign: bool = False) -> str:
    """ "mean [low, high]", each with a + before positive values when `sign`."""
    mean, low, high = mean_low_high
    spec = f"{'+' if sign else ''}.{digits}f"
    return "n/a" if np.isnan(mean) else f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]"


def by_method(study: dict) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for run in study["runs"]:
        runs.setdefault(run["method"], []).append(run)
    return runs


def over_base(run: dict) -> dict:
    """`run` with each evaluation's proxy replaced by its gain over the run's own step-0 proxy.

    For matching where the base's proxy differs by seed (the Goodhart testbed evaluates each seed on its own noise:
    0.41-0.50 at step 0): absolute levels past the seeds' mean base lie below some seeds' own base, where
    `gold_at_proxy` returns step 0's gold, the same for both methods of a seed, and the paired difference is exactly 0.
    Both methods of a seed share its base, so matching gains is matching proxy past that base."""
    base = run["evals"][0]["proxy"]
    return {**run, "evals": [{**e, "proxy": e["proxy"] - base} for e in run["evals"]]}


def matched_levels(runs: dict[str, list[dict]], count: int = 6) -> list[float]:
    """Proxy levels between the base models' proxy and the level every method's median run reaches."""
    base = np.mean([r["evals"][0]["proxy"] for group in runs.values() for r in group])
    reach = min(np.median([max(e["proxy"] for e in r["evals"]) for r in group]) for group in runs.values())
    return [float(x) for x in np.linspace(base, reach, count + 2)[1:-1]] if reach > base else []


def analyse(study: dict, sweep: dict | None = None, plot_dir: str | None = None) -> str:
    runs = by_method(study)
    lines = ["## Over-optimisation study", ""]
    if sweep and sweep["runs"]:
        lines += ["Learning-rate sweep (seed 0; mean proxy over the last three evaluations, final gold):", ""]
        lines += [
            "| method | learning rate | proxy (last 3) | gold at the end | gold at step 0 |",
            "|---|---|---|---|---|",
        ]
        for run in sorted(sweep["runs"], key=lambda r: (r["method"], r["learning_rate"])):
            proxy = np.mean([e["proxy"] for e in run["evals"][-3:]])
            lines.append(
                f"| {run['method']} | {run['learning_rate']:g} | {proxy:.3f} | {run['evals'][-1]['gold']:.3f} | "
                f"{run['evals'][0]['gold']:.3f} |"
            )
        lines.append("")
    lines += ["Per method, mean over seeds with 95% bootstrap intervals:", ""]
    lines += ["| method | lr | seeds | step | proxy | gold (caption fidelity) | cleanliness | KL to base |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for method, group in runs.items():
        steps = sorted({e["step"] for r in group for e in r["evals"]})
        for step in (steps[0], steps[len(steps) // 2], steps[-1]):
            at = [
                next(e for e in r["evals"] if e["step"] == step)
                for r in group
                if any(e["step"] == step for e in r["evals"])
            ]
            lines.append(
                f"| {method} | {group[0]['learning_rate']:g} | {len(at)} | {step} | {fmt(bootstrap([e['proxy'] for e in at]))} | "
                f"{fmt(bootstrap([e['gold'] for e in at]))} | {fmt(bootstrap([e['cleanliness'] for e in at]))} | "
                f"{fmt(bootstrap([e['kl'] for e in at]), 4)} |"
            )
    levels = matched_levels(runs)
    lines += ["", "Gold at matched proxy (runs that reached the level / all runs):", ""]
    lines += ["| proxy level | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    at_level: dict[float, dict[str, dict[int, float]]] = {}  # level -> method -> seed -> gold
    for level in levels:
        at_level[level] = {
            m: {r["seed"]: g for r in group if (g := gold_at_proxy(r, level)) is not None} for m, group in runs.items()
        }
        cells = [
            f"{fmt(bootstrap(list(at_level[level][m].values())))} ({len(at_level[level][m])}/{len(runs[m])})"
            for m in runs
        ]
        lines.append(f"| {level:.3f} | " + " | ".join(cells) + " |")
    pairs = [("grpo_guard", "flow_grpo"), ("grpo_guard_kl", "flow_grpo_kl"), ("grpo_guard", "flow_grpo_kl")]
    pairs = [(a, b) for a, b in pairs if a in runs and b in runs]
    if pairs and levels:
        lines += [
            "",
            "Differences in gold at matched proxy (first minus second; 95% bootstrap interval, paired by seed where "
            "both methods have the seed):",
            "",
        ]
        lines += [
            "| proxy level | " + " | ".join(f"{a} - {b}" for a, b in pairs) + " |",
            "|---" * (len(pairs) + 1) + "|",
        ]
        for level in levels:
            cells = [fmt(difference(at_level[level][a], at_level[level][b])[:3]) for a, b in pairs]
            lines.append(f"| {level:.3f} | " + " | ".join(cells) + " |")
    # The verdict compares the two methods of the claim on the levels both reach, whatever other methods the file holds.
    pair = {m: runs[m] for m in ("grpo_guard", "flow_grpo") if m in runs}
    pair_levels = matched_levels(pair)
    pair_at_level = {
        level: {
            m: {r["seed"]: g for r in group if (g := gold_at_proxy(r, level)) is not None} for m, group in pair.items()
        }
        for level in pair_levels
    }
    verdict = claim4_verdict(pair, pair_levels, pair_at_level)
    text = "\n".join(["### Verdict on claim 4", "", verdict, "", *lines])
    if plot_dir is not None:
        plot(runs, levels, plot_dir, sweep=sweep)
    return text


@functools.cache
def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided `level` quantile of Student's t with `df` degrees of freedom: the t with P(|T| <= t) = level.
    Bisection on the density integrated with the trapezoid rule (to about 1e-5 here), which keeps scipy out."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def central(t: float) -> float:
        x = np.linspace(0.0, t, 20001)
        return 2.0 * float(np.trapezoid(np.exp(log_norm - (df + 1) / 2 * np.log1p(x**2 / df)), x))

    low, high = 0.0, 2.0
    while central(high) < level:
        low, high = high, 2 * high
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if central(middle) < level else (low, middle)
    return (low + high) / 2


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its Student-t interval at `level`. With the handful of seeds a study affords,
    the percentile bootstrap is too narrow (with 2 seeds it has 3 possible values); the t interval is the honest one."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return (float(values.mean()) if len(values) else np.nan, np.nan, np.nan)
    half = t_quantile(len(values) - 1, level) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(values.mean() - half), float(values.mean() + half)


def difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, bool]:
    """Mean gold of `a` minus `b` with its 95% bootstrap interval, and whether it was paired. Seeds shared by both
    methods start from the same base model draw and are evaluated with the same noise, so their per-seed differences
    are bootstrapped (paired); with fewer than two shared seeds the methods are resampled independently."""
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:
        return (*bootstrap([a[s] - b[s] for s in shared]), True)
    return (*bootstrap_difference(list(a.values()), list(b.values())), False)


def _named(method: str) -> str:
    """A study's method as the algorithms name it (`grpo_guard`: GRPO-Guard); a variant (`flow_grpo_kl`) as it is."""
    from trl_guard.algorithms import method_name

    try:
        return method_name(method)
    except ValueError:
        return method


def claim4_verdict(
    runs: dict[str, list[dict]],
    levels: list[float],
    at_level: dict[float, dict[str, dict[int, float]]],
    method: str = "grpo_guard",
    baseline: str = "flow_grpo",
) -> str:
    """Claim 4 of GRPO-Guard, "at a comparable proxy reward the gold score falls much less than under Flow-GRPO", for
    `method` against `baseline` (GRPO-Guard against Flow-GRPO, the claim itself, unless told otherwise).

    One pre-declared test decides, so that testing several levels cannot find a difference by chance: per run, the
    gold averaged over the matched proxy levels that both methods' runs reached, and `method`'s mean minus
    `baseline`'s with its 95% bootstrap interval (paired by seed where both methods have the seed; paired differences
    also get a Student-t interval, and the verdict uses the wider of the two). The claim holds if the interval is
    above 0, fails if it is below 0, and is not shown if it spans 0. The per-level differences follow,
    as description."""
    name, base_name = _named(method), _named(baseline)
    if method not in runs or baseline not in runs or not levels:
        return f"Not enough runs for a verdict: both {baseline} and {method} must reach a common proxy level."
    common = [
        level
        for level in levels
        if len(at_level[level][method]) >= 2
        and len(at_level[level][baseline]) >= 2
        and set(at_level[level][method]) | set(at_level[level][baseline])
        == {r["seed"] for m in (method, baseline) for r in runs[m]}
    ]
    if not common:
        return (
            "Not enough runs for a verdict: it needs at least two runs per method, and a matched proxy level that "
            "every run of both methods reached."
        )

    def averaged(m: str) -> dict[int, float]:
        # a run enters with the levels it reached all of: the mean would otherwise be over different levels
        seeds = set.intersection(*(set(at_level[level][m]) for level in common))
        return {seed: float(np.mean([at_level[level][m][seed] for level in common])) for seed in sorted(seeds)}

    ours, theirs = averaged(method), averaged(baseline)
    diff, low, high, paired = difference(ours, theirs)
    seeds = f"{len(runs[method])} {name} and {len(runs[baseline])} {base_name} runs"
    summary = (
        f"gold averaged over the matched proxy levels {common[0]:.3f}-{common[-1]:.3f}, {name} minus {base_name}: "
        f"{diff:+.3f}, 95% bootstrap interval [{low:+.3f}, {high:+.3f}]"
    )
    if paired:
        shared = sorted(set(ours) & set(theirs))
        _, t_low, t_high = t_interval([ours[s] - theirs[s] for s in shared])
        summary += f", Student-t interval [{t_low:+.3f}, {t_high:+.3f}] (paired by seed; {seeds})"
        # the verdict needs both intervals to agree: with few seeds the bootstrap alone is too narrow
        low, high = min(low, t_low), max(high, t_high)
    else:
        summary += f" (unpaired; {seeds})"
    if low > 0:
        head = f"Claim 4 holds here: {name} keeps more gold than {base_name} at matched proxy; {summary}."
    elif high < 0:
        head = f"Claim 4 fails here: {name} keeps less gold than {base_name} at matched proxy; {summary}."
    else:
        head = (
            f"Claim 4 is not shown here: {name} and {base_name} keep the same gold at matched proxy within the "
            f"interval; {summary}."
        )
    rows = []
    for level in common:
        d, lo, hi, _ = difference(at_level[level][method], at_level[level][baseline])
        rows.append(f"- proxy {level:.3f}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return head + "\nPer matched proxy level (description, not the test):\n" + "\n".join(rows)


def claim4_over_base(pair: dict[str, list[dict]], method: str = "grpo_guard", baseline: str = "flow_grpo") -> str:
    """`claim4_verdict` on `method`'s and `baseline`'s runs (`pair`) matched past each seed's own base (`over_base`),
    headed so that the levels read as gains: for testbeds whose base proxy differs by seed."""
    gained = {m: [over_base(r) for r in group] for m, group in pair.items()}
    levels = matched_levels(gained)
    at_level = {
        level: {m: {r["seed"]: g for r in group if (g := gold_at_proxy(r, level)) is not None} for m, group in gained.items()}
        for level in levels
    }  # fmt: skip
    return "Claim 4 (proxy levels are gains over each seed's step-0 proxy):\n" + claim4_verdict(
        gained, levels, at_level, method, baseline
    )


def plot(runs: dict[str, list[dict]], levels: list[float], plot_dir: str, sweep: dict | None = None) -> str | None:
    """Gold against proxy and against sqrt(KL): every run thin, each method's mean over seeds thick; with a sweep,
    a third panel shows every sweep run (gold against proxy, one line per method and rate)."""
    plt = pyplot_or_none()
    if plt is None:
        return None
    colours = dict(zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    sweep_runs = (sweep or {}).get("runs", [])
    fig, axes = plt.subplots(1, 3 if sweep_runs else 2, figsize=(18 if sweep_runs else 12, 4.8))
    for method, group in runs.items():
        for run in group:  # every run appears, thin
            proxy, gold = [e["proxy"] for e in run["evals"]], [e["gold"] for e in run["evals"]]
            kl = [np.sqrt(max(e["kl"], 0.0)) for e in run["evals"]]
            axes[0].plot(proxy, gold, color=colours[method], alpha=0.3, lw=0.8)
            axes[1].plot(kl, gold, color=colours[method], alpha=0.3, lw=0.8)
        mean = means_by_step(group, ("proxy", "gold", "kl"))
        axes[0].plot(
            mean["proxy"],
            mean["gold"],
            "o-",
            color=colours[method],
            lw=2,
            ms=3,
            label=f"{method} (mean of {len(group)})",
        )
        axes[1].plot(np.sqrt(mean["kl"]), mean["gold"], "o-", color=colours[method], lw=2, ms=3, label=method)
    for level in levels:
        axes[0].axvline(level, color="grey", lw=0.5, ls=":")
    axes[0].set(xlabel="proxy (colour, evaluated)", ylabel="gold (caption fidelity)", title="gold against proxy")
    axes[1].set(xlabel="sqrt(KL to the base policy)", ylabel="gold (caption fidelity)", title="gold against sqrt(KL)")
    axes[0].legend(fontsize=8)
    if sweep_runs:
        styles = {}
        for run in sorted(sweep_runs, key=lambda r: (r["method"], r["learning_rate"])):
            style = styles.setdefault(run["method"], ["-", "--", ":", "-."])
            axes[2].plot(
                [e["proxy"] for e in run["evals"]],
                [e["gold"] for e in run["evals"]],
                style.pop(0) if style else "-",
                marker="o",
                ms=2,
                color=colours.get(run["method"], "black"),
                label=f"{run['method']} lr {run['learning_rate']:g}",
            )
        axes[2].set(
            xlabel="proxy (colour, evaluated)", ylabel="gold (caption fidelity)", title="learning-rate sweep (seed 0)"
        )
        axes[2].legend(fontsize=7)
    return save_figure(fig, plot_dir, "overoptimization.png")


def pyplot_or_none():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed (plots are an
    extra: `pip install "trl-guard[report]"`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def means_by_step(group: list[dict], keys: tuple[str, ...]) -> dict[str, list[float]]:
    """The mean over a group's runs of each evaluation `key`, at each evaluated step in order."""
    steps = sorted({e["step"] for r in group for e in r["evals"]})
    return {
        key: [np.mean([e[key] for r in group for e in r["evals"] if e["step"] == s]) for s in steps] for key in keys
    }


def save_figure(fig, plot_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(plot_dir, exist_ok=True)
    path = os.path.join(plot_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
