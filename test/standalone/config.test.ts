import { describe, expect, it } from 'vitest';

import { InvalidArgumentError, parseBytes, resolveRuntimeOptions } from '../../src/index.js';

describe('runtime options', () => {
  it('defaults to auto with 4 mock devices of 8 GiB', () => {
    const o = resolveRuntimeOptions({}, {});
    expect(o.backend).toBe('auto');
    expect(o.mockDevices).toBe(4);
    expect(o.mockCapacity).toBe(8 * 1024 ** 3);
  });

  it('reads the environment, and options win over it', () => {
    const env = { ELASTICMOE_BACKEND: 'mock', ELASTICMOE_MOCK_DEVICES: '2', ELASTICMOE_MOCK_CAPACITY: '512MiB' };
    expect(resolveRuntimeOptions({}, env)).toMatchObject({ backend: 'mock', mockDevices: 2, mockCapacity: 512 * 1024 ** 2 });
    expect(resolveRuntimeOptions({ backend: 'cuda', mockDevices: 3 }, env)).toMatchObject({ backend: 'cuda', mockDevices: 3 });
  });

  it('names the bad setting and what it must be', () => {
    expect(() => resolveRuntimeOptions({}, { ELASTICMOE_BACKEND: 'rocm' })).toThrow(
      /ELASTICMOE_BACKEND=rocm must be one of auto, cuda, acl, mock/);
    expect(() => resolveRuntimeOptions({ mockDevices: 0 }, {})).toThrow(InvalidArgumentError);
    expect(() => resolveRuntimeOptions({ mockCapacity: 3 * 1024 ** 2 }, {})).toThrow(/multiple of 2 MiB/);
    expect(() => resolveRuntimeOptions({ bogus: 1 } as never, {})).toThrow(InvalidArgumentError);
    try {
      resolveRuntimeOptions({ mockDevices: 65 }, {});
      expect.unreachable();
    } catch (e) {
      expect((e as InvalidArgumentError).argument).toBe('option mockDevices');
    }
  });

  it('parses sizes', () => {
    expect(parseBytes('2MiB')).toBe(2 * 1024 ** 2);
    expect(parseBytes('1.5GiB')).toBe(1.5 * 1024 ** 3);
    expect(parseBytes('4096')).toBe(4096);
    expect(() => parseBytes('lots')).toThrow(/not a size/);
  });
});
