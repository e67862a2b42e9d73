// The baselines of the scaling benchmark (src/scaling/baselines.ts) on the mock
// backend, with the tiny qwen3_moe of the orchestrator tests:
//   - the horizontal replica, loaded from a safetensors checkpoint of the same
//     weights onto fresh devices while the original serves, gives the same greedy
//     tokens, leaves the original's memory alone and frees all of its own;
//   - the paper's "extravagant" vertical scaling gives the same greedy tokens with
//     scale events mid-generation, holds both layouts' weights at its peak (every
//     weight of the new layout in new chunks), then frees the old layout's, ending
//     at the steady memory of a deployment started on the target devices; a failed
//     step leaves the old layout serving with memory as before.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import type { Completion } from '../../src/executor/engine.js';
import { kvGeometry } from '../../src/executor/types.js';
import { FaultInjectedError } from '../../src/runtime/errors.js';
import type { Runtime } from '../../src/runtime/runtime.js';
import { Replica, VerticalBaseline, type VerticalPhase, exportCheckpoint, weightBytesByDevice } from '../../src/scaling/baselines.js';
import { Deployment } from '../../src/scaling/orchestrator.js';
import { MIB, openMock } from '../helpers/mock.js';
import { tinyMoe, unitScale } from '../helpers/tiny-moe.js';

const config = tinyMoe(1024);
const scaleFor = unitScale;
const SEED = 20251002n;
const KV_BLOCKS = 512;
/** Long enough to be mid-generation across three scales (the steps go on through each prepare phase). */
const MAX = 600;
const PROMPTS = Array.from({ length: 8 }, (_, k) => Array.from({ length: 3 + ((k * 5) % 17) }, (_, i) => (i * 13 + k * 29 + 1) % 97));
// No standby chunks: the baselines build on the devices outside the layout, and their memory figures are exact.
const common = { config, kvBlocksPerDevice: KV_BLOCKS, maxTokensPerStep: 64, standbyChunks: false };

const runtimes: Runtime[] = [];
const mock = () => {
  const rt = openMock({ mockCapacity: 128 * MIB });
  runtimes.push(rt);
  return rt;
};
const freeBytes = (rt: Runtime) => rt.devices().map((d) => d.freeBytes);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Greedy tokens of every prompt on a fixed one-device deployment, and the steady memory of deployments per device set. */
const want: number[][] = [];
const steady = new Map<string, number[]>();
let dir: string;

beforeAll(async () => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'emoe-baselines-'));
  const rt = mock();
  const dep = await Deployment.start({ rt, ...common, devices: [0], seed: SEED, scaleFor });
  for (const c of await Promise.all(PROMPTS.map((prompt) => dep.submit({ prompt, maxTokens: MAX, ignoreEos: true })))) want.push(c.outputTokens);
  expect(new Set(want.flat()).size).toBeGreaterThan(10); // not degenerate
  await dep.close();
  for (const devices of [[0], [0, 1], [0, 1, 2]]) {
    const r = mock();
    const d = await Deployment.start({ rt: r, ...common, devices, seed: SEED, scaleFor });
    steady.set(devices.join(','), freeBytes(r));
    await d.close();
  }
});

afterAll(() => {
  for (const rt of runtimes) rt.dispose();
  rmSync(dir, { recursive: true, force: true });
});

/** Waits until each listed request has streamed at least `n` tokens. */
async function waitTokens(streamed: number[][], n: number): Promise<void> {
  const deadline = performance.now() + 10_000;
  while (streamed.some((s) => s.length < n)) {
    if (performance.now() > deadline) throw new Error(`requests did not reach ${n} tokens`);
    await sleep(1);
  }
}

describe('Replica (horizontal scaling)', () => {
  it('loads the same weights from disk onto fresh devices while the original serves: the same tokens; frees all it took', async () => {
    const rt = mock();
    const dep = await Deployment.start({ rt, ...common, devices: [0, 1], seed: SEED, scaleFor });
    const ckpt = path.join(dir, 'ckpt');
    const written = await exportCheckpoint(dep.hmm.store, config, ckpt, { files: 3 });
    expect(written.files).toHaveLength(3);
    const memory = freeBytes(rt);
    const total = rt.devices().map((d) => d.totalBytes);
    expect(memory.slice(2)).toEqual(total.slice(2));

    // The original serves while the replica loads.
    const streamed = PROMPTS.slice(0, 4).map(() => [] as number[]);
    const original = PROMPTS.slice(0, 4).map((prompt, i) => dep.submit({ prompt, maxTokens: MAX, ignoreEos: true }, { onToken: (t) => streamed[i]!.push(t) }));
    await waitTokens(streamed, 1);
    const replica = await Replica.start({ rt, ...common, devices: [2, 3], checkpoint: ckpt });
    expect(replica.devices).toEqual([2, 3]);
    expect(replica.timings.totalMs).toBeGreaterThanOrEqual(replica.timings.loadMs);
    const served = await Promise.all(PROMPTS.slice(4).map((prompt) => replica.submit({ prompt, maxTokens: MAX, ignoreEos: true })));
    served.forEach((c, i) => expect(c.outputTokens, `replica, prompt ${4 + i}`).toEqual(want[4 + i]));
    (await Promise.all(original)).forEach((c, i) => expect(c.outputTokens, `original, prompt ${i}`).toEqual(want[i]));
    // The replica's memory is on its devices only; closing it frees every byte of it.
    expect(freeBytes(rt).slice(0, 2)).toEqual(memory.slice(0, 2));
    expect(freeBytes(rt)[2]).toBeLessThan(total[2]!);
    await replica.close();
    expect(freeBytes(rt)).toEqual(memory);
    await dep.close();
  });
});

describe('VerticalBaseline (the paper\'s "extravagant" vertical scaling)', () => {
  it('gives identical greedy tokens with scale events 1→2→3→1 mid-generation; both layouts\' weights at the peak, the old freed after', async () => {
    const rt = mock();
    const vb = await VerticalBaseline.start({ rt, ...common, devices: [0], seed: SEED, scaleFor, prepare: { maxInflightBytes: 8 * MIB } });
    expect(freeBytes(rt)).toEqual(steady.get('0'));
    const streamed = PROMPTS.map(() => [] as number[]);
    const done: Array<Promise<Completion>> = [];
    const submit = (i: number) => done.push(vb.submit({ prompt: PROMPTS[i]!, maxTokens: MAX, ignoreEos: true }, { onToken: (t) => streamed[i]!.push(t) }));
    // Five requests start on [0]; two join on [0,1] (they land on device 1), one on [0,1,2] (device 2).
    const waves = [[0, 1, 2, 3, 4], [5, 6], [7]];
    let atAttach: number[] = [];
    const onProgress = (p: VerticalPhase) => { if (p === 'attach') atAttach = freeBytes(rt); };
    const reports = [];
    for (const [k, devices] of [[0, 1], [0, 1, 2], [0]].entries()) {
      for (const i of waves[k] ?? []) submit(i);
      await waitTokens(streamed.slice(0, done.length), 2);
      const free = freeBytes(rt);
      const r = await vb.scale({ devices }, { onProgress });
      reports.push(r);
      expect(vb.devices).toEqual(devices);
      expect(vb.engine.rankDevices).toEqual(devices);
      // Every weight of the new layout was copied into new chunks; at the peak both layouts' weights were held.
      expect(r.bytesCopied).toBe(r.weightBytes.after.reduce((a, b) => a + b, 0));
      expect(r.bytesCopiedLocal + r.bytesCopiedPeer).toBe(r.bytesCopied);
      expect(r.weightBytes.peak).toEqual(r.weightBytes.before.map((b, d) => b + r.weightBytes.after[d]!));
      for (const d of r.from.filter((x) => devices.includes(x))) {
        expect(free[d]! - atAttach[d]!, `device ${d}: memory added by the prepare phase`).toBe(r.weightBytes.after[d]);
      }
      expect(r.weightBytes.after).toEqual(weightBytesByDevice(vb.weights, rt.deviceCount));
      expect(r.prepare.stats!.batches).toBeGreaterThan(1);
    }
    // Every request's tokens equal the fixed layout's, though three layouts served it.
    (await Promise.all(done)).forEach((c, i) => {
      expect(c.finishReason).toBe('length');
      expect(c.outputTokens, `prompt ${i}`).toEqual(want[i]);
      expect(c.preemptions).toBe(0);
    });
    // 1→2: device 0 held its whole model plus the new layout's half: the peak is more than its steady weights by the new layout's share.
    const [up2, up3, down1] = reports;
    expect(up2!.weightBytes.peak[0]).toBe(up2!.weightBytes.before[0]! + up2!.weightBytes.after[0]!);
    expect(up2!.bytesCopiedPeer).toBeGreaterThan(0);
    expect(up2!.bytesCopiedLocal).toBeGreaterThan(0);
    expect(up3!.switchover).toMatchObject({ moved: 0, requeued: 0 });
    expect(down1!.switchover.moved).toBeGreaterThan(0);
    // Back on [0]: exactly the steady memory of a deployment started there (old weights and pools of devices that left freed).
    expect(freeBytes(rt)).toEqual(steady.get('0'));
    expect(vb.kvHmm.kv.poolDevices()).toEqual([0]);
    await vb.close();
    expect(freeBytes(rt)).toEqual(rt.devices().map((d) => d.totalBytes));
  });

  it('passes forward options to its engines: an f32 KV cache gives the elastic deployment\'s f32 tokens', async () => {
    const f32 = { forward: { kvDtype: 'f32' as const } };
    const rt = mock();
    const dep = await Deployment.start({ rt, ...common, ...f32, devices: [0], seed: SEED, scaleFor });
    const wantF32 = (await dep.submit({ prompt: PROMPTS[1]!, maxTokens: 40, ignoreEos: true })).outputTokens;
    await dep.close();
    const vb = await VerticalBaseline.start({ rt, ...common, ...f32, devices: [0], seed: SEED, scaleFor });
    expect(vb.kvHmm.kv.info(0).blockBytes).toBe(kvGeometry(config, 16, 'f32').blockBytes);
    const running = vb.submit({ prompt: PROMPTS[1]!, maxTokens: 40, ignoreEos: true });
    await vb.scale({ devices: [0, 1] });
    expect(vb.kvHmm.kv.info(1).blockBytes).toBe(kvGeometry(config, 16, 'f32').blockBytes);
    expect((await running).outputTokens).toEqual(wantF32);
    await vb.close();
  });

  it('rolls back a failure before the switch: the old layout serves, memory as before', async () => {
    const rt = mock();
    const vb = await VerticalBaseline.start({ rt, ...common, devices: [0], seed: SEED, scaleFor });
    const running = vb.submit({ prompt: PROMPTS[2]!, maxTokens: MAX, ignoreEos: true });
    for (const [op, nth] of [['CreateChunk', 1], ['CreateChunk', 5], ['CopyDeviceToDevice', 3], ['LoadModule', 1], ['Map', 4]] as const) {
      const memory = freeBytes(rt);
      rt.injectFault(op, nth);
      await expect(vb.scale({ devices: [0, 1] }), `${op} #${nth}`).rejects.toBeInstanceOf(FaultInjectedError);
      rt.clearFaults();
      expect(vb.devices).toEqual([0]);
      expect(freeBytes(rt), `${op} #${nth}`).toEqual(memory);
    }
    await vb.scale({ devices: [0, 1] });
    expect((await running).outputTokens).toEqual(want[2]);
    expect(freeBytes(rt)).toEqual(steady.get('0,1'));
    await vb.close();
  });
});
