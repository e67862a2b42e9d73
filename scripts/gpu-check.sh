#!/usr/bin/env bash
# One device-machine job: GPU test suite, then the P2P/VMM benchmark through the
# addon and through the plain C++ reference (twice each, interleaved), results in $OUT.
# Prepared here with: npm install && npm test && g++ -O2 -std=c++17 scripts/native/p2p_ref.cc -ldl -o build/Release/p2p_ref
#   && ../shared/device/pack.sh; run with carry [.device, build/Release, dist].
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.csv"
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
date -u +%FT%TZ > "$OUT/date.txt"
ELASTICMOE_BACKEND=cuda node node_modules/vitest/vitest.mjs run test/gpu --reporter=verbose > "$OUT/gpu-tests.txt" 2>&1
echo "gpu tests rc=$?" | tee -a "$OUT/gpu-tests.txt"
: > "$OUT/ref.jsonl"; : > "$OUT/addon.jsonl"
for round in 1 2; do
  build/Release/p2p_ref >> "$OUT/ref.jsonl" 2>> "$OUT/bench-err.txt"
  ELASTICMOE_BACKEND=cuda node scripts/bench-p2p.mjs >> "$OUT/addon.jsonl" 2>> "$OUT/bench-err.txt"
done
node scripts/compare-p2p.mjs "$OUT/addon.jsonl" "$OUT/ref.jsonl" > "$OUT/compare.md" 2>> "$OUT/bench-err.txt"
cat "$OUT/compare.md"
tail -5 "$OUT/gpu-tests.txt"
