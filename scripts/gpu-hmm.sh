#!/usr/bin/env bash
# Device-machine job for the HMM figures (4 GPUs): the GPU suites, then
# bench-hmm.mjs with one chunk per expert (as the HMM stores them) and, for
# contrast, with 32 experts per chunk. Results in $OUT.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.csv"
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
date -u +%FT%TZ > "$OUT/date.txt"
export ELASTICMOE_BACKEND=cuda BENCH_DIR=/tmp/emoe-bench
ELASTICMOE_BACKEND=cuda node node_modules/vitest/vitest.mjs run test/gpu --reporter=verbose > "$OUT/gpu-tests.txt" 2>&1
echo "gpu tests rc=$?" | tee -a "$OUT/gpu-tests.txt"
node scripts/bench-hmm.mjs > "$OUT/hmm.jsonl" 2> "$OUT/hmm.err"
echo "bench-hmm rc=$?"
BENCH_EXPERTS_PER_CHUNK=32 BENCH_SKIP_ST=1 BENCH_SKIP_COPY=1 node scripts/bench-hmm.mjs > "$OUT/hmm-slab32.jsonl" 2> "$OUT/hmm-slab32.err"
echo "bench-hmm slab rc=$?"
cat "$OUT/hmm.err" "$OUT/hmm-slab32.err"
tail -4 "$OUT/gpu-tests.txt"
