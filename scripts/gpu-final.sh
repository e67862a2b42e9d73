#!/usr/bin/env bash
# Device-machine job (4 GPUs): GPU suites, decode speed with transformers'
# baseline in the same job, then the scaling benchmark with its cold-restart
# baseline. Everything lands in $OUT/results.tgz (one file: the tool returns few).
set -uo pipefail
R=/tmp/results; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda
node node_modules/vitest/vitest.mjs run test/gpu --reporter=verbose > $R/gpu-tests.txt 2>&1; echo "gpu tests rc=$?" | tee -a $R/gpu-tests.txt
BENCH_DEVICES=0 node scripts/bench-decode.mjs > $R/decode-1gpu.jsonl 2> $R/decode-1gpu.err; echo "decode 1 rc=$?"
BENCH_DEVICES=0,1 node scripts/bench-decode.mjs > $R/decode-2gpu.jsonl 2> $R/decode-2gpu.err; echo "decode 2 rc=$?"
python3 scripts/hf_decode_baseline.py scripts/configs/qwen3-30b-a3b.json --batches 1,8,32 > $R/hf-decode.jsonl 2> $R/hf-decode.err; echo "hf decode rc=$?"
BENCH_HOLD_S=5 BENCH_DIR=/tmp/emoe-scale node scripts/bench-scale.mjs > $R/scale.jsonl 2> $R/scale.err; echo "scale rc=$?"
tar czf "$OUT/results.tgz" -C /tmp results
grep -h "rc=\|passed\|failed" $R/gpu-tests.txt | tail -3
cat $R/decode-1gpu.err $R/decode-2gpu.err $R/scale.err | tail -20
cat $R/hf-decode.jsonl
