#!/usr/bin/env bash
# Device-machine job (2 or 4 GPUs), third session, part 1: the GPU suites; the
# transformers correctness check (f32 KV against the f64 reference, strict; bf16 KV
# within tolerance) on layouts [0] and [0,1]; decode on 1 and 2 GPUs with graphs;
# transformers' decode baseline on the same machine. Results in $OUT/final.tgz.
set -uo pipefail
R=/tmp/final; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda BENCH_DIR=/tmp/emoe-bench
node node_modules/vitest/vitest.mjs run test/gpu > $R/gpu-tests.txt 2>&1; echo "gpu tests rc=$?"
grep -E "×|Tests |Test Files" $R/gpu-tests.txt | head -20
python3 scripts/hf_reference.py /tmp/hfref > $R/hf_reference.log 2>&1; echo "hf_reference rc=$?"
node scripts/check-vs-transformers.mjs /tmp/hfref 0 0,1 > $R/check.jsonl 2> $R/check.err; echo "check rc=$?"
tail -n 14 $R/check.err
BENCH_DEVICES=0 BENCH_BATCHES=1,8,32,128 node scripts/bench-decode.mjs > $R/decode-1gpu.jsonl 2> $R/decode-1gpu.err; echo "decode 1 rc=$?"
BENCH_DEVICES=0,1 BENCH_BATCHES=1,8,32,128 node scripts/bench-decode.mjs > $R/decode-2gpu.jsonl 2> $R/decode-2gpu.err; echo "decode 2 rc=$?"
python3 scripts/hf_decode_baseline.py scripts/configs/qwen3-30b-a3b.json --batches 1,32 > $R/hf-decode.jsonl 2> $R/hf-decode.err; echo "hf decode rc=$?"
tar czf "$OUT/final.tgz" -C /tmp final
tail -n 6 $R/decode-1gpu.err $R/decode-2gpu.err
grep -h hf_decode $R/hf-decode.jsonl | cut -c1-300
