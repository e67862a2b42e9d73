// KV pools as the executor sees them: a device's pool chunks mapped into ONE new
// virtual range of this process, so that the kernels can address every block from
// one base pointer (block index i at base + i * blockBytes).
//
// The HMM cuts a pool into chunks of blocksPerChunk blocks, each rounded up to the
// allocation granularity, so a chunk may end in padding and "block b at base +
// b * blockBytes" does not hold in general (a 1.5 MiB block in 2 MiB granules
// leaves 1 MiB at the end of a 256 MiB chunk). Chunk i is therefore mapped at
// i * stride, where stride is the smallest multiple of lcm(granularity, blockBytes)
// that holds the largest chunk: every chunk starts on a block boundary of the view,
// block b sits at floor(b / bpc) * stride + (b % bpc) * blockBytes (KvPoolView
// .blockOffset), and the gap after a chunk stays reserved but unmapped. When
// bpc * blockBytes is a multiple of the granularity the stride is the chunk size
// and blockOffset(b) = b * blockBytes.
//
// Mapping a chunk here aliases memory another mapping (the HMM's own, or an
// AttachedSet's) already shows; disposing the view unmaps only this alias.
import type { AttachedSet } from '../hmm/client.js';
import type { Hmm } from '../hmm/hmm.js';
import type { KvPoolInfo } from '../hmm/kv-pool.js';
import { InvalidArgumentError } from '../runtime/errors.js';
import type { Chunk, DevicePointer, VirtualRange } from '../runtime/memory.js';
import type { Runtime } from '../runtime/runtime.js';
import type { KvPoolView } from './types.js';

function gcd(a: number, b: number): number {
  while (b) [a, b] = [b, a % b];
  return a;
}

function positiveInt(name: string, v: number): number {
  if (!Number.isSafeInteger(v) || v <= 0) throw new InvalidArgumentError(name, `a positive integer (got ${String(v)})`);
  return v;
}

/** A KV pool mapped into a range of this process. Dispose to unmap (the chunks stay their owners'). */
export class MappedKvPool implements KvPoolView, Disposable {
  readonly base: DevicePointer;
  readonly spanBlocks: number;

  /** @internal */
  constructor(
    readonly device: number,
    readonly range: VirtualRange,
    readonly blocks: number,
    readonly blockBytes: number,
    readonly blocksPerChunk: number,
    /** Bytes between the starts of consecutive chunks in the view (a multiple of blockBytes). */
    readonly stride: number,
  ) {
    this.base = range.at(0);
    this.spanBlocks = Math.floor(range.size / blockBytes);
  }

  blockOffset(block: number): number {
    if (!Number.isInteger(block) || block < 0 || block >= this.blocks) {
      throw new InvalidArgumentError('block', `a block id in 0..${this.blocks - 1} (got ${String(block)})`);
    }
    const c = Math.floor(block / this.blocksPerChunk);
    return c * this.stride + (block - c * this.blocksPerChunk) * this.blockBytes;
  }

  dispose(): void {
    this.range.dispose();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/**
 * Maps a device's pool chunks (in pool order) into one new range with access for
 * `access`. Every chunk but the last must be blocksPerChunk * blockBytes rounded
 * up to the granularity; the last may be smaller. `blocks` defaults to what the
 * chunks can hold.
 */
export function mapKvPool(rt: Runtime, chunks: ReadonlyArray<{ chunk: Chunk; size: number }>, blocksPerChunk: number,
  blockBytes: number, access: readonly number[], blocks?: number): MappedKvPool {
  if (chunks.length === 0) throw new InvalidArgumentError('chunks', 'at least one chunk');
  positiveInt('blocksPerChunk', blocksPerChunk);
  positiveInt('blockBytes', blockBytes);
  const device = chunks[0]!.chunk.device;
  const g = rt.granularity(device);
  const full = Math.ceil((blocksPerChunk * blockBytes) / g) * g;
  chunks.forEach(({ chunk, size }, i) => {
    if (chunk.device !== device) throw new InvalidArgumentError(`chunks[${i}]`, `a chunk on device ${device} (it is on ${chunk.device})`);
    if (size !== chunk.size) throw new InvalidArgumentError(`chunks[${i}].size`, `the chunk's size ${chunk.size} (got ${size})`);
    const last = i === chunks.length - 1;
    if (last ? size > full || size % g !== 0 : size !== full) {
      throw new InvalidArgumentError(`chunks[${i}].size`,
        `${last ? 'at most ' : ''}${full} bytes (blocksPerChunk * blockBytes rounded to the granularity ${g}; got ${size})`);
    }
  });
  const lastCapacity = Math.min(blocksPerChunk, Math.floor(chunks[chunks.length - 1]!.size / blockBytes));
  const capacity = (chunks.length - 1) * blocksPerChunk + lastCapacity;
  const n = blocks ?? capacity;
  if (!Number.isSafeInteger(n) || n <= (chunks.length - 1) * blocksPerChunk || n > capacity) {
    throw new InvalidArgumentError('blocks', `in ${(chunks.length - 1) * blocksPerChunk + 1}..${capacity} for ${chunks.length} chunk(s) (got ${String(n)})`);
  }
  const unit = (g / gcd(g, blockBytes)) * blockBytes; // lcm(g, blockBytes)
  const stride = Math.ceil(full / unit) * unit;
  const total = stride * (chunks.length - 1) + chunks[chunks.length - 1]!.size;
  if (!Number.isSafeInteger(total)) throw new InvalidArgumentError('blockBytes', 'a block size whose view fits a safe integer');
  const range = rt.reserve(Math.ceil(total / g) * g);
  try {
    chunks.forEach(({ chunk, size }, i) => {
      range.map(i * stride, chunk);
      range.setAccess(i * stride, size, access);
    });
  } catch (e) {
    range.dispose();
    throw e;
  }
  return new MappedKvPool(device, range, n, blockBytes, blocksPerChunk, stride);
}

/** A device's pool chunks as the in-process HMM holds them. */
export function hmmKvChunks(hmm: Hmm, device: number): { chunks: Array<{ chunk: Chunk; size: number }>; info: KvPoolInfo } {
  const info = hmm.kv.info(device);
  const chunks = info.chunkIds.map((id) => {
    const c = hmm.store.get(id);
    return { chunk: c.chunk, size: c.plan.size };
  });
  return { chunks, info };
}

/** A device's pool chunks as an AttachedSet imported them (info: from the daemon's manifest().kvPools). */
export function attachedKvChunks(set: AttachedSet, info: KvPoolInfo): Array<{ chunk: Chunk; size: number }> {
  return info.chunkIds.map((id) => {
    const c = set.chunk(id);
    return { chunk: c.chunk, size: c.entry.size };
  });
}

/** Maps the in-process HMM's pools of `devices` (access: each pool's own device unless given). */
export function mapHmmKvPools(rt: Runtime, hmm: Hmm, devices: readonly number[],
  access?: (device: number) => number[]): Map<number, MappedKvPool> {
  const out = new Map<number, MappedKvPool>();
  try {
    for (const d of devices) {
      const { chunks, info } = hmmKvChunks(hmm, d);
      out.set(d, mapKvPool(rt, chunks, info.blocksPerChunk, info.blockBytes, access?.(d) ?? [d], info.blocks));
    }
  } catch (e) {
    for (const v of out.values()) v.dispose();
    throw e;
  }
  return out;
}

/** Maps the pools of an attached set (one KvPoolInfo per device, from manifest().kvPools). */
export function mapAttachedKvPools(rt: Runtime, set: AttachedSet, infos: readonly KvPoolInfo[],
  access?: (device: number) => number[]): Map<number, MappedKvPool> {
  const out = new Map<number, MappedKvPool>();
  try {
    for (const info of infos) {
      out.set(info.device, mapKvPool(rt, attachedKvChunks(set, info), info.blocksPerChunk, info.blockBytes,
        access?.(info.device) ?? [info.device], info.blocks));
    }
  } catch (e) {
    for (const v of out.values()) v.dispose();
    throw e;
  }
  return out;
}
