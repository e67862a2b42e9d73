#!/usr/bin/env node
// SVG timeline of a bench-scale.mjs run: decode tokens/s (250 ms bins) and the
// device count over time.
//   node scripts/plot-timeline.mjs scale.jsonl > timeline.svg
import { readFileSync } from 'node:fs';

const rows = readFileSync(process.argv[2], 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
const steps = rows.filter((r) => r.bench === 'timeline');
const bin = 250;
const end = Math.max(...steps.map((s) => s.t));
const bins = Array.from({ length: Math.ceil(end / bin) }, (_, i) => ({ t: i * bin, tokens: 0, devices: 0 }));
for (const s of steps) {
  const b = bins[Math.min(bins.length - 1, Math.floor(s.t / bin))];
  b.tokens += s.decode;
  b.devices = Math.max(b.devices, s.devices);
}
let last = steps[0]?.devices ?? 0;
for (const b of bins) b.devices = b.devices || last, (last = b.devices);
const W = 900, H = 360, L = 60, R = 60, T = 30, B = 40;
const maxRate = Math.max(...bins.map((b) => b.tokens)) * (1000 / bin) * 1.1 || 1;
const maxDev = Math.max(...bins.map((b) => b.devices)) + 1;
const x = (t) => L + ((W - L - R) * t) / end;
const yr = (v) => H - B - ((H - T - B) * v) / maxRate;
const yd = (d) => H - B - ((H - T - B) * d) / maxDev;
const rate = bins.map((b) => `${x(b.t + bin / 2).toFixed(1)},${yr(b.tokens * (1000 / bin)).toFixed(1)}`).join(' ');
const dev = bins.map((b) => `${x(b.t).toFixed(1)},${yd(b.devices).toFixed(1)} ${x(b.t + bin).toFixed(1)},${yd(b.devices).toFixed(1)}`).join(' ');
const svg = [`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
  `<rect width="${W}" height="${H}" fill="white"/>`,
  `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="black"/>`,
  `<line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="black"/>`,
  `<line x1="${W - R}" y1="${T}" x2="${W - R}" y2="${H - B}" stroke="black"/>`,
  `<text x="${L}" y="${T - 10}">decode tokens/s (blue, left) and devices (orange, right) — ${process.argv[3] ?? ''}</text>`,
  ...[0, 0.25, 0.5, 0.75, 1].map((f) => `<text x="${L - 6}" y="${yr(f * maxRate) + 4}" text-anchor="end">${Math.round(f * maxRate)}</text>`),
  ...Array.from({ length: maxDev + 1 }, (_, d) => `<text x="${W - R + 6}" y="${yd(d) + 4}">${d}</text>`),
  ...Array.from({ length: Math.floor(end / 5000) + 1 }, (_, i) => `<text x="${x(i * 5000)}" y="${H - B + 16}" text-anchor="middle">${i * 5} s</text>`),
  `<polyline points="${rate}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>`,
  `<polyline points="${dev}" fill="none" stroke="#ff7f0e" stroke-width="2"/>`,
  '</svg>'];
process.stdout.write(svg.join('\n') + '\n');
