"""Calibrating the learned-proxy benchmark: does the gold rise before it falls?

    python benchmarks/learned_proxy_probe.py [--seeds 0 1] [--steps 60] [--learning-rates 3e-3] [--shard 0/2]
    python benchmarks/learned_proxy_probe.py --proxy-dir /tmp/proxy_8k --results docs/results/probe_8k.json

Flow-GRPO trains on a learned proxy (`trl_guard.toy.learned_proxy`, or the weights in `--proxy-dir` written by
`benchmarks/train_learned_proxy.py --output-dir`) instead of the colour proxy, in the over-optimisation study's
setting (`benchmarks/overoptimization.py`), evaluated every `--eval-steps` on its 64 held-out captions: the proxy,
caption fidelity (the gold the proxy was trained to predict), cleanliness and the KL from the base. Each finished run
is appended to `--results` at once; finished runs are skipped. This is a probe for calibrating the benchmark, not
its study.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overoptimization import RESULTS, append, done, train_run  # noqa: E402

PROBE_FILE = os.path.join(RESULTS, "learned_proxy_probe.json")


def proxy_reward(path: str | None):
    """The shipped learned proxy, or the one saved in `path`, as a reward function; `path="gold"` trains on the gold
    itself (caption fidelity), the control: can RL raise it at all in this setting?"""
    from trl_guard.toy.learned_proxy import learned_proxy, load_learned_proxy, score

    if path == "gold":
        from trl_guard.toy import caption_fidelity

        return caption_fidelity
    if path is None:
        return learned_proxy
    model = load_learned_proxy(path)

    def learned_proxy_variant(prompts, images, **kwargs):
        return score(model, prompts, images)

    return learned_proxy_variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[3e-3])
    parser.add_argument(
        "--proxy-dir", default=None, help="weights from train_learned_proxy.py (default: shipped), or 'gold'"
    )
    parser.add_argument("--results", default=PROBE_FILE)
    parser.add_argument("--shard", default="0/1")
    options = parser.parse_args()
    reward = proxy_reward(options.proxy_dir)

    shard, shards = (int(x) for x in options.shard.split("/"))
    plan = [(rate, seed) for rate in options.learning_rates for seed in options.seeds]
    for rate, seed in plan[shard::shards]:
        if done(options.results, "flow_grpo", seed, rate):
            continue
        run = train_run(
            "flow_grpo", seed, rate, options.steps, f"/tmp/probe/{seed}", options.eval_steps, reward=reward
        )
        run["proxy_name"] = "learned_proxy" if options.proxy_dir is None else options.proxy_dir
        append(options.results, run)
        print(rate, seed, " ".join(f"{e['step']}:{e['proxy']:.3f}/{e['gold']:.3f}" for e in run["evals"]), flush=True)


if __name__ == "__main__":
    main()
