#!/bin/bash
# The runs behind EVAL_NOTES §9 (pretrained setting, 1 epoch), in the order they were run;
# every step is resumable (finished runs are skipped). 2 processes, 1 thread each.
set -e
cd "$(dirname "$0")/.."
RUNS=benchmarks/results/eval_pretrained_runs.jsonl
G=".venv/bin/python research/eval_grid.py --runs $RUNS --jobs 2"
$G --poison-ratios 0.03,0.05,0.1 --variants plain,inline
$G --poison-ratios 0.0 --attacks badnets --variants plain,inline
$G --poison-ratios 0.03 --seeds 0 --variants scan,online
$G --poison-ratios 0.03 --variants control
$G --poison-ratios 0.01 --variants plain,inline
