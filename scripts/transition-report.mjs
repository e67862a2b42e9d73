#!/usr/bin/env node
// Re-scores the transitions of bench-scale runs from their step timelines (JSONL files given as
// arguments) with the current transition metric (scripts/lib/transition.mjs): per scale, command to
// the first new step, the ratio recorded by the run and the one the metric gives now, and the steps
// in the window. For results recorded before a change of the metric.
import { readFileSync } from 'node:fs';

import { workAcross, workDuring } from './lib/transition.mjs';

if (process.argv.length < 3) {
  process.stderr.write('usage: node scripts/transition-report.mjs RUN.jsonl...\n');
  process.exit(2);
}
for (const file of process.argv.slice(2)) {
  const lines = readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
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
    const second = workAcross(steps.filter((x) => x.epoch <= i), fresh, tCmd, tCmd + 1000, 3000, { from: end - 3000, to: end });
    console.log(`  ${s.from.join(',')} -> ${s.to.join(',')}: ${s.commandToFirstNewStepMs.toFixed(0)} ms; work during ${s.workDuringOverBefore?.toFixed(3)} as recorded, `
      + `${now ? now.ratio.toFixed(3) : 'n/a'} now (${now?.steps ?? 0} steps); in the second from the command ${second ? second.ratio.toFixed(3) : 'n/a'}`);
  });
}
