#!/bin/bash
# The toy-world comparison of Flow-DPPO, DGPO and online Diffusion-DPO (benchmarks/bench_algorithms.py): sweep, then
# the seeds at the swept rates, then the cost per step, then the analysis, in ONE niced single-threaded process (the
# machine's 2 cores are shared with other work, so no shards):
#   mkdir -p /tmp/algos && nohup bash benchmarks/bench_algorithms.sh > /tmp/algos/bench.log 2>&1 &
# Finished runs are skipped and measured timings kept, so running it again after a stop resumes.
set -eu
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
for phase in sweep run cost analyse; do
  echo "== $phase $(date -u +%FT%TZ)"
  nice -n 10 "$PYTHON" benchmarks/bench_algorithms.py "$phase"
done
echo "== done $(date -u +%FT%TZ)"
