#!/usr/bin/env bash
# Builds scripts/native/ctx_interference.cu and runs its scenarios: a process spinning short
# kernels on GPU 0 ("serve") while another process does one driver operation after another
# ("work") on GPU 0, then on GPU 1 (when there is one). JSON lines on stdout, one clock.
# usage: scripts/ctx-interference.sh [CHUNKS] [CHUNK_MIB] [KERNEL_US]   (needs nvcc, node, dist/)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chunks=${1:-2800}
mib=${2:-12}
kus=${3:-2000}
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)
node -e "import('./dist/model/kernels/source.js').then((m) => require('fs').writeFileSync('$tmp/k.cu', m.MODEL_KERNELS_SOURCE))"
nvcc -cubin -O3 -std=c++17 -arch=sm_$arch "$tmp/k.cu" -o "$tmp/k.cubin"
nvcc -O2 -std=c++17 -arch=sm_$arch scripts/native/ctx_interference.cu -o "$tmp/ci" -L/usr/local/cuda/lib64/stubs -lcuda
ngpu=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
ops="ctx module make free alloc graph make free exit"
for wdev in 0 $([ "$ngpu" -gt 1 ] && echo 1); do
  echo "{\"scenario\":\"serve on 0, work on $wdev\",\"chunks\":$chunks,\"chunkMiB\":$mib,\"kernelUs\":$kus}"
  "$tmp/ci" serve 0 14 "$kus" > "$tmp/serve.txt" &
  sp=$!
  sleep 1
  "$tmp/ci" work "$wdev" "$chunks" "$mib" "$tmp/k.cubin" $ops || echo "{\"work-rc\":$?}"
  wait $sp
  cat "$tmp/serve.txt"
done
