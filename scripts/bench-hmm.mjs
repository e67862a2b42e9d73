#!/usr/bin/env node
// HMM benchmark, one process, same run for every figure:
//  A. Qwen3-30B-A3B shapes (bf16, synthetic fill on the devices) over GPUs 0 and 1
//     (dense weights on both, experts round-robin): a fresh process attaching
//     every chunk through the daemon, versus reloading the same bytes from pinned
//     host memory, versus loading them from safetensors files on local disk.
//  B. With 3+ GPUs: bandwidth of a copy into GPU 2 striped over 2 sources
//     (GPUs 0, 1) versus 1 source, against the single-copy P2P peak.
// Output: JSON lines on stdout; progress on stderr.
//   ELASTICMOE_BACKEND=cuda node scripts/bench-hmm.mjs > hmm.jsonl
// Knobs: BENCH_LAYERS (default all), BENCH_ATTACH_RUNS (3), BENCH_ST_LAYERS
// (layers written to safetensors; default 12), BENCH_DIR (scratch dir on local disk),
// BENCH_SKIP_ST / BENCH_SKIP_COPY (skip parts A4 / B),
// BENCH_EXPERTS_PER_CHUNK (default 1: one chunk per expert; 128 = one slab per layer
// and device), BENCH_DENSE_CHUNK_MIB (the dense weights' chunk size cap, default 512).
import { spawn } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { Runtime } from '../dist/index.js';
import { dropPageCache, writePatternCheckpoint } from './lib/checkpoint.mjs';
import { Hmm } from '../dist/hmm/hmm.js';
import { HmmDaemon } from '../dist/hmm/daemon.js';
import { CopyService } from '../dist/hmm/copy-service.js';
import { openCheckpoint } from '../dist/hmm/safetensors.js';
import { loadCheckpoint } from '../dist/hmm/weight-loader.js';
import { planChunks } from '../dist/hmm/placement.js';
import { readConfig } from '../dist/model/config.js';
import { roundRobinPlacement, weightSpecs } from '../dist/model/weights.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const emit = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);
const log = (m) => process.stderr.write(`bench-hmm: ${m}\n`);
const GB = 1e9;
const MIB = 1024 * 1024;

const rt = Runtime.open({});
const devices = [0, 1];
const config = await readConfig(path.join(here, 'configs/qwen3-30b-a3b.json'));
if (process.env.BENCH_LAYERS) config.layers = Number(process.env.BENCH_LAYERS);
const perChunk = Number(process.env.BENCH_EXPERTS_PER_CHUNK ?? 1);
let specs = weightSpecs(config, devices, roundRobinPlacement(config.experts, devices));
if (perChunk > 1) specs = specs.map((s) => (s.group.startsWith('L') ? { ...s, group: s.group.replace(/E(\d+)$/, (_, e) => `S${Math.floor(Number(e) / perChunk)}`) } : s));
emit({ bench: 'setup', backend: rt.backend, devices: rt.devices().map((d) => d.name), layers: config.layers, expertsPerChunk: perChunk, denseChunkMiB: Number(process.env.BENCH_DENSE_CHUNK_MIB ?? 512) });

// ---- A1: synthetic fill in the HMM
const hmm = new Hmm(rt);
let t = performance.now();
const denseChunkMiB = Number(process.env.BENCH_DENSE_CHUNK_MIB ?? 512);
const stored = await hmm.loadSynthetic(specs, { seed: 1n, placement: { maxSharedChunkBytes: denseChunkMiB * MIB } });
const fillMs = performance.now() - t;
const totalBytes = stored.reduce((a, c) => a + c.plan.size, 0);
const tensorBytes = stored.reduce((a, c) => a + c.plan.tensors.reduce((b, x) => b + x.bytes, 0), 0);
emit({ bench: 'synthetic_fill', chunks: stored.length, chunkBytes: totalBytes, tensorBytes, ms: fillMs, gbps: tensorBytes / GB / (fillMs / 1e3) });
log(`filled ${(totalBytes / GB).toFixed(1)} GB in ${stored.length} chunks (${fillMs.toFixed(0)} ms)`);

// ---- A2: a fresh process attaches through the daemon
const dir = process.env.BENCH_DIR ?? path.join(os.tmpdir(), `emoe-bench-${process.pid}`);
mkdirSync(dir, { recursive: true });
const socket = path.join(dir, 'hmm.sock');
const daemon = await HmmDaemon.listen(hmm, socket);
const probe = 'model.layers.0.mlp.experts.1.down_proj.weight';
const expected = (await hmm.store.checksumTensor(probe, 1)).toString();
const attachRuns = Number(process.env.BENCH_ATTACH_RUNS ?? 3);
const attaches = [];
for (let i = 0; i < attachRuns; i++) {
  // Asynchronous spawn: the daemon answering the child runs on this process's event loop.
  const r = await new Promise((resolve) => {
    const child = spawn(process.execPath, [path.join(here, 'bench-hmm-attach.mjs'), socket, probe], { env: process.env });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('exit', (status) => resolve({ status, stdout, stderr }));
  });
  if (r.status !== 0) throw new Error(`attach child failed: ${r.stderr}`);
  const res = JSON.parse(r.stdout.trim().split('\n').pop());
  if (res.checksum !== expected) throw new Error(`attached bytes differ: ${res.checksum} != ${expected}`);
  attaches.push(res);
  emit({ bench: 'attach', run: i, ...res, checksumMatches: true });
}
await daemon.close();
const attachMs = Math.min(...attaches.map((a) => a.attachMs));

// ---- A3: reload the same bytes from pinned host memory (both GPUs at once)
const stage = Math.min(1024 * MIB, Math.max(...stored.map((c) => c.plan.size)) * 4);
const host = devices.map(() => rt.hostBuffer(stage));
host.forEach((h) => h.bytes().fill(0x3c));
const reload = async () => {
  const start = performance.now();
  await Promise.all(devices.map(async (d, i) => {
    const s = hmm.store.stream(d);
    for (const c of stored.filter((x) => x.plan.device === d)) {
      for (let off = 0; off < c.plan.size; off += stage) s.upload(c.range.at(off), host[i], Math.min(stage, c.plan.size - off));
    }
    await s.synchronize();
  }));
  return performance.now() - start;
};
await reload(); // warm-up
const pinnedMs = Math.min(await reload(), await reload());
host.forEach((h) => h.dispose());
emit({ bench: 'pinned_reload', bytes: totalBytes, ms: pinnedMs, gbps: totalBytes / GB / (pinnedMs / 1e3), stagingBytes: stage, note: 'one pinned buffer per GPU reused for every chunk' });
emit({ bench: 'attach_vs_pinned', attachMs, pinnedMs, speedup: pinnedMs / attachMs });
log(`attach ${attachMs.toFixed(1)} ms vs pinned reload ${pinnedMs.toFixed(0)} ms: ${(pinnedMs / attachMs).toFixed(1)}x`);

// ---- A4: load from safetensors files on local disk (a subset of layers)
if (!process.env.BENCH_SKIP_ST) {
const stLayers = Math.min(config.layers, Number(process.env.BENCH_ST_LAYERS ?? 12));
const stSpecs = specs.filter((s) => !/^model\.layers\.(\d+)\./.test(s.name) || Number(s.name.split('.')[2]) < stLayers);
const stPlans = planChunks(stSpecs.map((s) => ({ ...s, group: `st.${s.group}` })), { granularity: rt.granularity(0) });
hmm.releaseResident(stored.map((c) => c.plan.id)); // make room: the attach and reload figures are taken
const stDir = path.join(dir, 'ckpt');
{
  // One entry per tensor name (replicas on several devices are one tensor in a checkpoint).
  const shapes = new Map(stSpecs.map((s) => [s.name, s.shape]));
  writePatternCheckpoint(stDir, [...shapes].map(([name, shape]) => ({ name, shape })), 8);
}
const dropped = dropPageCache();
t = performance.now();
const ckpt = await openCheckpoint(stDir);
const loaded = await loadCheckpoint(hmm.store, stPlans, ckpt, { holder: 'st' });
const stMs = performance.now() - t;
const stBytes = stPlans.reduce((a, p) => a + p.tensors.reduce((b, x) => b + x.bytes, 0), 0);
emit({ bench: 'safetensors_load', layers: stLayers, bytes: stBytes, ms: stMs, gbps: stBytes / GB / (stMs / 1e3), pageCacheDropped: dropped });
for (const c of loaded) hmm.store.release(c.plan.id, 'st');
rmSync(stDir, { recursive: true, force: true });
log(`safetensors ${(stBytes / GB).toFixed(1)} GB in ${stMs.toFixed(0)} ms (page cache dropped: ${dropped})`);
}

// ---- B: striped copy into a third GPU
if (rt.deviceCount >= 3 && !process.env.BENCH_SKIP_COPY) {
  const g = rt.granularity(0);
  const expertSpecs = [];
  const n = Number(process.env.BENCH_COPY_EXPERTS ?? 96);
  for (let e = 0; e < n; e++) {
    for (const d of [0, 1]) {
      for (const p of ['gate', 'up', 'down']) expertSpecs.push({ name: `x.e${e}.${p}`, dtype: 'bf16', shape: p === 'down' ? [2048, 768] : [768, 2048], device: d, group: `X.E${e}` });
    }
  }
  await hmm.loadSynthetic(expertSpecs, { seed: 3n });
  const copies = new CopyService(hmm.store);
  const bytes = n * planChunks(expertSpecs.slice(0, 3), { granularity: g })[0].size;
  // Returns [total ms including chunk allocation, ms of the copies alone].
  const runCopy = async (sources, round) => {
    const start = performance.now();
    let copyMs = 0;
    const made = await copies.copy(Array.from({ length: n }, (_, e) => ({
      sourceId: `X.E${e}@0`, extraSourceIds: sources === 2 ? [`X.E${e}@1`] : [], targetDevice: 2, targetId: `X.E${e}@2.r${round}`,
    })), { holder: 'bench', onTimings: (t) => (copyMs = t.copyMs) });
    const ms = performance.now() - start;
    for (const c of made) hmm.store.release(c.plan.id, 'bench');
    return [ms, copyMs];
  };
  // Peak single P2P copy of one large buffer in the same run.
  const big = 1024 * MIB;
  const [a, b] = [rt.createChunk(0, big), rt.createChunk(2, big)];
  const [ra, rb] = [rt.reserve(big), rt.reserve(big)];
  ra.map(0, a); rb.map(0, b);
  ra.setAccess(0, big, [0, 2]); rb.setAccess(0, big, [0, 2]);
  const s = rt.createStream(0);
  const e0 = rt.createEvent(0, { timing: true });
  const e1 = rt.createEvent(0, { timing: true });
  let peak = 0;
  for (let i = 0; i < 6; i++) {
    e0.record(s); s.copy(rb.at(0), ra.at(0), big); e1.record(s);
    await e1.synchronize();
    peak = Math.max(peak, big / GB / (e1.elapsedSince(e0) / 1e3));
  }
  ra.dispose(); rb.dispose(); a.dispose(); b.dispose();
  await runCopy(1, 'w1'); await runCopy(2, 'w2');
  const best = (runs) => [Math.min(...runs.map((r) => r[0])), Math.min(...runs.map((r) => r[1]))];
  const [one, oneCopy] = best([await runCopy(1, 'a'), await runCopy(1, 'b'), await runCopy(1, 'c')]);
  const [two, twoCopy] = best([await runCopy(2, 'd'), await runCopy(2, 'e'), await runCopy(2, 'f')]);
  const gbps = (ms) => bytes / GB / (ms / 1e3);
  emit({ bench: 'striped_copy', experts: n, bytes, peakSingleGbps: peak,
    oneSourceGbps: gbps(one), twoSourceGbps: gbps(two), oneSourceCopyGbps: gbps(oneCopy), twoSourceCopyGbps: gbps(twoCopy),
    twoCopyOverPeak: gbps(twoCopy) / peak });
  log(`copy into GPU 2: copies alone 1 source ${gbps(oneCopy).toFixed(0)} GB/s, 2 sources ${gbps(twoCopy).toFixed(0)} GB/s ` +
    `(with chunk allocation ${gbps(one).toFixed(0)} / ${gbps(two).toFixed(0)}), single-copy peak ${peak.toFixed(0)} GB/s`);
}
hmm.dispose();
rmSync(dir, { recursive: true, force: true });
