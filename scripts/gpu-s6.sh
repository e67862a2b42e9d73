#!/usr/bin/env bash
# Device-machine job, sixth session. Parts (PARTS, default "gmm tests host scale"):
#   gmm:   scripts/gmm-mma-bench.sh (grouped expert matmul, CUDA cores against tensor cores, GPU 0);
#   tests: the GPU suites (test/gpu), then the model-kernel and forward-graph suites again with the
#          other grouped matmul (ELASTICMOE_GROUPED_MATMUL=cuda-cores), which auto does not pick here;
#   host:  bench-step-host on the GPUs of HOST_DEVICES (default 0,1,2,3), decode-only and mixed steps
#          (BENCH_PROMPT=64), GPU time per kernel, with each grouped matmul (ELASTICMOE_GROUPED_MATMUL);
#   scale: gpu-s4.sh's elastic runs (STEPS, RUNS, SKIP_AB, SKIP_BASELINES, BASELINES passed through).
# Results in $OUT/s6.tgz (and $OUT/s4.tgz from the scale part).
set -uo pipefail
R=/tmp/s6; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpus.csv
date -u +%FT%TZ > $R/date.txt
export ELASTICMOE_BACKEND=cuda
for part in ${PARTS:-gmm tests host scale}; do
  case $part in
    gmm)
      timeout 200 bash scripts/gmm-mma-bench.sh ${GMM_TOKENS:-1 2 4 8 16 32 128 512 2048} > $R/gmm.jsonl 2> $R/gmm.err; echo "gmm rc=$?"
      grep speedup $R/gmm.jsonl; tail -n 3 $R/gmm.err ;;
    tests)
      timeout 300 node node_modules/vitest/vitest.mjs run test/gpu --reporter=verbose > $R/gpu-tests.txt 2>&1; echo "gpu tests rc=$?" | tee -a $R/gpu-tests.txt
      grep -E "×|Tests |Test Files" $R/gpu-tests.txt | head -20
      ELASTICMOE_GROUPED_MATMUL=cuda-cores timeout 300 node node_modules/vitest/vitest.mjs run test/gpu/model-kernels.test.ts test/gpu/forward-graphs.test.ts \
        --reporter=verbose > $R/gpu-tests-cuda-cores.txt 2>&1; echo "gpu tests (cuda-cores) rc=$?" | tee -a $R/gpu-tests-cuda-cores.txt
      grep -E "×|Tests |Test Files|grouped matmul kernel" $R/gpu-tests-cuda-cores.txt | head -20 ;;
    host)
      for gm in cuda-cores auto; do
        for prompt in 0 64; do
          ELASTICMOE_GROUPED_MATMUL=$gm BENCH_PROMPT=$prompt BENCH_KERNELS=1 BENCH_DEVICES=${HOST_DEVICES:-0,1,2,3} timeout 150 node scripts/bench-step-host.mjs >> $R/step-host.jsonl 2>> $R/step-host.err
          echo "step-host $gm prompt=$prompt rc=$?"
        done
      done
      python3 - $R/step-host.jsonl <<'PY'
import json, sys
for l in open(sys.argv[1]):
    s = json.loads(l)
    k = {x['name']: x['ms'] for x in s.get('kernels', [])}
    total = sum(x['ms'] for x in s.get('kernels', []))
    print(f"  {s['groupedMatmul']:13} prompt/rank {s['promptPerRank']:3}: eager {s['eagerMs']:.1f} ms, replay {s['replayMs']:.1f} ms; GPU time all kernels {total:.1f} ms, grouped {sum(v for n, v in k.items() if 'grouped' in n):.1f} ms")
PY
      tail -n 3 $R/step-host.err ;;
    scale)
      bash scripts/gpu-s4.sh ;;
  esac
done
tar czf "$OUT/s6.tgz" -C /tmp s6
