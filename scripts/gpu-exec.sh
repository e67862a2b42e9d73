#!/usr/bin/env bash
# Device-machine job for the executor (and the HMM copy figures): correctness
# against transformers, decode throughput against the roofline and against
# transformers' generate, HMM attach breakdown and striped copies. Results in $OUT.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.csv"
date -u +%FT%TZ > "$OUT/date.txt"
export ELASTICMOE_BACKEND=cuda
python3 scripts/hf_reference.py /tmp/hfref > "$OUT/hf_reference.log" 2>&1; echo "hf_reference rc=$?"
node scripts/check-vs-transformers.mjs /tmp/hfref 0 0,1 > "$OUT/check.jsonl" 2> "$OUT/check.err"; echo "check rc=$?"
BENCH_DEVICES=0 node scripts/bench-decode.mjs > "$OUT/decode-1gpu.jsonl" 2> "$OUT/decode-1gpu.err"; echo "decode 1 rc=$?"
BENCH_DEVICES=0,1 node scripts/bench-decode.mjs > "$OUT/decode-2gpu.jsonl" 2> "$OUT/decode-2gpu.err"; echo "decode 2 rc=$?"
python3 scripts/hf_decode_baseline.py scripts/configs/qwen3-30b-a3b.json --batches 1,8,32 > "$OUT/hf-decode.jsonl" 2> "$OUT/hf-decode.err"; echo "hf decode rc=$?"
if [ "$(nvidia-smi -L | wc -l)" -ge 3 ]; then
  BENCH_SKIP_ST=1 BENCH_DIR=/tmp/emoe-bench node scripts/bench-hmm.mjs > "$OUT/hmm.jsonl" 2> "$OUT/hmm.err"; echo "hmm rc=$?"
fi
tail -n 3 "$OUT"/*.err
