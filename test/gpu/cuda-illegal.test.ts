// Own file (own process): an illegal address poisons the CUDA context, and the
// reset that clears it invalidates every resource of the device.
import { describe, expect, it } from 'vitest';

import { BASIC_KERNELS_SOURCE, IllegalAddressError, Runtime, arg } from '../../src/index.js';

const onCuda = process.env.ELASTICMOE_BACKEND === 'cuda';

describe.runIf(onCuda)('illegal address on a real GPU', () => {
  it('a kernel writing to an unmapped reserved address fails with CUDA_ERROR_ILLEGAL_ADDRESS, and reset recovers', async () => {
    const rt = Runtime.open({ backend: 'cuda' });
    const g = rt.granularity(0);
    const mod = await rt.loadModule(0, { format: 'cuda', data: BASIC_KERNELS_SOURCE });
    const range = rt.reserve(g);
    const s = rt.createStream(0);
    s.launch(mod.kernel('emoe_fill_u32'), { grid: 1, block: 32 }, [range.at(0), arg.u32(1), arg.u64(32)]);
    try {
      await s.synchronize();
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(IllegalAddressError);
      expect((e as IllegalAddressError).codeName).toBe('CUDA_ERROR_ILLEGAL_ADDRESS');
    }
    rt.resetDevice(0);
    const chunk = rt.createChunk(0, g);
    const r2 = rt.reserve(g);
    r2.map(0, chunk);
    r2.setAccess(0, g, [0]);
    const s2 = rt.createStream(0);
    await rt.write(r2.at(0), new Uint8Array([5, 6, 7]), s2);
    expect(Array.from(await rt.read(r2.at(0), 3, s2))).toEqual([5, 6, 7]);
  });
});
