#!/usr/bin/env node
// Lines up a bench-scale run's serving steps with what every process of the deployment was doing:
// the run's JSONL (its start record's clockOriginEpochMs, its timeline) and the ELASTICMOE_TRACE file
// written during it (docs/runtime.md "Event trace"); either may be gzipped. For each scale (or only
// the one given with --scale N, 1-based), from `before` ms before its command to `after` ms after
// it: the trace's events (one repeated in a row on one line) and the steps slower than --slow times the median of their kind (decode
// only, or with prompt tokens), each with its round trip and its forward time in the executor (a
// round trip far above its forward time is the deployment's thread busy elsewhere). Times are ms
// from the scale's command.
//
//   node scripts/trace-report.mjs RUN.jsonl[.gz] TRACE.jsonl[.gz] [--scale N] [--before MS] [--after MS] [--slow X] [--steps]
//   (--steps: every step in the window, not only the slow ones)
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';

const args = process.argv.slice(2);
const files = args.filter((a, i) => !a.startsWith('--') && !args[i - 1]?.match(/^--(scale|before|after|slow)$/));
const option = (name, fallback) => {
  const i = args.indexOf(`--${name}`);
  if (i < 0) return fallback;
  const v = Number(args[i + 1]);
  if (!Number.isFinite(v) || v < 0) {
    process.stderr.write(`trace-report: --${name} takes a non-negative number (got ${args[i + 1] ?? 'nothing'})\n`);
    process.exit(2);
  }
  return v;
};
if (files.length !== 2) {
  process.stderr.write('usage: node scripts/trace-report.mjs RUN.jsonl[.gz] TRACE.jsonl[.gz] [--scale N] [--before MS] [--after MS] [--slow X] [--steps]\n');
  process.exit(2);
}
const [runFile, traceFile] = files;
const before = option('before', 300);
const after = option('after', 2000);
const slow = option('slow', 1.5);
const only = option('scale', 0);
const allSteps = args.includes('--steps');

const read = (file) => {
  const raw = readFileSync(file);
  return (file.endsWith('.gz') ? gunzipSync(raw) : raw).toString('utf8').split('\n').filter(Boolean).map((l, n) => {
    try {
      return JSON.parse(l);
    } catch {
      process.stderr.write(`trace-report: ${file}:${n + 1} is not JSON\n`);
      process.exit(1);
    }
  });
};
const run = read(runFile);
const trace = read(traceFile);
const start = run.find((r) => r.bench === 'start');
if (start?.clockOriginEpochMs === undefined) {
  process.stderr.write(`trace-report: ${runFile} has no start record with clockOriginEpochMs (a bench-scale run of the eleventh session or later)\n`);
  process.exit(1);
}
const origin = start.clockOriginEpochMs;
const steps = run.filter((r) => r.bench === 'timeline' && r.who === 'elastic');
const median = (xs) => (xs.length === 0 ? 0 : [...xs].sort((a, b) => a - b)[xs.length >> 1]);
const prompt = (s) => s.tokens > s.decode;
const typical = { decode: median(steps.filter((s) => !prompt(s)).map((s) => s.ms)), prompt: median(steps.filter(prompt).map((s) => s.ms)) };
// Each scale's command, on the run's clock: from the trace's scale.plan events (one per scale, in order).
const commands = trace.filter((e) => e.ev === 'scale.plan').map((e) => e.t - origin);
const scales = run.filter((r) => r.bench === 'scale');
console.log(`${runFile}: ${steps.length} steps (median ${typical.decode.toFixed(1)} ms decode-only, ${typical.prompt.toFixed(1)} ms with prompts), `
  + `${trace.length} trace events from ${new Set(trace.map((e) => e.pid)).size} processes, ${commands.length} scales traced`);
commands.forEach((cmd, i) => {
  if (only > 0 && i + 1 !== only) return;
  const s = scales[i];
  console.log(`\nscale ${i + 1}${s ? `: ${s.from.join(',')} -> ${s.to.join(',')}, ${s.commandToFirstNewStepMs.toFixed(0)} ms to the first new step` : ''}`);
  const rows = [];
  for (const e of trace) {
    const t = e.t - origin - cmd;
    if (t < -before || t > after) continue;
    const { t: _t, pid, ev, ...detail } = e;
    rows.push([t, `pid ${pid} ${ev}${Object.keys(detail).length > 0 ? ` ${JSON.stringify(detail)}` : ''}`]);
  }
  for (const x of steps) {
    const began = x.t - x.ms - cmd;
    if (began < -before || began > after) continue;
    const ref = prompt(x) ? typical.prompt : typical.decode;
    if (!allSteps && x.ms <= slow * ref) continue;
    const fwd = x.fwd === undefined ? '' : `, ${x.fwd.toFixed(0)} in the executor`;
    rows.push([began, `step ${x.ms.toFixed(0)} ms${fwd} (${x.tokens} tokens, ${x.decode} decode; layout ${x.epoch}, ranks ${JSON.stringify(x.ranks)})`]);
  }
  rows.sort((a, b) => a[0] - b[0]);
  // The same event again and again (a scale's progress) on one line: its count and its last time.
  for (let k = 0; k < rows.length; k++) {
    let j = k;
    while (j + 1 < rows.length && rows[j + 1][1] === rows[k][1]) j++;
    const times = j > k ? ` (x${j - k + 1}, to ${rows[j][0].toFixed(0)})` : '';
    console.log(`${rows[k][0].toFixed(0).padStart(7)}  ${rows[k][1]}${times}`);
    k = j;
  }
});
