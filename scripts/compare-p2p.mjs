#!/usr/bin/env node
// Joins addon and reference JSON lines into a Markdown table with ratios.
//   node scripts/compare-p2p.mjs addon.jsonl ref.jsonl
import { readFileSync } from 'node:fs';

const read = (f) => readFileSync(f, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
const [addon, ref] = process.argv.slice(2).map(read);
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
