import { describe, expect, it } from 'vitest';

import { CopyService, stripes } from '../../src/hmm/copy-service.js';
import { Hmm } from '../../src/hmm/hmm.js';
import type { TensorSpec } from '../../src/hmm/placement.js';
import { FaultInjectedError } from '../../src/index.js';
import { GRAN, MIB, openMock } from '../helpers/mock.js';

const expert = (device: number, group = 'L0.E0'): TensorSpec[] => ['gate', 'up', 'down'].map((p) => ({
  name: `l0.e0.${p}`, dtype: 'bf16' as const, shape: [1024, 1536], device, group,
}));

describe('stripes (pure)', () => {
  it('covers the chunk exactly once, evenly, on the alignment', () => {
    const s = stripes(10 * MIB, 3, GRAN);
    expect(s.map((x) => x.bytes)).toEqual([4 * MIB, 4 * MIB, 2 * MIB]);
    expect(s.map((x) => x.offset)).toEqual([0, 4 * MIB, 8 * MIB]);
    expect(stripes(2 * MIB, 4, GRAN)).toHaveLength(1);
    for (const [size, n] of [[24 * MIB, 4], [6 * MIB, 2], [2 * MIB, 1]] as const) {
      const st = stripes(size, n, GRAN);
      expect(st.reduce((a, x) => a + x.bytes, 0)).toBe(size);
      st.slice(1).forEach((x, i) => expect(x.offset).toBe(st[i]!.offset + st[i]!.bytes));
    }
  });
});

describe('copy service', () => {
  it('replicates a chunk to a new device, striped over two sources, byte exact', async () => {
    const rt = openMock();
    const hmm = new Hmm(rt);
    await hmm.loadSynthetic(expert(0), { seed: 5n });
    const copies = new CopyService(hmm.store);
    await copies.copy([{ sourceId: 'L0.E0@0', targetDevice: 1 }]);
    const progress: number[] = [];
    const [t] = await copies.copy([{ sourceId: 'L0.E0@0', extraSourceIds: ['L0.E0@1'], targetDevice: 3 }], {
      onProgress: (p) => progress.push(p.bytesDone),
    });
    expect(t!.plan.id).toBe('L0.E0@3');
    expect(t!.plan.size).toBe(10 * MIB);
    expect(progress.at(-1)).toBe(10 * MIB);
    expect(progress.length).toBe(2); // one per stripe
    for (const name of ['l0.e0.gate', 'l0.e0.up', 'l0.e0.down']) {
      expect(await hmm.store.checksumTensor(name, 3)).toBe(await hmm.store.checksumTensor(name, 0));
    }
    expect(await hmm.store.checksumChunk('L0.E0@3')).toBe(await hmm.store.checksumChunk('L0.E0@0'));
  });

  it('rolls back on a failed copy: targets freed, sources intact, memory accounted', async () => {
    const rt = openMock();
    const hmm = new Hmm(rt);
    await hmm.loadSynthetic([...expert(0), ...expert(1, 'L0.E1').map((s) => ({ ...s, name: s.name.replace('e0', 'e1') }))]);
    const sum = await hmm.store.checksumChunk('L0.E0@0');
    const before = rt.devices().map((d) => d.freeBytes);
    rt.injectFault('CopyDeviceToDevice', 2);
    await expect(new CopyService(hmm.store).copy([
      { sourceId: 'L0.E0@0', targetDevice: 2 },
      { sourceId: 'L0.E1@1', targetDevice: 2 },
    ])).rejects.toBeInstanceOf(FaultInjectedError);
    expect(hmm.store.has('L0.E0@2')).toBe(false);
    expect(rt.devices().map((d) => d.freeBytes)).toEqual(before);
    expect(await hmm.store.checksumChunk('L0.E0@0')).toBe(sum);
  });
});
