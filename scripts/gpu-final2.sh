#!/usr/bin/env bash
# Device-machine job (4 GPUs), part 1: GPU suites; decode on 1 and 2 GPUs with and
# without graphs; transformers' decode baseline on the same machine; HMM attach with
# expert slabs. Results in $OUT/final.tgz.
set -uo pipefail
R=/tmp/final; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda BENCH_DIR=/tmp/emoe-bench
node node_modules/vitest/vitest.mjs run test/gpu --reporter=verbose > $R/gpu-tests.txt 2>&1; echo "gpu tests rc=$?" | tee -a $R/gpu-tests.txt
BENCH_GRAPHS=both BENCH_DEVICES=0 node scripts/bench-decode.mjs > $R/decode-1gpu.jsonl 2> $R/decode-1gpu.err; echo "decode 1 rc=$?"
BENCH_GRAPHS=both BENCH_DEVICES=0,1 node scripts/bench-decode.mjs > $R/decode-2gpu.jsonl 2> $R/decode-2gpu.err; echo "decode 2 rc=$?"
python3 scripts/hf_decode_baseline.py scripts/configs/qwen3-30b-a3b.json --batches 1,8,32 > $R/hf-decode.jsonl 2> $R/hf-decode.err; echo "hf decode rc=$?"
BENCH_EXPERTS_PER_CHUNK=128 BENCH_DENSE_CHUNK_MIB=4096 BENCH_SKIP_ST=1 BENCH_SKIP_COPY=1 node scripts/bench-hmm.mjs > $R/hmm-slab.jsonl 2> $R/hmm-slab.err; echo "hmm slab rc=$?"
tar czf "$OUT/final.tgz" -C /tmp final
grep -E "×|Tests |Test Files" $R/gpu-tests.txt | head -20
tail -n 9 $R/decode-1gpu.err $R/decode-2gpu.err
grep -h hf_decode $R/hf-decode.jsonl
grep -h '"attach"' $R/hmm-slab.jsonl | cut -c1-330; tail -n 2 $R/hmm-slab.err
