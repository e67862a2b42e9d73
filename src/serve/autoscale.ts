// The SLO-aware autoscaler: watches finished requests (TTFT, TPOT, time queued),
// the engine's step figures and its queue over a sliding window, and scales a
// ServingDeployment one device at a time.
//
// The policy (`decide`, a pure function of the window and a clock):
//   - attainment = finished requests meeting both SLOs (TTFT <= ttftMs and
//     TPOT <= tpotMs) over those in the window submitted since the last scale
//     (older ones describe another layout). Cancelled requests count only when
//     they had already missed; failed ones count as misses.
//   - load: tokens/s through the engine per device, over the highest per-device
//     throughput observed (a step's tokens over its wall time): the utilisation.
//     Also the queue depth now and its mean over the window.
//   - up by one device when attainment < scaleUpBelow with at least minSamples
//     requests and minMisses misses, and load confirms it: requests waiting
//     now, or minMisses of the misses spent half the TTFT SLO queued, or
//     utilisation >= busyAbove. One slow request (a long prompt on an idle
//     server) is never enough.
//   - down by one device when nothing waits, attainment is comfortably above
//     target (>= scaleDownAbove, or no requests in the window), utilisation <
//     scaleDownIdleBelow, and headroom remains: the utilisation projected on one
//     device fewer stays under busyAbove, and the throughput is under
//     scaleDownHeadroom x the throughput at which that smaller layout last
//     missed its SLOs and was scaled up (a learned capacity).
//   - a wanted action must hold on every evaluation for sustainSeconds; up waits
//     cooldownUpSeconds after any scale, down cooldownDownSeconds (longer); never
//     beyond minDevices..maxDevices; nothing while a scale is in progress. Load
//     between the thresholds holds ("steady"): no flapping.
//   - devices come from devicePool in order (up: its first device not serving;
//     down: the serving device latest in the pool, devices outside it first).
//
// `Autoscaler` feeds the window (record(completion); step figures through the
// deployment's onStep; the queue at each tick), runs `decide` every intervalMs,
// calls deployment.scale on up/down, logs every decision with its reason and
// exports Prometheus metrics into the server's registry.
import { Counter, Gauge, type Registry } from 'prom-client';
import { z } from 'zod';

import type { Completion, FinishReason, StepFigures } from '../executor/engine.js';
import { ElasticMoeError } from '../runtime/errors.js';
import type { ServingDeployment } from './deployment.js';

// ---- configuration

/** A bad autoscaler configuration; `field` names the setting at fault. */
export class AutoscaleConfigError extends ElasticMoeError {
  readonly field: string;
  constructor(field: string, message: string) {
    super('INVALID_ARGUMENT', `autoscale config: ${field}: ${message}`);
    this.field = field;
  }
}

const fraction = () => z.number({ invalid_type_error: 'must be a number in 0..1' }).gt(0, 'must be above 0').max(1, 'must be at most 1');
const seconds = z.number({ invalid_type_error: 'must be a number of seconds' }).min(0, 'must be at least 0').finite();

export const AutoscaleConfigSchema = z.object({
  /** TTFT SLO: submission to first token (ms). */
  ttftMs: z.number({ required_error: 'is required: the TTFT SLO in milliseconds', invalid_type_error: 'must be the TTFT SLO in milliseconds (a number)' })
    .positive('must be above 0').finite(),
  /** TPOT SLO: mean time per output token after the first (ms). */
  tpotMs: z.number({ required_error: 'is required: the TPOT SLO in milliseconds', invalid_type_error: 'must be the TPOT SLO in milliseconds (a number)' })
    .positive('must be above 0').finite(),
  /** Fraction of requests that should meet both SLOs (default 0.9). */
  attainmentTarget: fraction().default(0.9),
  /** Scale up when attainment falls below this (default attainmentTarget). */
  scaleUpBelow: fraction().optional(),
  /** Scale down only with attainment at least this (default halfway from attainmentTarget to 1). */
  scaleDownAbove: fraction().optional(),
  /** Utilisation (throughput per device over the highest observed) below which the devices count as idle (default 0.3). */
  scaleDownIdleBelow: fraction().default(0.3),
  /** Utilisation at which SLO misses count as load without a queue; a scale down must not project the rest above it (default 0.6). */
  busyAbove: fraction().default(0.6),
  /** Down only while throughput < this x the throughput at which one device fewer last missed its SLOs (default 0.8). */
  scaleDownHeadroom: fraction().default(0.8),
  minDevices: z.number().int('must be an integer').min(1, 'must be at least 1').default(1),
  /** Default: the pool's size. */
  maxDevices: z.number().int('must be an integer').min(1, 'must be at least 1').optional(),
  /** Device ordinals in the order they are added (and removed in reverse). Default: the serving devices, then the node's others. */
  devicePool: z.array(z.number().int('must be integers').min(0, 'must be device ordinals (at least 0)')).min(1, 'must name at least one device').optional(),
  /** Seconds of history the estimates look at (default 30). */
  window: z.number({ invalid_type_error: 'must be a number of seconds' }).positive('must be above 0').finite().default(30),
  /** Fewest finished requests in the window for attainment to count toward a scale up (default 5). */
  minSamples: z.number().int('must be an integer').min(1, 'must be at least 1').default(5),
  /** Fewest SLO misses in the window for a scale up (default 2): one slow request never scales. */
  minMisses: z.number().int('must be an integer').min(1, 'must be at least 1').default(2),
  /** Seconds after any scale before the next scale up (default 15). */
  cooldownUpSeconds: seconds.default(15),
  /** Seconds after any scale (or the start) before a scale down (default 60); at least cooldownUpSeconds. */
  cooldownDownSeconds: seconds.default(60),
  /** Seconds a wanted scale must hold on every evaluation before it happens (default 5). */
  sustainSeconds: seconds.default(5),
  /** Milliseconds between evaluations (default 1000). */
  intervalMs: z.number().int('must be an integer').min(10, 'must be at least 10').default(1000),
}).strict();

export type AutoscaleConfigInput = z.input<typeof AutoscaleConfigSchema>;

/** A resolved configuration: every default filled in. */
export interface AutoscaleConfig {
  ttftMs: number;
  tpotMs: number;
  attainmentTarget: number;
  scaleUpBelow: number;
  scaleDownAbove: number;
  scaleDownIdleBelow: number;
  busyAbove: number;
  scaleDownHeadroom: number;
  minDevices: number;
  maxDevices: number;
  devicePool: number[];
  window: number;
  minSamples: number;
  minMisses: number;
  cooldownUpSeconds: number;
  cooldownDownSeconds: number;
  sustainSeconds: number;
  intervalMs: number;
}

export interface AutoscaleDefaults {
  /** The pool when the config names none (e.g. the serving devices, then the others of the node). */
  devicePool?: number[];
  /** Devices on the node: pool ordinals must be below it. */
  deviceCount?: number;
}

/** Parses and resolves a configuration (JSON object); throws AutoscaleConfigError naming the field. */
export function parseAutoscaleConfig(input: unknown, defaults: AutoscaleDefaults = {}): AutoscaleConfig {
  const r = AutoscaleConfigSchema.safeParse(input);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    if (issue.code === 'unrecognized_keys') {
      const fields = Object.keys(AutoscaleConfigSchema.shape).join(', ');
      throw new AutoscaleConfigError(issue.keys.join(', '), `unknown field${issue.keys.length > 1 ? 's' : ''} (the fields are ${fields})`);
    }
    const field = issue.path.join('.') || 'root';
    const message = issue.code === 'invalid_type' && issue.path.length === 0 ? 'must be a JSON object' : issue.message;
    throw new AutoscaleConfigError(field, message);
  }
  const c = r.data;
  const pool = c.devicePool ?? defaults.devicePool;
  if (!pool || pool.length === 0) throw new AutoscaleConfigError('devicePool', 'is required here (no default pool is known)');
  const dup = pool.findIndex((d, i) => pool.indexOf(d) !== i);
  if (dup >= 0) throw new AutoscaleConfigError(`devicePool[${dup}]`, `names device ${pool[dup]} twice`);
  if (defaults.deviceCount !== undefined) {
    const bad = pool.findIndex((d) => d >= defaults.deviceCount!);
    if (bad >= 0) throw new AutoscaleConfigError(`devicePool[${bad}]`, `device ${pool[bad]} is not on the node (devices 0..${defaults.deviceCount - 1})`);
  }
  const maxDevices = c.maxDevices ?? pool.length;
  if (maxDevices > pool.length) throw new AutoscaleConfigError('maxDevices', `${maxDevices} is more than devicePool holds (${pool.length})`);
  if (c.minDevices > maxDevices) throw new AutoscaleConfigError('minDevices', `${c.minDevices} is above maxDevices ${maxDevices}`);
  const scaleUpBelow = c.scaleUpBelow ?? c.attainmentTarget;
  const scaleDownAbove = c.scaleDownAbove ?? Math.max(scaleUpBelow, c.attainmentTarget + (1 - c.attainmentTarget) / 2);
  if (scaleDownAbove < scaleUpBelow) {
    throw new AutoscaleConfigError('scaleDownAbove', `${scaleDownAbove} is below scaleUpBelow ${scaleUpBelow}: attainment between them would scale up and down in turn`);
  }
  if (c.scaleDownIdleBelow >= c.busyAbove) {
    throw new AutoscaleConfigError('scaleDownIdleBelow', `${c.scaleDownIdleBelow} must be below busyAbove ${c.busyAbove}`);
  }
  if (c.cooldownDownSeconds < c.cooldownUpSeconds) {
    throw new AutoscaleConfigError('cooldownDownSeconds', `${c.cooldownDownSeconds} must be at least cooldownUpSeconds ${c.cooldownUpSeconds} (scale down more slowly than up)`);
  }
  return {
    ttftMs: c.ttftMs, tpotMs: c.tpotMs, attainmentTarget: c.attainmentTarget, scaleUpBelow, scaleDownAbove,
    scaleDownIdleBelow: c.scaleDownIdleBelow, busyAbove: c.busyAbove, scaleDownHeadroom: c.scaleDownHeadroom,
    minDevices: c.minDevices, maxDevices, devicePool: [...pool], window: c.window, minSamples: c.minSamples, minMisses: c.minMisses,
    cooldownUpSeconds: c.cooldownUpSeconds, cooldownDownSeconds: c.cooldownDownSeconds, sustainSeconds: c.sustainSeconds, intervalMs: c.intervalMs,
  };
}

// ---- the window and the decision (pure)

/** A finished request, as the window keeps it. Times in ms on the autoscaler's clock. */
export interface RequestSample {
  /** When it finished. */
  t: number;
  ttftMs: number | null;
  tpotMs: number | null;
  queuedMs: number;
  totalMs: number;
  finish: FinishReason;
  /** Prompt and output tokens. */
  tokens: number;
}

/** One engine step. */
export interface StepSample {
  /** When it ended. */
  t: number;
  ms: number;
  tokens: number;
  batchSeqs: number;
  /** DP ranks of the step (its layout's device count). */
  ranks: number;
}

/** The engine's queue at one evaluation. */
export interface QueueSample {
  t: number;
  waiting: number;
  running: number;
}

export type ScaleAction = 'up' | 'down' | 'hold';

/** Why a decision was taken (low cardinality: the metric's `reason` label). */
export type DecisionReason =
  | 'slo_miss' // up: attainment below the threshold, confirmed by load
  | 'idle' // down: devices idle with attainment comfortably above target
  | 'below_min' // up: fewer devices than minDevices
  | 'above_max' // down: more devices than maxDevices
  | 'scaling' // hold: a scale is in progress
  | 'cooldown' // hold: wanted, but too soon after the last scale
  | 'sustain' // hold: wanted, not yet for sustainSeconds
  | 'at_max' // hold: attainment low but maxDevices serve already
  | 'at_min' // hold: idle but minDevices serve already
  | 'no_device' // hold: the pool has no device left to add
  | 'unconfirmed' // hold: misses without the load that confirms them (too few, no queue, devices not busy)
  | 'headroom' // hold: idle-looking, but one device fewer would be near its observed capacity
  | 'steady'; // hold: nothing to do

export interface Candidate {
  action: 'up' | 'down';
  /** When it was first wanted (ms). */
  since: number;
}

export interface AutoscalerState {
  /** The clock (ms). */
  now: number;
  /** Devices serving now. */
  devices: readonly number[];
  requests: readonly RequestSample[];
  steps: readonly StepSample[];
  queue: readonly QueueSample[];
  /** When the last scale ended (ms); undefined before the first. */
  lastScaleAt?: number;
  /** When observation began: the window never reaches before it, and no scale down comes within cooldownDownSeconds of it. */
  startedAt?: number;
  /** A scale is in progress. */
  scaling: boolean;
  /** The action wanted on earlier evaluations (hysteresis), from the previous decision. */
  candidate?: Candidate;
  /** Highest per-device throughput seen so far (tokens/s), from the previous decision's load. */
  capacityPerDevice?: number;
  /** saturatedAt[n]: throughput (tokens/s) at which a layout of n devices last missed its SLOs and was scaled up. */
  saturatedAt?: Readonly<Record<number, number>>;
}

export interface LoadEstimate {
  /** Seconds the estimate covers (the window, shorter just after the start or a scale). */
  windowSeconds: number;
  /** Requests counted toward attainment. */
  samples: number;
  met: number;
  misses: number;
  /** Misses that spent at least half the TTFT SLO waiting for admission. */
  queuedMisses: number;
  requestsPerSecond: number;
  tokensPerSecond: number;
  tokensPerSecondPerDevice: number;
  /** Highest per-device throughput observed (tokens/s). */
  capacityPerDevice: number;
  /** tokensPerSecondPerDevice / capacityPerDevice (0 when nothing was observed). */
  utilisation: number;
  /** Requests waiting for admission now, and the mean over the window. */
  waiting: number;
  meanWaiting: number;
  runningPerDevice: number;
  /** TTFT and TPOT 90th percentiles of the counted requests (ms), null without any. */
  ttftP90: number | null;
  tpotP90: number | null;
}

export interface Decision {
  action: ScaleAction;
  /** The device set to scale to (up and down). */
  devices?: number[];
  reason: DecisionReason;
  /** The reason in words, with the figures behind it. */
  detail: string;
  /** Fraction of the window's requests that met both SLOs; null with none. */
  attainment: number | null;
  load: LoadEstimate;
  /** Pass back as state.candidate next time. */
  candidate?: Candidate;
  /** The clock when decided (ms). */
  at: number;
}

/** Whether a finished request met both SLOs; null when it does not count (cancelled before missing anything). */
export function meetsSlo(r: Pick<RequestSample, 'ttftMs' | 'tpotMs' | 'totalMs' | 'finish'>, config: Pick<AutoscaleConfig, 'ttftMs' | 'tpotMs'>): boolean | null {
  if (r.finish === 'error') return false;
  const ttftMissed = r.ttftMs === null ? r.totalMs > config.ttftMs : r.ttftMs > config.ttftMs;
  const tpotMissed = r.tpotMs !== null && r.tpotMs > config.tpotMs;
  if (r.finish === 'cancelled') return ttftMissed || tpotMissed ? false : null;
  if (r.ttftMs === null) return !ttftMissed ? null : false;
  return !ttftMissed && !tpotMissed;
}

function p90(values: number[]): number | null {
  if (values.length === 0) return null;
  const s = [...values].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil(0.9 * s.length) - 1)]!;
}

/** The window's estimates of attainment and load (pure). */
export function measure(state: AutoscalerState, config: AutoscaleConfig): { attainment: number | null; load: LoadEstimate } {
  const { now } = state;
  const windowStart = Math.max(now - config.window * 1000, state.startedAt ?? -Infinity);
  // What describes the current layout: since the last scale.
  const from = Math.max(windowStart, state.lastScaleAt ?? -Infinity);
  const span = Math.max(now - from, 1);
  const n = Math.max(state.devices.length, 1);

  let met = 0;
  let misses = 0;
  let queuedMisses = 0;
  let requestTokens = 0;
  let finished = 0;
  const ttfts: number[] = [];
  const tpots: number[] = [];
  for (const r of state.requests) {
    if (r.t > now || r.t - r.totalMs < from) continue; // submitted before the layout (or the window) began
    finished += 1;
    requestTokens += r.tokens;
    const ok = meetsSlo(r, config);
    if (ok === null) continue;
    if (r.ttftMs !== null) ttfts.push(r.ttftMs);
    if (r.tpotMs !== null) tpots.push(r.tpotMs);
    if (ok) {
      met += 1;
    } else {
      misses += 1;
      if (r.queuedMs >= config.ttftMs / 2) queuedMisses += 1;
    }
  }
  let stepTokens = 0;
  let steps = 0;
  let peak = 0;
  for (const s of state.steps) {
    if (s.t > now || s.t < from) continue;
    steps += 1;
    stepTokens += s.tokens;
    if (s.ms > 0) peak = Math.max(peak, s.tokens / (s.ms / 1000) / Math.max(s.ranks, 1));
  }
  // Throughput through the engine: its steps when they are observed, else the finished requests' tokens.
  const tokensPerSecond = (steps > 0 ? stepTokens : requestTokens) / (span / 1000);
  const tokensPerSecondPerDevice = tokensPerSecond / n;
  const capacityPerDevice = Math.max(state.capacityPerDevice ?? 0, peak, tokensPerSecondPerDevice);
  let waitingSum = 0;
  let runningSum = 0;
  let queueSamples = 0;
  let latest: QueueSample | undefined;
  for (const q of state.queue) {
    if (q.t > now) continue;
    if (!latest || q.t >= latest.t) latest = q;
    if (q.t < from) continue;
    queueSamples += 1;
    waitingSum += q.waiting;
    runningSum += q.running;
  }
  const samples = met + misses;
  return {
    attainment: samples > 0 ? met / samples : null,
    load: {
      windowSeconds: span / 1000,
      samples, met, misses, queuedMisses,
      requestsPerSecond: finished / (span / 1000),
      tokensPerSecond, tokensPerSecondPerDevice, capacityPerDevice,
      utilisation: capacityPerDevice > 0 ? tokensPerSecondPerDevice / capacityPerDevice : 0,
      waiting: latest?.waiting ?? 0,
      meanWaiting: queueSamples > 0 ? waitingSum / queueSamples : 0,
      runningPerDevice: (queueSamples > 0 ? runningSum / queueSamples : latest?.running ?? 0) / n,
      ttftP90: p90(ttfts),
      tpotP90: p90(tpots),
    },
  };
}

const pct = (x: number | null) => (x === null ? 'n/a' : `${(x * 100).toFixed(1)}%`);
const num = (x: number, digits = 2) => String(Math.round(x * 10 ** digits) / 10 ** digits);

/** The device set one device larger: the pool's first device not serving. */
export function addDevice(devices: readonly number[], pool: readonly number[]): number[] | undefined {
  const next = pool.find((d) => !devices.includes(d));
  return next === undefined ? undefined : [...devices, next];
}

/** The device set one device smaller: drops the serving device latest in the pool (devices outside the pool first). */
export function removeDevice(devices: readonly number[], pool: readonly number[]): number[] | undefined {
  if (devices.length <= 1) return undefined;
  const rank = (d: number) => (pool.includes(d) ? pool.indexOf(d) : Infinity);
  let drop = devices[0]!;
  for (const d of devices) if (rank(d) >= rank(drop)) drop = d;
  return devices.filter((d) => d !== drop);
}

/**
 * The autoscaling decision for one evaluation: pure (no clock, no I/O). Pass
 * the returned `candidate` (and the load's capacityPerDevice) back in the next
 * state.
 */
export function decide(state: AutoscalerState, config: AutoscaleConfig): Decision {
  const { now } = state;
  const { attainment, load } = measure(state, config);
  const n = state.devices.length;
  const base = { attainment, load, at: now };
  const hold = (reason: DecisionReason, detail: string, candidate?: Candidate): Decision =>
    ({ action: 'hold', reason, detail, ...base, ...(candidate ? { candidate } : {}) });
  const summary = `attainment ${pct(attainment)} of ${load.samples} requests, utilisation ${num(load.utilisation)}, ${load.waiting} waiting`;

  if (state.scaling) return hold('scaling', 'a scale is in progress');

  const sinceScale = state.lastScaleAt === undefined ? Infinity : now - state.lastScaleAt;
  const sinceChange = Math.min(sinceScale, state.startedAt === undefined ? Infinity : now - state.startedAt);
  const upCooldownLeft = config.cooldownUpSeconds * 1000 - sinceScale;
  const downCooldownLeft = config.cooldownDownSeconds * 1000 - sinceChange;

  // Bounds first: they need no evidence and no sustain, only the cooldown (a failing scale is not retried at every tick).
  if (n < config.minDevices) {
    const devices = addDevice(state.devices, config.devicePool);
    if (!devices) return hold('no_device', `${n} devices serve, fewer than minDevices ${config.minDevices}, and the pool has no device left`);
    if (upCooldownLeft > 0) return hold('cooldown', `below minDevices ${config.minDevices}: up in ${num(upCooldownLeft / 1000)} s`);
    return { action: 'up', devices, reason: 'below_min', detail: `${n} devices serve, fewer than minDevices ${config.minDevices}`, ...base };
  }
  if (n > config.maxDevices) {
    const devices = removeDevice(state.devices, config.devicePool)!;
    if (downCooldownLeft > 0) return hold('cooldown', `above maxDevices ${config.maxDevices}: down in ${num(downCooldownLeft / 1000)} s`);
    return { action: 'down', devices, reason: 'above_max', detail: `${n} devices serve, more than maxDevices ${config.maxDevices}`, ...base };
  }

  // What the evidence asks for.
  let want: 'up' | 'down' | undefined;
  let why = '';
  let blocked: Decision | undefined;
  const missing = attainment !== null && attainment < config.scaleUpBelow;
  if (missing) {
    const confirmations: string[] = [];
    if (load.waiting > 0) confirmations.push(`${load.waiting} waiting`);
    if (load.queuedMisses >= config.minMisses) confirmations.push(`${load.queuedMisses} misses queued >= ${num(config.ttftMs / 2)} ms`);
    if (load.utilisation >= config.busyAbove) confirmations.push(`utilisation ${num(load.utilisation)} >= ${config.busyAbove}`);
    if (load.samples < config.minSamples) {
      blocked = hold('unconfirmed', `attainment ${pct(attainment)} below ${pct(config.scaleUpBelow)} but only ${load.samples} requests (minSamples ${config.minSamples})`);
    } else if (load.misses < config.minMisses) {
      blocked = hold('unconfirmed', `attainment ${pct(attainment)} below ${pct(config.scaleUpBelow)} from ${load.misses} miss (minMisses ${config.minMisses})`);
    } else if (confirmations.length === 0) {
      blocked = hold('unconfirmed', `attainment ${pct(attainment)} below ${pct(config.scaleUpBelow)} but no load confirms it `
        + `(none waiting, ${load.queuedMisses} queued misses, utilisation ${num(load.utilisation)} < ${config.busyAbove})`);
    } else {
      want = 'up';
      why = `attainment ${pct(attainment)} < ${pct(config.scaleUpBelow)} (${load.misses} of ${load.samples} missed: TTFT p90 ${load.ttftP90 === null ? 'n/a' : num(load.ttftP90, 1)} ms, `
        + `TPOT p90 ${load.tpotP90 === null ? 'n/a' : num(load.tpotP90, 1)} ms), load confirmed: ${confirmations.join(', ')}`;
    }
  } else {
    const comfortable = attainment === null || attainment >= config.scaleDownAbove;
    if (comfortable && load.waiting === 0 && load.utilisation < config.scaleDownIdleBelow) {
      const projected = n > 1 ? (load.utilisation * n) / (n - 1) : Infinity;
      const saturated = state.saturatedAt?.[n - 1];
      if (n > 1 && projected >= config.busyAbove) {
        blocked = hold('headroom', `idle (utilisation ${num(load.utilisation)}) but ${n - 1} devices would run at ${num(projected)} >= busyAbove ${config.busyAbove}`);
      } else if (n > 1 && saturated !== undefined && load.tokensPerSecond >= config.scaleDownHeadroom * saturated) {
        blocked = hold('headroom', `idle (utilisation ${num(load.utilisation)}) but ${num(load.tokensPerSecond, 0)} tokens/s is at least ${config.scaleDownHeadroom} x `
          + `the ${num(saturated, 0)} tokens/s at which ${n - 1} devices last missed their SLOs`);
      } else {
        want = 'down';
        why = `idle: utilisation ${num(load.utilisation)} < ${config.scaleDownIdleBelow}, none waiting, attainment ${pct(attainment)}`
          + `${attainment === null ? ' (no requests)' : ` >= ${pct(config.scaleDownAbove)}`}`;
      }
    }
  }
  if (want === undefined) return blocked ?? hold('steady', summary);

  // Bounds, then the cooldown, then the sustain period (the candidate keeps its start through the cooldown).
  const target = want === 'up' ? addDevice(state.devices, config.devicePool) : removeDevice(state.devices, config.devicePool);
  if (want === 'up' && n >= config.maxDevices) return hold('at_max', `${why}; maxDevices ${config.maxDevices} serve already`);
  if (want === 'down' && n <= config.minDevices) return hold('at_min', `${why}; minDevices ${config.minDevices} serve already`);
  if (!target) return hold('no_device', `${why}; the pool has no device left to add`);
  const candidate: Candidate = state.candidate?.action === want ? state.candidate : { action: want, since: now };
  const cooldownLeft = want === 'up' ? upCooldownLeft : downCooldownLeft;
  if (cooldownLeft > 0) return hold('cooldown', `${why}; ${want} in ${num(cooldownLeft / 1000)} s (cooldown)`, candidate);
  const held = now - candidate.since;
  if (held < config.sustainSeconds * 1000) {
    return hold('sustain', `${why}; wanted for ${num(held / 1000)} of ${config.sustainSeconds} s`, candidate);
  }
  return { action: want, devices: target, reason: want === 'up' ? 'slo_miss' : 'idle', detail: why, ...base };
}

// ---- the autoscaler

/** The pino calls the autoscaler makes (a pino logger fits). */
export interface AutoscaleLogger {
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  error(obj: object, msg?: string): void;
  debug(obj: object, msg?: string): void;
}

export interface AutoscalerOptions {
  /** The clock in ms (default performance.now). */
  now?: () => number;
  log?: AutoscaleLogger;
  /** Devices on the node: the default pool is the serving devices then the others below it; pool ordinals must be below it. */
  deviceCount?: number;
  /** Decisions kept for report() (default 50; repeated holds of one reason share an entry). */
  history?: number;
}

export interface DecisionRecord {
  action: ScaleAction;
  reason: DecisionReason;
  detail: string;
  devices?: number[];
  attainment: number | null;
  utilisation: number;
  waiting: number;
  /** Clock ms of the first and last evaluation that decided it, and how many did. */
  at: number;
  lastAt: number;
  count: number;
}

export interface ScaleRecord {
  direction: 'up' | 'down';
  from: number[];
  to: number[];
  reason: DecisionReason;
  at: number;
  ok: boolean;
  ms: number;
  error?: string;
}

export interface AutoscalerReport {
  enabled: true;
  running: boolean;
  config: AutoscaleConfig;
  devices: number[];
  targetDevices: number;
  scaling: boolean;
  attainment: number | null;
  load: LoadEstimate;
  lastScaleSecondsAgo: number | null;
  /** Newest first. */
  decisions: Array<DecisionRecord & { secondsAgo: number }>;
  scales: Array<ScaleRecord & { secondsAgo: number }>;
  /** saturatedAt[n]: tokens/s at which n devices last missed their SLOs. */
  saturatedAt: Record<number, number>;
}

const noop = () => undefined;
const SILENT: AutoscaleLogger = { info: noop, warn: noop, error: noop, debug: noop };

export class Autoscaler {
  readonly config: AutoscaleConfig;
  private readonly now: () => number;
  private readonly log: AutoscaleLogger;
  private readonly historySize: number;
  private readonly startedAt: number;
  private requests: RequestSample[] = [];
  private steps: StepSample[] = [];
  private queue: QueueSample[] = [];
  private lastScaleAt: number | undefined;
  private candidate: Candidate | undefined;
  private capacityPerDevice = 0;
  private readonly saturatedAt: Record<number, number> = {};
  private knownDevices: number[];
  private target: number;
  private inflight: Promise<void> | undefined;
  private timer: NodeJS.Timeout | undefined;
  private unsubscribe: (() => void) | undefined;
  private last: Decision | undefined;
  private readonly decisions: DecisionRecord[] = [];
  private readonly scales: ScaleRecord[] = [];
  private readonly decisionsTotal: Counter<'action' | 'reason'>;
  private readonly scalesTotal: Counter<'direction' | 'result'>;
  private readonly gauges: Gauge[];

  constructor(private readonly deployment: ServingDeployment, config: AutoscaleConfigInput | AutoscaleConfig, options: AutoscalerOptions = {}) {
    if (typeof deployment.scale !== 'function') {
      throw new ElasticMoeError('INVALID_ARGUMENT', 'the autoscaler needs a deployment that scales (this one serves a fixed layout: with --model the layout is fixed for now)');
    }
    this.now = options.now ?? (() => performance.now());
    this.log = options.log ?? SILENT;
    this.historySize = options.history ?? 50;
    this.knownDevices = [...deployment.layout().devices];
    const defaultPool = options.deviceCount === undefined ? undefined
      : [...this.knownDevices, ...Array.from({ length: options.deviceCount }, (_, d) => d).filter((d) => !this.knownDevices.includes(d))];
    this.config = parseAutoscaleConfig(config, {
      ...(defaultPool ? { devicePool: defaultPool } : {}),
      ...(options.deviceCount !== undefined ? { deviceCount: options.deviceCount } : {}),
    });
    this.startedAt = this.now();
    this.target = this.knownDevices.length;

    this.decisionsTotal = new Counter({
      name: 'elasticmoe_autoscaler_decisions_total', help: 'Autoscaler decisions, by action (up, down, hold) and reason', labelNames: ['action', 'reason'] as const, registers: [],
    });
    this.scalesTotal = new Counter({
      name: 'elasticmoe_autoscaler_scales_total', help: 'Scales the autoscaler started, by direction (up, down) and result (ok, failed)', labelNames: ['direction', 'result'] as const, registers: [],
    });
    const self = this;
    this.gauges = [
      new Gauge({
        name: 'elasticmoe_autoscaler_attainment', help: 'Fraction of the window\'s requests meeting both SLOs (TTFT and TPOT); NaN with none', registers: [],
        collect() {
          this.set(self.measureNow().attainment ?? NaN);
        },
      }),
      new Gauge({
        name: 'elasticmoe_autoscaler_target_devices', help: 'Devices the autoscaler wants (the serving count, or the count of a scale it started)', registers: [],
        collect() {
          this.set(self.target);
        },
      }),
      new Gauge({
        name: 'elasticmoe_autoscaler_utilisation', help: 'Throughput per device over the highest observed, over the window', registers: [],
        collect() {
          this.set(self.measureNow().load.utilisation);
        },
      }),
      new Gauge({
        name: 'elasticmoe_autoscaler_slo_seconds', help: 'The SLO targets (ttft, tpot)', labelNames: ['slo'] as const, registers: [],
        collect() {
          this.set({ slo: 'ttft' }, self.config.ttftMs / 1000);
          this.set({ slo: 'tpot' }, self.config.tpotMs / 1000);
        },
      }),
    ];
  }

  /** Adds the autoscaler's metrics to a registry (the server's). */
  registerMetrics(registry: Registry): void {
    for (const m of [this.decisionsTotal, this.scalesTotal, ...this.gauges] as Array<Parameters<Registry['registerMetric']>[0]>) registry.registerMetric(m);
  }

  /** A finished request. */
  record(c: Completion): void {
    const t = this.now();
    if (this.requests.length > 4096) this.prune(t); // also bounded when no tick runs
    this.requests.push({
      t, ttftMs: c.timings.ttftMs, tpotMs: c.timings.tpotMs, queuedMs: c.timings.queuedMs, totalMs: c.timings.totalMs,
      finish: c.finishReason, tokens: c.promptTokens.length + c.outputTokens.length,
    });
  }

  /** One engine step (fed by the deployment's onStep while started). */
  recordStep(f: StepFigures): void {
    const t = this.now();
    if (this.steps.length > 4096) this.prune(t);
    this.steps.push({ t, ms: f.ms, tokens: f.tokens, batchSeqs: f.batchSeqs, ranks: Math.max(f.rankSeqs.length, 1) });
  }

  get running(): boolean {
    return this.timer !== undefined;
  }

  get scaling(): boolean {
    return this.inflight !== undefined || this.deployment.isScaling === true;
  }

  get lastDecision(): Decision | undefined {
    return this.last;
  }

  /** Evaluates every intervalMs (default the config's) until stop(). */
  start(intervalMs: number = this.config.intervalMs): void {
    if (this.timer) return;
    if (!this.unsubscribe && this.deployment.onStep) this.unsubscribe = this.deployment.onStep((f) => this.recordStep(f));
    this.timer = setInterval(() => {
      try {
        this.tick();
      } catch (err) {
        this.log.error({ err }, 'autoscaler evaluation failed');
      }
    }, intervalMs);
    this.timer.unref();
    this.log.info({ config: this.config, devices: this.knownDevices, intervalMs }, 'autoscaler started');
  }

  /** Stops evaluating (a scale in progress finishes; `settled()` waits for it). */
  stop(): void {
    if (this.timer) {
      clearInterval(this.timer);
      this.timer = undefined;
      this.log.info({}, 'autoscaler stopped');
    }
    this.unsubscribe?.();
    this.unsubscribe = undefined;
  }

  /** Resolves once no scale started by the autoscaler is in progress. */
  async settled(): Promise<void> {
    while (this.inflight) await this.inflight;
  }

  private prune(now: number): void {
    const keep = now - this.config.window * 1000;
    this.requests = this.requests.filter((r) => r.t >= keep);
    this.steps = this.steps.filter((s) => s.t >= keep);
    this.queue = this.queue.filter((q) => q.t >= keep);
  }

  private state(now: number): AutoscalerState {
    const s: AutoscalerState = {
      now, devices: this.knownDevices, requests: this.requests, steps: this.steps, queue: this.queue,
      startedAt: this.startedAt, scaling: this.scaling, capacityPerDevice: this.capacityPerDevice, saturatedAt: this.saturatedAt,
    };
    if (this.lastScaleAt !== undefined) s.lastScaleAt = this.lastScaleAt;
    if (this.candidate) s.candidate = this.candidate;
    return s;
  }

  private measureNow() {
    return measure(this.state(this.now()), this.config);
  }

  /** One evaluation: samples the queue, decides, and starts the scale it asks for. */
  tick(): Decision {
    const now = this.now();
    this.prune(now);
    // A scale made by someone else (POST /admin/scale) counts as a scale: cooldowns, fresh evidence.
    const devices = this.deployment.layout().devices;
    if (!this.scaling && (devices.length !== this.knownDevices.length || devices.some((d, i) => d !== this.knownDevices[i]))) {
      this.log.info({ from: this.knownDevices, to: devices }, 'autoscaler: the layout changed outside the autoscaler');
      this.knownDevices = [...devices];
      this.lastScaleAt = now;
      this.target = devices.length;
      this.candidate = undefined;
    }
    const stats = this.deployment.stats();
    this.queue.push({ t: now, waiting: stats.waiting, running: stats.running });

    const d = decide(this.state(now), this.config);
    this.last = d;
    this.candidate = d.candidate;
    this.capacityPerDevice = Math.max(this.capacityPerDevice, d.load.capacityPerDevice);
    this.decisionsTotal.inc({ action: d.action, reason: d.reason });
    this.remember(d);
    if (d.action !== 'hold' && d.devices) this.scale(d, d.devices);
    else if (!this.scaling) this.target = this.knownDevices.length;
    return d;
  }

  private remember(d: Decision): void {
    const prev = this.decisions.at(-1);
    const fields = { attainment: d.attainment, utilisation: d.load.utilisation, waiting: d.load.waiting };
    const logged = {
      action: d.action, reason: d.reason, detail: d.detail, devices: this.knownDevices, ...(d.devices ? { to: d.devices } : {}),
      attainment: d.attainment === null ? null : Math.round(d.attainment * 1000) / 1000, utilisation: Math.round(d.load.utilisation * 1000) / 1000,
      waiting: d.load.waiting, samples: d.load.samples,
    };
    if (d.action === 'hold' && prev && prev.action === 'hold' && prev.reason === d.reason) {
      Object.assign(prev, fields, { detail: d.detail, lastAt: d.at, count: prev.count + 1 });
      this.log.debug(logged, 'autoscaler decision');
      return;
    }
    this.decisions.push({ action: d.action, reason: d.reason, detail: d.detail, ...(d.devices ? { devices: d.devices } : {}), ...fields, at: d.at, lastAt: d.at, count: 1 });
    if (this.decisions.length > this.historySize) this.decisions.shift();
    this.log.info(logged, 'autoscaler decision');
  }

  private scale(d: Decision, to: number[]): void {
    const from = [...this.knownDevices];
    const direction = d.action as 'up' | 'down';
    const tps = d.load.tokensPerSecond;
    const t0 = this.now();
    this.target = to.length;
    const done = (ok: boolean, err?: unknown) => {
      const at = this.now();
      this.lastScaleAt = at;
      this.candidate = undefined;
      const rec: ScaleRecord = { direction, from, to, reason: d.reason, at, ok, ms: at - t0 };
      if (err !== undefined) rec.error = err instanceof Error ? err.message : String(err);
      this.scales.push(rec);
      if (this.scales.length > this.historySize) this.scales.shift();
      this.scalesTotal.inc({ direction, result: ok ? 'ok' : 'failed' });
      this.knownDevices = [...this.deployment.layout().devices];
      this.target = this.knownDevices.length;
    };
    this.log.info({ from, to, reason: d.reason, detail: d.detail }, `autoscaler: scaling ${direction}`);
    this.inflight = (async () => {
      try {
        const report = await this.deployment.scale!(to);
        // The throughput at which `from` missed its SLOs: a learned capacity that guards the way back down.
        if (direction === 'up' && d.reason === 'slo_miss') this.saturatedAt[from.length] = tps;
        done(true);
        this.log.info({ from: report.from, to: report.to, ms: Math.round(report.ms) }, `autoscaler: scaled ${direction}`);
      } catch (err) {
        done(false, err);
        this.log.error({ err, from, to }, `autoscaler: scale ${direction} failed (the deployment rolled back; the old layout serves)`);
      } finally {
        this.inflight = undefined;
      }
    })();
  }

  /** The configuration, the current estimates and the last decisions (GET /admin/autoscaler). */
  report(): AutoscalerReport {
    const now = this.now();
    const { attainment, load } = measure(this.state(now), this.config);
    const ago = (t: number) => Math.round((now - t) / 100) / 10;
    return {
      enabled: true,
      running: this.running,
      config: this.config,
      devices: [...this.knownDevices],
      targetDevices: this.target,
      scaling: this.scaling,
      attainment,
      load,
      lastScaleSecondsAgo: this.lastScaleAt === undefined ? null : ago(this.lastScaleAt),
      decisions: [...this.decisions].reverse().map((d) => ({ ...d, secondsAgo: ago(d.lastAt) })),
      scales: [...this.scales].reverse().map((s) => ({ ...s, secondsAgo: ago(s.at) })),
      saturatedAt: { ...this.saturatedAt },
    };
  }
}
