// Pinned host buffers kept for reuse. A deployment makes a forward engine per layout, each
// with a pinned buffer per device (step metadata, ~27 MB on Qwen3-30B-A3B shapes) and one
// for its tables; the scale that replaces an engine allocated the new ones while the old
// layout served (cuMemHostAlloc, 17 ms on the event loop in a 3->4 scale on 4 x H100) and
// freed the old ones right after the first step on the new layout (cuMemFreeHost, 64-109 ms
// in the CPU profiles of 2->3 and 3->4 scales: the free waited while the GPUs ran the step).
// The engine gives its buffers back here instead and the next engine takes them.
import { InvalidArgumentError } from './errors.js';
import type { HostBuffer } from './memory.js';
import type { Runtime } from './runtime.js';

/** Default bound on the bytes a pool keeps (buffers given back beyond it are freed). */
export const DEFAULT_HOST_POOL_BYTES = 1 << 30;

/** Counters of a HostBufferPool (what it saved and what it still did). */
export interface HostPoolStats {
  /** take() calls served from the pool. */
  reused: number;
  /** take() calls that allocated. */
  allocated: number;
  /** Buffers freed by give() because the pool was full (or by dispose()). */
  freed: number;
  /** Buffers and bytes kept now. */
  kept: number;
  keptBytes: number;
}

export class HostBufferPool implements Disposable {
  private readonly kept: HostBuffer[] = [];
  private keptBytes = 0;
  private counts = { reused: 0, allocated: 0, freed: 0 };
  private disposed = false;

  /**
   * @param maxBytes bytes kept at most (default 1 GiB); a buffer given back beyond it is freed.
   * @param maxWaste a kept buffer serves a request of `size` bytes only up to `size * maxWaste`
   *   bytes (default 2), so a small request does not hold a large buffer.
   */
  constructor(private readonly rt: Runtime, readonly maxBytes = DEFAULT_HOST_POOL_BYTES, readonly maxWaste = 2) {
    if (!Number.isSafeInteger(maxBytes) || maxBytes < 0) throw new InvalidArgumentError('maxBytes', 'a non-negative integer');
    if (!(maxWaste >= 1)) throw new InvalidArgumentError('maxWaste', 'a number >= 1');
  }

  /**
   * A pinned buffer of at least `size` bytes: the smallest kept one that fits (within maxWaste),
   * else a new one. Its contents are whatever the last user left.
   */
  take(size: number): HostBuffer {
    if (this.disposed) throw new InvalidArgumentError('pool', 'not disposed');
    if (!Number.isSafeInteger(size) || size < 1) throw new InvalidArgumentError('size', 'a positive integer');
    let best = -1;
    this.kept.forEach((b, i) => {
      if (b.size >= size && b.size <= size * this.maxWaste && (best < 0 || b.size < this.kept[best]!.size)) best = i;
    });
    if (best < 0) {
      this.counts.allocated++;
      return this.rt.hostBuffer(size);
    }
    const [buf] = this.kept.splice(best, 1);
    this.keptBytes -= buf!.size;
    this.counts.reused++;
    return buf!;
  }

  /**
   * Takes a buffer back for a later take(). The caller must be done with it: nothing queued on
   * a stream may still read or write it. Freed at once when the pool is full or disposed.
   */
  give(buf: HostBuffer): void {
    if (buf.native.buffer.byteLength === 0) throw new InvalidArgumentError('buf', 'a live host buffer (it was freed)');
    if (this.disposed || this.keptBytes + buf.size > this.maxBytes) {
      this.counts.freed++;
      buf.dispose();
      return;
    }
    this.kept.push(buf);
    this.keptBytes += buf.size;
  }

  get stats(): HostPoolStats {
    return { ...this.counts, kept: this.kept.length, keptBytes: this.keptBytes };
  }

  /** Frees every kept buffer; buffers given back later are freed at once. */
  dispose(): void {
    this.disposed = true;
    for (const b of this.kept.splice(0)) {
      this.counts.freed++;
      b.dispose();
    }
    this.keptBytes = 0;
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}
