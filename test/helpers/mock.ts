// Shared setup for tests on the mock backend.
import { Runtime, type RuntimeOptionsInput } from '../../src/index.js';

export const MIB = 1024 * 1024;
export const GRAN = 2 * MIB;

export function openMock(options: RuntimeOptionsInput = {}): Runtime {
  return Runtime.open({ backend: 'mock', mockDevices: 4, mockCapacity: 64 * MIB, ...options });
}

/** A chunk mapped into its own range with access for `devices` (default: its own device). */
export function mappedChunk(rt: Runtime, device: number, size = GRAN, devices: number[] = [device], exportable = false) {
  const chunk = rt.createChunk(device, size, { exportable });
  const range = rt.reserve(size);
  const ptr = range.map(0, chunk);
  range.setAccess(0, size, devices);
  return { chunk, range, ptr };
}

export function pattern(n: number, seed = 1): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** Byte equality without vitest's element-by-element diff (slow on MiB arrays). */
export function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;
}
