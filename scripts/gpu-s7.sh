#!/usr/bin/env bash
# Device-machine job, seventh session. Parts (PARTS, default "tests scale"):
#   tests: gpu-s6.sh's tests part: the GPU suites (test/gpu), then the model-kernel and
#          forward-graph suites again with ELASTICMOE_GROUPED_MATMUL=cuda-cores ($OUT/s6.tgz);
#   scale: gpu-s4.sh's elastic runs (STEPS, RUNS, SKIP_AB, SKIP_BASELINES, BASELINES passed through),
#          then, per run, the second after each scale's first new step (bench-scale's "after" records:
#          tokens, pauses between steps, the release's longest blocks) and the pinned-buffer pool.
# Results in $OUT/s7.tgz ($OUT/s6.tgz from the tests part, $OUT/s4.tgz from the scale part).
set -uo pipefail
R=/tmp/s7; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda
for part in ${PARTS:-tests scale}; do
  case $part in
    tests)
      # The GPU suites, then the model-kernel and forward-graph ones with the CUDA-core matmul (gpu-s6.sh; $OUT/s6.tgz).
      PARTS=tests bash scripts/gpu-s6.sh ;;
    scale)
      bash scripts/gpu-s4.sh
      for f in /tmp/s4/*.jsonl; do
        echo "after ($(basename $f .jsonl)):"
        grep '"bench":"after"' "$f" | python3 -c "
import json,sys
for l in sys.stdin:
  a=json.loads(l); p=a['phases']; h=a.get('hostPool') or {}
  print('  ', a['from'], '->', a['to'], 'first new step', round(a['firstNewStepMs'], 1), 'ms; second after it:', a['tokensInSecondAfter'], 'tokens, pauses',
    round(a['pauses']['sumMs'], 1), 'ms, longest', round(a['pauses']['maxMs'], 1),
    '; release', round(p['releaseMs']), 'ms', {k: {x: round(y, 1) for x, y in v.items()} for k, v in (a.get('release') or {}).items()},
    '; host pool reused', h.get('reused'), 'allocated', h.get('allocated'), 'freed', h.get('freed'),
    '; work ahead', {k: (round(v, 2) if isinstance(v, float) else v) for k, v in (a.get('ahead') or {}).items() if k != 'pauses'}, (a.get('ahead') or {}).get('pauses'))"
      done ;;
  esac
done
tar czf "$OUT/s7.tgz" -C /tmp s7
