#!/usr/bin/env node
// Host cost of queueing one forward step across DP ranks: for a decode batch spread over
// BENCH_DEVICES, the wall time of steps run eagerly (graphs off), of the step that captures
// its graph, and of replays, with the stream calls one step makes. One JSON line per figure.
//   ELASTICMOE_BACKEND=cuda BENCH_DEVICES=0,1,2,3 node scripts/bench-step-host.mjs
// Knobs: BENCH_DEVICES (default "0"), BENCH_CONFIG (default configs/qwen3-30b-a3b.json),
// BENCH_BATCH (sequences, default 32), BENCH_STEPS (eager steps and replays timed, default 6),
// BENCH_PROMPT (0: decode steps; n: each step also prefills a new n-token prompt on every rank,
// a mixed step as under a steady load), BENCH_KERNELS (1: one more eager step with every kernel
// timed: GPU milliseconds per kernel name, summed over launches and devices).
// BENCH_PROFILE=DIR: CPU profiles (V8 .cpuprofile) of the eager steps and of the capture, in DIR.
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeFileSync, mkdirSync } from 'node:fs';
import { Session } from 'node:inspector/promises';

import { Runtime } from '../dist/index.js';
import { Hmm } from '../dist/hmm/hmm.js';
import { readConfig } from '../dist/model/config.js';
import { roundRobinPlacement, weightSpecs } from '../dist/model/weights.js';
import { ForwardEngine } from '../dist/executor/forward.js';
import { mapHmmKvPools } from '../dist/executor/kv-view.js';
import { kvGeometry } from '../dist/executor/types.js';
import { storeWeights } from '../dist/executor/weights.js';
import { Stream } from '../dist/runtime/stream.js';
import { runtimeGroupedMatmul } from '../dist/model/kernels/index.js';
import { profileKernels } from './lib/kernel-profile.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const emit = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);
const env = (k, d) => process.env[k] ?? d;
const devices = env('BENCH_DEVICES', '0').split(',').map(Number);
const config = await readConfig(path.resolve(here, env('BENCH_CONFIG', 'configs/qwen3-30b-a3b.json')));
const B = Number(env('BENCH_BATCH', 32));
const steps = Number(env('BENCH_STEPS', 6));
const promptLen = Number(env('BENCH_PROMPT', 0));

const rt = Runtime.open({});
const hmm = new Hmm(rt);
const placement = roundRobinPlacement(config.experts, devices);
await hmm.loadSynthetic(weightSpecs(config, devices, placement), { seed: 7n });
const geo = kvGeometry(config, 16);
const blocksPerSeq = Math.ceil((4 * steps + 8) / geo.blockTokens) + 1;
const promptBlocks = Math.ceil(Math.max(promptLen, 1) / geo.blockTokens);
for (const d of devices) hmm.kv.createPool({ device: d, blockBytes: geo.blockBytes, blocks: Math.ceil(B / devices.length) * blocksPerSeq + 2 * promptBlocks + 1 });
const pools = mapHmmKvPools(rt, hmm, devices, () => devices);

// Stream calls per step, counted by wrapping the queueing methods.
let calls = 0;
for (const m of ['launch', 'wait', 'copy', 'upload', 'download']) {
  const original = Stream.prototype[m];
  Stream.prototype[m] = function counted(...a) {
    calls++;
    return original.apply(this, a);
  };
}

let n = 0;
const seqs = Array.from({ length: B }, (_, i) => {
  const rank = i % devices.length;
  const id = `s${n++}`;
  return { id, rank, blocks: hmm.kv.allocate(id, devices[rank], blocksPerSeq), pos: 0, last: (i * 7919) % config.vocabSize };
});
// BENCH_PROMPT: two sets of prompt blocks per rank, used in turn (a prefill writes its prompt's KV).
const prompts = devices.map((d, r) => [0, 1].map((k) => hmm.kv.allocate(`prompt${r}.${k}`, d, promptBlocks)));
let stepNo = 0;
async function timedStep(engine, graph) {
  const ranks = devices.map(() => []);
  for (const s of seqs) ranks[s.rank].push({ seqId: s.id, tokens: [s.last], startPos: s.pos, blockTable: s.blocks, sample: true });
  if (promptLen > 0) {
    ranks.forEach((list, r) => list.push({
      seqId: `p${stepNo}.${r}`, tokens: Array.from({ length: promptLen }, (_, i) => (i * 31 + r) % config.vocabSize), startPos: 0,
      blockTable: prompts[r][stepNo % 2], sample: true,
    }));
  }
  stepNo++;
  calls = 0;
  const t = performance.now();
  const r = await engine.step({ ranks }, { graph });
  const ms = performance.now() - t;
    for (const s of seqs) { s.last = r.next.get(s.id); s.pos++; }
  return { ms, calls };
}
// BENCH_PROFILE: the inspector's sampling profiler around a part of the run.
const profileDir = process.env.BENCH_PROFILE || undefined;
const session = profileDir ? new Session() : undefined;
if (session) {
  mkdirSync(profileDir, { recursive: true });
  session.connect();
  await session.post('Profiler.enable');
  await session.post('Profiler.setSamplingInterval', { interval: 100 });
}
async function profiled(name, fn) {
  if (!session) return fn();
  await session.post('Profiler.start');
  try {
    return await fn();
  } finally {
    const { profile } = await session.post('Profiler.stop');
    writeFileSync(path.join(profileDir, `${name}.cpuprofile`), JSON.stringify(profile));
  }
}
const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];

const engine = await ForwardEngine.create(rt, config, { devices, placement }, storeWeights(hmm.store), pools,
  { blockTokens: geo.blockTokens, maxTokensPerStep: 256, graphs: { captureAfter: 1 } });
await timedStep(engine, false); // warm-up (JIT, first launches)
const eager = [];
await profiled('eager', async () => {
  for (let i = 0; i < steps; i++) eager.push(await timedStep(engine, false));
});
const capture = await profiled('capture', () => timedStep(engine, true));
const replay = [];
for (let i = 0; i < steps; i++) replay.push((await timedStep(engine, true)).ms);
// BENCH_KERNELS: GPU time per kernel name of one eager step (events around every launch).
let kernels;
if (env('BENCH_KERNELS', '0') === '1') {
  const profile = await profileKernels(() => timedStep(engine, false));
  kernels = profile.kernels.map((k) => ({ ...k, ms: Math.round(k.ms * 100) / 100 }));
}
emit({
  bench: 'step_host', backend: rt.backend, devices,
  groupedMatmul: runtimeGroupedMatmul(rt), batch: B, promptPerRank: promptLen, layers: config.layers, experts: config.experts,
  streamCallsPerStep: eager[0].calls, eagerMs: median(eager.map((e) => e.ms)), captureMs: capture.ms, replayMs: median(replay),
  usPerCallEager: (1000 * median(eager.map((e) => e.ms))) / eager[0].calls, graphStats: engine.graphStats, ...(kernels ? { kernels } : {}),
});
engine.dispose();
