#!/usr/bin/env node
// Joins addon and reference JSON lines into a Markdown table with ratios.
//   node scripts/compare-p2p.mjs addon.jsonl ref.jsonl
import { readFileSync } from 'node:fs';

const read = (f) => readFileSync(f, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
// Several rounds may be appended to each file: keep the best round per size.
function best(rows) {
  const out = [];
  for (const r of rows) {
    const key = r.bench === 'p2p' ? r.bytes : r.chunk_bytes;
    const prev = out.find((x) => x.bench === r.bench && (x.bench === 'p2p' ? x.bytes : x.chunk_bytes) === key);
    if (!prev) out.push({ ...r });
    else if (r.bench === 'p2p') {
      prev.best_gbps = Math.max(prev.best_gbps, r.best_gbps);
      prev.median_gbps = Math.max(prev.median_gbps, r.median_gbps);
    } else if (r.bench === 'vmm') {
      for (const k of ['create_ms', 'map_ms', 'set_access_ms', 'unmap_ms', 'release_ms']) prev[k] = Math.min(prev[k], r[k]);
    }
  }
  return out;
}
const [addon, ref] = process.argv.slice(2).map((f) => best(read(f).filter((r) => r.bench === 'p2p' || r.bench === 'vmm')));
const mib = (b) => `${b / 1048576} MiB`;
const lines = ['| copy size | addon best GB/s | C++ best GB/s | addon / C++ | addon median | C++ median |', '| --- | --- | --- | --- | --- | --- |'];
let worst = Infinity;
for (const r of ref.filter((x) => x.bench === 'p2p')) {
  const a = addon.find((x) => x.bench === 'p2p' && x.bytes === r.bytes);
  if (!a) continue;
  const ratio = a.best_gbps / r.best_gbps;
  if (r.bytes >= 64 * 1048576) worst = Math.min(worst, ratio);
  lines.push(`| ${mib(r.bytes)} | ${a.best_gbps.toFixed(1)} | ${r.best_gbps.toFixed(1)} | ${(ratio * 100).toFixed(1)}% | ${a.median_gbps.toFixed(1)} | ${r.median_gbps.toFixed(1)} |`);
}
lines.push('', '| chunks | create ms (addon / C++) | map ms | set-access ms | unmap ms | release ms |', '| --- | --- | --- | --- | --- | --- |');
for (const r of ref.filter((x) => x.bench === 'vmm')) {
  const a = addon.find((x) => x.bench === 'vmm' && x.chunk_bytes === r.chunk_bytes);
  if (!a) continue;
  const f = (k) => `${a[k].toFixed(2)} / ${r[k].toFixed(2)}`;
  lines.push(`| ${r.chunks} × ${mib(r.chunk_bytes)} | ${f('create_ms')} | ${f('map_ms')} | ${f('set_access_ms')} | ${f('unmap_ms')} | ${f('release_ms')} |`);
}
lines.push('', `worst addon/C++ bandwidth ratio at >= 64 MiB: ${(worst * 100).toFixed(1)}% (target >= 95%)`);
console.log(lines.join('\n'));
