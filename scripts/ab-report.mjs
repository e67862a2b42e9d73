#!/usr/bin/env node
// Compares bench-scale runs by arm: node scripts/ab-report.mjs ARM=FILE[,FILE...] ARM=FILE[,FILE...]
// (FILE: a bench-scale .jsonl or .jsonl.gz). Prints, per arm and scale position, the range and mean
// of: command to first new step, release, work ahead after it, serving work from the command to
// 1 s after the first new step (and the time lost there), graph captures in the new layout's
// first second (scripts/lib/ab.mjs).
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';

import { scalesOf, summarize } from './lib/ab.mjs';

// Piped into head: stop quietly when the reader goes away.
process.stdout.on('error', (e) => process.exit(e.code === 'EPIPE' ? 0 : 1));
const args = process.argv.slice(2);
if (args.length === 0 || args.some((a) => !/^[^=]+=.+/.test(a))) {
  process.stderr.write('usage: node scripts/ab-report.mjs ARM=FILE[,FILE...] [ARM=FILE[,FILE...] ...]\n');
  process.exit(2);
}
const read = (file) => {
  const raw = readFileSync(file);
  return (file.endsWith('.gz') ? gunzipSync(raw) : raw).toString('utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
};
const arms = Object.fromEntries(args.map((a) => {
  const [name, files] = [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)];
  return [name, files.split(',').map((f) => scalesOf(read(f)))];
}));
const fmt = (f, digits = 0) => {
  if (f === null) return 'n/a';
  const [lo, hi] = [f.min.toFixed(digits), f.max.toFixed(digits)];
  return lo === hi ? lo : `${lo}-${hi} (mean ${f.mean.toFixed(digits)})`;
};
for (const [name, scales] of Object.entries(summarize(arms))) {
  process.stdout.write(`${name} (${arms[name].length} runs)\n`);
  for (const s of scales) {
    const f = s.figures;
    process.stdout.write(`  ${s.label}: latency ${fmt(f.latencyMs)} ms; release ${fmt(f.releaseMs)} ms; work ahead ${fmt(f.aheadMs)} ms; ` +
      `to 1 s after the first new step ${fmt(f.toSecondAfter, 3)} (lost ${fmt(f.lostMs)} ms); captures in its first second ${fmt(f.captures)}\n`);
  }
}
