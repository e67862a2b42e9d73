#!/usr/bin/env bash
# Device-machine job (2 GPUs): the GPU suites (kernels, graphs), decode speed on 1
# and 2 GPUs with the device routing path, and the transformers correctness check.
# Everything lands in $OUT/results.tgz (the tool returns few files).
set -uo pipefail
R=/tmp/results; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda
node node_modules/vitest/vitest.mjs run test/gpu --reporter=verbose > $R/gpu-tests.txt 2>&1; echo "gpu tests rc=$?" | tee -a $R/gpu-tests.txt
BENCH_DEVICES=0 BENCH_BATCHES=${BATCHES:-1,8,32,128} node scripts/bench-decode.mjs > $R/decode-1gpu.jsonl 2> $R/decode-1gpu.err; echo "decode 1 rc=$?"
BENCH_DEVICES=0,1 BENCH_BATCHES=${BATCHES:-1,8,32,128} node scripts/bench-decode.mjs > $R/decode-2gpu.jsonl 2> $R/decode-2gpu.err; echo "decode 2 rc=$?"
if [ -z "${SKIP_CHECK:-}" ]; then
  python3 scripts/hf_reference.py /tmp/hfref > $R/hf_reference.log 2>&1; echo "hf_reference rc=$?"
  node scripts/check-vs-transformers.mjs /tmp/hfref 0 0,1 > $R/check.jsonl 2> $R/check.err; echo "check rc=$?"
fi
tar czf "$OUT/results.tgz" -C /tmp results
grep -E "✓|×|passed|failed|skipped" $R/gpu-tests.txt | grep -E "×|Tests|Test Files|FAIL" | head -30
tail -n 4 $R/decode-1gpu.err $R/decode-2gpu.err $R/check.err 2>/dev/null
grep -h '"bench":"decode"\|tokPerS\|ttft' $R/decode-*.jsonl | head -20
