#!/usr/bin/env bash
# Device-machine job, fifth session. Parts (PARTS, default "host tests scale"):
#   host:  bench-step-host on 1, 2 and 4 GPUs (host cost of queueing a step: eager,
#          capture, replay), the 4-GPU run's eager steps and capture profiled (in the archive);
#   tests: the GPU suites (test/gpu);
#   scale: gpu-s4.sh's elastic run (STEPS, AB_MODES, SKIP_BASELINES, RUNS passed through).
# Results in $OUT/s5.tgz (and $OUT/s4.tgz from the scale part).
set -uo pipefail
R=/tmp/s5; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda
n=$(nvidia-smi -L | wc -l)
for part in ${PARTS:-host tests scale}; do
  case $part in
    host)
      for devs in 0 0,1 0,1,2,3; do
        [ "$(echo $devs | tr ',' '\n' | wc -l)" -le "$n" ] || continue
        prof=""; [ "$devs" = "0,1,2,3" ] && prof="$R/prof"
        BENCH_PROFILE=$prof BENCH_DEVICES=$devs timeout 120 node scripts/bench-step-host.mjs >> $R/step-host.jsonl 2>> $R/step-host.err; echo "step-host $devs rc=$?"
      done
      cat $R/step-host.jsonl; tail -n 3 $R/step-host.err
      [ -d $R/prof ] && python3 scripts/lib/cpuprof-top.py $R/prof/*.cpuprofile > $R/prof-top.txt && grep -A 25 eager.cpuprofile $R/prof-top.txt ;;
    tests)
      timeout 300 node node_modules/vitest/vitest.mjs run test/gpu --reporter=verbose > $R/gpu-tests.txt 2>&1; echo "gpu tests rc=$?" | tee -a $R/gpu-tests.txt
      grep -E "×|Tests |Test Files" $R/gpu-tests.txt | head -20 ;;
    scale)
      bash scripts/gpu-s4.sh ;;
  esac
done
tar czf "$OUT/s5.tgz" -C /tmp s5
