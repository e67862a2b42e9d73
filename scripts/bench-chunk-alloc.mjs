#!/usr/bin/env node
// What creating one expert chunk costs, step by step, through the addon: the prepare
// phase of a scale creates ~1,100-1,700 of them (Qwen3-30B-A3B, 12 MiB each) and that
// took 0.3-0.44 ms per chunk under load (docs/benchmarks.md). For N chunks on a target
// device, each of the ways below is timed as a whole (ms for all N, and µs per chunk):
//   store   ChunkStore.allocate's sequence: create (exportable) + reserve + map +
//           set-access for [target, ...sources], one reserve per chunk;
//   split   the same calls timed one kind at a time (create, reserve, map, access, export);
//   access1 set-access for the target only (copies pulled by the target's stream);
//   onerange one reserve for all N, each chunk mapped at its offset, one set-access call.
//   async   Runtime.createMappedChunks (create + map + set-access on a worker thread) for the
//           N chunks of the target in one call; with the event loop's longest gap meanwhile;
//           async-many: the same into ranges side by side (reserveMany);
//   spread  N chunks spread over `spreadDevices` devices (default 2: a 3->2 scale-down's
//           targets): 'sync' (store's loop), 'async-serial' (one call per device, one after
//           another), 'async-parallel' (one call per device, all at once), 'async-groups'
//           (calls of BENCH_GROUP chunks, all devices' at once): ms and the loop's longest gap.
//   reserve with BENCH_EXISTING (default 8000) ranges reserved in the process already (a
//           deployment's chunks each have one): N reserve() calls against one reserveMany(N).
// BENCH_WAYS (comma list, default every way) picks some.
// With BENCH_BUSY=1 every device runs a spinning kernel meanwhile (serving-like load).
//   ELASTICMOE_BACKEND=cuda node scripts/bench-chunk-alloc.mjs > alloc.jsonl
import { closeSync } from 'node:fs';

import { Runtime } from '../dist/index.js';

const MIB = 1024 * 1024;
const rt = Runtime.open({});
const n = Number(process.env.BENCH_CHUNKS ?? 1024);
const bytes = rt.roundUp(Number(process.env.BENCH_CHUNK_MIB ?? 12) * MIB, 0);
const target = Number(process.env.BENCH_TARGET ?? Math.min(2, rt.deviceCount - 1));
const sources = [...Array(rt.deviceCount).keys()].filter((d) => d !== target).slice(0, 2);
const emit = (o) => process.stdout.write(`${JSON.stringify({ bench: 'chunk-alloc', backend: rt.backend, chunks: n, chunkBytes: bytes, target, sources, ...o })}\n`);
const time = (f) => {
  const t = performance.now();
  const r = f();
  return [performance.now() - t, r];
};

function store(access) {
  const [ms, made] = time(() => Array.from({ length: n }, () => {
    const c = rt.createChunk(target, bytes, { exportable: true });
    const r = rt.reserve(bytes);
    r.map(0, c);
    r.setAccess(0, bytes, access);
    return { c, r };
  }));
  const [freeMs] = time(() => made.forEach(({ c, r }) => { r.dispose(); c.dispose(); }));
  return { ms, usPerChunk: (ms * 1e3) / n, freeMs };
}

function split(access) {
  const out = {};
  const lap = (k, f) => { const [ms, r] = time(f); out[k] = +(ms * 1e3 / n).toFixed(1); return r; };
  const chunks = lap('createUs', () => Array.from({ length: n }, () => rt.createChunk(target, bytes, { exportable: true })));
  const ranges = lap('reserveUs', () => chunks.map(() => rt.reserve(bytes)));
  lap('mapUs', () => ranges.forEach((r, i) => r.map(0, chunks[i])));
  lap('accessUs', () => ranges.forEach((r) => r.setAccess(0, bytes, access)));
  const handles = lap('exportUs', () => chunks.map((c) => c.export()));
  lap('unmapReleaseUs', () => ranges.forEach((r) => r.dispose()));
  lap('chunkReleaseUs', () => chunks.forEach((c) => c.dispose()));
  for (const h of handles) if (h.kind === 'fd') closeSync(h.fd);
  return out;
}

function oneRange(access) {
  const [ms, st] = time(() => {
    const r = rt.reserve(bytes * n);
    const cs = Array.from({ length: n }, (_, i) => {
      const c = rt.createChunk(target, bytes, { exportable: true });
      r.map(i * bytes, c);
      return c;
    });
    r.setAccess(0, bytes * n, access);
    return { r, cs };
  });
  const [freeMs] = time(() => { st.r.dispose(); st.cs.forEach((c) => c.dispose()); });
  return { ms, usPerChunk: (ms * 1e3) / n, freeMs };
}

// Optional load: a long copy loop on every device's stream (keeps the copy engines and memory busy).
const busy = process.env.BENCH_BUSY === '1';
const load = [];
if (busy) {
  for (let d = 0; d < rt.deviceCount; d++) {
    const sz = 256 * MIB;
    const a = rt.createChunk(d, sz);
    const r = rt.reserve(2 * sz);
    const b = rt.createChunk(d, sz);
    r.map(0, a);
    r.map(sz, b);
    r.setAccess(0, 2 * sz, [d]);
    const s = rt.createStream(d);
    load.push({ a, b, r, s, sz });
  }
}
let stop = false;
const feed = async () => {
  while (!stop) {
    for (const l of load) for (let i = 0; i < 8; i++) l.s.copy(l.r.at(l.sz), l.r.at(0), l.sz);
    await Promise.all(load.map((l) => l.s.synchronize()));
  }
};
const feeding = busy ? feed() : Promise.resolve();

/** The event loop's longest gap while `f` runs (a 0 ms timer re-armed each turn). */
async function withGap(f) {
  let last = performance.now();
  let gap = 0;
  let on = true;
  const tick = () => {
    const t = performance.now();
    gap = Math.max(gap, t - last);
    last = t;
    if (on) setTimeout(tick, 0);
  };
  setTimeout(tick, 0);
  const t = performance.now();
  const r = await f();
  const end = performance.now();
  on = false;
  return { ms: end - t, loopMaxGapMs: Math.max(gap, end - last), r };
}

async function asyncOne(access, many = false) {
  // many: ranges side by side (reserveMany), as the chunk store's off-thread allocation uses.
  const ranges = many ? rt.reserveMany(n, bytes) : Array.from({ length: n }, () => rt.reserve(bytes));
  const { ms, loopMaxGapMs, r: cs } = await withGap(() => rt.createMappedChunks(target, bytes, ranges, access, { exportable: true }));
  const [freeMs] = time(() => { ranges.forEach((r) => r.dispose()); cs.forEach((c) => c.dispose()); });
  return { ms, usPerChunk: (ms * 1e3) / n, loopMaxGapMs, freeMs };
}

const spreadDevices = Math.min(rt.deviceCount, Number(process.env.BENCH_SPREAD_DEVICES ?? 2));
const group = Number(process.env.BENCH_GROUP ?? 64);
async function spread(how) {
  const devs = [...Array(spreadDevices).keys()];
  const per = devs.map((d) => Array.from({ length: Math.ceil(n / spreadDevices) }, () => rt.reserve(bytes)));
  const made = [];
  const { ms, loopMaxGapMs } = await withGap(async () => {
    if (how === 'sync') {
      for (const [d, ranges] of per.entries()) for (const r of ranges) {
        const c = rt.createChunk(d, bytes, { exportable: true });
        r.map(0, c);
        r.setAccess(0, bytes, [d]);
        made.push(c);
      }
    } else if (how === 'async-serial') {
      for (const [d, ranges] of per.entries()) made.push(...await rt.createMappedChunks(d, bytes, ranges, [d], { exportable: true }));
    } else if (how === 'async-parallel') {
      for (const cs of await Promise.all(per.map((ranges, d) => rt.createMappedChunks(d, bytes, ranges, [d], { exportable: true })))) made.push(...cs);
    } else {
      const calls = per.flatMap((ranges, d) => Array.from({ length: Math.ceil(ranges.length / group) }, (_, g) =>
        rt.createMappedChunks(d, bytes, ranges.slice(g * group, (g + 1) * group), [d], { exportable: true })));
      for (const cs of await Promise.all(calls)) made.push(...cs);
    }
  });
  per.flat().forEach((r) => r.dispose());
  made.forEach((c) => c.dispose());
  return { how, devices: spreadDevices, ms, usPerChunk: (ms * 1e3) / n, loopMaxGapMs, ...(how === 'async-groups' ? { group } : {}) };
}

function reserveWays() {
  const existing = Array.from({ length: Number(process.env.BENCH_EXISTING ?? 8000) }, () => rt.reserve(bytes));
  const [eachMs, each] = time(() => Array.from({ length: n }, () => rt.reserve(bytes)));
  const [manyMs, many] = time(() => rt.reserveMany(n, bytes));
  each.forEach((r) => r.dispose());
  many.forEach((r) => r.dispose());
  existing.forEach((r) => r.dispose());
  return { existing: existing.length, eachMs, eachUs: (eachMs * 1e3) / n, manyMs };
}

const ways = new Set((process.env.BENCH_WAYS ?? 'store,split,onerange,async,spread,reserve').split(','));
for (let rep = 0; rep < 2; rep++) {
  if (ways.has('store')) {
    emit({ way: 'store', access: [target, ...sources], busy, rep, ...store([target, ...sources]) });
    emit({ way: 'store', access: [target], busy, rep, ...store([target]) });
  }
  if (ways.has('split')) {
    emit({ way: 'split', access: [target, ...sources], busy, rep, ...split([target, ...sources]) });
    emit({ way: 'split', access: [target], busy, rep, ...split([target]) });
  }
  if (ways.has('onerange')) {
    emit({ way: 'onerange', access: [target, ...sources], busy, rep, ...oneRange([target, ...sources]) });
    emit({ way: 'onerange', access: [target], busy, rep, ...oneRange([target]) });
  }
  if (ways.has('reserve')) emit({ way: 'reserve', busy, rep, ...reserveWays() });
  if (ways.has('async')) {
    emit({ way: 'async', access: [target], busy, rep, ...await asyncOne([target]) });
    emit({ way: 'async-many', access: [target], busy, rep, ...await asyncOne([target], true) });
    emit({ way: 'async-many', access: [target, ...sources], busy, rep, ...await asyncOne([target, ...sources], true) });
  }
  if (ways.has('spread')) {
    for (const how of ['sync', 'async-serial', 'async-parallel', 'async-groups']) emit({ way: 'spread', busy, rep, ...await spread(how) });
  }
}
stop = true;
await feeding;
for (const l of load) { l.r.dispose(); l.a.dispose(); l.b.dispose(); l.s.dispose(); }
