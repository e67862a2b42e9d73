// Paced chunk copies for the prepare phase of a scale (and for the vertical
// baseline): the copies of a scale go out in bounded batches, with the serving
// loop given the event loop between batches, and the target chunks are created
// ahead of the copy front in small groups — instead of creating every target
// chunk in one synchronous block and queueing every copy at once.
//
// Why (measured on 4 × H200, docs/benchmarks.md "Elastic scaling under load"):
// throughput during a scale fell to 21–49 % of before. Three things compete with
// the serving steps of the same process while the HMM's CopyService prepares:
//   1. chunk creation: CopyService allocates every target chunk (up to ~1,700 for
//      Qwen3-30B-A3B, each a driver create + map + set-access) in one synchronous
//      call, so no engine step can even be issued meanwhile;
//   2. host waits: it waits for every stripe with its own event.synchronize(), and
//      each of those is a blocking call on libuv's thread pool (4 threads by
//      default) — the forward pass's per-layer waits (idsReady.synchronize()) queue
//      behind ~1,700 copy waits, so the serving step stalls until nearly every
//      copy is done (the 600 ms steps in the timeline);
//   3. the links and copy engines: up to 21 GB queued at once.
// Here: (1) target chunks are created in groups of `allocateGroup`, yielding to
// the event loop between groups, up to `allocateAheadBytes` ahead of the copies;
// (2) each batch of copies costs one host wait (the batch's source streams are
// joined into one event on a join stream), so at most two copy waits occupy the
// thread pool at any time; (3) at most `maxInflightBytes` of copies are queued on
// the devices at once (two batches of half that), and `bytesPerMs` can cap the
// average rate. Between batches the loop yields (setImmediate, or `yieldMs`).
//
// The trade-off: smaller batches and a rate cap leave more of the host, the thread
// pool and the links to the serving steps (throughput during the scale) and make
// the prepare phase longer (scale latency). `maxInflightBytes: Infinity` with no
// rate cap is the fastest paced prepare; `paced: false` is the old CopyService path.
import { InvalidArgumentError } from '../runtime/errors.js';
import type { Event, Stream } from '../runtime/stream.js';
import type { ChunkStore, StoredChunk } from '../hmm/chunk-store.js';
import { type CopyProgress, stripes } from '../hmm/copy-service.js';
import type { ChunkPlan } from '../hmm/placement.js';

const MIB = 1024 * 1024;

export interface PrepareOptions {
  /** false: the HMM's CopyService allocates and copies everything at once (the behaviour before pacing). Default true. */
  paced?: boolean;
  /**
   * Bytes of copies queued on the devices at once (default 2 GiB), in two batches of half that.
   * Infinity: one batch. (Each batch costs a host wait; with 256 MiB batches a 21 GB scale-up
   * spent ~7 ms per batch in round trips, 37 GB/s in all, on H200.)
   */
  maxInflightBytes?: number;
  /** Cap on the average copy rate in bytes per millisecond (1 GB/s = 1e6; default: no cap). */
  bytesPerMs?: number;
  /** Target chunks created per synchronous group before the loop yields (default 8; a scale whose targets are all standby chunks takes them in groups of at least 256). */
  allocateGroup?: number;
  /** How far target chunk creation runs ahead of the copies, in bytes (default maxInflightBytes). */
  allocateAheadBytes?: number;
  /** Milliseconds left to the event loop between batches (default 0: one turn, setImmediate). */
  yieldMs?: number;
  /**
   * Copy calls queued per synchronous group within a batch, the loop given a turn between groups
   * (default Infinity: a batch's copies queued at once). A scale whose standby chunks cover it
   * queues ~1,100-2,800 copies in one batch; `stats.queueMaxBlockMs` says how long that held
   * the loop (10-61 ms on H100/H200; 2-3 ms with 256). A/B with 256 on GPUs (2026-11-26, two
   * runs): no consistent change in the serving work done during a scale, so the default stays.
   */
  queueGroup?: number;
  /**
   * Target chunks made on a worker thread (ChunkStore.allocateOffThread: their addresses reserved
   * at once, the driver's create, map and set-access in calls of `makeGroup`), the copies of a
   * batch issued once its targets exist; the event loop stays with the serving steps. false:
   * created on the main thread in groups of allocateGroup. Default true.
   */
  offThread?: boolean;
  /** Chunks per worker-thread call with offThread (default 64). */
  makeGroup?: number;
}

export const DEFAULT_PREPARE: Required<Omit<PrepareOptions, 'allocateAheadBytes'>> = {
  paced: true,
  maxInflightBytes: 2048 * MIB,
  bytesPerMs: Infinity,
  allocateGroup: 8,
  yieldMs: 0,
  queueGroup: Infinity,
  offThread: true,
  makeGroup: 64,
};

/** One target chunk and the chunks (any store, identical bytes, same size) it is copied from. */
export interface CopyJob {
  plan: ChunkPlan;
  sources: readonly StoredChunk[];
}

export interface PacedCopyOptions extends PrepareOptions {
  /** Holder of the target chunks. */
  holder: string;
  /** Stripes (one per source) are cut on this alignment (default 2 MiB). */
  stripeAlignment?: number;
  onProgress?: (p: CopyProgress) => void;
  /** Called once, as soon as every target chunk exists (their pointers are final; the bytes may still be on their way). */
  onAllocated?: (chunks: readonly StoredChunk[]) => void;
  /**
   * With offThread: called once, as soon as every target's address is final (spares taken, the
   * rest reserved: the target store's futureTensor resolves them), before their memory exists.
   */
  onReserved?: () => void;
}

export interface PacedCopyStats {
  bytes: number;
  chunks: number;
  batches: number;
  /** Copy calls queued (stripes, cut to at most half of maxInflightBytes). */
  pieces: number;
  /** Time spent inside the synchronous chunk creation calls (the loop is blocked meanwhile); offThread: taking spares and reserving addresses. */
  allocateMs: number;
  /** Longest single synchronous chunk creation group. */
  allocateMaxBlockMs: number;
  /** offThread: milliseconds of the worker-thread calls (the event loop free meanwhile), their count, and the time the copies waited for their targets. */
  makeMs?: number;
  makeCalls?: number;
  allocateWaitMs?: number;
  /** Time spent waiting for the rate cap. */
  throttleMs: number;
  /** Longest synchronous stretch of copy queueing (the loop is blocked meanwhile; see queueGroup). */
  queueMaxBlockMs: number;
  /** First copy queued to the last one finished. */
  copyMs: number;
}

/** Checked, defaulted prepare options. */
export function resolvePrepare(...layers: Array<PrepareOptions | undefined>): Required<PrepareOptions> {
  const o: PrepareOptions = Object.assign({}, DEFAULT_PREPARE, ...layers.filter(Boolean));
  const positive = (k: keyof PrepareOptions, v: unknown, allowInf: boolean) => {
    if (typeof v !== 'number' || Number.isNaN(v) || v <= 0 || (!allowInf && !Number.isFinite(v))) {
      throw new InvalidArgumentError(`prepare.${k}`, `a positive number${allowInf ? ' (or Infinity)' : ''} (got ${String(v)})`);
    }
  };
  positive('maxInflightBytes', o.maxInflightBytes, true);
  positive('bytesPerMs', o.bytesPerMs, true);
  if (!Number.isSafeInteger(o.allocateGroup) || o.allocateGroup! < 1) {
    throw new InvalidArgumentError('prepare.allocateGroup', `a positive integer (got ${String(o.allocateGroup)})`);
  }
  if (typeof o.yieldMs !== 'number' || !Number.isFinite(o.yieldMs) || o.yieldMs < 0) {
    throw new InvalidArgumentError('prepare.yieldMs', `a non-negative number of milliseconds (got ${String(o.yieldMs)})`);
  }
  if (o.queueGroup !== Infinity && (!Number.isSafeInteger(o.queueGroup) || o.queueGroup! < 1)) {
    throw new InvalidArgumentError('prepare.queueGroup', `a positive integer or Infinity (got ${String(o.queueGroup)})`);
  }
  if (typeof o.paced !== 'boolean') throw new InvalidArgumentError('prepare.paced', `a boolean (got ${String(o.paced)})`);
  if (typeof o.offThread !== 'boolean') throw new InvalidArgumentError('prepare.offThread', `a boolean (got ${String(o.offThread)})`);
  if (!Number.isSafeInteger(o.makeGroup) || o.makeGroup! < 1) {
    throw new InvalidArgumentError('prepare.makeGroup', `a positive integer (got ${String(o.makeGroup)})`);
  }
  const ahead = o.allocateAheadBytes ?? o.maxInflightBytes!;
  positive('allocateAheadBytes', ahead, true);
  return { ...(o as Required<PrepareOptions>), allocateAheadBytes: ahead };
}

const now = () => performance.now();
const turn = (ms: number) => new Promise<void>((r) => (ms > 0 ? setTimeout(r, ms) : setImmediate(r)));

interface Piece {
  job: number;
  source: StoredChunk;
  offset: number;
  bytes: number;
}

/**
 * Creates the jobs' target chunks in `target` (for `holder`, mapped with access for
 * their sources' devices) and copies them, paced (see the top of this file). All or
 * nothing: on failure, every target chunk this call created is released (after the
 * copies already queued have finished) and the error is rethrown.
 * A source may be on the target's own device (a local copy).
 */
export async function pacedCopy(target: ChunkStore, jobs: readonly CopyJob[], options: PacedCopyOptions): Promise<{ chunks: StoredChunk[]; stats: PacedCopyStats }> {
  const o = resolvePrepare(options);
  const alignment = options.stripeAlignment ?? 2 * MIB;
  const holder = options.holder;
  const rt = target.rt;
  for (const [i, j] of jobs.entries()) {
    if (j.sources.length === 0) throw new InvalidArgumentError(`jobs[${i}].sources`, `at least one chunk to copy ${j.plan.id} from`);
    for (const s of j.sources) {
      if (s.plan.size !== j.plan.size) throw new InvalidArgumentError(`jobs[${i}].sources`, `chunks of ${j.plan.size} bytes like ${j.plan.id} (${s.plan.id} has ${s.plan.size})`);
    }
  }
  // Two batches in flight, each at most half the window; a piece never exceeds a batch.
  const batchBytes = o.maxInflightBytes === Infinity ? Infinity : Math.max(alignment, Math.floor(o.maxInflightBytes / 2 / alignment) * alignment);
  const pieces: Piece[] = [];
  jobs.forEach((job, ji) => {
    for (const st of stripes(job.plan.size, job.sources.length, alignment)) {
      for (let off = 0; off < st.bytes; off += batchBytes) {
        pieces.push({ job: ji, source: job.sources[st.sourceIndex]!, offset: st.offset + off, bytes: Math.min(batchBytes, st.bytes - off) });
      }
    }
  });
  const batches: Piece[][] = [];
  {
    let cur: Piece[] = [];
    let bytes = 0;
    for (const p of pieces) {
      if (cur.length > 0 && bytes + p.bytes > batchBytes) {
        batches.push(cur);
        cur = [];
        bytes = 0;
      }
      cur.push(p);
      bytes += p.bytes;
    }
    if (cur.length > 0) batches.push(cur);
  }
  // Chunks whose last piece is in each batch (transfers done when it completes).
  const lastBatchOf = new Map<number, number>();
  batches.forEach((b, bi) => { for (const p of b) lastBatchOf.set(p.job, bi); });
  const finishing = batches.map(() => 0);
  for (const bi of lastBatchOf.values()) finishing[bi]!++;
  // A job whose sources all grant its target device access is pulled: its copies run on streams
  // of the target device, and the target is mapped for its own device only (one access
  // descriptor: on H200 set-access cost 52 µs per 12 MiB chunk for one device, 148 µs for three).
  // Otherwise it is pushed by its sources' devices, which then need access to the target too.
  const pull = jobs.map((j) => j.sources.every((s) => s.access.has(j.plan.device)));
  const access = new Map<ChunkPlan, number[]>(jobs.map((j, i) =>
    [j.plan, pull[i] ? [j.plan.device] : [...new Set([j.plan.device, ...j.sources.map((s) => s.plan.device)])]]));

  const stats: PacedCopyStats = {
    bytes: jobs.reduce((a, j) => a + j.plan.size, 0), chunks: jobs.length, batches: batches.length, pieces: pieces.length,
    allocateMs: 0, allocateMaxBlockMs: 0, throttleMs: 0, queueMaxBlockMs: 0, copyMs: 0,
  };
  let made: Array<StoredChunk | undefined> = jobs.map(() => undefined);
  let allocated = 0; // jobs[0 .. allocated) exist
  let allocatedBytes = 0;
  // Off the main thread: every address final now, the memory made in order behind it.
  const off = o.offThread ? target.allocateOffThread(jobs.map((j) => j.plan), holder, (p) => access.get(p)!, { group: o.makeGroup }) : undefined;
  if (off) {
    made = off.chunks as Array<StoredChunk | undefined>;
    stats.allocateMs = stats.allocateMaxBlockMs = off.reserveMs;
    stats.allocateWaitMs = 0;
    options.onReserved?.();
  }
  /** Creates target chunks in groups (yielding between groups) until jobs[0 .. upto) exist. */
  const allocateUpTo = async (upto: number, yieldBetween: boolean) => {
    if (off) {
      if (allocated >= upto) return;
      const t = now();
      await off.until(upto);
      stats.allocateWaitMs! += now() - t;
      allocated = upto;
      if (allocated === jobs.length) options.onAllocated?.(made as StoredChunk[]);
      return;
    }
    while (allocated < upto) {
      const end = Math.min(upto, allocated + o.allocateGroup);
      const group = jobs.slice(allocated, end);
      const t = now();
      const chunks = target.allocate(group.map((j) => j.plan), holder, (p) => access.get(p)!);
      const ms = now() - t;
      stats.allocateMs += ms;
      stats.allocateMaxBlockMs = Math.max(stats.allocateMaxBlockMs, ms);
      chunks.forEach((c, k) => { made[allocated + k] = c; allocatedBytes += c.plan.size; });
      allocated = end;
      if (allocated === jobs.length) options.onAllocated?.(made as StoredChunk[]);
      if (yieldBetween && allocated < upto) await turn(0);
    }
  };
  /** Allocation ahead of the copy front: while the latest batch copies, create the chunks of the bytes that follow. */
  let issuedBytes = 0;
  const allocateAhead = async () => {
    if (off) return; // made ahead on the worker thread already
    let upto = allocated;
    let bytes = allocatedBytes;
    while (upto < jobs.length && bytes - issuedBytes < o.allocateAheadBytes) bytes += jobs[upto++]!.plan.size;
    await allocateUpTo(upto, true);
  };

  const streams = new Set<Stream>();
  let join: Stream | undefined;
  const events: Event[] = [];
  const inflight: Array<{ done: Promise<void>; bytes: number; batch: number }> = [];
  let bytesDone = 0;
  let transfersDone = 0;
  const t0 = now();
  let firstIssue = 0;
  try {
    for (const [bi, batch] of batches.entries()) {
      // The window: at most two batches queued on the devices.
      while (inflight.length >= 2) await settle(inflight.shift()!);
      // Rate cap on what has been issued so far.
      if (o.bytesPerMs !== Infinity && issuedBytes > 0) {
        const due = t0 + issuedBytes / o.bytesPerMs;
        const wait = due - now();
        if (wait > 0) {
          stats.throttleMs += wait;
          await new Promise((r) => setTimeout(r, wait));
        }
      }
      // Every chunk this batch writes exists (groups, yielding between them).
      const need = Math.max(...batch.map((p) => p.job)) + 1;
      await allocateUpTo(need, true);
      if (firstIssue === 0) firstIssue = now();
      const used = new Map<string, Stream>();
      let bytes = 0;
      let queued = 0;
      let tq = now();
      for (const p of batch) {
        if (queued > 0 && queued % o.queueGroup === 0) {
          stats.queueMaxBlockMs = Math.max(stats.queueMaxBlockMs, now() - tq);
          await turn(0);
          tq = now();
        }
        queued++;
        // Each copy runs on a stream per (source, target) pair (of the target store), on the
        // target's device for a pull, the source's for a push: one device feeding or fed by
        // several others drives their links in parallel.
        const from = p.source.plan.device, to = jobs[p.job]!.plan.device;
        const s = pull[p.job] ? target.copyStream(to, from) : target.copyStream(from, to);
        used.set(`${pull[p.job] ? 'pull' : 'push'}:${from}>${to}`, s);
        streams.add(s);
        s.copy(made[p.job]!.range.at(p.offset), p.source.range.at(p.offset), p.bytes);
        bytes += p.bytes;
      }
      stats.queueMaxBlockMs = Math.max(stats.queueMaxBlockMs, now() - tq);
      issuedBytes += bytes;
      // One host wait per batch: the batch's source streams joined on one event.
      const list = [...used.values()];
      let done: Promise<void>;
      if (list.length === 1) {
        const ev = rt.createEvent(list[0]!.device);
        events.push(ev);
        done = ev.record(list[0]!).synchronize();
      } else {
        join ??= rt.createStream(list[0]!.device);
        for (const s of list) {
          const ev = rt.createEvent(s.device);
          events.push(ev);
          join.wait(ev.record(s));
        }
        const ev = rt.createEvent(join.device);
        events.push(ev);
        done = ev.record(join).synchronize();
      }
      done.catch(() => undefined); // observed by settle(); never an unhandled rejection meanwhile
      inflight.push({ done, bytes, batch: bi });
      // While it copies: create what comes next, then give the serving loop a turn.
      await allocateAhead();
      await turn(o.yieldMs);
    }
    while (inflight.length > 0) await settle(inflight.shift()!);
    // Surface asynchronous errors of every stream used (a failed copy is reported at its stream's synchronize).
    await Promise.all([...streams, ...(join ? [join] : [])].map((s) => s.synchronize()));
    stats.copyMs = now() - (firstIssue || t0);
  } catch (e) {
    // Copies already queued must finish before their targets are unmapped.
    await Promise.allSettled(inflight.map((f) => f.done));
    await Promise.allSettled([...streams, ...(join ? [join] : [])].map((s) => s.synchronize()));
    if (off) await off.cancel();
    else for (const c of made) if (c) target.release(c.plan.id, holder);
    throw e;
  } finally {
    if (off) {
      stats.makeMs = off.makeMs;
      stats.makeCalls = off.calls;
    }
    for (const ev of events) {
      try {
        ev.dispose();
      } catch {
        // already gone with its device
      }
    }
    join?.dispose();
  }
  return { chunks: made as StoredChunk[], stats };

  async function settle(f: { done: Promise<void>; bytes: number; batch: number }): Promise<void> {
    await f.done;
    bytesDone += f.bytes;
    transfersDone += finishing[f.batch]!;
    options.onProgress?.({ bytesDone, bytesTotal: stats.bytes, transfersDone, transfersTotal: jobs.length });
  }
}
