#!/usr/bin/env node
// Decode throughput and time to first token of the executor on Qwen3-30B-A3B
// shapes (bf16 synthetic weights), reported against the HBM roofline measured in
// the same run. One JSON line per figure on stdout.
//   ELASTICMOE_BACKEND=cuda BENCH_DEVICES=0,1 node scripts/bench-decode.mjs
// Knobs: BENCH_DEVICES (default "0"), BENCH_LAYERS (default 48), BENCH_BATCHES
// (default "1,8,32,128"), BENCH_STEPS (decode steps timed, default 8),
// BENCH_CONTEXT (prompt tokens per sequence before decoding, default 64),
// BENCH_TTFT_PROMPT (default 2000), BENCH_PROFILE (1: one more step per batch with
// every kernel timed, see profileStep), BENCH_GRAPHS (1: decode steps replayed as captured
// graphs where the backend can, the default; 0: never; both: each batch decodes without
// then with graphs on the same engine and sequences, a same-run baseline).
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { Runtime } from '../dist/index.js';
import { Hmm } from '../dist/hmm/hmm.js';
import { readConfig } from '../dist/model/config.js';
import { roundRobinPlacement, weightShapes, weightSpecs } from '../dist/model/weights.js';
import { ForwardEngine } from '../dist/executor/forward.js';
import { mapHmmKvPools } from '../dist/executor/kv-view.js';
import { kvGeometry } from '../dist/executor/types.js';
import { storeWeights } from '../dist/executor/weights.js';
import { profileKernels } from './lib/kernel-profile.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const emit = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);
const log = (m) => process.stderr.write(`bench-decode: ${m}\n`);
const env = (k, d) => process.env[k] ?? d;

const rt = Runtime.open({});
const devices = env('BENCH_DEVICES', '0').split(',').map(Number);
const config = await readConfig(path.join(here, 'configs/qwen3-30b-a3b.json'));
config.layers = Number(env('BENCH_LAYERS', config.layers));
const batches = env('BENCH_BATCHES', '1,8,32,128').split(',').map(Number);
const steps = Number(env('BENCH_STEPS', 8));
const context = Number(env('BENCH_CONTEXT', 64));
const ttftPrompt = Number(env('BENCH_TTFT_PROMPT', 2000));
const maxBatch = Math.max(...batches);
const graphsKnob = env('BENCH_GRAPHS', '1');
const profile = env('BENCH_PROFILE', '0') === '1';
if (!['0', '1', 'both'].includes(graphsKnob)) throw new Error(`BENCH_GRAPHS: 0, 1 or both (got '${graphsKnob}')`);
/** The decode modes timed per batch, in order: false = without graphs, true = with. */
const modes = graphsKnob === 'both' ? [false, true] : [graphsKnob === '1'];
/** Decode steps each sequence runs (a warm-up step and the timed ones, per mode). */
const decodeSteps = modes.length * (steps + 1);

// Same-run bandwidth: a 1 GiB device-local copy on each device (bytes copied per second).
const GiB = 1024 ** 3;
let hbm = Infinity;
for (const d of devices) {
  const c = [rt.createChunk(d, GiB), rt.createChunk(d, GiB)];
  const r = c.map(() => rt.reserve(GiB));
  r.forEach((x, i) => { x.map(0, c[i]); x.setAccess(0, GiB, [d]); });
  const s = rt.createStream(d);
  const e0 = rt.createEvent(d, { timing: true });
  const e1 = rt.createEvent(d, { timing: true });
  let best = 0;
  for (let i = 0; i < 5; i++) {
    e0.record(s); s.copy(r[1].at(0), r[0].at(0), GiB); e1.record(s);
    await e1.synchronize();
    best = Math.max(best, GiB / (e1.elapsedSince(e0) / 1e3));
  }
  hbm = Math.min(hbm, best);
  r.forEach((x) => x.dispose()); c.forEach((x) => x.dispose());
}
emit({ bench: 'hbm_copy', devices, bytesPerSecond: hbm });

const hmm = new Hmm(rt);
const placement = roundRobinPlacement(config.experts, devices);
await hmm.loadSynthetic(weightSpecs(config, devices, placement), { seed: 7n });
const geo = kvGeometry(config, 16);
const perSeqBlocks = Math.ceil((context + decodeSteps + 1) / geo.blockTokens);
const ttftBlocks = Math.ceil((ttftPrompt + 1) / geo.blockTokens);
const seqsPerRank = Math.ceil(maxBatch / devices.length);
for (const d of devices) hmm.kv.createPool({ device: d, blockBytes: geo.blockBytes, blocks: seqsPerRank * perSeqBlocks + ttftBlocks + 1 });
const pools = mapHmmKvPools(rt, hmm, devices, () => devices);
// Graphs capture at a shape's first sighting here (captureAfter 1): the warm-up step captures and
// the timed steps replay, as in every figure recorded so far (the engine's default waits for a second sighting).
const engine = await ForwardEngine.create(rt, config, { devices, placement }, storeWeights(hmm.store), pools,
  { blockTokens: geo.blockTokens, maxTokensPerStep: Math.max(2048, ttftPrompt), graphs: graphsKnob !== '0' && { captureAfter: 1 } });
const graphStats = () => {
  const { enabled, captures, replays, cached, evicted, disabledReason } = engine.graphStats;
  return { enabled, captures, replays, cached, evicted, ...(disabledReason ? { disabledReason } : {}) };
};

// Bytes one decode step must read at least: dense weights once per rank, the
// distinct experts the batch touches (expected E·(1−(1−K/E)^B) per layer under
// uniform routing, spread over the devices), and the KV of every sequence.
const H = config.hiddenSize;
const shapes = weightShapes(config);
const bytesOf = (w) => w.shape.reduce((a, b) => a * b, 2);
const denseBytes = shapes.filter((w) => w.expert === undefined && w.name !== 'model.embed_tokens.weight').reduce((a, w) => a + bytesOf(w), 0);
const expertBytes = 3 * config.expertIntermediate * H * 2;
const kvPerToken = config.layers * 2 * config.kvHeads * config.headDim * 2;

let n = 0;
const newSeqs = (count, promptLen) => Array.from({ length: count }, (_, i) => {
  const rank = i % devices.length;
  const id = `s${n++}`;
  const blocks = hmm.kv.allocate(id, devices[rank], Math.ceil((promptLen + decodeSteps + 1) / geo.blockTokens));
  const prompt = Array.from({ length: promptLen }, (_, k) => (k * 7919 + i * 104729) % config.vocabSize);
  return { id, rank, prompt, blocks, pos: 0, last: 0 };
});
async function prefill(seqs) {
  // Up to 2048 tokens per rank per step.
  let pending = seqs.map((s) => ({ s, off: 0 }));
  while (pending.length) {
    const ranks = devices.map(() => []);
    const budget = devices.map(() => Math.max(2048, ttftPrompt));
    for (const p of pending) {
      const take = Math.min(p.s.prompt.length - p.off, budget[p.s.rank]);
      if (take <= 0) continue;
      budget[p.s.rank] -= take;
      ranks[p.s.rank].push({ seqId: p.s.id, tokens: p.s.prompt.slice(p.off, p.off + take), startPos: p.off, blockTable: p.s.blocks, sample: p.off + take === p.s.prompt.length });
      p.off += take;
    }
    const r = await engine.step({ ranks });
    for (const p of pending) if (p.off === p.s.prompt.length && r.next.has(p.s.id)) { p.s.last = r.next.get(p.s.id); p.s.pos = p.s.prompt.length; }
    pending = pending.filter((p) => p.off < p.s.prompt.length);
  }
}
async function decode(seqs, graph) {
  const ranks = devices.map(() => []);
  for (const s of seqs) ranks[s.rank].push({ seqId: s.id, tokens: [s.last], startPos: s.pos, blockTable: s.blocks, sample: true });
  const r = await engine.step({ ranks }, { graph });
  for (const s of seqs) { s.last = r.next.get(s.id); s.pos++; }
}

/**
 * BENCH_PROFILE=1: one more decode step of the batch without graphs, every kernel launch
 * timed by an event pair (ModelKernels.profile); one line with the GPU time per kernel name
 * (summed over launches and devices), largest first, against the step's wall time.
 */
async function profileStep(B, seqs) {
  const { wallMs, launches, gpuMs, kernels } = await profileKernels(() => decode(seqs, false));
  emit({ bench: 'profile', devices, batch: B, wallMs, gpuMs, launches, kernels });
  log(`profile batch ${B}: ${launches} launches, ${gpuMs.toFixed(1)} ms of kernels (all devices) in a ${wallMs.toFixed(1)} ms step; ` +
    kernels.slice(0, 6).map((k) => `${k.name} ${k.ms.toFixed(1)}`).join(', '));
}

// Time to first token: one 2000-token prompt, prefilled in one step (after a warm-up).
{
  const warm = newSeqs(1, ttftPrompt);
  await prefill(warm);
  hmm.kv.free(warm[0].id);
  const seq = newSeqs(1, ttftPrompt);
  const t = performance.now();
  await prefill(seq);
  emit({ bench: 'ttft', devices, promptTokens: ttftPrompt, ms: performance.now() - t });
  hmm.kv.free(seq[0].id);
}

for (const B of batches) {
  const seqs = newSeqs(B, context);
  await prefill(seqs);
  let eagerMs;
  for (const graphs of modes) {
    await decode(seqs, graphs); // warm-up step (with graphs: the capture of this batch's shape)
    const warm = engine.graphStats;
    const t = performance.now();
    for (let i = 0; i < steps; i++) await decode(seqs, graphs);
    const ms = (performance.now() - t) / steps;
    const after = graphStats();
    // Distinct experts a batch touches per layer, expected under uniform routing (synthetic weights route about uniformly).
    const touched = config.experts * (1 - (1 - config.topK / config.experts) ** B);
    const bytes = config.layers * touched * expertBytes + devices.length * denseBytes + B * seqs[0].pos * kvPerToken;
    // All devices read in parallel: the roofline step time is the per-device share over the per-device bandwidth.
    const rooflineMs = bytes / devices.length / hbm * 1e3;
    // graphs: asked for; timedReplays / timedCaptures: what the timed steps really did (no replays
    // where the backend cannot capture; a capture only where a shape changed mid-run).
    const figures = { bench: 'decode', devices, batch: B, graphs, timedReplays: after.replays - warm.replays, timedCaptures: after.captures - warm.captures,
      msPerStep: ms, tokensPerSecond: (B * 1e3) / ms, rooflineMs, rooflineFraction: rooflineMs / ms,
      rooflineTokensPerSecond: (B * 1e3) / rooflineMs, bytesPerStep: bytes, graphStats: after };
    if (graphs && eagerMs !== undefined) figures.speedupVsNoGraphs = eagerMs / ms;
    if (!graphs) eagerMs = ms;
    emit(figures);
    log(`batch ${B}${modes.length > 1 ? (graphs ? ', graphs' : ', no graphs') : ''}: ${ms.toFixed(1)} ms/step, ` +
      `${((B * 1e3) / ms).toFixed(1)} tok/s, ${(100 * rooflineMs / ms).toFixed(1)}% of roofline` +
      (figures.speedupVsNoGraphs ? `, ${figures.speedupVsNoGraphs.toFixed(2)}x the speed without graphs` : ''));
  }
  if (profile) await profileStep(B, seqs);
  for (const s of seqs) hmm.kv.free(s.id);
}
emit({ bench: 'graphs', devices, mode: graphsKnob, ...graphStats() });
if (graphsKnob !== '0' && !engine.graphStats.enabled) log(`graphs are off: ${engine.graphStats.disabledReason}`);
engine.dispose();
for (const p of pools.values()) p.dispose();
hmm.dispose();
