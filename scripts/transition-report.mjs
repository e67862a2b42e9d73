#!/usr/bin/env node
// Re-scores the transitions of bench-scale runs from their step timelines (JSONL files given as
// arguments) with the current transition metric (scripts/lib/transition.mjs): per scale, command to
// the first new step, the ratio recorded by the run and the one the metric gives now, the steps in
// the window and the serving time lost in it ((1 - ratio) x window); then the same over the second
// from the command and over the command to 1 s after the first new step (workAcross: each layout's
// steps against its own steady steps, the new layout's from the last 3 s of its epoch).
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';

import { workAcross, workDuring } from './lib/transition.mjs';

if (process.argv.length < 3) {
  process.stderr.write('usage: node scripts/transition-report.mjs RUN.jsonl...\n');
  process.exit(2);
}
for (const file of process.argv.slice(2)) {
  const raw = readFileSync(file);
  const lines = (file.endsWith('.gz') ? gunzipSync(raw) : raw).toString('utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
  const steps = lines.filter((l) => l.bench === 'timeline' && l.who === 'elastic');
  const scales = lines.filter((l) => l.bench === 'scale');
  console.log(file);
  scales.forEach((s, i) => {
    // The scale's first new step is the first one of epoch i + 1; the command came commandToFirstNewStepMs before its end.
    const first = steps.find((x) => x.epoch === i + 1);
    if (!first) return;
    const tCmd = first.t - s.commandToFirstNewStepMs;
    const now = workDuring(steps, tCmd, first.t);
    // The second from the command, the new layout's steps against the last 3 s of its epoch (steady, after the work ahead).
    const fresh = steps.filter((x) => x.epoch === i + 1);
    const end = fresh.at(-1).t;
    const old = steps.filter((x) => x.epoch <= i);
    const second = workAcross(old, fresh, tCmd, tCmd + 1000, 3000, { from: end - 3000, to: end });
    // From the command to 1 s after the first new step: the new layout's first second counted whatever the scale's latency.
    const through = workAcross(old, fresh, tCmd, first.t + 1000, 3000, { from: end - 3000, to: end });
    const lost = (r) => (r ? `${((1 - r.ratio) * r.windowMs).toFixed(0)} ms lost` : 'n/a');
    console.log(`  ${s.from.join(',')} -> ${s.to.join(',')}: ${s.commandToFirstNewStepMs.toFixed(0)} ms; work during ${s.workDuringOverBefore?.toFixed(3)} as recorded, `
      + `${now ? now.ratio.toFixed(3) : 'n/a'} now (${now?.steps ?? 0} steps, ${lost(now)}); in the second from the command ${second ? second.ratio.toFixed(3) : 'n/a'}; `
      + `to 1 s after the first new step ${through ? through.ratio.toFixed(3) : 'n/a'} (${lost(through)})`);
  });
}
