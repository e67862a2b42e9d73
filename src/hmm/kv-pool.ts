// KV-cache block pools. Each device's pool is a set of chunks cut into fixed-size
// blocks. The block table (which blocks belong to which request) lives here, in
// the HMM, not in an executor: a request survives its executor, and a new
// executor (after a switch-over or a crash) continues it with the same blocks.
import { runEach } from '../runtime/cleanup.js';
import { ElasticMoeError, InvalidArgumentError, NotFoundError } from '../runtime/errors.js';
import type { DevicePointer } from '../runtime/memory.js';
import type { ChunkStore, StoredChunk } from './chunk-store.js';
import type { ChunkPlan } from './placement.js';

export class KvExhaustedError extends ElasticMoeError {}

export interface KvPoolSpec {
  device: number;
  /** Bytes of one block (all layers' K and V for `blockTokens` tokens, as the model lays them out). */
  blockBytes: number;
  blocks: number;
  /** Largest chunk to cut the pool into (default 256 MiB). */
  maxChunkBytes?: number;
}

export interface KvPoolInfo {
  device: number;
  blockBytes: number;
  blocks: number;
  blocksPerChunk: number;
  chunkIds: string[];
  freeBlocks: number;
}

export interface BlockTableEntry {
  device: number;
  blocks: number[];
}

class KvPool {
  readonly free: number[];
  constructor(
    readonly spec: Required<KvPoolSpec>,
    readonly blocksPerChunk: number,
    readonly chunks: StoredChunk[],
  ) {
    // Hand out low block ids first (pop from the end).
    this.free = Array.from({ length: spec.blocks }, (_, i) => spec.blocks - 1 - i);
  }
  ptr(block: number): DevicePointer {
    const chunk = this.chunks[Math.floor(block / this.blocksPerChunk)]!;
    return chunk.range.at((block % this.blocksPerChunk) * this.spec.blockBytes);
  }
}

/**
 * How a pool is cut into chunks (pure): blocks per chunk and each chunk's size, in order.
 * Checks the spec; `granularity` is the device's.
 */
export function kvPoolLayout(input: KvPoolSpec, granularity: number): { spec: Required<KvPoolSpec>; blocksPerChunk: number; sizes: number[] } {
  const spec = { maxChunkBytes: 256 * 1024 * 1024, ...input };
  for (const k of ['blockBytes', 'blocks', 'maxChunkBytes'] as const) {
    if (!Number.isSafeInteger(spec[k]) || spec[k] <= 0) throw new InvalidArgumentError(k, 'a positive integer');
  }
  const g = granularity;
  const chunkBytes = Math.max(g, Math.floor(spec.maxChunkBytes / g) * g);
  if (spec.blockBytes > chunkBytes) throw new InvalidArgumentError('blockBytes', `at most maxChunkBytes (${chunkBytes})`);
  const blocksPerChunk = Math.floor(chunkBytes / spec.blockBytes);
  const sizes: number[] = [];
  for (let first = 0; first < spec.blocks; first += blocksPerChunk) {
    sizes.push(Math.ceil((Math.min(blocksPerChunk, spec.blocks - first) * spec.blockBytes) / g) * g);
  }
  return { spec, blocksPerChunk, sizes };
}

export class KvManager {
  private readonly pools = new Map<number, KvPool>();
  private readonly tables = new Map<string, BlockTableEntry>();

  constructor(private readonly store: ChunkStore, private readonly holder = 'hmm') {}

  createPool(input: KvPoolSpec): KvPoolInfo {
    if (this.pools.has(input.device)) throw new InvalidArgumentError('device', `a device without a KV pool (device ${input.device} has one)`);
    const { spec, blocksPerChunk, sizes } = kvPoolLayout(input, this.store.rt.granularity(input.device));
    const plans: ChunkPlan[] = sizes.map((size, i) => ({ id: `kv@${spec.device}#${i}`, group: 'kv', device: spec.device, kind: 'kv', size, tensors: [] }));
    const chunks = this.store.allocate(plans, this.holder);
    this.pools.set(spec.device, new KvPool(spec, blocksPerChunk, chunks));
    return this.info(spec.device);
  }

  /**
   * Frees a device's pool; refused while any request still holds blocks there. The pool is gone
   * once this returns or throws past that check: a chunk whose free the driver refuses is left to
   * the store, which tries it again (the first such error is rethrown after the others are freed).
   */
  destroyPool(device: number): void {
    const pool = this.pool(device);
    const users = [...this.tables.entries()].filter(([, t]) => t.device === device).map(([r]) => r);
    if (users.length) throw new InvalidArgumentError('device', `a device whose KV blocks are free (held by ${users.slice(0, 3).join(', ')})`);
    this.pools.delete(device);
    runEach(pool.chunks.map((c) => () => void this.store.release(c.plan.id, this.holder)));
  }

  private pool(device: number): KvPool {
    const p = this.pools.get(device);
    if (!p) throw new NotFoundError('NOT_FOUND', `no KV pool on device ${device}`);
    return p;
  }

  info(device: number): KvPoolInfo {
    const p = this.pool(device);
    return {
      device,
      blockBytes: p.spec.blockBytes,
      blocks: p.spec.blocks,
      blocksPerChunk: p.blocksPerChunk,
      chunkIds: p.chunks.map((c) => c.plan.id),
      freeBlocks: p.free.length,
    };
  }
  poolDevices(): number[] {
    return [...this.pools.keys()].sort((a, b) => a - b);
  }

  /** Appends `count` blocks on the request's device (set by its first allocation). All or nothing. */
  allocate(requestId: string, device: number, count: number): number[] {
    if (!Number.isSafeInteger(count) || count < 0) throw new InvalidArgumentError('count', 'a non-negative integer');
    const table = this.tables.get(requestId);
    if (table && table.device !== device) {
      throw new InvalidArgumentError('device', `the request's device ${table.device} (use move to change it)`);
    }
    const pool = this.pool(device);
    if (pool.free.length < count) {
      throw new KvExhaustedError('OUT_OF_MEMORY',
        `KV pool on device ${device} has ${pool.free.length} free blocks, request ${requestId} needs ${count}`);
    }
    const got = pool.free.splice(pool.free.length - count, count).reverse();
    if (table) table.blocks.push(...got);
    else this.tables.set(requestId, { device, blocks: got });
    return got;
  }

  /** Returns the request's blocks to its pool. Idempotent. */
  free(requestId: string): void {
    const t = this.tables.get(requestId);
    if (!t) return;
    this.tables.delete(requestId);
    const pool = this.pools.get(t.device);
    if (pool) pool.free.push(...t.blocks.slice().reverse());
  }

  table(requestId: string): BlockTableEntry | undefined {
    const t = this.tables.get(requestId);
    return t && { device: t.device, blocks: [...t.blocks] };
  }
  requests(): string[] {
    return [...this.tables.keys()];
  }

  /** Where a block lives in the HMM's own mapping (for copies between devices). */
  blockPointer(device: number, block: number): DevicePointer {
    const pool = this.pool(device);
    if (!Number.isInteger(block) || block < 0 || block >= pool.spec.blocks) {
      throw new InvalidArgumentError('block', `a block id in 0..${pool.spec.blocks - 1}`);
    }
    return pool.ptr(block);
  }

  /**
   * Moves a request's KV to another device: allocates there, copies block by
   * block on the HMM's stream of the source device, then frees the old blocks.
   * On failure the request keeps its old blocks.
   */
  async move(requestId: string, toDevice: number): Promise<BlockTableEntry> {
    const t = this.tables.get(requestId);
    if (!t) throw new NotFoundError('NOT_FOUND', `no KV blocks for request ${requestId}`);
    if (t.device === toDevice) return { device: t.device, blocks: [...t.blocks] };
    const src = this.pool(t.device);
    const dst = this.pool(toDevice);
    if (dst.spec.blockBytes !== src.spec.blockBytes) throw new InvalidArgumentError('toDevice', 'a pool with the same block size');
    if (dst.free.length < t.blocks.length) {
      throw new KvExhaustedError('OUT_OF_MEMORY', `KV pool on device ${toDevice} cannot take ${t.blocks.length} blocks`);
    }
    const got = dst.free.splice(dst.free.length - t.blocks.length, t.blocks.length).reverse();
    const granted: StoredChunk[] = [];
    let stream: ReturnType<ChunkStore['stream']> | undefined;
    try {
      // The copying device (the source) needs access to the destination chunks.
      for (const c of dst.chunks) {
        c.range.setAccess(0, c.plan.size, [toDevice, t.device]);
        granted.push(c);
      }
      const s = (stream = this.store.stream(t.device));
      t.blocks.forEach((b, i) => s.copy(dst.ptr(got[i]!), src.ptr(b), src.spec.blockBytes));
      await s.synchronize();
    } catch (e) {
      // The copies queued before the failure still run: they end before the source loses its access to
      // the destination (a copy then would be an illegal address, poisoning the source device) and
      // before their blocks can be handed out again.
      await stream?.synchronize().catch(() => undefined);
      dst.free.push(...got.reverse());
      throw e;
    } finally {
      for (const c of granted) c.range.setAccess(0, c.plan.size, [toDevice]);
    }
    const old = t.blocks;
    this.tables.set(requestId, { device: toDevice, blocks: got });
    src.free.push(...old.slice().reverse());
    return { device: toDevice, blocks: [...got] };
  }

  /** Frees every pool (no request may hold blocks). */
  dispose(): void {
    this.tables.clear();
    for (const d of this.poolDevices()) this.destroyPool(d);
  }
}
