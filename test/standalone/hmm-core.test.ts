// The in-process HMM: placement (pure), the chunk store, synthetic fills, KV pools.
import { describe, expect, it } from 'vitest';

import { ChunkStore } from '../../src/hmm/chunk-store.js';
import { Hmm } from '../../src/hmm/hmm.js';
import { KvExhaustedError } from '../../src/hmm/kv-pool.js';
import { type TensorSpec, planChunks } from '../../src/hmm/placement.js';
import { tensorSeed } from '../../src/hmm/synthetic.js';
import { FaultInjectedError, InvalidArgumentError, checksumU32, uniformBf16 } from '../../src/index.js';
import { GRAN, MIB, openMock, sameBytes } from '../helpers/mock.js';

function expertSpecs(layers: number, experts: number, hidden: number, inter: number, devices: number[]): TensorSpec[] {
  const specs: TensorSpec[] = [];
  for (let l = 0; l < layers; l++) {
    specs.push({ name: `l${l}.attn.qkv`, dtype: 'bf16', shape: [hidden * 3, hidden], device: devices[0]!, group: 'dense', packing: 'packed' });
    specs.push({ name: `l${l}.norm`, dtype: 'bf16', shape: [hidden], device: devices[0]!, group: 'dense', packing: 'packed' });
    for (let e = 0; e < experts; e++) {
      const device = devices[e % devices.length]!;
      for (const p of ['gate', 'up', 'down']) {
        specs.push({ name: `l${l}.e${e}.${p}`, dtype: 'bf16', shape: p === 'down' ? [hidden, inter] : [inter, hidden], device, group: `L${l}.E${e}` });
      }
    }
  }
  return specs;
}

describe('chunk placement (pure)', () => {
  it('gives each expert one granularity-aligned chunk and packs dense weights', () => {
    const specs = expertSpecs(2, 4, 256, 512, [0, 1]);
    const plans = planChunks(specs, { granularity: GRAN, maxSharedChunkBytes: 4 * MIB });
    const experts = plans.filter((p) => p.group.startsWith('L'));
    expect(experts).toHaveLength(8);
    for (const p of experts) {
      expect(p.size % GRAN).toBe(0);
      expect(p.tensors.map((t) => t.name.split('.').pop())).toEqual(['gate', 'up', 'down']);
      expect(p.device).toBe(Number(p.group.split('.E')[1]) % 2);
      // tensors do not overlap and fit
      const end = Math.max(...p.tensors.map((t) => t.offset + t.bytes));
      expect(end).toBeLessThanOrEqual(p.size);
      expect(p.tensors[1]!.offset).toBeGreaterThanOrEqual(p.tensors[0]!.offset + p.tensors[0]!.bytes);
    }
    const dense = plans.filter((p) => p.group === 'dense');
    const denseBytes = specs.filter((s) => s.group === 'dense').reduce((a, s) => a + s.shape.reduce((x, y) => x * y, 2), 0);
    expect(dense.length).toBe(1);
    expect(dense[0]!.size).toBe(Math.ceil(denseBytes / GRAN) * GRAN);
    expect(planChunks(specs, { granularity: GRAN })).toEqual(planChunks(specs, { granularity: GRAN }));
  });

  it('splits packed groups at the size bound, never a single group', () => {
    const big: TensorSpec[] = Array.from({ length: 6 }, (_, i) => ({ name: `w${i}`, dtype: 'bf16', shape: [1024, 1024], device: 0, group: 'dense', packing: 'packed' }));
    const plans = planChunks(big, { granularity: GRAN, maxSharedChunkBytes: 4 * MIB });
    expect(plans.map((p) => p.tensors.length)).toEqual([2, 2, 2]);
    expect(plans.map((p) => p.id)).toEqual(['dense@0#0', 'dense@0#1', 'dense@0#2']);
    const single = planChunks(big.map((s) => ({ ...s, group: 'E', packing: 'single' as const })), { granularity: GRAN, maxSharedChunkBytes: 4 * MIB });
    expect(single).toHaveLength(1);
    expect(single[0]!.size).toBe(12 * MIB);
  });

  it('rejects bad specs naming the field', () => {
    const ok: TensorSpec = { name: 'a', dtype: 'bf16', shape: [2], device: 0, group: 'g' };
    expect(() => planChunks([ok, ok], { granularity: GRAN })).toThrow(/a appears twice on device 0/);
    expect(() => planChunks([{ ...ok, dtype: 'f7' as never }], { granularity: GRAN })).toThrow(/a\.dtype/);
    expect(() => planChunks([{ ...ok, shape: [1.5] }], { granularity: GRAN })).toThrow(InvalidArgumentError);
  });
});

describe('chunk store and synthetic weights', () => {
  it('fills on the device, bit-identical to the host reference, with device checksums', async () => {
    const rt = openMock();
    const hmm = new Hmm(rt);
    const specs = expertSpecs(1, 2, 64, 128, [0, 1]);
    await hmm.loadSynthetic(specs, { seed: 42n });
    const t = hmm.store.tensor('l0.e1.up');
    expect(t.chunk.plan.device).toBe(1);
    const bytes = await rt.read(t.ptr, t.location.bytes, hmm.store.stream(1));
    const expected = uniformBf16(128 * 64, tensorSeed(42n, 'l0.e1.up'), 0.02);
    expect(sameBytes(bytes, new Uint8Array(expected.buffer))).toBe(true);
    expect(await hmm.store.checksumTensor('l0.e1.up')).toBe(checksumU32(bytes));
    // A different seed gives different weights.
    const other = new Hmm(openMock());
    await other.loadSynthetic(specs, { seed: 43n });
    expect(await other.store.checksumTensor('l0.e1.up')).not.toBe(await hmm.store.checksumTensor('l0.e1.up'));
    // Norms (1-D) get scale 1.0
    const norm = await rt.read(hmm.store.tensor('l0.norm').ptr, 128, hmm.store.stream(0));
    expect(sameBytes(norm, new Uint8Array(uniformBf16(64, tensorSeed(42n, 'l0.norm'), 1.0).buffer))).toBe(true);
  });

  it('accounts by kind and gives every byte back', async () => {
    const rt = openMock();
    const before = rt.devices().map((d) => d.freeBytes);
    const hmm = new Hmm(rt);
    const chunks = await hmm.loadSynthetic(expertSpecs(1, 4, 64, 128, [0, 1]));
    hmm.kv.createPool({ device: 1, blockBytes: 64 * 1024, blocks: 100 });
    const acc = hmm.accounting();
    const weights0 = chunks.filter((c) => c.plan.device === 0).reduce((a, c) => a + c.plan.size, 0);
    expect(acc[0]!.weightBytes).toBe(weights0);
    expect(acc[1]!.kvBytes).toBe(Math.ceil((100 * 64 * 1024) / GRAN) * GRAN);
    expect(acc[0]!.freeBytes).toBe(before[0]! - weights0);
    hmm.dispose();
    expect(rt.devices().map((d) => d.freeBytes)).toEqual(before);
  });

  it('allocates all or nothing: a failure midway frees what the call made', () => {
    const rt = openMock({ mockCapacity: 8 * MIB });
    const store = new ChunkStore(rt);
    const plan = (id: string, device: number) => ({ id, group: id, device, kind: 'weight' as const, size: 4 * MIB, tensors: [] });
    expect(() => store.allocate([plan('a', 0), plan('b', 0), plan('c', 0)])).toThrow(/out of memory|OUT_OF_MEMORY/i);
    expect(store.size).toBe(0);
    expect(rt.deviceInfo(0).freeBytes).toBe(8 * MIB);
    rt.injectFault('SetAccess', 2);
    expect(() => store.allocate([plan('a', 0), plan('b', 1)])).toThrow(FaultInjectedError);
    expect(store.size).toBe(0);
    expect(rt.devices().map((d) => d.freeBytes)).toEqual(new Array(4).fill(8 * MIB));
  });

  it('grants more devices access to a chunk\'s mapping: the union, once; a failed grant changes nothing', async () => {
    const rt = openMock();
    const store = new ChunkStore(rt);
    const [c] = store.allocate([{ id: 'a', group: 'a', device: 1, kind: 'weight', size: GRAN, tensors: [] }]);
    expect([...c!.access]).toEqual([1]);
    // Device 0 may not touch it yet: a kernel reading it from device 0 is an illegal address.
    const s0 = rt.createStream(0);
    s0.memset(c!.range.at(0), 7, 64);
    await expect(s0.synchronize()).rejects.toThrow();
    rt.resetDevice(0);
    const s = rt.createStream(0);
    rt.injectFault('SetAccess', 1);
    expect(() => store.grantAccess('a', [0])).toThrow(FaultInjectedError);
    expect([...c!.access]).toEqual([1]);
    expect(store.grantAccess('a', [0, 1])).toBe(true);
    expect([...c!.access].sort()).toEqual([0, 1]);
    expect(store.grantAccess('a', [1, 0])).toBe(false); // nothing new: no driver call
    s.memset(c!.range.at(0), 7, 64);
    await s.synchronize();
  });

  it('keeps spare chunks: allocate takes one matching device, size and access with no driver call; trimmed, counted, freed', async () => {
    const rt = openMock({ mockCapacity: 64 * MIB });
    const store = new ChunkStore(rt);
    const plan = (id: string, device: number, size = 2 * GRAN) => ({ id, group: id, device, kind: 'weight' as const, size, tensors: [] });
    store.addSpares(1, 2 * GRAN, 3, [0]);
    expect(store.spareCount(1)).toBe(3);
    // Whether they could serve a set of requests at once: count, size, device and access all matter.
    const req = (n: number, access = [1], size = 2 * GRAN, device = 1) => Array.from({ length: n }, () => ({ device, size, access }));
    expect(store.sparesCover(req(3, [1, 0]))).toBe(true);
    expect(store.sparesCover(req(4))).toBe(false);
    expect(store.sparesCover(req(1, [1, 2]))).toBe(false);
    expect(store.sparesCover(req(1, [1], GRAN))).toBe(false);
    expect(store.sparesCover(req(1, [2], 2 * GRAN, 2))).toBe(false);
    expect(store.sparesCover([])).toBe(true);
    expect(store.accounting()[1]!.spareBytes).toBe(6 * GRAN);
    expect(store.accounting()[1]!.weightBytes).toBe(0);
    expect(rt.deviceInfo(1).freeBytes).toBe(64 * MIB - 6 * GRAN);
    // A match calls no driver function: each of them would fail now.
    for (const op of ['CreateChunk', 'ReserveRange', 'Map', 'SetAccess']) rt.injectFault(op, 1);
    const [a] = store.allocate([plan('a', 1)], 'h', () => [1, 0]);
    rt.clearFaults();
    expect(store.sparesTaken).toBe(1);
    expect(store.spareCount(1)).toBe(2);
    expect([...a!.access].sort()).toEqual([0, 1]);
    expect(rt.deviceInfo(1).freeBytes).toBe(64 * MIB - 6 * GRAN); // the same bytes, now a's
    // Mapped with access for device 0 already: a copy issued there may write it.
    const s0 = rt.createStream(0);
    s0.memset(a!.range.at(0), 9, 64);
    await s0.synchronize();
    // No match: another size, another device, or an access the spares do not cover: created anew.
    store.allocate([plan('b', 1, GRAN), plan('c', 2)]);
    store.allocate([plan('d', 1)], 'h', () => [1, 2]);
    expect(store.spareCount(1)).toBe(2);
    expect(store.sparesTaken).toBe(1);
    // The device's own access is always covered.
    store.allocate([plan('e', 1)]);
    expect(store.spareCount(1)).toBe(1);
    expect(store.spareSizes(1)).toEqual(new Map([[2 * GRAN, 1]]));
    // Trimmed beyond `keep`; all or nothing on failure; bad arguments named.
    expect(store.trimSpares(1, 0)).toBe(1);
    expect(store.spareCount(1)).toBe(0);
    expect(() => store.addSpares(3, 16 * MIB, 5)).toThrow(/out of memory|OUT_OF_MEMORY/i);
    expect(store.spareCount(3)).toBe(0);
    expect(rt.deviceInfo(3).freeBytes).toBe(64 * MIB);
    expect(() => store.addSpares(3, GRAN + 1, 1)).toThrow(InvalidArgumentError);
    expect(() => store.addSpares(3, GRAN, -1)).toThrow(InvalidArgumentError);
    // dispose frees the spares with the chunks.
    store.addSpares(3, GRAN, 2);
    store.dispose();
    expect(rt.devices().map((d) => d.freeBytes)).toEqual(new Array(4).fill(64 * MIB));
  });

  it('makes spares off the main thread in calls: the same spares as addSpares; a failed call keeps the calls before it and frees its addresses', async () => {
    const rt = openMock({ mockCapacity: 64 * MIB });
    const store = new ChunkStore(rt);
    expect(await store.addSparesOffThread(1, 2 * GRAN, 5, [0], { group: 2 })).toBe(5);
    expect(store.spareCount(1)).toBe(5);
    expect(store.sparesCover(Array.from({ length: 5 }, () => ({ device: 1, size: 2 * GRAN, access: [0, 1] })))).toBe(true);
    expect(rt.deviceInfo(1).freeBytes).toBe(64 * MIB - 10 * GRAN);
    // Taken by allocate with no driver call, as those of addSpares.
    for (const op of ['CreateChunk', 'ReserveRange', 'Map', 'SetAccess']) rt.injectFault(op, 1);
    const [a] = store.allocate([{ id: 'a', group: 'a', device: 1, kind: 'weight' as const, size: 2 * GRAN, tensors: [] }], 'h', () => [1, 0]);
    rt.clearFaults();
    const s0 = rt.createStream(0);
    s0.memset(a!.range.at(0), 3, 64);
    await s0.synchronize();
    // The third call of 2 fails at its first chunk: 4 spares stay, the rest of the addresses are freed.
    rt.injectFault('CreateChunk', 5);
    await expect(store.addSparesOffThread(2, GRAN, 6, [2], { group: 2 })).rejects.toThrow(FaultInjectedError);
    rt.clearFaults();
    expect(store.spareCount(2)).toBe(4);
    expect(rt.deviceInfo(2).freeBytes).toBe(64 * MIB - 4 * GRAN);
    await expect(store.addSparesOffThread(2, GRAN + 1, 1)).rejects.toThrow(InvalidArgumentError);
    expect(await store.addSparesOffThread(2, GRAN, 0)).toBe(0);
    store.release('a', 'h');
    store.dispose();
    expect(rt.devices().map((d) => d.freeBytes)).toEqual(new Array(4).fill(64 * MIB));
  });

  it('fills spares ahead with a chunk\'s bytes: adoptFilled takes the one filled as that id, allocate prefers blank ones, keep lets stale ones be refilled', async () => {
    const rt = openMock({ mockCapacity: 64 * MIB });
    const store = new ChunkStore(rt);
    const plan = (id: string, device: number, size = GRAN) => ({ id, group: id, device, kind: 'weight' as const, size, tensors: [] });
    const [x, y] = store.allocate([plan('x@0', 0), plan('y@0', 0)]);
    const s0 = rt.createStream(0);
    s0.memset(x!.range.at(0), 0x11, GRAN).memset(y!.range.at(0), 0x22, GRAN);
    await s0.synchronize();
    store.addSpares(1, GRAN, 3, [0, 1]);
    // Two filled, one skipped for want of a blank spare of its size; a second fill of the same id is skipped.
    const [z] = store.allocate([plan('z@0', 0, 2 * GRAN)]);
    expect(await store.fillSpares(1, [{ id: 'x@1', source: x! }, { id: 'y@1', source: y! }, { id: 'z@1', source: z! }])).toBe(2);
    expect(await store.fillSpares(1, [{ id: 'x@1', source: x! }])).toBe(0);
    expect(store.filledSpares(1)).toBe(2);
    // Adopted with no copy (a copy would fail now), holding the source's bytes.
    rt.injectFault('CopyDeviceToDevice', 1);
    const a = store.adoptFilled(plan('y@1', 1), 'h', [1, 0]);
    rt.clearFaults();
    expect(a).toBeDefined();
    expect(store.filledTakenCount).toBe(1);
    expect(await store.checksumChunk('y@1')).toBe(await store.checksumChunk('y@0'));
    // None filled as that id: undefined (the caller copies), and nothing taken.
    expect(store.adoptFilled(plan('q@1', 1), 'h')).toBeUndefined();
    expect(store.spareCount(1)).toBe(2);
    // A plain allocate takes the blank spare first, then a filled one (blank from then on).
    store.allocate([plan('b1@1', 1)]);
    expect(store.filledSpares(1)).toBe(1);
    store.allocate([plan('b2@1', 1)]);
    expect(store.filledSpares(1)).toBe(0);
    expect(store.adoptFilled(plan('x@1', 1), 'h')).toBeUndefined();
    // keep: a spare holding an id no longer wanted is refilled.
    store.addSpares(1, GRAN, 1, [0, 1]);
    expect(await store.fillSpares(1, [{ id: 'x@1', source: x! }])).toBe(1);
    expect(await store.fillSpares(1, [{ id: 'y@1-next', source: y! }])).toBe(0);
    expect(await store.fillSpares(1, [{ id: 'y@1-next', source: y! }], new Set(['y@1-next']))).toBe(1);
    expect(store.adoptFilled(plan('x@1', 1), 'h')).toBeUndefined();
    const next = store.adoptFilled(plan('y@1-next', 1), 'h');
    expect(await store.checksumChunk(next!.plan.id)).toBe(await store.checksumChunk('y@0'));
    // A failed fill copy: rejected, the spare left blank and usable.
    store.addSpares(1, GRAN, 1, [0, 1]);
    rt.injectFault('CopyDeviceToDevice', 1);
    await expect(store.fillSpares(1, [{ id: 'x@1', source: x! }])).rejects.toBeInstanceOf(FaultInjectedError);
    rt.clearFaults();
    expect(store.filledSpares(1)).toBe(0);
    expect(store.spareCount(1)).toBe(1);
    expect(await store.fillSpares(1, [{ id: 'x@1', source: x! }])).toBe(1);
    // filledRange: the mapping adoptFilled then registers (a standby engine made ahead reads through it);
    // none for another device, an id not filled, or once taken or freed.
    const range = store.filledRange('x@1', 1)!;
    expect(range).toBeDefined();
    expect(store.filledRange('x@1', 0)).toBeUndefined();
    expect(store.filledRange('nope@1', 1)).toBeUndefined();
    expect(store.adoptFilled(plan('x@1', 1), 'h')!.range).toBe(range);
    expect(store.filledRange('x@1', 1)).toBeUndefined();
    store.addSpares(1, GRAN, 1, [0, 1]);
    expect(await store.fillSpares(1, [{ id: 'w@1', source: y! }])).toBe(1);
    expect(store.filledRange('w@1', 1)).toBeDefined();
    store.trimSpares(1);
    expect(store.filledRange('w@1', 1)).toBeUndefined();
    store.dispose();
  });

  it('keeps a released chunk as a spare filled as its own id (release asSpare), and trims wanted fills last', async () => {
    const plan = (id: string, device: number) => ({ id, group: id, device, kind: 'weight' as const, size: GRAN, tensors: [] });
    const rt = openMock();
    const store = new ChunkStore(rt);
    const s1 = rt.createStream(1);
    const [k, u, v] = store.allocate([plan('k@1', 1), plan('u@1', 1), plan('v@1', 1)], 'old');
    s1.memset(k!.range.at(0), 0x33, GRAN);
    await s1.synchronize();
    const sum = await store.checksumChunk('k@1');
    const free = rt.deviceInfo(1).freeBytes;
    // Held by another holder too: not released at all, so not kept.
    store.retain('k@1', 'other');
    expect(store.release('k@1', 'old', { asSpare: true })).toBe(false);
    expect(store.release('k@1', 'other', { asSpare: true })).toBe(true);
    // Nobody holds it: no chunk any more, its memory still in use, a spare filled as 'k@1' with its bytes.
    expect(store.has('k@1')).toBe(false);
    expect(rt.deviceInfo(1).freeBytes).toBe(free);
    expect(store.spareCount(1)).toBe(1);
    expect(store.filledSpares(1)).toBe(1);
    expect(store.filledRange('k@1', 1)).toBe(k!.range);
    // A fill of that id skips it (no copy: one would fail now); adoptFilled takes it, bytes and mapping as they were.
    rt.injectFault('CopyDeviceToDevice', 1);
    expect(await store.fillSpares(1, [{ id: 'k@1', source: u! }])).toBe(0);
    rt.clearFaults();
    const again = store.adoptFilled(plan('k@1', 1), 'new');
    expect(again!.range).toBe(k!.range);
    expect(await store.checksumChunk('k@1')).toBe(sum);
    // Trimming: blank spares go first, then those holding an id not wanted, the wanted ones last.
    store.release('u@1', 'old', { asSpare: true });
    store.release('v@1', 'old', { asSpare: true });
    store.addSpares(1, GRAN, 1, [1]);
    expect([store.spareCount(1), store.filledSpares(1)]).toEqual([3, 2]);
    expect(store.trimSpares(1, 2, undefined, new Set(['u@1']))).toBe(1);
    expect([store.spareCount(1), store.filledSpares(1)]).toEqual([2, 2]);
    expect(store.trimSpares(1, 1, undefined, new Set(['u@1']))).toBe(1);
    expect(store.filledRange('u@1', 1)).toBeDefined();
    expect(store.filledRange('v@1', 1)).toBeUndefined();
    expect(store.trimSpares(1)).toBe(1);
    expect(rt.deviceInfo(1).freeBytes).toBe(free + 2 * GRAN);
    store.dispose();
  });

  it('frees a chunk only when its last holder lets go', async () => {
    const rt = openMock();
    const hmm = new Hmm(rt);
    const [c] = await hmm.loadSynthetic([{ name: 'x', dtype: 'f32', shape: [1024], device: 2, group: 'x' }]);
    const free0 = rt.deviceInfo(2).freeBytes;
    const s1 = hmm.openSession('a');
    const s2 = hmm.openSession('b');
    s1.attach([c!.plan.id]);
    s2.attach([c!.plan.id]);
    expect(hmm.releaseResident([c!.plan.id])).toEqual([]);
    expect(s1.end()).toEqual([]);
    expect(rt.deviceInfo(2).freeBytes).toBe(free0);
    expect(s2.end()).toEqual([c!.plan.id]);
    expect(rt.deviceInfo(2).freeBytes).toBe(free0 + GRAN);
  });
});

describe('KV pools', () => {
  it('keeps the block table, refuses when exhausted, and frees', () => {
    const hmm = new Hmm(openMock());
    const info = hmm.kv.createPool({ device: 0, blockBytes: 1024 * 1024, blocks: 5, maxChunkBytes: 2 * MIB });
    expect(info.blocksPerChunk).toBe(2);
    expect(info.chunkIds).toHaveLength(3);
    expect(hmm.kv.allocate('r1', 0, 3)).toEqual([0, 1, 2]);
    expect(hmm.kv.allocate('r1', 0, 1)).toEqual([3]);
    expect(() => hmm.kv.allocate('r2', 0, 2)).toThrow(KvExhaustedError);
    expect(hmm.kv.table('r2')).toBeUndefined();
    expect(hmm.kv.table('r1')).toEqual({ device: 0, blocks: [0, 1, 2, 3] });
    expect(() => hmm.kv.destroyPool(0)).toThrow(/r1/);
    hmm.kv.free('r1');
    hmm.kv.free('r1');
    expect(hmm.kv.info(0).freeBlocks).toBe(5);
    expect(hmm.kv.allocate('r2', 0, 5)).toHaveLength(5);
  });

  it('moves a request to another device with its bytes', async () => {
    const rt = openMock();
    const hmm = new Hmm(rt);
    hmm.kv.createPool({ device: 0, blockBytes: 256 * 1024, blocks: 8 });
    hmm.kv.createPool({ device: 3, blockBytes: 256 * 1024, blocks: 8 });
    hmm.kv.allocate('other', 3, 2);
    const blocks = hmm.kv.allocate('r', 0, 3);
    const data = blocks.map((b, i) => new Uint8Array(256 * 1024).fill(i + 7));
    for (const [i, b] of blocks.entries()) await rt.write(hmm.kv.blockPointer(0, b), data[i]!, hmm.store.stream(0));
    const moved = await hmm.kv.move('r', 3);
    expect(moved.device).toBe(3);
    expect(moved.blocks).toEqual([2, 3, 4]);
    for (const [i, b] of moved.blocks.entries()) {
      expect(sameBytes(await rt.read(hmm.kv.blockPointer(3, b), 256 * 1024, hmm.store.stream(3)), data[i]!)).toBe(true);
    }
    expect(hmm.kv.info(0).freeBlocks).toBe(8);
    expect(hmm.kv.info(3).freeBlocks).toBe(3);
  });

  it('a move whose third copy fails waits for the copies queued before it: the request stays where it was, both devices usable', async () => {
    const rt = openMock();
    const hmm = new Hmm(rt);
    hmm.kv.createPool({ device: 0, blockBytes: 2 * MIB, blocks: 16 });
    hmm.kv.createPool({ device: 1, blockBytes: 2 * MIB, blocks: 16 });
    const blocks = hmm.kv.allocate('r', 0, 12);
    for (let attempt = 0; attempt < 5; attempt++) {
      rt.injectFault('CopyDeviceToDevice', 3);
      await expect(hmm.kv.move('r', 1)).rejects.toThrow(FaultInjectedError);
      rt.clearFaults();
      expect(hmm.kv.table('r')).toEqual({ device: 0, blocks });
      expect(hmm.kv.info(1).freeBlocks).toBe(16);
    }
    // Had the source lost its access to the destination while the first two copies were queued, they
    // would have poisoned device 0 (an illegal address, as on a GPU): every later call on it would fail.
    for (const d of [0, 1]) rt.createChunk(d, GRAN).dispose();
    expect((await hmm.kv.move('r', 1)).device).toBe(1);
    hmm.kv.free('r');
    hmm.dispose();
    rt.dispose();
  });
});
