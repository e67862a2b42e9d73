#!/usr/bin/env bash
# Device-machine job, fourth session: standby chunks A/B (BENCH_STANDBY 0 against 1,
# same machine, same load, elastic STEPS, default 1→2→1 on 2 GPUs), then the elastic run with every baseline and
# standby chunks on, then the optional extras (RUNS: a space-separated list of
# "name:ENV=V,ENV=V" elastic runs). Results in $OUT/s4.tgz.
set -uo pipefail
R=/tmp/s4; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda
summary() { # $1: jsonl
  grep -E '"bench":"(scale|standby)"' "$1" | python3 -c "
import json,sys
for l in sys.stdin:
  s=json.loads(l)
  if s['bench']=='standby':
    print('  standby', s['when'], 'settle', round(s['settleMs']), 'ms', [(d['device'], d['chunks'], d.get('filled')) for d in s['devices']], s.get('error',''),
      'engines', [(e['device'], e['precaptured'], round(e['followMs'])) for e in s.get('engines') or [] if isinstance(e, dict)])
    continue
  st=s['prepare'].get('stats') or {}; p=s['phases']
  print(' ', s['from'], '->', s['to'], 'first step', round(s['commandToFirstNewStepMs']), 'ms; plan', round(p['planMs']), 'prepare', round(p['prepareMs']),
    '(alloc', round(st.get('allocateMs',0)), 'copy', round(st.get('copyMs',0)), 'queue block', round(st.get('queueMaxBlockMs',0)), ') attach', round(p['attachMs']), 'copy wait', round(p.get('copyWaitMs',0)), 'overlap', s.get('attachDuringCopies'), 'switch', round(p['switchMs']),
    'first', round(p['firstStepMs']), '; standby', s.get('chunksFromStandby'), '/', s['chunksCopied'], 'prefilled', s.get('chunksPrefilled'), '; work during', s.get('workDuringOverBefore'),
    '; precaptured', s.get('precapture'), 'made ahead', s.get('standbyMadeAhead'), '; prestarted', s.get('prestartedExecutor'), 'preattached', s.get('preattachedChunks'), '; loop delay max', round((s.get('loopDelay') or {}).get('maxMs', 0)))"
}
run() { # name, timeout, env... (BENCH_SCRIPT=PATH runs another copy of bench-scale.mjs, e.g. an earlier commit's build)
  local name=$1 limit=$2 script=scripts/bench-scale.mjs; shift 2
  for a in "$@"; do case $a in BENCH_SCRIPT=*) script=${a#BENCH_SCRIPT=} ;; esac; done
  env "$@" BENCH_DIR=/tmp/emoe-scale timeout "$limit" node "$script" > $R/$name.jsonl 2> $R/$name.err; echo "$name rc=$?"
  grep 'bench-scale' $R/$name.err | tail -n 8
  summary $R/$name.jsonl
}
[ "${SKIP_AB:-0}" = 1 ] && AB_MODES=none
for mode in ${AB_MODES:-0 1}; do
  [ "$mode" = none ] && continue
  run ab-standby$mode 150 BENCH_STANDBY=$mode BENCH_STEPS="${STEPS:-0;0,1;0}" BENCH_BASELINES=none BENCH_HOLD_S=4 BENCH_OUTPUT_SPREAD=16
done
if [ "${SKIP_BASELINES:-0}" != 1 ]; then
  run baselines 280 BENCH_STANDBY=1 BENCH_STEPS="${STEPS:-0;0,1;0}" BENCH_BASELINES=${BASELINES:-cold,replica,vertical} BENCH_HOLD_S=5 BENCH_OUTPUT_SPREAD=16
  node scripts/plot-timeline.mjs $R/baselines.jsonl > $R/baselines-timeline.svg 2> $R/plot.err
fi
for spec in ${RUNS:-}; do
  name=${spec%%:*}; vars=${spec#*:}
  run "$name" 200 ${vars//,/ } BENCH_STEPS="${STEPS:-0;0,1;0}" BENCH_BASELINES=none BENCH_HOLD_S=4 BENCH_OUTPUT_SPREAD=16
done
tar czf "$OUT/s4.tgz" -C /tmp s4
