"""A first look at the learned proxy under RL: does the gold rise before it falls?

    python benchmarks/learned_proxy_probe.py [--seeds 0 1] [--steps 60] [--shard 0/2]

Flow-GRPO at the study's rate (3e-3) trains on `trl_guard.toy.learned_proxy` instead of the colour proxy, in the
over-optimisation study's setting (`benchmarks/overoptimization.py`), evaluated every 10 steps on its 64 held-out
captions: the proxy, caption fidelity (the gold the proxy was trained to predict), cleanliness and the KL from the
base. Each finished run is appended to `docs/results/learned_proxy_probe.json` at once; finished runs are skipped.
This is a probe for calibrating the learned-proxy benchmark, not its study.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overoptimization import RESULTS, append, done, train_run  # noqa: E402

PROBE_FILE = os.path.join(RESULTS, "learned_proxy_probe.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--shard", default="0/1")
    options = parser.parse_args()
    from trl_guard.toy.learned_proxy import learned_proxy

    shard, shards = (int(x) for x in options.shard.split("/"))
    for seed in options.seeds[shard::shards]:
        if done(PROBE_FILE, "flow_grpo", seed, options.learning_rate):
            continue
        run = train_run(
            "flow_grpo", seed, options.learning_rate, options.steps, f"/tmp/probe/{seed}", reward=learned_proxy
        )
        run["proxy_name"] = "learned_proxy"
        append(PROBE_FILE, run)
        print(" ".join(f"{e['step']}:{e['proxy']:.3f}/{e['gold']:.3f}" for e in run["evals"]), flush=True)


if __name__ == "__main__":
    main()
