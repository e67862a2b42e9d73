#!/usr/bin/env bash
# Device-machine job (2 GPUs), part 1: GPU suites, then decode speed on 1 and 2 GPUs
# with and without graph replay in the same run. Results in $OUT/decode.tgz.
set -uo pipefail
R=/tmp/decode; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda
node node_modules/vitest/vitest.mjs run test/gpu --reporter=verbose > $R/gpu-tests.txt 2>&1; echo "gpu tests rc=$?" | tee -a $R/gpu-tests.txt
BENCH_GRAPHS=both BENCH_DEVICES=0 node scripts/bench-decode.mjs > $R/decode-1gpu.jsonl 2> $R/decode-1gpu.err; echo "decode 1 rc=$?"
BENCH_GRAPHS=both BENCH_DEVICES=0,1 node scripts/bench-decode.mjs > $R/decode-2gpu.jsonl 2> $R/decode-2gpu.err; echo "decode 2 rc=$?"
tar czf "$OUT/decode.tgz" -C /tmp decode
grep -E "×|Tests |Test Files" $R/gpu-tests.txt | head -20
grep -h "1200 launches" $R/gpu-tests.txt
tail -n 12 $R/decode-1gpu.err $R/decode-2gpu.err
