// Paced copies of the prepare phase (src/scaling/pacing.ts) on the mock backend:
// byte-exact copies in bounded batches (chunks cut into pieces no larger than a
// batch), target chunks created in groups ahead of the copies rather than all up
// front, all-or-nothing on a failed copy, and a Deployment whose scales are paced
// tightly (or not at all) still serves identical tokens and returns to its memory.
import { describe, expect, it } from 'vitest';

import { targetPlan } from '../../src/hmm/copy-service.js';
import { Hmm } from '../../src/hmm/hmm.js';
import type { TensorSpec } from '../../src/hmm/placement.js';
import { parseConfig } from '../../src/model/config.js';
import { FaultInjectedError, InvalidArgumentError } from '../../src/runtime/errors.js';
import type { Stream } from '../../src/runtime/stream.js';
import { Deployment } from '../../src/scaling/orchestrator.js';
import { type CopyJob, DEFAULT_PREPARE, pacedCopy, resolvePrepare } from '../../src/scaling/pacing.js';
import { GRAN, MIB, openMock } from '../helpers/mock.js';

/** `n` groups of one bf16 tensor of `mib` MiB each, on `device`. */
const groups = (n: number, device: number, mib = 1): TensorSpec[] => Array.from({ length: n }, (_, i) => ({
  name: `g${i}.w`, dtype: 'bf16' as const, shape: [mib * MIB / 2], device, group: `G${i}`,
}));

async function setup(n: number, mib: number) {
  const rt = openMock({ mockCapacity: 256 * MIB });
  const hmm = new Hmm(rt);
  // Sources on devices 0 and 1 (identical bytes: the same seed and names), copies go to device 2.
  await hmm.loadSynthetic([...groups(n, 0, mib), ...groups(n, 1, mib)], { seed: 9n });
  const jobs: CopyJob[] = Array.from({ length: n }, (_, i) => {
    const sources = [hmm.store.get(`G${i}@0`), hmm.store.get(`G${i}@1`)];
    return { plan: targetPlan(sources[0]!.plan, 2), sources };
  });
  return { rt, hmm, jobs };
}

/** Records, in order, each chunk creation group (its size) and each copy queued (its bytes). */
function trace(hmm: Hmm): Array<['alloc', number] | ['copy', number]> {
  const log: Array<['alloc', number] | ['copy', number]> = [];
  const store = hmm.store;
  const allocate = store.allocate.bind(store);
  store.allocate = (plans, holder, access) => {
    log.push(['alloc', plans.length]);
    return allocate(plans, holder, access);
  };
  const stream = store.copyStream.bind(store);
  const wrapped = new Set<Stream>();
  store.copyStream = (from: number, to: number) => {
    const s = stream(from, to);
    if (!wrapped.has(s)) {
      wrapped.add(s);
      const copy = s.copy.bind(s);
      s.copy = (dst, src, bytes) => {
        log.push(['copy', bytes]);
        return copy(dst, src, bytes);
      };
    }
    return s;
  };
  return log;
}

describe('pacedCopy', () => {
  it('copies byte-exact in bounded batches, striped over the sources, chunks cut to the batch size', async () => {
    const { rt, hmm, jobs } = await setup(6, 8);
    const log = trace(hmm);
    const progress: number[] = [];
    // Window 8 MiB = two batches of 4 MiB: each 8 MiB chunk is two 4 MiB stripes (one per source), one batch each.
    const { chunks, stats } = await pacedCopy(hmm.store, jobs, {
      holder: 'x', maxInflightBytes: 8 * MIB, allocateGroup: 2, stripeAlignment: GRAN, onProgress: (p) => progress.push(p.bytesDone),
    });
    expect(chunks.map((c) => c.plan.id)).toEqual(jobs.map((j) => `${j.plan.group}@2`));
    for (const j of jobs) expect(await hmm.store.checksumChunk(`${j.plan.group}@2`)).toBe(await hmm.store.checksumChunk(j.sources[0]!.plan.id));
    expect(stats).toMatchObject({ bytes: 48 * MIB, chunks: 6, batches: 12, pieces: 12 });
    expect(log.filter(([k]) => k === 'copy').every(([, b]) => b <= 4 * MIB)).toBe(true);
    expect(progress.at(-1)).toBe(48 * MIB);
    expect(progress).toEqual([...progress].sort((a, b) => a - b));
    expect(hmm.store.get('G0@2').holders).toEqual(new Set(['x']));
    rt.dispose();
  });

  it('creates target chunks in groups, ahead of the copies but not all up front', async () => {
    const { rt, hmm, jobs } = await setup(40, 2);
    const log = trace(hmm);
    const { stats } = await pacedCopy(hmm.store, jobs, { holder: 'x', maxInflightBytes: 8 * MIB, allocateGroup: 3, allocateAheadBytes: 8 * MIB, offThread: false });
    const allocs = log.flatMap(([k, n], i) => (k === 'alloc' ? [{ i, n }] : []));
    expect(allocs.every((a) => a.n <= 3)).toBe(true);
    expect(allocs.reduce((a, x) => a + x.n, 0)).toBe(40);
    const firstCopy = log.findIndex(([k]) => k === 'copy');
    // Creation runs ahead of the copy front by at most allocateAheadBytes plus one group and one batch, never all first.
    expect(allocs.at(-1)!.i).toBeGreaterThan(firstCopy);
    let created = 0;
    let copied = 0;
    for (const [k, n] of log) {
      if (k === 'alloc') created += n * 2 * MIB;
      else copied += n;
      expect(created - copied).toBeLessThanOrEqual(8 * MIB + 3 * 2 * MIB + 4 * MIB);
    }
    expect(stats.batches).toBe(20); // 2 MiB chunks, one source stripe each (one 2 MiB granule), 4 MiB batches
    rt.dispose();
  });

  it('copies from one source to several targets on a stream per target (their links in parallel)', async () => {
    const { rt, hmm } = await setup(4, 2);
    // Device 0's chunks to devices 2 and 3, two each.
    const jobs: CopyJob[] = [0, 1, 2, 3].map((i) => ({ plan: targetPlan(hmm.store.get(`G${i}@0`).plan, 2 + (i % 2), `G${i}@t`), sources: [hmm.store.get(`G${i}@0`)] }));
    const used = new Map<Stream, Set<number>>();
    const copyStream = hmm.store.copyStream.bind(hmm.store);
    hmm.store.copyStream = (from: number, to: number) => {
      const s = copyStream(from, to);
      const copy = s.copy.bind(s);
      s.copy = (dst, src, bytes) => {
        if (!used.has(s)) used.set(s, new Set());
        used.get(s)!.add(to);
        return copy(dst, src, bytes);
      };
      return s;
    };
    const { chunks } = await pacedCopy(hmm.store, jobs, { holder: 'x' });
    expect([...used.keys()].map((s) => s.device)).toEqual([0, 0]);
    expect([...used.values()].map((t) => [...t])).toEqual([[2], [3]]);
    for (const [i, c] of chunks.entries()) expect(await hmm.store.checksumChunk(c.plan.id)).toBe(await hmm.store.checksumChunk(`G${i}@0`));
    rt.dispose();
  });

  it('pulls a copy whose sources grant the target device access: the target mapped for its own device only, copied on its streams', async () => {
    for (const granted of [false, true]) {
      const { rt, hmm, jobs } = await setup(4, 2);
      if (granted) for (const j of jobs) for (const src of j.sources) hmm.store.grantAccess(src.plan.id, [2]);
      const devices = new Set<number>();
      const copyStream = hmm.store.copyStream.bind(hmm.store);
      hmm.store.copyStream = (on: number, peer: number) => {
        devices.add(on);
        return copyStream(on, peer);
      };
      const { chunks } = await pacedCopy(hmm.store, jobs, { holder: 'x' });
      // Pulled: streams of device 2, targets mapped for device 2 alone. Pushed: the source's stream
      // (2 MiB chunks: one stripe, from the first source), targets mapped for 0, 1 and 2.
      expect([...devices].sort()).toEqual(granted ? [2] : [0]);
      for (const c of chunks) expect([...c.access].sort()).toEqual(granted ? [2] : [0, 1, 2]);
      for (const [i, c] of chunks.entries()) expect(await hmm.store.checksumChunk(c.plan.id)).toBe(await hmm.store.checksumChunk(`G${i}@0`));
      rt.dispose();
    }
  });

  it.each([true, false])('is all or nothing: a failed copy frees every target it created, the sources stay intact (offThread %s)', async (offThread) => {
    const { rt, hmm, jobs } = await setup(10, 2);
    const before = rt.devices().map((d) => d.freeBytes);
    const ids = hmm.store.ids().sort();
    const sum = await hmm.store.checksumChunk('G3@0');
    rt.injectFault('CopyDeviceToDevice', 7);
    await expect(pacedCopy(hmm.store, jobs, { holder: 'x', maxInflightBytes: 4 * MIB, allocateGroup: 2, makeGroup: 3, offThread }))
      .rejects.toBeInstanceOf(FaultInjectedError);
    rt.clearFaults();
    expect(hmm.store.ids().sort()).toEqual(ids);
    expect(hmm.store.pendingCount).toBe(0);
    expect(rt.devices().map((d) => d.freeBytes)).toEqual(before);
    expect(await hmm.store.checksumChunk('G3@0')).toBe(sum);
    // And the same copy then succeeds.
    await pacedCopy(hmm.store, jobs, { holder: 'x' });
    expect(await hmm.store.checksumChunk('G3@2')).toBe(sum);
    rt.dispose();
  });

  it('makes the targets off the main thread: every address final at onReserved, the copies byte-exact, no creation on the loop', async () => {
    const { rt, hmm, jobs } = await setup(20, 2);
    const log = trace(hmm);
    const addresses = new Map<string, bigint>();
    let allocatedSeen = false;
    const { chunks, stats } = await pacedCopy(hmm.store, jobs, {
      holder: 'x', maxInflightBytes: 8 * MIB, makeGroup: 6,
      onReserved: () => {
        // Nothing exists yet; futureTensor resolves every target tensor already.
        expect(hmm.store.pendingCount).toBe(20);
        for (const j of jobs) for (const t of j.plan.tensors) addresses.set(t.name, hmm.store.futureTensor(t.name, 2).address);
      },
      onAllocated: () => (allocatedSeen = true),
    });
    expect(allocatedSeen).toBe(true);
    expect(log.some(([k]) => k === 'alloc')).toBe(false); // never store.allocate on the loop
    expect(stats.makeCalls).toBe(4); // 20 chunks, one device and size: calls of 6, 6, 6, 2
    expect(hmm.store.pendingCount).toBe(0);
    for (const [k, j] of jobs.entries()) {
      expect(chunks[k]!.plan.id).toBe(j.plan.id);
      for (const t of j.plan.tensors) expect(hmm.store.tensor(t.name, 2).ptr.address).toBe(addresses.get(t.name));
      expect(await hmm.store.checksumChunk(j.plan.id)).toBe(await hmm.store.checksumChunk(j.sources[0]!.plan.id));
    }
    rt.dispose();
  });

  it('a chunk the worker thread fails to make fails the copy with nothing left: no chunk, no reserved address, no memory', async () => {
    // In the second call of 5: its 3rd chunk's create, map or set-access.
    for (const [op, nth] of [['CreateChunk', 8], ['Map', 8], ['SetAccess', 8]] as const) {
      const { rt, hmm, jobs } = await setup(12, 2);
      const before = rt.devices().map((d) => d.freeBytes);
      const ids = hmm.store.ids().sort();
      rt.injectFault(op, nth);
      await expect(pacedCopy(hmm.store, jobs, { holder: 'x', maxInflightBytes: 4 * MIB, makeGroup: 5 })).rejects.toBeInstanceOf(FaultInjectedError);
      rt.clearFaults();
      expect(hmm.store.ids().sort()).toEqual(ids);
      expect(hmm.store.pendingCount).toBe(0);
      expect(rt.devices().map((d) => d.freeBytes)).toEqual(before);
      // A plan id the store is making is not new: a second allocation of it is refused, taking nothing.
      const off = hmm.store.allocateOffThread([jobs[0]!.plan], 'y');
      expect(() => hmm.store.allocateOffThread([jobs[0]!.plan], 'z')).toThrow(/exists/);
      await off.until(1);
      expect(hmm.store.get(jobs[0]!.plan.id).holders).toEqual(new Set(['y']));
      rt.dispose();
    }
  });

  it('whenStored: waits for a chunk being made; rejects once its making fails or is cancelled, and for an unknown id', async () => {
    const { rt, hmm, jobs } = await setup(12, 2);
    const plans = jobs.map((j) => j.plan);
    await expect(hmm.store.whenStored('no-such-chunk')).rejects.toThrow(/no chunk/);
    await expect(hmm.store.whenStored(jobs[0]!.sources[0]!.plan.id)).resolves.toBeUndefined(); // stored already
    // Made: resolves once stored, the manifest listing it meanwhile.
    const off = hmm.store.allocateOffThread(plans.slice(0, 6), 'a', undefined, { group: 2 });
    expect(hmm.store.isPending(plans[5]!.id)).toBe(true);
    expect(hmm.manifest().chunks.map((c) => c.id)).toContain(plans[5]!.id);
    const last = hmm.store.whenStored(plans[5]!.id).then(() => hmm.store.has(plans[5]!.id));
    expect(await last).toBe(true);
    await off.until(6);
    // A failed making rejects the waiters of what it did not make, before anyone cancels.
    rt.injectFault('CreateChunk', 3);
    const failing = hmm.store.allocateOffThread(plans.slice(6), 'b', undefined, { group: 2 });
    const waits = plans.slice(6).map((p) => hmm.store.whenStored(p.id).then(() => 'stored', (e: Error) => e.constructor.name));
    const got = await Promise.all(waits);
    rt.clearFaults();
    expect(got.slice(0, 2)).toEqual(['stored', 'stored']);
    expect(got.slice(2).every((x) => x === 'FaultInjectedError')).toBe(true);
    // Asked after the failure, before the cancel: rejected at once, not left waiting for the cancel.
    await expect(hmm.store.whenStored(plans[11]!.id)).rejects.toBeInstanceOf(FaultInjectedError);
    await failing.cancel();
    expect(hmm.store.pendingCount).toBe(0);
    // Cancelled before it is made (one chunk per call: the cancel comes while the first is made): its waiter learns it is not coming.
    const again = hmm.store.allocateOffThread(plans.slice(6, 8), 'c', undefined, { group: 1 });
    const wait = hmm.store.whenStored(plans[7]!.id).then(() => 'stored', (e: Error) => e.message);
    await again.cancel();
    expect(await wait).toMatch(/was not made \(its allocation was cancelled\)/);
    expect(hmm.store.has(plans[7]!.id)).toBe(false);
    rt.dispose();
  });

  it('queues one batch\'s copies in groups of queueGroup with a turn of the loop between them', async () => {
    const { rt, hmm, jobs } = await setup(24, 2);
    // One batch (no window): 24 copies. Count the turns the loop gets while they are queued.
    const turns = async (queueGroup?: number) => {
      const log = trace(hmm);
      let n = 0;
      let counting = true;
      const between: number[] = []; // copies queued at each turn that came in the middle of the batch
      const tick = () => {
        if (!counting) return;
        n++;
        const copies = log.filter(([k]) => k === 'copy').length;
        if (copies > 0 && copies < 24) between.push(copies);
        setImmediate(tick);
      };
      setImmediate(tick);
      const { stats } = await pacedCopy(hmm.store, jobs, {
        holder: `q${queueGroup ?? 'all'}`, maxInflightBytes: Infinity, allocateGroup: 64, ...(queueGroup ? { queueGroup } : {}),
      });
      counting = false;
      for (const j of jobs) hmm.store.release(`${j.plan.group}@2`, `q${queueGroup ?? 'all'}`); // the targets, for the next run
      return { between, stats };
    };
    const all = await turns();
    expect(all.between).toEqual([]); // queued in one go
    expect(all.stats.queueMaxBlockMs).toBeGreaterThan(0);
    const grouped = await turns(5);
    expect(grouped.between).toEqual([5, 10, 15, 20]); // a turn after every 5 copies
    rt.dispose();
  });

  it('checks its options', () => {
    expect(resolvePrepare()).toEqual({ ...DEFAULT_PREPARE, allocateAheadBytes: DEFAULT_PREPARE.maxInflightBytes });
    expect(resolvePrepare({ maxInflightBytes: Infinity }, { bytesPerMs: 1e6 })).toMatchObject({ maxInflightBytes: Infinity, bytesPerMs: 1e6 });
    for (const bad of [{ maxInflightBytes: 0 }, { bytesPerMs: -1 }, { allocateGroup: 1.5 }, { yieldMs: -1 }, { paced: 'yes' as unknown as boolean },
      { queueGroup: 0 }, { queueGroup: 2.5 }]) {
      expect(() => resolvePrepare(bad)).toThrow(InvalidArgumentError);
    }
  });
});

describe('Deployment with a paced prepare phase', () => {
  const config = parseConfig({
    model_type: 'qwen3_moe', hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16,
    vocab_size: 97, num_experts: 8, moe_intermediate_size: 32, norm_topk_prob: true, num_experts_per_tok: 2, max_position_embeddings: 256,
  });
  const prompts = Array.from({ length: 6 }, (_, k) => Array.from({ length: 4 + k * 3 }, (_, i) => (i * 13 + k * 29 + 1) % 97));

  it('keeps the serving loop stepping through the prepare phase (the CopyService path stalls it)', async () => {
    // 4 layers × 64 experts: a 1 → 2 scale copies 117 chunks (234 MiB). The CopyService waits on every
    // copy with its own thread-pool job, so the engine's waits queue behind them: one step spans most of
    // the prepare phase (230–440 ms steps in 270–530 ms, 7–35 steps in it). Paced, the steps go on
    // (150–230 steps, none over 35 ms).
    const big = parseConfig({
      model_type: 'qwen3_moe', hidden_size: 64, num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16,
      vocab_size: 97, num_experts: 64, moe_intermediate_size: 32, norm_topk_prob: true, num_experts_per_tok: 2, max_position_embeddings: 512,
    });
    const rt = openMock({ mockCapacity: 1024 * MIB });
    const steps: Array<{ t: number; ms: number }> = [];
    // No standby chunks: the chunks are created in the prepare phase, as the pacing is about.
    const dep = await Deployment.start({ rt, config: big, devices: [0], seed: 1n, kvBlocksPerDevice: 128, standbyChunks: false,
      onStep: (f) => steps.push({ t: performance.now(), ms: f.ms }) });
    const running = Array.from({ length: 4 }, (_, k) => dep.submit({ prompt: [1, 2, 3 + k], maxTokens: 450, ignoreEos: true }));
    while (steps.length < 10) await new Promise((r) => setTimeout(r, 1));
    let prepareStart = 0;
    let prepareEnd = 0;
    const r = await dep.scale({ devices: [0, 1] }, {
      onProgress: (p) => {
        if (p.phase === 'prepare' && prepareStart === 0) prepareStart = performance.now();
        // The targets are made and copied while the standby engine is made: the window ends at the switch-over.
        if (p.phase === 'switch') prepareEnd = performance.now();
      },
    });
    expect(r.chunksCopied).toBe(117);
    expect(r.attachBeforeTargets).toBe(true);
    const during = steps.filter((s) => s.t > prepareStart && s.t <= prepareEnd);
    const longest = Math.max(...steps.filter((s) => s.t > prepareStart).map((s) => s.ms));
    expect(during.length, `steps during a ${(prepareEnd - prepareStart).toFixed(0)} ms prepare phase`).toBeGreaterThanOrEqual(40);
    expect(longest, 'longest step from the prepare phase on').toBeLessThan((prepareEnd - prepareStart) / 3);
    await Promise.all(running.map((p) => p.then((c) => expect(c.finishReason).toBe('length'))));
    await dep.close();
    rt.dispose();
  });

  it('serves the same tokens with tight pacing, no pacing and a rate cap, and returns to the steady memory', async () => {
    const rts = [openMock({ mockCapacity: 128 * MIB }), openMock({ mockCapacity: 128 * MIB })];
    const ref = await Deployment.start({ rt: rts[0]!, config, devices: [0], seed: 3n, kvBlocksPerDevice: 64 });
    const want = await Promise.all(prompts.map((prompt) => ref.submit({ prompt, maxTokens: 40, ignoreEos: true })));
    await ref.settled(); // with its standby chunks
    const steady = rts[0]!.devices().map((d) => d.freeBytes);
    await ref.close();

    const rt = rts[1]!;
    const dep = await Deployment.start({ rt, config, devices: [0], seed: 3n, kvBlocksPerDevice: 64, prepare: { maxInflightBytes: 4 * MIB, allocateGroup: 2 } });
    const done = prompts.map((prompt) => dep.submit({ prompt, maxTokens: 40, ignoreEos: true }));
    const up = await dep.scale({ devices: [0, 1, 2] });
    expect(up.prepare.options).toMatchObject({ paced: true, maxInflightBytes: 4 * MIB, allocateGroup: 2 });
    expect(up.prepare.stats!.batches).toBeGreaterThan(4);
    expect(up.prepare.stats!.bytes).toBe(up.bytesCopied);
    const down = await dep.scale({ devices: [0, 1] }, { prepare: { paced: false } });
    expect(down.prepare.stats).toBeUndefined();
    const last = await dep.scale({ devices: [0] }, { prepare: { bytesPerMs: MIB / 16, maxInflightBytes: 4 * MIB } }); // 2 MiB batches, one per 32 ms
    expect(last.prepare.stats!.throttleMs).toBeGreaterThan(0);
    const { prepareMs, attachMs, copyWaitMs } = last.phases;
    expect(prepareMs + attachMs + copyWaitMs).toBeGreaterThanOrEqual((last.bytesCopied - 4 * MIB) / (MIB / 16) - 1);
    const got = await Promise.all(done);
    got.forEach((c, i) => expect(c.outputTokens, `prompt ${i}`).toEqual(want[i]!.outputTokens));
    await dep.settled();
    expect(rt.devices().map((d) => d.freeBytes)).toEqual(steady);
    await dep.close();
    for (const r of rts) r.dispose();
  });
});
