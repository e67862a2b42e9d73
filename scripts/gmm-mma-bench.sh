#!/usr/bin/env bash
# Builds and runs scripts/native/gmm_mma_bench.cu against the engine's kernel source (needs
# node, dist/ built, nvcc). usage: scripts/gmm-mma-bench.sh [tokens ...]; JSON lines on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
node -e "import('./dist/model/kernels/source.js').then((m) => require('fs').writeFileSync('$tmp/emoe_kernels.cuh', m.MODEL_KERNELS_SOURCE))"
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d . || true)
nvcc -O3 -std=c++17 -arch=sm_${arch:-90} -DEMOE_KERNELS_HEADER="\"$tmp/emoe_kernels.cuh\"" scripts/native/gmm_mma_bench.cu -o "$tmp/gmm_mma_bench"
"$tmp/gmm_mma_bench" "$@"
