#!/usr/bin/env bash
# Device-machine job (2 GPUs): A/B of the prepare phase's copies, pushed by their sources
# (BENCH_PEER_ACCESS=own) against pulled by their targets (all), same machine, same load,
# elastic 1→2→1 only. Results in $OUT/ab.tgz.
set -uo pipefail
R=/tmp/ab; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda
for mode in own all; do
  BENCH_PEER_ACCESS=$mode BENCH_STEPS="0;0,1;0" BENCH_BASELINES=none BENCH_HOLD_S=4 BENCH_OUTPUT_SPREAD=16 BENCH_DIR=/tmp/emoe-scale \
    node scripts/bench-scale.mjs > $R/scale-$mode.jsonl 2> $R/scale-$mode.err; echo "$mode rc=$?"
  grep 'bench-scale: elastic' $R/scale-$mode.err
  grep '"bench":"scale"' $R/scale-$mode.jsonl | python3 -c "
import json,sys
for l in sys.stdin:
  s=json.loads(l); st=s['prepare']['stats']
  print(' ', s['from'], s['to'], 'prepare', round(s['phases']['prepareMs']), 'alloc', round(st['allocateMs']), 'copy', round(st['copyMs']), 'chunks', st['chunks'])"
done
tar czf "$OUT/ab.tgz" -C /tmp ab
