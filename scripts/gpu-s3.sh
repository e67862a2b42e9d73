#!/usr/bin/env bash
# Device-machine job (4 GPUs), third session: the GPU suites, decode throughput on one
# GPU with a per-kernel profile, and the scaling benchmark (elastic only unless
# BASELINES is set). Results in $OUT/s3.tgz.
set -uo pipefail
R=/tmp/s3; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  node node_modules/vitest/vitest.mjs run ${GPU_TESTS:-test/gpu} > $R/gpu-tests.log 2>&1; echo "gpu tests rc=$?"
  grep -E "Test Files|Tests |FAIL|×" $R/gpu-tests.log | head -30
fi
if [ "${SKIP_DECODE:-0}" != 1 ]; then
  BENCH_DEVICES=${DECODE_DEVICES:-0} BENCH_BATCHES=${BATCHES:-1,8,32,128} BENCH_PROFILE=${PROFILE:-1} BENCH_GRAPHS=${GRAPHS:-1} \
    node scripts/bench-decode.mjs > $R/decode.jsonl 2> $R/decode.err; echo "decode rc=$?"
  grep -v '"profile"' $R/decode.err | tail -n 12
  grep 'profile batch' $R/decode.err | cut -c1-400
fi
if [ "${SKIP_SCALE:-0}" != 1 ]; then
  BENCH_BASELINES=${BASELINES:-none} BENCH_HOLD_S=${HOLD:-5} BENCH_OUTPUT_SPREAD=16 BENCH_DIR=/tmp/emoe-scale \
    node scripts/bench-scale.mjs > $R/scale.jsonl 2> $R/scale.err; echo "scale rc=$?"
  node scripts/plot-timeline.mjs $R/scale.jsonl > $R/scale-timeline.svg 2> $R/plot.err
  grep 'bench-scale' $R/scale.err | tail -n 12
fi
tar czf "$OUT/s3.tgz" -C /tmp s3
