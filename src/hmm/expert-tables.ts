// Virtual expert tables (DESIGN.md "virtual expert tables"; DeploymentOptions.expertTables): one
// reserved address range per device holding every routed expert of the model at a fixed slot —
// layer l's expert e at (l * experts + e) * stride — of which only the experts the device holds
// are mapped: their HMM chunk mapped a second time, no memory of its own. A layer's experts are
// then one strided tensor on each device; moving expert e onto a device maps the new chunk into
// its slot there (always free: a device never holds an expert twice), and the old device's slot
// is unmapped after the switch-over. Nothing large is ever reallocated. A filled standby chunk can
// be mapped ahead, under the id it will be adopted as (mapAhead): the scale that adopts that very
// chunk finds it mapped.
import { InvalidArgumentError } from '../runtime/errors.js';
import type { Chunk, DevicePointer, VirtualRange } from '../runtime/memory.js';
import type { Runtime } from '../runtime/runtime.js';
import type { ChunkStore } from './chunk-store.js';
import type { ChunkPlan } from './placement.js';

/** A chunk and what it holds: an HMM chunk (StoredChunk), or one imported from the daemon ({ plan: entry, chunk }). */
export interface PlannedChunk {
  readonly plan: ChunkPlan;
  readonly chunk: Chunk;
}

const EXPERT_GROUP = /^L(\d+)\.E(\d+)$/;

/** Layer and expert of an expert chunk's plan (group "L<layer>.E<expert>"), else undefined. */
export function expertOf(plan: ChunkPlan): { layer: number; expert: number } | undefined {
  const m = EXPERT_GROUP.exec(plan.group);
  return m ? { layer: Number(m[1]), expert: Number(m[2]) } : undefined;
}

/** What resolves a tensor name on a device to a pointer (the executor's WeightSource has this shape). */
export interface TensorSource {
  tensor(name: string, device: number): DevicePointer;
}

export interface ExpertTableStats {
  /** Devices with a table reserved: its first address, the chunks mapped into it, and of those the ones mapped ahead (mapAhead). */
  devices: Array<{ device: number; base: bigint; mapped: number; ahead: number }>;
  /** Bytes of address space per table (layers * experts * stride), and the slot stride. */
  tableBytes: number;
  stride: number;
}

export class ExpertTables implements Disposable {
  /** Where each expert tensor lies in its expert's chunk: the same offset on every device. */
  private readonly tensors = new Map<string, { layer: number; expert: number; offset: number }>();
  private readonly ranges = new Map<number, VirtualRange>();
  /** Chunk id -> its slot mapping (the physical chunk, and whether it was mapped ahead and not taken yet); `${device}:${slot}` -> chunk id. */
  private readonly mapped = new Map<string, { device: number; slot: number; size: number; chunk: Chunk; ahead: boolean }>();
  private readonly bySlot = new Map<string, string>();
  private disposed = false;

  private constructor(private readonly rt: Runtime, readonly layers: number, readonly experts: number, readonly stride: number) {}

  /** Tables for the experts of `store`'s chunks (fromPlans). */
  static fromStore(store: ChunkStore, layers: number, experts: number): ExpertTables {
    return ExpertTables.fromPlans(store.rt, store.all().map((c) => c.plan), layers, experts);
  }

  /**
   * Tables for the experts the chunk plans describe (every expert must have a chunk on some device:
   * the tensors' offsets are read from them), `layers` x `experts` slots per device. Reserves
   * nothing yet: a device's range is reserved at its first use.
   */
  static fromPlans(rt: Runtime, all: Iterable<ChunkPlan>, layers: number, experts: number): ExpertTables {
    if (!Number.isSafeInteger(layers) || layers < 1) throw new InvalidArgumentError('layers', `a positive integer (got ${String(layers)})`);
    if (!Number.isSafeInteger(experts) || experts < 1) throw new InvalidArgumentError('experts', `a positive integer (got ${String(experts)})`);
    const plans = [...all].filter((p) => expertOf(p) !== undefined);
    if (plans.length === 0) throw new InvalidArgumentError('store', 'an HMM holding expert chunks (groups "L<layer>.E<expert>")');
    const stride = Math.max(...plans.map((p) => p.size));
    const tables = new ExpertTables(rt, layers, experts, stride);
    const seen = new Set<number>();
    for (const p of plans) {
      const { layer, expert } = expertOf(p)!;
      if (layer >= layers || expert >= experts) {
        throw new InvalidArgumentError('store', `expert chunks of layers below ${layers} and experts below ${experts} (${p.id} is not)`);
      }
      seen.add(layer * experts + expert);
      for (const t of p.tensors) {
        const known = tables.tensors.get(t.name);
        if (known && known.offset !== t.offset) {
          throw new InvalidArgumentError('store', `expert chunks packed alike on every device ('${t.name}' lies at ${known.offset} and at ${t.offset})`);
        }
        tables.tensors.set(t.name, { layer, expert, offset: t.offset });
      }
    }
    if (seen.size !== layers * experts) {
      throw new InvalidArgumentError('store', `a chunk for every expert of ${layers} layers x ${experts} experts (${seen.size} found)`);
    }
    return tables;
  }

  /** Bytes of address space of one device's table. */
  get tableBytes(): number {
    return this.layers * this.experts * this.stride;
  }

  /** Device `device`'s table, reserved at its first use. */
  range(device: number): VirtualRange {
    if (this.disposed) throw new InvalidArgumentError('expert tables', 'used before dispose');
    let r = this.ranges.get(device);
    if (!r) {
      r = this.rt.reserve(this.tableBytes, this.rt.granularity(device));
      this.ranges.set(device, r);
    }
    return r;
  }

  /** Where tensor `name` of an expert lies in `device`'s table (whether or not it is mapped now), else undefined (not an expert tensor). */
  pointer(name: string, device: number): DevicePointer | undefined {
    const t = this.tensors.get(name);
    if (!t) return undefined;
    return this.range(device).at((t.layer * this.experts + t.expert) * this.stride + t.offset);
  }

  /** `base` with every expert tensor resolved into the tables instead (the other tensors as `base` gives them). */
  weights(base: TensorSource): TensorSource {
    return { tensor: (name, device) => this.pointer(name, device) ?? base.tensor(name, device) };
  }

  /** Whether `ptr` points into one of these tables (diagnostics: where an engine reads its experts). */
  contains(ptr: DevicePointer): boolean {
    return [...this.ranges.values()].includes(ptr.range);
  }

  /** Whether chunk `id` is mapped into its device's table (as a stored chunk, not ahead). */
  has(id: string): boolean {
    const m = this.mapped.get(id);
    return m !== undefined && !m.ahead;
  }

  /** Ids of the chunks mapped into the tables. */
  mappedIds(): string[] {
    return [...this.mapped.keys()];
  }

  /**
   * Maps expert chunk `c` into its slot of its device's table, readable by that device (the one that
   * computes it). Returns 'kept' when it is mapped already, 'taken' when this very chunk was mapped
   * ahead under its id (mapAhead; now it is the chunk's), else 'mapped' (a chunk mapped ahead under
   * its id that is another physical chunk is unmapped first). A slot holding another id is refused.
   */
  map(c: PlannedChunk): 'kept' | 'taken' | 'mapped' {
    const m = this.mapped.get(c.plan.id);
    if (m && m.chunk === c.chunk) {
      if (!m.ahead) return 'kept';
      m.ahead = false;
      return 'taken';
    }
    if (m) this.unmap(c.plan.id);
    this.place(c.plan, c.chunk, false);
    return 'mapped';
  }

  /**
   * Maps `chunk`, a standby chunk filled with the bytes of the expert chunk `plan` describes, into
   * that expert's slot under `plan.id` ahead of the scale that will adopt it; unmapped like any other
   * (retain, unmap) when no scale takes it. Mapped already under that id: left as it is.
   */
  mapAhead(plan: ChunkPlan, chunk: Chunk): void {
    if (this.mapped.get(plan.id)?.chunk === chunk) return;
    if (this.mapped.has(plan.id)) this.unmap(plan.id);
    this.place(plan, chunk, true);
  }

  private place(plan: ChunkPlan, chunk: Chunk, ahead: boolean): void {
    const x = expertOf(plan);
    if (!x) throw new InvalidArgumentError('chunk', `an expert chunk (group "L<layer>.E<expert>"; ${plan.id} is not one)`);
    const device = plan.device;
    if (chunk.device !== device) throw new InvalidArgumentError('chunk', `a chunk of device ${device}, as ${plan.id} says (it is on ${chunk.device})`);
    if (x.layer >= this.layers || x.expert >= this.experts) {
      throw new InvalidArgumentError('chunk', `an expert of layers below ${this.layers} and experts below ${this.experts} (${plan.id})`);
    }
    const slot = x.layer * this.experts + x.expert;
    const key = `${device}:${slot}`;
    const holder = this.bySlot.get(key);
    if (holder !== undefined) throw new InvalidArgumentError('chunk', `a free slot (slot ${slot} of device ${device} maps ${holder}; unmap it first)`);
    const size = chunk.size;
    if (size > this.stride) throw new InvalidArgumentError('chunk', `at most ${this.stride} bytes, the table's stride (${plan.id} has ${size})`);
    const range = this.range(device);
    const offset = slot * this.stride;
    range.map(offset, chunk);
    try {
      range.setAccess(offset, size, [device]);
    } catch (e) {
      range.unmap(offset, size);
      throw e;
    }
    this.mapped.set(plan.id, { device, slot, size, chunk, ahead });
    this.bySlot.set(key, plan.id);
  }

  /** Unmaps chunk `id` from its slot; false when it was not mapped. */
  unmap(id: string): boolean {
    const m = this.mapped.get(id);
    if (!m) return false;
    this.ranges.get(m.device)!.unmap(m.slot * this.stride, m.size);
    this.mapped.delete(id);
    this.bySlot.delete(`${m.device}:${m.slot}`);
    return true;
  }

  /**
   * Unmaps every chunk `keep` rejects; returns how many. One the driver refuses to unmap stays
   * mapped (a later retain tries it again) and the first such error is thrown once every other
   * chunk has been tried.
   */
  retain(keep: (id: string) => boolean): number {
    const r = this.unmapEach([...this.mapped.keys()].filter((id) => !keep(id)));
    if (r.failed) throw r.failed.error;
    return r.n;
  }

  /** Unmaps each of `ids` whatever the others do; counts those unmapped and keeps the first refusal. */
  private unmapEach(ids: readonly string[]): { n: number; failed?: { error: unknown } } {
    let n = 0;
    let failed: { error: unknown } | undefined;
    for (const id of ids) {
      try {
        if (this.unmap(id)) n++;
      } catch (e) {
        failed ??= { error: e };
      }
    }
    return failed ? { n, failed } : { n };
  }

  /**
   * As retain, `group` unmaps at a time with a turn of the event loop before each group (an unmap
   * costs the driver tens of µs: ~1,400 at once would hold a serving loop for tens of ms).
   */
  async retainPaced(keep: (id: string) => boolean, group = 64): Promise<number> {
    const drop = [...this.mapped.keys()].filter((id) => !keep(id));
    let n = 0;
    let failed: { error: unknown } | undefined;
    for (let i = 0; i < drop.length; i += group) {
      await new Promise<void>((r) => setImmediate(r));
      const r = this.unmapEach(drop.slice(i, i + group));
      n += r.n;
      failed ??= r.failed;
    }
    if (failed) throw failed.error;
    return n;
  }

  /** Maps (map) the expert chunks of `chunks` not mapped yet (others skipped); on failure unmaps those it mapped and rethrows. Returns the ids it mapped or took. */
  mapAll(chunks: Iterable<PlannedChunk>): string[] {
    const done: string[] = [];
    try {
      for (const c of chunks) {
        if (!expertOf(c.plan) || this.map(c) === 'kept') continue;
        done.push(c.plan.id);
      }
    } catch (e) {
      for (const id of done) this.unmap(id);
      throw e;
    }
    return done;
  }

  get stats(): ExpertTableStats {
    const per = new Map<number, { mapped: number; ahead: number }>([...this.ranges.keys()].map((d) => [d, { mapped: 0, ahead: 0 }]));
    for (const m of this.mapped.values()) {
      const n = per.get(m.device)!;
      n.mapped++;
      if (m.ahead) n.ahead++;
    }
    const devices = [...per].sort((a, b) => a[0] - b[0]).map(([device, n]) => ({ device, base: this.ranges.get(device)!.base, ...n }));
    return { devices, tableBytes: this.tableBytes, stride: this.stride };
  }

  /** Unmaps every chunk and frees the ranges (the chunks themselves are the HMM's). Idempotent. */
  dispose(): void {
    if (this.disposed) return;
    for (const id of [...this.mapped.keys()]) {
      try {
        this.unmap(id);
      } catch {
        // Best effort: the range's free below unmaps what is left.
      }
    }
    for (const r of this.ranges.values()) r.dispose();
    this.ranges.clear();
    this.disposed = true;
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}
