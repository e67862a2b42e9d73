#!/usr/bin/env bash
# Device-machine job (4 GPUs): the scaling benchmark under load with its baselines
# (cold restart, replica, vertical) in the same run, plus the timeline plot.
# Results in $OUT/scale.tgz.
set -uo pipefail
R=/tmp/scale; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda
BENCH_HOLD_S=${HOLD:-5} BENCH_OUTPUT_SPREAD=${SPREAD:-16} BENCH_DIR=/tmp/emoe-scale node scripts/bench-scale.mjs > $R/scale.jsonl 2> $R/scale.err; echo "scale rc=$?"
node scripts/plot-timeline.mjs $R/scale.jsonl > $R/scale-timeline.svg 2> $R/plot.err; echo "plot rc=$?"
tar czf "$OUT/scale.tgz" -C /tmp scale
tail -n 40 $R/scale.err
