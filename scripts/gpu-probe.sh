#!/usr/bin/env bash
# Device-machine job (4 GPUs), third session: where a scale-up's time goes and which
# grouped-matmul shape reads expert weights fastest.
#   1. scripts/native/gmm_bench.cu (nvcc): grouped expert matmul variants at decode
#      shapes against a streaming read of the same bytes;
#   2. scripts/bench-chunk-alloc.mjs: the driver cost of creating expert chunks, idle
#      and with every GPU busy copying;
#   3. bench-scale.mjs, elastic only (no baselines), with the attach breakdown.
# Results in $OUT/probe.tgz.
set -uo pipefail
R=/tmp/probe; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda
if [ "${SKIP_GMM:-0}" != 1 ]; then
  nvcc -O3 -arch=sm_90 -o /tmp/gmm_bench scripts/native/gmm_bench.cu > $R/gmm.build 2>&1; echo "gmm build rc=$?"
  /tmp/gmm_bench ${GMM_TOKENS:-1 8 32 128} > $R/gmm.jsonl 2> $R/gmm.err; echo "gmm rc=$?"
fi
if [ -n "${GPU_TESTS:-}" ]; then
  node node_modules/vitest/vitest.mjs run $GPU_TESTS > $R/gpu-tests.log 2>&1; echo "gpu tests rc=$?"
  grep -E "Test Files|Tests |FAIL|×" $R/gpu-tests.log | head -30
fi
if [ "${SKIP_ALLOC:-0}" != 1 ]; then
  node scripts/bench-chunk-alloc.mjs > $R/alloc.jsonl 2> $R/alloc.err; echo "alloc rc=$?"
  BENCH_BUSY=1 node scripts/bench-chunk-alloc.mjs > $R/alloc-busy.jsonl 2>> $R/alloc.err; echo "alloc busy rc=$?"
fi
if [ "${SKIP_SCALE:-0}" != 1 ]; then
  BENCH_BASELINES=${BASELINES:-none} BENCH_HOLD_S=${HOLD:-5} BENCH_OUTPUT_SPREAD=16 BENCH_DIR=/tmp/emoe-scale \
    node scripts/bench-scale.mjs > $R/scale.jsonl 2> $R/scale.err; echo "scale rc=$?"
  node scripts/plot-timeline.mjs $R/scale.jsonl > $R/scale-timeline.svg 2> $R/plot.err
fi
tar czf "$OUT/probe.tgz" -C /tmp probe
cat $R/gmm.jsonl 2>/dev/null | cut -c1-220
grep -h '"way"' $R/alloc.jsonl $R/alloc-busy.jsonl 2>/dev/null | cut -c100-400
grep '"bench":"scale"' $R/scale.jsonl 2>/dev/null | cut -c1-700
tail -n 5 $R/scale.err 2>/dev/null
