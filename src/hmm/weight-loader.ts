// Loads checkpoint tensors into the HMM's chunks: safetensors file → pinned host
// staging buffer → device, all or nothing.
//
// Why this shape:
// - Everything that can be checked without touching a device (each planned
//   tensor exists with the same dtype and shape) is checked first, so a wrong
//   checkpoint costs no allocation at all.
// - Reads go through a small, bounded pool of pinned buffers: pinned memory is
//   scarce (and on CUDA slow to allocate), and a fixed pool keeps host memory
//   flat however large the model is. A buffer is refilled only once the upload
//   that used it has finished (an event per buffer and device), so the next file
//   read overlaps the copies still in flight.
// - Reads are sorted by (file, offset) and coalesced: safetensors stores tensors
//   back to back, so consecutive small tensors share one large sequential read.
// - Any failure after allocation waits for the copies in flight, then releases
//   every chunk this call allocated: no device byte stays allocated.
import type { FileHandle } from 'node:fs/promises';
import { open } from 'node:fs/promises';

import { ElasticMoeError, InvalidArgumentError } from '../runtime/errors.js';
import type { DevicePointer, HostBuffer } from '../runtime/memory.js';
import type { Event, Stream } from '../runtime/stream.js';
import type { ChunkStore, StoredChunk } from './chunk-store.js';
import type { ChunkPlan } from './placement.js';
import { type Checkpoint, CheckpointError, type CheckpointTensor } from './safetensors.js';

export interface LoadProgress {
  bytesDone: number;
  bytesTotal: number;
  tensorsDone: number;
  tensorsTotal: number;
}

export interface LoadOptions {
  /** Holder of the allocated chunks (default "hmm"). */
  holder?: string;
  /** Bytes per pinned staging buffer (default 64 MiB). */
  stagingBytes?: number;
  /** Pinned staging buffers (default 4): reads overlap up to this many batches of uploads. */
  stagingBuffers?: number;
  /** Called at most about every 1% or 100 ms, and once at the end with bytesDone = bytesTotal. */
  onProgress?: (p: LoadProgress) => void;
  signal?: AbortSignal;
}

export const DEFAULT_STAGING_BYTES = 64 * 1024 * 1024;
export const DEFAULT_STAGING_BUFFERS = 4;

/** A loading failure after allocation (I/O or device), naming the file and tensor. `cause` is the original error. */
export class WeightLoadError extends ElasticMoeError {
  constructor(message: string, readonly file: string, readonly tensor: string, cause: unknown) {
    // Keep the backend's code and status so `.code`, `.api` and `.codeName` still say what the device reported.
    super(cause instanceof ElasticMoeError ? cause.code : 'INTERNAL', message,
      cause instanceof ElasticMoeError ? cause.status : undefined);
    this.cause = cause;
  }
}

// ---- step 1: validation (pure)

/** The checkpoint entry of every planned tensor, in plan order; throws on the first mismatch. */
export function matchPlans(plans: readonly ChunkPlan[], checkpoint: Checkpoint): Map<string, CheckpointTensor> {
  const out = new Map<string, CheckpointTensor>();
  for (const plan of plans) {
    for (const t of plan.tensors) {
      const found = checkpoint.tensors.get(t.name);
      if (!found) {
        throw new CheckpointError('NOT_FOUND',
          `tensor '${t.name}' (chunk ${plan.id}) is not in the checkpoint at ${checkpoint.dir} (${checkpoint.files.length} file(s))`,
          checkpoint.dir, t.name);
      }
      const same = found.dtype === t.dtype && found.shape.length === t.shape.length && found.shape.every((d, i) => d === t.shape[i]);
      if (!same) {
        throw new CheckpointError('INVALID_ARGUMENT',
          `${found.file}, tensor '${t.name}': expected ${t.dtype} [${t.shape}], found ${found.dtype} [${found.shape}]`,
          found.file, t.name);
      }
      out.set(t.name, found);
    }
  }
  return out;
}

// ---- read batches (pure)

/** Part of one tensor carried by a batch: buffer[bufOffset..+bytes] → tensor[tensorOffset..+bytes]. */
export interface Piece {
  tensor: string;
  tensorOffset: number;
  bufOffset: number;
  bytes: number;
}

/** One contiguous file read into one staging buffer, and the uploads it feeds. */
export interface Batch {
  file: string;
  position: number;
  bytes: number;
  pieces: Piece[];
}

/**
 * Cuts the tensors into reads of at most `stagingBytes`, in (file, offset) order.
 * A read continues across tensors while they are adjacent in the file, and a
 * tensor larger than the buffer is split across reads.
 */
export function planBatches(tensors: Iterable<CheckpointTensor>, stagingBytes: number): Batch[] {
  const sorted = [...tensors].filter((t) => t.bytes > 0)
    .sort((a, b) => (a.file < b.file ? -1 : a.file > b.file ? 1 : a.dataStart - b.dataStart));
  const batches: Batch[] = [];
  let cur: Batch | undefined;
  for (const t of sorted) {
    for (let done = 0; done < t.bytes;) {
      const position = t.dataStart + done;
      const contiguous = cur && cur.file === t.file && cur.position + cur.bytes === position && cur.bytes < stagingBytes;
      if (!cur || !contiguous) {
        cur = { file: t.file, position, bytes: 0, pieces: [] };
        batches.push(cur);
      }
      const take = Math.min(t.bytes - done, stagingBytes - cur.bytes);
      cur.pieces.push({ tensor: t.name, tensorOffset: done, bufOffset: cur.bytes, bytes: take });
      cur.bytes += take;
      done += take;
    }
  }
  return batches;
}

// ---- progress

/** Counts completed bytes and tensors; calls back at most every ~1% or 100 ms, and always at the end. */
class ProgressReporter {
  private bytesDone = 0;
  private tensorsDone = 0;
  private lastBytes = 0;
  private lastTime = Date.now();
  private finished = false;
  private readonly left = new Map<string, number>();

  constructor(tensors: Iterable<CheckpointTensor>, private readonly bytesTotal: number,
    private readonly callback?: (p: LoadProgress) => void) {
    for (const t of tensors) {
      if (t.bytes === 0) this.tensorsDone++;
      else this.left.set(t.name, t.bytes);
    }
  }
  private get tensorsTotal() {
    return this.tensorsDone + this.left.size;
  }

  complete(pieces: readonly Piece[]): void {
    for (const p of pieces) {
      this.bytesDone += p.bytes;
      const rest = this.left.get(p.tensor)! - p.bytes;
      if (rest === 0) {
        this.left.delete(p.tensor);
        this.tensorsDone++;
      } else this.left.set(p.tensor, rest);
    }
    const now = Date.now();
    const due = this.bytesDone - this.lastBytes >= this.bytesTotal / 100 || now - this.lastTime >= 100;
    if (due || this.bytesDone === this.bytesTotal) this.emit(now);
  }

  /** The final report, unless complete() already made it (nothing to load still gets one). */
  finish(): void {
    if (!this.finished) this.emit();
  }

  private emit(now = Date.now()): void {
    this.finished = this.bytesDone === this.bytesTotal;
    this.lastBytes = this.bytesDone;
    this.lastTime = now;
    this.callback?.({ bytesDone: this.bytesDone, bytesTotal: this.bytesTotal, tensorsDone: this.tensorsDone, tensorsTotal: this.tensorsTotal });
  }
}

// ---- staging

/** A pinned buffer and what is still uploading from it. */
interface Slot {
  host: HostBuffer;
  /** One event per device this buffer has fed (created on first use). */
  events: Map<number, Event>;
  /** Devices whose last upload from this buffer may still be running. */
  busy: Set<number>;
  /** Pieces whose uploads are in flight (for progress once they finish). */
  pieces: Piece[];
}

function checkCount(name: string, value: number, max = Number.MAX_SAFE_INTEGER): number {
  if (!Number.isSafeInteger(value) || value < 1 || value > max) throw new InvalidArgumentError(name, `an integer in 1..${max}`);
  return value;
}

/** Reads `bytes` at `position` into `dst`; a short read (file shrank since it was opened) is an error. */
async function readFully(fh: FileHandle, dst: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < dst.byteLength) {
    const { bytesRead } = await fh.read(dst, done, dst.byteLength - done, position + done);
    if (bytesRead === 0) {
      throw new Error(`short read: got ${done} of ${dst.byteLength} bytes at offset ${position} (file truncated since it was opened?)`);
    }
    done += bytesRead;
  }
}

/** The tensors a batch touches, for error messages. */
const describeBatch = (b: Batch) => {
  const names = [...new Set(b.pieces.map((p) => p.tensor))];
  return names.length === 1 ? `'${names[0]}'` : `'${names[0]}' (and ${names.length - 1} more in the same read)`;
};

/** Loads the planned tensors from `checkpoint` into newly allocated chunks. All or nothing. */
export async function loadCheckpoint(store: ChunkStore, plans: readonly ChunkPlan[], checkpoint: Checkpoint,
  options: LoadOptions = {}): Promise<StoredChunk[]> {
  const holder = options.holder ?? 'hmm';
  const stagingBytes = checkCount('stagingBytes', options.stagingBytes ?? DEFAULT_STAGING_BYTES);
  const stagingBuffers = checkCount('stagingBuffers', options.stagingBuffers ?? DEFAULT_STAGING_BUFFERS, 64);
  const { signal } = options;

  const sources = matchPlans(plans, checkpoint);
  const batches = planBatches(sources.values(), stagingBytes);
  const bytesTotal = [...sources.values()].reduce((a, t) => a + t.bytes, 0);
  const progress = new ProgressReporter(sources.values(), bytesTotal, options.onProgress);
  signal?.throwIfAborted();

  // Pinned buffers before device memory: if pinning fails, nothing is on a device yet.
  const slots: Slot[] = [];
  const streams = new Map<number, Stream>();
  try {
    const bufBytes = batches.reduce((a, b) => Math.max(a, b.bytes), 1); // no bigger than the largest read
    for (let i = 0; i < Math.min(stagingBuffers, batches.length); i++) {
      slots.push({ host: store.rt.hostBuffer(bufBytes), events: new Map(), busy: new Set(), pieces: [] });
    }
    const made = store.allocate(plans, holder);
    try {
      // A tensor replicated on several devices (dense weights under data parallelism) is read once and uploaded to each.
      const devicesOf = new Map<string, number[]>();
      for (const p of plans) for (const t of p.tensors) devicesOf.set(t.name, [...(devicesOf.get(t.name) ?? []), p.device]);
      await streamBatches(store, batches, slots, streams, progress, signal, devicesOf);
      progress.finish();
      return made;
    } catch (e) {
      // Copies may still read the staging buffers and write the chunks: let them finish before freeing either.
      await drainQuietly(slots, streams);
      for (const c of made) store.release(c.plan.id, holder);
      throw e;
    }
  } finally {
    for (const s of slots) {
      for (const ev of s.events.values()) ev.dispose();
      s.host.dispose();
    }
  }
}

/** Waits until no upload from `slot` is in flight, then counts its pieces as done. */
async function settle(slot: Slot, progress: ProgressReporter): Promise<void> {
  for (const d of slot.busy) await slot.events.get(d)!.synchronize();
  slot.busy.clear();
  const done = slot.pieces;
  slot.pieces = [];
  if (done.length > 0) progress.complete(done);
}

async function drainQuietly(slots: readonly Slot[], streams: ReadonlyMap<number, Stream>): Promise<void> {
  for (const s of slots) for (const d of s.busy) await s.events.get(d)!.synchronize().catch(() => undefined);
  for (const s of streams.values()) await s.synchronize().catch(() => undefined);
}

/** The read → upload pipeline over the batches; resolves once every byte is on its device. */
async function streamBatches(store: ChunkStore, batches: readonly Batch[], slots: readonly Slot[],
  streams: Map<number, Stream>, progress: ProgressReporter, signal: AbortSignal | undefined,
  devicesOf: ReadonlyMap<string, number[]>): Promise<void> {
  const targets = new Map<string, Array<{ ptr: DevicePointer; device: number }>>();
  const target = (name: string) => {
    let t = targets.get(name);
    if (!t) {
      t = (devicesOf.get(name) ?? []).map((d) => ({ ptr: store.tensor(name, d).ptr, device: d }));
      targets.set(name, t);
    }
    return t;
  };
  let fh: FileHandle | undefined;
  let fhPath = '';
  try {
    for (const [i, batch] of batches.entries()) {
      signal?.throwIfAborted();
      const slot = slots[i % slots.length]!;
      await settle(slot, progress);
      signal?.throwIfAborted();
      try {
        if (fhPath !== batch.file) {
          await fh?.close();
          fh = undefined;
          fh = await open(batch.file, 'r');
          fhPath = batch.file;
        }
        await readFully(fh!, slot.host.bytes(0, batch.bytes), batch.position);
      } catch (e) {
        throw new WeightLoadError(`${batch.file}, tensor ${describeBatch(batch)}: cannot read ${batch.bytes} bytes at offset ` +
          `${batch.position}: ${(e as Error).message}`, batch.file, batch.pieces[0]!.tensor, e);
      }
      signal?.throwIfAborted();
      enqueueUploads(store, batch, slot, streams, target);
    }
    for (const slot of slots) await settle(slot, progress);
    // Event waits do not report every asynchronous copy error (the mock reports them at stream sync).
    for (const s of streams.values()) await s.synchronize();
  } finally {
    await fh?.close();
  }
}

/** Queues one upload per piece on its device's copy stream, then marks the buffer busy with an event per device. */
function enqueueUploads(store: ChunkStore, batch: Batch, slot: Slot, streams: Map<number, Stream>,
  target: (name: string) => Array<{ ptr: DevicePointer; device: number }>): void {
  for (const p of batch.pieces) {
    for (const { ptr, device } of target(p.tensor)) {
      let s = streams.get(device);
      if (!s) streams.set(device, (s = store.stream(device)));
      try {
        s.upload(ptr.add(p.tensorOffset), slot.host, p.bytes, p.bufOffset);
      } catch (e) {
        throw new WeightLoadError(`${batch.file}, tensor '${p.tensor}': upload of ${p.bytes} bytes to device ${device} failed: ` +
          `${(e as Error).message}`, batch.file, p.tensor, e);
      }
      slot.busy.add(device);
    }
    slot.pieces.push(p);
  }
  for (const d of slot.busy) {
    let ev = slot.events.get(d);
    if (!ev) slot.events.set(d, (ev = store.rt.createEvent(d)));
    ev.record(streams.get(d)!);
  }
}
