#!/usr/bin/env bash
# Device-machine job (2+ GPUs), part 2: transformers' decode baseline (same machine
# as part 1), then the HMM attach figures: one chunk per expert, and expert slabs
# (one chunk per layer and device, dense weights in 4 GiB chunks). Results in $OUT/hmm.tgz.
set -uo pipefail
R=/tmp/hmm; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda BENCH_DIR=/tmp/emoe-bench
python3 scripts/hf_decode_baseline.py scripts/configs/qwen3-30b-a3b.json --batches ${HF_BATCHES:-1,8,32} > $R/hf-decode.jsonl 2> $R/hf-decode.err; echo "hf decode rc=$?"
BENCH_SKIP_ST=1 BENCH_SKIP_COPY=${SKIP_COPY:-1} node scripts/bench-hmm.mjs > $R/hmm.jsonl 2> $R/hmm.err; echo "hmm rc=$?"
BENCH_EXPERTS_PER_CHUNK=128 BENCH_DENSE_CHUNK_MIB=4096 BENCH_SKIP_ST=1 BENCH_SKIP_COPY=1 node scripts/bench-hmm.mjs > $R/hmm-slab.jsonl 2> $R/hmm-slab.err; echo "hmm slab rc=$?"
tar czf "$OUT/hmm.tgz" -C /tmp hmm
cat $R/hf-decode.jsonl; tail -n 5 $R/hf-decode.err
grep -h "attach_vs_pinned\|pinned_reload\|\"attach\"" $R/hmm.jsonl $R/hmm-slab.jsonl | cut -c1-400
tail -n 3 $R/hmm.err $R/hmm-slab.err
