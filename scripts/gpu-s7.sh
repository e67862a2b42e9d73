#!/usr/bin/env bash
# Device-machine job, seventh session. Parts (PARTS, default "tests scale"):
#   tests: the GPU suites (test/gpu), then the model-kernel and forward-graph suites again with
#          ELASTICMOE_GROUPED_MATMUL=cuda-cores (auto picks tensor cores on these GPUs);
#   scale: gpu-s4.sh's elastic runs (STEPS, RUNS, SKIP_AB, SKIP_BASELINES, BASELINES passed through),
#          then, per run, the second after each scale's first new step (bench-scale's "after" records:
#          tokens, pauses between steps, the release's longest blocks) and the pinned-buffer pool.
# Results in $OUT/s7.tgz (and $OUT/s4.tgz from the scale part).
set -uo pipefail
R=/tmp/s7; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda
for part in ${PARTS:-tests scale}; do
  case $part in
    tests)
      timeout 300 node node_modules/vitest/vitest.mjs run test/gpu --reporter=verbose > $R/gpu-tests.txt 2>&1; echo "gpu tests rc=$?" | tee -a $R/gpu-tests.txt
      grep -E "×|Tests |Test Files|node graph" $R/gpu-tests.txt | head -20
      ELASTICMOE_GROUPED_MATMUL=cuda-cores timeout 300 node node_modules/vitest/vitest.mjs run test/gpu/model-kernels.test.ts test/gpu/forward-graphs.test.ts \
        --reporter=verbose > $R/gpu-tests-cuda-cores.txt 2>&1; echo "gpu tests (cuda-cores) rc=$?" | tee -a $R/gpu-tests-cuda-cores.txt
      grep -E "×|Tests |Test Files" $R/gpu-tests-cuda-cores.txt | head -10 ;;
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
    '; host pool reused', h.get('reused'), 'allocated', h.get('allocated'), 'freed', h.get('freed'))"
      done ;;
  esac
done
tar czf "$OUT/s7.tgz" -C /tmp s7
