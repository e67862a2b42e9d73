// Seeded random inputs and exact comparisons for kernel tests (mock and GPU).
import { expect } from 'vitest';

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
