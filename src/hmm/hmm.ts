// The HMM (HBM Management Module) in-process: owns every weight and KV chunk on
// every device, and hands them to executors by reference. The daemon
// (daemon.ts) puts this object behind a Unix socket; tests and the embedded
// default may use it directly.
import { InvalidArgumentError, NotFoundError } from '../runtime/errors.js';
import type { SharedHandle } from '../runtime/memory.js';
import type { Runtime } from '../runtime/runtime.js';
import { ChunkStore, type DeviceAccounting, type StoredChunk } from './chunk-store.js';
import { KvManager, type KvPoolInfo } from './kv-pool.js';
import { type ChunkPlan, type PlacementOptions, type TensorSpec, planChunks } from './placement.js';
import type { Checkpoint } from './safetensors.js';
import { fillSynthetic, type SyntheticOptions } from './synthetic.js';
import { loadCheckpoint } from './weight-loader.js';

export const RESIDENT = 'hmm';

/** What the manifest says about a chunk: its plan, as sent to executors. */
export type ChunkManifestEntry = ChunkPlan;

export interface HmmManifest {
  backend: string;
  deviceCount: number;
  granularity: number;
  chunks: ChunkManifestEntry[];
  kvPools: KvPoolInfo[];
}

export function manifestEntry(p: ChunkPlan, tensors = true): ChunkManifestEntry {
  return { id: p.id, group: p.group, device: p.device, kind: p.kind, size: p.size, tensors: tensors ? p.tensors : [] };
}

/** One attached client (an executor). Everything it holds is released when it ends. */
export class HmmSession {
  readonly attached = new Set<string>();
  private ended = false;
  constructor(readonly hmm: Hmm, readonly id: string) {}

  get isEnded(): boolean {
    return this.ended;
  }
  private check(): void {
    if (this.ended) throw new InvalidArgumentError('session', `open (session ${this.id} has ended)`);
  }

  /** Holds the chunks (all when ids is omitted) and returns their manifest entries. */
  attach(ids?: readonly string[]): ChunkManifestEntry[] {
    this.check();
    // Without ids: every weight and KV chunk (never another session's workspace).
    const chunks = ids ? ids.map((id) => this.hmm.store.get(id)) : this.hmm.store.all().filter((c) => c.plan.kind !== 'workspace');
    for (const c of chunks) {
      this.hmm.store.retain(c.plan.id, this.id);
      this.attached.add(c.plan.id);
    }
    return chunks.map((c) => manifestEntry(c.plan));
  }

  /** The shareable handle of an attached chunk: owned by the store (send it, never close it). */
  exportChunk(id: string): SharedHandle {
    this.check();
    if (!this.attached.has(id)) throw new InvalidArgumentError('id', `a chunk this session attached ('${id}' is not)`);
    return this.hmm.store.shared(id);
  }

  /** Drops the chunks (all when omitted); frees those nobody else holds. */
  detach(ids?: readonly string[]): string[] {
    const list = ids ?? [...this.attached];
    const freed: string[] = [];
    for (const id of list) {
      if (!this.attached.delete(id)) continue;
      if (this.hmm.store.release(id, this.id)) freed.push(id);
    }
    return freed;
  }

  /** A chunk owned only by this session (scratch space); freed when the session ends. */
  allocateWorkspace(device: number, size: number): ChunkManifestEntry {
    this.check();
    const g = this.hmm.rt.granularity(device);
    const plan: ChunkPlan = {
      id: `ws:${this.id}:${this.hmm.nextId()}@${device}`,
      group: `ws:${this.id}`,
      device,
      kind: 'workspace',
      size: Math.max(g, Math.ceil(size / g) * g),
      tensors: [],
    };
    this.hmm.store.allocate([plan], this.id);
    this.attached.add(plan.id);
    return manifestEntry(plan);
  }

  /** Ends the session: releases everything it held (a closed connection ends it too). */
  end(): string[] {
    if (this.ended) return [];
    const freed = this.detach();
    freed.push(...this.hmm.store.releaseHolder(this.id));
    this.ended = true;
    this.hmm.forget(this);
    return freed;
  }
}

export class Hmm implements Disposable {
  readonly store: ChunkStore;
  readonly kv: KvManager;
  private readonly sessions = new Map<string, HmmSession>();
  private counter = 0;

  constructor(readonly rt: Runtime) {
    this.store = new ChunkStore(rt);
    this.kv = new KvManager(this.store, RESIDENT);
  }

  /** @internal */
  nextId(): number {
    return ++this.counter;
  }

  placement(specs: readonly TensorSpec[], options: Partial<PlacementOptions> = {}): ChunkPlan[] {
    const devices = new Set(specs.map((s) => s.device));
    for (const d of devices) {
      if (d >= this.rt.deviceCount) throw new InvalidArgumentError('device', `an ordinal below ${this.rt.deviceCount} (a tensor names device ${d})`);
    }
    return planChunks(specs, { granularity: this.rt.granularity(0), ...options });
  }

  /** Synthetic weights generated on the devices. */
  async loadSynthetic(specs: readonly TensorSpec[], options: SyntheticOptions & { placement?: Partial<PlacementOptions> } = {}): Promise<StoredChunk[]> {
    return fillSynthetic(this.store, this.placement(specs, options.placement), { holder: RESIDENT, ...options });
  }

  /**
   * The tensors' weights: read from `checkpoint` (opened with openCheckpoint) when given, else
   * synthetic (`seed`, `scaleFor`). All or nothing either way.
   */
  async loadWeights(specs: readonly TensorSpec[], options: SyntheticOptions & { checkpoint?: Checkpoint; signal?: AbortSignal } = {}): Promise<StoredChunk[]> {
    const { checkpoint, signal, seed, scaleFor, ...common } = options;
    if (checkpoint) return loadCheckpoint(this.store, this.placement(specs), checkpoint, { holder: RESIDENT, ...common, ...(signal ? { signal } : {}) });
    return this.loadSynthetic(specs, { ...common, ...(seed !== undefined ? { seed } : {}), ...(scaleFor ? { scaleFor } : {}) });
  }

  /** Drops the resident hold on chunks (weights no layout uses any more); attached sessions keep theirs. */
  releaseResident(ids: readonly string[]): string[] {
    return ids.filter((id) => this.store.release(id, RESIDENT));
  }

  /**
   * Every chunk (workspaces aside) and KV pool; `tensors: false` leaves the chunks' tensor lists empty. The chunks
   * being made off the main thread (ChunkStore.allocateOffThread) are listed too: an attach of one waits until it is made.
   */
  manifest(options: { tensors?: boolean } = {}): HmmManifest {
    const tensors = options.tensors !== false;
    return {
      backend: this.rt.backend,
      deviceCount: this.rt.deviceCount,
      granularity: this.rt.granularity(0),
      chunks: [
        ...this.store.all().filter((c) => c.plan.kind !== 'workspace').map((c) => manifestEntry(c.plan, tensors)),
        ...this.store.pendingPlans().map((p) => manifestEntry(p, tensors)),
      ],
      kvPools: this.kv.poolDevices().map((d) => this.kv.info(d)),
    };
  }

  openSession(id = `s${this.nextId()}`): HmmSession {
    if (this.sessions.has(id)) throw new InvalidArgumentError('session', `a new id ('${id}' is open)`);
    const s = new HmmSession(this, id);
    this.sessions.set(id, s);
    return s;
  }
  session(id: string): HmmSession {
    const s = this.sessions.get(id);
    if (!s) throw new NotFoundError('NOT_FOUND', `no session '${id}'`);
    return s;
  }
  sessionIds(): string[] {
    return [...this.sessions.keys()];
  }
  /** @internal */
  forget(s: HmmSession): void {
    this.sessions.delete(s.id);
  }

  accounting(): DeviceAccounting[] {
    return this.store.accounting();
  }

  dispose(): void {
    for (const s of [...this.sessions.values()]) s.end();
    this.kv.dispose();
    this.store.dispose();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}
