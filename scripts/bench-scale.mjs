#!/usr/bin/env node
// Elastic scaling under a steady load, in one process (in-process HMM and
// standby engine), and the baselines measured in the same run:
//   elastic   2→3→4→3→2 devices (BENCH_STEPS) with Deployment.scale;
//   replica   horizontal scaling: while the elastic deployment (on the layout its
//             steps ended on) keeps serving, a second, independent copy of the
//             model is loaded from safetensors on local disk (page cache dropped)
//             onto as many fresh devices, with its own HMM, KV pools and engine;
//             command → first token served by the replica, the original's
//             throughput meanwhile, then both serve (src/scaling/baselines.ts Replica);
//   vertical  the paper's "extravagant" vertical scaling (VerticalBaseline): the
//             new layout built on fresh memory — every weight copied from the
//             running layout's devices into new chunks, a new engine — then the
//             switch-over and the old weights released; latency, throughput during,
//             peak memory per device;
//   cold      stop; load the same weights from safetensors on local disk; start;
//             first token.
// One JSON line per figure; a timeline (JSON lines of steps) for plots.
//   ELASTICMOE_BACKEND=cuda node scripts/bench-scale.mjs > scale.jsonl
// Knobs: BENCH_CONFIG (default scripts/configs/qwen3-30b-a3b.json), BENCH_LAYERS,
// BENCH_STEPS ("0,1;0,1,2;0,1,2,3;0,1,2;0,1"), BENCH_HOLD_S (steady seconds per
// layout, default 6), BENCH_CONCURRENCY (requests kept running on each instance, default 32),
// BENCH_PROMPT (64), BENCH_OUTPUT (64), BENCH_OUTPUT_SPREAD (0: request i asks for
// BENCH_OUTPUT + i % (spread + 1) tokens, so requests stop finishing in lockstep
// waves), BENCH_DIR (scratch on local disk), BENCH_BASELINES (default
// "cold,replica,vertical"; BENCH_SKIP_COLD drops cold), BENCH_REPLICA_DEVICES
// ("2,3"; default: as many devices as the serving layout, the first ones not in it),
// BENCH_VERTICAL_STEPS (default: the first two layouts of BENCH_STEPS), BENCH_PEER_ACCESS
// (own: copies pushed by their sources, the default; all: pulled by their targets),
// BENCH_PAUSE_CAPTURES (1: the serving engine captures no new graph while a scale prepares),
// BENCH_STANDBY (1, the default: standby chunks kept on the devices outside the layout; 0: none; the
// bench waits for them before each scale and reports how long making them took),
// BENCH_SCALE_PROFILE (a directory: a CPU profile of each measured scale, command to first new
// step; every scale line also carries loopDelay, the event loop's longest delay in that window),
// BENCH_PREFILL (1, the default: standby chunks filled ahead with the planned scale-up's bytes,
// DeploymentOptions.prefillStandby; 0: blank standby chunks, copied into at scale time),
// BENCH_HOST_POOL (1, the default: pinned host buffers handed from engine to engine; 0: freed at release),
// BENCH_STANDBY_ENGINES (1, the default: the standby engine of each planned scale-up made ahead,
// DeploymentOptions.standbyEngines; 0: made by the scale's attach phase), BENCH_STANDBY_FOLLOW (the shapes per
// staying device those engines keep captured while serving, standbyEngines.follow; default precaptureGraphs),
// BENCH_EXPERT_TABLES=1 (DeploymentOptions.expertTables: the elastic deployment's engines read the experts in the virtual expert tables;
// the baselines do not use them),
// BENCH_BALANCE=1 (DeploymentOptions.balanceOnScale: the switch-over balances the running sequences over the new ranks),
// BENCH_RAMP=0 (DeploymentOptions.rampShapes off: the standby engines made ahead capture no climb shapes; A/B),
// BENCH_SCALE_DOWN_SPARES (1: the serving devices also keep standby chunks for a scale-down,
// DeploymentOptions.scaleDownSpares; default 0),
// BENCH_PRECAPTURE (graph shapes per staying device the standby engine captures ahead,
// DeploymentOptions.precaptureGraphs; default DEFAULT_PRECAPTURE_GRAPHS (3), 0: none),
// BENCH_CHECKPOINT ("pattern": a byte pattern, the default, or "export": the
// synthetic weights the deployments serve, read back from the devices).
// Prepare pacing (elastic and vertical; DeploymentOptions.prepare): BENCH_PREPARE_PACED
// (1; 0 = the HMM's CopyService, everything at once), BENCH_PREPARE_INFLIGHT_MB (2048),
// BENCH_PREPARE_RATE_GBPS (unlimited), BENCH_PREPARE_ALLOC_GROUP (8),
// BENCH_PREPARE_YIELD_MS (0), BENCH_PREPARE_QUEUE_GROUP (Infinity), BENCH_PREPARE_OFF_THREAD
// (1; 0 = target chunks created on the main thread), BENCH_PREPARE_MAKE_GROUP (64). Engines: BENCH_GRAPHS, BENCH_GRAPH_INSTANTIATE, BENCH_DEVICE_ROUTING_MAX_ROWS, BENCH_EXECUTOR, BENCH_PRESTART and BENCH_PREATTACH (below).
// libuv's thread pool runs every blocking device wait (event/stream synchronize);
// with 4 threads (Node's default) the forward pass's per-rank waits queue behind
// any other: the script re-runs itself with UV_THREADPOOL_SIZE=16 unless it is set.
import { spawnSync } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { Session } from 'node:inspector/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { monitorEventLoopDelay } from 'node:perf_hooks';

if (!process.env.UV_THREADPOOL_SIZE) {
  const r = spawnSync(process.execPath, [...process.execArgv, ...process.argv.slice(1)], {
    stdio: 'inherit', env: { ...process.env, UV_THREADPOOL_SIZE: '16' },
  });
  process.exit(r.status ?? 1);
}

const { Runtime } = await import('../dist/index.js');
const { dropPageCache, writePatternCheckpoint } = await import('./lib/checkpoint.mjs');
const { pauses, workAcross, workDuring } = await import('./lib/transition.mjs');
const { Hmm } = await import('../dist/hmm/hmm.js');
const { planChunks } = await import('../dist/hmm/placement.js');
const { openCheckpoint } = await import('../dist/hmm/safetensors.js');
const { loadCheckpoint } = await import('../dist/hmm/weight-loader.js');
const { readConfig } = await import('../dist/model/config.js');
const { roundRobinPlacement, weightShapes, weightSpecs } = await import('../dist/model/weights.js');
const { ForwardEngine } = await import('../dist/executor/forward.js');
const { mapHmmKvPools } = await import('../dist/executor/kv-view.js');
const { kvGeometry } = await import('../dist/executor/types.js');
const { storeWeights } = await import('../dist/executor/weights.js');
const { runtimeGroupedMatmul } = await import('../dist/model/kernels/index.js');
const { Deployment } = await import('../dist/scaling/orchestrator.js');
const { DEFAULT_PRECAPTURE_GRAPHS } = await import('../dist/scaling/precapture.js');
const { Replica, VerticalBaseline, exportCheckpoint } = await import('../dist/scaling/baselines.js');

const here = path.dirname(fileURLToPath(import.meta.url));
const env = (k, d) => process.env[k] ?? d;
const emit = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);
const log = (m) => process.stderr.write(`bench-scale: ${m}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const devList = (s) => s.split(',').filter((x) => x !== '').map(Number);

const rt = Runtime.open({});
const config = await readConfig(env('BENCH_CONFIG', path.join(here, 'configs/qwen3-30b-a3b.json')));
if (process.env.BENCH_LAYERS) config.layers = Number(process.env.BENCH_LAYERS);
const plan = env('BENCH_STEPS', '0,1;0,1,2;0,1,2,3;0,1,2;0,1').split(';').map(devList);
const holdMs = Number(env('BENCH_HOLD_S', 6)) * 1000;
const concurrency = Number(env('BENCH_CONCURRENCY', 32));
const promptLen = Number(env('BENCH_PROMPT', 64));
const outputLen = Number(env('BENCH_OUTPUT', 64));
const outputSpread = Number(env('BENCH_OUTPUT_SPREAD', 0));
const baselines = new Set(env('BENCH_BASELINES', 'cold,replica,vertical').split(',').map((s) => s.trim()).filter(Boolean));
if (process.env.BENCH_SKIP_COLD) baselines.delete('cold');
const verticalSteps = process.env.BENCH_VERTICAL_STEPS ? process.env.BENCH_VERTICAL_STEPS.split(';').map(devList) : plan.slice(0, 2);
const checkpointKind = env('BENCH_CHECKPOINT', 'pattern');
const prepare = {
  paced: env('BENCH_PREPARE_PACED', '1') !== '0',
  ...(process.env.BENCH_PREPARE_INFLIGHT_MB ? { maxInflightBytes: Number(process.env.BENCH_PREPARE_INFLIGHT_MB) * 2 ** 20 } : {}),
  ...(process.env.BENCH_PREPARE_RATE_GBPS ? { bytesPerMs: Number(process.env.BENCH_PREPARE_RATE_GBPS) * 1e6 } : {}),
  ...(process.env.BENCH_PREPARE_ALLOC_GROUP ? { allocateGroup: Number(process.env.BENCH_PREPARE_ALLOC_GROUP) } : {}),
  ...(process.env.BENCH_PREPARE_YIELD_MS ? { yieldMs: Number(process.env.BENCH_PREPARE_YIELD_MS) } : {}),
  ...(process.env.BENCH_PREPARE_QUEUE_GROUP ? { queueGroup: Number(process.env.BENCH_PREPARE_QUEUE_GROUP) } : {}),
  ...(process.env.BENCH_PREPARE_OFF_THREAD ? { offThread: process.env.BENCH_PREPARE_OFF_THREAD !== '0' } : {}),
  ...(process.env.BENCH_PREPARE_MAKE_GROUP ? { makeGroup: Number(process.env.BENCH_PREPARE_MAKE_GROUP) } : {}),
};
const geo = kvGeometry(config, 16);
const kvBlocksPerDevice = Math.ceil((concurrency * Math.ceil((promptLen + outputLen + outputSpread) / geo.blockTokens)) * 1.5);
// BENCH_GRAPHS=0: every engine (elastic and baselines) runs without graph replay (A/B).
const serving = { rt, config, kvBlocksPerDevice, maxTokensPerStep: 512, maxSeqs: concurrency, peerAccess: env('BENCH_PEER_ACCESS', 'own'),
  pauseCaptures: env('BENCH_PAUSE_CAPTURES', '0') === '1', standbyChunks: env('BENCH_STANDBY', '1') !== '0',
  precaptureGraphs: Number(env('BENCH_PRECAPTURE', String(DEFAULT_PRECAPTURE_GRAPHS))), scaleDownSpares: env('BENCH_SCALE_DOWN_SPARES', '0') === '1',
  hostPool: env('BENCH_HOST_POOL', '1') !== '0', prefillStandby: env('BENCH_PREFILL', '1') !== '0',
  balanceOnScale: env('BENCH_BALANCE', '0') === '1', rampShapes: env('BENCH_RAMP', '1') !== '0',
  standbyEngines: env('BENCH_STANDBY_ENGINES', '1') === '0' ? false
    : process.env.BENCH_STANDBY_FOLLOW ? { follow: Number(process.env.BENCH_STANDBY_FOLLOW) } : true };
// BENCH_DEVICE_ROUTING_MAX_ROWS: the engines' deviceRoutingMaxRows (default: the engine's).
// BENCH_GRAPH_INSTANTIATE=inline: graphs instantiated on the event loop (A/B; default thread-pool).
// BENCH_COVERED_CAPTURE_AFTER=n: graphs.coveredCaptureAfter (1: every shape captured at its first sighting, as
// before covering graphs; default: the engine's).
const graphKnobs = {
  ...(process.env.BENCH_GRAPH_INSTANTIATE ? { instantiate: process.env.BENCH_GRAPH_INSTANTIATE } : {}),
  ...(process.env.BENCH_COVERED_CAPTURE_AFTER ? { coveredCaptureAfter: Number(process.env.BENCH_COVERED_CAPTURE_AFTER) } : {}),
};
const forward = env('BENCH_GRAPHS', '1') === '0' ? { graphs: false } : Object.keys(graphKnobs).length > 0 ? { graphs: graphKnobs } : {};
if (process.env.BENCH_DEVICE_ROUTING_MAX_ROWS) forward.deviceRoutingMaxRows = Number(process.env.BENCH_DEVICE_ROUTING_MAX_ROWS);
// BENCH_EXECUTOR=process: the elastic deployment's executors run as their own processes (dist/executor/main.js),
// the standby attaching the new layout through the HMM daemon (forward options then stay the executor's defaults).
const executorKnob = env('BENCH_EXECUTOR', 'in-process');
if (!['in-process', 'process'].includes(executorKnob)) throw new Error(`BENCH_EXECUTOR: in-process or process (got '${executorKnob}')`);
// BENCH_PRESTART=0: no executor process started ahead (each scale's attach phase spawns its standby).
// BENCH_PREATTACH=0: the process started ahead does not attach the serving layout's chunks ahead.
// BENCH_INIT_AHEAD=0: nor is it initialised ahead for the planned scale-up (ExecutorMode initAhead).
const executor = executorKnob === 'process'
  ? { process: { script: path.join(here, '../dist/executor/main.js'), prestart: env('BENCH_PRESTART', '1') !== '0',
    preattach: env('BENCH_PREATTACH', '1') !== '0', initAhead: env('BENCH_INIT_AHEAD', '1') !== '0' } } : 'in-process';

const t0 = performance.now();
const clock = () => performance.now() - t0;
/** Every engine step of every instance: who ran it, when it ended, what it did. */
const steps = [];
// graphs: the serving engine's graph counts after the step ([captures, replays, deferred, covered], since its layout
// began; in process only): a step whose captures rose captured a shape, one whose replays did not rise ran at least one
// rank eagerly, one whose covered rose replayed a larger shape's graph for at least one rank.
// ranks: the sequences of each DP rank in the step (how evenly a new layout's first steps are spread).
const recorder = (who, inst) => (f) => {
  const g = inst()?.graphStats;
  steps.push({
    who, t: clock(), ms: f.ms, fwd: f.forwardMs, tokens: f.tokens, decode: f.decodeTokens, seqs: f.batchSeqs, epoch: inst()?.epoch ?? 0, devices: inst()?.devices.length ?? 0,
    ...(g ? { graphs: [g.captures, g.replays, g.deferred, g.covered] } : {}), ranks: f.rankSeqs,
    ...(inst()?.lastStepCaptures?.length ? { captured: inst().lastStepCaptures.map((x) => [x.rank, x.T, x.S, x.MB]) } : {}),
  });
};
const usedBytes = () => rt.devices().map((d) => d.totalBytes - d.freeBytes);
const median = (xs) => (xs.length === 0 ? null : [...xs].sort((a, b) => a - b)[xs.length >> 1]);
/** Decode tokens/s of `who` (default: every instance) in (a, b], and what the window held. */
function window(a, b, who) {
  const ss = steps.filter((s) => s.t > a && s.t <= b && (who === undefined || s.who === who));
  const decode = ss.reduce((x, s) => x + s.decode, 0);
  const all = ss.reduce((x, s) => x + s.tokens, 0);
  return {
    tokensPerSecond: decode / ((b - a) / 1000),
    /** Every token the steps processed (prompt and decode): a window that falls on a wave of prefills does the same work as others, in prompt tokens. */
    allTokensPerSecond: all / ((b - a) / 1000),
    steps: ss.length,
    prefillSteps: ss.filter((s) => s.tokens > s.decode).length,
    /** Median step time of decode-only steps: steady speed, independent of where the window falls in a wave of prefills. */
    medianDecodeStepMs: median(ss.filter((s) => s.tokens === s.decode && s.decode > 0).map((s) => s.ms)),
    meanSeqs: ss.length ? ss.reduce((x, s) => x + s.seqs, 0) / ss.length : 0,
  };
}
/**
 * Speed of a decode-only step during a transition relative to before (median step times,
 * same batch size): the transition's cost to serving without the noise of where the
 * windows fall in a wave of prefills. null when a window holds no decode-only step.
 */
function stepSpeed(before, during) {
  return before.medianDecodeStepMs && during.medianDecodeStepMs ? before.medianDecodeStepMs / during.medianDecodeStepMs : null;
}
/** The figures of one measured transition (measureScale's result) that the elastic and the vertical lines share. */
function transitionFigures(m) {
  return {
    from: m.from, to: m.to, commandToFirstNewStepMs: m.first.t - m.tCmd, reportMs: m.report.ms, phases: m.report.phases,
    ...(m.report.attach ? { attach: m.report.attach } : {}),
    ...(m.report.precapture ? { precapture: m.report.precapture } : {}),
    loopDelay: m.loopDelay,
    decodeTokensPerSecondBefore: m.before.tokensPerSecond, decodeTokensPerSecondDuring: m.during.tokensPerSecond,
    duringOverBefore: m.during.tokensPerSecond / m.before.tokensPerSecond, before: m.before, during: m.during,
    decodeStepSpeedDuringOverBefore: stepSpeed(m.before, m.during),
    allTokensDuringOverBefore: m.during.allTokensPerSecond / m.before.allTokensPerSecond,
    // Serving work done in the window against before, each step counted as a like step took before (scripts/lib/transition.mjs).
    workDuringOverBefore: workDuring(steps.filter((s) => s.who === m.kind), m.tCmd, m.first.t)?.ratio ?? null,
  };
}
function peakSampler() {
  const peak = usedBytes();
  const timer = setInterval(() => usedBytes().forEach((u, d) => (peak[d] = Math.max(peak[d], u))), 5);
  return { stop: () => { clearInterval(timer); usedBytes().forEach((u, d) => (peak[d] = Math.max(peak[d], u))); return peak; } };
}

/** Keeps `concurrency` requests in flight on each instance of `targets`. */
function startLoad(name) {
  const state = { name, stop: false, submitted: 0, completed: 0, failed: 0, targets: [], inflight: new Set() };
  const count = new Map();
  const hungry = () => state.targets.find((t) => (count.get(t) ?? 0) < concurrency);
  state.done = (async () => {
    while (!state.stop) {
      for (let target = hungry(); target && !state.stop; target = hungry()) {
        const id = state.submitted++;
        count.set(target, (count.get(target) ?? 0) + 1);
        const prompt = Array.from({ length: promptLen }, (_, k) => (k * 31 + id * 7) % config.vocabSize);
        const p = target.submit({ prompt, maxTokens: outputLen + (id % (outputSpread + 1)), ignoreEos: true }).then((c) => {
          if (c.finishReason === 'length') state.completed++; else state.failed++;
        }, () => state.failed++).finally(() => {
          state.inflight.delete(p);
          count.set(target, count.get(target) - 1);
        });
        state.inflight.add(p);
      }
      await sleep(1);
    }
    await Promise.allSettled([...state.inflight]);
  })();
  /** Stops routing to `target` and waits for its requests in flight. */
  state.retire = async (target) => {
    state.targets = state.targets.filter((t) => t !== target);
    while ((count.get(target) ?? 0) > 0) await sleep(5);
  };
  state.finish = async () => {
    state.stop = true;
    await state.done;
    emit({ bench: 'load', phase: name, submitted: state.submitted, completed: state.completed, failed: state.failed });
  };
  return state;
}

// BENCH_SCALE_PROFILE=DIR: a CPU profile (.cpuprofile) of each measured scale, from its
// command to the first step on the new layout, written to DIR (where the host time went);
// BENCH_SCALE_PROFILE_AFTER_MS: the profile goes on that long after the first new step (the
// release, the new layout's first captures, the work ahead of the next scale).
const scaleProfileDir = process.env.BENCH_SCALE_PROFILE || undefined;
const profileAfterMs = Number(env('BENCH_SCALE_PROFILE_AFTER_MS', 0));
let profiler;
if (scaleProfileDir) {
  mkdirSync(scaleProfileDir, { recursive: true });
  profiler = new Session();
  profiler.connect();
  await profiler.post('Profiler.enable');
  await profiler.post('Profiler.setSamplingInterval', { interval: 200 });
}
let profiled = 0;

/**
 * One scale of a deployment-like instance under load, measured as the elastic scales are. Also
 * the event loop's delays from the command to the first new step (`loopDelay`, ms: the longest
 * and the 99th percentile): how long serving steps could have waited behind the scale's host work.
 */
async function measureScale(kind, inst, to) {
  const from = inst.devices;
  const epochBefore = inst.epoch;
  const loop = monitorEventLoopDelay({ resolution: 1 });
  loop.enable();
  if (profiler) await profiler.post('Profiler.start');
  const tCmd = clock();
  const sampler = peakSampler();
  let report;
  try {
    report = await inst.scale({ devices: to });
  } finally {
    sampler.stop(); // also when the scale fails (its interval would keep the process alive)
    if (report === undefined) {
      loop.disable();
      if (profiler) await profiler.post('Profiler.stop');
    }
  }
  const peak = sampler.stop();
  while (!steps.some((s) => s.who === kind && s.t > tCmd && s.epoch > epochBefore)) await sleep(2);
  const first = steps.find((s) => s.who === kind && s.t > tCmd && s.epoch > epochBefore);
  loop.disable();
  if (profiler) {
    if (profileAfterMs > 0) await sleep(profileAfterMs);
    const { profile } = await profiler.post('Profiler.stop');
    writeFileSync(path.join(scaleProfileDir, `${++profiled}-${kind}-${from.join('.')}-to-${to.join('.')}.cpuprofile`), JSON.stringify(profile));
  }
  const loopDelay = { maxMs: loop.max / 1e6, p99Ms: loop.percentile(99) / 1e6 };
  const before = window(tCmd - 3000, tCmd, kind);
  const during = window(tCmd, first.t, kind);
  return { kind, from, to, tCmd, first, report, peak, before, during, loopDelay };
}

emit({ bench: 'start', clockOriginEpochMs: performance.timeOrigin + t0, executor: executorKnob, backend: rt.backend, gpus: rt.devices().map((d) => d.name), uvThreadpool: Number(process.env.UV_THREADPOOL_SIZE),
  groupedMatmul: runtimeGroupedMatmul(rt),
  steps: plan, baselines: [...baselines], prepare, concurrency, promptLen, outputLen, outputSpread });

// ---- the checkpoint the cold restart and the replica load: written before anything serves.
const dir = env('BENCH_DIR', path.join(os.tmpdir(), `emoe-scale-${process.pid}`));
const ckpt = path.join(dir, 'ckpt');
const needCkpt = baselines.has('cold') || baselines.has('replica');
if (needCkpt && checkpointKind === 'pattern') {
  mkdirSync(ckpt, { recursive: true });
  writePatternCheckpoint(ckpt, weightShapes(config).map((w) => ({ name: w.name, shape: w.shape })), 16);
}

// ---- elastic
const startT = clock();
let dep;
dep = await Deployment.start({ ...serving, forward, executor, devices: plan[0], seed: 11n, prepare, onStep: recorder('elastic', () => dep),
  expertTables: env('BENCH_EXPERT_TABLES', '0') === '1' });
emit({ bench: 'start_deployment', devices: plan[0], ms: clock() - startT });
/** Waits for the deployment's background work (standby chunks, access grants) and reports it. */
async function settle(when) {
  const t = clock();
  await dep.settled();
  const standby = dep.standby;
  emit({ bench: 'standby', when, settleMs: clock() - t, devices: standby.devices, engines: standby.engines, ...(standby.error ? { error: String(standby.error) } : {}) });
}
await settle('start');
if (needCkpt && checkpointKind === 'export') {
  const t = clock();
  const r = await exportCheckpoint(dep.hmm.store, config, ckpt, { files: 16 });
  emit({ bench: 'checkpoint', kind: 'export', bytes: r.bytes, ms: clock() - t });
}
const load = startLoad('elastic');
load.targets = [dep];
await sleep(holdMs);
// When the work ahead (standby chunks, their fills) last finished: the "before" window of a scale
// (3 s) starts after it, so that the fills' copies never count as the serving rate before.
let aheadDoneAt = clock();
for (let i = 1; i < plan.length; i++) {
  if (i > 1) {
    await settle(`before ${plan[i].join(',')}`);
    const wait = aheadDoneAt + 3000 - clock();
    if (wait > 0) {
      log(`waiting ${wait.toFixed(0)} ms more: the work ahead ended less than 3 s ago`);
      await sleep(wait);
    }
  }
  const m = await measureScale('elastic', dep, plan[i]);
  let doneAt;
  void dep.settled().then(() => { aheadDoneAt = doneAt = clock(); });
  const r = m.report;
  const figures = transitionFigures(m);
  emit({ bench: 'scale', ...figures,
    bytesCopied: r.bytesCopied, lowerBoundBytes: r.lowerBoundBytes, chunksCopied: r.chunksCopied, chunksFromStandby: r.chunksFromStandby,
    chunksPrefilled: r.chunksPrefilled, bytesPrefilled: r.bytesPrefilled,
    plannedAhead: r.plannedAhead, standbyMadeAhead: r.standbyMadeAhead ?? null, prestartedExecutor: r.prestartedExecutor, preattachedChunks: r.preattachedChunks, attachDuringCopies: r.attachDuringCopies,
    attachBeforeTargets: r.attachBeforeTargets, chunksReused: r.chunksReused, chunksReleased: r.chunksReleased, chunksKeptAsStandby: r.chunksKeptAsStandby, switchover: r.switchover, prepare: r.prepare,
    peakUsedBytes: m.peak });
  const speed = stepSpeed(m.before, m.during);
  log(`elastic ${m.from.join(',')} -> ${m.to.join(',')}: ${(m.first.t - m.tCmd).toFixed(0)} ms to the first step on the new layout; ` +
    `throughput during ${(100 * m.during.tokensPerSecond / m.before.tokensPerSecond).toFixed(0)}% of before ` +
    `(all tokens, prompt and decode: ${(100 * m.during.allTokensPerSecond / m.before.allTokensPerSecond).toFixed(0)}%); ` +
    `decode step speed during ${speed === null ? 'n/a (no decode-only step)' : `${(100 * speed).toFixed(0)}%`} of before; ` +
    `serving work done during ${figures.workDuringOverBefore === null ? 'n/a' : `${(100 * figures.workDuringOverBefore).toFixed(0)}%`} of before; ` +
    `${r.chunksFromStandby} of ${r.chunksCopied} target chunks were standby chunks, ${r.chunksPrefilled} of them filled ahead`);
  await sleep(holdMs);
  // The release and the new layout's first steps: the pauses between steps in the second after
  // the first new step (the host not keeping the GPUs busy), and the tokens served in it.
  const elasticSteps = steps.filter((s) => s.who === 'elastic');
  const gaps = pauses(elasticSteps, m.first.t, m.first.t + 1000);
  const tokensAfter = elasticSteps.filter((s) => s.t > m.first.t && s.t <= m.first.t + 1000).reduce((a, s) => a + s.tokens, 0);
  // The new layout's graph counts from its first step to 1 s after it: captures (each holds its step) and covered replays.
  const lastInSecond = elasticSteps.filter((s) => s.epoch === m.first.epoch && s.graphs && s.t <= m.first.t + 1000).at(-1);
  const graphsInSecond = lastInSecond ? { captures: lastInSecond.graphs[0], replays: lastInSecond.graphs[1], covered: lastInSecond.graphs[3] ?? 0 } : null;
  // The work ahead of the next scale (standby chunks filled, standby engines made) runs from the
  // scale's end until settled: serving work done meanwhile against the steady steps in the 3 s after it.
  const ahead = doneAt === undefined ? null : {
    ms: doneAt - m.first.t,
    workDuringOverSteadyAfter: workDuring(elasticSteps, m.first.t, doneAt, 0, { from: doneAt, to: Math.min(doneAt + 3000, clock()) })?.ratio ?? null,
    pauses: pauses(elasticSteps, m.first.t, doneAt),
  };
  // Serving work in the second from the command (the scale, the first new steps, the release and part of the
  // work ahead), each layout's steps against its own steady steps (the new layout's: after the work ahead, to now).
  const oldEpoch = elasticSteps.filter((s) => s.epoch < m.first.epoch);
  const newEpoch = elasticSteps.filter((s) => s.epoch === m.first.epoch);
  const steady = { from: doneAt ?? m.first.t + 1000, to: clock() };
  const second = workAcross(oldEpoch, newEpoch, m.tCmd, m.tCmd + 1000, 3000, steady);
  // To 1 s after the first new step: the new layout's first second counted whatever the scale's latency.
  const through = workAcross(oldEpoch, newEpoch, m.tCmd, m.first.t + 1000, 3000, steady);
  emit({ bench: 'after', from: m.from, to: m.to, firstNewStepMs: m.first.ms, pauses: gaps, tokensInSecondAfter: tokensAfter, graphsInSecond, phases: r.phases,
    ...(r.release ? { release: r.release } : {}), hostPool: dep.hostPoolStats, ahead, workInSecondFromCommand: second?.ratio ?? null,
    workToSecondAfterFirstStep: through ? { ratio: through.ratio, lostMs: (1 - through.ratio) * through.windowMs } : null });
  log(`  after ${m.from.join(',')} -> ${m.to.join(',')}: first new step ${m.first.ms.toFixed(0)} ms; in the second after it ` +
    `${tokensAfter} tokens, pauses between steps ${gaps.sumMs.toFixed(0)} ms (longest ${gaps.maxMs.toFixed(0)} ms)` +
    `${graphsInSecond ? `, rank graphs captured ${graphsInSecond.captures}, covered ${graphsInSecond.covered} of ${graphsInSecond.replays} replays` : ''}; release ${r.phases.releaseMs.toFixed(0)} ms; ` +
    `serving work in the second from the command ${second ? `${(100 * second.ratio).toFixed(0)}%` : 'n/a'}, ` +
    `to 1 s after the first new step ${through ? `${(100 * through.ratio).toFixed(0)}% (${((1 - through.ratio) * through.windowMs).toFixed(0)} ms lost)` : 'n/a'}; ` +
    (ahead ? `work ahead ${ahead.ms.toFixed(0)} ms, serving work meanwhile ${ahead.workDuringOverSteadyAfter === null ? 'n/a' : `${(100 * ahead.workDuringOverSteadyAfter).toFixed(0)}%`} of the steady steps after it` : 'work ahead still running'));
}

// ---- replica: a second copy of the model on fresh devices while the elastic deployment serves.
if (baselines.has('replica')) {
  const servingDevices = dep.devices;
  const fresh = process.env.BENCH_REPLICA_DEVICES
    ? devList(process.env.BENCH_REPLICA_DEVICES)
    : Array.from({ length: rt.deviceCount }, (_, d) => d).filter((d) => !servingDevices.includes(d)).slice(0, servingDevices.length);
  if (fresh.length === 0) {
    emit({ bench: 'replica', skipped: `no fresh device (serving on ${servingDevices.join(',')} of ${rt.deviceCount})` });
  } else {
    // The replica takes the idle devices: the elastic deployment's standby chunks there are freed first (on
    // 80 GB cards they and a replica would not fit together).
    if (dep.standby.devices.length > 0) {
      const tFree = clock();
      await dep.setStandbyChunks(false);
      await dep.settled();
      emit({ bench: 'standby', when: 'before replica (freed)', settleMs: clock() - tFree, devices: dep.standby.devices });
    }
    // "Before" ends here: dropping the page cache blocks this process (seconds, with the checkpoint cached).
    const tBefore = clock();
    const dropped = dropPageCache();
    const tCmd = clock();
    const sampler = peakSampler();
    let replica;
    replica = await Replica.start({ ...serving, forward, devices: fresh, checkpoint: ckpt, onStep: recorder('replica', () => replica) });
    const tReady = clock();
    // The new replica's first token: a request of the same shape as the load's, sent as soon as it is up.
    let tFirst;
    const prompt = Array.from({ length: promptLen }, (_, k) => (k * 31 + 7) % config.vocabSize);
    const probe = replica.submit({ prompt, maxTokens: outputLen, ignoreEos: true }, { onToken: () => { tFirst ??= clock(); } });
    while (tFirst === undefined) await sleep(1);
    // From now on the replica takes its share: `concurrency` requests in flight on each instance.
    load.targets = [dep, replica];
    const peak = sampler.stop();
    const before = window(tBefore - 3000, tBefore, 'elastic');
    const during = window(tCmd, tFirst, 'elastic');
    await sleep(holdMs);
    const tEnd = clock();
    const after = { elastic: window(tEnd - holdMs / 2, tEnd, 'elastic'), replica: window(tEnd - holdMs / 2, tEnd, 'replica') };
    emit({ bench: 'replica', servingDevices, devices: fresh, commandToFirstTokenMs: tFirst - tCmd, startMs: tReady - tCmd, timings: replica.timings,
      pageCacheDropped: dropped, decodeTokensPerSecondBefore: before.tokensPerSecond, decodeTokensPerSecondDuring: during.tokensPerSecond,
      duringOverBefore: during.tokensPerSecond / before.tokensPerSecond, before, during,
      decodeTokensPerSecondAfter: after.elastic.tokensPerSecond + after.replica.tokensPerSecond, after, peakUsedBytes: peak,
      note: 'in this process: device contexts already exist; a separate replica process also pays process start and context creation' });
    log(`replica onto ${fresh.join(',')} (serving on ${servingDevices.join(',')}): ${(tFirst - tCmd).toFixed(0)} ms to its first token ` +
      `(weights ${replica.timings.loadMs.toFixed(0)} ms); original's throughput during ${before.tokensPerSecond > 0 ? `${(100 * during.tokensPerSecond / before.tokensPerSecond).toFixed(0)}%` : 'n/a (nothing served'} of before${before.tokensPerSecond > 0 ? '' : ')'}`);
    await load.retire(replica);
    await probe;
    await replica.close();
  }
}
await load.finish();
const lastDevices = dep.devices;
await dep.close();

// ---- vertical: the paper's "extravagant" scaling, under the same load.
if (baselines.has('vertical') && verticalSteps.length > 1) {
  let vb;
  vb = await VerticalBaseline.start({ ...serving, forward, devices: verticalSteps[0], seed: 11n, prepare, onStep: recorder('vertical', () => vb) });
  const vload = startLoad('vertical');
  vload.targets = [vb];
  await sleep(holdMs);
  for (let i = 1; i < verticalSteps.length; i++) {
    let m;
    try {
      m = await measureScale('vertical', vb, verticalSteps[i]);
    } catch (e) {
      // It may not fit: it builds the whole new layout beside the old one (on 80 GB cards a
      // 1→2 of Qwen3-30B-A3B shapes needs ~91 GB on the serving device). Reported, not fatal.
      emit({ bench: 'vertical', from: verticalSteps[i - 1], to: verticalSteps[i], error: `${e.name}: ${e.message}` });
      log(`vertical (extravagant) ${verticalSteps[i - 1].join(',')} -> ${verticalSteps[i].join(',')}: failed (${e.name}: ${e.message})`);
      break;
    }
    const r = m.report;
    emit({ bench: 'vertical', ...transitionFigures(m),
      bytesCopied: r.bytesCopied, bytesCopiedLocal: r.bytesCopiedLocal, bytesCopiedPeer: r.bytesCopiedPeer, chunksCopied: r.chunksCopied,
      weightBytes: r.weightBytes, peakWeightsOverSteady: r.weightBytes.peak.map((p, d) => (r.weightBytes.after[d] ? p / r.weightBytes.after[d] : null)),
      switchover: r.switchover, prepare: r.prepare, peakUsedBytes: m.peak });
    log(`vertical (extravagant) ${m.from.join(',')} -> ${m.to.join(',')}: ${(m.first.t - m.tCmd).toFixed(0)} ms to the first step on the new layout; ` +
      `throughput during ${(100 * m.during.tokensPerSecond / m.before.tokensPerSecond).toFixed(0)}% of before; ` +
      `peak weights ${r.weightBytes.peak.map((b) => (b / 1e9).toFixed(2)).join('/')} GB per device (after: ${r.weightBytes.after.map((b) => (b / 1e9).toFixed(2)).join('/')})`);
    await sleep(holdMs);
  }
  await vload.finish();
  await vb.close();
}
for (const s of steps) emit({ bench: 'timeline', ...s });

// ---- cold restart baseline: the same weights from safetensors on local disk.
if (baselines.has('cold')) {
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
  const fwd = await ForwardEngine.create(rt, config, { devices, placement }, storeWeights(hmm.store), pools, { ...forward, blockTokens: geo.blockTokens });
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
}
rmSync(dir, { recursive: true, force: true });
