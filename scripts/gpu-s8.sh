#!/usr/bin/env bash
# Device-machine job, eighth session: the elastic runs first (gpu-s7.sh's scale part: STEPS, RUNS,
# SKIP_AB, SKIP_BASELINES, BASELINES passed through; $OUT/s7.tgz and $OUT/s4.tgz), then the GPU
# suites (TESTS, default test/gpu) in the time left before DEADLINE_S seconds from the job's start
# (default 560). SKIP_SCALE=1 / SKIP_TESTS=1 leave a part out. Results in $OUT/s8.tgz.
set -uo pipefail
T0=$(date +%s)
R=/tmp/s8; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda
[ "${SKIP_SCALE:-0}" = 1 ] || PARTS=scale bash scripts/gpu-s7.sh
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  left=$(( ${DEADLINE_S:-560} - ($(date +%s) - T0) ))
  if [ "$left" -gt 60 ]; then
    timeout "$left" node node_modules/vitest/vitest.mjs run ${TESTS:-test/gpu} > $R/gpu-tests.txt 2>&1
    echo "gpu tests rc=$? (limit ${left} s)"
    grep -E "✓|×|FAIL|Test Files|Tests " $R/gpu-tests.txt | tail -n 40
  else
    echo "gpu tests skipped: ${left} s left"
  fi
fi
tar czf "$OUT/s8.tgz" -C /tmp s8
