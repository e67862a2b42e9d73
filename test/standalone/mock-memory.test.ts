// The mock keeps CUDA's virtual-memory rules; each test here would pass on a
// mock that did not enforce its rule only if the assertion were wrong.
import { closeSync, fstatSync, readdirSync } from 'node:fs';

import { describe, expect, it } from 'vitest';

import {
  FaultInjectedError, IllegalAddressError, InvalidArgumentError, InvalidHandleError, NotSupportedError,
  OutOfMemoryError,
} from '../../src/index.js';
import { expectArgumentError } from '../helpers/errors.js';
import { GRAN, MIB, mappedChunk, openMock, pattern, sameBytes } from '../helpers/mock.js';

describe('mock devices', () => {
  it('has the configured devices, capacity and full peer matrix', () => {
    const rt = openMock({ mockDevices: 3, mockCapacity: 32 * MIB });
    expect(rt.backend).toBe('mock');
    expect(rt.deviceCount).toBe(3);
    const d = rt.deviceInfo(2);
    expect(d.totalBytes).toBe(32 * MIB);
    expect(d.freeBytes).toBe(32 * MIB);
    expect(rt.peerMatrix()).toEqual([[false, true, true], [true, false, true], [true, true, false]]);
    expect(() => rt.deviceInfo(3)).toThrow(InvalidArgumentError);
    expect(() => rt.native.deviceInfo(7)).toThrow(/device/);
  });
});

describe('granularity and whole-chunk mapping', () => {
  it('uses a 2 MiB granularity and rejects sizes off it', () => {
    const rt = openMock();
    expect(rt.granularity(0)).toBe(GRAN);
    expect(rt.roundUp(3 * MIB)).toBe(4 * MIB);
    expectArgumentError(() => rt.createChunk(0, MIB), 'size');
    expect(() => rt.reserve(3 * MIB)).toThrow(InvalidArgumentError);
  });

  it('rejects a partial map and a partial unmap', () => {
    const rt = openMock();
    const chunk = rt.createChunk(0, 2 * GRAN);
    const range = rt.reserve(4 * GRAN);
    expect(() => range.map(0, chunk, GRAN)).toThrow(NotSupportedError);
    range.map(0, chunk);
    expect(() => range.map(GRAN, chunk)).toThrow(); // overlaps the first mapping
    expect(() => range.unmap(0, GRAN)).toThrow(InvalidArgumentError);
    range.unmap(0, 2 * GRAN);
    range.dispose();
    chunk.dispose();
  });

  it('aliases one chunk at two addresses', async () => {
    const rt = openMock();
    const s = rt.createStream(0);
    const a = mappedChunk(rt, 0);
    const r2 = rt.reserve(GRAN);
    r2.map(0, a.chunk);
    r2.setAccess(0, GRAN, [0]);
    const data = pattern(4096, 7);
    await rt.write(a.ptr.add(100), data, s);
    expect(await rt.read(r2.at(100), 4096, s)).toEqual(data);
  });
});

describe('access before use', () => {
  it('a copy into memory without access is an illegal address that poisons the device until reset', async () => {
    const rt = openMock();
    const chunk = rt.createChunk(1, GRAN);
    const range = rt.reserve(GRAN);
    const ptr = range.map(0, chunk);
    const s = rt.createStream(1);
    const host = rt.hostBuffer(GRAN);
    s.upload(ptr, host, GRAN);
    await expect(s.synchronize()).rejects.toBeInstanceOf(IllegalAddressError);
    // Poisoned: even valid work on device 1 fails now, other devices still work.
    range.setAccess(0, GRAN, [1]);
    expect(() => rt.createChunk(1, GRAN)).toThrow(IllegalAddressError);
    const other = mappedChunk(rt, 2);
    await rt.write(other.ptr, pattern(64), rt.createStream(2));
    rt.resetDevice(1);
    const s2 = rt.createStream(1);
    const data = pattern(GRAN, 3);
    await rt.write(ptr, data, s2);
    expect(sameBytes(await rt.read(ptr, GRAN, s2), data)).toBe(true);
  });

  it('peer copies need access for the copying device on both sides', async () => {
    const rt = openMock();
    const src = mappedChunk(rt, 0, GRAN, [0]);
    const dst = mappedChunk(rt, 1, GRAN, [1]);
    const s0 = rt.createStream(0);
    const data = pattern(GRAN, 9);
    await rt.write(src.ptr, data, s0);
    s0.copy(dst.ptr, src.ptr, GRAN);
    await expect(s0.synchronize()).rejects.toBeInstanceOf(IllegalAddressError);
    rt.resetDevice(0);
    dst.range.setAccess(0, GRAN, [1, 0]);
    const s = rt.createStream(0);
    s.copy(dst.ptr, src.ptr, GRAN);
    await s.synchronize();
    expect(sameBytes(await rt.read(dst.ptr, GRAN, rt.createStream(1)), data)).toBe(true);
  });

  it('an unmapped address is illegal too', async () => {
    const rt = openMock();
    const range = rt.reserve(GRAN);
    const s = rt.createStream(0);
    s.memset(range.at(0), 1, 64);
    await expect(s.synchronize()).rejects.toThrow(/unmapped|not mapped/i);
  });
});

describe('capacity', () => {
  it('enforces capacity with an out-of-memory error and gives memory back at the last unmap', () => {
    const rt = openMock({ mockCapacity: 8 * MIB });
    const a = rt.createChunk(0, 6 * MIB);
    expect(rt.deviceInfo(0).freeBytes).toBe(2 * MIB);
    expect(() => rt.createChunk(0, 4 * MIB)).toThrow(OutOfMemoryError);
    const range = rt.reserve(6 * MIB);
    range.map(0, a);
    a.dispose(); // released while mapped: still held by the mapping, as in CUDA
    expect(rt.deviceInfo(0).freeBytes).toBe(2 * MIB);
    range.unmap(0, 6 * MIB);
    expect(rt.deviceInfo(0).freeBytes).toBe(8 * MIB);
    expect(rt.deviceInfo(1).freeBytes).toBe(8 * MIB);
  });
});

describe('dispose', () => {
  it('is idempotent, and a disposed object is an invalid handle', async () => {
    const rt = openMock();
    const { chunk, range } = mappedChunk(rt, 0);
    const s = rt.createStream(0);
    const ev = rt.createEvent(0);
    range.dispose();
    range.dispose();
    chunk.dispose();
    chunk.dispose();
    expect(rt.deviceInfo(0).freeBytes).toBe(64 * MIB);
    expect(() => range.map(0, rt.createChunk(0, GRAN))).toThrow(InvalidHandleError);
    expect(() => chunk.export()).toThrow(InvalidHandleError);
    s.dispose();
    s.dispose();
    expect(() => s.memset(rt.reserve(GRAN).at(0), 0, 1)).toThrow(InvalidHandleError);
    ev.dispose();
    ev.dispose();
    const host = rt.hostBuffer(4096);
    const view = host.bytes();
    host.dispose();
    host.dispose();
    expect(view.byteLength).toBe(0); // detached: JS cannot touch freed memory
  });

  it('frees a range that still has mappings', () => {
    const rt = openMock({ mockCapacity: 4 * MIB });
    const chunk = rt.createChunk(0, 4 * MIB);
    const range = rt.reserve(4 * MIB);
    range.map(0, chunk);
    chunk.dispose();
    range.dispose();
    expect(rt.deviceInfo(0).freeBytes).toBe(4 * MIB);
  });

  it('a release or an unmap the backend refuses leaves the object to free again: nothing leaks once it is', () => {
    const rt = openMock({ mockCapacity: 4 * MIB });
    const chunk = rt.createChunk(0, 2 * MIB);
    const range = rt.reserve(4 * MIB);
    range.map(0, chunk);
    rt.injectFault('Unmap', 1);
    expect(() => range.dispose()).toThrow(FaultInjectedError);
    expect(range.disposed).toBe(false); // still mapped: tried again below
    rt.injectFault('ReleaseChunk', 1);
    expect(() => chunk.dispose()).toThrow(FaultInjectedError);
    expect(chunk.disposed).toBe(false);
    expect(rt.deviceInfo(0).freeBytes).toBe(2 * MIB);
    chunk.dispose();
    range.dispose();
    expect(chunk.disposed && range.disposed).toBe(true);
    expect(rt.deviceInfo(0).freeBytes).toBe(4 * MIB);
    // A refused FreeRange (nothing mapped) likewise.
    const empty = rt.reserve(2 * MIB);
    rt.injectFault('FreeRange', 1);
    expect(() => empty.dispose()).toThrow(FaultInjectedError);
    expect(empty.disposed).toBe(false);
    empty.dispose();
    expect(empty.disposed).toBe(true);
  });
});

describe('bad arguments', () => {
  it('names the argument', () => {
    const rt = openMock();
    const range = rt.reserve(GRAN);
    expectArgumentError(() => rt.createChunk(-1, GRAN), /device/);
    expectArgumentError(() => rt.createChunk(0, 1.5), /size/);
    expectArgumentError(() => rt.native.createChunk(0, -2, false), /size/);
    expectArgumentError(() => range.at(-1), /offset/);
    expectArgumentError(() => range.native.setAccess(0, GRAN, [0, 9]), /device/);
    expectArgumentError(() => rt.native.createStream('zero' as never), /device/);
    expectArgumentError(() => rt.createStream(0).memset(range.at(0), 300, 1), /value/);
    expect(() => (rt.native.createChunk as (...a: unknown[]) => unknown).call({}, 0, GRAN, false)).toThrow(TypeError);
  });
});

describe('fault injection', () => {
  it('fails exactly the nth call of the named operation, once', () => {
    const rt = openMock();
    rt.injectFault('CreateChunk', 2);
    const first = rt.createChunk(0, GRAN);
    expect(() => rt.createChunk(0, GRAN)).toThrow(FaultInjectedError);
    const third = rt.createChunk(0, GRAN);
    expect(rt.deviceInfo(0).freeBytes).toBe(60 * MIB);
    first.dispose();
    third.dispose();
  });

  it('can fail with a chosen kind, and clears', () => {
    const rt = openMock();
    rt.injectFault('Map', 1, 'OUT_OF_MEMORY');
    const chunk = rt.createChunk(0, GRAN);
    const range = rt.reserve(GRAN);
    expect(() => range.map(0, chunk)).toThrow(OutOfMemoryError);
    rt.injectFault('Map', 1);
    rt.clearFaults();
    range.map(0, chunk);
    expect(() => rt.injectFault('NoSuchOp', 1)).toThrow(InvalidArgumentError);
  });
});

describe('streams and events', () => {
  it('makes a stream wait for an event recorded on another stream', async () => {
    const rt = openMock();
    const big = 32 * MIB;
    const a = mappedChunk(rt, 0, big);
    const b = mappedChunk(rt, 0, GRAN);
    const s1 = rt.createStream(0);
    const s2 = rt.createStream(0);
    const done = rt.createEvent(0);
    // A long fill of `a` on s1; s2 copies a's last bytes only after the event.
    for (let i = 0; i < 8; i++) s1.memset(a.ptr, 0x5a, big);
    done.record(s1);
    s2.wait(done).copy(b.ptr, a.ptr.add(big - GRAN), GRAN);
    await s2.synchronize();
    const got = await rt.read(b.ptr, GRAN, s2);
    expect(got.every((x) => x === 0x5a)).toBe(true);
  });

  it('measures elapsed time between timing events', async () => {
    const rt = openMock();
    const s = rt.createStream(0);
    const a = mappedChunk(rt, 0, 16 * MIB);
    const start = rt.createEvent(0, { timing: true }).record(s);
    s.memset(a.ptr, 1, 16 * MIB);
    const end = rt.createEvent(0, { timing: true }).record(s);
    await end.synchronize();
    const ms = end.elapsedSince(start);
    expect(ms).toBeGreaterThan(0);
    expect(ms).toBeLessThan(10_000);
    const untimed = rt.createEvent(0).record(s);
    await untimed.synchronize();
    expect(() => untimed.elapsedSince(start)).toThrow();
  });
});

describe('createMappedChunks (off the main thread)', () => {
  it('maps a new chunk over each range with the access asked for, usable at once', async () => {
    const rt = openMock();
    const s = rt.createStream(1);
    const ranges = [rt.reserve(2 * GRAN), rt.reserve(2 * GRAN), rt.reserve(2 * GRAN)];
    const chunks = await rt.createMappedChunks(0, 2 * GRAN, ranges, [0, 1], { exportable: true });
    expect(chunks.map((c) => [c.device, c.size])).toEqual([[0, 2 * GRAN], [0, 2 * GRAN], [0, 2 * GRAN]]);
    expect(rt.deviceInfo(0).freeBytes).toBe(64 * MIB - 3 * 2 * GRAN);
    // Device 1 was granted access: it reads and writes every range; device 2 was not.
    for (const [i, r] of ranges.entries()) {
      await rt.write(r.at(GRAN + 8), pattern(64, i + 1), s);
      expect(await rt.read(r.at(GRAN + 8), 64, s)).toEqual(pattern(64, i + 1));
    }
    await expect(rt.read(ranges[0]!.at(0), 64, rt.createStream(2))).rejects.toThrow(IllegalAddressError);
    expect(typeof chunks[0]!.export().kind).toBe('string');
    // The range owns its mapping like one made by map(): dispose unmaps, and the memory goes with the chunk.
    for (const r of ranges) r.dispose();
    for (const c of chunks) c.dispose();
    expect(rt.deviceInfo(0).freeBytes).toBe(64 * MIB);
  });

  it('is all or nothing: a failure at the nth chunk leaves every range empty and no memory taken', async () => {
    const rt = openMock();
    const ranges = [rt.reserve(GRAN), rt.reserve(GRAN), rt.reserve(GRAN)];
    for (const op of ['CreateChunk', 'Map', 'SetAccess']) {
      rt.injectFault(op, 3);
      await expect(rt.createMappedChunks(0, GRAN, ranges, [0])).rejects.toThrow(FaultInjectedError);
      expect(rt.deviceInfo(0).freeBytes).toBe(64 * MIB);
      rt.clearFaults();
    }
    // Empty as they came: mappable again.
    const chunks = await rt.createMappedChunks(0, GRAN, ranges, [0]);
    expect(chunks).toHaveLength(3);
  });

  it('exportNow exports each chunk on the worker thread: its first export() hands that handle out; one nobody took is closed', async () => {
    const rt = openMock();
    const fdsOpen = () => readdirSync('/proc/self/fd').length;
    const before = fdsOpen();
    const ranges = [rt.reserve(GRAN), rt.reserve(GRAN), rt.reserve(GRAN)];
    const chunks = await rt.createMappedChunks(0, GRAN, ranges, [0], { exportable: true, exportNow: true });
    // Exported already: with every later export failing, the first export of each still succeeds.
    rt.injectFault('ExportChunk', 1);
    const h = chunks[0]!.export();
    if (h.kind !== 'fd') throw new Error('mock exports fds');
    expect(fstatSync(h.fd).size).toBe(GRAN);
    expect(() => chunks[0]!.export()).toThrow(FaultInjectedError); // the second one is a new export
    rt.clearFaults();
    closeSync(h.fd);
    // The two never taken are closed with their chunks: no descriptor left behind.
    for (const r of ranges) r.dispose();
    for (const c of chunks) c.dispose();
    expect(fdsOpen()).toBe(before);
    // All or nothing, exports included: a failed export at the third leaves nothing mapped and no descriptor open.
    rt.injectFault('ExportChunk', 3);
    const again = [rt.reserve(GRAN), rt.reserve(GRAN), rt.reserve(GRAN)];
    await expect(rt.createMappedChunks(0, GRAN, again, [0], { exportable: true, exportNow: true })).rejects.toThrow(FaultInjectedError);
    rt.clearFaults();
    expect(rt.deviceInfo(0).freeBytes).toBe(64 * MIB);
    for (const r of again) r.dispose();
    expect(fdsOpen()).toBe(before);
    await expect(rt.createMappedChunks(0, GRAN, [rt.reserve(GRAN)], [0], { exportNow: true })).rejects.toThrow(/exportNow/);
  });

  it('refuses bad ranges before anything is made, and a range in use until it settles', async () => {
    const rt = openMock();
    const r = rt.reserve(GRAN);
    await expect(rt.createMappedChunks(0, GRAN, [rt.reserve(2 * GRAN)], [0])).rejects.toThrow(/exactly 2097152 bytes/);
    await expect(rt.createMappedChunks(0, GRAN, [r, r], [0])).rejects.toThrow(/not listed twice/);
    await expect(rt.createMappedChunks(0, GRAN, [r], [])).rejects.toThrow(InvalidArgumentError);
    await expect(rt.createMappedChunks(9, GRAN, [r], [0])).rejects.toThrow(InvalidArgumentError);
    const busy = rt.reserve(GRAN);
    const pending = rt.createMappedChunks(1, GRAN, [busy], [1]);
    expect(() => busy.dispose()).toThrow(InvalidHandleError);
    expect(() => busy.setAccess(0, GRAN, [1])).toThrow(/createMappedChunks/);
    await pending;
    await expect(rt.createMappedChunks(1, GRAN, [busy], [1])).rejects.toThrow(/nothing mapped/);
    busy.dispose();
    expect(rt.deviceInfo(1).freeBytes).toBe(64 * MIB - GRAN);
    expect(rt.reserve(GRAN).disposed).toBe(false);
    expect(r.disposed).toBe(false);
  });
});

describe('reserveMany (ranges cut from one reservation)', () => {
  it('gives adjacent ranges that map, serve and free on their own; the reservation goes with the last of them', async () => {
    const rt = openMock();
    const s = rt.createStream(0);
    const ranges = rt.reserveMany(3, 2 * GRAN);
    expect(ranges.map((r) => r.size)).toEqual([2 * GRAN, 2 * GRAN, 2 * GRAN]);
    expect(ranges[1]!.base - ranges[0]!.base).toBe(BigInt(2 * GRAN));
    expect(ranges[2]!.base - ranges[1]!.base).toBe(BigInt(2 * GRAN));
    const chunks = await rt.createMappedChunks(0, 2 * GRAN, ranges, [0]);
    // A range's span is its own: a map past its end is refused, not spilled into the next one.
    expect(() => ranges[0]!.map(2 * GRAN, rt.createChunk(0, GRAN))).toThrow(InvalidArgumentError);
    ranges[0]!.dispose();
    chunks[0]!.dispose();
    expect(rt.deviceInfo(0).freeBytes).toBe(64 * MIB - 2 * 2 * GRAN - GRAN); // the unmapped chunk made above is still alive
    await rt.write(ranges[2]!.at(100), pattern(256, 5), s);
    expect(await rt.read(ranges[2]!.at(100), 256, s)).toEqual(pattern(256, 5));
    // FreeRange is called once, by the last range: a fault on its first call shows up there.
    rt.injectFault('FreeRange', 1);
    ranges[1]!.dispose();
    expect(() => ranges[2]!.dispose()).toThrow(FaultInjectedError);
    rt.clearFaults();
    expect(() => rt.reserveMany(0, GRAN)).toThrow(InvalidArgumentError);
    expect(() => rt.reserveMany(2, GRAN + 1)).toThrow(InvalidArgumentError);
  });
});
