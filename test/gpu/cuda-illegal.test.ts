// Own file (own process): on the real driver an illegal address poisons the
// whole process (every device, measured on driver 580), and a context reset does
// not bring it back. Recovery is a fresh process — which is why executors are
// separate processes that attach to memory the HMM owns.
import { spawnSync } from 'node:child_process';
import path from 'node:path';

import { describe, expect, it } from 'vitest';

import { BASIC_KERNELS_SOURCE, IllegalAddressError, Runtime, arg } from '../../src/index.js';

const onCuda = process.env.ELASTICMOE_BACKEND === 'cuda';

describe.runIf(onCuda)('illegal address on a real GPU', () => {
  it('a kernel writing to an unmapped address fails with CUDA_ERROR_ILLEGAL_ADDRESS; a fresh process works', async () => {
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
    // The sticky error survives a reset in this process and says so.
    expect(() => rt.resetDevice(0)).toThrow(IllegalAddressError);
    const cli = path.resolve(__dirname, '../../dist/cli/main.js');
    const fresh = spawnSync(process.execPath, [cli, 'devices', '--backend', 'cuda', '--json'], { encoding: 'utf8' });
    expect(fresh.status).toBe(0);
    expect(JSON.parse(fresh.stdout).devices.length).toBe(rt.deviceCount);
  });
});
