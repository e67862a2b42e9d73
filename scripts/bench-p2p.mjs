#!/usr/bin/env node
// P2P copy bandwidth by size and map/set-access cost by chunk count, through the
// addon, on GPUs 0 and 1. Run next to scripts/native/p2p_ref.cc (the same
// measurements in plain C++) in the same job; scripts/compare-p2p.mjs makes the table.
//   ELASTICMOE_BACKEND=cuda node scripts/bench-p2p.mjs > addon.jsonl
import { Runtime } from '../dist/index.js';

const MIB = 1024 * 1024;
const rt = Runtime.open({});
if (rt.deviceCount < 2) {
  console.error(`bench-p2p needs 2 devices; the ${rt.backend} backend has ${rt.deviceCount}`);
  process.exit(2);
}
const emit = (o) => process.stdout.write(`${JSON.stringify({ source: 'addon', backend: rt.backend, ...o })}\n`);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

// --- P2P bandwidth: one 1 GiB chunk per device, copies of increasing size.
const max = Number(process.env.BENCH_MAX_BYTES ?? 1024 * MIB);
const reps = Number(process.env.BENCH_REPS ?? 20);
const a = rt.createChunk(0, max);
const b = rt.createChunk(1, max);
const ra = rt.reserve(max);
const rb = rt.reserve(max);
ra.map(0, a);
rb.map(0, b);
ra.setAccess(0, max, [0, 1]);
rb.setAccess(0, max, [0, 1]);
const s = rt.createStream(0);
s.memset(ra.at(0), 7, max);
await s.synchronize();
const t0 = rt.createEvent(0, { timing: true });
const t1 = rt.createEvent(0, { timing: true });
for (const size of [2, 8, 32, 64, 128, 256, 512, 1024].map((m) => m * MIB).filter((x) => x <= max)) {
  for (let i = 0; i < 3; i++) s.copy(rb.at(0), ra.at(0), size);
  const gbps = [];
  for (let i = 0; i < reps; i++) {
    t0.record(s);
    s.copy(rb.at(0), ra.at(0), size);
    t1.record(s);
    await t1.synchronize();
    gbps.push(size / (t1.elapsedSince(t0) / 1e3) / 1e9);
  }
  emit({ bench: 'p2p', bytes: size, best_gbps: Math.max(...gbps), median_gbps: median(gbps) });
}
ra.dispose();
rb.dispose();
a.dispose();
b.dispose();

// --- VMM cost by chunk count: 2 GiB as many small or few large chunks.
const total = Number(process.env.BENCH_VMM_BYTES ?? 2048 * MIB);
for (const chunkBytes of [2 * MIB, 64 * MIB]) {
  const n = total / chunkBytes;
  const range = rt.reserve(total);
  let t = performance.now();
  const chunks = Array.from({ length: n }, () => rt.createChunk(0, chunkBytes));
  const create = performance.now() - t;
  t = performance.now();
  chunks.forEach((c, i) => range.map(i * chunkBytes, c));
  const map = performance.now() - t;
  t = performance.now();
  range.setAccess(0, total, [0, 1]);
  const access = performance.now() - t;
  t = performance.now();
  chunks.forEach((_, i) => range.unmap(i * chunkBytes, chunkBytes));
  const unmap = performance.now() - t;
  t = performance.now();
  chunks.forEach((c) => c.dispose());
  const release = performance.now() - t;
  range.dispose();
  emit({ bench: 'vmm', total_bytes: total, chunk_bytes: chunkBytes, chunks: n, create_ms: create, map_ms: map, set_access_ms: access, unmap_ms: unmap, release_ms: release });
}
