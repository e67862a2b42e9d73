// The HMM client: what an executor (or a tool) uses to talk to the daemon.
// Requests carry increasing ids and wait in a pending map for their reply, each
// with a timeout. Chunk handles that arrive are imported into the client's
// runtime, mapped into ranges of its own and granted access: an AttachedSet.
import { closeSync } from 'node:fs';

import { type ChannelMessage, UnixChannel } from '../runtime/channel.js';
import {
  InvalidArgumentError,
  NotFoundError,
  NotSupportedError,
  OutOfMemoryError,
} from '../runtime/errors.js';
import type { Chunk, DevicePointer, SharedHandle, VirtualRange } from '../runtime/memory.js';
import type { NativeStatus } from '../runtime/native-types.js';
import type { Runtime } from '../runtime/runtime.js';
import type { ChunkManifestEntry, HmmManifest } from './hmm.js';
import { type BlockTableEntry, KvExhaustedError } from './kv-pool.js';
import type { TensorLocation } from './placement.js';
import {
  CONNECTION_ID,
  type ChunkBatch,
  encode,
  type HelloResult,
  HmmProtocolError,
  type HmmStats,
  MAX_MESSAGE_BYTES,
  type Op,
  type PartialResponse,
  type RequestArgs,
  RESULT_SCHEMAS,
  type Result,
  ResponseSchema,
  type WireError,
  type WireHandle,
} from './protocol.js';

export interface HmmClientOptions {
  /** Shown in the daemon's log. */
  name?: string;
  /** Per request (default 30 s); an attach restarts it with every batch that arrives. */
  timeoutMs?: number;
}

export interface AttachOptions {
  /** Devices granted access to each chunk's mapping (default: the chunk's own device). */
  access?: (entry: ChunkManifestEntry) => number[];
}

function closeFds(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      closeSync(fd);
    } catch {
      // already closed
    }
  }
}

/** A daemon error as the typed error a local call would have thrown, where one exists. */
export function errorFromWire(op: string, e: WireError): Error {
  const status: NativeStatus = {
    kind: e.code,
    backend: 'hmm',
    api: op,
    code: 0,
    codeName: e.codeName ?? '',
    message: e.message,
    argument: e.argument ?? '',
  };
  switch (e.code) {
    case 'INVALID_ARGUMENT':
      return new InvalidArgumentError(e.argument ?? 'argument', 'valid', status);
    case 'NOT_FOUND':
      return new NotFoundError('NOT_FOUND', e.message, status);
    case 'OUT_OF_MEMORY':
      return e.name === 'KvExhaustedError'
        ? new KvExhaustedError('OUT_OF_MEMORY', e.message, status)
        : new OutOfMemoryError('OUT_OF_MEMORY', e.message, status);
    case 'NOT_SUPPORTED':
      return new NotSupportedError('NOT_SUPPORTED', e.message, status);
    default:
      return new HmmProtocolError(e.code, e.message);
  }
}

/**
 * One reserved range that several imported chunks are mapped into side by side
 * (one reservation and one set-access for a batch instead of one per chunk: the
 * driver charges each call tens of µs). Freed when the last of its chunks goes.
 */
class SharedRange {
  constructor(
    readonly range: VirtualRange,
    private refs: number,
  ) {}
  release(): void {
    if (--this.refs === 0) this.range.dispose();
  }
}

/** One chunk of the HMM imported into this process and mapped at `ptr`. */
export class AttachedChunk implements Disposable {
  private released = false;
  /** @internal */
  constructor(
    readonly entry: ChunkManifestEntry,
    readonly chunk: Chunk,
    private readonly shared: SharedRange,
    private readonly offset: number,
  ) {}

  get ptr(): DevicePointer {
    return this.shared.range.at(this.offset);
  }

  /** Unmaps and drops this process's handle (the daemon's hold is separate: see HmmClient.detach). Idempotent. */
  dispose(): void {
    if (this.released) return;
    this.released = true;
    try {
      if (!this.shared.range.disposed) this.shared.range.unmap(this.offset, this.entry.size);
    } finally {
      this.chunk.dispose();
      this.shared.release();
    }
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}

function sharedHandle(h: WireHandle, fds: readonly number[]): SharedHandle {
  if (h.kind === 'acl') return { kind: 'acl', handle: BigInt(h.handle) };
  const fd = fds[h.index];
  if (fd === undefined) throw new HmmProtocolError('BAD_RESPONSE', `chunk handle names descriptor ${h.index}, the message carried ${fds.length}`);
  return { kind: 'fd', fd };
}

/** Where attach time goes in this process (milliseconds, summed over chunks). */
export interface AttachTimings {
  importMs: number;
  mapMs: number;
  accessMs: number;
}

const noTimings = (): AttachTimings => ({ importMs: 0, mapMs: 0, accessMs: 0 });

/**
 * Imports chunks of one device that get the same access, maps them side by side
 * into one new range and grants `access` over it in one call. All or nothing:
 * on failure nothing imported or reserved here is left behind.
 */
function importGroup(rt: Runtime, items: ReadonlyArray<{ entry: ChunkManifestEntry; handle: SharedHandle }>,
  access: readonly number[], timings: AttachTimings): AttachedChunk[] {
  const total = items.reduce((n, i) => n + i.entry.size, 0);
  const chunks: Chunk[] = [];
  let range: VirtualRange | undefined;
  try {
    let t = performance.now();
    range = rt.reserve(total);
    let now = performance.now();
    timings.mapMs += now - t;
    let offset = 0;
    for (const { entry, handle } of items) {
      t = now;
      const chunk = rt.importChunk(handle, entry.device, entry.size);
      chunks.push(chunk);
      now = performance.now();
      timings.importMs += now - t;
      t = now;
      range.map(offset, chunk);
      offset += entry.size;
      now = performance.now();
      timings.mapMs += now - t;
    }
    t = now;
    range.setAccess(0, total, access);
    timings.accessMs += performance.now() - t;
  } catch (e) {
    range?.dispose();
    for (const c of chunks) c.dispose();
    throw e;
  }
  const shared = new SharedRange(range, items.length);
  let offset = 0;
  return items.map(({ entry }, i) => {
    const c = new AttachedChunk(entry, chunks[i]!, shared, offset);
    offset += entry.size;
    return c;
  });
}

/** Tensors one chunk may list (the packing of AttachedSet's tensor references). */
const TENSOR_SLOTS = 1 << 20;

/** Chunks attached by one attach call, mapped in this process. */
export class AttachedSet implements Disposable {
  private readonly byId = new Map<string, AttachedChunk>();
  readonly timings: AttachTimings = { importMs: 0, mapMs: 0, accessMs: 0 };
  /** Chunks in arrival order: what byTensor's packed references point into (undefined: dropped). */
  private readonly list: Array<AttachedChunk | undefined> = [];
  /**
   * Tensor name → where it is mapped here, packed as chunk index * 2^20 + tensor index
   * (a small integer, no allocation per tensor: an attach carries ~19,000 of them), or a
   * list of those for a tensor with replicas on several devices (dense weights).
   */
  private readonly byTensor = new Map<string, number | number[]>();

  /** @internal */
  constructor(
    private readonly rt: Runtime,
    private readonly access: (entry: ChunkManifestEntry) => number[],
  ) {}

  /** @internal Imports a batch; the descriptors are closed whatever happens. */
  add(batch: ChunkBatch, fds: readonly number[]): void {
    try {
      if (batch.handles.length !== batch.entries.length) {
        throw new HmmProtocolError('BAD_RESPONSE', `attach batch of ${batch.entries.length} chunks carried ${batch.handles.length} handles`);
      }
      // One range per (device, access) run of the batch.
      const groups = new Map<string, { access: number[]; items: Array<{ entry: ChunkManifestEntry; handle: SharedHandle }> }>();
      batch.entries.forEach((entry, i) => {
        if (this.byId.has(entry.id)) throw new HmmProtocolError('BAD_RESPONSE', `chunk '${entry.id}' arrived twice`);
        const access = this.access(entry);
        const key = `${entry.device}:${access.join(',')}`;
        let g = groups.get(key);
        if (!g) groups.set(key, (g = { access, items: [] }));
        g.items.push({ entry, handle: sharedHandle(batch.handles[i]!, fds) });
      });
      // Every imported chunk is held first (dispose() releases them all if indexing one throws).
      const imported = [...groups.values()].flatMap((g) => importGroup(this.rt, g.items, g.access, this.timings));
      const at = imported.map((c) => this.hold(c));
      imported.forEach((c, i) => this.index(c, at[i]!));
    } finally {
      closeFds(fds);
    }
  }

  /** Holds an imported chunk (dispose() releases it); returns its index in `list`. */
  private hold(c: AttachedChunk): number {
    this.byId.set(c.entry.id, c);
    return this.list.push(c) - 1;
  }

  /** Adds the references to the tensors of the chunk held at `list[at]`. */
  private index(c: AttachedChunk, at: number): void {
    const tensors = c.entry.tensors;
    if (tensors.length > TENSOR_SLOTS) throw new HmmProtocolError('BAD_RESPONSE', `chunk '${c.entry.id}' lists over ${TENSOR_SLOTS} tensors`);
    const base = at * TENSOR_SLOTS;
    for (let t = 0; t < tensors.length; t++) {
      const name = tensors[t]!.name;
      const ref = base + t;
      const had = this.byTensor.get(name);
      if (had === undefined) this.byTensor.set(name, ref);
      else if (typeof had === 'number') this.byTensor.set(name, [had, ref]);
      else had.push(ref);
    }
  }

  get entries(): ChunkManifestEntry[] {
    return [...this.byId.values()].map((c) => c.entry);
  }
  get size(): number {
    return this.byId.size;
  }

  chunk(id: string): AttachedChunk {
    const c = this.byId.get(id);
    if (!c) throw new NotFoundError('NOT_FOUND', `chunk '${id}' is not in this attached set`);
    return c;
  }

  /** Where a tensor's bytes start in this process; with replicas, the one on `device` (default: the lowest). */
  tensor(name: string, device?: number): DevicePointer {
    return this.tensorInfo(name, device).ptr;
  }
  tensorInfo(name: string, device?: number): { ptr: DevicePointer; location: TensorLocation; entry: ChunkManifestEntry } {
    const refs = this.byTensor.get(name);
    if (refs === undefined) throw new NotFoundError('NOT_FOUND', `tensor '${name}' is not in this attached set`);
    let best: { chunk: AttachedChunk; location: TensorLocation } | undefined;
    for (const ref of typeof refs === 'number' ? [refs] : refs) {
      const chunk = this.list[Math.floor(ref / TENSOR_SLOTS)]!;
      const d = chunk.entry.device;
      if (device === undefined ? best === undefined || d < best.chunk.entry.device : d === device) {
        best = { chunk, location: chunk.entry.tensors[ref % TENSOR_SLOTS]! };
      }
    }
    if (!best) throw new NotFoundError('NOT_FOUND', `tensor '${name}' has no replica on device ${device} in this attached set`);
    return { ptr: best.chunk.ptr.add(best.location.offset), location: best.location, entry: best.chunk.entry };
  }

  /**
   * Moves every chunk of `other` into this set (other ends empty): what a process attached
   * ahead (an executor started before its layout) and what it attaches at init make one set.
   */
  absorb(other: AttachedSet): void {
    for (const c of other.list) {
      if (!c) continue;
      if (this.byId.has(c.entry.id)) throw new HmmProtocolError('BAD_RESPONSE', `chunk '${c.entry.id}' is in both attached sets`);
    }
    const moved = other.list.filter((c): c is AttachedChunk => c !== undefined);
    const at = moved.map((c) => this.hold(c));
    moved.forEach((c, i) => this.index(c, at[i]!));
    other.byId.clear();
    other.list.length = 0;
    other.byTensor.clear();
  }

  /**
   * Unmaps and releases the given chunks in this process (ids not in the set are ignored), and
   * forgets their tensors. The daemon's hold is separate (HmmClient.detach).
   */
  drop(ids: Iterable<string>): void {
    const gone = new Set<number>();
    let where: Map<AttachedChunk, number> | undefined;
    for (const id of ids) {
      const c = this.byId.get(id);
      if (!c) continue;
      this.byId.delete(id);
      where ??= new Map(this.list.flatMap((x, i) => (x ? [[x, i] as const] : [])));
      const index = where.get(c)!;
      this.list[index] = undefined; // the packed references of the others keep their index
      gone.add(index);
      c.dispose();
    }
    if (gone.size === 0) return;
    for (const [name, refs] of this.byTensor) {
      const kept = (typeof refs === 'number' ? [refs] : refs).filter((ref) => !gone.has(Math.floor(ref / TENSOR_SLOTS)));
      if (kept.length === 0) this.byTensor.delete(name);
      else this.byTensor.set(name, kept.length === 1 ? kept[0]! : kept);
    }
  }

  /** Unmaps and releases every chunk in this process. Idempotent. */
  dispose(): void {
    for (const c of this.byId.values()) c.dispose();
    this.byId.clear();
    this.list.length = 0;
    this.byTensor.clear();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}

interface Pending {
  op: Op;
  resolve: (reply: { result: unknown; fds: number[] }) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
  onPartial?: (m: PartialResponse, fds: number[]) => void;
  /** The first failure while handling partial batches; reported with the final reply. */
  failure?: Error;
}

export class HmmClient implements Disposable {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private failure: Error | undefined;
  private info!: HelloResult;

  private constructor(
    private readonly channel: UnixChannel,
    readonly rt: Runtime,
    readonly socketPath: string,
    private readonly timeoutMs: number,
  ) {
    channel.onMessage((m) => this.onMessage(m));
    channel.closed.then((error) =>
      this.fail(new HmmProtocolError('DISCONNECTED', `the HMM daemon at ${socketPath} closed the connection${error ? `: ${error.message}` : ''}`)),
    );
  }

  /** Connects and says hello; the daemon must run the same backend as `rt`. */
  static async connect(socketPath: string, rt: Runtime, options: HmmClientOptions = {}): Promise<HmmClient> {
    const client = new HmmClient(UnixChannel.connect(socketPath), rt, socketPath, options.timeoutMs ?? 30_000);
    try {
      const args: RequestArgs<'hello'> = { pid: rt.importPid() };
      if (options.name !== undefined) args.name = options.name;
      client.info = (await client.call('hello', args)).result;
      if (client.info.backend !== rt.backend) {
        throw new InvalidArgumentError('rt', `a ${client.info.backend} runtime like the daemon's (this one is ${rt.backend})`);
      }
    } catch (e) {
      client.close();
      throw e;
    }
    return client;
  }

  /** The daemon's answer to hello: session id, backend, device count, granularity, daemon pid. */
  get hello(): HelloResult {
    return this.info;
  }
  get session(): string {
    return this.info.session;
  }

  /**
   * Every chunk and KV pool of the daemon. `tensors: false`: without the chunks' tensor lists (empty),
   * for a client that only picks ids to attach (an attach's entries carry the tensors of what it attached).
   */
  manifest(options: { tensors?: boolean } = {}): Promise<HmmManifest> {
    return this.result('manifest', options.tensors === false ? { tensors: false } : {});
  }

  /** Holds the chunks (all weights and KV chunks when ids is omitted) and maps them here. */
  async attach(ids?: string[], options: AttachOptions = {}): Promise<AttachedSet> {
    const set = new AttachedSet(this.rt, options.access ?? ((e) => [e.device]));
    try {
      const { result, fds } = await this.call('attach', ids ? { ids } : {}, (m, fds) => set.add(m, fds));
      set.add(result, fds);
    } catch (e) {
      // The daemon still holds what it attached for this session until detach() or close().
      set.dispose();
      throw e;
    }
    return set;
  }

  /** Drops the session's hold (all chunks when omitted); returns the ids the daemon freed. */
  async detach(ids?: string[]): Promise<string[]> {
    return (await this.result('detach', ids ? { ids } : {})).freed;
  }

  /** A scratch chunk only this session holds (freed when it detaches it or disconnects), mapped here. */
  async workspace(device: number, size: number, options: AttachOptions = {}): Promise<AttachedChunk> {
    const { result, fds } = await this.call('workspace', { device, size });
    try {
      const access = options.access?.(result.entry) ?? [result.entry.device];
      return importGroup(this.rt, [{ entry: result.entry, handle: sharedHandle(result.handle, fds) }], access, noTimings())[0]!;
    } finally {
      closeFds(fds);
    }
  }

  async kvAllocate(request: string, device: number, count: number): Promise<number[]> {
    return (await this.result('kv.allocate', { request, device, count })).blocks;
  }
  async kvFree(request: string): Promise<void> {
    await this.result('kv.free', { request });
  }
  async kvTable(request: string): Promise<BlockTableEntry | null> {
    return (await this.result('kv.table', { request })).table;
  }

  /** The daemon's on-device checksum (emoe_checksum_u32) of a tensor's bytes or a whole chunk. */
  async checksum(what: { tensor: string } | { chunk: string }): Promise<bigint> {
    return BigInt((await this.result('checksum', what)).checksum);
  }

  stats(): Promise<HmmStats> {
    return this.result('stats', {});
  }
  async ping(): Promise<void> {
    await this.result('ping', {});
  }

  /** Closes the connection: the daemon ends the session and frees what only it held. */
  close(): void {
    this.channel.close();
    this.fail(new HmmProtocolError('DISCONNECTED', `the connection to the HMM daemon at ${this.socketPath} was closed`));
  }
  [Symbol.dispose](): void {
    this.close();
  }

  // ---- requests and replies ----

  /** A request whose reply carries no descriptors. */
  private async result<O extends Op>(op: O, args: RequestArgs<O>): Promise<Result<O>> {
    const { result, fds } = await this.call(op, args);
    closeFds(fds); // none are expected
    return result;
  }

  private call<O extends Op>(
    op: O,
    args: RequestArgs<O>,
    onPartial?: (m: PartialResponse, fds: number[]) => void,
  ): Promise<{ result: Result<O>; fds: number[] }> {
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    const data = encode({ id, op, ...args });
    if (data.byteLength > MAX_MESSAGE_BYTES) {
      return Promise.reject(new HmmProtocolError('TOO_LARGE', `${op} request of ${data.byteLength} bytes exceeds the limit of ${MAX_MESSAGE_BYTES}`));
    }
    return new Promise<{ result: unknown; fds: number[] }>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new HmmProtocolError('TIMEOUT', `no reply to '${op}' from the HMM daemon at ${this.socketPath} within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      const p: Pending = { op, resolve, reject, timer };
      if (onPartial) p.onPartial = onPartial;
      this.pending.set(id, p);
      try {
        this.channel.send(data);
      } catch (e) {
        this.settle(id);
        reject(e as Error);
      }
    }).then(({ result, fds }) => {
      const parsed = RESULT_SCHEMAS[op].safeParse(result);
      if (parsed.success) return { result: parsed.data as Result<O>, fds };
      closeFds(fds);
      throw new HmmProtocolError('BAD_RESPONSE', `unreadable reply to '${op}': ${parsed.error.issues[0]?.message}`);
    });
  }

  private settle(id: number): Pending | undefined {
    const p = this.pending.get(id);
    if (p) {
      clearTimeout(p.timer);
      this.pending.delete(id);
    }
    return p;
  }

  private onMessage({ data, fds }: ChannelMessage): void {
    let m;
    try {
      m = ResponseSchema.parse(JSON.parse(data.toString('utf8')));
    } catch (e) {
      closeFds(fds);
      this.fail(new HmmProtocolError('BAD_RESPONSE', `unreadable message from the HMM daemon: ${(e as Error).message.slice(0, 200)}`));
      this.channel.close();
      return;
    }
    if (m.id === CONNECTION_ID) {
      // About the connection (e.g. FORBIDDEN): every request fails with it and the connection ends.
      closeFds(fds);
      if (!m.ok && 'error' in m) {
        this.fail(errorFromWire('connect', m.error));
        this.channel.close();
      }
      return;
    }
    const p = this.pending.get(m.id);
    if (!p) return closeFds(fds); // a reply to a request that timed out
    if ('partial' in m) return this.onPartial(p, m, fds);
    this.settle(m.id);
    if (!m.ok) {
      closeFds(fds);
      return p.reject(errorFromWire(p.op, m.error));
    }
    if (p.failure) {
      closeFds(fds);
      return p.reject(p.failure);
    }
    p.resolve({ result: m.result, fds });
  }

  /** A batch before the final reply: handled at once (so its descriptors close early), failures kept for the end. */
  private onPartial(p: Pending, m: PartialResponse, fds: number[]): void {
    p.timer.refresh();
    if (!p.onPartial || p.failure) {
      closeFds(fds);
      p.failure ??= new HmmProtocolError('BAD_RESPONSE', `unexpected partial reply to '${p.op}'`);
      return;
    }
    try {
      p.onPartial(m, fds);
    } catch (e) {
      p.failure = e as Error;
    }
  }

  private fail(error: Error): void {
    this.failure ??= error;
    for (const id of [...this.pending.keys()]) this.settle(id)?.reject(this.failure);
  }
}
