#!/usr/bin/env node
// Time of the scale planner's pure functions on Qwen3-30B-A3B shapes (48 layers x 128
// experts, uniform load) for the bench's transitions: the first run (JIT-cold) and the
// median of 20, per function (planPlacement / diffLayouts / lowerBoundBytes /
// scheduleTransfers), in ms. CPU only: no device.
//   npx tsc -p tsconfig.json && node scripts/bench-planner.mjs
import { readConfig } from '../dist/model/config.js';
import { roundRobinLayout } from '../dist/scaling/layout.js';
import { planPlacement, diffLayouts, lowerBoundBytes, scheduleTransfers } from '../dist/scaling/planner.js';
const config = await readConfig(new URL('./configs/qwen3-30b-a3b.json', import.meta.url).pathname);
const sizes = { expertBytes: 12 * 2 ** 20, denseBytes: 1e9 };
const cases = [[[0,1],[0,1,2]],[[0,1,2],[0,1,2,3]],[[0,1,2,3],[0,1,2]],[[0,1,2],[0,1]]];
const res = {};
for (let rep = 0; rep < 20; rep++) for (const [from, to] of cases) {
  const current = roundRobinLayout(from, config.layers, config.experts);
  const t = performance.now();
  const next = planPlacement({ current, targetDevices: to, balance: 1.1 });
  const t1 = performance.now();
  const plan = diffLayouts(current, next, sizes);
  const t2 = performance.now();
  lowerBoundBytes(current, to, sizes, 1.1, {});
  const t3 = performance.now();
  scheduleTransfers(plan, { denseChunkSizes: [sizes.denseBytes], maxSourcesPerTransfer: 2, stripeAlignment: 2 ** 21 });
  const t4 = performance.now();
  const k = `${from.length}->${to.length}`;
  (res[k] ??= []).push([t1 - t, t2 - t1, t3 - t2, t4 - t3]);
}
for (const [k, v] of Object.entries(res)) {
  const med = (i) => v.map((x) => x[i]).sort((a, b) => a - b)[v.length >> 1].toFixed(2);
  console.log(k, 'first', v[0].map((x) => x.toFixed(1)).join('/'), 'median place/diff/lb/sched', [0,1,2,3].map(med).join('/'));
}
