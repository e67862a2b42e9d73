// GPU suite for stream capture and graphs: runs only with ELASTICMOE_BACKEND=cuda
// on the device machine. The same checks as test/standalone/runtime-graph.test.ts
// (the mock's rules), against the driver's own.
import { describe, expect, it } from 'vitest';

import {
  BASIC_KERNELS_SOURCE, type DevicePointer, type HostBuffer, InvalidArgumentError, InvalidHandleError, type Module,
  NotSupportedError, Runtime, type Stream, arg,
} from '../../src/index.js';

const onCuda = process.env.ELASTICMOE_BACKEND === 'cuda';
const N = 1 << 16;
const DIMS = { grid: 64, block: 256 };

describe.runIf(onCuda)('cuda stream capture and graphs', () => {
  const rt = onCuda ? Runtime.open({ backend: 'cuda' }) : (undefined as unknown as Runtime);
  const modules = new Map<number, Module>();

  async function mod(device: number): Promise<Module> {
    let m = modules.get(device);
    if (!m) {
      m = await rt.loadModule(device, { format: 'cuda', data: BASIC_KERNELS_SOURCE, name: 'basic.cu' });
      modules.set(device, m);
    }
    return m;
  }

  /** One chunk of `device` mapped with access for `access`; disposed by the caller through the returned function. */
  function buffer(device: number, access: number[] = [device]): { ptr: DevicePointer; free: () => void } {
    const g = rt.granularity(device);
    const chunk = rt.createChunk(device, g);
    const range = rt.reserve(g);
    const ptr = range.map(0, chunk);
    range.setAccess(0, g, access);
    return { ptr, free: () => { range.dispose(); chunk.dispose(); } };
  }

  function floats(h: HostBuffer): Float32Array {
    const b = h.bytes();
    return new Float32Array(b.buffer, b.byteOffset, N);
  }

  /** out = (input + 1) * 0.5, through device memory and back. */
  function queueStep(s: Stream, m: Module, input: HostBuffer, output: HostBuffer, base: DevicePointer): void {
    const a = base;
    const b = base.add(N * 4);
    const out = base.add(2 * N * 4);
    s.upload(a, input, N * 4)
      .launch(m.kernel('emoe_fill_u32'), DIMS, [b, arg.u32(0x3f800000), arg.u64(N)])
      .launch(m.kernel('emoe_vector_add_f32'), DIMS, [out, a, b, arg.u64(N)])
      .memset(a, 0, N * 4)
      .copy(a, out, N * 4)
      .launch(m.kernel('emoe_scale_f32'), DIMS, [a, arg.f32(0.5), arg.u64(N)])
      .download(output, a, N * 4);
  }

  it('replays a captured sequence with the results of running it directly, reading inputs at launch', async () => {
    const m = await mod(0);
    const s = rt.createStream(0);
    const mem = buffer(0);
    const input = rt.hostBuffer(N * 4);
    const output = rt.hostBuffer(N * 4);
    floats(input).set(Array.from({ length: N }, (_, i) => i % 1000));
    queueStep(s, m, input, output, mem.ptr);
    await s.synchronize();
    const direct = floats(output).slice();
    expect(direct[7]).toBe(4);

    floats(output).fill(-1);
    const graph = s.capture(() => queueStep(s, m, input, output, mem.ptr));
    await s.synchronize();
    expect(floats(output)[7]).toBe(-1);
    graph.launch(s);
    await s.synchronize();
    expect(Buffer.compare(Buffer.from(output.bytes()), Buffer.from(new Uint8Array(direct.buffer)))).toBe(0);

    for (const v of [1, 3, 41]) {
      floats(input).fill(v);
      graph.launch(s);
      await s.synchronize();
      expect(floats(output).every((x) => x === (v + 1) / 2)).toBe(true);
    }
    graph.dispose();
    expect(() => graph.launch(s)).toThrow(InvalidHandleError);
    input.dispose();
    output.dispose();
    mem.free();
    s.dispose();
  });

  it('replays device state as it is at launch, with the kernel arguments captured', async () => {
    const m = await mod(0);
    const s = rt.createStream(0);
    const mem = buffer(0);
    const graph = s.capture(() => s.launch(m.kernel('emoe_scale_f32'), { grid: 1, block: 32 }, [mem.ptr, arg.f32(2), arg.u64(1)]));
    await rt.write(mem.ptr, new Uint8Array(new Float32Array([1.5]).buffer), s);
    for (let i = 0; i < 5; i++) graph.launch(s);
    expect(new Float32Array((await rt.read(mem.ptr, 4, s)).buffer)[0]).toBe(48);
    graph.dispose();
    mem.free();
    s.dispose();
  });

  it('forks and joins between two streams of one device; an unjoined fork fails endCapture', async () => {
    const m = await mod(0);
    const s = rt.createStream(0);
    const side = rt.createStream(0);
    const fork = rt.createEvent(0);
    const join = rt.createEvent(0);
    const mem = buffer(0);
    const host = rt.hostBuffer(N * 4);
    const x = mem.ptr;
    const y = mem.ptr.add(N * 4);

    s.beginCapture();
    s.launch(m.kernel('emoe_fill_u32'), DIMS, [x, arg.u32(0x40400000), arg.u64(N)]); // 3.0f
    fork.record(s);
    side.wait(fork);
    side.launch(m.kernel('emoe_vector_add_f32'), DIMS, [y, x, x, arg.u64(N)]);
    join.record(side);
    s.wait(join);
    s.download(host, y, N * 4);
    const graph = s.endCapture();
    await side.synchronize(); // out of capture mode
    graph.launch(s);
    await s.synchronize();
    expect(floats(host).every((v) => v === 6)).toBe(true);
    graph.dispose();

    s.beginCapture();
    fork.record(s);
    side.wait(fork);
    side.memset(y, 0, 16);
    try {
      s.endCapture();
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(InvalidArgumentError);
      expect((e as InvalidArgumentError).codeName).toBe('CUDA_ERROR_STREAM_CAPTURE_UNJOINED');
    }
    await s.synchronize();
    await side.synchronize();
    host.dispose();
    mem.free();
    s.dispose();
    side.dispose();
  });

  it.runIf(onCuda && rt.deviceCount >= 2 && rt.canAccessPeer(0, 1))('forks and joins across two GPUs', async () => {
    const m0 = await mod(0);
    const m1 = await mod(1);
    const s0 = rt.createStream(0);
    const s1 = rt.createStream(1);
    const fork = rt.createEvent(0);
    const join = rt.createEvent(1);
    const bx = buffer(0, [0, 1]);
    const by = buffer(1, [0, 1]);
    const host = rt.hostBuffer(N * 4);

    s0.beginCapture();
    s0.launch(m0.kernel('emoe_fill_u32'), DIMS, [bx.ptr, arg.u32(0x40400000), arg.u64(N)]); // 3.0f on GPU 0
    fork.record(s0);
    s1.wait(fork); // s1 (GPU 1) joins the capture
    s1.launch(m1.kernel('emoe_vector_add_f32'), DIMS, [by.ptr, bx.ptr, bx.ptr, arg.u64(N)]); // reads GPU 0's memory
    join.record(s1);
    s0.wait(join);
    s0.download(host, by.ptr, N * 4);
    const graph = s0.endCapture();
    await s1.synchronize();
    expect(floats(host)[0]).toBe(0);
    graph.launch(s0);
    await s0.synchronize();
    expect(floats(host).every((v) => v === 6)).toBe(true);
    floats(host).fill(0);
    graph.launch(s0); // again
    await s0.synchronize();
    expect(floats(host)[N - 1]).toBe(6);
    graph.dispose();
    host.dispose();
    bx.free();
    by.free();
    s0.dispose();
    s1.dispose();
  });

  it('refuses synchronize during capture at once, invalidating it; other streams and host allocations keep working', async () => {
    const s = rt.createStream(0);
    const other = rt.createStream(0);
    const mem = buffer(0);
    s.beginCapture();
    s.memset(mem.ptr, 1, 64);
    // RELAXED mode: another stream, a pinned allocation and its free work meanwhile.
    await rt.write(mem.ptr.add(64), new Uint8Array([2, 2, 2, 2]), other);
    const t0 = Date.now();
    await expect(s.synchronize()).rejects.toBeInstanceOf(NotSupportedError);
    expect(Date.now() - t0).toBeLessThan(5000);
    try {
      s.endCapture();
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(NotSupportedError);
      expect((e as NotSupportedError).codeName).toBe('CUDA_ERROR_STREAM_CAPTURE_INVALIDATED');
    }
    await s.synchronize();
    const bytes = await rt.read(mem.ptr, 68, s);
    expect(bytes[0]).toBe(0);
    expect(bytes[64]).toBe(2);
    mem.free();
    s.dispose();
    other.dispose();
  });

  // The two rules below are CUDA's as documented (programming guide, "Prohibited
  // and Unhandled Operations"); the mock enforces them the same way. These
  // checks confirm the driver does.
  it('refuses a wait on an event recorded outside the capture', async () => {
    const s = rt.createStream(0);
    const other = rt.createStream(0);
    const outside = rt.createEvent(0).record(other);
    s.beginCapture();
    let error: unknown;
    let ended: unknown;
    try {
      s.wait(outside);
    } catch (e) {
      error = e;
    }
    try {
      s.endCapture().dispose();
    } catch (e) {
      ended = e;
    }
    expect(error, 'waiting on an uncaptured event during capture').toBeInstanceOf(NotSupportedError);
    expect(ended, 'endCapture after it').toBeInstanceOf(NotSupportedError);
    await s.synchronize();
    s.dispose();
    other.dispose();
  });

  it('refuses to synchronize an event recorded during the capture', async () => {
    const s = rt.createStream(0);
    const e = rt.createEvent(0);
    s.beginCapture();
    e.record(s);
    await expect(e.synchronize()).rejects.toBeInstanceOf(NotSupportedError);
    expect(() => s.endCapture()).toThrow(NotSupportedError);
    e.record(s); // recorded outside capture: usable again
    await e.synchronize();
    s.dispose();
  });

  it('keeps an event recorded during a capture unusable after it: a replay records nothing', async () => {
    const s = rt.createStream(0);
    const other = rt.createStream(0);
    const e = rt.createEvent(0);
    const graph = s.capture(() => e.record(s));
    graph.launch(s);
    await s.synchronize();
    await expect(e.synchronize(), 'synchronizing it').rejects.toBeInstanceOf(InvalidArgumentError);
    expect(() => other.wait(e), 'waiting on it from a stream that is not capturing').toThrow(InvalidArgumentError);
    e.record(s);
    other.wait(e);
    await other.synchronize();
    graph.dispose();
    s.dispose();
    other.dispose();
  });

  it('endCaptureAsync ends the capture at once and instantiates on the thread pool while other streams run (timings printed)', async () => {
    const m = await mod(0);
    const s = rt.createStream(0);
    const other = rt.createStream(0);
    const mem = buffer(0);
    const side = buffer(0);
    const k = m.kernel('emoe_scale_f32');
    const launches = 19 * 64; // each of 64 floats doubled 19 times
    const queue = () => {
      for (let i = 0; i < launches; i++) s.launch(k, { grid: 1, block: 32 }, [mem.ptr.add((i % 64) * 4), arg.f32(2), arg.u64(1)]);
    };
    await rt.write(mem.ptr, new Uint8Array(new Float32Array(64).fill(1).buffer), s);
    s.beginCapture();
    queue();
    const t0 = performance.now();
    const pending = s.endCaptureAsync();
    const endMs = performance.now() - t0;
    // The capture is over: work on another stream of the device runs and completes meanwhile.
    other.launch(m.kernel('emoe_fill_u32'), DIMS, [side.ptr, arg.u32(7), arg.u64(N)]);
    await other.synchronize();
    expect(new Uint32Array((await rt.read(side.ptr, 4, other)).buffer)[0]).toBe(7);
    const graph = await pending;
    const readyMs = performance.now() - t0;
    graph.launch(s);
    const out = new Float32Array((await rt.read(mem.ptr, 64 * 4, s)).buffer);
    expect(out.every((x) => x === 2 ** 19)).toBe(true);
    // The same capture instantiated inline, for the printed comparison.
    s.beginCapture();
    queue();
    const i0 = performance.now();
    const inline = s.endCapture();
    const inlineMs = performance.now() - i0;
    console.log(`${launches}-node graph: endCaptureAsync held the thread ${endMs.toFixed(2)} ms (graph ready after ` +
      `${readyMs.toFixed(2)} ms); endCapture (inline instantiation) ${inlineMs.toFixed(2)} ms`);
    // Not capturing: a rejection.
    await expect(s.endCaptureAsync()).rejects.toThrow(InvalidArgumentError);
    graph.dispose();
    inline.dispose();
    mem.free();
    side.free();
    s.dispose();
    other.dispose();
  });

  it('cuts the host cost of launching many small kernels (timings printed)', async () => {
    const m = await mod(0);
    const s = rt.createStream(0);
    const mem = buffer(0);
    const k = m.kernel('emoe_scale_f32');
    const launches = 1200; // ~25 kernels x 48 layers, one decode step
    const queue = () => {
      for (let i = 0; i < launches; i++) s.launch(k, { grid: 1, block: 32 }, [mem.ptr.add((i % 64) * 4), arg.f32(1), arg.u64(1)]);
    };
    queue();
    await s.synchronize();
    const t0 = performance.now();
    queue();
    const direct = performance.now() - t0;
    await s.synchronize();
    const c0 = performance.now();
    const graph = s.capture(queue);
    const capture = performance.now() - c0;
    graph.launch(s);
    await s.synchronize();
    const l0 = performance.now();
    graph.launch(s);
    const replay = performance.now() - l0;
    await s.synchronize();
    console.log(`${launches} launches: direct ${direct.toFixed(2)} ms of host time, capture + instantiate ` +
      `${capture.toFixed(2)} ms, replay ${replay.toFixed(3)} ms of host time`);
    expect(replay).toBeLessThan(direct);
    graph.dispose();
    mem.free();
    s.dispose();
  });
});
