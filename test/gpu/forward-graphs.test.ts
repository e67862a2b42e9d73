// GPU suite for the forward pass's graphs, one per rank (src/executor/forward.ts): on up to
// 4 GPUs, steps replayed as per-rank graphs — which run at once, each computing device using
// its scratch for that rank — give the same greedy tokens as the same steps run eagerly, and
// so do graphs captured ahead on another layout (precapture). Runs with
// ELASTICMOE_BACKEND=cuda and at least 2 devices; EMOE_GPU_SUITE_ON_MOCK=1 runs it on the
// mock (a dry run of the test itself: the mock runs graphs one after another).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { ForwardEngine } from '../../src/executor/forward.js';
import { type MappedKvPool, mapHmmKvPools } from '../../src/executor/kv-view.js';
import { type Layout, kvGeometry } from '../../src/executor/types.js';
import { storeWeights } from '../../src/executor/weights.js';
import { Hmm } from '../../src/hmm/hmm.js';
import { roundRobinPlacement, weightSpecs } from '../../src/model/weights.js';
import { precaptureShapes } from '../../src/scaling/precapture.js';
import { runStepScript } from '../helpers/step-script.js';
import { SMALL_MOE, gpuSuite } from '../helpers/gpu-suite.js';

const { backend, rt, devices } = gpuSuite(512 * 1024 * 1024);
// Small enough to load in seconds, large enough that every rank routes to every device.
const config = SMALL_MOE;

describe.runIf(rt !== undefined && devices.length >= 2)(`forward pass graphs per rank (${backend}, ${devices.length} devices)`, () => {
  let hmm: Hmm;
  let views: Map<number, MappedKvPool>;
  const engines: ForwardEngine[] = [];

  beforeAll(async () => {
    hmm = new Hmm(rt!);
    // Every expert on every device: each layout picks its holders from these replicas.
    await hmm.loadSynthetic(weightSpecs(config, devices, () => devices), { seed: 5n, scaleFor: (t) => (t.shape.length === 1 ? 1 : 0.25) });
    for (const d of devices) hmm.kv.createPool({ device: d, blockBytes: kvGeometry(config).blockBytes, blocks: 512 });
    views = mapHmmKvPools(rt!, hmm, devices);
  }, 120_000);
  afterAll(() => {
    for (const e of engines) e.dispose();
    for (const v of views?.values() ?? []) v.dispose();
    hmm?.dispose();
  });

  async function engine(layout: Layout, graphs: boolean): Promise<ForwardEngine> {
    const e = await ForwardEngine.create(rt!, config, layout, storeWeights(hmm.store), new Map(layout.devices.map((d) => [d, views.get(d)!])),
      { maxTokensPerStep: 64, graphs: graphs && { captureAfter: 1 } });
    engines.push(e);
    return e;
  }

  /**
   * Runs `script` (per step, per rank: the names of the sequences in the step; a name first seen
   * prefills a 5-token prompt in that step, so steps mix prompts and decodes) and returns every
   * step's tokens by name.
   */
  function run(e: ForwardEngine, tag: string, script: string[][][]): Promise<Array<Record<string, number>>> {
    return runStepScript(e, hmm.kv, tag, script, {
      blocks: 8,
      first: (name) => {
        const seed = [...name].reduce((a, c) => a * 31 + c.charCodeAt(0), 7);
        return Array.from({ length: 5 }, (_, i) => (seed + i * 97) % 512);
      },
    });
  }

  /** A script over `n` ranks: sequences come and go, so ranks change shape at different steps. */
  function script(n: number): string[][][] {
    const steps: string[][][] = [];
    for (let t = 0; t < 24; t++) {
      steps.push(Array.from({ length: n }, (_, r) => {
        const names = Array.from({ length: 1 + ((t + r) % 3) }, (_, k) => `r${r}s${k}`);
        if (t >= 8 + 4 * r) names.push(`r${r}late`); // joins later on higher ranks: a prompt beside decodes
        return names;
      }));
    }
    return steps;
  }

  it('replays per-rank graphs, which run at once, with the eager steps\' tokens', async () => {
    const layout = { devices, placement: roundRobinPlacement(config.experts, devices) };
    const s = script(devices.length);
    const want = await run(await engine(layout, false), 'eager', s);
    const g = await engine(layout, true);
    expect(await run(g, 'graphs', s)).toEqual(want);
    const st = g.graphStats;
    expect(st.enabled).toBe(true);
    expect(st.replays).toBeGreaterThan(st.captures); // most rank steps replayed
    expect(new Set(Object.values(want.at(-1)!)).size).toBeGreaterThan(1); // not degenerate
  }, 120_000);

  it('replays graphs captured ahead from another layout\'s shapes with the eager steps\' tokens', async () => {
    const small = devices.slice(0, devices.length - 1);
    const from = await engine({ devices: small, placement: roundRobinPlacement(config.experts, small) }, true);
    const s = script(small.length);
    await run(from, 'from', s.slice(0, 6));
    const layout = { devices, placement: roundRobinPlacement(config.experts, devices) };
    const widen = (x: string[][][]) => x.map((step) => [...step, []]);
    const want = await run(await engine(layout, false), 'eager2', widen(s.slice(0, 6)));
    const to = await engine(layout, true);
    expect(await to.precapture(precaptureShapes(from.graphShapes(), devices, 2))).toBeGreaterThan(0);
    expect(await run(to, 'to', widen(s.slice(0, 6)))).toEqual(want);
    expect(to.graphStats.replays).toBeGreaterThan(0);
  }, 120_000);
});
