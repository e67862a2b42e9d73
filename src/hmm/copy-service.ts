// Copies chunks between devices for the scaling layer: a new chunk on the target
// device receives the bytes of an existing chunk, and when several devices hold
// identical copies the transfer is striped across them, each source copying its
// stripe on its own stream (NVLink links to one target add up).
import { InvalidArgumentError } from '../runtime/errors.js';
import type { Event } from '../runtime/stream.js';
import type { ChunkStore, StoredChunk } from './chunk-store.js';
import type { ChunkPlan } from './placement.js';

export interface Transfer {
  /** The chunk to reproduce (its plan gives group, kind, size and tensors). */
  sourceId: string;
  targetDevice: number;
  /** Further chunks with identical bytes on other devices to stripe from (replicas). */
  extraSourceIds?: string[];
  /** Id of the new chunk; default `${group}@${targetDevice}`. */
  targetId?: string;
}

export interface CopyProgress {
  bytesDone: number;
  bytesTotal: number;
  transfersDone: number;
  transfersTotal: number;
}

export interface CopyTimings {
  /** Creating and mapping the target chunks. */
  allocateMs: number;
  /** From the first copy queued to the last one finished: what the links delivered. */
  copyMs: number;
  bytes: number;
}

export interface CopyOptions {
  onTimings?: (t: CopyTimings) => void;
  holder?: string;
  /** Stripes are cut on this alignment (default 2 MiB). */
  stripeAlignment?: number;
  onProgress?: (p: CopyProgress) => void;
}

export interface Stripe {
  sourceIndex: number;
  offset: number;
  bytes: number;
}

/** Splits `size` bytes into one contiguous stripe per source, as even as the alignment allows (pure). */
export function stripes(size: number, sources: number, alignment: number): Stripe[] {
  if (sources < 1) throw new InvalidArgumentError('sources', 'at least one source');
  const units = Math.ceil(size / alignment);
  const out: Stripe[] = [];
  let unit = 0;
  for (let i = 0; i < sources && unit < units; i++) {
    const n = Math.ceil((units - unit) / (sources - i));
    const offset = unit * alignment;
    const bytes = Math.min(size, (unit + n) * alignment) - offset;
    out.push({ sourceIndex: i, offset, bytes });
    unit += n;
  }
  return out;
}

export function targetPlan(source: ChunkPlan, device: number, id?: string): ChunkPlan {
  return { ...source, id: id ?? `${source.group}@${device}`, device, tensors: source.tensors.map((t) => ({ ...t, shape: [...t.shape] })) };
}

export class CopyService {
  constructor(private readonly store: ChunkStore) {}

  /**
   * Creates the target chunks and fills them, all or nothing: on any failure
   * every target chunk this call created is freed and the sources are untouched.
   */
  async copy(transfers: readonly Transfer[], options: CopyOptions = {}): Promise<StoredChunk[]> {
    const holder = options.holder ?? 'hmm';
    const alignment = options.stripeAlignment ?? 2 * 1024 * 1024;
    const jobs = transfers.map((t) => {
      const sources = [t.sourceId, ...(t.extraSourceIds ?? [])].map((id) => this.store.get(id));
      const base = sources[0]!.plan;
      for (const s of sources) {
        if (s.plan.size !== base.size) throw new InvalidArgumentError('extraSourceIds', `chunks of the same size as ${base.id}`);
        if (s.plan.device === t.targetDevice) throw new InvalidArgumentError('targetDevice', `a device other than the source ${s.plan.id}`);
      }
      return { sources, plan: targetPlan(base, t.targetDevice, t.targetId) };
    });
    // Each source device copies on its own stream, so the target is mapped with access for the sources
    // from the start (the HMM's own mapping; granting and revoking per copy costs two driver calls a chunk).
    const sourceDevices = new Map(jobs.map((j) => [j.plan.id, [...new Set(j.sources.map((s) => s.plan.device))]]));
    let t0 = performance.now();
    const targets = this.store.allocate(jobs.map((j) => j.plan), holder, (p) => [p.device, ...sourceDevices.get(p.id)!]);
    const allocateMs = performance.now() - t0;
    t0 = performance.now();
    const bytesTotal = jobs.reduce((a, j) => a + j.plan.size, 0);
    let bytesDone = 0;
    let transfersDone = 0;
    const events: Event[] = [];
    try {
      const waits: Array<Promise<void>> = [];
      jobs.forEach((job, i) => {
        const target = targets[i]!;
        let left = 0;
        for (const stripe of stripes(job.plan.size, job.sources.length, alignment)) {
          const src = job.sources[stripe.sourceIndex]!;
          const s = this.store.stream(src.plan.device);
          s.copy(target.range.at(stripe.offset), src.range.at(stripe.offset), stripe.bytes);
          const ev = this.store.rt.createEvent(src.plan.device).record(s);
          events.push(ev);
          left++;
          waits.push(ev.synchronize().then(() => {
            bytesDone += stripe.bytes;
            if (--left === 0) transfersDone++;
            options.onProgress?.({ bytesDone, bytesTotal, transfersDone, transfersTotal: jobs.length });
          }));
        }
      });
      const results = await Promise.allSettled(waits);
      const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      // Surface asynchronous errors from every stream used (a failed copy poisons its stream's device).
      const used = new Set(jobs.flatMap((j) => j.sources.map((s) => s.plan.device)));
      await Promise.all([...used].map((d) => this.store.stream(d).synchronize()));
      if (failed) throw failed.reason;
      options.onTimings?.({ allocateMs, copyMs: performance.now() - t0, bytes: bytesTotal });
    } catch (e) {
      // Copies already queued must finish before their targets are unmapped.
      const used = new Set(jobs.flatMap((j) => j.sources.map((s) => s.plan.device)));
      await Promise.allSettled([...used].map((d) => this.store.stream(d).synchronize()));
      for (const t of targets) this.store.release(t.plan.id, holder);
      throw e;
    } finally {
      for (const ev of events) ev.dispose();
    }
    return targets;
  }
}
