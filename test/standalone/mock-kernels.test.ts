import { describe, expect, it } from 'vitest';

import { BASIC_KERNELS_SOURCE, IllegalAddressError, NotFoundError, arg, checksumU32 } from '../../src/index.js';
import { GRAN, mappedChunk, openMock, pattern } from '../helpers/mock.js';

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
});
