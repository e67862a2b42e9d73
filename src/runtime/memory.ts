// Device memory: physical chunks, reserved virtual ranges that chunks are mapped
// into, pointers into those ranges, and pinned host buffers. Thin wrappers over
// the addon; the rules (whole-chunk maps, access before use) are the backend's.
import { InvalidArgumentError } from './errors.js';
import type { NativeChunk, NativeHostBuffer, NativeRange } from './native-types.js';

export function checkSize(name: string, value: unknown, { positive = false } = {}): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < (positive ? 1 : 0)) {
    throw new InvalidArgumentError(name, positive ? 'a positive safe integer (bytes)' : 'a non-negative safe integer (bytes)');
  }
  return value;
}

/** How a chunk travels to another process: a POSIX fd (cuda, mock) or an ACL shareable handle. */
export type SharedHandle = { kind: 'fd'; fd: number } | { kind: 'acl'; handle: bigint };

/**
 * Chunks and ranges whose release, unmap or free the backend refused (their native objects stay as
 * they were: nothing half-freed), tried again before each dispose: a refusal that passes leaks
 * nothing, and nothing waits for a finalizer.
 */
const refused = new Set<{ dispose(): void }>();

let retrying = false;

function disposeOrRetry(x: { dispose(): void }, free: () => void): void {
  if (refused.size > 0 && !retrying) retryRefusedFrees(x);
  try {
    free();
    refused.delete(x);
  } catch (e) {
    refused.add(x);
    throw e;
  }
}

/** Tries again every refused free (but `skip`'s); returns how many are still refused. */
export function retryRefusedFrees(skip?: unknown): number {
  if (retrying) return refused.size;
  retrying = true;
  try {
    for (const x of [...refused]) {
      if (x === skip) continue;
      try {
        x.dispose(); // leaves the set on success, stays on a new refusal
      } catch {
        // Still refused: tried again next time.
      }
    }
  } finally {
    retrying = false;
  }
  return refused.size;
}

/** One physical allocation on one device. */
export class Chunk implements Disposable {
  /** Its device and size in bytes (fixed: read from the addon once). */
  readonly device: number;
  readonly size: number;
  /** @internal */
  constructor(readonly native: NativeChunk) {
    this.device = native.device;
    this.size = native.size;
  }

  get disposed(): boolean {
    return this.native.released;
  }

  /**
   * Exports the chunk for another process. For an fd, the caller owns it: pass
   * it over a UnixChannel, then close it (fs.closeSync).
   */
  export(): SharedHandle {
    const h = this.native.export();
    return typeof h === 'bigint' ? { kind: 'acl', handle: h } : { kind: 'fd', fd: h };
  }

  /**
   * Releases the handle; memory is freed once no range maps it any more. Idempotent. A release the
   * backend refuses throws and is tried again at the next dispose of any chunk or range (refused frees).
   */
  dispose(): void {
    disposeOrRetry(this, () => this.native.release());
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** An address inside a virtual range: what copies and kernels take. Never a JS number. */
export class DevicePointer {
  constructor(readonly range: VirtualRange, readonly offset: number) {
    checkSize('offset', offset);
    if (offset > range.size) throw new InvalidArgumentError('offset', `at most the range size ${range.size}`);
  }
  add(bytes: number): DevicePointer {
    return new DevicePointer(this.range, this.offset + bytes);
  }
  /** The address, for logs and interop only. */
  get address(): bigint {
    return this.range.base + BigInt(this.offset);
  }
  toString(): string {
    return `0x${this.address.toString(16)}`;
  }
}

/** A reserved range of virtual addresses in this process, where chunks are mapped. */
export class VirtualRange implements Disposable {
  /** First address of the range (fixed at reserve, read once: every pointer into the range uses it). */
  readonly base: bigint;
  /** Bytes reserved (fixed at reserve, read once: every pointer into the range checks against it). */
  readonly size: number;
  /** @internal */
  constructor(readonly native: NativeRange) {
    this.base = native.base;
    this.size = native.size;
  }

  get disposed(): boolean {
    return this.native.freed;
  }

  /** Maps the whole chunk at `offset` (a partial map is rejected). No device may touch it before setAccess. */
  map(offset: number, chunk: Chunk, size?: number): DevicePointer {
    if (size === undefined) this.native.map(offset, chunk.native);
    else this.native.map(offset, chunk.native, size);
    return this.at(offset);
  }
  unmap(offset: number, size: number): void {
    this.native.unmap(offset, size);
  }
  /** Grants read/write on [offset, offset+size) to exactly these devices. */
  setAccess(offset: number, size: number, devices: readonly number[]): void {
    this.native.setAccess(offset, size, [...devices]);
  }
  at(offset = 0): DevicePointer {
    return new DevicePointer(this, offset);
  }
  /**
   * Unmaps what is still mapped and frees the reservation. Idempotent. An unmap or free the backend
   * refuses throws; what is left is tried again at the next dispose of any chunk or range.
   */
  dispose(): void {
    disposeOrRetry(this, () => this.native.free());
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** Pinned (page-locked) host memory, usable by asynchronous copies. */
export class HostBuffer implements Disposable {
  /** @internal */
  constructor(readonly native: NativeHostBuffer) {}

  get size(): number {
    return this.native.size;
  }
  /** A byte view; it becomes detached (length 0) after dispose. */
  bytes(offset = 0, length = this.size - offset): Uint8Array {
    return new Uint8Array(this.native.buffer, offset, length);
  }
  dispose(): void {
    this.native.free();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}
