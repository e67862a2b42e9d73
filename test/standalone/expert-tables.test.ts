// Virtual expert tables (src/hmm/expert-tables.ts, DeploymentOptions.expertTables) on the mock
// backend, whose virtual memory keeps CUDA's rules: whole-chunk maps, no access before SetAccess,
// a released chunk's memory kept while any range still maps it. Guarded here:
//   - an expert's bytes read through its slot are its chunk's; a taken slot is refused; a failed
//     map leaves nothing mapped; unmapping gives the memory of a released chunk back;
//   - a deployment with tables serves the same greedy tokens across 1→2→4→3→1 scales mid-generation,
//     its engines read every expert at its slot, and exactly the layout's expert chunks are mapped;
//   - up/down cycles end with memory and mappings exactly as at start; a failed table map rolls
//     the scale back with memory and mappings as before.
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';

import { ExpertTables, expertOf } from '../../src/hmm/expert-tables.js';
import { Hmm } from '../../src/hmm/hmm.js';
import { expertWeightNames } from '../../src/executor/weights.js';
import { weightSpecs } from '../../src/model/weights.js';
import { FaultInjectedError, InvalidArgumentError } from '../../src/runtime/errors.js';
import type { Runtime } from '../../src/runtime/runtime.js';
import { roundRobinLayout, toExpertPlacement } from '../../src/scaling/layout.js';
import { Deployment } from '../../src/scaling/orchestrator.js';
import { MIB, openMock } from '../helpers/mock.js';
import { closeAll, deploymentsOf, greedyTokens, tinyMoe, unitScale } from '../helpers/tiny-moe.js';

const config = tinyMoe(2048);
const SEED = 20251002n;
const MAX = 400;
const PROMPTS = Array.from({ length: 6 }, (_, k) => Array.from({ length: 3 + ((k * 5) % 17) }, (_, i) => (i * 13 + k * 29 + 1) % 97));

const { opened, start } = deploymentsOf({ config, seed: SEED, capacity: 128 * MIB, kvBlocksPerDevice: 512 });
const freeBytes = (rt: Runtime) => rt.devices().map((d) => d.freeBytes);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The expert chunks `dep`'s current layout holds, by device. */
function layoutExperts(dep: Deployment): Map<number, number> {
  const ids = new Set(dep.chunkIds());
  const per = new Map<number, number>();
  for (const c of dep.hmm.store.all()) if (ids.has(c.plan.id) && expertOf(c.plan)) per.set(c.plan.device, (per.get(c.plan.device) ?? 0) + 1);
  return per;
}

/** Every expert the serving engine computes is read at its slot of its device's table; every layout expert chunk is mapped, nothing else. */
function expectEnginesReadTheTables(dep: Deployment): void {
  const stats = dep.expertTables!;
  const base = new Map(stats.devices.map((d) => [d.device, d.base]));
  let checked = 0;
  dep.devices.forEach((device, rank) => {
    dep.expertWeights(rank).forEach((w, key) => {
      if (!w) return;
      const layer = Math.floor(key / config.experts);
      const expert = key % config.experts;
      const name = expertWeightNames(config, layer, expert).gate;
      const offset = dep.hmm.store.tensor(name, device).location.offset;
      expect(w.gate.address).toBe(base.get(device)! + BigInt(key * stats.stride + offset));
      checked++;
    });
  });
  expect(checked).toBeGreaterThanOrEqual(config.layers * config.experts);
  const want = layoutExperts(dep);
  expect(new Map(stats.devices.filter((d) => d.mapped > 0).map((d) => [d.device, d.mapped]))).toEqual(want);
}

/** Chunks mapped per device (devices whose table is reserved but empty left out: address space only, reused later). */
const mappedPer = (dep: Deployment) => dep.expertTables!.devices.filter((d) => d.mapped > 0).map((d) => [d.device, d.mapped]);

const reference: number[][] = [];
beforeAll(async () => {
  reference.push(...await greedyTokens((await start([0])).dep, PROMPTS, MAX));
});
afterAll(() => closeAll(opened));

describe('ExpertTables', () => {
  async function loaded(devices: number[]) {
    const rt = openMock({ mockCapacity: 64 * MIB });
    const hmm = new Hmm(rt);
    const layout = roundRobinLayout(devices, config.layers, config.experts);
    await hmm.loadWeights(weightSpecs(config, layout.devices, toExpertPlacement(layout)), { seed: SEED, scaleFor: unitScale });
    return { rt, hmm };
  }

  it('reads an expert through its slot as through its chunk; refuses a taken slot; a failed map leaves nothing; unmapping frees a released chunk', async () => {
    const { rt, hmm } = await loaded([0, 1]);
    try {
      const tables = ExpertTables.fromStore(hmm.store, config.layers, config.experts);
      const experts = hmm.store.all().filter((c) => expertOf(c.plan));
      expect(experts).toHaveLength(config.layers * config.experts);
      expect(tables.stride).toBe(Math.max(...experts.map((c) => c.plan.size)));
      expect(tables.tableBytes).toBe(config.layers * config.experts * tables.stride);
      expect(tables.pointer('model.embed_tokens.weight', 0)).toBeUndefined(); // not an expert tensor
      // Layer 1's expert 5 (on device 1 round robin): its gate at slot 1 * 8 + 5.
      const c = hmm.store.get('L1.E5@1');
      const gate = expertWeightNames(config, 1, 5).gate;
      const loc = hmm.store.tensor(gate, 1).location;
      const ptr = tables.pointer(gate, 1)!;
      expect(ptr.address).toBe(tables.range(1).base + BigInt(13 * tables.stride + loc.offset));
      // (Not mapped yet: reading the slot would be an illegal address, which poisons the mock device as it does a GPU.)
      expect(tables.has(c.plan.id)).toBe(false);
      tables.map(c);
      expect(tables.has(c.plan.id)).toBe(true);
      expect(await hmm.store.checksumAt(1, ptr, loc.bytes)).toBe(await hmm.store.checksumTensor(gate, 1));
      tables.map(c); // mapped already: left as it is
      // Another chunk for the same slot is refused by name.
      expect(() => tables.map({ ...c, plan: { ...c.plan, id: 'L1.E5@1-other' } })).toThrow(/slot 13 of device 1 maps L1\.E5@1/);
      expect(() => tables.map(hmm.store.all().find((x) => !expertOf(x.plan))!)).toThrow(InvalidArgumentError);
      // A failed access grant unmaps again: the slot is free, the map can be made later.
      const other = hmm.store.get('L0.E2@0');
      rt.injectFault('SetAccess', 1);
      expect(() => tables.map(other)).toThrow(FaultInjectedError);
      rt.clearFaults();
      expect(tables.has(other.plan.id)).toBe(false);
      tables.map(other);
      expect(tables.stats.devices.map((d) => [d.device, d.mapped])).toEqual([[0, 1], [1, 1]]);
      // A released chunk's memory stays while its slot maps it, and comes back at the unmap.
      const before = freeBytes(rt)[1]!;
      hmm.store.release(c.plan.id, 'hmm');
      expect(hmm.store.has(c.plan.id)).toBe(false);
      expect(freeBytes(rt)[1]).toBe(before);
      expect(tables.unmap(c.plan.id)).toBe(true);
      expect(tables.unmap(c.plan.id)).toBe(false);
      expect(freeBytes(rt)[1]).toBe(before + c.chunk.size);
      tables.dispose();
      tables.dispose(); // idempotent
      expect(() => tables.range(0)).toThrow(/before dispose/);
    } finally {
      hmm.dispose();
      rt.dispose();
    }
  });

  it('refuses bad shapes and a store without every expert, by name', async () => {
    const { rt, hmm } = await loaded([0]);
    try {
      expect(() => ExpertTables.fromStore(hmm.store, 0, config.experts)).toThrow(/layers/);
      expect(() => ExpertTables.fromStore(hmm.store, config.layers, 1.5)).toThrow(/experts/);
      expect(() => ExpertTables.fromStore(hmm.store, config.layers, 4)).toThrow(/experts below 4/);
      expect(() => ExpertTables.fromStore(hmm.store, config.layers + 1, config.experts)).toThrow(/a chunk for every expert of 3 layers/);
      const empty = new Hmm(rt);
      expect(() => ExpertTables.fromStore(empty.store, config.layers, config.experts)).toThrow(/expert chunks/);
      empty.dispose();
    } finally {
      hmm.dispose();
      rt.dispose();
    }
  });
});

describe('Deployment with expertTables', () => {
  it('is refused for a value that is not a boolean', async () => {
    const rt = openMock();
    try {
      const base = { rt, config, devices: [0], seed: SEED, kvBlocksPerDevice: 64 };
      await expect(Deployment.start({ ...base, expertTables: 'yes' as unknown as boolean })).rejects.toThrow(/expertTables.*true or false/s);
      expect(freeBytes(rt).every((b) => b === 64 * MIB)).toBe(true);
    } finally {
      rt.dispose();
    }
  });

  it('serves the same greedy tokens across 1→2→4→3→1 mid-generation; the engines read every expert at its slot', async () => {
    const { rt, dep } = await start([0], { expertTables: true });
    expectEnginesReadTheTables(dep);
    const streamed = PROMPTS.map(() => [] as number[]);
    const done = PROMPTS.map((prompt, k) => dep.submit({ prompt, maxTokens: MAX, ignoreEos: true }, { onToken: (t) => streamed[k]!.push(t) }));
    const waitMore = async (n: number) => {
      const target = Math.min(MAX - 10, Math.max(...streamed.map((s) => s.length)) + n);
      while (streamed.some((s) => s.length < target)) await sleep(1);
    };
    for (const devices of [[0, 1], [0, 1, 2, 3], [0, 1, 2], [2]]) {
      await waitMore(10);
      const report = await dep.scale({ devices });
      expect(dep.devices).toEqual(devices);
      expect(report.expertTables!.mapped).toBeGreaterThan(0);
      expectEnginesReadTheTables(dep);
      expect(streamed.some((s) => s.length < MAX)).toBe(true); // still mid-generation
    }
    const got = await Promise.all(done);
    for (const [k, c] of got.entries()) expect(c.outputTokens, `tokens of request ${k}`).toEqual(reference[k]);
    await dep.close();
    expect(freeBytes(rt).every((b) => b === 128 * MIB)).toBe(true);
  }, 30_000);

  it('ends 20 cycles of 1→2→1 with memory and mappings exactly as at start', async () => {
    const { rt, dep } = await start([0], { expertTables: true });
    const steady = async () => {
      await dep.settled();
      return { free: freeBytes(rt), mapped: mappedPer(dep) };
    };
    const first = await steady();
    for (let i = 0; i < 20; i++) {
      const up = await dep.scale({ devices: [0, 1] });
      const down = await dep.scale({ devices: [0] });
      // The scale-up took the standby engine made ahead, whose expert pointers were the tables' from its making.
      expect(up.standbyMadeAhead).toBeDefined();
      // Device 1's targets were mapped ahead with that engine: the scale-up maps none; the scale-down unmaps them.
      expect(up.expertTables).toMatchObject({ mapped: 0, taken: config.layers * config.experts / 2 });
      expect(down.expertTables!.unmapped).toBe(up.expertTables!.taken);
      expect(await steady()).toEqual(first);
    }
    const c = await dep.submit({ prompt: PROMPTS[1]!, maxTokens: 40, ignoreEos: true });
    expect(c.outputTokens).toEqual(reference[1]!.slice(0, 40));
  }, 60_000);

  it('maps the standby chunks of the planned scale-up ahead with its standby engine; the scale-up maps none; dropped with the standby chunks, nothing leaks', async () => {
    const { rt, dep } = await start([0], { expertTables: true });
    await dep.settled();
    // Device 1 (the planned 0 -> 0,1 adds it) holds half the experts of every layer, mapped ahead.
    const d1 = dep.expertTables!.devices.find((d) => d.device === 1)!;
    expect(d1).toMatchObject({ mapped: config.layers * config.experts / 2, ahead: config.layers * config.experts / 2 });
    // Standby chunks off: the standby engines and chunks go, and their ahead mappings first (a chunk
    // freed while its slot maps it would keep its memory): the idle devices are entirely free.
    await dep.setStandbyChunks(false);
    expect(dep.expertTables!.devices.every((d) => d.ahead === 0)).toBe(true);
    expect(freeBytes(rt).slice(1)).toEqual([128 * MIB, 128 * MIB, 128 * MIB]);
    // With none mapped ahead the scale-up maps its targets itself.
    const up = await dep.scale({ devices: [0, 1] });
    expect(up.expertTables).toMatchObject({ mapped: config.layers * config.experts / 2, taken: 0 });
    expectEnginesReadTheTables(dep);
    const c = await dep.submit({ prompt: PROMPTS[0]!, maxTokens: 30, ignoreEos: true });
    expect(c.outputTokens).toEqual(reference[0]!.slice(0, 30));
  }, 30_000);

  it('rolls back a scale whose table map fails: memory and mappings as before, the old layout serving; the next attempt maps them', async () => {
    const { rt, dep } = await start([0, 1], { expertTables: true });
    await dep.settled();
    const before = { free: freeBytes(rt), mapped: mappedPer(dep) };
    const running = dep.submit({ prompt: PROMPTS[3]!, maxTokens: 120, ignoreEos: true });
    const real = ExpertTables.prototype.map;
    let calls = 0;
    const spy = vi.spyOn(ExpertTables.prototype, 'map').mockImplementation(function (this: ExpertTables, c) {
      if (++calls === 3) throw new FaultInjectedError('FAULT_INJECTED', 'the third table map of the scale');
      return real.call(this, c);
    });
    try {
      await expect(dep.scale({ devices: [0, 1, 2] })).rejects.toThrow(FaultInjectedError);
    } finally {
      spy.mockRestore();
    }
    expect(calls).toBe(3);
    expect(dep.devices).toEqual([0, 1]);
    await dep.settled();
    expect({ free: freeBytes(rt), mapped: mappedPer(dep) }).toEqual(before);
    const report = await dep.scale({ devices: [0, 1, 2] });
    expect(report.expertTables!.mapped + report.expertTables!.taken).toBeGreaterThan(2);
    expectEnginesReadTheTables(dep);
    expect((await running).outputTokens).toEqual(reference[3]!.slice(0, 120));
  }, 30_000);

  it('rolls back at every Map and SetAccess fault of a scale (tables included): mappings as before, and the tokens right after', async () => {
    const { rt, dep } = await start([0], { expertTables: true, standbyChunks: false });
    await dep.settled();
    const state = () => ({ free: freeBytes(rt), mapped: mappedPer(dep) });
    const before = state();
    let failed = 0;
    for (const op of ['Map', 'SetAccess']) {
      for (let nth = 1; ; nth++) {
        rt.injectFault(op, nth);
        let ok = true;
        try {
          await dep.scale({ devices: [0, 1] });
        } catch (e) {
          ok = false;
          expect(e).toBeInstanceOf(FaultInjectedError);
        }
        rt.clearFaults();
        if (ok) {
          // Past the scale's last such call: it succeeded, so scale back and go on to the next op.
          expectEnginesReadTheTables(dep);
          await dep.scale({ devices: [0] });
          await dep.settled();
          expect(state()).toEqual(before);
          break;
        }
        failed++;
        expect(dep.devices).toEqual([0]);
        await dep.settled();
        expect(state()).toEqual(before);
      }
    }
    // Each op failed the scale at several points (the chunks' own maps and the tables' maps).
    expect(failed).toBeGreaterThan(4);
    const c = await dep.submit({ prompt: PROMPTS[2]!, maxTokens: 30, ignoreEos: true });
    expect(c.outputTokens).toEqual(reference[2]!.slice(0, 30));
  }, 60_000);
});
