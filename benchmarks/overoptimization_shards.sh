#!/bin/bash
# The whole over-optimisation study as two single-threaded background shards (2-core machine):
#   bash benchmarks/overoptimization_shards.sh          # logs in outputs/study/shard_{0,1}.log
# Each shard runs its share of the learning-rate sweep, waits until the whole sweep is in, then its share of the
# study. Finished runs are skipped, so rerunning after a stop resumes.
set -u
cd "$(dirname "$0")/.."
mkdir -p outputs/study
SWEEP_RUNS=6  # 3 rates x (flow_grpo, grpo_guard)
shard() {
  export OMP_NUM_THREADS=1
  python benchmarks/overoptimization.py sweep --shard "$1/2"
  until [ "$(python -c 'import json; print(len(json.load(open("docs/results/overoptimization_sweep.json"))["runs"]))' 2>/dev/null)" = "$SWEEP_RUNS" ]; do
    sleep 30
  done
  # Flow-GRPO and GRPO-Guard get all their seeds before the KL variants start
  python benchmarks/overoptimization.py study --seeds 4 --methods flow_grpo grpo_guard --shard "$1/2"
  python benchmarks/overoptimization.py study --seeds 4 --methods flow_grpo_kl grpo_guard_kl --shard "$1/2"
}
for i in 0 1; do
  shard "$i" > "outputs/study/shard_$i.log" 2>&1 &
done
wait
