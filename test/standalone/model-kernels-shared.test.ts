// ModelKernels.load shares one module per runtime and device (reference counted), so a
// scale's standby engine pays no module load where the serving engine has one.
import { afterEach, describe, expect, it, vi } from 'vitest';

import { ModelKernels } from '../../src/model/kernels/index.js';
import { FaultInjectedError } from '../../src/runtime/errors.js';
import { openMock } from '../helpers/mock.js';

describe('ModelKernels.load', () => {
  const rt = openMock();
  const loads = vi.spyOn(rt, 'loadModule');
  afterEach(() => {
    loads.mockClear();
    rt.clearFaults();
  });

  it('loads a device\'s module once while any holder is alive, and again after the last dispose', async () => {
    const a = await ModelKernels.load(rt, 0);
    const b = await ModelKernels.load(rt, 0);
    const c = await ModelKernels.load(rt, 1);
    expect(loads.mock.calls.map(([d]) => d)).toEqual([0, 1]);
    expect(b.module).toBe(a.module);
    const dispose = vi.spyOn(a.module, 'dispose');
    a.dispose();
    a.dispose(); // twice: counted once
    expect(dispose).not.toHaveBeenCalled(); // b still holds it
    b.dispose();
    await Promise.resolve();
    expect(dispose).toHaveBeenCalledTimes(1);
    const d = await ModelKernels.load(rt, 0);
    expect(loads.mock.calls.map(([x]) => x)).toEqual([0, 1, 0]);
    expect(d.module).not.toBe(a.module);
    c.dispose();
    d.dispose();
  });

  it('does not keep a failed load: the next call loads again', async () => {
    rt.injectFault('LoadModule', 1);
    await expect(ModelKernels.load(rt, 2)).rejects.toBeInstanceOf(FaultInjectedError);
    rt.clearFaults();
    const k = await ModelKernels.load(rt, 2);
    expect(loads).toHaveBeenCalledTimes(2);
    k.dispose();
  });
});
