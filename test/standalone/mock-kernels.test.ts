import { describe, expect, it } from 'vitest';

import { BASIC_KERNELS_SOURCE, IllegalAddressError, InvalidArgumentError, InvalidHandleError, NotFoundError, arg, checksumU32 } from '../../src/index.js';
import { MAX_KERNEL_ARGS, packLaunch } from '../../src/runtime/kernel.js';
import { GRAN, MIB, mappedChunk, openMock, pattern } from '../helpers/mock.js';

describe('kernels on the mock', () => {
  it('resolves kernels by name and runs their CPU twins in stream order', async () => {
    const rt = openMock();
    const mod = await rt.loadModule(0, { format: 'cuda', data: BASIC_KERNELS_SOURCE, name: 'basic.cu' });
    const s = rt.createStream(0);
    const n = 1000;
    const a = mappedChunk(rt, 0);
    const b = mappedChunk(rt, 0);
    const out = mappedChunk(rt, 0);
    s.launch(mod.kernel('emoe_fill_u32'), { grid: 4, block: 256 }, [a.ptr, arg.u32(0x3f800000), arg.u64(n)]); // 1.0f
    s.launch(mod.kernel('emoe_fill_u32'), { grid: 4, block: 256 }, [b.ptr, arg.u32(0x40000000), arg.u64(n)]); // 2.0f
    s.launch(mod.kernel('emoe_vector_add_f32'), { grid: 4, block: 256 }, [out.ptr, a.ptr, b.ptr, arg.u64(n)]);
    s.launch(mod.kernel('emoe_scale_f32'), { grid: 4, block: 256 }, [out.ptr, arg.f32(0.5), arg.u64(n - 1)]);
    const bytes = await rt.read(out.ptr, n * 4, s);
    const f = new Float32Array(bytes.buffer);
    expect(f[0]).toBe(1.5);
    expect(f[n - 2]).toBe(1.5);
    expect(f[n - 1]).toBe(3);
  });

  it('computes the same position-sensitive checksum as the host reference', async () => {
    const rt = openMock();
    const mod = await rt.loadModule(0, { format: 'cuda', data: BASIC_KERNELS_SOURCE });
    const s = rt.createStream(0);
    const data = mappedChunk(rt, 0);
    const out = mappedChunk(rt, 0);
    const bytes = pattern(GRAN, 11);
    await rt.write(data.ptr, bytes, s);
    s.memset(out.ptr, 0, 8);
    s.launch(mod.kernel('emoe_checksum_u32'), { grid: 64, block: 256 }, [out.ptr, data.ptr, arg.u64(GRAN / 4)]);
    const got = new DataView((await rt.read(out.ptr, 8, s)).buffer).getBigUint64(0, true);
    expect(got).toBe(checksumU32(bytes));
    const swapped = bytes.slice();
    swapped.set(bytes.subarray(0, 4), 4);
    swapped.set(bytes.subarray(4, 8), 0);
    expect(checksumU32(swapped)).not.toBe(got);
  });

  it('refuses a kernel with no CPU twin, and a launch touching memory without access', async () => {
    const rt = openMock();
    const mod = await rt.loadModule(0, { format: 'cuda', data: 'extern "C" __global__ void nope() {}' });
    expect(() => mod.kernel('nope')).toThrow(NotFoundError);
    const other = mappedChunk(rt, 1); // access for device 1 only
    const s = rt.createStream(0);
    s.launch(mod.kernel('emoe_fill_u32'), { grid: 1, block: 32 }, [other.ptr, arg.u32(1), arg.u64(16)]);
    await expect(s.synchronize()).rejects.toBeInstanceOf(IllegalAddressError);
    await expect(rt.loadModule(0, { format: 'cuda', data: '' })).rejects.toBeInstanceOf(IllegalAddressError);
    rt.resetDevice(0);
  });

  it('validates launch arguments', () => {
    const rt = openMock();
    const s = rt.createStream(0);
    expect(() => s.launch({ native: {} } as never, { grid: 0, block: 1 }, [])).toThrow(/grid/);
    expect(() => s.launch({ native: {} } as never, { grid: 1, block: 1 }, [42 as never])).toThrow(/args\[0\]/);
  });

  it('packs every argument type into the launch words bit for bit', () => {
    const rt = openMock();
    const a = mappedChunk(rt, 0);
    const b = mappedChunk(rt, 0);
    const { words, ranges } = packLaunch([3, 2, 1], [128, 1, 1], 64, [
      a.ptr.add(8), arg.i32(-1), arg.u32(0xfffffffe), arg.i64(-2n), arg.u64(2 ** 40 + 5), arg.f32(1.5), arg.f64(-0.1), b.ptr, a.ptr,
    ]);
    expect([...words.subarray(0, 8)]).toEqual([3, 2, 1, 128, 1, 1, 64, 9]);
    const slot = (i: number) => [...words.subarray(8 + 4 * i, 12 + 4 * i)];
    expect(slot(0)).toEqual([0, 0, 8, 0]);
    expect(slot(1)).toEqual([1, 0, 0xffffffff, 0]);
    expect(slot(2)).toEqual([2, 0, 0xfffffffe, 0]);
    expect(slot(3)).toEqual([3, 0, 0xfffffffe, 0xffffffff]);
    expect(slot(4)).toEqual([4, 0, 5, 256]);
    expect(slot(5)).toEqual([5, 0, new Uint32Array(new Float32Array([1.5]).buffer)[0], 0]);
    const f64 = new Uint32Array(new Float64Array([-0.1]).buffer);
    expect(slot(6)).toEqual([6, 0, f64[0], f64[1]]);
    // Each range once: b is the second, a reused.
    expect(slot(7)).toEqual([0, 1, 0, 0]);
    expect(slot(8)).toEqual([0, 0, 0, 0]);
    expect(ranges).toEqual([a.range.native, b.range.native]);
  });

  it('launches through the packed words at offsets above 4 GiB', async () => {
    const rt = openMock();
    const mod = await rt.loadModule(0, { format: 'cuda', data: BASIC_KERNELS_SOURCE });
    const s = rt.createStream(0);
    const at = 6 * 1024 * MIB + GRAN; // the offset's high word is 1
    const range = rt.reserve(at + GRAN);
    const chunk = rt.createChunk(0, GRAN);
    range.map(at, chunk);
    range.setAccess(at, GRAN, [0]);
    s.launch(mod.kernel('emoe_fill_u32'), { grid: 1, block: 64 }, [range.at(at + 16), arg.u32(0xdeadbeef), arg.u64(4)]);
    const got = new Uint32Array((await rt.read(range.at(at), 32, s)).buffer);
    expect([...got]).toEqual([0, 0, 0, 0, 0xdeadbeef, 0xdeadbeef, 0xdeadbeef, 0xdeadbeef]);
  });

  it('names the launch argument that is out of its type or range', async () => {
    const rt = openMock();
    const mod = await rt.loadModule(0, { format: 'cuda', data: BASIC_KERNELS_SOURCE });
    const k = mod.kernel('emoe_fill_u32');
    const s = rt.createStream(0);
    const { ptr, range } = mappedChunk(rt, 0);
    const dims = { grid: 1, block: 32 };
    const bad = (args: unknown[], pattern: RegExp, type: unknown = InvalidArgumentError) => {
      let error: unknown;
      try {
        s.launch(k, dims, args as never);
      } catch (e) {
        error = e;
      }
      expect(error).toBeInstanceOf(type);
      expect((error as Error).message).toMatch(pattern);
    };
    bad([ptr, arg.u32(-1), arg.u64(4)], /args\[1\]\.value/);
    bad([ptr, arg.u32(2 ** 32), arg.u64(4)], /args\[1\]\.value/);
    bad([ptr, arg.i32(2 ** 31), arg.u64(4)], /args\[1\]\.value/);
    bad([ptr, arg.u32(1.5), arg.u64(4)], /args\[1\]\.value/);
    bad([ptr, arg.u32(1), arg.u64(-1n)], /args\[2\]\.value/);
    bad([ptr, arg.u32(1), arg.u64(2n ** 64n)], /args\[2\]\.value/);
    bad([ptr, arg.u32(1), arg.i64(2 ** 60)], /args\[2\]\.value/);
    bad([ptr, arg.f32('x' as never), arg.u64(4)], /args\[1\]\.value/);
    bad([ptr, { type: 'u16', value: 1 }, arg.u64(4)], /args\[1\]/);
    bad(Array.from({ length: MAX_KERNEL_ARGS + 1 }, () => arg.u32(0)), /args/);
    expect(() => s.launch(k, { ...dims, sharedBytes: -1 }, [ptr, arg.u32(1), arg.u64(4)])).toThrow(/sharedBytes/);
    // The addon checks pointers: one past the range's end, a freed range.
    bad([range.at(GRAN), arg.u32(1), arg.u64(4)], /args\[0\]\.offset/);
    range.dispose();
    bad([ptr, arg.u32(1), arg.u64(4)], /freed/, InvalidHandleError);
    // Nothing was queued by any of them.
    await s.synchronize();
  });
});
