#!/usr/bin/env node
// Elastic scaling under a steady load, in one process (in-process HMM and
// standby engine): 2→3→4→3→2 devices, then the cold-restart baseline measured in
// the same run (stop; load the same weights from safetensors on local disk; start;
// first token). One JSON line per figure; a timeline (JSON lines of steps) for plots.
//   ELASTICMOE_BACKEND=cuda node scripts/bench-scale.mjs > scale.jsonl
// Knobs: BENCH_CONFIG (default scripts/configs/qwen3-30b-a3b.json), BENCH_LAYERS,
// BENCH_STEPS ("0,1;0,1,2;0,1,2,3;0,1,2;0,1"), BENCH_HOLD_S (steady seconds per
// layout, default 6), BENCH_CONCURRENCY (requests kept running, default 32),
// BENCH_PROMPT (64), BENCH_OUTPUT (64), BENCH_DIR (scratch on local disk),
// BENCH_SKIP_COLD (skip the baseline).
import { mkdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { Runtime } from '../dist/index.js';
import { dropPageCache, writePatternCheckpoint } from './lib/checkpoint.mjs';
import { Hmm } from '../dist/hmm/hmm.js';
import { planChunks } from '../dist/hmm/placement.js';
import { openCheckpoint } from '../dist/hmm/safetensors.js';
import { loadCheckpoint } from '../dist/hmm/weight-loader.js';
import { readConfig } from '../dist/model/config.js';
import { roundRobinPlacement, weightShapes, weightSpecs } from '../dist/model/weights.js';
import { ForwardEngine } from '../dist/executor/forward.js';
import { mapHmmKvPools } from '../dist/executor/kv-view.js';
import { kvGeometry } from '../dist/executor/types.js';
import { storeWeights } from '../dist/executor/weights.js';
import { Deployment } from '../dist/scaling/orchestrator.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const env = (k, d) => process.env[k] ?? d;
const emit = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);
const log = (m) => process.stderr.write(`bench-scale: ${m}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const rt = Runtime.open({});
const config = await readConfig(env('BENCH_CONFIG', path.join(here, 'configs/qwen3-30b-a3b.json')));
if (process.env.BENCH_LAYERS) config.layers = Number(process.env.BENCH_LAYERS);
const plan = env('BENCH_STEPS', '0,1;0,1,2;0,1,2,3;0,1,2;0,1').split(';').map((s) => s.split(',').map(Number));
const holdMs = Number(env('BENCH_HOLD_S', 6)) * 1000;
const concurrency = Number(env('BENCH_CONCURRENCY', 32));
const promptLen = Number(env('BENCH_PROMPT', 64));
const outputLen = Number(env('BENCH_OUTPUT', 64));
const geo = kvGeometry(config, 16);
const kvBlocksPerDevice = Math.ceil((concurrency * Math.ceil((promptLen + outputLen) / geo.blockTokens)) * 1.5);

const t0 = performance.now();
const timeline = [];
let dep;
const steps = [];
const startT = performance.now();
dep = await Deployment.start({
  rt, config, devices: plan[0], seed: 11n, kvBlocksPerDevice, maxTokensPerStep: 512, maxSeqs: concurrency,
  onStep: (f) => steps.push({ t: performance.now() - t0, ms: f.ms, tokens: f.tokens, decode: f.decodeTokens, seqs: f.batchSeqs, epoch: dep?.epoch ?? 0, devices: dep?.devices.length ?? plan[0].length }),
});
emit({ bench: 'start', devices: plan[0], ms: performance.now() - startT, backend: rt.backend, gpus: rt.devices().map((d) => d.name) });

// Steady load: keep `concurrency` requests in flight.
let stop = false;
let submitted = 0;
let completed = 0;
let failed = 0;
const inflight = new Set();
const pump = async () => {
  while (!stop) {
    while (inflight.size < concurrency && !stop) {
      const id = submitted++;
      const prompt = Array.from({ length: promptLen }, (_, k) => (k * 31 + id * 7) % config.vocabSize);
      const p = dep.submit({ prompt, maxTokens: outputLen, ignoreEos: true }).then((c) => {
        if (c.finishReason === 'length') completed++; else failed++;
      }, () => failed++).finally(() => inflight.delete(p));
      inflight.add(p);
    }
    await sleep(1);
  }
};
const pumping = pump();

const usedBytes = () => rt.devices().map((d) => d.totalBytes - d.freeBytes);
const tokensBetween = (a, b) => steps.filter((s) => s.t > a && s.t <= b).reduce((x, s) => x + s.decode + 0, 0);
await sleep(holdMs);
for (let i = 1; i < plan.length; i++) {
  const from = dep.devices;
  const epochBefore = dep.epoch;
  const tCmd = performance.now() - t0;
  const peak = usedBytes();
  const sampler = setInterval(() => usedBytes().forEach((u, d) => (peak[d] = Math.max(peak[d], u))), 5);
  const report = await dep.scale({ devices: plan[i] });
  clearInterval(sampler);
  // First step served by the new layout.
  while (!steps.some((s) => s.t > tCmd && s.epoch > epochBefore)) await sleep(2);
  const first = steps.find((s) => s.t > tCmd && s.epoch > epochBefore);
  const before = tokensBetween(tCmd - 3000, tCmd) / 3;
  const during = tokensBetween(tCmd, first.t) / ((first.t - tCmd) / 1000);
  emit({ bench: 'scale', from, to: plan[i], commandToFirstNewStepMs: first.t - tCmd, reportMs: report.ms, phases: report.phases,
    decodeTokensPerSecondBefore: before, decodeTokensPerSecondDuring: during, duringOverBefore: during / before,
    bytesCopied: report.bytesCopied, lowerBoundBytes: report.lowerBoundBytes, chunksCopied: report.chunksCopied,
    chunksReused: report.chunksReused, chunksReleased: report.chunksReleased, switchover: report.switchover,
    peakUsedBytes: peak });
  log(`${from.join(',')} -> ${plan[i].join(',')}: ${(first.t - tCmd).toFixed(0)} ms to the first step on the new layout; throughput during ${(100 * during / before).toFixed(0)}% of before`);
  await sleep(holdMs);
}
stop = true;
await pumping;
await Promise.allSettled([...inflight]);
emit({ bench: 'load', submitted, completed, failed });
for (const s of steps) emit({ bench: 'timeline', ...s });
const lastDevices = dep.devices;
await dep.close();

// ---- cold restart baseline: the same weights from safetensors on local disk.
if (!process.env.BENCH_SKIP_COLD) {
  const dir = env('BENCH_DIR', path.join(os.tmpdir(), `emoe-scale-${process.pid}`));
  const ckpt = path.join(dir, 'ckpt');
  mkdirSync(ckpt, { recursive: true });
  writePatternCheckpoint(ckpt, weightShapes(config).map((w) => ({ name: w.name, shape: w.shape })), 16);
  const dropped = dropPageCache();
  // Cold restart onto the layout the elastic run ended on.
  const devices = lastDevices;
  const t = performance.now();
  const hmm = new Hmm(rt);
  const placement = roundRobinPlacement(config.experts, devices);
  await loadCheckpoint(hmm.store, planChunks(weightSpecs(config, devices, placement), { granularity: rt.granularity(0) }), await openCheckpoint(ckpt));
  const tLoaded = performance.now();
  for (const d of devices) hmm.kv.createPool({ device: d, blockBytes: geo.blockBytes, blocks: kvBlocksPerDevice });
  const pools = mapHmmKvPools(rt, hmm, devices, () => devices);
  const fwd = await ForwardEngine.create(rt, config, { devices, placement }, storeWeights(hmm.store), pools, { blockTokens: geo.blockTokens });
  const blocks = hmm.kv.allocate('cold', devices[0], Math.ceil((promptLen + 1) / geo.blockTokens));
  await fwd.step({ ranks: devices.map((_, r) => (r === 0 ? [{ seqId: 'cold', tokens: Array.from({ length: promptLen }, (_, k) => k), startPos: 0, blockTable: blocks, sample: true }] : [])) });
  const ms = performance.now() - t;
  emit({ bench: 'cold_restart', devices, ms, loadMs: tLoaded - t, pageCacheDropped: dropped,
    note: 'in this process: CUDA contexts already exist; a real restart also pays process start and context creation' });
  log(`cold restart onto ${devices.join(',')}: ${ms.toFixed(0)} ms (weights ${(tLoaded - t).toFixed(0)} ms)`);
  fwd.dispose();
  for (const p of pools.values()) p.dispose();
  hmm.kv.free('cold');
  hmm.dispose();
  rmSync(dir, { recursive: true, force: true });
}
