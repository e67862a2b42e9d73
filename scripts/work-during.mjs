#!/usr/bin/env node
// Serving work done during each elastic transition of a bench-scale.mjs output, from its step
// timeline (scripts/lib/transition.mjs), for runs recorded before bench-scale reported it.
//   node scripts/work-during.mjs RESULT.jsonl [...]
import { readFileSync } from 'node:fs';

import { workDuring } from './lib/transition.mjs';

const files = process.argv.slice(2);
if (files.length === 0) {
  process.stderr.write('usage: node scripts/work-during.mjs RESULT.jsonl [...]   (bench-scale.mjs output)\n');
  process.exit(2);
}
for (const file of files) {
  const lines = readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
  const steps = lines.filter((l) => l.bench === 'timeline' && l.who === 'elastic');
  const scales = lines.filter((l) => l.bench === 'scale');
  scales.forEach((s, k) => {
    // The first step on the new layout: the first of the next epoch (each scale switches once).
    const first = steps.find((x) => x.epoch === k + 1);
    if (!first) return;
    const tCmd = first.t - s.commandToFirstNewStepMs;
    const w = workDuring(steps, tCmd, first.t);
    process.stdout.write(`${JSON.stringify({ file, from: s.from, to: s.to, commandToFirstNewStepMs: Math.round(s.commandToFirstNewStepMs),
      workDuringOverBefore: w ? Number(w.ratio.toFixed(3)) : null, lostMs: w ? Math.round(w.windowMs - w.workMs) : null, stepsInWindow: w?.steps ?? 0 })}\n`);
  });
}
