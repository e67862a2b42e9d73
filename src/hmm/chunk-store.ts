// The chunk store: every physical chunk the HMM owns, where each named tensor
// lives, who holds each chunk, and per-device accounting by kind. Chunks are
// created exportable (so executors can import them) and mapped once into the
// HMM's own address space with access for their device, so the HMM can fill,
// copy and checksum them.
import { closeSync } from 'node:fs';

import { BASIC_KERNELS_SOURCE } from '../runtime/basic-kernels.js';
import { runEach } from '../runtime/cleanup.js';
import { InvalidArgumentError, NotFoundError } from '../runtime/errors.js';
import { arg, type Module } from '../runtime/kernel.js';
import type { Chunk, DevicePointer, SharedHandle, VirtualRange } from '../runtime/memory.js';
import type { Runtime } from '../runtime/runtime.js';
import type { Event, Stream } from '../runtime/stream.js';
import type { ChunkKind, ChunkPlan, TensorLocation } from './placement.js';

export interface StoredChunk {
  readonly plan: ChunkPlan;
  readonly chunk: Chunk;
  /** The HMM's own mapping of the chunk (access: the chunk's device). */
  readonly range: VirtualRange;
  /** Who keeps the chunk alive: "hmm" (resident), session ids, layout ids. Freed when empty. */
  readonly holders: Set<string>;
  /** Devices the HMM's mapping grants access to (allocate, then grantAccess). */
  readonly access: ReadonlySet<number>;
  /**
   * Its shareable handle, exported once and kept until the chunk is freed: on CUDA an
   * export costs about 1.6 ms for a 600 MB chunk (it grows with the size), so attaches
   * must not pay it each time.
   */
  exported?: SharedHandle;
}

/** A chunk created and mapped ahead of need, waiting for `allocate` to bind it to a plan. */
interface Spare {
  readonly chunk: Chunk;
  readonly range: VirtualRange;
  readonly access: ReadonlySet<number>;
  /** The chunk id whose bytes it holds (fillSpares), once its copy completed; undefined: none known. */
  content?: string;
  /** A fillSpares copy into it is in flight: it is neither taken nor counted meanwhile. */
  filling?: boolean;
}

/** Unmaps and frees a chunk's mapping, then releases the chunk (also when the first fails). */
function freeMapped(x: { range: VirtualRange; chunk: Chunk }): void {
  try {
    x.range.dispose();
  } finally {
    x.chunk.dispose();
  }
}

/**
 * Chunks being made by ChunkStore.allocateOffThread: every address is final from the start
 * (spares taken at once, the rest reserved), and the memory behind the reserved ones is made
 * on a worker thread, in order, in groups.
 */
export interface OffThreadAllocation {
  /** By plan index: the stored chunk once it exists (spares at once), else undefined. */
  readonly chunks: ReadonlyArray<StoredChunk | undefined>;
  /** Main-thread milliseconds spent taking spares and reserving addresses. */
  readonly reserveMs: number;
  /** Milliseconds of worker-thread calls so far, and their count. */
  readonly makeMs: number;
  readonly calls: number;
  /** Resolves once chunks[0 .. upto) all exist; rejects with the first failure to make one. */
  until(upto: number): Promise<void>;
  /**
   * After a failure (or to give up): waits for the call in flight, then frees every chunk this
   * allocation made or took and every address it reserved. Idempotent.
   */
  cancel(): Promise<void>;
}

type TensorIndex = Map<string, Map<number, { chunkId: string; location: TensorLocation }>>;

/** Indexes a chunk's tensors on its device (name → device → where). */
function indexTensors(index: TensorIndex, plan: ChunkPlan): void {
  for (const t of plan.tensors) {
    let replicas = index.get(t.name);
    if (!replicas) index.set(t.name, (replicas = new Map()));
    replicas.set(plan.device, { chunkId: plan.id, location: t });
  }
}

/** Drops a chunk's tensors from the index (those still pointing at it). */
function unindexTensors(index: TensorIndex, plan: ChunkPlan): void {
  for (const t of plan.tensors) {
    const replicas = index.get(t.name);
    if (replicas?.get(plan.device)?.chunkId === plan.id) replicas.delete(plan.device);
    if (replicas?.size === 0) index.delete(t.name);
  }
}

interface Pending {
  readonly plan: ChunkPlan;
  readonly range: VirtualRange;
  readonly access: number[];
  /** Why it will not be made (its allocation failed; it stays pending until cancelled). */
  failed?: Error;
}

export interface TensorRef {
  chunk: StoredChunk;
  location: TensorLocation;
  ptr: DevicePointer;
}

export interface DeviceAccounting {
  device: number;
  weightBytes: number;
  kvBytes: number;
  workspaceBytes: number;
  /** Spare chunks kept created and mapped ahead of a scale onto the device (ChunkStore.addSpares). */
  spareBytes: number;
  /** Of those, the bytes of spares filled with a chunk's bytes ahead of a scale (ChunkStore.fillSpares). */
  filledSpareBytes: number;
  /** Bytes the device reports free (all processes). */
  freeBytes: number;
  totalBytes: number;
}

export class ChunkStore {
  private readonly chunks = new Map<string, StoredChunk>();
  /** Tensor name → device → where it lives (a tensor may have replicas on several devices). */
  private readonly tensors: TensorIndex = new Map();
  private readonly streams = new Map<number, Stream>();
  /** Copy streams by device and peer ("on>peer"), on the first. */
  private readonly copyStreams = new Map<string, Stream>();
  private readonly modules = new Map<number, Promise<Module>>();
  /** Spare chunks by device, then size: created, mapped and granted access ahead, bound to no plan yet. */
  private readonly spares = new Map<number, Map<number, Spare[]>>();
  private taken = 0;
  private filledTaken = 0;
  /** Filled spares by the id whose bytes they hold (fillSpares). */
  private readonly filled = new Map<string, Spare>();
  /** Chunks allocateOffThread has reserved and not made yet, by id, and their tensors (name → device → where). */
  private readonly pending = new Map<string, Pending>();
  /** whenStored's waiters, by pending chunk id. */
  private readonly storedWaiters = new Map<string, Array<{ resolve: () => void; reject: (e: Error) => void }>>();
  private readonly pendingTensors: TensorIndex = new Map();

  constructor(readonly rt: Runtime) {}

  get size(): number {
    return this.chunks.size;
  }
  ids(): string[] {
    return [...this.chunks.keys()];
  }
  all(): StoredChunk[] {
    return [...this.chunks.values()];
  }
  has(id: string): boolean {
    return this.chunks.has(id);
  }
  get(id: string): StoredChunk {
    const c = this.chunks.get(id);
    if (!c) throw new NotFoundError('NOT_FOUND', `no chunk '${id}' in the HMM`);
    return c;
  }

  /**
   * Allocates every planned chunk for `holder`, mapped here with access for
   * `access(plan)` (default: the chunk's own device), all or nothing: if any
   * allocation fails, the chunks this call created are freed and the error is
   * rethrown, leaving the store as it was.
   */
  allocate(plans: readonly ChunkPlan[], holder = 'hmm', access?: (plan: ChunkPlan) => number[]): StoredChunk[] {
    const made: StoredChunk[] = [];
    try {
      for (const plan of plans) {
        this.checkNew(plan);
        const devices = access ? access(plan) : [plan.device];
        made.push(this.register(plan, holder, this.takeSpare(plan.device, plan.size, devices) ?? this.create(plan.device, plan.size, devices)));
      }
    } catch (e) {
      for (const c of made) this.free(c);
      throw e;
    }
    return made;
  }

  /**
   * The chunk of `plan` made from a spare of its device that fillSpares filled as `plan.id` (its
   * bytes are already those of the chunks it was copied from), mapped with access for at least
   * `access`; undefined when there is none (allocate and copy it then).
   */
  adoptFilled(plan: ChunkPlan, holder: string, access: readonly number[] = [plan.device]): StoredChunk | undefined {
    this.checkNew(plan);
    const spare = this.takeSpare(plan.device, plan.size, access, plan.id);
    if (!spare) return undefined;
    this.filledTaken++;
    return this.register(plan, holder, spare);
  }

  /**
   * Allocates like allocate() with the driver's work off the main thread: spares are taken and
   * the other chunks' addresses reserved at once, one reservation per chunk size cut into
   * ranges (Runtime.reserveMany; so `futureTensor` resolves every tensor of
   * `plans` from now on), then their chunks are made by Runtime.createMappedChunks, `group` at a
   * time, in plan order, one call at a time (calls in parallel were no faster on 4 x H100:
   * scripts/bench-chunk-alloc.mjs), each chunk registered as its call returns. Serving steps keep
   * the event loop meanwhile: on 4 x H100 the same 1,104 chunks blocked it 60-90 ms created
   * here, 2-15 ms as calls. Throws (taking nothing) when a plan is not new; a failure to make a
   * chunk rejects `until` and leaves the rest to `cancel`.
   */
  allocateOffThread(plans: readonly ChunkPlan[], holder = 'hmm', access?: (plan: ChunkPlan) => number[],
    { group = 64 }: { group?: number } = {}): OffThreadAllocation {
    if (!Number.isSafeInteger(group) || group < 1) throw new InvalidArgumentError('group', `a positive integer (got ${String(group)})`);
    const t0 = performance.now();
    const chunks: Array<StoredChunk | undefined> = plans.map(() => undefined);
    const waiting: Array<{ index: number; entry: Pending }> = [];
    const ranges: VirtualRange[] = [];
    try {
      const rest: Array<{ index: number; plan: ChunkPlan; devices: number[] }> = [];
      for (const [index, plan] of plans.entries()) {
        this.checkNew(plan);
        const devices = access ? access(plan) : [plan.device];
        const spare = this.takeSpare(plan.device, plan.size, devices);
        if (spare) chunks[index] = this.register(plan, holder, spare);
        else rest.push({ index, plan, devices });
      }
      // The addresses: one reservation per chunk size, cut into ranges.
      const bySize = new Map<number, typeof rest>();
      for (const r of rest) {
        const list = bySize.get(r.plan.size);
        if (list) list.push(r);
        else bySize.set(r.plan.size, [r]);
      }
      for (const [size, list] of bySize) {
        const cut = this.rt.reserveMany(list.length, size);
        ranges.push(...cut);
        list.forEach(({ index, plan, devices }, k) => {
          const entry: Pending = { plan, range: cut[k]!, access: [...devices] };
          this.addPending(entry);
          waiting.push({ index, entry });
        });
      }
      waiting.sort((a, b) => a.index - b.index); // made in plan order
    } catch (e) {
      for (const c of chunks) if (c) this.free(c);
      for (const w of waiting) this.dropPending(w.entry, false);
      for (const r of ranges) r.dispose();
      throw e;
    }
    const stats = { reserveMs: performance.now() - t0, makeMs: 0, calls: 0 };
    let madeUpTo = 0; // waiting[0 .. madeUpTo) are made
    let failure: unknown;
    let cancelled = false;
    const waiters = new Set<() => void>();
    const wake = () => {
      for (const w of waiters) w();
      waiters.clear();
    };
    const makeAll = async () => {
      while (madeUpTo < waiting.length && !cancelled) {
        // The next `group` waiting chunks, one call per (device, size, access) among them, in order.
        const next = waiting.slice(madeUpTo, madeUpTo + group);
        const calls = new Map<string, typeof next>();
        for (const w of next) {
          const key = `${w.entry.plan.device}/${w.entry.plan.size}/${w.entry.access.join(',')}`;
          const list = calls.get(key);
          if (list) list.push(w);
          else calls.set(key, [w]);
        }
        for (const list of calls.values()) {
          const { plan, access: devices } = list[0]!.entry;
          const t = performance.now();
          const made = await this.rt.createMappedChunks(plan.device, plan.size, list.map((w) => w.entry.range), devices,
            { exportable: true, exportNow: this.exportOnCreate });
          stats.makeMs += performance.now() - t;
          stats.calls++;
          list.forEach((w, k) => {
            this.dropPending(w.entry, false);
            chunks[w.index] = this.register(w.entry.plan, holder, { chunk: made[k]!, range: w.entry.range, access: new Set(devices) });
            this.settleStored(w.entry.plan.id);
          });
        }
        madeUpTo += next.length;
        wake();
      }
    };
    const making = makeAll().catch((e: unknown) => {
      failure = e;
      // Whoever waits for a chunk this call will not make learns now (they stay pending until cancel frees their addresses).
      const error = e instanceof Error ? e : new Error(String(e));
      for (const w of waiting) {
        if (this.pending.get(w.entry.plan.id) !== w.entry) continue;
        w.entry.failed = error;
        this.settleStored(w.entry.plan.id, error);
      }
      wake();
    });
    // Index in `plans` → how many waiting chunks precede it (until() maps plan indices to waiting ones).
    const waitingBefore: number[] = [];
    {
      let k = 0;
      for (let i = 0; i <= plans.length; i++) {
        waitingBefore.push(k);
        if (k < waiting.length && waiting[k]!.index === i) k++;
      }
    }
    const self = this;
    return {
      chunks,
      get reserveMs() { return stats.reserveMs; },
      get makeMs() { return stats.makeMs; },
      get calls() { return stats.calls; },
      async until(upto: number): Promise<void> {
        const need = waitingBefore[Math.max(0, Math.min(upto, plans.length))]!;
        for (;;) {
          if (madeUpTo >= need) return;
          if (failure !== undefined) throw failure;
          if (cancelled) throw new InvalidArgumentError('allocation', 'not cancelled while waited for');
          await new Promise<void>((resolve) => waiters.add(resolve));
        }
      },
      async cancel(): Promise<void> {
        if (cancelled) return;
        cancelled = true;
        await making;
        for (const c of chunks) if (c && self.chunks.get(c.plan.id) === c) self.release(c.plan.id, holder);
        for (const w of waiting) if (self.pending.get(w.entry.plan.id) === w.entry) self.dropPending(w.entry, true);
        wake();
      },
    };
  }

  /** A pointer to tensor `name` on `device`: in a stored chunk, or in one allocateOffThread is still making (its address is final). */
  futureTensor(name: string, device: number): DevicePointer {
    const p = this.pendingTensors.get(name)?.get(device);
    if (p) return this.pending.get(p.chunkId)!.range.at(p.location.offset);
    return this.tensor(name, device).ptr;
  }

  /** Chunks allocateOffThread has reserved and not made yet. */
  get pendingCount(): number {
    return this.pending.size;
  }

  /** Whether allocateOffThread is making chunk `id` (reserved, not made yet). */
  isPending(id: string): boolean {
    return this.pending.has(id);
  }

  /** The plans of the chunks allocateOffThread is making (what an HMM manifest lists besides the stored ones). */
  pendingPlans(): ChunkPlan[] {
    return [...this.pending.values()].map((p) => p.plan);
  }

  /**
   * Resolves once chunk `id` is stored: at once when it is; when allocateOffThread has made it when it is
   * pending. Rejects (NotFoundError) when it is neither, and when its making fails or is cancelled.
   * (An HMM daemon's attach of a chunk being made waits for it.)
   */
  whenStored(id: string): Promise<void> {
    if (this.chunks.has(id)) return Promise.resolve();
    const p = this.pending.get(id);
    if (!p) return Promise.reject(new NotFoundError('NOT_FOUND', `no chunk '${id}' in the HMM`));
    if (p.failed) return Promise.reject(p.failed);
    return new Promise((resolve, reject) => {
      let list = this.storedWaiters.get(id);
      if (!list) this.storedWaiters.set(id, (list = []));
      list.push({ resolve, reject });
    });
  }

  /** Settles whenStored's waiters for `id`: stored, or not (with `error`, or NOT_FOUND). */
  private settleStored(id: string, error?: Error): void {
    const list = this.storedWaiters.get(id);
    if (!list) return;
    this.storedWaiters.delete(id);
    const stored = this.chunks.has(id);
    for (const w of list) {
      if (stored) w.resolve();
      else w.reject(error ?? new NotFoundError('NOT_FOUND', `chunk '${id}' was not made (its allocation was cancelled)`));
    }
  }

  private addPending(entry: Pending): void {
    this.pending.set(entry.plan.id, entry);
    indexTensors(this.pendingTensors, entry.plan);
  }

  /** Forgets a pending chunk; `free`: its reserved addresses too (nothing was made there). */
  private dropPending(entry: Pending, free: boolean): void {
    this.pending.delete(entry.plan.id);
    unindexTensors(this.pendingTensors, entry.plan);
    if (free) {
      entry.range.dispose();
      this.settleStored(entry.plan.id);
    }
  }

  /** Refuses a plan whose chunk id, or one of whose tensors on its device, the store has already (or is making). */
  private checkNew(plan: ChunkPlan): void {
    if (this.chunks.has(plan.id) || this.pending.has(plan.id)) throw new InvalidArgumentError('plan.id', `new (chunk '${plan.id}' exists)`);
    for (const t of plan.tensors) {
      if (this.tensors.get(t.name)?.has(plan.device) || this.pendingTensors.get(t.name)?.has(plan.device)) {
        throw new InvalidArgumentError('tensor', `new on its device ('${t.name}' is already stored on device ${plan.device})`);
      }
    }
  }

  private register(plan: ChunkPlan, holder: string, { chunk, range, access }: Spare): StoredChunk {
    const stored: StoredChunk = { plan, chunk, range, holders: new Set([holder]), access: new Set(access) };
    this.chunks.set(plan.id, stored);
    indexTensors(this.tensors, plan);
    return stored;
  }

  /** A new exportable chunk mapped here with access for `devices`; nothing left behind on failure. */
  private create(device: number, size: number, devices: readonly number[]): Spare {
    const chunk = this.rt.createChunk(device, size, { exportable: true });
    let range: VirtualRange | undefined;
    try {
      range = this.rt.reserve(size);
      range.map(0, chunk);
      range.setAccess(0, size, devices);
    } catch (e) {
      range?.dispose();
      chunk.dispose();
      throw e;
    }
    return { chunk, range, access: new Set(devices) };
  }

  /**
   * A spare of that device and size whose mapping grants at least `devices`, taken out of the
   * spares: one filled as `content` when given, else preferably one holding nothing known (a
   * filled one is used as a blank chunk only when no blank one is left). Never one being filled.
   */
  private takeSpare(device: number, size: number, devices: readonly number[], content?: string): Spare | undefined {
    const list = this.spares.get(device)?.get(size);
    if (!list) return undefined;
    const fits = (sp: Spare) => !sp.filling && devices.every((d) => sp.access.has(d));
    const pick = (want: (sp: Spare) => boolean): Spare | undefined => {
      // From the end: a scale takes ~2,000-3,000 in a row, and the first match is nearly always the last one.
      for (let i = list.length - 1; i >= 0; i--) {
        if (!fits(list[i]!) || !want(list[i]!)) continue;
        const [spare] = list.splice(i, 1);
        this.taken++;
        return spare;
      }
      return undefined;
    };
    if (content !== undefined) {
      // By the index: a scale adopts ~1,000-2,000 in a row (a scan per adoption made it quadratic).
      const sp = this.filled.get(content);
      const i = sp ? list.lastIndexOf(sp) : -1;
      if (!sp || i < 0 || !fits(sp)) return undefined;
      list.splice(i, 1);
      this.taken++;
      this.setContent(sp, undefined);
      return sp;
    }
    const spare = pick((sp) => sp.content === undefined) ?? pick(() => true);
    if (spare) this.setContent(spare, undefined);
    return spare;
  }

  /** Sets what a spare is known to hold, keeping the index of filled spares. */
  private setContent(sp: Spare, content: string | undefined): void {
    if (sp.content !== undefined && this.filled.get(sp.content) === sp) this.filled.delete(sp.content);
    sp.content = content;
    if (content !== undefined) {
      const old = this.filled.get(content);
      if (old && old !== sp) old.content = undefined; // one spare per id: the older one is blank from now on
      this.filled.set(content, sp);
    }
  }

  /**
   * Fills spares of `device` ahead of a scale with the bytes of the chunks the scale would copy
   * there: for each fill, a blank spare of the source's size (mapped for the device and the
   * source's device) gets a copy of `source`, pushed on the source device's copy stream, and is
   * then known as `id` (adoptFilled takes it for the chunk of that id, with no copy). Fills whose
   * id a spare of the device already holds are skipped, and so are those no blank spare fits. With
   * `keep` (the ids the device's fills want, this call's and others'), a spare holding an id
   * outside it counts as blank (its content is of no use any more).
   * Resolves with the number filled once their copies completed; on a failed copy, the spares
   * of this call are left blank and the error is rethrown. Chunk bytes never change once loaded
   * (weights), so a filled spare stays valid while its id's chunks exist anywhere.
   */
  async fillSpares(device: number, fills: ReadonlyArray<{ id: string; source: StoredChunk }>, keep?: ReadonlySet<string>): Promise<number> {
    const taken: Array<{ spare: Spare; id: string }> = [];
    const streams = new Set<Stream>();
    const events: Event[] = [];
    try {
      for (const { id, source } of fills) {
        const list = this.spares.get(device)?.get(source.plan.size) ?? [];
        const held = this.filled.get(id);
        if (held && list.includes(held)) continue;
        const blank = (sp: Spare) => sp.content === undefined || (keep !== undefined && !keep.has(sp.content));
        const spare = list.find((sp) => !sp.filling && blank(sp) && sp.access.has(device) && sp.access.has(source.plan.device));
        if (!spare) continue;
        this.setContent(spare, undefined);
        spare.filling = true;
        taken.push({ spare, id });
        const s = this.copyStream(source.plan.device, device);
        streams.add(s);
        s.copy(spare.range.at(0), source.range.at(0), source.plan.size);
      }
      await Promise.all([...streams].map((s) => {
        const ev = this.rt.createEvent(s.device);
        events.push(ev);
        return ev.record(s).synchronize();
      }));
      for (const t of taken) this.setContent(t.spare, t.id);
      return taken.length;
    } finally {
      // Also on failure: every copy queued has ended (synchronize settled), so the spares may be reused, blank.
      await Promise.allSettled([...streams].map((s) => s.synchronize()));
      for (const t of taken) t.spare.filling = false;
      for (const ev of events) ev.dispose();
    }
  }

  /** Spares of `device` filled by fillSpares (holding a chunk id's bytes), their bytes, and the spares adoptFilled has taken so far. */
  filledSpares(device: number): number {
    let n = 0;
    for (const list of this.spares.get(device)?.values() ?? []) for (const sp of list) if (sp.content !== undefined) n++;
    return n;
  }
  filledSpareBytes(device: number): number {
    let bytes = 0;
    for (const [size, list] of this.spares.get(device) ?? []) for (const sp of list) if (sp.content !== undefined) bytes += size;
    return bytes;
  }
  /**
   * The mapping of the spare of `device` filled as `id` (fillSpares), undefined when there is none:
   * adoptFilled(plan of `id`) later registers that very mapping, so a pointer into it stays valid
   * from spare to chunk (a standby engine made ahead reads its weights there).
   */
  filledRange(id: string, device: number): VirtualRange | undefined {
    return this.filledSpare(id, device)?.range;
  }
  /** The spare chunk of `device` filled as `id` (as filledRange), undefined when there is none. */
  filledChunk(id: string, device: number): Chunk | undefined {
    return this.filledSpare(id, device)?.chunk;
  }
  private filledSpare(id: string, device: number): Spare | undefined {
    // The index holds spares only (taking or freeing one clears its content): no list scan, a standby
    // engine made ahead asks for ~1,000-2,000 of them in a row.
    const sp = this.filled.get(id);
    return !sp || sp.filling || sp.chunk.device !== device ? undefined : sp;
  }
  get filledTakenCount(): number {
    return this.filledTaken;
  }

  /**
   * Creates `count` spare chunks of `size` bytes on `device`, mapped with access for `access`:
   * a later `allocate` of a chunk of that device and size (whose access those cover) takes one
   * instead of calling the driver, so the driver's cost (about 0.2 ms per 12 MiB chunk on H200,
   * most of it setting access) is paid ahead, off the path of a scale. All or nothing.
   */
  addSpares(device: number, size: number, count: number, access: readonly number[] = [device]): void {
    const devices = this.checkSpares(device, size, count, access);
    const made: Spare[] = [];
    try {
      for (let i = 0; i < count; i++) made.push(this.create(device, size, devices));
    } catch (e) {
      try {
        runEach(made.map((s) => () => freeMapped(s)));
      } catch {
        // Tried again later (memory.ts); the cause is what the caller sees.
      }
      throw e;
    }
    this.pushSpares(device, size, made);
  }

  /**
   * addSpares with the driver's work off the main thread: the addresses reserved as one
   * reservation (Runtime.reserveMany), the chunks made by Runtime.createMappedChunks in calls of
   * `group`, each call's spares added as it returns. Each call is all or nothing; on a failure the
   * spares of the calls before it stay, and the error is rethrown. Returns the spares added.
   */
  async addSparesOffThread(device: number, size: number, count: number, access: readonly number[] = [device],
    { group = 64 }: { group?: number } = {}): Promise<number> {
    const devices = this.checkSpares(device, size, count, access);
    if (!Number.isSafeInteger(group) || group < 1) throw new InvalidArgumentError('group', `a positive integer (got ${String(group)})`);
    if (count === 0) return 0;
    const ranges = this.rt.reserveMany(count, size);
    let added = 0;
    try {
      for (; added < count; added += Math.min(group, count - added)) {
        const mine = ranges.slice(added, added + group);
        const chunks = await this.rt.createMappedChunks(device, size, mine, devices, { exportable: true, exportNow: this.exportOnCreate });
        this.pushSpares(device, size, chunks.map((chunk, k) => ({ chunk, range: mine[k]!, access: new Set(devices) })));
      }
    } finally {
      for (const r of ranges.slice(added)) r.dispose(); // never mapped: nothing made there
    }
    return added;
  }

  private checkSpares(device: number, size: number, count: number, access: readonly number[]): number[] {
    if (!Number.isSafeInteger(count) || count < 0) throw new InvalidArgumentError('count', `a non-negative integer (got ${String(count)})`);
    if (!Number.isSafeInteger(size) || size <= 0 || size % this.rt.granularity(device) !== 0) {
      throw new InvalidArgumentError('size', `a positive multiple of device ${device}'s granularity ${this.rt.granularity(device)} (got ${String(size)})`);
    }
    return [...new Set([device, ...access])].sort((a, b) => a - b);
  }

  private pushSpares(device: number, size: number, made: Spare[]): void {
    let bySize = this.spares.get(device);
    if (!bySize) this.spares.set(device, (bySize = new Map()));
    bySize.set(size, [...(bySize.get(size) ?? []), ...made]);
  }

  /** Whether the spares could serve every request (device, size, and devices its mapping must grant) at once. */
  sparesCover(requests: ReadonlyArray<{ device: number; size: number; access: readonly number[] }>): boolean {
    // Spares counted by device, size and access set (one or two sets in practice), each request taking one that covers it.
    const left = new Map<Spare[], Array<{ access: ReadonlySet<number>; n: number }>>();
    const counted = (list: Spare[]) => {
      let sets = left.get(list);
      if (sets) return sets;
      const bySet = new Map<string, { access: ReadonlySet<number>; n: number }>();
      for (const sp of list) {
        const sig = [...sp.access].sort((a, b) => a - b).join(',');
        const e = bySet.get(sig);
        if (e) e.n++;
        else bySet.set(sig, { access: sp.access, n: 1 });
      }
      left.set(list, (sets = [...bySet.values()]));
      return sets;
    };
    for (const r of requests) {
      const list = this.spares.get(r.device)?.get(r.size);
      const match = list && counted(list).find((e) => e.n > 0 && e.access.has(r.device) && r.access.every((d) => e.access.has(d)));
      if (!match) return false;
      match.n--;
    }
    return true;
  }

  /** Spare chunks `allocate` has taken so far (instead of creating chunks). */
  get sparesTaken(): number {
    return this.taken;
  }

  /** Spare chunks on `device` (of `size` bytes only, when given). */
  spareCount(device: number, size?: number): number {
    const sizes = this.spareSizes(device);
    return size === undefined ? [...sizes.values()].reduce((a, n) => a + n, 0) : (sizes.get(size) ?? 0);
  }

  /** Spare sizes and counts on `device`. */
  spareSizes(device: number): Map<number, number> {
    const out = new Map<number, number>();
    for (const [size, list] of this.spares.get(device) ?? []) if (list.length > 0) out.set(size, list.length);
    return out;
  }

  /**
   * Frees spares of `device` (of `size` only, when given) beyond `keep` of them, never one being
   * filled: blank ones first, then those holding an id outside `wanted`, then any. Returns how
   * many it freed.
   */
  trimSpares(device: number, keep = 0, size?: number, wanted: ReadonlySet<string> = new Set()): number {
    let freed = 0;
    const bySize = this.spares.get(device);
    const passes: Array<(sp: Spare) => boolean> = [(sp) => sp.content === undefined, (sp) => !wanted.has(sp.content!), () => true];
    for (const [s, list] of bySize ?? []) {
      if (size !== undefined && s !== size) continue;
      for (const pass of passes) {
        for (let i = list.length - 1; i >= 0 && list.length > keep; i--) {
          const sp = list[i]!;
          if (sp.filling || !pass(sp)) continue;
          list.splice(i, 1);
          this.setContent(sp, undefined);
          freeMapped(sp);
          freed++;
        }
      }
      if (list.length === 0) bySize!.delete(s);
    }
    return freed;
  }

  /** Where a tensor lives; with replicas, the one on `device` (default: the lowest device). */
  tensor(name: string, device?: number): TensorRef {
    const replicas = this.tensors.get(name);
    if (!replicas) throw new NotFoundError('NOT_FOUND', `no tensor '${name}' in the HMM`);
    const d = device ?? Math.min(...replicas.keys());
    const t = replicas.get(d);
    if (!t) throw new NotFoundError('NOT_FOUND', `tensor '${name}' has no replica on device ${d} (it is on ${[...replicas.keys()].join(', ')})`);
    const chunk = this.get(t.chunkId);
    return { chunk, location: t.location, ptr: chunk.range.at(t.location.offset) };
  }
  tensorNames(): string[] {
    return [...this.tensors.keys()];
  }

  /**
   * The chunk's shareable handle for other processes, exported at the first call and
   * kept: the store owns it (an fd is closed when the chunk is freed), so callers send
   * it and never close it.
   */
  shared(id: string): SharedHandle {
    const c = this.get(id);
    c.exported ??= c.chunk.export();
    return c.exported;
  }

  /**
   * Chunks made off the main thread (allocateOffThread, addSparesOffThread) are exported there too, their
   * handle kept for shared(): an HMM daemon sets this (HmmDaemonOptions.preExport), so its attaches of
   * chunks made since it started export nothing on its thread (60-100 us a chunk on H100).
   */
  exportOnCreate = false;

  /** Exports every chunk not exported yet (a daemon does this before serving, so attaches pay no export). */
  exportAll(): number {
    let n = 0;
    for (const c of this.chunks.values()) {
      if (c.exported || c.plan.kind === 'workspace') continue;
      c.exported = c.chunk.export();
      n++;
    }
    return n;
  }

  /**
   * Adds `devices` to the devices the chunk's HMM mapping grants access to (one set-access call
   * with the union; nothing when it grants them already). Returns whether it called the driver.
   * A chunk every device may read can be the source of a copy issued on the target's stream
   * (a pull), so the target needs access for its own device only (pacing.ts).
   */
  grantAccess(id: string, devices: readonly number[]): boolean {
    const c = this.get(id);
    if (devices.every((d) => c.access.has(d))) return false;
    const all = [...new Set([...c.access, ...devices])].sort((a, b) => a - b);
    c.range.setAccess(0, c.plan.size, all);
    for (const d of all) (c.access as Set<number>).add(d);
    return true;
  }

  retain(id: string, holder: string): void {
    this.get(id).holders.add(holder);
  }

  /**
   * Drops `holder` from the chunk; frees it when nobody holds it. Returns true when freed. With
   * `asSpare`, a chunk nobody holds any more is not freed but kept, mapped as it is, as a spare
   * of its device filled as its own id (fillSpares skips that id on that device, adoptFilled takes
   * it): a scale-down's leaving device keeps the weights a later scale-up onto it would copy back
   * (chunk ids are `${group}@${device}`), and trimSpares frees what no plan wants.
   */
  release(id: string, holder: string, options: { asSpare?: boolean } = {}): boolean {
    const c = this.chunks.get(id);
    if (!c || !c.holders.delete(holder)) return false;
    if (c.holders.size > 0) return false;
    if (options.asSpare) this.toSpare(c);
    else this.free(c);
    return true;
  }

  /** Unregisters a chunk nobody holds and keeps its chunk and mapping as a spare filled as its id. */
  private toSpare(c: StoredChunk): void {
    this.unregister(c);
    const spare: Spare = { chunk: c.chunk, range: c.range, access: new Set(c.access) };
    let bySize = this.spares.get(c.plan.device);
    if (!bySize) this.spares.set(c.plan.device, (bySize = new Map()));
    let list = bySize.get(c.plan.size);
    if (!list) bySize.set(c.plan.size, (list = []));
    list.push(spare);
    this.setContent(spare, c.plan.id);
  }

  /** Drops `holder` everywhere (a session that went away). Returns the ids freed. */
  releaseHolder(holder: string): string[] {
    const freed: string[] = [];
    for (const id of [...this.chunks.keys()]) if (this.release(id, holder)) freed.push(id);
    return freed;
  }

  /** Unregisters and frees a chunk (a free the driver refuses is rethrown, and tried again later: memory.ts). */
  private free(c: StoredChunk): void {
    this.unregister(c);
    freeMapped(c);
  }

  /** Drops the chunk from the store's indexes and closes its export (its chunk and mapping stay). */
  private unregister(c: StoredChunk): void {
    this.chunks.delete(c.plan.id);
    unindexTensors(this.tensors, c.plan);
    if (c.exported?.kind === 'fd') {
      try {
        closeSync(c.exported.fd);
      } catch {
        // already closed: nothing to release
      }
    }
    c.exported = undefined;
  }

  accounting(): DeviceAccounting[] {
    const byKind = (device: number, kind: ChunkKind) =>
      this.all().filter((c) => c.plan.device === device && c.plan.kind === kind).reduce((a, c) => a + c.plan.size, 0);
    return Array.from({ length: this.rt.deviceCount }, (_, device) => {
      const info = this.rt.deviceInfo(device);
      return {
        device,
        weightBytes: byKind(device, 'weight'),
        kvBytes: byKind(device, 'kv'),
        workspaceBytes: byKind(device, 'workspace'),
        spareBytes: [...this.spareSizes(device)].reduce((a, [size, n]) => a + size * n, 0),
        filledSpareBytes: this.filledSpareBytes(device),
        freeBytes: info.freeBytes,
        totalBytes: info.totalBytes,
      };
    });
  }

  /** The HMM's copy stream on a device (one per device, created on first use). */
  stream(device: number): Stream {
    let s = this.streams.get(device);
    if (!s) {
      s = this.rt.createStream(device);
      this.streams.set(device, s);
    }
    return s;
  }

  /**
   * A copy stream on device `on` for copies between it and device `peer` (one per ordered pair,
   * created on first use): a device copying to or from several others drives their links in
   * parallel instead of one copy after another on a single stream.
   */
  copyStream(on: number, peer: number): Stream {
    const key = `${on}>${peer}`;
    let s = this.copyStreams.get(key);
    if (!s) {
      s = this.rt.createStream(on);
      this.copyStreams.set(key, s);
    }
    return s;
  }

  /** The runtime's basic kernels on a device, compiled once. */
  basicKernels(device: number): Promise<Module> {
    let m = this.modules.get(device);
    if (!m) {
      m = this.rt.loadModule(device, { format: 'cuda', data: BASIC_KERNELS_SOURCE, name: 'emoe_basic.cu' });
      this.modules.set(device, m);
      m.catch(() => this.modules.delete(device));
    }
    return m;
  }

  /** Checksum computed on the device (emoe_checksum_u32) over [ptr, ptr+bytes), bytes rounded down to 4. */
  async checksumAt(device: number, ptr: DevicePointer, bytes: number): Promise<bigint> {
    const mod = await this.basicKernels(device);
    const g = this.rt.granularity(device);
    const out = this.rt.createChunk(device, g);
    const range = this.rt.reserve(g);
    let s: ReturnType<ChunkStore['stream']> | undefined;
    try {
      range.map(0, out);
      range.setAccess(0, g, [device]);
      s = this.stream(device);
      s.memset(range.at(0), 0, 8);
      const words = Math.floor(bytes / 4);
      const blocks = Math.max(1, Math.min(1024, Math.ceil(words / 256)));
      s.launch(mod.kernel('emoe_checksum_u32'), { grid: blocks, block: 256 }, [range.at(0), ptr, arg.u64(words)]);
      const raw = await this.rt.read(range.at(0), 8, s);
      return new DataView(raw.buffer, raw.byteOffset, 8).getBigUint64(0, true);
    } catch (e) {
      // What was queued (the memset) ends before the output is unmapped below.
      await s?.synchronize().catch(() => undefined);
      throw e;
    } finally {
      range.dispose();
      out.dispose();
    }
  }

  checksumTensor(name: string, device?: number): Promise<bigint> {
    const t = this.tensor(name, device);
    return this.checksumAt(t.chunk.plan.device, t.ptr, t.location.bytes);
  }
  checksumChunk(id: string): Promise<bigint> {
    const c = this.get(id);
    return this.checksumAt(c.plan.device, c.range.at(0), c.plan.size);
  }

  /** Frees everything (the daemon is shutting down). */
  dispose(): void {
    // Everything is tried (a free the driver refuses is tried again later: memory.ts).
    const spares = [...this.spares.values()].flatMap((bySize) => [...bySize.values()].flat());
    try {
      runEach([...[...this.chunks.values()].map((c) => () => this.free(c)), ...spares.map((sp) => () => freeMapped(sp))]);
    } catch {
      // As above.
    }
    this.spares.clear();
    this.filled.clear();
    for (const s of [...this.streams.values(), ...this.copyStreams.values()]) s.dispose();
    this.streams.clear();
    this.copyStreams.clear();
    for (const m of this.modules.values()) m.then((x) => x.dispose(), () => undefined);
    this.modules.clear();
  }
}

