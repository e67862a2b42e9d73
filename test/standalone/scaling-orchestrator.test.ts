// The scale orchestrator (src/scaling/orchestrator.ts) on the mock backend: a tiny
// qwen3_moe (hidden 64, 2 layers, 8 experts, top-2) served by a Deployment on 4
// mock devices while it scales. Each test guards one of DESIGN.md's invariants:
//   1. greedy tokens are identical with and without scale events mid-generation;
//   2. no request is lost or run twice across switch-overs under a steady stream;
//   3. after many up/down cycles device memory is exactly the layout's steady figure;
//   4. a failed step (allocation, copy, standby engine) rolls back: the old layout
//      keeps serving and device memory is exactly as before the attempt;
//   5. every expert byte after a move equals its source (checksums on the device).
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';

import type { Completion, StepFigures } from '../../src/executor/engine.js';
import type { GraphStats } from '../../src/executor/forward.js';
import { kvGeometry } from '../../src/executor/types.js';
import { ChunkStore } from '../../src/hmm/chunk-store.js';
import { FaultInjectedError, InvalidArgumentError, OutOfMemoryError } from '../../src/runtime/errors.js';
import { retryRefusedFrees } from '../../src/runtime/memory.js';
import type { Runtime } from '../../src/runtime/runtime.js';
import { exportCheckpoint } from '../../src/scaling/baselines.js';
import { Deployment, type DeploymentOptions, type ScaleProgress, type ScaleReport } from '../../src/scaling/orchestrator.js';
import { MIB, openMock } from '../helpers/mock.js';
import { tinyMoe, unitScale } from '../helpers/tiny-moe.js';

const config = tinyMoe(2048);
const scaleFor = unitScale;
const SEED = 20251002n;
const KV_BLOCKS = 1024; // 16,384 tokens: the 12 reference requests of MAX tokens on one device, and more
/** Generated tokens of the reference runs: every request's output is a prefix of its prompt's. */
/**
 * Long requests (the steps go on through a scale's prepare phase — about 100–200 steps on the mock — so a
 * request must outlive several scales to be mid-generation at each switch).
 */
const MAX = 800;
const PROMPTS = Array.from({ length: 12 }, (_, k) => Array.from({ length: 3 + ((k * 5) % 17) }, (_, i) => (i * 13 + k * 29 + 1) % 97));

const opened: Array<{ rt: Runtime; dep: Deployment }> = [];
async function start(devices: number[], extra: Partial<DeploymentOptions> = {}) {
  const rt = openMock({ mockCapacity: 128 * MIB });
  const dep = await Deployment.start({ rt, config, devices, seed: SEED, scaleFor, kvBlocksPerDevice: KV_BLOCKS, maxTokensPerStep: 64, ...extra });
  opened.push({ rt, dep });
  return { rt, dep };
}

const freeBytes = (rt: Runtime) => rt.devices().map((d) => d.freeBytes);
/** Device memory once the deployment's background work (standby chunks, access grants) is done. */
const settledFree = async (dep: Deployment, rt: Runtime) => {
  await dep.settled();
  return freeBytes(rt);
};
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Greedy tokens of each prompt on a fixed one-device layout (no scaling). */
let fixed: Deployment;
const reference = new Map<string, number[]>();
async function referenceTokens(prompts: number[][], maxTokens = MAX): Promise<number[][]> {
  const missing = prompts.filter((p) => (reference.get(p.join(','))?.length ?? 0) < maxTokens);
  const done = await Promise.all(missing.map((prompt) => fixed.submit({ prompt, maxTokens, ignoreEos: true })));
  done.forEach((c, i) => reference.set(missing[i]!.join(','), c.outputTokens));
  return prompts.map((p) => reference.get(p.join(','))!.slice(0, maxTokens));
}
const expected = (prompt: number[], maxTokens: number) => reference.get(prompt.join(','))!.slice(0, maxTokens);

/** Steady device memory of a layout: what a deployment started directly on it leaves free. */
const steady = new Map<string, number[]>();
/** The same for a deployment started with `extra` options. */
async function steadyOf(devices: number[], extra: Partial<DeploymentOptions>): Promise<number[]> {
  const key = `${devices.join(',')}|${JSON.stringify(extra)}`;
  if (!steady.has(key)) {
    const s = await start(devices, extra);
    steady.set(key, await settledFree(s.dep, s.rt));
  }
  return steady.get(key)!;
}

/** Device checksum of every weight chunk of the current layout, by chunk id. */
async function checksums(dep: Deployment): Promise<Map<string, bigint>> {
  const out = new Map<string, bigint>();
  for (const id of dep.chunkIds()) out.set(id, await dep.hmm.store.checksumChunk(id));
  return out;
}
/** A chunk's bytes are the same whatever device holds it: `L0.E3@2` → `L0.E3`, `dense@1#0` → `dense#0`. */
const groupKey = (id: string) => id.replace(/@\d+/, '');

/**
 * Invariant 5: every chunk copied by the scale equals each of its sources as they
 * were before the scale, and every chunk of the new layout equals the original
 * bytes of its group.
 */
async function expectCopiesExact(dep: Deployment, report: ScaleReport, before: Map<string, bigint>, original: Map<string, bigint>): Promise<void> {
  expect(report.copies.length).toBe(report.chunksCopied);
  for (const c of report.copies) {
    const got = await dep.hmm.store.checksumChunk(c.targetId);
    for (const s of c.sourceIds) expect(got, `${c.targetId} against its source ${s}`).toBe(before.get(s));
  }
  const now = await checksums(dep);
  expect(now.size).toBe(config.layers * config.experts + dep.devices.length * [...original.keys()].filter((k) => k.startsWith('dense')).length);
  for (const [id, sum] of now) expect(sum, `${id} against the original ${groupKey(id)}`).toBe(original.get(groupKey(id)));
}

async function originalSums(dep: Deployment): Promise<Map<string, bigint>> {
  const out = new Map<string, bigint>();
  for (const [id, sum] of await checksums(dep)) out.set(groupKey(id), sum);
  return out;
}

/** Waits until every listed request has streamed at least `n` tokens. */
async function waitTokens(streamed: Map<string, number[]>, ids: string[], n: number): Promise<void> {
  const deadline = performance.now() + 10_000;
  while (ids.some((id) => (streamed.get(id)?.length ?? 0) < n)) {
    if (performance.now() > deadline) throw new Error(`requests ${ids.join(', ')} did not reach ${n} tokens`);
    await sleep(1);
  }
}

beforeAll(async () => {
  ({ dep: fixed } = await start([0]));
  const s1 = await start([0]);
  steady.set('0', await settledFree(s1.dep, s1.rt));
  const s2 = await start([0, 1]);
  steady.set('0,1', await settledFree(s2.dep, s2.rt));
  const want = await referenceTokens(PROMPTS);
  // Not degenerate: the comparisons mean something.
  expect(new Set(want.flat()).size).toBeGreaterThan(10);
});

afterAll(async () => {
  for (const { dep, rt } of opened) {
    await dep.close();
    rt.dispose();
  }
});

describe('Deployment.scale', () => {
  it('gives identical greedy tokens with scale events 1→2→4→3→1 mid-generation; copied experts equal their sources', async () => {
    const { rt, dep } = await start([0]);
    const original = await originalSums(dep);
    const streamed = new Map<string, number[]>();
    /** Layouts (device lists) each request's tokens came from. */
    const servedBy = new Map<string, Set<string>>();
    const maxOf = new Map<string, number>();
    const done: Array<Promise<Completion>> = [];
    const submit = (k: number, maxTokens: number) => {
      const id = `r${k}`;
      streamed.set(id, []);
      servedBy.set(id, new Set());
      maxOf.set(id, maxTokens);
      done.push(dep.submit({ id, prompt: PROMPTS[k]!, maxTokens, ignoreEos: true }, {
        onToken: (t) => {
          streamed.get(id)!.push(t);
          servedBy.get(id)!.add(dep.engine.rankDevices.join(','));
        },
      }));
      return id;
    };
    const reports: ScaleReport[] = [];
    const phases: string[] = [];
    const scale = async (devices: number[]) => {
      const before = await checksums(dep);
      const r = await dep.scale({ devices }, { onProgress: (p: ScaleProgress) => phases.push(p.phase) });
      // Each target is mapped for its own device and, where its sources pushed it, theirs; a
      // target whose sources all grant its device access (an earlier scale's target) was pulled;
      // a target taken from the standby chunks is mapped for every device of the node.
      const node = [...Array(rt.deviceCount).keys()];
      for (const c of r.copies) {
        const t = dep.hmm.store.get(c.targetId);
        const pushed = [...new Set([t.plan.device, ...c.sourceIds.map((id) => Number(id.split('@')[1]!.split('#')[0]))])].sort();
        expect([[t.plan.device], pushed, node], c.targetId).toContainEqual([...t.access].sort());
      }
      expect(r.to).toEqual(devices);
      expect(dep.devices).toEqual(devices);
      expect(dep.engine.rankDevices).toEqual(devices);
      await expectCopiesExact(dep, r, before, original);
      reports.push(r);
    };

    // Wave A starts on [0]; wave B joins on [0,1] (lands on device 1); wave C on [0,1,2,3] (devices 2 and 3).
    const a = [0, 1, 2, 3].map((k) => submit(k, MAX));
    await waitTokens(streamed, a, 2);
    await scale([0, 1]);
    const b = [4, 5, 6, 7].map((k) => submit(k, 650));
    await waitTokens(streamed, b, 2);
    await scale([0, 1, 2, 3]);
    const c = [8, 9, 10, 11].map((k) => submit(k, 500));
    await waitTokens(streamed, c, 2);
    await scale([0, 1, 2]);
    await scale([0]);
    const completions = await Promise.all(done);

    for (const comp of completions) {
      const k = Number(comp.id.slice(1));
      expect(comp.finishReason, comp.id).toBe('length');
      expect(comp.outputTokens, `tokens of ${comp.id}`).toEqual(expected(PROMPTS[k]!, maxOf.get(comp.id)!));
      expect(streamed.get(comp.id), `streamed tokens of ${comp.id}`).toEqual(comp.outputTokens);
      expect(comp.preemptions).toBe(0);
    }
    // The scale events really happened mid-generation: every request was served by several layouts.
    for (const id of a) expect(servedBy.get(id)!.size, `layouts serving ${id}`).toBeGreaterThanOrEqual(4);
    for (const id of [...b, ...c]) expect(servedBy.get(id)!.size, `layouts serving ${id}`).toBeGreaterThanOrEqual(2);
    // Requests on devices that stayed kept their KV in place; those on leaving devices had it moved (never recomputed).
    const [up2, up4, down3, down1] = reports.map((r) => r.switchover);
    expect(up2!.kept).toBe(4);
    expect(up4!.kept).toBe(8);
    expect(up2!.moved + up4!.moved).toBe(0);
    expect(down3!.moved).toBeGreaterThan(0);
    expect(down1!.moved).toBeGreaterThan(0);
    expect(reports.every((r) => r.switchover.requeued === 0)).toBe(true);
    expect(dep.engine.stats()).toMatchObject({ preemptions: 0, requestsFailed: 0, requestsDone: 12 });
    // Report: uniform load moves exactly the lower bound here; phases in order, once each.
    for (const r of reports) {
      expect(r.bytesCopied).toBe(r.lowerBoundBytes);
      const p = r.phases;
      expect(p.planMs + p.prepareMs + p.attachMs + p.switchMs + p.releaseMs).toBeLessThanOrEqual(r.ms + 1e-6);
      // The release in pieces: the old engine's graphs and devices, then the chunk groups.
      expect(r.release!.engine.pieces).toBeGreaterThanOrEqual(r.from.length);
      expect(r.release!.chunks.groups).toBe(Math.ceil((r.chunksReleased + r.chunksKeptAsStandby) / 64));
      expect(r.release!.engine.ms + r.release!.chunks.ms).toBeLessThanOrEqual(p.releaseMs + 1e-6);
    }
    expect(reports[0]).toMatchObject({ from: [0], to: [0, 1], chunksCopied: 9, chunksReused: 9, chunksReleased: 8 }); // dense + 8 experts to device 1
    expect(phases.filter((p) => p !== 'prepare')).toEqual(Array(4).fill(['plan', 'attach', 'switch', 'release', 'done']).flat());
    // Standby engines made ahead: for 1→2 (taken), none for 2→4 (by two devices) nor the scale-downs.
    expect(reports.map((r) => r.standbyMadeAhead !== undefined)).toEqual([true, false, false, false]);
    expect(reports[0]!.attach).toBeUndefined();
    // Back on [0]: exactly the steady memory of that layout; the pools of the devices that left are those
    // of the standby engines made ahead for the scale-ups onto them.
    expect(await settledFree(dep, rt)).toEqual(steady.get('0'));
    expect(dep.standby.engines.map((e) => e.device)).toEqual([1, 2, 3]);
    expect(dep.hmm.kv.poolDevices()).toEqual([0, 1, 2, 3]);
  });

  it('loses no request and runs none twice across switch-overs under a steady stream of submissions', async () => {
    const figures: StepFigures[] = [];
    const { rt, dep } = await start([0], { onStep: (f) => figures.push(f) });
    const submitted: Array<{ id: string; k: number; maxTokens: number; duringScale: number | undefined }> = [];
    const streamed = new Map<string, number[]>();
    const done = new Map<string, Completion[]>();
    const waits: Array<Promise<void>> = [];
    let scaleIndex: number | undefined;
    let stop = false;
    const pump = (async () => {
      for (let i = 0; !stop; i++) {
        const id = `s${i}`;
        const k = i % PROMPTS.length;
        const maxTokens = 6 + ((i * 7) % 19);
        streamed.set(id, []);
        done.set(id, []);
        submitted.push({ id, k, maxTokens, duringScale: scaleIndex });
        waits.push(dep.submit({ id, prompt: PROMPTS[k]!, maxTokens, ignoreEos: true }, { onToken: (t) => streamed.get(id)!.push(t) })
          .then((c) => void done.get(id)!.push(c)));
        await sleep(2);
      }
    })();
    const targets = [[0, 1], [0, 1, 2, 3], [0, 1, 2], [0], [0, 1], [0, 1, 2, 3], [0, 1, 2], [0]];
    const reports: ScaleReport[] = [];
    await sleep(15);
    for (const [i, devices] of targets.entries()) {
      scaleIndex = i;
      reports.push(await dep.scale({ devices }));
      scaleIndex = undefined;
      await sleep(10);
    }
    stop = true;
    await pump;
    await Promise.all(waits);

    // Every request resolved exactly once, complete and correct; its tokens streamed once each.
    expect(submitted.length).toBeGreaterThan(40);
    for (const s of submitted) {
      const c = done.get(s.id)!;
      expect(c.length, `completions of ${s.id}`).toBe(1);
      expect(c[0]!.finishReason, s.id).toBe('length');
      expect(c[0]!.outputTokens, `tokens of ${s.id}`).toEqual(expected(PROMPTS[s.k]!, s.maxTokens));
      expect(streamed.get(s.id), `streamed tokens of ${s.id}`).toEqual(c[0]!.outputTokens);
    }
    // New requests were admitted while every scale was in progress.
    for (let i = 0; i < targets.length; i++) expect(submitted.filter((s) => s.duringScale === i).length, `submitted during scale ${i}`).toBeGreaterThan(0);
    // Nothing ran twice: the forward pass saw each prompt token and each decode exactly once.
    const prefill = figures.reduce((a, f) => a + f.prefillTokens, 0);
    const decode = figures.reduce((a, f) => a + f.decodeTokens, 0);
    expect(prefill).toBe(submitted.reduce((a, s) => a + PROMPTS[s.k]!.length, 0));
    expect(decode).toBe(submitted.reduce((a, s) => a + s.maxTokens - 1, 0));
    expect(dep.engine.stats()).toMatchObject({ requestsDone: submitted.length, requestsFailed: 0, requestsCancelled: 0, preemptions: 0 });
    // Several ranks really served, and leaving devices' requests moved with their KV.
    expect(Math.max(...figures.map((f) => f.rankSeqs.length))).toBe(4);
    expect(reports.reduce((a, r) => a + r.switchover.moved, 0)).toBeGreaterThan(0);
    expect(await settledFree(dep, rt)).toEqual(steady.get('0'));
  });

  it('migrates to disjoint and reordered device sets mid-generation: every request moves with its KV, the same tokens', async () => {
    const { rt, dep } = await start([0]);
    const original = await originalSums(dep);
    const streamed = new Map<string, number[]>();
    const done: Array<Promise<Completion>> = [];
    const submit = (k: number) => {
      const id = `m${k}`;
      streamed.set(id, []);
      done.push(dep.submit({ id, prompt: PROMPTS[k]!, maxTokens: MAX, ignoreEos: true }, { onToken: (t) => streamed.get(id)!.push(t) }));
      return id;
    };
    const switchovers: ScaleReport['switchover'][] = [];
    for (const [i, devices] of [[1], [3, 2], [2, 0, 3], [0]].entries()) {
      const before = await checksums(dep);
      // Requests submitted as each scale's prepare phase starts (three for the first, one for each other), so they are
      // generating at its switch: steps run through the prepare phase, a request started earlier may be done by then.
      let wave = false;
      const r = await dep.scale({ devices }, {
        onProgress: (p) => {
          if (p.phase === 'prepare' && !wave) {
            wave = true;
            (i === 0 ? [0, 1, 2] : [4 + i]).forEach(submit);
          }
        },
      });
      switchovers.push(r.switchover);
      await expectCopiesExact(dep, r, before, original);
    }
    // [0]→[1] and [1]→[3,2] share no device: every request in flight moves with its KV blocks (none kept, none recomputed).
    for (const sw of switchovers.slice(0, 2)) expect(sw).toMatchObject({ kept: 0, requeued: 0 });
    expect(switchovers[0]!.moved).toBe(3);
    expect(switchovers[1]!.moved).toBeGreaterThanOrEqual(1);
    for (const c of await Promise.all(done)) {
      expect(c.outputTokens, `tokens of ${c.id}`).toEqual(expected(PROMPTS[Number(c.id.slice(1))]!, MAX));
      expect(c.preemptions).toBe(0);
    }
    expect(await settledFree(dep, rt)).toEqual(steady.get('0'));
  });

  it('recomputes a request whose KV cannot move (target pool full): nothing lost, the same tokens', async () => {
    // Pools of 128 blocks (2,048 tokens): a 1,700-token prompt on device 0 (107+ blocks) leaves at most 21 blocks,
    // too few for the KV of device 1's 340-token request (22+ blocks). Long keeps decoding for 340 tokens, well past
    // the scale-down's prepare phase, through which the steps go on; short (400 tokens) too.
    const { dep } = await start([0], { kvBlocksPerDevice: 128 });
    const long = Array.from({ length: 1700 }, (_, i) => (i * 31 + 7) % 97);
    const short = Array.from({ length: 340 }, (_, i) => (i * 17 + 3) % 97);
    const [wantLong] = await referenceTokens([long], 340);
    const [wantShort] = await referenceTokens([short], 400);
    const streamed = new Map<string, number[]>([['long', []], ['short', []]]);
    const onToken = (id: string) => (t: number) => streamed.get(id)!.push(t);
    // Both join on [0, 1] (long on device 0, short on device 1), so only the scale-down runs while long decodes.
    await dep.scale({ devices: [0, 1] });
    const pLong = dep.submit({ id: 'long', prompt: long, maxTokens: 340, ignoreEos: true }, { onToken: onToken('long') });
    const pShort = dep.submit({ id: 'short', prompt: short, maxTokens: 400, ignoreEos: true }, { onToken: onToken('short') });
    await waitTokens(streamed, ['short', 'long'], 1);
    const r = await dep.scale({ devices: [0] });
    expect(r.switchover).toMatchObject({ kept: 1, moved: 0, requeued: 1 });
    const [cLong, cShort] = await Promise.all([pLong, pShort]);
    expect(cLong.outputTokens).toEqual(wantLong);
    expect(cShort.outputTokens).toEqual(wantShort);
    expect(streamed.get('short')).toEqual(wantShort); // nothing streamed twice after the recompute
    expect(cShort.preemptions).toBe(1);
    expect(dep.hmm.kv.poolDevices()).toEqual([0, ...dep.standby.engines.map((e) => e.device)]);
  });

  it('returns to the steady memory figure of each layout after 200 up/down cycles, as the issue asks', async () => {
    const { rt, dep } = await start([0]);
    const chunks0 = dep.chunkIds();
    let chunks01: string[] | undefined;
    const total = rt.devices().map((d) => d.totalBytes);
    expect(await settledFree(dep, rt)).toEqual(steady.get('0'));
    let allocatedAfterFirst: number | undefined;
    for (let i = 0; i < 200; i++) {
      await dep.scale({ devices: [0, 1] });
      expect(await settledFree(dep, rt), `on [0,1], cycle ${i}`).toEqual(steady.get('0,1'));
      chunks01 ??= dep.chunkIds();
      expect(dep.chunkIds()).toEqual(chunks01);
      await dep.scale({ devices: [0] });
      expect(await settledFree(dep, rt), `on [0], cycle ${i}`).toEqual(steady.get('0'));
      expect(dep.chunkIds()).toEqual(chunks0);
      allocatedAfterFirst ??= dep.hostPoolStats.allocated;
    }
    // + the KV pool chunk of [0] and those of the standby engines made ahead for 1, 2 and 3.
    expect(dep.standby.engines.map((e) => e.device)).toEqual([1, 2, 3]);
    expect(dep.hmm.store.size).toBe(chunks0.length + 4);
    expect(dep.hmm.kv.poolDevices()).toEqual([0, 1, 2, 3]);
    // Pinned host buffers: allocated for the engines of the first cycle (the serving ones and those
    // made ahead, a metadata and a tables buffer per device each), then handed from engine to
    // engine: never freed, no more allocated over the next 199 cycles.
    const pool = dep.hostPoolStats;
    expect(pool.freed).toBe(0);
    expect(pool.allocated).toBe(allocatedAfterFirst);
    expect(pool.reused).toBeGreaterThan(200 * 4);
    // Devices outside the layout hold nothing but their standby chunks and engines: with those off, nothing.
    const spare = dep.hmm.accounting().map((a) => a.spareBytes);
    expect(spare[0]).toBe(0);
    expect(spare[2]).toBeGreaterThan(0);
    await dep.setStandbyChunks(false);
    expect(dep.standby).toEqual({ devices: [], engines: [] });
    expect(freeBytes(rt).slice(1)).toEqual(total.slice(1));
    expect(dep.hmm.kv.poolDevices()).toEqual([0]);
    // Still serving, correctly.
    const c = await dep.submit({ prompt: PROMPTS[3]!, maxTokens: 20, ignoreEos: true });
    expect(c.outputTokens).toEqual(expected(PROMPTS[3]!, 20));
  });

  it('with peerAccess \'all\' pulls the copies: targets mapped for their own device, granted every device after the switch-over', async () => {
    // No standby chunks: those are mapped for every device already (see the standby test).
    const { rt, dep } = await start([0], { peerAccess: 'all', standbyChunks: false });
    for (const id of dep.chunkIds()) expect(dep.hmm.store.get(id).access.size, id).toBe(rt.deviceCount);
    const running = dep.submit({ prompt: PROMPTS[0]!, maxTokens: 40, ignoreEos: true });
    for (const devices of [[0, 1], [1, 2], [0]]) {
      const r = await dep.scale({ devices });
      expect(r.copies.length).toBeGreaterThan(0);
      for (const c of r.copies) {
        const t = dep.hmm.store.get(c.targetId);
        expect([...t.access], c.targetId).toEqual([t.plan.device]);
      }
      await dep.settled();
      for (const id of dep.chunkIds()) expect(dep.hmm.store.get(id).access.size, id).toBe(rt.deviceCount);
    }
    expect((await running).outputTokens).toEqual(expected(PROMPTS[0]!, 40));
    await expect(Deployment.start({ rt: openMock({ mockCapacity: 128 * MIB }), config, devices: [0], kvBlocksPerDevice: 8, peerAccess: 'some' as 'all' }))
      .rejects.toThrow(InvalidArgumentError);
  });

  it('with pauseCaptures the serving engine captures no new graph while a scale prepares, and captures again after a rollback', async () => {
    // No standby chunks: the prepare phase creates its chunks, long enough for steps of new shapes to run in it.
    const { rt, dep } = await start([0], { pauseCaptures: true, standbyChunks: false });
    const snap = () => ({ ...dep.graphStats! });
    const running = [0, 1, 2].map((k) => dep.submit({ prompt: PROMPTS[k]!, maxTokens: 30, ignoreEos: true }));
    await sleep(5);
    // A failed attempt: from its plan to its rollback the engine captures nothing new.
    let atPlan: ReturnType<typeof snap> | undefined;
    let atRollback: ReturnType<typeof snap> | undefined;
    rt.injectFault('CopyDeviceToDevice', 3);
    let late: Promise<Completion> | undefined;
    const onProgress = (p: ScaleProgress) => {
      if (p.phase === 'plan') atPlan = snap();
      // A request arriving during the prepare phase: its prefill and the steps after are new shapes.
      if (p.phase === 'prepare' && !late) late = dep.submit({ prompt: PROMPTS[4]!, maxTokens: 30, ignoreEos: true });
      if (p.phase === 'rollback') atRollback = snap();
    };
    // Copies in 2 MiB batches with 5 ms turns between them: steps run in the prepare phase before the third copy fails.
    await expect(dep.scale({ devices: [0, 1] }, { onProgress, prepare: { maxInflightBytes: 1, yieldMs: 5 } })).rejects.toBeInstanceOf(FaultInjectedError);
    rt.clearFaults();
    // None begun in between (one begun before may end after: its instantiation runs on the thread pool).
    expect(atRollback!.capturesBegun).toBe(atPlan!.capturesBegun);
    expect(atRollback!.captures).toBeLessThanOrEqual(atPlan!.capturesBegun);
    expect(atRollback!.deferred).toBeGreaterThan(atPlan!.deferred);
    await late;
    // Then capturing again: a new shape (one sequence fewer) gets a graph.
    const before = snap();
    const extra = dep.submit({ prompt: PROMPTS[3]!, maxTokens: 30, ignoreEos: true });
    await Promise.all([...running, extra]);
    expect(dep.graphStats!.captures).toBeGreaterThan(before.captures);
    for (const [k, c] of (await Promise.all(running)).entries()) expect(c.outputTokens).toEqual(expected(PROMPTS[k]!, 30));
  });

  it('captures the serving engine\'s recent graph shapes ahead on the standby engine: the staying ranks\' first step replays them', async () => {
    const LONG = [0, 1, 2, 3].map((k) => Array.from({ length: 130 }, (_, i) => (i * 7 + k * 31 + 3) % 97));
    // 1: captured ahead; 0: not asked; 'fails': asked, and the first capture fails (out of memory):
    // the scale goes on and the graphs are captured at the first step.
    for (const mode of [1, 0, 'fails'] as const) {
      const precaptureGraphs = mode === 0 ? 0 : 1;
      let dep: Deployment | undefined;
      let rt: Runtime;
      // The graph counts after each step, with the step's rank count (3 from the first step on [0, 1, 2]).
      const steps: Array<{ ranks: number; stats: GraphStats }> = [];
      // Blocks of 64 tokens and prompts of 130: every sequence stays at 3-4 blocks (a block-table
      // stride of 4) for its 120 tokens, so the decode shapes do not change while the scale runs.
      // The standby engine made at scale time (made ahead, it may have caught the shapes already: see below).
      ({ dep, rt } = await start([0, 1], {
        precaptureGraphs, blockTokens: 64, standbyEngines: false, onStep: (f) => steps.push({ ranks: f.rankSeqs.length, stats: { ...dep!.graphStats! } }),
      }));
      // Four requests decoding on the two ranks, none waiting at the switch-over (the new rank gets none).
      const running = LONG.map((prompt) => dep!.submit({ prompt, maxTokens: 120, ignoreEos: true }));
      while (dep.graphStats!.replays < 8) await sleep(2);
      // The serving engine only replays now (stable shapes), so the next capture is the standby's.
      const onProgress = (p: ScaleProgress) => {
        if (mode === 'fails' && p.phase === 'attach') rt.injectFault('EndCapture', 1, 'OUT_OF_MEMORY');
      };
      const report = await dep.scale({ devices: [0, 1, 2] }, { onProgress });
      rt.clearFaults();
      const first = steps.find((x) => x.ranks === 3)!.stats;
      expect(report.standbyMadeAhead).toBeUndefined();
      if (mode === 'fails') {
        expect(report.precapture).toMatchObject({ graphs: 0, error: expect.stringMatching(/^OutOfMemoryError: /) });
        expect(first).toMatchObject({ precaptured: 0, captures: 2, replays: 0 });
      } else if (mode === 1) {
        // One decode shape per staying device, captured before the switch-over; the first step replays both.
        expect(report.precapture).toMatchObject({ graphs: 2 });
        expect(first).toMatchObject({ precaptured: 2, captures: 0, replays: 2 });
      } else {
        expect(report.precapture).toMatchObject({ graphs: 0 });
        expect(first).toMatchObject({ precaptured: 0, captures: 2, replays: 0 });
      }
      const want = await referenceTokens(LONG, 120);
      for (const [k, c] of (await Promise.all(running)).entries()) expect(c.outputTokens).toEqual(want[k]);
    }
  });

  it('captures at a scale-down\'s attach the staying ranks\' steps at their new share (rampShapes): the first step on the new layout replays them', async () => {
    const LONG = [0, 1, 2, 3, 4, 5].map((k) => Array.from({ length: 130 }, (_, i) => (i * 7 + k * 31 + 3) % 97));
    // Long enough to be mid-generation when the scale-down ends, on a loaded machine too.
    const MAX_NEW = 360;
    const want = await referenceTokens(LONG, MAX_NEW);
    for (const rampShapes of [true, false]) {
      const steps: Array<{ ranks: number; stats: GraphStats }> = [];
      // Blocks of 128, prompts of 130 and up to 360 more: 2 to 4 blocks, a block-table stride of 4 all along;
      // 6 sequences, 2 per rank on [0, 1, 2].
      const { dep } = await start([0, 1, 2], {
        precaptureGraphs: 1, blockTokens: 128, standbyEngines: false, rampShapes,
        onStep: (f) => steps.push({ ranks: f.rankSeqs.length, stats: { ...dep.graphStats! } }),
      });
      const running = LONG.map((prompt) => dep.submit({ prompt, maxTokens: MAX_NEW, ignoreEos: true }));
      while (dep.graphStats!.replays < 12) await sleep(2);
      const report = await dep.scale({ devices: [0, 1] });
      // On [0, 1] each rank runs 3 (the leaving rank's moved with their KV): a shape the serving engine never had.
      const first = steps.find((x) => x.ranks === 2)!.stats;
      expect(report.precapture).toMatchObject({ graphs: 2 });
      if (rampShapes) expect(first).toMatchObject({ captures: 0, replays: 2 }); // the new share's decode, captured at attach
      else expect(first).toMatchObject({ captures: 2, replays: 0 }); // the old share's (2 sequences) was captured instead
      for (const [k, c] of (await Promise.all(running)).entries()) expect(c.outputTokens).toEqual(want[k]);
    }
  });

  it('makes the standby engine of each planned scale-up ahead (standbyEngines): the scale-up calls no driver allocation, its first step replays', async () => {
    // Prompts of 520 tokens and 400 more generated, in blocks of 64: 9 to 15 blocks (a block-table stride of 16)
    // all along, so the decode shapes stay the same while the engines follow and the scale runs.
    const LONG = [0, 1, 2, 3].map((k) => Array.from({ length: 520 }, (_, i) => (i * 5 + k * 37 + 11) % 97));
    const steps: Array<{ ranks: number; stats: GraphStats }> = [];
    const { rt, dep } = await start([0, 1], { blockTokens: 64, onStep: (f) => steps.push({ ranks: f.rankSeqs.length, stats: { ...dep.graphStats! } }) });
    await dep.settled();
    expect(dep.standby.engines.map((e) => e.device)).toEqual([2, 3]);
    // Each has its joining device's KV pool (taken from that device's standby chunks).
    expect(dep.hmm.kv.poolDevices()).toEqual([0, 1, 2, 3]);
    const tokens = LONG.map(() => 0);
    const running = LONG.map((prompt, k) => dep.submit({ prompt, maxTokens: 400, ignoreEos: true }, { onToken: () => void tokens[k]!++ }));
    // Past the prompts: the serving steps are decode steps from here on.
    while (tokens.some((n) => n < 4) || dep.graphStats!.replays < 8) await sleep(2);
    // Made at start, before any step: the engines follow the serving engine's shapes in the background
    // and capture its decode shapes too (one per staying device), without a scale asking, until their
    // scale's attach phase would capture nothing more (`missing`; on a loaded machine the follower runs late).
    const deadline = performance.now() + 10_000;
    while (dep.standby.engines.some((e) => e.precaptured < 2 || e.missing > 0)) {
      expect(performance.now(), 'the standby engines never captured the decode shapes').toBeLessThan(deadline);
      await sleep(5);
    }
    // The scale-up creates no chunk, stream or module: each of those calls would fail.
    for (const op of ['CreateChunk', 'CreateStream', 'LoadModule', 'CopyDeviceToDevice']) rt.injectFault(op, 1);
    const phases: string[] = [];
    const report = await dep.scale({ devices: [0, 1, 2] }, { onProgress: (p) => phases.push(p.phase) });
    rt.clearFaults();
    expect(report.standbyMadeAhead!.precaptured).toBeGreaterThanOrEqual(2);
    // The shapes it held at the switch-over (diagnostics): ranks of the new layout, each a [rank, T, S, MB, sampled].
    expect(report.standbyMadeAhead!.shapes!.length).toBeGreaterThanOrEqual(2);
    expect(report.standbyMadeAhead!.shapes!.every((x) => x.length === 5 && x[0]! >= 0 && x[0]! < 3)).toBe(true);
    expect(report.precapture).toMatchObject({ graphs: 0 }); // nothing left to capture at scale time
    expect(report.attach).toBeUndefined();
    expect(report.plannedAhead).toBe(true);
    expect(report.chunksCopied).toBeGreaterThan(0);
    expect(report.chunksPrefilled).toBe(report.chunksCopied);
    expect(report.chunksFromStandby).toBe(report.chunksCopied);
    expect(phases.filter((p) => p !== 'prepare')).toEqual(['plan', 'attach', 'switch', 'release', 'done']);
    // The staying ranks' first step on [0, 1, 2] replays graphs captured ahead.
    const first = steps.find((x) => x.ranks === 3)!.stats;
    expect(first).toMatchObject({ captures: 0, replays: 2 });
    const want = await referenceTokens(LONG, 400);
    for (const [k, c] of (await Promise.all(running)).entries()) expect(c.outputTokens).toEqual(want[k]);
    // The engine made for 0,1 → 0,1,3 was freed with its pool; the next one is made for 0,1,2 → 0,1,2,3.
    await dep.settled();
    expect(dep.standby.engines.map((e) => e.device)).toEqual([3]);
    expect(dep.hmm.kv.poolDevices()).toEqual([0, 1, 2, 3]);
    expect(await settledFree(dep, rt)).toEqual(await steadyOf([0, 1, 2], { blockTokens: 64 }));
    // follow 0: made at start, they do not follow the serving engine's shapes (the scale captures them).
    {
      const { dep: still } = await start([0, 1], { blockTokens: 64, standbyEngines: { follow: 0 } });
      await still.settled();
      const running2 = LONG.map((prompt) => still.submit({ prompt, maxTokens: 400, ignoreEos: true }));
      while (still.graphStats!.replays < 8) await sleep(2);
      await sleep(500); // more than two rounds of following, had it been on
      expect(still.standby.engines.map((e) => [e.device, e.precaptured])).toEqual([[2, 0], [3, 0]]);
      const r = await still.scale({ devices: [0, 1, 2] });
      expect(r.standbyMadeAhead).toMatchObject({ precaptured: 0 });
      expect(r.precapture!.graphs).toBeGreaterThanOrEqual(2);
      for (const [k, c] of (await Promise.all(running2)).entries()) expect(c.outputTokens).toEqual(want[k]);
    }
    // Making one fails (its engine's stream): the others are made, the error is told, nothing of it is left.
    {
      const { rt: r3, dep: d3 } = await start([0]);
      const before = await settledFree(d3, r3);
      expect(d3.standby.engines.map((e) => e.device)).toEqual([1, 2, 3]);
      r3.injectFault('CreateStream', 1); // the first engine made (device 1's): its copy streams exist already
      await d3.setStandbyChunks(true); // the work ahead again
      r3.clearFaults();
      expect(d3.standby.error).toBeInstanceOf(FaultInjectedError);
      expect(d3.standby.engines.map((e) => e.device)).toEqual([2, 3]);
      expect(d3.hmm.kv.poolDevices()).toEqual([0, 2, 3]);
      // A scale-up onto device 1 makes its standby engine itself, and serves.
      const r = await d3.scale({ devices: [0, 1] });
      expect(r.standbyMadeAhead).toBeUndefined();
      expect(r.chunksPrefilled).toBe(r.chunksCopied);
      expect((await d3.submit({ prompt: PROMPTS[4]!, maxTokens: 12, ignoreEos: true })).outputTokens).toEqual(expected(PROMPTS[4]!, 12));
      await d3.scale({ devices: [0] });
      // Made again without the fault: memory exactly as before the failed attempt.
      await d3.setStandbyChunks(true);
      expect(d3.standby.error).toBeUndefined();
      expect(d3.standby.engines.map((e) => e.device)).toEqual([1, 2, 3]);
      expect(await settledFree(d3, r3)).toEqual(before);
    }
    for (const bad of [{ follow: -1 }, { follow: 1.5 }, 'yes', null]) {
      await expect(Deployment.start({ rt: openMock({ mockCapacity: 128 * MIB }), config, devices: [0], kvBlocksPerDevice: 8,
        standbyEngines: bad as DeploymentOptions['standbyEngines'] })).rejects.toThrow(InvalidArgumentError);
    }
    // Off: none made, and the scale makes its standby engine as before.
    const { dep: off } = await start([0, 1], { standbyEngines: false });
    await off.settled();
    expect(off.standby.engines.map((e) => e.device)).toEqual([]);
    expect(off.hmm.kv.poolDevices()).toEqual([0, 1]);
    const r = await off.scale({ devices: [0, 1, 2] });
    expect(r.standbyMadeAhead).toBeUndefined();
    expect(r.attach).toBeDefined();
  });

  it('with balanceOnScale a scale-up gives the new rank its share of the running sequences, KV moved: the same tokens, the first step replays', async () => {
    // Six requests decoding on [0, 1] (3 per rank), prompts of 520 tokens and 480 generated in blocks of 64 (a
    // block-table stride of 16 all along, as above). After 2→3 balanced, 2 per rank.
    const SIX = [0, 1, 2, 3, 4, 5].map((k) => Array.from({ length: 520 }, (_, i) => (i * 11 + k * 41 + 5) % 97));
    const want = await referenceTokens(SIX, 480);
    // 'fails': balancing asked, its first KV move fails (a copy fault): the sequence stays where it was, whole.
    for (const mode of [true, false, 'fails'] as const) {
      const balanceOnScale = mode !== false;
      const steps: Array<{ ranks: number[]; prefill: number; stats: GraphStats }> = [];
      // One shape per device captured ahead, not following (the engines are made again below, once the batch
      // is steady): with balancing that one shape is the decode step of the balanced share (2), not the serving
      // one (3), so the first step's replays, with nothing captured at scale time, show it was captured ahead.
      const { rt, dep } = await start([0, 1], {
        blockTokens: 64, balanceOnScale, precaptureGraphs: 1, standbyEngines: { follow: 0 },
        onStep: (f) => steps.push({ ranks: f.rankSeqs, prefill: f.prefillTokens, stats: { ...dep.graphStats! } }),
      });
      const running = SIX.map((prompt) => dep.submit({ prompt, maxTokens: 480, ignoreEos: true }));
      // All six decoding (their prompts run 64 tokens a step): 8 steps of decodes only.
      while (steps.filter((x) => x.prefill === 0 && x.ranks.reduce((a, b) => a + b, 0) === 6).length < 8) await sleep(2);
      await dep.setStandbyChunks(true); // the work ahead again: the engines made with the steady shapes
      // The scale-up copies nothing but the balancing's KV blocks (its chunks were filled ahead).
      if (mode === 'fails') rt.injectFault('CopyDeviceToDevice', 1);
      const report = await dep.scale({ devices: [0, 1, 2] });
      rt.clearFaults();
      const first = steps.find((x) => x.ranks.length === 3)!;
      expect(report.standbyMadeAhead).toBeDefined();
      if (mode === true) {
        expect(report.switchover).toMatchObject({ kept: 6, moved: 0, balanced: 2 });
        expect(first.ranks).toEqual([2, 2, 2]);
        expect(report.precapture).toMatchObject({ graphs: 0 });
        expect(first.stats).toMatchObject({ captures: 0, replays: 3 });
      } else {
        expect(report.switchover).toMatchObject({ kept: 6, moved: 0, balanced: 0 });
        expect(first.ranks).toEqual([3, 3, 0]);
      }
      for (const [k, c] of (await Promise.all(running)).entries()) expect(c.outputTokens, `request ${k}`).toEqual(want[k]);
      expect(dep.engine.stats()).toMatchObject({ preemptions: 0, requestsFailed: 0 });
    }
  });

  it('serves and scales weights loaded from a safetensors checkpoint: the synthetic weights\' tokens, requests moving with their KV', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'emoe-ckpt-'));
    try {
      // The reference deployment's synthetic weights, written as a sharded checkpoint.
      await exportCheckpoint(fixed.hmm.store, config, dir, { files: 3 });
      const progress: number[] = [];
      const { dep } = await start([0], { checkpoint: dir, seed: 999n, onLoadProgress: (p) => progress.push(p.bytesDone / p.bytesTotal) });
      expect(progress.at(-1)).toBe(1);
      const prompts = PROMPTS.slice(0, 4);
      const want = await referenceTokens(prompts, 80);
      const running = prompts.map((prompt) => dep.submit({ prompt, maxTokens: 80, ignoreEos: true }));
      await sleep(20);
      const up = await dep.scale({ devices: [0, 1] });
      expect(up.bytesCopied).toBe(up.lowerBoundBytes);
      const done = await Promise.all(running);
      done.forEach((c, k) => expect(c.outputTokens).toEqual(want[k])); // the seed was ignored: the checkpoint's bytes served
      // A path that is no checkpoint: a clear error, nothing left behind.
      const rt = openMock({ mockCapacity: 128 * MIB });
      const free = rt.devices().map((d) => d.freeBytes);
      await expect(Deployment.start({ rt, config, devices: [0], kvBlocksPerDevice: 16, checkpoint: path.join(dir, 'nope') })).rejects.toThrow(/nope/);
      expect(rt.devices().map((d) => d.freeBytes)).toEqual(free);
      rt.dispose();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it.each([true, false])('rolls back a failure at each step (allocation, mapping, copy, standby engine): the old layout serves, memory as before (offThread %s)', async (offThread) => {
    // Kernels not preloaded, so the standby engine loads them on the device it adds (a step that can fail).
    // No standby chunks either, so every target chunk is created by the scale (standby: see below).
    // offThread: the targets are made on a worker thread while the standby engine is made against
    // their reserved addresses (a failure on either side waits for the other before the rollback).
    const { rt, dep } = await start([0], { preloadKernels: false, standbyChunks: false, prepare: { offThread } });
    const load: Array<{ k: number; maxTokens: number; done: Promise<Completion> }> = [];
    const request = (k: number, maxTokens: number) =>
      load.push({ k, maxTokens, done: dep.submit({ prompt: PROMPTS[k]!, maxTokens, ignoreEos: true }) });
    let n = 0;

    /** Fails the nth call of `op` (counted from the attempt) for n = 1, 2, ... until the scale gets through. */
    const sweep = async (op: string, from: number[], to: number[]) => {
      let failures = 0;
      for (let nth = 1; ; nth++) {
        expect(nth, `${op}: the scale never succeeded`).toBeLessThan(60);
        request(n++ % PROMPTS.length, 12); // in flight during the attempt
        const memory = freeBytes(rt);
        const chunks = dep.chunkIds();
        const all = dep.hmm.store.ids().sort();
        const pools = dep.hmm.kv.poolDevices();
        const seen: string[] = [];
        await dep.settled(); // the last scale's background access grants: not part of this attempt
        rt.injectFault(op, nth);
        let report: ScaleReport | undefined;
        try {
          report = await dep.scale({ devices: to }, { onProgress: (p) => seen.push(p.phase) });
        } catch (e) {
          expect(e, `${op} #${nth}`).toBeInstanceOf(FaultInjectedError);
        } finally {
          rt.clearFaults();
        }
        if (report) {
          expect(failures, `${op} failed at least once`).toBeGreaterThan(0);
          expect(report.attachBeforeTargets).toBe(offThread);
          await dep.scale({ devices: from });
          return failures;
        }
        failures++;
        expect(seen.at(-1), `${op} #${nth}`).toBe('rollback');
        expect(seen).not.toContain('switch');
        expect(dep.devices).toEqual(from);
        expect(dep.engine.rankDevices).toEqual(from);
        expect(freeBytes(rt), `${op} #${nth}: device memory`).toEqual(memory);
        expect(dep.chunkIds()).toEqual(chunks);
        expect(dep.hmm.store.ids().sort()).toEqual(all);
        expect(dep.hmm.kv.poolDevices()).toEqual(pools);
      }
    };

    // Scale-up 1→2 with the single-device layout serving (its steps use none of these calls).
    const counts: Record<string, number> = {};
    for (const op of ['CreateChunk', 'ReserveRange', 'Map', 'SetAccess', 'CopyDeviceToDevice', 'LoadModule', 'CreateStream']) {
      counts[op] = await sweep(op, [0], [0, 1]);
    }
    // Every step was hit: the new KV pool, 9 copies, the KV view, the standby engine's scratch and
    // its kernels on device 1 (device 0's module is the serving engine's, shared).
    expect(counts.CreateChunk).toBeGreaterThanOrEqual(1 + 9 + 2);
    expect(counts.CopyDeviceToDevice).toBe(9);
    expect(counts.LoadModule).toBe(1);
    // Scale-down 2→1 with [0,1] serving: expert copies to device 0 and the standby engine fail.
    await dep.scale({ devices: [0, 1] });
    for (const op of ['CreateChunk', 'CreateStream']) counts[`down:${op}`] = await sweep(op, [0, 1], [0]);
    expect(counts['down:CreateChunk']).toBeGreaterThanOrEqual(8 + 1);
    await dep.scale({ devices: [0] });

    // Every request in flight during the attempts completed with the right tokens.
    for (const l of load) {
      const c = await l.done;
      expect(c.finishReason).toBe('length');
      expect(c.outputTokens).toEqual(expected(PROMPTS[l.k]!, l.maxTokens));
    }
    expect(dep.engine.stats().requestsFailed).toBe(0);
    // The steady figure of [0] with no standby chunks (nor engines made ahead): the other devices hold nothing.
    const noStandby = await steadyOf([0], { standbyChunks: false });
    expect(noStandby.slice(1)).toEqual(rt.devices().slice(1).map((d) => d.totalBytes));
    expect(await settledFree(dep, rt)).toEqual(noStandby);
  });

  it('fills the standby chunks ahead (prefillStandby): a scale-up adopts them and copies nothing, with exact bytes; a failed fill or scale loses nothing', async () => {
    const { rt, dep } = await start([0]);
    await dep.settled();
    expect(dep.standby.error).toBeUndefined();
    // Each device outside the layout holds, filled, the 9 chunks a scale-up onto it would copy (dense + 8 experts).
    for (const d of [1, 2, 3]) expect(dep.hmm.store.filledSpares(d), `device ${d}`).toBe(9);
    expect(dep.standby.devices.map((d) => [d.device, d.filled])).toEqual([[1, 9], [2, 9], [3, 9]]);
    const original = await originalSums(dep);
    const before = await checksums(dep);
    const running = dep.submit({ prompt: PROMPTS[2]!, maxTokens: 60, ignoreEos: true });
    // No copy at scale time: a fault on the first device-to-device copy never fires.
    rt.injectFault('CopyDeviceToDevice', 1);
    const r = await dep.scale({ devices: [0, 1] });
    rt.clearFaults();
    expect(r).toMatchObject({ chunksCopied: 9, chunksFromStandby: 9, chunksPrefilled: 9, plannedAhead: true });
    expect(r.bytesPrefilled).toBe(r.bytesCopied);
    expect(r.bytesCopied).toBe(r.lowerBoundBytes);
    await expectCopiesExact(dep, r, before, original);
    // After it, the devices still outside are filled for the next scale-up from [0, 1].
    await dep.settled();
    for (const d of [2, 3]) expect(dep.hmm.store.filledSpares(d), `device ${d}`).toBeGreaterThan(0);
    expect(dep.hmm.store.filledSpares(1)).toBe(0);

    // A fill failing: the work ahead reports it, the spares stay blank, and the scale-up copies them (exact bytes).
    await dep.scale({ devices: [0] });
    rt.injectFault('CopyDeviceToDevice', 1);
    await dep.settled();
    rt.clearFaults();
    expect(dep.standby.error).toBeInstanceOf(FaultInjectedError);
    const filled = [1, 2, 3].map((d) => dep.hmm.store.filledSpares(d));
    expect(filled.some((n) => n < 9)).toBe(true);
    const before2 = await checksums(dep);
    const up = await dep.scale({ devices: [0, 1] });
    expect(up.chunksPrefilled).toBe(filled[0]);
    expect(up.chunksCopied).toBe(9);
    await expectCopiesExact(dep, up, before2, original);

    // A scale failing after it adopted filled chunks rolls back: memory as before, filled again. With the
    // standby engine made ahead nothing of the driver's is left to fail before the switch-over, so the
    // failure is the progress callback's (any error before the switch-over rolls back).
    await dep.scale({ devices: [0] });
    const memory = await settledFree(dep, rt);
    for (const d of [1, 2, 3]) expect(dep.hmm.store.filledSpares(d)).toBe(9);
    expect(dep.standby.engines.map((e) => e.device)).toEqual([1, 2, 3]);
    const boom = new Error('progress callback failed');
    await expect(dep.scale({ devices: [0, 2] }, { onProgress: (p) => {
      if (p.phase === 'attach') throw boom;
    } })).rejects.toBe(boom);
    expect(dep.devices).toEqual([0]);
    expect(await settledFree(dep, rt)).toEqual(memory);
    for (const d of [1, 2, 3]) expect(dep.hmm.store.filledSpares(d)).toBe(9);
    expect(dep.standby.engines.map((e) => e.device)).toEqual([1, 2, 3]);
    // Without standby engines, the standby engine made at scale time failing after the adoption: the same.
    {
      const { rt: r2, dep: d2 } = await start([0], { standbyEngines: false });
      const m2 = await settledFree(d2, r2);
      expect(d2.standby.engines.map((e) => e.device)).toEqual([]);
      r2.injectFault('CreateStream', 1);
      await expect(d2.scale({ devices: [0, 2] })).rejects.toBeInstanceOf(FaultInjectedError);
      r2.clearFaults();
      expect(d2.devices).toEqual([0]);
      expect(await settledFree(d2, r2)).toEqual(m2);
      for (const d of [1, 2, 3]) expect(d2.hmm.store.filledSpares(d)).toBe(9);
    }
    expect((await running).outputTokens).toEqual(expected(PROMPTS[2]!, 60));
  });

  it('keeps standby chunks on the devices outside the layout: a scale-up copies into them, a failed one rolls back and they are made again', async () => {
    // Blank standby chunks (no prefill): the scale-up's copies run into them.
    const { rt, dep } = await start([0], { prefillStandby: false });
    await dep.settled();
    // Devices 1-3 each keep what a scale-up onto them allocates there: its KV pool chunk, the dense chunk and half
    // the experts (1→2).
    const standby = dep.standby;
    expect(standby.error).toBeUndefined();
    expect(standby.devices.map((d) => [d.device, d.chunks, d.filled])).toEqual([[1, 10, 0], [2, 10, 0], [3, 10, 0]]); // blank: no prefill
    expect(dep.hmm.accounting().map((a) => a.spareBytes)).toEqual([0, ...standby.devices.map((d) => d.bytes)]);
    const running = dep.submit({ prompt: PROMPTS[1]!, maxTokens: 60, ignoreEos: true });

    // A copy failing: rolled back, memory (with the standby chunks made again) as before.
    const memory = freeBytes(rt);
    rt.injectFault('CopyDeviceToDevice', 4);
    await expect(dep.scale({ devices: [0, 1] })).rejects.toBeInstanceOf(FaultInjectedError);
    rt.clearFaults();
    expect(dep.devices).toEqual([0]);
    expect(await settledFree(dep, rt)).toEqual(memory);
    expect(dep.standby.devices.map((d) => d.chunks)).toEqual([10, 10, 10]);
    // The standby engine failing while the copies run (they are queued at once here): rolled back the same way.
    rt.injectFault('CreateStream', 1);
    const phases: string[] = [];
    await expect(dep.scale({ devices: [0, 1] }, { onProgress: (p) => phases.push(p.phase) })).rejects.toBeInstanceOf(FaultInjectedError);
    rt.clearFaults();
    expect(phases.filter((p) => p !== 'prepare')).toEqual(['plan', 'attach', 'rollback']);
    expect(dep.devices).toEqual([0]);
    expect(await settledFree(dep, rt)).toEqual(memory);

    // The scale-up takes its KV pool and every target chunk from the standby chunks: the driver creates only scratch.
    const original = await originalSums(dep);
    const before = await checksums(dep);
    const creates: number[] = [];
    for (let nth = 1; nth < 40; nth++) {
      // Count the chunk creations of a scale from a sweep of its first failure (as the rollback test does).
      rt.injectFault('CreateChunk', nth);
      try {
        const r = await dep.scale({ devices: [0, 1] });
        rt.clearFaults();
        expect(r.chunksCopied).toBe(9);
        expect(r.chunksFromStandby).toBe(9);
        expect(r.plannedAhead).toBe(true);
        expect(r.attachDuringCopies).toBe(true);
        expect(r.prepare.options.maxInflightBytes).toBe(Infinity); // queued at once
        expect(r.prepare.stats!.batches).toBe(1);
        for (const c of r.copies) expect([...dep.hmm.store.get(c.targetId).access].sort(), c.targetId).toEqual([0, 1, 2, 3]);
        await expectCopiesExact(dep, r, before, original);
        break;
      } catch (e) {
        rt.clearFaults();
        expect(e).toBeInstanceOf(FaultInjectedError);
        creates.push(nth);
        await dep.settled();
      }
    }
    expect(creates.length).toBeGreaterThan(0);
    expect(creates.length).toBeLessThan(9); // with no standby chunks it is at least 1 + 9 + 2 (the rollback test)
    expect(dep.hmm.store.sparesTaken).toBeGreaterThanOrEqual(10 * (creates.length + 1)); // each attempt took the pool's and the copies'
    // On [0, 1]: device 1 keeps none; 2 and 3 keep what a scale-up onto them from [0, 1] takes (the KV pool chunk,
    // the dense chunk and 2 experts of each layer: the plan deals each layer's 8 experts 3/3/2).
    await dep.settled();
    expect(dep.standby.devices.map((d) => [d.device, d.chunks])).toEqual([[2, 6], [3, 6]]);
    const steady01 = await steadyOf([0, 1], { prefillStandby: false });
    expect(await settledFree(dep, rt)).toEqual(steady01);
    // A scale right after another, with the standby chunks still being made: the scale-down kept device 1's
    // chunks as its standby chunks, bytes and all, so the scale-up back adopts every target with no copy.
    const down = await dep.scale({ devices: [0] });
    expect(down.chunksKeptAsStandby).toBe(9);
    expect(down.chunksReleased).toBe(0);
    const beforeUp = await checksums(dep);
    const r = await dep.scale({ devices: [0, 1] });
    expect(r).toMatchObject({ chunksCopied: 9, chunksFromStandby: 9, chunksPrefilled: 9 });
    await expectCopiesExact(dep, r, beforeUp, original);
    expect(await settledFree(dep, rt)).toEqual(steady01);
    expect((await running).outputTokens).toEqual(expected(PROMPTS[1]!, 60));
    // Turned off while serving: every standby chunk freed, memory as a deployment without them; on again: made again.
    await dep.scale({ devices: [0] });
    await dep.settled();
    const withStandby = freeBytes(rt);
    await dep.setStandbyChunks(false);
    await dep.settled();
    expect(dep.standby.devices).toEqual([]);
    expect(freeBytes(rt)).toEqual(await steadyOf([0], { standbyChunks: false }));
    expect((await dep.scale({ devices: [0, 1] })).chunksFromStandby).toBe(0);
    await dep.scale({ devices: [0] });
    await dep.setStandbyChunks(true);
    expect(await settledFree(dep, rt)).toEqual(withStandby);
    await expect(dep.setStandbyChunks('yes' as unknown as boolean)).rejects.toBeInstanceOf(InvalidArgumentError);
    // A device without the memory for its standby chunks keeps what fit; the others get theirs, and the error is told.
    {
      const { rt: r2, dep: d2 } = await start([0]);
      await d2.settled();
      const want = d2.standby.devices.find((d) => d.device === 2)!;
      await d2.setStandbyChunks(false);
      const g = r2.granularity(2);
      const hog = r2.createChunk(2, Math.floor((r2.deviceInfo(2).freeBytes - want.bytes / 2) / g) * g); // leaves room for about half
      await d2.setStandbyChunks(true);
      const got = d2.standby;
      expect(got.error).toBeInstanceOf(OutOfMemoryError);
      expect(got.devices.map((d) => d.device)).toEqual([1, 2, 3]);
      expect(got.devices[1]!.chunks).toBeLessThan(want.chunks);
      expect(got.devices[2]!.chunks).toBe(want.chunks);
      hog.dispose();
      // Freed memory is used at the next round of the work ahead (after a scale, or turned on again).
      await d2.setStandbyChunks(true);
      expect(d2.standby.error).toBeUndefined();
      expect(d2.standby.devices[1]!.chunks).toBe(want.chunks);
    }
    // Off: nothing kept (the plans are still made ahead); a scale not by one device is planned when asked.
    const { dep: off } = await start([0], { standbyChunks: false });
    await off.settled();
    expect(off.standby.devices).toEqual([]);
    const offUp = await off.scale({ devices: [0, 1] });
    // Its targets made off the main thread: the standby engine made against their reserved addresses meanwhile.
    expect(offUp).toMatchObject({ chunksFromStandby: 0, plannedAhead: true, attachDuringCopies: true, attachBeforeTargets: true });
    await off.settled();
    expect((await off.scale({ devices: [2, 3] })).plannedAhead).toBe(false);
  });

  it('scales back onto a device with no copy: the scale-down keeps its chunks, the next plan puts their experts back there', async () => {
    const { rt, dep } = await start([0, 1, 2, 3]);
    await dep.settled();
    const original = await originalSums(dep);
    const onDevice3 = dep.hmm.store.all().filter((c) => c.plan.kind === 'weight' && c.plan.device === 3).length;
    const fills = vi.spyOn(ChunkStore.prototype, 'fillSpares');
    try {
      const down = await dep.scale({ devices: [0, 1, 2] });
      // Device 3's chunks stay as its standby chunks, their experts' bytes in them; the staying devices free nothing.
      expect(down.chunksKeptAsStandby).toBe(onDevice3);
      expect(down.chunksReleased).toBe(0);
      fills.mockClear();
      await dep.settled();
      // The work ahead plans [0, 1, 2] -> [0, 1, 2, 3] with those experts on device 3 (without them as warm
      // experts the plan takes others: homing device 3's experts interleaved them over 0-2), so its fills copy nothing.
      const copied = await Promise.all(fills.mock.results.map((r) => r.value as Promise<number>));
      expect(copied.reduce((a, n) => a + n, 0)).toBe(0);
      expect(dep.standby.devices.find((d) => d.device === 3)).toMatchObject({ chunks: onDevice3, filled: onDevice3 }); // its KV pool: the standby engine made ahead took it
      const before = await checksums(dep);
      const up = await dep.scale({ devices: [0, 1, 2, 3] });
      expect(up.chunksCopied).toBe(onDevice3);
      expect(up.chunksPrefilled).toBe(onDevice3);
      await expectCopiesExact(dep, up, before, original);
    } finally {
      fills.mockRestore();
    }
  });

  it('frees a leaving chunk it cannot grant every device access to instead of keeping it, and memory still settles at steady', async () => {
    const { rt, dep } = await start([0, 1]);
    await dep.settled();
    const running = dep.submit({ prompt: PROMPTS[0]!, maxTokens: 40, ignoreEos: true });
    // The release's first access grant fails: that chunk is freed, the rest kept; the scale itself succeeds.
    const onProgress = (p: ScaleProgress) => {
      if (p.phase === 'release') rt.injectFault('SetAccess', 1);
    };
    const down = await dep.scale({ devices: [0] }, { onProgress });
    rt.clearFaults();
    const onDevice1 = down.chunksKeptAsStandby + down.chunksReleased;
    expect(down.chunksReleased).toBe(1);
    expect(down.chunksKeptAsStandby).toBe(onDevice1 - 1);
    expect((await running).outputTokens).toEqual(expected(PROMPTS[0]!, 40));
    // The work ahead makes what device 1's standby wants again: memory as a deployment started on [0].
    const fresh = await start([0]);
    expect(await settledFree(dep, rt)).toEqual(await settledFree(fresh.dep, fresh.rt));
  });

  it('after the switch-over, frees that the driver refuses do not undo the scale: reported, the rest released, memory back at steady once retried', async () => {
    for (const op of ['Unmap', 'ReleaseChunk', 'FreeRange']) {
      const { rt, dep } = await start([0, 1]);
      await dep.settled();
      const running = dep.submit({ prompt: PROMPTS[1]!, maxTokens: 40, ignoreEos: true });
      // The release's 2nd and 3rd such calls are refused (the old engine's, a chunk's or a pool's: whichever comes).
      const onProgress = (p: ScaleProgress) => {
        if (p.phase === 'release') {
          rt.injectFault(op, 2);
          rt.injectFault(op, 3);
        }
      };
      const down = await dep.scale({ devices: [0] }, { onProgress });
      rt.clearFaults();
      expect(dep.devices, op).toEqual([0]);
      expect(down.releaseErrors?.length, `${op}: ${JSON.stringify(down.releaseErrors)}`).toBeGreaterThan(0);
      expect(down.releaseErrors!.join('\n')).toMatch(new RegExp(`${op} call #[23]`));
      expect((await running).outputTokens).toEqual(expected(PROMPTS[1]!, 40));
      // Scaling goes on (no KV pool or mapping left behind refuses it), and what was refused is freed at a
      // later free (memory.ts): after a scale-up and back, memory as a deployment started on [0].
      await dep.scale({ devices: [0, 1] });
      await dep.scale({ devices: [0] });
      expect(retryRefusedFrees(), op).toBe(0);
      const fresh = await start([0]);
      expect(await settledFree(dep, rt), op).toEqual(await settledFree(fresh.dep, fresh.rt));
    }
  });

  it('with scaleDownSpares, a scale back down after a scale-up adopts the staying devices\' kept chunks: it copies nothing', async () => {
    const { dep } = await start([0, 1], { scaleDownSpares: true });
    await dep.settled();
    const original = await originalSums(dep);
    await dep.scale({ devices: [0, 1, 2] });
    await dep.settled();
    await dep.scale({ devices: [0, 1, 2, 3] });
    await dep.settled();
    const before = await checksums(dep);
    const down = await dep.scale({ devices: [0, 1, 2] });
    expect(down.chunksCopied).toBeGreaterThan(0);
    expect(down.chunksPrefilled).toBe(down.chunksCopied);
    await expectCopiesExact(dep, down, before, original);
  });

  it('with scaleDownSpares the serving devices keep what a scale-down copies onto them: the scale-down takes them, memory returns to steady', async () => {
    const steadyOf = async (devices: number[]) => {
      const fresh = await start(devices, { scaleDownSpares: true });
      return settledFree(fresh.dep, fresh.rt);
    };
    const { rt, dep } = await start([0, 1, 2], { scaleDownSpares: true });
    await dep.settled();
    // Every device keeps standby chunks now: 0-2 for a scale-down by any one device, 3 for a scale-up.
    expect(dep.standby.devices.map((d) => d.device)).toEqual([0, 1, 2, 3]);
    expect(dep.hmm.accounting().every((a) => a.spareBytes > 0)).toBe(true);
    const running = PROMPTS.slice(0, 3).map((prompt) => dep.submit({ prompt, maxTokens: 60, ignoreEos: true }));
    await sleep(5);
    const down = await dep.scale({ devices: [0, 1] });
    expect(down.chunksCopied).toBeGreaterThan(0);
    expect(down.chunksFromStandby).toBe(down.chunksCopied); // no chunk created at scale time
    expect(down.attachDuringCopies).toBe(true);
    for (const [k, c] of (await Promise.all(running)).entries()) expect(c.outputTokens).toEqual(expected(PROMPTS[k]!, 60));
    // Settled: exactly what a deployment started on [0, 1] with the same options holds.
    expect(await settledFree(dep, rt)).toEqual(await steadyOf([0, 1]));
    // Down to one device: nothing to keep for a scale-down from there; up again takes device 1's standby chunks.
    await dep.scale({ devices: [0] });
    expect(await settledFree(dep, rt)).toEqual(await steadyOf([0]));
    expect(dep.hmm.accounting()[0]!.spareBytes).toBe(0);
    const up = await dep.scale({ devices: [0, 1] });
    expect(up.chunksFromStandby).toBe(up.chunksCopied);
    expect(await settledFree(dep, rt)).toEqual(await steadyOf([0, 1]));
  });

  it('plans a scale with the load observed while serving when asked, and says which load it balanced', async () => {
    const { dep } = await start([0, 1], { observeLoad: { every: 1 } });
    const prompts = PROMPTS.slice(0, 4);
    const want = await referenceTokens(prompts, 24);
    const first = await Promise.all(prompts.map((prompt) => dep.submit({ prompt, maxTokens: 24, ignoreEos: true })));
    expect(first.map((c) => c.outputTokens)).toEqual(want); // observing changes no token
    const observed = await dep.scale({ devices: [0, 1, 2] });
    expect(observed.load.source).toBe('observed');
    expect(observed.load.observedSteps).toBeGreaterThan(0);
    // Bound and plan balance the same (observed) load; with uneven loads the plan may move more than
    // the bound (seen: 14.7 MB against 12.6 MB; how many steps were observed varies with timing), never less.
    expect(observed.bytesCopied).toBeGreaterThanOrEqual(observed.lowerBoundBytes);
    // A load given with the target wins; the new layout's engine starts counting afresh.
    const given = config.experts;
    const skew = Array.from({ length: config.layers }, () => Array.from({ length: given }, (_, e) => (e === 0 ? 10 : 1)));
    const withGiven = await dep.scale({ devices: [0, 1], load: skew });
    expect(withGiven.load).toEqual({ source: 'given' });
    expect(withGiven.bytesCopied).toBeGreaterThanOrEqual(withGiven.lowerBoundBytes);
    // Nothing served since the last switch: nothing observed, so the plan is uniform.
    const uniform = await dep.scale({ devices: [0, 1, 2] });
    expect(uniform.load).toEqual({ source: 'uniform' });
    const again = await Promise.all(prompts.map((prompt) => dep.submit({ prompt, maxTokens: 24, ignoreEos: true })));
    expect(again.map((c) => c.outputTokens)).toEqual(want);
  });

  it('plans with a uniform load by default, even where host-path steps counted the routing', async () => {
    const { dep } = await start([0], { forward: { deviceRoutingMaxRows: 0 } }); // every step on the host path
    await dep.submit({ prompt: PROMPTS[0]!, maxTokens: 4, ignoreEos: true });
    expect((await dep.scale({ devices: [0, 1] })).load).toEqual({ source: 'uniform' });
    await expect(Deployment.start({ rt: openMock({ mockCapacity: 128 * MIB }), config, devices: [0], seed: SEED, scaleFor,
      kvBlocksPerDevice: KV_BLOCKS, observeLoad: { every: 0 } })).rejects.toThrow(/observeLoad\.every/);
  });

  it('serves and scales with an f32 KV cache (forward.kvDtype): f32 pools on every layout, requests move with their KV, the same tokens', async () => {
    const { dep } = await start([0], { forward: { kvDtype: 'f32' } });
    const f32Block = kvGeometry(config, 16, 'f32').blockBytes;
    expect(f32Block).toBe(2 * kvGeometry(config, 16).blockBytes);
    expect(dep.hmm.kv.info(0).blockBytes).toBe(f32Block);
    const prompts = PROMPTS.slice(0, 3);
    const want = (await Promise.all(prompts.map((prompt) => dep.submit({ prompt, maxTokens: MAX, ignoreEos: true })))).map((c) => c.outputTokens);
    // Not the bf16 cache's tokens: the engines ran the f32 kernels.
    expect(want).not.toEqual(await referenceTokens(prompts, MAX));
    const done: Array<Promise<Completion>> = [];
    let wave = false;
    // [0] → [1]: no device shared, so requests generating at the switch move with their (f32) KV blocks.
    const r = await dep.scale({ devices: [1] }, {
      onProgress: (p) => {
        if (p.phase !== 'prepare' || wave) return;
        wave = true;
        for (const prompt of prompts) done.push(dep.submit({ prompt, maxTokens: MAX, ignoreEos: true }));
      },
    });
    expect(r.switchover).toMatchObject({ moved: 3, kept: 0, requeued: 0 });
    expect(dep.hmm.kv.info(1).blockBytes).toBe(f32Block);
    expect((await Promise.all(done)).map((c) => c.outputTokens)).toEqual(want);
  });

  it('refuses impossible targets and a second scale at once, changing nothing', async () => {
    const { rt, dep } = await start([0]);
    const memory = await settledFree(dep, rt);
    const engines = dep.standby.engines;
    await expect(dep.scale({ devices: [0, 7] })).rejects.toThrow(/devices\[1\] must be a device ordinal below 4/);
    await expect(dep.scale({ devices: [] })).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(dep.scale({ devices: [1, 1] })).rejects.toThrow(/distinct devices/);
    await expect(dep.scale({ devices: [0, 1.5] })).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(dep.scale({} as { devices: number[] })).rejects.toBeInstanceOf(InvalidArgumentError);
    // Refused before anything was touched: the standby engines made ahead are still there, not made again.
    expect(dep.standby.engines).toEqual(engines);
    expect(engines.map((e) => e.device)).toEqual([1, 2, 3]);
    expect(freeBytes(rt)).toEqual(memory);
    const first = dep.scale({ devices: [0, 1] });
    await expect(dep.scale({ devices: [0, 1, 2] })).rejects.toThrow(/previous scale/);
    await first;
    expect(dep.devices).toEqual([0, 1]);
    expect(await settledFree(dep, rt)).toEqual(steady.get('0,1'));
  });
});
