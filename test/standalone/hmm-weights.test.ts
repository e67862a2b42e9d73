// The weight loader on the mock backend: safetensors checkpoints written to a
// temp dir are loaded into the chunk store; the device bytes must equal the file
// bytes, and every failure must name the file and tensor and leave device memory
// exactly as it was.
import { mkdtempSync, rmSync } from 'node:fs';
import { mkdir, readFile, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { createProgressBar, progressLine } from '../../src/cli/progress.js';
import { ChunkStore } from '../../src/hmm/chunk-store.js';
import { type DType, tensorBytes } from '../../src/hmm/dtype.js';
import { type ChunkPlan, planChunks, type TensorSpec } from '../../src/hmm/placement.js';
import {
  CheckpointError, INDEX_FILE, openCheckpoint, readSafetensorsHeader, type TensorData, writeSafetensors,
} from '../../src/hmm/safetensors.js';
import { type LoadProgress, WeightLoadError, loadCheckpoint, planBatches } from '../../src/hmm/weight-loader.js';
import { checksumU32 } from '../../src/runtime/basic-kernels.js';
import { FaultInjectedError, OutOfMemoryError, type Runtime } from '../../src/index.js';
import { MIB, openMock, pattern, sameBytes } from '../helpers/mock.js';

const KIB = 1024;
const GIB_50 = (2 * 1024 ** 3) / 50;
let root: string;
let seq = 0;
beforeAll(() => {
  root = mkdtempSync(path.join(os.tmpdir(), 'emoe-weights-'));
});
afterAll(() => rmSync(root, { recursive: true, force: true }));
async function freshDir(): Promise<string> {
  const d = path.join(root, `ckpt-${seq++}`);
  await mkdir(d);
  return d;
}

// A small MoE-shaped model: dense weights packed per device, one chunk per expert.
interface ModelTensor extends TensorSpec {
  data: Uint8Array;
}
function model(): ModelTensor[] {
  const t = (name: string, dtype: DType, shape: number[], device: number, group: string, packing: 'single' | 'packed') =>
    ({ name, dtype, shape, device, group, packing });
  const list: TensorSpec[] = [
    t('embed.weight', 'bf16', [256, 300], 0, 'dense', 'packed'), // 150 KiB: larger than a 64 KiB staging buffer
    t('norm.weight', 'f32', [300], 0, 'dense', 'packed'),
    t('L0.attn.qkv', 'bf16', [300, 97], 1, 'dense', 'packed'), // odd byte count: splits off 4-byte words
    t('L0.gate.bias', 'i8', [13], 1, 'dense', 'packed'),
    t('L0.E0.w', 'bf16', [64, 512], 2, 'L0.E0', 'single'),
    t('L0.E0.scale', 'f32', [64], 2, 'L0.E0', 'single'),
    t('L0.E1.w', 'bf16', [64, 512], 3, 'L0.E1', 'single'),
    t('L0.E1.scale', 'f32', [64], 3, 'L0.E1', 'single'),
    t('L0.empty', 'f16', [0, 8], 3, 'dense', 'packed'), // zero bytes: present, nothing to copy
    t('big.u8', 'u8', [1 * MIB + 12_345], 0, 'big', 'single'), // many staging buffers' worth
  ];
  return list.map((s, i) => ({ ...s, data: pattern(tensorBytes(s.dtype, s.shape), 1000 + i) }));
}
const asData = (ts: readonly ModelTensor[]): TensorData[] => ts.map(({ name, dtype, shape, data }) => ({ name, dtype, shape, data }));

function plansFor(rt: Runtime, specs: readonly TensorSpec[]): ChunkPlan[] {
  return planChunks(specs, { granularity: rt.granularity(0) });
}

/** Device memory as the tests compare it: free bytes of every device and the store's chunk count. */
function accounting(rt: Runtime, store: ChunkStore) {
  return { free: rt.devices().map((d) => d.freeBytes), chunks: store.size, tensors: store.tensorNames().length };
}

/** Every tensor's device bytes equal the file bytes, read back and checksummed on the device. */
async function expectLoaded(rt: Runtime, store: ChunkStore, tensors: readonly ModelTensor[]) {
  for (const t of tensors) {
    const ref = store.tensor(t.name);
    const back = await rt.read(ref.ptr, t.data.byteLength, store.stream(ref.chunk.plan.device));
    expect(sameBytes(back, t.data), t.name).toBe(true);
    expect(await store.checksumTensor(t.name), t.name).toBe(checksumU32(t.data));
  }
}

async function writeSingle(tensors: readonly ModelTensor[]) {
  const dir = await freshDir();
  await writeSafetensors(path.join(dir, 'model.safetensors'), asData(tensors), { format: 'pt' });
  return dir;
}

/** Shards: tensors dealt round-robin into `n` files, with an index. */
async function writeSharded(tensors: readonly ModelTensor[], n: number, withIndex = true) {
  const dir = await freshDir();
  const weightMap: Record<string, string> = {};
  for (let s = 0; s < n; s++) {
    const file = `model-${String(s + 1).padStart(5, '0')}-of-${String(n).padStart(5, '0')}.safetensors`;
    const mine = tensors.filter((_, i) => i % n === s);
    for (const t of mine) weightMap[t.name] = file;
    await writeSafetensors(path.join(dir, file), asData(mine));
  }
  if (withIndex) await writeFile(path.join(dir, INDEX_FILE), JSON.stringify({ metadata: {}, weight_map: weightMap }));
  return { dir, weightMap };
}

/** A file with a hand-written header (for malformed ones). */
async function writeRaw(file: string, header: unknown, dataBytes: number, headerLength?: bigint) {
  const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(headerLength ?? BigInt(json.length));
  await writeFile(file, Buffer.concat([len, json, Buffer.alloc(dataBytes)]));
}

describe('safetensors files', () => {
  it('round-trips through writeSafetensors: 8-aligned header, offsets, metadata', async () => {
    const tensors = model();
    const dir = await writeSingle(tensors);
    const h = await readSafetensorsHeader(path.join(dir, 'model.safetensors'));
    expect(h.headerBytes % 8).toBe(0);
    expect(h.metadata).toEqual({ format: 'pt' });
    const bytes = await readFile(h.path);
    expect(h.size).toBe(bytes.byteLength);
    for (const t of tensors) {
      const e = h.tensors.get(t.name)!;
      expect([e.dtype, e.shape, e.bytes]).toEqual([t.dtype, t.shape, t.data.byteLength]);
      expect(sameBytes(bytes.subarray(e.dataStart, e.dataStart + e.bytes), t.data)).toBe(true);
    }
  });

  it('rejects malformed headers with the file (and tensor) named', async () => {
    const dir = await freshDir();
    const f = (n: string) => path.join(dir, n);
    const ok = { a: { dtype: 'F32', shape: [2, 2], data_offsets: [0, 16] } };
    const cases: [string, () => Promise<void>, RegExp][] = [
      ['tiny.safetensors', () => writeFile(f('tiny.safetensors'), Buffer.alloc(5)), /too small/],
      ['garbage-len.safetensors', () => writeRaw(f('garbage-len.safetensors'), ok, 16, 0xffffffffffffffffn), /header length .* exceeds/],
      ['past-end.safetensors', () => writeRaw(f('past-end.safetensors'), ok, 16, 10_000n), /runs past the end/],
      ['json.safetensors', () => writeRaw(f('json.safetensors'), '{"a": {"dtype": "F32",', 16), /not valid UTF-8 JSON/],
      ['array.safetensors', () => writeRaw(f('array.safetensors'), [1, 2], 0), /must be a JSON object/],
      ['dtype.safetensors', () => writeRaw(f('dtype.safetensors'), { a: { ...ok.a, dtype: 'C64' } }, 16), /tensor 'a': unknown .*dtype 'C64'/],
      ['span.safetensors', () => writeRaw(f('span.safetensors'), { a: { ...ok.a, data_offsets: [0, 12] } }, 16), /tensor 'a': data_offsets \[0, 12\] span 12 bytes, but F32 \[2,2\] needs 16/],
      ['shape.safetensors', () => writeRaw(f('shape.safetensors'), { a: { ...ok.a, shape: [2, 2.5] } }, 16), /tensor 'a': shape must be an array of non-negative integers/],
      ['neg.safetensors', () => writeRaw(f('neg.safetensors'), { a: { ...ok.a, shape: [-4] } }, 16), /tensor 'a': shape/],
      ['overlap.safetensors', () => writeRaw(f('overlap.safetensors'),
        { a: ok.a, b: { dtype: 'F32', shape: [4], data_offsets: [8, 24] } }, 24), /tensor 'b': data_offsets overlap those of 'a'/],
      ['outside.safetensors', () => writeRaw(f('outside.safetensors'), { a: { ...ok.a, data_offsets: [16, 32] } }, 16), /tensor 'a': data_offsets end 32 lies past the 16-byte data section/],
      ['meta.safetensors', () => writeRaw(f('meta.safetensors'), { __metadata__: { n: 1 }, ...ok }, 16), /__metadata__/],
    ];
    for (const [name, make, why] of cases) {
      await make();
      const err = await readSafetensorsHeader(f(name)).then(() => undefined, (e: unknown) => e);
      expect(err, name).toBeInstanceOf(CheckpointError);
      expect((err as CheckpointError).file).toBe(f(name));
      expect((err as Error).message, name).toContain(f(name));
      expect((err as Error).message, name).toMatch(why);
    }
    await expect(readSafetensorsHeader(f('absent.safetensors'))).rejects.toThrow(/absent\.safetensors: cannot open/);
  });

  it('finds a truncated file from its header alone', async () => {
    const tensors = model();
    const dir = await writeSingle(tensors);
    const file = path.join(dir, 'model.safetensors');
    const size = (await readFile(file)).byteLength;
    await truncate(file, size - 100); // the last tensor in the file loses its tail
    const err = await openCheckpoint(dir).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CheckpointError);
    expect((err as Error).message).toMatch(new RegExp(`${file}, tensor 'big.u8': .*past the .*data section \\(file truncated\\?\\)`));
  });
});

describe('checkpoint folders', () => {
  it('reads an index, a single model.safetensors, or every *.safetensors', async () => {
    const tensors = model();
    const sharded = await writeSharded(tensors, 3);
    const a = await openCheckpoint(sharded.dir);
    expect(a.files).toHaveLength(3);
    expect([...a.tensors.keys()].sort()).toEqual(tensors.map((t) => t.name).sort());
    for (const [name, file] of Object.entries(sharded.weightMap)) expect(a.tensors.get(name)!.file).toBe(path.join(sharded.dir, file));

    const loose = await writeSharded(tensors, 2, false);
    expect((await openCheckpoint(loose.dir)).tensors.size).toBe(tensors.length);
    const single = await writeSingle(tensors);
    expect((await openCheckpoint(single)).files).toEqual([path.join(single, 'model.safetensors')]);
    expect((await openCheckpoint(path.join(single, 'model.safetensors'))).tensors.size).toBe(tensors.length);
    await expect(openCheckpoint(await freshDir())).rejects.toThrow(/no model\.safetensors\.index\.json, model\.safetensors or \*\.safetensors/);
  });

  it('rejects an index pointing to a missing file, or to a file without the tensor', async () => {
    const tensors = model();
    const { dir, weightMap } = await writeSharded(tensors, 2);
    const index = path.join(dir, INDEX_FILE);
    await writeFile(index, JSON.stringify({ weight_map: { ...weightMap, 'norm.weight': 'model-00009-of-00009.safetensors' } }));
    await expect(openCheckpoint(dir)).rejects.toThrow(
      `weight_map sends tensor 'norm.weight' to ${path.join(dir, 'model-00009-of-00009.safetensors')}, which does not exist`);
    // 'norm.weight' is in shard 2; the index claims shard 1.
    await writeFile(index, JSON.stringify({ weight_map: { ...weightMap, 'norm.weight': 'model-00001-of-00002.safetensors' } }));
    await expect(openCheckpoint(dir)).rejects.toThrow(
      `weight_map puts tensor 'norm.weight' in ${path.join(dir, 'model-00001-of-00002.safetensors')}, but it is in ` +
      `${path.join(dir, 'model-00002-of-00002.safetensors')}`);
    await writeFile(index, JSON.stringify({ weight_map: { ...weightMap, ghost: 'model-00001-of-00002.safetensors' } }));
    await expect(openCheckpoint(dir)).rejects.toThrow(/weight_map puts tensor 'ghost' in .*00001-of-00002.safetensors, but no file holds it/);
    await writeFile(index, JSON.stringify({ weight_map: { ...weightMap, 'norm.weight': '../elsewhere.safetensors' } }));
    await expect(openCheckpoint(dir)).rejects.toThrow(/tensor 'norm.weight': weight_map entry must be a file name inside the folder/);
  });

  it('rejects a tensor present in two files', async () => {
    const tensors = model();
    const { dir } = await writeSharded(tensors, 2, false);
    await writeSafetensors(path.join(dir, 'extra.safetensors'), asData([tensors[1]!]));
    await expect(openCheckpoint(dir)).rejects.toThrow(
      `${path.join(dir, 'model-00002-of-00002.safetensors')}, tensor 'norm.weight': also present in ${path.join(dir, 'extra.safetensors')}`);
  });
});

describe('planBatches', () => {
  it('coalesces adjacent tensors into one read and splits those larger than a buffer', () => {
    const t = (name: string, file: string, dataStart: number, bytes: number) => ({ name, file, dataStart, bytes, dtype: 'u8' as const, shape: [bytes] });
    const batches = planBatches([t('c', 'b.st', 100, 10), t('a', 'a.st', 8, 30), t('b', 'a.st', 38, 50), t('z', 'a.st', 200, 0)], 64);
    expect(batches).toEqual([
      { file: 'a.st', position: 8, bytes: 64, pieces: [
        { tensor: 'a', tensorOffset: 0, bufOffset: 0, bytes: 30 }, { tensor: 'b', tensorOffset: 0, bufOffset: 30, bytes: 34 }] },
      { file: 'a.st', position: 72, bytes: 16, pieces: [{ tensor: 'b', tensorOffset: 34, bufOffset: 0, bytes: 16 }] },
      { file: 'b.st', position: 100, bytes: 10, pieces: [{ tensor: 'c', tensorOffset: 0, bufOffset: 0, bytes: 10 }] },
    ]);
  });
});

describe('loadCheckpoint', () => {
  async function setup(tensors = model()) {
    const rt = openMock();
    const store = new ChunkStore(rt);
    const plans = plansFor(rt, tensors);
    return { rt, store, plans, tensors };
  }

  it('loads a single-file checkpoint: device bytes and device checksums equal the file', async () => {
    const { rt, store, plans, tensors } = await setup();
    const ckpt = await openCheckpoint(await writeSingle(tensors));
    const seen: LoadProgress[] = [];
    const made = await loadCheckpoint(store, plans, ckpt, { onProgress: (p) => seen.push(p) });
    expect(made.map((c) => c.plan.id).sort()).toEqual(plans.map((p) => p.id).sort());
    expect(made.every((c) => c.holders.has('hmm'))).toBe(true);
    await expectLoaded(rt, store, tensors);
    const total = tensors.reduce((a, t) => a + t.data.byteLength, 0);
    expect(seen.at(-1)).toEqual({ bytesDone: total, bytesTotal: total, tensorsDone: tensors.length, tensorsTotal: tensors.length });
    store.dispose();
  });

  it('loads a sharded checkpoint through its index, for another holder', async () => {
    const { rt, store, plans, tensors } = await setup();
    const ckpt = await openCheckpoint((await writeSharded(tensors, 3)).dir);
    const made = await loadCheckpoint(store, plans, ckpt, { holder: 'layout-1' });
    expect(made.every((c) => c.holders.has('layout-1') && c.holders.size === 1)).toBe(true);
    await expectLoaded(rt, store, tensors);
    expect(store.releaseHolder('layout-1')).toHaveLength(plans.length);
    expect(store.size).toBe(0);
  });

  it('splits tensors larger than the staging buffer across reads, with bounded buffers', async () => {
    const { rt, store, plans, tensors } = await setup();
    const ckpt = await openCheckpoint((await writeSharded(tensors, 2)).dir);
    const seen: LoadProgress[] = [];
    // Count the pinned buffers the loader asks for: the pool is bounded, whatever the checkpoint's size.
    const pinned: number[] = [];
    const hostBuffer = rt.hostBuffer.bind(rt);
    rt.hostBuffer = (size: number) => (pinned.push(size), hostBuffer(size));
    await loadCheckpoint(store, plans, ckpt, { stagingBytes: 64 * KIB, stagingBuffers: 2, onProgress: (p) => seen.push(p) });
    expect(pinned).toEqual([64 * KIB, 64 * KIB]);
    rt.hostBuffer = hostBuffer;
    await expectLoaded(rt, store, tensors);
    const total = tensors.reduce((a, t) => a + t.data.byteLength, 0);
    // ~22 reads of 64 KiB: progress came in steps, monotonically, and ended at the total.
    expect(seen.length).toBeGreaterThan(5);
    for (let i = 1; i < seen.length; i++) expect(seen[i]!.bytesDone).toBeGreaterThanOrEqual(seen[i - 1]!.bytesDone);
    expect(seen.at(-1)!.bytesDone).toBe(total);
    expect(seen.at(-1)!.tensorsDone).toBe(tensors.length);
    store.dispose();
  });

  it('loads only the planned tensors (a subset of the checkpoint: one device\'s share)', async () => {
    const { rt, store, tensors } = await setup();
    const mine = tensors.filter((t) => t.device === 2);
    const ckpt = await openCheckpoint(await writeSingle(tensors));
    await loadCheckpoint(store, plansFor(rt, mine), ckpt, { stagingBytes: 4 * KIB });
    await expectLoaded(rt, store, mine);
    expect(store.tensorNames().sort()).toEqual(mine.map((t) => t.name).sort());
    store.dispose();
  });

  describe('failures name the file and tensor and leave device memory as it was', () => {
    /** Loads and expects a rejection; checks accounting is unchanged and the store can still load afterwards. */
    async function expectCleanFailure(rt: Runtime, store: ChunkStore, load: () => Promise<unknown>): Promise<Error> {
      const before = accounting(rt, store);
      const err = await load().then(() => undefined, (e: unknown) => e);
      expect(err).toBeInstanceOf(Error);
      expect(accounting(rt, store)).toEqual(before);
      return err as Error;
    }

    it('dtype mismatch, shape mismatch, missing tensor: rejected before any allocation', async () => {
      const { rt, store, tensors } = await setup();
      const ckpt = await openCheckpoint(await writeSingle(tensors));
      const file = ckpt.files[0]!;
      const change = (name: string, edit: Partial<TensorSpec>) => plansFor(rt, tensors.map((t) => (t.name === name ? { ...t, ...edit } : t)));
      const dtype = await expectCleanFailure(rt, store, () => loadCheckpoint(store, change('norm.weight', { dtype: 'i32' }), ckpt));
      expect(dtype).toBeInstanceOf(CheckpointError);
      expect(dtype.message).toBe(`${file}, tensor 'norm.weight': expected i32 [300], found f32 [300]`);
      const shape = await expectCleanFailure(rt, store, () => loadCheckpoint(store, change('L0.E1.w', { shape: [512, 64] }), ckpt));
      expect(shape.message).toBe(`${file}, tensor 'L0.E1.w': expected bf16 [512,64], found bf16 [64,512]`);
      const extra = [...tensors, { ...tensors[1]!, name: 'lm_head.weight' }];
      const missing = await expectCleanFailure(rt, store, () => loadCheckpoint(store, plansFor(rt, extra), ckpt));
      expect(missing.message).toMatch(/tensor 'lm_head.weight' \(chunk dense@0#0\) is not in the checkpoint at .*ckpt-\d+ \(1 file\(s\)\)/);
      expect((missing as CheckpointError).tensor).toBe('lm_head.weight');
    });

    it('a file truncated after it was opened: short read mid-load, everything released', async () => {
      const { rt, store, plans, tensors } = await setup();
      const ckpt = await openCheckpoint(await writeSingle(tensors));
      const file = ckpt.files[0]!;
      await truncate(file, ckpt.tensors.get('big.u8')!.dataStart + 100_000);
      const err = await expectCleanFailure(rt, store, () => loadCheckpoint(store, plans, ckpt, { stagingBytes: 64 * KIB }));
      expect(err).toBeInstanceOf(WeightLoadError);
      expect(err.message).toMatch(new RegExp(`^${file}, tensor 'big.u8': cannot read 65536 bytes at offset \\d+: short read`));
      expect((err as WeightLoadError).tensor).toBe('big.u8');
    });

    it('a device copy failing mid-load (third upload), everything released', async () => {
      const { rt, store, plans, tensors } = await setup();
      const ckpt = await openCheckpoint(await writeSingle(tensors));
      rt.injectFault('CopyHostToDevice', 3);
      const err = await expectCleanFailure(rt, store, () => loadCheckpoint(store, plans, ckpt, { stagingBytes: 64 * KIB }));
      rt.clearFaults();
      expect(err).toBeInstanceOf(WeightLoadError);
      expect(err.cause).toBeInstanceOf(FaultInjectedError);
      expect((err as WeightLoadError).code).toBe('FAULT_INJECTED');
      expect(err.message).toMatch(new RegExp(`^${ckpt.files[0]}, tensor '[^']+': upload of \\d+ bytes to device \\d failed: .*injected fault`));
      // Nothing was left behind: the same plans load cleanly now.
      await loadCheckpoint(store, plans, ckpt, { stagingBytes: 64 * KIB });
      await expectLoaded(rt, store, tensors);
      store.dispose();
    });

    it('a device error while waiting for uploads, no pinned memory, out of device memory: everything released', async () => {
      const { rt, store, plans, tensors } = await setup();
      const ckpt = await openCheckpoint(await writeSingle(tensors));
      rt.injectFault('SynchronizeEvent', 2);
      const wait = await expectCleanFailure(rt, store, () => loadCheckpoint(store, plans, ckpt, { stagingBytes: 64 * KIB, stagingBuffers: 2 }));
      expect(wait).toBeInstanceOf(FaultInjectedError);
      rt.injectFault('HostAlloc', 2);
      const pin = await expectCleanFailure(rt, store, () => loadCheckpoint(store, plans, ckpt, { stagingBytes: 64 * KIB }));
      expect(pin).toBeInstanceOf(FaultInjectedError);
      rt.injectFault('CreateChunk', 3, 'OUT_OF_MEMORY');
      const oom = await expectCleanFailure(rt, store, () => loadCheckpoint(store, plans, ckpt));
      expect(oom).toBeInstanceOf(OutOfMemoryError);
      rt.clearFaults();
      await loadCheckpoint(store, plans, ckpt, { stagingBytes: 64 * KIB });
      await expectLoaded(rt, store, tensors);
      store.dispose();
    });

    it('an aborted load (AbortSignal mid-way, or already aborted), everything released', async () => {
      const { rt, store, plans, tensors } = await setup();
      const ckpt = await openCheckpoint((await writeSharded(tensors, 2)).dir);
      const ac = new AbortController();
      let calls = 0;
      const err = await expectCleanFailure(rt, store, () => loadCheckpoint(store, plans, ckpt, {
        stagingBytes: 64 * KIB,
        stagingBuffers: 2,
        signal: ac.signal,
        onProgress: (p) => {
          calls++;
          if (p.bytesDone > 0) ac.abort();
        },
      }));
      expect(err.name).toBe('AbortError');
      expect(calls).toBe(1);
      const aborted = AbortSignal.abort();
      const early = await expectCleanFailure(rt, store, () => loadCheckpoint(store, plans, ckpt, { signal: aborted }));
      expect(early.name).toBe('AbortError');
    });

    it('a tensor name already stored: the store refuses, nothing changes', async () => {
      const { rt, store, plans, tensors } = await setup();
      const ckpt = await openCheckpoint(await writeSingle(tensors));
      await loadCheckpoint(store, plans, ckpt);
      const err = await expectCleanFailure(rt, store, () => loadCheckpoint(store, plans, ckpt, { holder: 'again' }));
      expect(err.message).toMatch(/exists|already stored/);
      store.dispose();
    });
  });
});

describe('command-line progress bar', () => {
  const sink = (isTTY: boolean) => {
    const out: string[] = [];
    return { out, stream: { isTTY, columns: 80, write: (s: string) => out.push(s) } };
  };

  it('prints a line every 10% when not on a terminal', () => {
    const { out, stream } = sink(false);
    let t = 0;
    const bar = createProgressBar('weights', stream, () => t);
    for (let i = 0; i <= 100; i++) {
      t = i * 10;
      bar.update(i * MIB, 100 * MIB);
    }
    bar.finish();
    bar.finish();
    expect(out).toHaveLength(11);
    expect(out.every((l) => l.endsWith('\n') && !l.includes('\r'))).toBe(true);
    expect(out.at(-1)).toBe('weights  100.0%  0.10/0.10 GiB  0.10 GiB/s\n');
  });

  it('redraws one line in place on a terminal, at most every 100 ms', () => {
    const { out, stream } = sink(true);
    let t = 0;
    const bar = createProgressBar('weights', stream, () => t);
    for (let i = 1; i <= 50; i++) {
      t = i * 20;
      bar.update(i * GIB_50, 50 * GIB_50);
    }
    bar.finish();
    expect(out.length).toBeGreaterThan(5);
    expect(out.length).toBeLessThan(20);
    expect(out.slice(0, -1).every((l) => l.startsWith('\r\x1b[2K') && !l.includes('\n'))).toBe(true);
    expect(out.at(-2)).toBe('\r\x1b[2Kweights  100.0%  2.00/2.00 GiB  2.00 GiB/s');
    expect(out.at(-1)).toBe('\n');
    expect(progressLine('x', 0, 0, 0)).toBe('x  100.0%  0.00/0.00 GiB  -- GiB/s');
  });
});

describe('replicated tensors', () => {
  it('reads a tensor once and uploads it to every device that holds a replica', async () => {
    const { mkdtempSync } = await import('node:fs');
    const os = await import('node:os');
    const path = await import('node:path');
    const { writeSafetensors, openCheckpoint } = await import('../../src/hmm/safetensors.js');
    const { loadCheckpoint } = await import('../../src/hmm/weight-loader.js');
    const { ChunkStore } = await import('../../src/hmm/chunk-store.js');
    const { planChunks } = await import('../../src/hmm/placement.js');
    const { openMock, GRAN, sameBytes } = await import('../helpers/mock.js');
    const dir = mkdtempSync(path.join(os.tmpdir(), 'emoe-rep-'));
    const data = new Uint8Array(4096).map((_, i) => (i * 7) & 0xff);
    await writeSafetensors(path.join(dir, 'model.safetensors'), [{ name: 'w', dtype: 'bf16', shape: [2048], data }]);
    const rt = openMock();
    const store = new ChunkStore(rt);
    const plans = planChunks([0, 2].map((device) => ({ name: 'w', dtype: 'bf16' as const, shape: [2048], device, group: 'dense' })), { granularity: GRAN });
    await loadCheckpoint(store, plans, await openCheckpoint(dir));
    for (const d of [0, 2]) {
      expect(sameBytes(await rt.read(store.tensor('w', d).ptr, 4096, store.stream(d)), data)).toBe(true);
    }
  });
});
