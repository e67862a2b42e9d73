// Stream capture into graphs on the mock backend: the mock records instead of
// running, checks CUDA's capture rules, and replays with the same results.
import { describe, expect, it } from 'vitest';

import {
  BASIC_KERNELS_SOURCE, type DevicePointer, FaultInjectedError, Graph, type HostBuffer, IllegalAddressError,
  InvalidArgumentError, InvalidHandleError, type Module, NotSupportedError, OutOfMemoryError, type Runtime, type Stream,
  arg,
} from '../../src/index.js';
import { mappedChunk, openMock } from '../helpers/mock.js';

const N = 4096;
const DIMS = { grid: 16, block: 256 };

interface Step {
  input: HostBuffer;
  output: HostBuffer;
  a: DevicePointer;
  b: DevicePointer;
  out: DevicePointer;
}

function makeStep(rt: Runtime, device = 0): Step {
  const mem = mappedChunk(rt, device);
  return {
    input: rt.hostBuffer(N * 4),
    output: rt.hostBuffer(N * 4),
    a: mem.ptr,
    b: mem.ptr.add(N * 4),
    out: mem.ptr.add(2 * N * 4),
  };
}

/** out = (input + 1) * 0.5, through device memory and back: uploads, launches, a fill, a copy, a download. */
function queueStep(s: Stream, mod: Module, st: Step): void {
  s.upload(st.a, st.input, N * 4)
    .launch(mod.kernel('emoe_fill_u32'), DIMS, [st.b, arg.u32(0x3f800000), arg.u64(N)]) // 1.0f
    .launch(mod.kernel('emoe_vector_add_f32'), DIMS, [st.out, st.a, st.b, arg.u64(N)])
    .memset(st.a, 0, N * 4)
    .copy(st.a, st.out, N * 4)
    .launch(mod.kernel('emoe_scale_f32'), DIMS, [st.a, arg.f32(0.5), arg.u64(N)])
    .download(st.output, st.a, N * 4);
}

function floats(h: HostBuffer): Float32Array {
  return new Float32Array(h.bytes().buffer, h.bytes().byteOffset, N);
}

async function setup(devices = 1): Promise<{ rt: Runtime; mods: Module[] }> {
  const rt = openMock();
  const mods: Module[] = [];
  for (let d = 0; d < devices; d++) mods.push(await rt.loadModule(d, { format: 'cuda', data: BASIC_KERNELS_SOURCE }));
  return { rt, mods };
}

describe('stream capture and graphs on the mock', () => {
  it('replays a captured sequence of launches and copies with the same results as running it directly', async () => {
    const { rt, mods } = await setup();
    const mod = mods[0]!;
    const s = rt.createStream(0);
    const st = makeStep(rt);
    floats(st.input).set(Array.from({ length: N }, (_, i) => i));

    queueStep(s, mod, st);
    await s.synchronize();
    const direct = floats(st.output).slice();
    expect(direct[7]).toBe(4);

    floats(st.output).fill(-1);
    s.beginCapture();
    queueStep(s, mod, st);
    const graph = s.endCapture();
    expect(graph).toBeInstanceOf(Graph);
    await s.synchronize();
    expect(floats(st.output)[7]).toBe(-1); // recorded, not run

    graph.launch(s);
    await s.synchronize();
    expect(floats(st.output)).toEqual(direct);
    graph.dispose();
  });

  it('endCaptureAsync ends the capture at once and resolves with an instantiated graph; its failures reject and leak nothing', async () => {
    const { rt, mods } = await setup();
    const mod = mods[0]!;
    const s = rt.createStream(0);
    const st = makeStep(rt);
    floats(st.input).set(Array.from({ length: N }, (_, i) => i));
    s.beginCapture();
    queueStep(s, mod, st);
    const pending = s.endCaptureAsync();
    // The capture is over before the promise settles: this runs now, not into the graph.
    floats(st.output).fill(-1);
    s.launch(mod.kernel('emoe_fill_u32'), DIMS, [st.out, arg.u32(0), arg.u64(N)]);
    await s.synchronize();
    const graph = await pending;
    expect(graph).toBeInstanceOf(Graph);
    expect(floats(st.output)[7]).toBe(-1);
    graph.launch(s);
    await s.synchronize();
    expect(floats(st.output)[7]).toBe(4);
    graph.dispose();

    // Not capturing: a rejection (not a throw), as endCapture's error.
    await expect(s.endCaptureAsync()).rejects.toThrow(InvalidArgumentError);
    // A failed instantiation rejects; the capture has ended, so the stream captures again.
    s.beginCapture();
    queueStep(s, mod, st);
    rt.injectFault('InstantiateGraph', 1, 'OUT_OF_MEMORY');
    await expect(s.endCaptureAsync()).rejects.toThrow(OutOfMemoryError);
    s.beginCapture();
    const again = await s.endCaptureAsync();
    again.dispose();
  });

  it('replays read host inputs and device memory as they are at launch, with the kernel arguments captured', async () => {
    const { rt, mods } = await setup();
    const mod = mods[0]!;
    const s = rt.createStream(0);
    const st = makeStep(rt);
    const graph = s.capture(() => queueStep(s, mod, st));

    for (const v of [1, 3, 41]) {
      floats(st.input).fill(v);
      graph.launch(s);
      await s.synchronize();
      expect(floats(st.output).every((x) => x === (v + 1) / 2)).toBe(true);
    }

    // A step that consumes device state: each replay doubles what the last one left.
    let factor = 2;
    const double = s.capture(() => s.launch(mod.kernel('emoe_scale_f32'), DIMS, [st.out, arg.f32(factor), arg.u64(1)]));
    factor = 10; // the captured value stays 2
    await rt.write(st.out, new Uint8Array(new Float32Array([1.5]).buffer), s);
    for (let i = 0; i < 5; i++) double.launch(s);
    const back = new Float32Array((await rt.read(st.out, 4, s)).buffer);
    expect(back[0]).toBe(48);
    expect(factor).toBe(10);
    graph.dispose();
    double.dispose();
  });

  it('forks and joins across two devices: the joined stream runs its part on its own device', async () => {
    const { rt, mods } = await setup(2);
    const s0 = rt.createStream(0);
    const s1 = rt.createStream(1);
    const fork = rt.createEvent(0);
    const join = rt.createEvent(1);
    const x = mappedChunk(rt, 0, undefined, [0, 1]).ptr; // written on device 0, read on device 1
    const y = mappedChunk(rt, 1, undefined, [0, 1]).ptr; // written on device 1, read on device 0
    const host = rt.hostBuffer(N * 4);

    s0.beginCapture();
    s0.launch(mods[0]!.kernel('emoe_fill_u32'), DIMS, [x, arg.u32(0x40400000), arg.u64(N)]); // 3.0f
    fork.record(s0);
    s1.wait(fork); // s1 joins the capture
    s1.launch(mods[1]!.kernel('emoe_vector_add_f32'), DIMS, [y, x, x, arg.u64(N)]);
    join.record(s1);
    s0.wait(join); // joined back
    s0.download(host, y, N * 4);
    const graph = s0.endCapture();

    await s1.synchronize(); // both streams left capture mode
    expect(floats(host)[0]).toBe(0);
    graph.launch(s0);
    await s0.synchronize();
    expect(floats(host).every((v) => v === 6)).toBe(true);
    // A replay records no event: the captured record marks nothing that runs.
    await expect(join.synchronize()).rejects.toBeInstanceOf(InvalidArgumentError);
    join.record(s1);
    await join.synchronize();
    graph.dispose();
  });

  it('keeps an event recorded during a capture unusable after it: a replay records nothing', async () => {
    const { rt } = await setup();
    const s = rt.createStream(0);
    const other = rt.createStream(0);
    const e = rt.createEvent(0);
    const graph = s.capture(() => e.record(s));
    graph.launch(s);
    await s.synchronize();
    await expect(e.synchronize()).rejects.toBeInstanceOf(InvalidArgumentError);
    expect(() => other.wait(e)).toThrow(InvalidArgumentError);
    e.record(s);
    other.wait(e);
    await other.synchronize();
    graph.dispose();
  });

  it('fails endCapture when a joined stream was not joined back, and leaves both streams usable', async () => {
    const { rt, mods } = await setup(2);
    const s0 = rt.createStream(0);
    const s1 = rt.createStream(1);
    const fork = rt.createEvent(0);
    const y = mappedChunk(rt, 1).ptr;

    s0.beginCapture();
    fork.record(s0);
    s1.wait(fork);
    s1.launch(mods[1]!.kernel('emoe_fill_u32'), DIMS, [y, arg.u32(7), arg.u64(N)]);
    expect(() => s1.endCapture()).toThrow(/end the capture on stream/); // not the origin
    try {
      s0.endCapture();
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(InvalidArgumentError);
      expect((e as InvalidArgumentError).argument).toBe('stream');
      expect((e as InvalidArgumentError).codeName).toBe('MOCK_ERROR_STREAM_CAPTURE_UNJOINED');
      expect((e as Error).message).toMatch(/not joined back/);
    }
    await s0.synchronize();
    await s1.synchronize();
    expect(new Uint32Array((await rt.read(y, 4, s1)).buffer)[0]).toBe(0); // the captured fill never ran
    expect(() => s0.endCapture()).toThrow(InvalidArgumentError); // no capture left
  });

  it('refuses synchronize during capture without hanging, and endCapture reports the invalidated capture', async () => {
    const { rt } = await setup();
    const s = rt.createStream(0);
    const other = rt.createStream(0);
    const p = mappedChunk(rt, 0).ptr;

    s.beginCapture();
    s.memset(p, 1, 64);
    await expect(s.synchronize()).rejects.toBeInstanceOf(NotSupportedError);
    await expect(s.synchronize()).rejects.toThrow(/invalidated/);
    other.memset(p.add(64), 2, 64); // other streams keep working
    await other.synchronize();
    try {
      s.endCapture();
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(NotSupportedError);
      expect((e as NotSupportedError).codeName).toBe('MOCK_ERROR_STREAM_CAPTURE_INVALIDATED');
      expect((e as Error).message).toMatch(/SynchronizeStream/);
    }
    await s.synchronize(); // out of capture mode
    const bytes = await rt.read(p, 128, s);
    expect(bytes[0]).toBe(0);
    expect(bytes[64]).toBe(2);

    // Waiting on an event recorded outside the capture crosses its boundary.
    const outside = rt.createEvent(0).record(other);
    s.beginCapture();
    expect(() => s.wait(outside)).toThrow(NotSupportedError);
    expect(() => s.endCapture()).toThrow(/invalidated/);
  });

  it('capture() ends the capture when the body throws or returns a promise', async () => {
    const { rt } = await setup();
    const s = rt.createStream(0);
    const p = mappedChunk(rt, 0).ptr;
    expect(() => s.capture(() => {
      s.memset(p, 9, 16);
      throw new Error('boom');
    })).toThrow('boom');
    await s.synchronize(); // not capturing
    expect(() => s.capture((async () => {}) as never)).toThrow(InvalidArgumentError);
    await s.synchronize();
    expect((await rt.read(p, 1, s))[0]).toBe(0);
  });

  it('disposes cleanly: idempotent, launches already queued still run, later use is an invalid handle', async () => {
    const { rt, mods } = await setup();
    const s = rt.createStream(0);
    const p = mappedChunk(rt, 0).ptr;
    await rt.write(p, new Uint8Array(new Float32Array([1]).buffer), s);
    const graph = s.capture(() => s.launch(mods[0]!.kernel('emoe_scale_f32'), DIMS, [p, arg.f32(3), arg.u64(1)]));
    graph.launch(s).launch(s);
    graph[Symbol.dispose]();
    graph.dispose();
    expect(graph.disposed).toBe(true);
    expect(() => graph.launch(s)).toThrow(InvalidHandleError);
    expect(new Float32Array((await rt.read(p, 4, s)).buffer)[0]).toBe(9);

    // The wrapper checks its receiver and its argument.
    const other = s.capture(() => {});
    const launch = other.native.launch as unknown as (this: unknown, stream: unknown) => void;
    expect(() => launch.call({}, s.native)).toThrow(TypeError);
    expect(() => launch.call(other.native, {})).toThrow(InvalidArgumentError);
    const stranger = openMock().createStream(0);
    expect(() => other.launch(stranger)).toThrow(/same backend/);

    // Disposing the stream that began a capture abandons it.
    const t = rt.createStream(0);
    t.beginCapture();
    t.memset(p, 0, 4);
    t.dispose();
    await s.synchronize();
    expect(new Float32Array((await rt.read(p, 4, s)).buffer)[0]).toBe(9);
    other.dispose();
  });

  it('fails a replay that touches memory its devices may not access, like the copy itself would', async () => {
    const { rt } = await setup();
    const s = rt.createStream(0);
    const { range, ptr } = mappedChunk(rt, 0);
    const host = rt.hostBuffer(64);
    const graph = s.capture(() => s.upload(ptr, host, 64));
    range.setAccess(0, range.size, [1]);
    graph.launch(s);
    await expect(s.synchronize()).rejects.toBeInstanceOf(IllegalAddressError);
    rt.resetDevice(0);
    range.setAccess(0, range.size, [0]);
    host.dispose(); // freed after capture: the replay refuses to read it
    graph.launch(s);
    await expect(s.synchronize()).rejects.toThrow(/freed after it was captured/);
    rt.resetDevice(0);
  });

  it('injects faults into BeginCapture, EndCapture and LaunchGraph', async () => {
    const { rt } = await setup();
    const s = rt.createStream(0);
    const p = mappedChunk(rt, 0).ptr;
    rt.injectFault('BeginCapture');
    expect(() => s.beginCapture()).toThrow(FaultInjectedError);
    await s.synchronize();

    // A failed end (or instantiation) still ends the capture.
    s.beginCapture();
    s.memset(p, 5, 8);
    rt.injectFault('EndCapture', 1, 'OUT_OF_MEMORY');
    expect(() => s.endCapture()).toThrow(OutOfMemoryError);
    await s.synchronize();

    // A fault in work queued during a capture invalidates it.
    s.beginCapture();
    rt.injectFault('MemsetD8');
    expect(() => s.memset(p, 5, 8)).toThrow(FaultInjectedError);
    expect(() => s.endCapture()).toThrow(NotSupportedError);

    const graph = s.capture(() => s.memset(p, 6, 8));
    rt.injectFault('LaunchGraph', 2);
    graph.launch(s);
    expect(() => graph.launch(s)).toThrow(FaultInjectedError);
    await s.synchronize();
    expect(Array.from(await rt.read(p, 8, s))).toEqual(new Array(8).fill(6));
    graph.dispose();
  });
});
