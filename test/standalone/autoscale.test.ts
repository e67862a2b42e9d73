// The SLO-aware autoscaler (src/serve/autoscale.ts): the pure decide() with a
// fake clock over synthetic windows and a small simulated world; the
// Autoscaler class over a fake deployment (scale calls, a failed scale,
// metrics); and one end-to-end run on the mock with a real server: a burst that
// misses a tight TTFT SLO scales the deployment up, the quiet after it scales
// back down, and every client request completes.
import { readFileSync } from 'node:fs';
import path from 'node:path';

import { Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';

import type { Completion, StepFigures } from '../../src/executor/engine.js';
import { parseConfig } from '../../src/model/config.js';
import { Deployment } from '../../src/scaling/orchestrator.js';
import {
  type AutoscaleConfig, type AutoscaleConfigInput, AutoscaleConfigError, type AutoscalerState, Autoscaler, type Candidate, type Decision, type QueueSample, type RequestSample,
  type StepSample, addDevice, decide, meetsSlo, parseAutoscaleConfig, removeDevice,
} from '../../src/serve/autoscale.js';
import { type ServingDeployment, scalableDeployment } from '../../src/serve/deployment.js';
import { createServer } from '../../src/serve/server.js';
import { MIB, openMock } from '../helpers/mock.js';

const ROOT = path.resolve(__dirname, '../..');
const TINY = path.join(ROOT, 'scripts/configs/tiny-qwen3-moe.json');

const BASE: AutoscaleConfigInput = {
  ttftMs: 100, tpotMs: 50, attainmentTarget: 0.9, minDevices: 1, maxDevices: 3, devicePool: [0, 1, 2, 3],
  window: 10, minSamples: 5, minMisses: 2, cooldownUpSeconds: 5, cooldownDownSeconds: 20, sustainSeconds: 2,
};
const cfg = (over: Partial<AutoscaleConfigInput> = {}): AutoscaleConfig => parseAutoscaleConfig({ ...BASE, ...over });

/** A finished request at `t` (ms). */
function req(t: number, ttftMs: number, o: Partial<RequestSample> = {}): RequestSample {
  return { t, ttftMs, tpotMs: 10, queuedMs: 0, totalMs: ttftMs + 200, finish: 'length', tokens: 100, ...o };
}

/** `count` requests finishing over the second before `t`, `misses` of them with a TTFT of 500 ms (queued 300 ms when `queued`). */
function batch(t: number, count: number, misses = 0, queued = true): RequestSample[] {
  return Array.from({ length: count }, (_, i) => (i < misses ? req(t - i, 500, { queuedMs: queued ? 300 : 0 }) : req(t - i, 40)));
}

function state(now: number, over: Partial<AutoscalerState> = {}): AutoscalerState {
  return { now, devices: [0], requests: [], steps: [], queue: [{ t: now, waiting: 0, running: 0 }], scaling: false, startedAt: 0, ...over };
}

/** Steps of `ms` (default a second) carrying `tokens`, summed into one sample (its wall time is the whole span: throughput, not a peak). */
const steady = (t: number, tokens: number, ranks: number, ms = 1000): StepSample => ({ t, ms, tokens, batchSeqs: 8, ranks });

interface WorldTick {
  requests: RequestSample[];
  steps?: StepSample[];
  waiting: number;
  running?: number;
}

/**
 * Runs decide() once per `tickMs` on a fake clock over a world that answers
 * each tick with what happened in it (given the devices serving), applying
 * every up/down at once; keeps the state across ticks as the Autoscaler does.
 */
function simulate(config: AutoscaleConfig, world: (now: number, devices: number[]) => WorldTick,
  o: { seconds: number; devices?: number[]; tickMs?: number; capacityPerDevice?: number; scaleMs?: number }) {
  const tickMs = o.tickMs ?? 1000;
  let devices = o.devices ?? [0];
  let requests: RequestSample[] = [];
  let steps: StepSample[] = [];
  let queue: QueueSample[] = [];
  let candidate: Candidate | undefined;
  let lastScaleAt: number | undefined;
  let scalingUntil = -1;
  let capacity = o.capacityPerDevice ?? 0;
  const saturatedAt: Record<number, number> = {};
  const decisions: Decision[] = [];
  const timeline: Array<{ t: number; devices: number }> = [];
  for (let now = 1000; now <= o.seconds * 1000; now += tickMs) {
    const w = world(now, devices);
    requests.push(...w.requests);
    steps.push(...(w.steps ?? []));
    queue.push({ t: now, waiting: w.waiting, running: w.running ?? 0 });
    const keep = now - config.window * 1000;
    requests = requests.filter((r) => r.t >= keep);
    steps = steps.filter((s) => s.t >= keep);
    queue = queue.filter((q) => q.t >= keep);
    const s: AutoscalerState = {
      now, devices, requests, steps, queue, startedAt: 0, scaling: now < scalingUntil, capacityPerDevice: capacity, saturatedAt,
      ...(lastScaleAt !== undefined ? { lastScaleAt } : {}), ...(candidate ? { candidate } : {}),
    };
    const d = decide(s, config);
    decisions.push(d);
    candidate = d.candidate;
    capacity = Math.max(capacity, d.load.capacityPerDevice);
    if (d.action !== 'hold') {
      if (d.action === 'up' && d.reason === 'slo_miss') saturatedAt[devices.length] = d.load.tokensPerSecond;
      devices = d.devices!;
      scalingUntil = now + (o.scaleMs ?? 0);
      lastScaleAt = now + (o.scaleMs ?? 0);
      candidate = undefined;
    }
    timeline.push({ t: now, devices: devices.length });
  }
  return { decisions, actions: decisions.filter((d) => d.action !== 'hold'), devices, timeline };
}

/**
 * A world of `rps` requests per second (100 tokens each); each device serves
 * `perDevice` of them within the SLO. Beyond that, half the requests miss the
 * TTFT SLO after queueing and requests wait.
 */
function loadWorld(rps: (now: number) => number, perDevice: number) {
  return (now: number, devices: number[]): WorldTick => {
    const n = devices.length;
    const r = rps(now);
    const over = r > n * perDevice;
    const count = Math.round(r);
    return {
      requests: batch(now, count, over ? Math.ceil(count / 2) : 0),
      steps: count > 0 ? [steady(now, count * 100, n)] : [],
      waiting: over ? Math.round(r - n * perDevice) : 0,
      running: Math.min(count, n * perDevice),
    };
  };
}

// ---- configuration

describe('parseAutoscaleConfig', () => {
  it('fills the defaults: thresholds from the target, maxDevices from the pool, down slower than up', () => {
    const c = parseAutoscaleConfig({ ttftMs: 200, tpotMs: 40, devicePool: [0, 1, 2] });
    expect(c).toMatchObject({
      attainmentTarget: 0.9, scaleUpBelow: 0.9, scaleDownAbove: 0.95, minDevices: 1, maxDevices: 3, devicePool: [0, 1, 2], window: 30,
      minSamples: 5, minMisses: 2, intervalMs: 1000,
    });
    expect(c.cooldownDownSeconds).toBeGreaterThan(c.cooldownUpSeconds);
    // The pool from the caller when the config names none.
    expect(parseAutoscaleConfig({ ttftMs: 1, tpotMs: 1 }, { devicePool: [2, 0, 1, 3] }).devicePool).toEqual([2, 0, 1, 3]);
  });

  it.each<[string, unknown, RegExp]>([
    ['unknown field', { ...BASE, ttft: 3 }, /^autoscale config: ttft: unknown field/],
    ['missing TTFT SLO', { tpotMs: 50, devicePool: [0] }, /ttftMs: is required/],
    ['TTFT SLO not a number', { ...BASE, ttftMs: '100' }, /ttftMs: must be the TTFT SLO in milliseconds/],
    ['negative TPOT SLO', { ...BASE, tpotMs: -1 }, /tpotMs: must be above 0/],
    ['attainment over 1', { ...BASE, attainmentTarget: 1.5 }, /attainmentTarget: must be at most 1/],
    ['min above max', { ...BASE, minDevices: 4 }, /minDevices: 4 is above maxDevices 3/],
    ['max beyond the pool', { ...BASE, maxDevices: 5 }, /maxDevices: 5 is more than devicePool holds \(4\)/],
    ['repeated pool device', { ...BASE, devicePool: [0, 1, 1] }, /devicePool\[2\]: names device 1 twice/],
    ['fractional device', { ...BASE, devicePool: [0, 1.5] }, /devicePool\.1: must be integers/],
    ['down faster than up', { ...BASE, cooldownUpSeconds: 30, cooldownDownSeconds: 10 }, /cooldownDownSeconds: 10 must be at least cooldownUpSeconds 30/],
    ['down threshold under up threshold', { ...BASE, scaleUpBelow: 0.9, scaleDownAbove: 0.8 }, /scaleDownAbove: 0.8 is below scaleUpBelow 0.9/],
    ['idle above busy', { ...BASE, scaleDownIdleBelow: 0.7, busyAbove: 0.5 }, /scaleDownIdleBelow: 0.7 must be below busyAbove 0.5/],
    ['not an object', [1, 2], /root: must be a JSON object/],
  ])('refuses %s, naming the field', (_name, input, message) => {
    let error: unknown;
    try {
      parseAutoscaleConfig(input);
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(AutoscaleConfigError);
    expect((error as Error).message).toMatch(message);
  });

  it('refuses pool devices that are not on the node, and a missing pool without a default', () => {
    expect(() => parseAutoscaleConfig({ ...BASE, devicePool: [0, 7] }, { deviceCount: 4 })).toThrow(/devicePool\[1\]: device 7 is not on the node \(devices 0\.\.3\)/);
    expect(() => parseAutoscaleConfig({ ttftMs: 1, tpotMs: 1 })).toThrow(/devicePool: is required here/);
  });
});

describe('SLO attainment and device choice', () => {
  const c = cfg();
  it('counts a request as met only within both SLOs; cancelled ones only once they missed; failures as misses', () => {
    expect(meetsSlo(req(0, 100), c)).toBe(true);
    expect(meetsSlo(req(0, 101), c)).toBe(false);
    expect(meetsSlo(req(0, 50, { tpotMs: 51 }), c)).toBe(false);
    expect(meetsSlo(req(0, 50, { tpotMs: null }), c)).toBe(true);
    expect(meetsSlo(req(0, 50, { finish: 'error' }), c)).toBe(false);
    expect(meetsSlo(req(0, 50, { finish: 'cancelled' }), c)).toBeNull();
    expect(meetsSlo({ ttftMs: null, tpotMs: null, totalMs: 30, finish: 'cancelled' }, c)).toBeNull();
    expect(meetsSlo({ ttftMs: null, tpotMs: null, totalMs: 3000, finish: 'cancelled' }, c)).toBe(false);
  });

  it('adds the pool\'s first free device and removes the serving device latest in the pool (devices outside it first)', () => {
    expect(addDevice([0], [0, 1, 2, 3])).toEqual([0, 1]);
    expect(addDevice([2, 0], [2, 3, 0, 1])).toEqual([2, 0, 3]);
    expect(addDevice([0, 1], [0, 1])).toBeUndefined();
    expect(removeDevice([0, 1, 2], [0, 1, 2, 3])).toEqual([0, 1]);
    expect(removeDevice([2, 0, 3], [2, 3, 0, 1])).toEqual([2, 3]);
    expect(removeDevice([0, 5, 1], [0, 1])).toEqual([0, 1]);
    expect(removeDevice([0], [0, 1])).toBeUndefined();
  });
});

// ---- decide(), one window at a time

describe('decide', () => {
  const c = cfg();

  it('scales up by one device on SLO misses confirmed by waiting requests, once the want held for sustainSeconds', () => {
    const requests = [...batch(9000, 10, 4), ...batch(10_000, 10, 4)];
    const queue = [{ t: 10_000, waiting: 6, running: 8 }];
    const first = decide(state(10_000, { requests, queue }), c);
    expect(first).toMatchObject({ action: 'hold', reason: 'sustain', attainment: 0.6, candidate: { action: 'up', since: 10_000 } });
    expect(first.load).toMatchObject({ samples: 20, misses: 8, queuedMisses: 8, waiting: 6 });
    const mid = decide(state(11_000, { requests, queue, candidate: first.candidate! }), c);
    expect(mid).toMatchObject({ action: 'hold', reason: 'sustain', candidate: { since: 10_000 } });
    const done = decide(state(12_000, { requests, queue, candidate: mid.candidate! }), c);
    expect(done).toMatchObject({ action: 'up', devices: [0, 1], reason: 'slo_miss' });
    expect(done.detail).toMatch(/attainment 60\.0% < 90\.0%.*load confirmed: 6 waiting, 8 misses queued/);
    expect(done.candidate).toBeUndefined();
  });

  it('confirms misses without a queue by busy devices (TPOT-bound load), not otherwise', () => {
    const requests = batch(10_000, 10, 5, false);
    // Observed for 1 s: 9000 tokens/s against a capacity of 10000.
    const busy = decide(state(10_000, { requests, steps: [steady(10_000, 9000, 1)], capacityPerDevice: 10_000, startedAt: 9000 }), cfg({ sustainSeconds: 0 }));
    expect(busy.load.utilisation).toBeCloseTo(0.9, 5);
    expect(busy).toMatchObject({ action: 'up', reason: 'slo_miss' });
    const quiet = decide(state(10_000, { requests, steps: [steady(10_000, 1000, 1)], capacityPerDevice: 10_000, startedAt: 9000 }), cfg({ sustainSeconds: 0 }));
    expect(quiet).toMatchObject({ action: 'hold', reason: 'unconfirmed' });
    expect(quiet.detail).toMatch(/no load confirms it/);
  });

  it('does not scale up on a single slow request, or a few, without load', () => {
    const z = cfg({ sustainSeconds: 0 });
    // Alone in the window: too few requests to judge.
    expect(decide(state(10_000, { requests: [req(10_000, 5000)] }), z)).toMatchObject({ action: 'hold', reason: 'unconfirmed', attainment: 0 });
    // One miss among a few: attainment 80% < 90% but from one miss.
    const one = decide(state(10_000, { requests: [...batch(10_000, 4), req(10_000, 5000)] }), z);
    expect(one).toMatchObject({ action: 'hold', reason: 'unconfirmed', attainment: 0.8 });
    expect(one.detail).toMatch(/from 1 miss/);
    // One miss among many: attainment above the threshold.
    expect(decide(state(10_000, { requests: [...batch(10_000, 20), req(10_000, 5000)] }), z)).toMatchObject({ action: 'hold', reason: 'steady' });
    // Two slow requests that never queued, on idle devices.
    expect(decide(state(10_000, { requests: [...batch(10_000, 4), req(10_000, 5000), req(10_000, 5000)], capacityPerDevice: 10_000 }), z))
      .toMatchObject({ action: 'hold', reason: 'unconfirmed' });
  });

  it('scales down by one device when idle with attainment comfortably above target', () => {
    const z = cfg({ sustainSeconds: 0 });
    const idle = decide(state(60_000, { devices: [0, 1, 2], requests: batch(60_000, 10), steps: [steady(60_000, 500, 3)], capacityPerDevice: 5000 }), z);
    expect(idle).toMatchObject({ action: 'down', devices: [0, 1], reason: 'idle', attainment: 1 });
    // No requests at all counts as comfortable.
    expect(decide(state(60_000, { devices: [0, 1], requests: [] }), z)).toMatchObject({ action: 'down', devices: [0], reason: 'idle', attainment: null });
    // Not with attainment between the thresholds (93% < 95%), nor with a request waiting, nor with busy devices.
    expect(decide(state(60_000, { devices: [0, 1], requests: [...batch(60_000, 14), req(60_000, 500)] }), z)).toMatchObject({ action: 'hold', reason: 'steady' });
    expect(decide(state(60_000, { devices: [0, 1], queue: [{ t: 60_000, waiting: 1, running: 3 }] }), z)).toMatchObject({ action: 'hold', reason: 'steady' });
    // (Steps over the 10 s window: 80000 tokens = 8000 tokens/s, 4000 per device against 10000: utilisation 0.4.)
    expect(decide(state(60_000, { devices: [0, 1], steps: [steady(60_000, 80_000, 2, 10_000)], capacityPerDevice: 10_000 }), z)).toMatchObject({ action: 'hold', reason: 'steady' });
    // Idle at 0.25, but one device fewer would run at 0.5: fine under busyAbove 0.6, not under 0.45.
    const quarter = state(60_000, { devices: [0, 1], steps: [steady(60_000, 50_000, 2, 10_000)], capacityPerDevice: 10_000 });
    expect(decide(quarter, z)).toMatchObject({ action: 'down', load: { utilisation: 0.25 } });
    const tight = decide(quarter, cfg({ sustainSeconds: 0, busyAbove: 0.45, scaleDownIdleBelow: 0.3 }));
    expect(tight).toMatchObject({ action: 'hold', reason: 'headroom' });
    expect(tight.detail).toMatch(/1 devices would run at 0\.5 >= busyAbove 0\.45/);
  });

  it('respects the cooldowns: up cooldownUpSeconds after a scale, down cooldownDownSeconds after a scale or the start', () => {
    const z = cfg({ sustainSeconds: 0 });
    const miss = { requests: batch(30_000, 10, 5), queue: [{ t: 30_000, waiting: 4, running: 8 }] };
    // Requests submitted before the last scale do not count: these finished at 30 s, submitted 200+ ms before.
    expect(decide(state(30_000, { ...miss, lastScaleAt: 29_900 }), z)).toMatchObject({ action: 'hold', reason: 'steady', attainment: null });
    // Within the up cooldown (5 s): hold, with the time left.
    const cool = decide(state(30_000, { ...miss, lastScaleAt: 26_000 }), z);
    expect(cool).toMatchObject({ action: 'hold', reason: 'cooldown' });
    expect(cool.detail).toMatch(/up in 1 s \(cooldown\)/);
    expect(decide(state(30_000, { ...miss, lastScaleAt: 25_000 }), z)).toMatchObject({ action: 'up' });
    // Down: 20 s after any scale, and after the start.
    const idle = { devices: [0, 1] };
    expect(decide(state(30_000, { ...idle, lastScaleAt: 15_000 }), z)).toMatchObject({ action: 'hold', reason: 'cooldown' });
    expect(decide(state(30_000, { ...idle, lastScaleAt: 10_000 }), z)).toMatchObject({ action: 'down' });
    expect(decide(state(15_000, { ...idle, startedAt: 0 }), z)).toMatchObject({ action: 'hold', reason: 'cooldown' });
    expect(decide(state(20_000, { ...idle, startedAt: 0 }), z)).toMatchObject({ action: 'down' });
  });

  it('needs the want on every evaluation for sustainSeconds: an interrupted want starts over', () => {
    const miss = { requests: batch(10_000, 10, 5), queue: [{ t: 10_000, waiting: 4, running: 8 }] };
    let candidate: Candidate | undefined;
    const at = (now: number, evidence: boolean) => {
      const d = decide(state(now, { ...(evidence ? miss : { requests: batch(10_000, 10) }), ...(candidate ? { candidate } : {}) }), c);
      candidate = d.candidate;
      return d;
    };
    expect(at(10_000, true).reason).toBe('sustain');
    expect(at(11_000, true).reason).toBe('sustain');
    expect(at(11_500, false)).toMatchObject({ reason: 'steady' });
    expect(candidate).toBeUndefined();
    expect(at(12_000, true).reason).toBe('sustain'); // starts over at 12 s
    expect(at(13_900, true).reason).toBe('sustain');
    expect(at(14_000, true)).toMatchObject({ action: 'up' });
  });

  it('stays within min..max devices, and moves toward them when outside', () => {
    const z = cfg({ sustainSeconds: 0, minDevices: 2 });
    const miss = { requests: batch(60_000, 10, 5), queue: [{ t: 60_000, waiting: 4, running: 8 }] };
    expect(decide(state(60_000, { ...miss, devices: [0, 1, 2] }), z)).toMatchObject({ action: 'hold', reason: 'at_max' });
    expect(decide(state(60_000, { devices: [0, 1] }), z)).toMatchObject({ action: 'hold', reason: 'at_min' });
    expect(decide(state(60_000, { devices: [0] }), z)).toMatchObject({ action: 'up', devices: [0, 1], reason: 'below_min' });
    expect(decide(state(60_000, { devices: [0, 1, 2, 3] }), z)).toMatchObject({ action: 'down', devices: [0, 1, 2], reason: 'above_max' });
    // A pool with nothing left to add.
    expect(decide(state(60_000, { ...miss, devices: [0, 1] }), cfg({ sustainSeconds: 0, devicePool: [0, 1, 2], maxDevices: 3 })))
      .toMatchObject({ action: 'up', devices: [0, 1, 2] });
    expect(decide(state(60_000, { ...miss, devices: [5, 6] }), cfg({ sustainSeconds: 0, devicePool: [5, 6, 7], maxDevices: 3 }))).toMatchObject({ devices: [5, 6, 7] });
    expect(decide(state(60_000, { ...miss, devices: [7, 8] }), cfg({ sustainSeconds: 0, devicePool: [7, 8, 9], maxDevices: 3 }))).toMatchObject({ devices: [7, 8, 9] });
  });

  it('decides nothing while a scale is in progress', () => {
    const miss = { requests: batch(60_000, 10, 10), queue: [{ t: 60_000, waiting: 40, running: 8 }] };
    const candidate: Candidate = { action: 'up', since: 0 };
    expect(decide(state(60_000, { ...miss, scaling: true, candidate }), c)).toMatchObject({ action: 'hold', reason: 'scaling' });
    expect(decide(state(60_000, { devices: [0, 1], scaling: true }), c)).toMatchObject({ action: 'hold', reason: 'scaling' });
    expect(decide(state(60_000, { devices: [0, 1, 2, 3], scaling: true }), c)).toMatchObject({ action: 'hold', reason: 'scaling' });
  });
});

// ---- decide() over a simulated world, on a fake clock

describe('decide over time (simulated world)', () => {
  it('follows a step in load: up while it misses, down after it is gone, never beyond max', () => {
    // 25 req/s for 60 s on devices that each serve 10 within the SLO, then nothing.
    const r = simulate(cfg(), loadWorld((t) => (t <= 60_000 ? 25 : 0), 10), { seconds: 200, capacityPerDevice: 1000 });
    expect(r.actions.map((d) => [d.action, d.reason, d.devices!.length])).toEqual([
      ['up', 'slo_miss', 2], ['up', 'slo_miss', 3], ['down', 'idle', 2], ['down', 'idle', 1],
    ]);
    const [up1, up2, down1, down2] = r.actions;
    // Sustain (2 s) before the first, cooldown (5 s) before the second.
    expect(up1!.at).toBeGreaterThanOrEqual(3000);
    expect(up2!.at - up1!.at).toBeGreaterThanOrEqual(5000);
    // Down only once the load is gone (utilisation decays as the window slides), the down cooldown (20 s) between the two.
    expect(down1!.at).toBeGreaterThan(60_000);
    expect(down1!.detail).toMatch(/^idle: utilisation 0\.[0-2]\d* < 0\.3/);
    expect(down2!.at - down1!.at).toBeGreaterThanOrEqual(20_000);
    expect(r.devices).toEqual([0]);
    expect(Math.max(...r.timeline.map((p) => p.devices))).toBe(3);
  });

  it('does not flap under a steady load between the thresholds', () => {
    // Attainment 14/15 = 93% (between 90% up and 95% down), utilisation 45% (between 30% idle and 60% busy), no queue.
    const mid = (now: number, devices: number[]): WorldTick => ({
      requests: [...batch(now, 14), req(now, 500)],
      steps: [steady(now, 450 * devices.length, devices.length)],
      waiting: 0,
    });
    const r = simulate(cfg(), mid, { seconds: 600, devices: [0, 1], capacityPerDevice: 1000 });
    expect(r.actions).toEqual([]);
    expect(new Set(r.decisions.map((d) => d.reason))).toEqual(new Set(['steady']));
  });

  it('does not flap where one device fewer saturates but looks idle from here (learned capacity)', () => {
    // 15 req/s: one device serves 10 within the SLO. Its throughput is 15% of the peak step
    // throughput, so with two devices they look idle — but one device missed at this very load.
    const r = simulate(cfg(), loadWorld(() => 15, 10), { seconds: 600, capacityPerDevice: 10_000 });
    expect(r.actions.map((d) => [d.action, d.devices!.length])).toEqual([['up', 2]]);
    expect(r.decisions.at(-1)).toMatchObject({ action: 'hold', reason: 'headroom' });
    expect(r.decisions.at(-1)!.detail).toMatch(/at which 1 devices last missed their SLOs/);
    // Once the load falls well below what one device missed at, it goes back down.
    const fall = simulate(cfg(), loadWorld((t) => (t < 100_000 ? 15 : 5), 10), { seconds: 300, capacityPerDevice: 10_000 });
    expect(fall.actions.map((d) => [d.action, d.devices!.length])).toEqual([['up', 2], ['down', 1]]);
  });

  it('holds while a slow scale is in progress and continues after it', () => {
    const r = simulate(cfg(), loadWorld(() => 25, 10), { seconds: 60, scaleMs: 4000, capacityPerDevice: 1000 });
    const first = r.actions[0]!;
    const during = r.decisions.filter((d) => d.at > first.at && d.at < first.at + 4000);
    expect(during.length).toBeGreaterThan(0);
    expect(during.every((d) => d.action === 'hold' && d.reason === 'scaling')).toBe(true);
    expect(r.actions.map((d) => d.devices!.length)).toEqual([2, 3]);
  });
});

// ---- the Autoscaler class over a fake deployment

function fakeDeployment(o: { fail?: () => boolean; scaleMs?: number } = {}) {
  let devices = [0];
  let scaling = false;
  let waiting = 0;
  const calls: number[][] = [];
  const dep: ServingDeployment & { setWaiting(n: number): void; calls: number[][] } = {
    model: { id: 'fake', maxPositions: 128, vocabSize: 16 },
    submit: () => Promise.reject(new Error('not here')),
    stats: () => ({ waiting, running: 0, requestsDone: 0, requestsCancelled: 0, requestsFailed: 0, tokensOut: 0, promptTokens: 0, steps: 0, preemptions: 0, recoveries: 0 }),
    layout: () => ({ devices: [...devices], tp: 1, dp: devices.length, ep: devices.length }),
    async scale(to: number[]) {
      calls.push(to);
      scaling = true;
      await new Promise((r) => setTimeout(r, o.scaleMs ?? 1));
      scaling = false;
      if (o.fail?.()) throw new Error('injected fault: the copy failed');
      const from = devices;
      devices = [...to];
      return { from, to, ms: o.scaleMs ?? 1 };
    },
    get isScaling() {
      return scaling;
    },
    setWaiting(n: number) {
      waiting = n;
    },
    calls,
  };
  return dep;
}

function completion(ttftMs: number, queuedMs = 0): Completion {
  return {
    id: 'r', promptTokens: [1, 2, 3], outputTokens: [4, 5], finishReason: 'length', preemptions: 0,
    timings: { queuedMs, ttftMs, tpotMs: 5, totalMs: ttftMs + 10 },
  };
}

function captureLog() {
  const lines: Array<{ level: string; msg: string | undefined } & Record<string, any>> = [];
  const at = (level: string) => (obj: object, msg?: string) => lines.push({ level, msg, ...obj });
  return { lines, log: { info: at('info'), warn: at('warn'), error: at('error'), debug: at('debug') } };
}

describe('Autoscaler', () => {
  const config: AutoscaleConfigInput = { ...BASE, sustainSeconds: 0, cooldownUpSeconds: 1, cooldownDownSeconds: 2 };

  it('refuses a deployment that cannot scale', () => {
    const { scale: _scale, ...fixed } = fakeDeployment();
    expect(() => new Autoscaler(fixed as ServingDeployment, config)).toThrow(/needs a deployment that scales/);
  });

  it('scales through the deployment, logs each decision with its reason, and exports its metrics', async () => {
    let now = 0;
    const dep = fakeDeployment();
    const { lines, log } = captureLog();
    const a = new Autoscaler(dep, config, { now: () => now, log });
    const registry = new Registry();
    a.registerMetrics(registry);
    now = 1000;
    // Idle on one device: nothing to remove.
    expect(a.tick()).toMatchObject({ action: 'hold', reason: 'at_min' });
    for (let i = 0; i < 10; i++) a.record(completion(i < 5 ? 400 : 20, i < 5 ? 300 : 0));
    dep.setWaiting(3);
    now = 2000;
    expect(a.tick()).toMatchObject({ action: 'up', devices: [0, 1], reason: 'slo_miss' });
    expect(a.scaling).toBe(true);
    expect(a.tick()).toMatchObject({ action: 'hold', reason: 'scaling' });
    await a.settled();
    expect(dep.calls).toEqual([[0, 1]]);
    expect(dep.layout().devices).toEqual([0, 1]);
    // The misses were before the scale: they no longer count. Idle now, but within the down cooldown (2 s).
    now = 3000;
    dep.setWaiting(0);
    expect(a.tick()).toMatchObject({ action: 'hold', reason: 'cooldown', attainment: null });

    const metrics = await registry.metrics();
    expect(metrics).toMatch(/elasticmoe_autoscaler_decisions_total\{action="up",reason="slo_miss"\} 1/);
    expect(metrics).toMatch(/elasticmoe_autoscaler_decisions_total\{action="hold",reason="at_min"\} 1/);
    expect(metrics).toMatch(/elasticmoe_autoscaler_decisions_total\{action="hold",reason="cooldown"\} 1/);
    expect(metrics).toMatch(/elasticmoe_autoscaler_scales_total\{direction="up",result="ok"\} 1/);
    expect(metrics).toMatch(/elasticmoe_autoscaler_target_devices 2/);
    // No request since the scale: NaN (prom-client writes "Nan"; Prometheus parses it case-insensitively).
    expect(metrics).toMatch(/^elasticmoe_autoscaler_attainment nan$/im);

    const decisions = lines.filter((l) => l.msg === 'autoscaler decision');
    expect(decisions.map((l) => `${l.action}/${l.reason}`)).toEqual(['hold/at_min', 'up/slo_miss', 'hold/scaling', 'hold/cooldown']);
    expect(decisions.every((l) => typeof l.detail === 'string' && l.detail.length > 0)).toBe(true);
    expect(lines.some((l) => l.msg === 'autoscaler: scaled up')).toBe(true);

    const report = a.report();
    expect(report).toMatchObject({ enabled: true, devices: [0, 1], targetDevices: 2, scaling: false, saturatedAt: { 1: expect.any(Number) } });
    expect(report.decisions[0]).toMatchObject({ action: 'hold', reason: 'cooldown' });
    expect(report.scales).toEqual([expect.objectContaining({ direction: 'up', from: [0], to: [0, 1], ok: true })]);
  });

  it('logs a failed scale and carries on: cooldown, then it tries again', async () => {
    let now = 0;
    let failures = 1;
    const dep = fakeDeployment({ fail: () => failures-- > 0 });
    const { lines, log } = captureLog();
    const a = new Autoscaler(dep, config, { now: () => now, log });
    const registry = new Registry();
    a.registerMetrics(registry);
    const miss = () => {
      for (let i = 0; i < 10; i++) a.record(completion(i < 5 ? 400 : 20, 300));
    };
    now = 1000;
    miss();
    dep.setWaiting(3);
    expect(a.tick().action).toBe('up');
    await a.settled();
    expect(dep.layout().devices).toEqual([0]);
    const failed = lines.find((l) => l.level === 'error');
    expect(failed).toMatchObject({ msg: expect.stringMatching(/scale up failed/), from: [0], to: [0, 1] });
    expect(String(failed!.err)).toMatch(/injected fault/);
    expect(a.report().targetDevices).toBe(1);
    now = 1500;
    miss();
    expect(a.tick()).toMatchObject({ action: 'hold', reason: 'cooldown' });
    now = 2500;
    miss();
    expect(a.tick()).toMatchObject({ action: 'up', devices: [0, 1] });
    await a.settled();
    expect(dep.layout().devices).toEqual([0, 1]);
    const metrics = await registry.metrics();
    expect(metrics).toMatch(/elasticmoe_autoscaler_scales_total\{direction="up",result="failed"\} 1/);
    expect(metrics).toMatch(/elasticmoe_autoscaler_scales_total\{direction="up",result="ok"\} 1/);
  });

  it('treats a scale made by someone else as a scale (cooldown, fresh evidence)', async () => {
    let now = 0;
    const dep = fakeDeployment();
    const a = new Autoscaler(dep, config, { now: () => now });
    now = 5000;
    await dep.scale!([0, 1, 2]);
    expect(a.tick()).toMatchObject({ action: 'hold', reason: 'cooldown' });
    expect(a.report()).toMatchObject({ devices: [0, 1, 2], lastScaleSecondsAgo: 0 });
  });
});

// ---- end to end on the mock, with a real server

describe('Autoscaler on a real server (mock backend)', () => {
  it('scales up under a burst that misses a tight TTFT SLO and back down when it stops; every request completes', async () => {
    const modelConfig = parseConfig(JSON.parse(readFileSync(TINY, 'utf8')));
    const rt = openMock({ mockCapacity: 512 * MIB });
    const listeners = new Set<(f: StepFigures) => void>();
    const dep = await Deployment.start({
      rt, config: modelConfig, devices: [0], kvBlocksPerDevice: 128, maxTokensPerStep: 64, onStep: (f) => listeners.forEach((l) => l(f)),
    });
    const deployment = scalableDeployment(dep, { id: 'tiny' }, (l) => {
      listeners.add(l);
      return () => listeners.delete(l);
    });
    const { lines, log } = captureLog();
    const autoscaler = new Autoscaler(deployment, {
      ttftMs: 25, tpotMs: 1000, attainmentTarget: 0.9, minDevices: 1, maxDevices: 3, devicePool: [0, 1, 2, 3],
      window: 1.5, minSamples: 5, minMisses: 2, sustainSeconds: 0.2, cooldownUpSeconds: 0.5, cooldownDownSeconds: 1, intervalMs: 100,
    }, { log, deviceCount: rt.deviceCount });
    const server = createServer(deployment, { port: 0, maxDevices: 3, deviceCount: rt.deviceCount, processMetrics: false, autoscaler });
    const { url } = await server.listen();
    const timeline: number[] = [];
    const watch = setInterval(() => timeline.push(deployment.layout().devices.length), 20);
    try {
      autoscaler.start(100);
      let stop = false;
      const results: Array<{ ok: boolean; why?: string }> = [];
      const client = async (k: number) => {
        for (let i = 0; !stop; i++) {
          const prompt = Array.from({ length: 100 }, (_, j) => ((k * 31 + i * 7 + j) % 500) + 1);
          const stream = (k + i) % 2 === 0;
          const res = await fetch(`${url}/v1/completions`, {
            method: 'POST', headers: { 'content-type': 'application/json' },
            body: JSON.stringify({ prompt, max_tokens: 12, ignore_eos: true, stream }),
          });
          if (res.status !== 200) {
            results.push({ ok: false, why: `status ${res.status}: ${await res.text()}` });
            continue;
          }
          if (!stream) {
            const body = (await res.json()) as any;
            results.push(body.choices?.[0]?.token_ids?.length === 12 ? { ok: true } : { ok: false, why: JSON.stringify(body) });
            continue;
          }
          const text = await res.text();
          const data = text.split('\n').filter((l) => l.startsWith('data: ')).map((l) => l.slice(6));
          const tokens = data.filter((d) => d !== '[DONE]').flatMap((d) => JSON.parse(d).choices?.[0]?.token_ids ?? []);
          const error = data.some((d) => d.includes('"error"'));
          results.push(data.at(-1) === '[DONE]' && !error && tokens.length === 12 ? { ok: true } : { ok: false, why: text.slice(-300) });
        }
      };
      const t0 = Date.now();
      const clients = Array.from({ length: 16 }, (_, k) => client(k));
      // Load until the autoscaler has added a device, and a little longer (streams across the switch-over).
      while (deployment.layout().devices.length < 2 && Date.now() - t0 < 8000) await new Promise((r) => setTimeout(r, 20));
      expect(deployment.layout().devices.length).toBeGreaterThanOrEqual(2);
      await new Promise((r) => setTimeout(r, 800));
      stop = true;
      await Promise.all(clients);
      // Then it goes back down to minDevices.
      const t1 = Date.now();
      while ((deployment.layout().devices.length > 1 || deployment.isScaling) && Date.now() - t1 < 8000) await new Promise((r) => setTimeout(r, 20));
      expect(deployment.layout().devices).toEqual([0]);
      // (The window may still hold the burst's misses when the clients stop: one more device can come after them.)
      const peak = Math.max(...timeline);

      expect(results.length).toBeGreaterThan(20);
      expect(results.filter((r) => !r.ok)).toEqual([]);
      expect(peak).toBeGreaterThanOrEqual(2);
      const decisions = lines.filter((l) => l.msg === 'autoscaler decision');
      const ups = decisions.filter((l) => l.action === 'up');
      const downs = decisions.filter((l) => l.action === 'down');
      expect(ups.length).toBe(peak - 1);
      expect(downs.length).toBe(peak - 1);
      expect(ups.every((l) => l.reason === 'slo_miss')).toBe(true);
      expect(downs.every((l) => l.reason === 'idle')).toBe(true);
      expect(lines.filter((l) => l.level === 'error')).toEqual([]);

      // The admin route and the metrics.
      const report = (await (await fetch(`${url}/admin/autoscaler`)).json()) as any;
      expect(report).toMatchObject({ enabled: true, running: true, devices: [0], targetDevices: 1, config: { ttftMs: 25, maxDevices: 3, devicePool: [0, 1, 2, 3] } });
      expect(report.scales.filter((s: any) => s.ok).length).toBe(2 * (peak - 1));
      expect(report.decisions.some((d: any) => d.action === 'up' && d.reason === 'slo_miss')).toBe(true);
      const metrics = await (await fetch(`${url}/metrics`)).text();
      const value = (re: RegExp) => Number(metrics.match(re)?.[1]);
      expect(value(/^elasticmoe_autoscaler_decisions_total\{action="up",reason="slo_miss"\} (\S+)$/m)).toBe(peak - 1);
      expect(value(/^elasticmoe_autoscaler_decisions_total\{action="down",reason="idle"\} (\S+)$/m)).toBe(peak - 1);
      expect(value(/^elasticmoe_autoscaler_target_devices (\S+)$/m)).toBe(1);
      expect(metrics).toMatch(/^elasticmoe_autoscaler_attainment \S+$/m);
      expect(value(/^elasticmoe_devices (\S+)$/m)).toBe(1);
    } finally {
      clearInterval(watch);
      await server.close();
      await autoscaler.settled();
      await dep.close();
      rt.dispose();
    }
  }, 30_000);

  it('answers 404 on /admin/autoscaler without an autoscaler', async () => {
    const modelConfig = parseConfig(JSON.parse(readFileSync(TINY, 'utf8')));
    const rt = openMock({ mockCapacity: 512 * MIB });
    const dep = await Deployment.start({ rt, config: modelConfig, devices: [0], kvBlocksPerDevice: 64, maxTokensPerStep: 64 });
    const server = createServer(scalableDeployment(dep, { id: 'tiny' }), { port: 0, processMetrics: false });
    const { url } = await server.listen();
    try {
      const res = await fetch(`${url}/admin/autoscaler`);
      expect(res.status).toBe(404);
      expect(((await res.json()) as any).error).toMatchObject({ code: 'autoscaler_disabled', message: expect.stringMatching(/--autoscale/) });
    } finally {
      await server.close();
      await dep.close();
      rt.dispose();
    }
  });
});
