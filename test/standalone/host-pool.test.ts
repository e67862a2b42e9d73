// HostBufferPool on the mock: buffers handed back are handed out again (the same memory),
// best fit within maxWaste, bounded by maxBytes, freed by dispose.
import { describe, expect, it } from 'vitest';

import { HostBufferPool, InvalidArgumentError } from '../../src/index.js';
import { openMock } from '../helpers/mock.js';

describe('HostBufferPool', () => {
  it('hands a buffer given back out again, with its contents, and counts what it saved', () => {
    const rt = openMock();
    const pool = new HostBufferPool(rt);
    const a = pool.take(4096);
    expect(a.size).toBeGreaterThanOrEqual(4096);
    a.bytes()[0] = 42;
    pool.give(a);
    expect(pool.stats).toMatchObject({ allocated: 1, reused: 0, kept: 1, keptBytes: a.size });
    const b = pool.take(4000);
    expect(b).toBe(a);
    expect(b.bytes()[0]).toBe(42);
    expect(pool.stats).toMatchObject({ allocated: 1, reused: 1, kept: 0, keptBytes: 0 });
    // Taken, it is not handed out twice.
    const c = pool.take(4000);
    expect(c).not.toBe(b);
    pool.dispose();
    b.dispose();
    c.dispose();
  });

  it('picks the smallest kept buffer that fits, and none more than maxWaste times the request', () => {
    const rt = openMock();
    const pool = new HostBufferPool(rt, 1 << 20, 2);
    const big = rt.hostBuffer(64 * 1024);
    const mid = rt.hostBuffer(16 * 1024);
    const small = rt.hostBuffer(4 * 1024);
    for (const b of [big, mid, small]) pool.give(b);
    expect(pool.take(10 * 1024)).toBe(mid);
    expect(pool.stats.reused).toBe(1);
    // 64 KiB for 8 KiB is more than twice: a new one.
    const fresh = pool.take(8 * 1024);
    expect(fresh).not.toBe(big);
    expect(fresh.size).toBeLessThan(big.size);
    expect(pool.stats).toMatchObject({ reused: 1, allocated: 1, kept: 2 });
    expect(pool.take(40 * 1024)).toBe(big);
    pool.dispose();
    for (const b of [mid, fresh, big]) b.dispose();
  });

  it('frees what it cannot keep (over maxBytes, or after dispose) and everything at dispose', () => {
    const rt = openMock();
    const pool = new HostBufferPool(rt, 8 * 1024);
    const a = rt.hostBuffer(8 * 1024);
    const b = rt.hostBuffer(4 * 1024);
    pool.give(a);
    pool.give(b); // over the bound: freed
    expect(b.native.buffer.byteLength).toBe(0);
    expect(pool.stats).toMatchObject({ kept: 1, freed: 1, keptBytes: 8 * 1024 });
    pool.dispose();
    expect(a.native.buffer.byteLength).toBe(0);
    expect(pool.stats).toMatchObject({ kept: 0, freed: 2, keptBytes: 0 });
    const c = rt.hostBuffer(1024);
    pool.give(c);
    expect(c.native.buffer.byteLength).toBe(0);
    expect(() => pool.take(16)).toThrow(InvalidArgumentError);
  });

  it('refuses bad arguments with the argument named', () => {
    const rt = openMock();
    const arg = (f: () => unknown) => {
      try {
        f();
      } catch (e) {
        expect(e).toBeInstanceOf(InvalidArgumentError);
        return (e as InvalidArgumentError).argument;
      }
      return undefined;
    };
    expect(arg(() => new HostBufferPool(rt, -1))).toBe('maxBytes');
    expect(arg(() => new HostBufferPool(rt, 1.5))).toBe('maxBytes');
    expect(arg(() => new HostBufferPool(rt, 1024, 0.5))).toBe('maxWaste');
    const pool = new HostBufferPool(rt);
    expect(arg(() => pool.take(0))).toBe('size');
    expect(arg(() => pool.take(2.5))).toBe('size');
    const gone = rt.hostBuffer(64);
    gone.dispose();
    expect(arg(() => pool.give(gone))).toBe('buf');
    pool.dispose();
  });
});
