#!/bin/bash
# The runs behind EVAL_NOTES §9.4 (pretrained setting, 1 epoch), in the order they were run;
# every step is resumable (finished runs are skipped). 2 processes, 1 thread each.
# The plain SFT runs at 0/3/5/10 % were made first (commits 55c50ed..6c473eb, the plain path
# is unchanged since) together with a first pass of the inline runs on the two-view CE path
# (research/results/eval_pretrained_runs_first_pass.jsonl); every defended run below is on
# the single-view CE path of the product.
set -e
cd "$(dirname "$0")/.."
RUNS=benchmarks/results/eval_pretrained_runs.jsonl
G=".venv/bin/python research/eval_grid.py --runs $RUNS --jobs 2"
# the plain path is unchanged: one plain run again, on today's code, must equal the first pass's
.venv/bin/python research/eval_grid.py --runs research/results/plain_reproduction.jsonl --jobs 1 \
    --poison-ratios 0.03 --seeds 0 --attacks badnets --variants plain
$G --poison-ratios 0.03,0.05,0.1 --variants inline
$G --poison-ratios 0.0 --attacks badnets --variants inline,control
$G --poison-ratios 0.01 --variants plain
$G --poison-ratios 0.03 --seeds 0 --variants control,scan,online
$G --poison-ratios 0.01 --variants inline                                    # where plain is backdoored
$G --report benchmarks/results/eval_pretrained_cpu_2026-12-02 --poison-ratios 0,0.01,0.03,0.05,0.1 --variants plain,inline
$G --report benchmarks/results/eval_pretrained_modes_cpu_2026-12-02 --poison-ratios 0.03 --seeds 0 \
    --variants plain,inline,control,scan,online
