// GPU suite for elastic scaling (src/scaling/orchestrator.ts): a small qwen3_moe served by a
// Deployment on up to 4 GPUs while it scales, with its defaults (standby chunks filled ahead,
// graphs captured ahead, the pinned-buffer pool). Guards, on the real driver, what the mock
// suite (test/standalone/scaling-orchestrator.test.ts) guards on the mock:
//   - a deployment loaded from a safetensors checkpoint scales up and down mid-generation and
//     every request gets the fixed layout's greedy tokens;
//   - the chunks a scale-up adopted from the filled standby chunks, and those copied, hold
//     their group's original bytes (device checksums);
//   - the HMM's accounting is back at the layout's figure after a round trip;
//   - a scale planned with the observed expert load (observeLoad) keeps the tokens;
//   - a scale-up that balances the running sequences over the new ranks (balanceOnScale) keeps them;
//   - with executor processes, a serving process SIGKILLed mid-generation is replaced and every request
//     goes on with the fixed layout's tokens;
//   - with virtual expert tables (expertTables) the engines read the experts at their slots, the
//     tokens are the fixed layout's, and the layout's experts alone are mapped after 1→2→1.
// Runs with ELASTICMOE_BACKEND=cuda and at least 2 devices; EMOE_GPU_SUITE_ON_MOCK=1 runs it on
// the mock (a dry run of the test itself).
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import type { TensorLocation } from '../../src/hmm/placement.js';
import { exportCheckpoint } from '../../src/scaling/baselines.js';
import { Deployment, type DeploymentOptions } from '../../src/scaling/orchestrator.js';
import { SMALL_MOE, gpuSuite } from '../helpers/gpu-suite.js';

const { backend, rt, devices } = gpuSuite(1024 * 1024 * 1024);
// Small enough to load in seconds, large enough that experts move between every pair of devices.
const config = SMALL_MOE;
const scaleFor = (t: TensorLocation) => (t.shape.length === 1 ? 1.0 : t.name.includes('embed_tokens') || t.name.includes('lm_head') ? 1.0 : 0.25);
const SEED = 7n;
const MAX = 400;
const PROMPTS = Array.from({ length: 8 }, (_, k) => Array.from({ length: 3 + ((k * 5) % 11) }, (_, i) => (i * 13 + k * 29 + 1) % 512));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** A chunk's bytes are its group's whatever device holds it: `L0.E3@2` → `L0.E3`. */
const groupKey = (id: string) => id.replace(/@\d+/, '');

describe.runIf(rt !== undefined && devices.length >= 2)(`elastic scaling (${backend}, ${devices.length} devices)`, () => {
  const opened: Deployment[] = [];
  let dir: string;
  let want: number[][];
  /** Each group's checksum in the fixed deployment. */
  const original = new Map<string, bigint>();

  const start = async (devs: number[], extra: Partial<DeploymentOptions> = {}) => {
    const dep = await Deployment.start({ rt: rt!, config, devices: devs, seed: SEED, scaleFor, kvBlocksPerDevice: 512, maxTokensPerStep: 64, ...extra });
    opened.push(dep);
    return dep;
  };
  const sums = async (dep: Deployment) => {
    const out = new Map<string, bigint>();
    for (const id of dep.chunkIds()) out.set(id, await dep.hmm.store.checksumChunk(id));
    return out;
  };
  const expectOriginalBytes = async (dep: Deployment) => {
    for (const [id, sum] of await sums(dep)) expect(sum, `${id} against the original ${groupKey(id)}`).toBe(original.get(groupKey(id)));
  };
  /** Submits every prompt, waits until each has streamed `n` tokens, returns the completions. */
  const generate = async (dep: Deployment, n: number) => {
    const streamed = PROMPTS.map(() => 0);
    const done = PROMPTS.map((prompt, k) => dep.submit({ prompt, maxTokens: MAX, ignoreEos: true }, { onToken: () => void streamed[k]!++ }));
    const deadline = performance.now() + 60_000;
    while (streamed.some((s) => s < n)) {
      if (performance.now() > deadline) throw new Error(`requests did not reach ${n} tokens`);
      await sleep(1);
    }
    return { done: Promise.all(done), streamed };
  };

  beforeAll(async () => {
    const fixed = await start([0]);
    want = (await Promise.all(PROMPTS.map((prompt) => fixed.submit({ prompt, maxTokens: MAX, ignoreEos: true })))).map((c) => c.outputTokens);
    for (const [id, sum] of await sums(fixed)) original.set(groupKey(id), sum);
    dir = mkdtempSync(path.join(os.tmpdir(), 'emoe-gpu-ckpt-'));
    await exportCheckpoint(fixed.hmm.store, config, dir, { files: 2 });
  }, 180_000);
  afterAll(async () => {
    for (const d of opened) await d.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('scales a deployment loaded from a checkpoint up and down mid-generation: the fixed layout\'s tokens, every chunk its group\'s bytes', async () => {
    // Another seed: only the checkpoint's bytes can give the fixed deployment's tokens.
    const dep = await start([0], { checkpoint: dir, seed: 999n });
    await dep.settled();
    expect(dep.standby.error).toBeUndefined();
    const accounting = dep.hmm.accounting().map((a) => [a.weightBytes, a.kvBytes]);
    const { done, streamed } = await generate(dep, 4);
    const path = devices.length >= 3 ? [[0, 1], [0, 1, 2], [0, 1], [0]] : [[0, 1], [0]];
    const running: number[] = [];
    for (const to of path) {
      running.push(streamed.filter((n) => n < MAX).length);
      const growing = to.length > dep.devices.length;
      const r = await dep.scale({ devices: to });
      expect(dep.devices).toEqual(to);
      expect(r.bytesCopied).toBe(r.lowerBoundBytes);
      // A scale-up onto a device whose standby chunks were filled ahead adopts them all and copies nothing,
      // and takes the standby engine made ahead over them (standbyEngines).
      if (growing) {
        expect(r.chunksPrefilled, `scale to ${to.join(',')}`).toBe(r.chunksCopied);
        expect(r.standbyMadeAhead, `scale to ${to.join(',')}`).toBeDefined();
      }
      await expectOriginalBytes(dep);
      await dep.settled();
      expect(dep.standby.error).toBeUndefined();
    }
    expect(running[0]).toBe(PROMPTS.length); // the first scale (at least) ran with every request mid-generation
    const completions = await done;
    completions.forEach((c, k) => expect(c.outputTokens, `prompt ${k}`).toEqual(want[k]));
    expect(dep.engine.stats()).toMatchObject({ requestsFailed: 0, preemptions: 0 });
    // Back on [0]: the HMM holds exactly what it held there before.
    expect(dep.hmm.accounting().map((a) => [a.weightBytes, a.kvBytes])).toEqual(accounting);
  }, 300_000);

  it('with executor processes, initialises the standby process ahead over the adopted chunks: the scale-up only switches over; another scale initialises it again; the fixed layout\'s tokens', async () => {
    // The children open the same backend (the mock of the dry run with this suite's mock devices).
    const env: Record<string, string> = { ELASTICMOE_BACKEND: backend!, ELASTICMOE_NO_WARN_MOCK: '1' };
    if (backend === 'mock') Object.assign(env, { ELASTICMOE_MOCK_DEVICES: '4', ELASTICMOE_MOCK_CAPACITY: String(1024 * 1024 * 1024) });
    const script = path.resolve(__dirname, '../../dist/executor/main.js');
    const dep = await start([0], { executor: { process: { script, env } } });
    await dep.settled();
    expect(dep.standby.process).toMatchObject({ device: 1 });
    const { done } = await generate(dep, 4);
    const up = await dep.scale({ devices: [0, 1] });
    expect(up.standbyMadeAhead).toBeDefined();
    expect(up.chunksCopied).toBeGreaterThan(0);
    expect(up.chunksPrefilled).toBe(up.chunksCopied);
    await expectOriginalBytes(dep);
    // A scale-down: the next process, made for [0, 1] -> [0, 1, 2] (or started ahead on 2 GPUs), is initialised for [0].
    await dep.settled();
    const down = await dep.scale({ devices: [0] });
    expect(down.prestartedExecutor).toBe(true);
    // Made ahead again for [0] -> [0, 1]; a move to [1] initialises that process again for [1] and
    // takes the chunks it adopted on device 1 as they are.
    await dep.settled();
    expect(dep.standby.process).toMatchObject({ device: 1 });
    const move = await dep.scale({ devices: [1] });
    expect(move.prestartedExecutor).toBe(true);
    expect(move.standbyMadeAhead).toBeUndefined();
    expect(move.chunksPrefilled).toBeGreaterThan(0);
    const completions = await done;
    completions.forEach((c, k) => expect(c.outputTokens, `prompt ${k}`).toEqual(want[k]));
    await expectOriginalBytes(dep);
    await dep.close();
  }, 300_000);

  it('with executor processes, replaces a serving process SIGKILLed mid-generation and runs the failed step again: the fixed layout\'s tokens, none failed', async () => {
    for (const d of opened.splice(0)) await d.close(); // room on the dry run's 1 GiB mock devices
    const env: Record<string, string> = { ELASTICMOE_BACKEND: backend!, ELASTICMOE_NO_WARN_MOCK: '1' };
    if (backend === 'mock') Object.assign(env, { ELASTICMOE_MOCK_DEVICES: '4', ELASTICMOE_MOCK_CAPACITY: String(1024 * 1024 * 1024) });
    const script = path.resolve(__dirname, '../../dist/executor/main.js');
    const dep = await start([0, 1], { executor: { process: { script, env } } });
    await dep.settled();
    const { done, streamed } = await generate(dep, 8);
    const victim = dep.executorPid!;
    const t = performance.now();
    process.kill(victim, 'SIGKILL');
    await expect.poll(() => dep.executorRecoveries, { timeout: 60_000 }).toBe(1);
    const at = Math.max(...streamed);
    await expect.poll(() => Math.min(...streamed), { timeout: 60_000 }).toBeGreaterThan(at);
    // How long serving stopped (kill to the next token of every request): printed, not asserted.
    console.log(`executor recovery (${backend}): ${(performance.now() - t).toFixed(0)} ms from the kill to every request's next token`);
    const completions = await done;
    completions.forEach((c, k) => expect(c.outputTokens, `prompt ${k}`).toEqual(want[k]));
    expect(dep.engine.stats()).toMatchObject({ requestsFailed: 0, recoveries: 1 });
    await dep.close();
  }, 300_000);

  it('balances the running sequences over the new ranks at a scale-up (balanceOnScale): KV blocks moved, the fixed layout\'s tokens', async () => {
    const dep = await start([0], { balanceOnScale: true });
    await dep.settled();
    const { done } = await generate(dep, 4);
    const up = await dep.scale({ devices: [0, 1] });
    // The 8 requests all ran on device 0: 4 of them moved to device 1 with their KV blocks.
    expect(up.switchover).toMatchObject({ kept: PROMPTS.length, balanced: PROMPTS.length / 2, requeued: 0 });
    await dep.scale({ devices: [0] });
    const completions = await done;
    completions.forEach((c, k) => expect(c.outputTokens, `prompt ${k}`).toEqual(want[k]));
    expect(dep.engine.stats()).toMatchObject({ requestsFailed: 0, preemptions: 0 });
  }, 300_000);

  it('reads the experts in the virtual expert tables (expertTables) across 1→2→1 mid-generation: the fixed layout\'s tokens, the same mappings after', async () => {
    for (const d of opened.splice(0)) await d.close(); // room on the dry run's 1 GiB mock devices
    const dep = await start([0], { expertTables: true });
    await dep.settled();
    const mapped = () => dep.expertTables!.devices.filter((d) => d.mapped > 0).map((d) => [d.device, d.mapped]);
    const before = mapped();
    expect(before).toEqual([[0, config.layers * config.experts]]);
    const { done } = await generate(dep, 4);
    const up = await dep.scale({ devices: [0, 1] });
    expect(up.expertTables!.mapped).toBeGreaterThan(0);
    // The engine reads every expert at its slot: base + (layer * experts + expert) * stride + the tensor's offset.
    const t = dep.expertTables!;
    dep.devices.forEach((device, rank) => {
      const base = t.devices.find((d) => d.device === device)!.base;
      dep.expertWeights(rank).forEach((w, key) => {
        if (w) expect(w.gate.address >= base + BigInt(key * t.stride) && w.gate.address < base + BigInt((key + 1) * t.stride)).toBe(true);
      });
    });
    const down = await dep.scale({ devices: [0] });
    expect(down.expertTables!.unmapped).toBe(up.expertTables!.mapped);
    const completions = await done;
    completions.forEach((c, k) => expect(c.outputTokens, `prompt ${k}`).toEqual(want[k]));
    await dep.settled();
    // Exactly the layout's experts mapped again (the exact device memory after such cycles is guarded
    // on the mock, test/standalone/expert-tables.test.ts; the driver's free figure moves with graph memory).
    expect(mapped()).toEqual(before);
  }, 300_000);

  it('plans a scale with the observed expert load (observeLoad) and keeps the fixed layout\'s tokens', async () => {
    const dep = await start([0, 1], { observeLoad: { every: 2 } });
    const { done } = await generate(dep, 8);
    const to = devices.length >= 3 ? [0, 1, 2] : [0];
    const r = await dep.scale({ devices: to });
    expect(r.load.source).toBe('observed');
    expect(r.load.observedSteps).toBeGreaterThan(0);
    expect(r.bytesCopied).toBeGreaterThan(0);
    await expectOriginalBytes(dep);
    const completions = await done;
    completions.forEach((c, k) => expect(c.outputTokens, `prompt ${k}`).toEqual(want[k]));
  }, 300_000);
});
