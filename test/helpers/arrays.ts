// Seeded random inputs and exact comparisons for kernel tests (mock and GPU).
import { expect } from 'vitest';

import type { DevicePointer, Runtime, Stream } from '../../src/index.js';
import * as ref from '../../src/model/kernels/reference.js';

export type Typed = Float32Array | Int32Array | Uint16Array;

export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 4294967296;
  };
}
export function randF32(n: number, seed: number, lo = -1, hi = 1): Float32Array {
  const r = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = lo + (hi - lo) * r();
  return out;
}
export function randBf16(n: number, seed: number, scale = 1): Uint16Array {
  return ref.toBf16(randF32(n, seed, -scale, scale));
}
export function randInt(n: number, seed: number, max: number): Int32Array {
  const r = rng(seed);
  const out = new Int32Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.floor(r() * max);
  return out;
}

/** Bitwise equality of two typed arrays, with the first difference in the message. */
export function expectSame(got: Typed, want: Typed, what: string): void {
  expect(got.length, `${what}: length`).toBe(want.length);
  const a = new Uint8Array(got.buffer, got.byteOffset, got.byteLength);
  const b = new Uint8Array(want.buffer, want.byteOffset, want.byteLength);
  if (Buffer.compare(a, b) === 0) return;
  let i = 0;
  while (Object.is(got[i], want[i]) && i < got.length) i++;
  expect.fail(`${what}: element ${i} is ${got[i]}, reference ${want[i]}`);
}

/** One mapped chunk handed out by a bump allocator; uploads and downloads typed arrays. */
export class Arena {
  private next = 0;
  private readonly chunk;
  private readonly range;
  constructor(private readonly rt: Runtime, private readonly stream: Stream, readonly size: number) {
    this.chunk = rt.createChunk(stream.device, size);
    this.range = rt.reserve(size);
    this.range.map(0, this.chunk);
    this.range.setAccess(0, size, [stream.device]);
  }
  alloc(bytes: number): DevicePointer {
    const at = this.next;
    this.next += Math.ceil(Math.max(bytes, 1) / 256) * 256;
    if (this.next > this.size) throw new Error('arena full');
    return this.range.at(at);
  }
  reset(): void {
    this.next = 0;
  }
  async put(data: Typed): Promise<DevicePointer> {
    const p = this.alloc(data.byteLength);
    await this.rt.write(p, new Uint8Array(data.buffer, data.byteOffset, data.byteLength), this.stream);
    return p;
  }
  async get<T extends Typed>(p: DevicePointer, like: T): Promise<T> {
    const bytes = await this.rt.read(p, like.byteLength, this.stream);
    const C = like.constructor as new (b: ArrayBuffer) => T;
    return new C(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer);
  }
  dispose(): void {
    this.range.dispose();
    this.chunk.dispose();
  }
}
