// The transition metric of scripts/bench-scale.mjs (scripts/lib/transition.mjs): serving work
// done in a window, each step counted as the time a step like it took before.
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { describe, expect, it } from 'vitest';

// @ts-expect-error: a plain ESM script without types
import { scalesOf, summarize } from '../../scripts/lib/ab.mjs';
// @ts-expect-error: a plain ESM script without types
import { pauses, workAcross, workDuring } from '../../scripts/lib/transition.mjs';

type Step = { t: number; ms: number; tokens: number; decode: number };
/** Back-to-back steps of `ms` each from `from`, until `to`. */
const run = (from: number, to: number, ms: number, tokens = 32, decode = tokens): Step[] => {
  const out: Step[] = [];
  for (let t = from + ms; t <= to + 1e-9; t += ms) out.push({ t, ms, tokens, decode });
  return out;
};

/** Two kinds of step, one after the other, back to back until `until`; returns them and when the last ended. */
const alternate = (a: Omit<Step, 't'>, b: Omit<Step, 't'>, until: number): { steps: Step[]; end: number } => {
  const steps: Step[] = [];
  let t = 0;
  while (t < until) {
    t += a.ms; steps.push({ t, ...a });
    t += b.ms; steps.push({ t, ...b });
  }
  return { steps, end: t };
};

const execFileP = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

describe('workDuring (bench-scale transition metric)', () => {
  it('is 1 when the window runs the same steps at the same speed, back to back', () => {
    const steps = run(0, 5000, 50);
    expect(workDuring(steps, 3000, 3300).ratio).toBeCloseTo(1, 9);
  });

  it('pauses: the gaps before steps that start in the window, their sum and the longest', () => {
    // 50 ms steps back to back, then a 30 ms gap before the step starting at 3130, a 10 ms one before 3190.
    const steps = [...run(0, 3100, 50), { t: 3180, ms: 50, tokens: 32, decode: 32 }, { t: 3240, ms: 50, tokens: 32, decode: 32 }, ...run(3240, 4000, 50)];
    expect(pauses(steps, 3100, 3300)).toEqual({ maxMs: 30, sumMs: 40, count: 4 });
    expect(pauses(steps, 3300, 4000).sumMs).toBe(0);
    expect(pauses(steps, 5000, 6000)).toEqual({ maxMs: 0, sumMs: 0, count: 0 });
  });

  it('counts a slower step and a gap as lost work', () => {
    // Before: 50 ms decode steps. In the window (3000-3300): a 100 ms step, then 50 ms idle, then 150 ms of normal steps.
    const steps = [...run(0, 3000, 50), { t: 3100, ms: 100, tokens: 32, decode: 32 }, ...run(3150, 3300, 50)];
    const r = workDuring(steps, 3000, 3300);
    // Work: 50 (the slow step counts as one normal step) + 150 = 200 of 300 ms.
    expect(r.ratio).toBeCloseTo(200 / 300, 9);
    expect(r.steps).toBe(4);
  });

  it('takes a step cut by the window edge in part', () => {
    // A 50 ms step ending 20 ms into the window counts 20 ms.
    const steps = [...run(-30, 3020, 50), ...run(3020, 3120, 50)]; // steps end at 20, 70, ..., 3020, 3070, 3120
    const r = workDuring(steps, 3000, 3120);
    expect(r.ratio).toBeCloseTo(1, 9);
  });

  it('measures mixed steps against mixed steps of the same size, not against decode steps', () => {
    // Before: decode steps of 30 ms and prefill steps (156 tokens) of 130 ms, alternating.
    const { steps: before, end: tCmd } = alternate({ ms: 30, tokens: 32, decode: 32 }, { ms: 130, tokens: 156, decode: 28 }, 3000);
    // In the window: one prefill step at its usual 130 ms, then one at 260 ms (twice as slow).
    const during = [{ t: tCmd + 130, ms: 130, tokens: 156, decode: 28 }, { t: tCmd + 390, ms: 260, tokens: 156, decode: 28 }];
    const r = workDuring([...before, ...during], tCmd, tCmd + 390);
    expect(r.ratio).toBeCloseTo(260 / 390, 9);
    // Tokens per second would call the same window a third of before's decode rate; this says two thirds of the work.
  });

  it('counts a step of a token count not seen before as the line through the steps before gives it', () => {
    // Before: 32-token steps of 30 ms and 96-token steps of 62 ms (0.5 ms a token over 14 ms).
    const { steps: before, end: t } = alternate({ ms: 30, tokens: 32, decode: 32 }, { ms: 62, tokens: 96, decode: 32 }, 3000);
    // In the window: a 160-token step of 94 ms (as fast as the line says), then one of 188 ms (half as fast).
    const during = [{ t: t + 94, ms: 94, tokens: 160, decode: 32 }, { t: t + 282, ms: 188, tokens: 160, decode: 32 }];
    expect(workDuring([...before, ...during], t, t + 94).ratio).toBeCloseTo(1, 9);
    expect(workDuring([...before, ...during], t, t + 282).ratio).toBeCloseTo((94 + 94) / 282, 9);
    // A tiny step counts at least as the fastest step before (the line would go below it).
    const tiny = [{ t: t + 30, ms: 30, tokens: 1, decode: 1 }];
    expect(workDuring([...before, ...tiny], t, t + 30).ratio).toBeCloseTo(1, 9);
  });

  it('workAcross: each layout\'s steps against its own steady steps, over a window past the switch-over', () => {
    // Old layout: 40 ms steps until 3080 (the command at 3000); new layout from 3120 (a 40 ms pause): two steps
    // of 40 ms (half speed), then steady 20 ms steps.
    const old = run(0, 3100, 40);
    const fresh = [{ t: 3160, ms: 40, tokens: 32, decode: 32 }, { t: 3200, ms: 40, tokens: 32, decode: 32 }, ...run(3200, 8000, 20)];
    const r = workAcross(old, fresh, 3000, 4000, 3000, { from: 5000, to: 8000 })!;
    // Work: 80 (old, full speed) + 20 + 20 (the slow ones) + 800 (steady 3200-4000) = 920 of 1000 ms.
    expect(r.ratio).toBeCloseTo(0.92, 9);
    expect(workAcross(old, fresh, 3000, 4000, 3000, { from: 9000, to: 9500 })).toBeUndefined();
  });

  it('takes the reference steps from a given window (the steady steps after it) when told', () => {
    // 40 ms steps in (0, 3000] (another layout), 20 ms steps after; in (3000, 3400] they take 40 ms (work ahead running).
    const steps = [...run(0, 3000, 40), ...run(3000, 3400, 40), ...run(3400, 7000, 20)];
    // Against the steady 20 ms steps after the window: each 40 ms step did 20 ms of work, half.
    expect(workDuring(steps, 3000, 3400, 0, { from: 3400, to: 6400 }).ratio).toBeCloseTo(0.5, 9);
    // Against the steps before (40 ms, the other layout) it would read 1: why the reference matters.
    expect(workDuring(steps, 3000, 3400).ratio).toBeCloseTo(1, 9);
    expect(workDuring(steps, 3000, 3400, 0, { from: 8000, to: 9000 })).toBeUndefined();
  });

  it('says nothing without steps before the command or with an empty window', () => {
    expect(workDuring(run(3000, 4000, 50), 3000, 3300)).toBeUndefined();
    expect(workDuring(run(0, 4000, 50), 3000, 3000)).toBeUndefined();
  });
});

describe('bench-scale on the mock', () => {
  it('reports a vertical baseline that does not fit, goes on to the cold restart and exits', async () => {
    // 160 MiB mock devices: the elastic run fits, the vertical baseline (the whole new layout
    // beside the old one) runs out of memory on device 0, as on 2 x H100 with Qwen3-30B-A3B shapes.
    const dir = mkdtempSync(path.join(os.tmpdir(), 'emoe-bench-scale-'));
    const out = mkdtempSync(path.join(os.tmpdir(), 'emoe-bench-trace-')); // BENCH_DIR goes with the bench
    try {
      const { stdout } = await execFileP(process.execPath, [path.join(root, 'scripts/bench-scale.mjs')], {
        env: {
          ...process.env, ELASTICMOE_BACKEND: 'mock', ELASTICMOE_NO_WARN_MOCK: '1', ELASTICMOE_MOCK_DEVICES: '2', ELASTICMOE_MOCK_CAPACITY: '160MiB',
          BENCH_CONFIG: path.join(root, 'scripts/configs/tiny-qwen3-moe.json'), BENCH_STEPS: '0;0,1;0', BENCH_BASELINES: 'vertical,cold',
          BENCH_HOLD_S: '1', BENCH_DIR: dir, ELASTICMOE_TRACE: path.join(out, 'trace.jsonl'),
        },
        timeout: 60_000,
      });
      const lines = stdout.trim().split('\n').map((l) => JSON.parse(l) as { bench: string; error?: string; ms?: number; loopDelay?: { maxMs: number } });
      const scales = lines.filter((l) => l.bench === 'scale');
      expect(scales).toHaveLength(2);
      for (const x of scales) expect(x.loopDelay!.maxMs).toBeGreaterThan(0); // the event loop's longest wait in the window
      // 0 -> 0,1 took the standby engine made ahead; the scale-down made its own.
      expect(scales.map((x) => (x as unknown as { standbyMadeAhead: unknown }).standbyMadeAhead !== null)).toEqual([true, false]);
      const vertical = lines.filter((l) => l.bench === 'vertical');
      expect(vertical).toHaveLength(1);
      expect(vertical[0]!.error).toMatch(/^OutOfMemoryError: /);
      expect(lines.find((l) => l.bench === 'cold_restart')!.ms).toBeGreaterThan(0);
      // After each scale: the release's record, with the pinned buffers the engines handed on.
      const after = lines.filter((l) => l.bench === 'after') as unknown as Array<{ to: number[]; firstNewStepMs: number; tokensInSecondAfter: number;
        pauses: { maxMs: number; sumMs: number }; hostPool: { reused: number; allocated: number; freed: number } }>;
      expect(after.map((a) => a.to)).toEqual([[0, 1], [0]]);
      for (const a of after) {
        expect(a.firstNewStepMs).toBeGreaterThan(0);
        expect(a.tokensInSecondAfter).toBeGreaterThan(0); // serving went on after the switch-over
        expect(a.pauses.maxMs).toBeLessThanOrEqual(a.pauses.sumMs);
      }
      expect(after[0]!.hostPool.reused).toBe(0); // 0 -> 0,1: the first standby engine allocates
      expect(after[1]!.hostPool.reused).toBeGreaterThan(0); // 0,1 -> 0: takes what the first engine gave back
      expect(after[1]!.hostPool.freed).toBe(0);

      // ELASTICMOE_TRACE and scripts/trace-report.mjs: each scale's events, in order, on the run's clock.
      writeFileSync(path.join(out, 'run.jsonl'), stdout);
      const report = await execFileP(process.execPath, [path.join(root, 'scripts/trace-report.mjs'), path.join(out, 'run.jsonl'),
        path.join(out, 'trace.jsonl'), '--after', '5000', '--steps']);
      const text = report.stdout;
      expect(text).toMatch(/, 2 scales traced\n/);
      const second = text.slice(text.indexOf('\nscale 2: 0,1 -> 0, '));
      expect(second.length).toBeGreaterThan(30);
      const order = ['scale.plan', 'scale.prepare', 'scale.attach', 'scale.switch', 'scale.release', 'scale.done']
        .map((ev) => second.indexOf(` ${ev} `));
      expect(order.every((i) => i > 0)).toBe(true);
      expect([...order].sort((a, b) => a - b)).toEqual(order);
      // The plan at 0 ms from its command, and the steps of the window with their forward time.
      expect(second).toMatch(/\n\s+0 {2}pid \d+ scale\.plan /);
      expect(second).toMatch(/step \d+ ms, \d+ in the executor \(\d+ tokens/);
      await expect(execFileP(process.execPath, [path.join(root, 'scripts/trace-report.mjs'), path.join(out, 'run.jsonl')]))
        .rejects.toMatchObject({ code: 2 });
    } finally {
      rmSync(dir, { recursive: true, force: true });
      rmSync(out, { recursive: true, force: true });
    }
  }, 90_000);
});

describe('A/B summaries of bench runs (scripts/lib/ab.mjs)', () => {
  const scale = (from: number[], to: number[], ms: number) => ({ bench: 'scale', from, to, commandToFirstNewStepMs: ms });
  const after = (ratio: number, captures: number) => ({
    bench: 'after', phases: { releaseMs: 100 }, ahead: { ms: 500 }, workToSecondAfterFirstStep: { ratio, lostMs: (1 - ratio) * 1000 },
    graphsInSecond: { captures, replays: 10, covered: 0 },
  });
  const runA = [scale([0, 1], [0, 1, 2], 80), { bench: 'timeline' }, after(0.9, 4), scale([0, 1, 2], [0, 1], 600), after(0.8, 6)];
  const runB = [scale([0, 1], [0, 1, 2], 60), after(0.95, 2), scale([0, 1, 2], [0, 1], 700), after(0.85, 8)];

  it('takes each run\'s scales in order with their figures, and summarizes each position per arm', () => {
    const a = scalesOf(runA);
    expect(a.map((s: { label: string }) => s.label)).toEqual(['0,1->0,1,2', '0,1,2->0,1']);
    expect(a[0].figures).toMatchObject({ latencyMs: 80, releaseMs: 100, aheadMs: 500, toSecondAfter: 0.9, captures: 4 });
    expect(a[0].figures.lostMs).toBeCloseTo(100, 9);
    const sum = summarize({ x: [a, scalesOf(runB)] });
    expect(sum.x[0].figures.latencyMs).toEqual({ min: 60, max: 80, mean: 70, n: 2 });
    expect(sum.x[1].figures.captures).toEqual({ min: 6, max: 8, mean: 7, n: 2 });
    expect(sum.x[1].figures.toSecondAfter.mean).toBeCloseTo(0.825, 9);
    // A figure no run has is null; runs of one arm that scaled differently are refused.
    expect(summarize({ y: [scalesOf([scale([0], [0, 1], 50), { bench: 'after' }])] }).y[0].figures.captures).toBeNull();
    expect(() => summarize({ z: [a, scalesOf([scale([0, 1], [0, 1, 3], 60), after(0.9, 1)])] })).toThrow(/scale 1 differs/);
  });
});
