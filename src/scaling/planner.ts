// The scaling planner: pure functions from the current layout, the target device
// set and the observed expert load to (1) a new expert placement, (2) the scale
// plan — chunks reused in place, copied peer-to-peer, released — (3) a lower
// bound on the bytes any valid plan must move, and (4) a transfer schedule for
// the HMM's CopyService. No device, no I/O: everything here is deterministic and
// unit-tested on its own (test/standalone/scaling-planner.test.ts).
//
// Placement (planPlacement), layer by layer:
//   0. Replica counts. Every expert gets one instance; `replicateHot` extra
//      instances go, one at a time, to the expert with the highest load per
//      instance (ties: lower expert index) — the hottest experts, a very hot one
//      possibly twice (EPLB's rule). Each instance carries load / instances.
//   1. Cap. A device may carry max(balance × mean, m), m the max load of an LPT
//      placement from scratch: when balance × mean is infeasible (4 experts on 3
//      devices, one expert hotter than the bound) the planner aims at what a good
//      placement reaches instead of moving bytes for nothing.
//   2. Keep. Every instance on a device that stays, stays (no bytes move); an
//      expert now wanting fewer instances drops those on the most loaded devices.
//   3. Home the homeless. Instances whose devices leave, and new replicas, are
//      placed heaviest first on the least loaded device with a free slot that
//      lacks the expert (LPT; ties: fewer experts, new devices, device order) —
//      new devices start empty, so they take them first — or, in the 'bfd'
//      variants, on the fullest device they still fit on under the cap.
//   4. Shed. While a device is over its slots or over the cap, move one instance
//      off the worst one to the least loaded device it fits on. An instance
//      copied in this plan moves again for free, so those go first; then the
//      smallest instance that alone brings the device under the cap, else the
//      largest that fits (removing the largest is what minimises how many must
//      leave). When no single move fits: an exchange of two instances (free ones
//      first), then a move that at least lowers the larger load of the pair. The
//      'set' variants first lift, per overloaded device, the fewest instances
//      that cover its excess with the least load, and home them as in step 3.
//   5. Choose. The four variants (lpt|bfd × greedy|set) run in turn until one
//      meets the slots and the cap with no more copies than the layer's lower
//      bound (below); failing that, a safety net joins them — the LPT placement
//      from scratch, its bins matched to devices to keep the most instances,
//      which meets the cap by construction — and the plan within slots and cap
//      with the fewest copies (then the lowest max load) wins.
//   Warm experts (option `warm`: devices holding an expert's bytes outside the
//   layout, standby chunks kept from an earlier one) only break ties: a home or a
//   move onto such a device wins among those valued alike, and a homeless
//   instance goes to a device holding it warm when it fits under the cap there,
//   so scaling back to an earlier device set lands experts where their bytes are.
// A layer whose observed load is all zero is planned as uniform. On Qwen3-30B-A3B
// shapes (48 × 128 experts) a plan takes 5–40 ms once warm; on small random layers
// checked by brute force it was the exact optimum every time (test output).
//
// Lower bound (lowerBoundBytes), valid for every plan that meets the same cap:
// dense weights for each new device plus, per layer, the largest of (a) the
// experts left without a holder, (b) the experts that cannot stay: each remaining
// device keeps at most its smallest experts that fit under the cap (and its
// slots), (c) the fewest, heaviest experts that carry the load the remaining
// devices cannot (total − remaining × cap): it all lands on new devices. With
// replicas, (b) and (c) give way to counting instances that cannot be kept. The
// bound ignores that moved experts must also fit in the receivers' room, which is
// where the gap to a plan comes from; measured ratios are printed by the test.
//
// Transfers (scheduleTransfers): see the function.
import { InvalidArgumentError } from '../runtime/errors.js';
import { type Transfer, stripes } from '../hmm/copy-service.js';
import { expertGroup } from '../model/weights.js';
import type { LayoutSpec } from './layout.js';

export interface PlanPlacementOptions {
  current: LayoutSpec;
  targetDevices: number[];
  /** load[layer][expert]: observed tokens routed to each expert (default: uniform). */
  load?: number[][];
  /** Allowed max device load over the mean load, per layer (default 1.1). */
  balance?: number;
  /** Extra instances per layer for the hottest experts (default 0). */
  replicateHot?: number;
  /** Expert slots per device and layer (default: unlimited). */
  slotsPerDevice?: number;
  /**
   * warm[layer][expert]: devices that hold a copy of the expert outside the layout (a standby
   * chunk with its bytes, kept from an earlier layout), where placing it moves no byte now. Only
   * a tie-break: among moves or homes the plan values alike (copies, balance), one onto a device
   * holding the expert warm wins, so a scale back to an earlier device set lands experts where
   * their bytes still are. Copies and the lower bound still count such a placement as a copy.
   */
  warm?: ReadonlyArray<ReadonlyArray<readonly number[]>>;
}

export interface PlanSizes {
  /** Bytes of one expert chunk (granule-rounded). */
  expertBytes: number;
  /** Bytes of the dense weights (attention, norms, router, embeddings, LM head) of one device. */
  denseBytes: number;
}

export interface ChunkRef {
  kind: 'expert' | 'dense';
  /** Chunk group: `L<layer>.E<expert>` or 'dense' (the device's packed dense chunks). */
  group: string;
  device: number;
  bytes: number;
  layer?: number;
  expert?: number;
}

export interface ExpertCopy {
  group: string;
  layer: number;
  expert: number;
  bytes: number;
  /** Devices holding the expert in the current layout (any may serve as a source), ascending. */
  sources: number[];
  target: number;
}

export interface DenseCopy {
  target: number;
  /** Devices of the current layout: every one holds a replica of the dense weights. */
  sources: number[];
  bytes: number;
}

export interface ScalePlan {
  from: number[];
  to: number[];
  reuse: ChunkRef[];
  copy: ExpertCopy[];
  release: ChunkRef[];
  denseCopies: DenseCopy[];
  /** Expert bytes copied plus dense bytes copied. */
  bytesMoved: number;
  expertBytesMoved: number;
  denseBytesMoved: number;
}

export interface PlanEfficiency {
  bytesMoved: number;
  lowerBound: number;
  /** bytesMoved / lowerBound (1 when both are 0). */
  ratio: number;
  /** lowerBound / bytesMoved, in (0, 1] (1 when nothing moves). */
  efficiency: number;
}

export interface ScheduleOptions {
  /** Sources one expert transfer is striped across (default 2). */
  maxSourcesPerTransfer?: number;
  /** Sources one dense chunk is striped across (default: every replica). */
  maxDenseSourcesPerTransfer?: number;
  /** Must match CopyOptions.stripeAlignment (default 2 MiB). */
  stripeAlignment?: number;
  /**
   * Sizes of one device's packed dense chunks (`dense@<device>#<i>`, from planChunks). When given,
   * the plan's dense copies are scheduled too; otherwise only expert copies are.
   */
  denseChunkSizes?: number[];
}

export interface ScheduledTransfer extends Transfer {
  targetId: string;
  group: string;
  bytes: number;
  /** Source devices, primary first, in the order of their stripes. */
  sourceDevices: number[];
  /** Bytes each source sends (stripes of copy-service's `stripes`). */
  stripeBytes: number[];
}

// ---------------------------------------------------------------- checks and helpers

const MIB = 1024 * 1024;

function checkDevices(field: string, devices: unknown): number[] {
  if (!Array.isArray(devices) || devices.length === 0) throw new InvalidArgumentError(field, 'a non-empty list of device ordinals');
  const seen = new Set<number>();
  for (const [i, d] of devices.entries()) {
    if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0) throw new InvalidArgumentError(`${field}[${i}]`, `a device ordinal (got ${String(d)})`);
    if (seen.has(d)) throw new InvalidArgumentError(`${field}[${i}]`, `listed once (device ${d} is repeated; remove the duplicate)`);
    seen.add(d);
  }
  return devices as number[];
}

function shapeOf(spec: LayoutSpec, field: string): { layers: number; experts: number } {
  checkDevices(`${field}.devices`, spec?.devices);
  const layers = Array.isArray(spec.placement) ? spec.placement.length : 0;
  if (layers === 0) throw new InvalidArgumentError(`${field}.placement`, 'a non-empty list of layers');
  const experts = Array.isArray(spec.placement[0]) ? spec.placement[0].length : 0;
  if (experts === 0) throw new InvalidArgumentError(`${field}.placement[0]`, 'a non-empty list of experts');
  const inLayout = new Set(spec.devices);
  for (let l = 0; l < layers; l++) {
    const row = spec.placement[l];
    if (!Array.isArray(row) || row.length !== experts) throw new InvalidArgumentError(`${field}.placement[${l}]`, `a list of ${experts} experts like layer 0`);
    for (let e = 0; e < experts; e++) {
      const h = row[e];
      if (!Array.isArray(h) || h.length === 0) throw new InvalidArgumentError(`${field}.placement[${l}][${e}]`, 'a non-empty list of devices');
      for (const d of h) {
        if (!inLayout.has(d)) throw new InvalidArgumentError(`${field}.placement[${l}][${e}]`, `devices of the layout (names ${String(d)})`);
      }
    }
  }
  return { layers, experts };
}

function checkBalance(balance: number): void {
  if (typeof balance !== 'number' || !Number.isFinite(balance) || balance < 1) {
    throw new InvalidArgumentError('balance', `a number ≥ 1 (max device load over the mean; got ${String(balance)})`);
  }
}

function checkSlots(slots: number | undefined): number {
  if (slots === undefined) return Infinity;
  if (!Number.isSafeInteger(slots) || slots < 1) throw new InvalidArgumentError('slotsPerDevice', `a positive integer (got ${String(slots)})`);
  return slots;
}

function checkLoad(load: number[][] | undefined, layers: number, experts: number): void {
  if (load === undefined) return;
  if (!Array.isArray(load) || load.length !== layers) throw new InvalidArgumentError('load', `a list of ${layers} layers`);
  for (let l = 0; l < layers; l++) {
    const row = load[l];
    if (!Array.isArray(row) || row.length !== experts) throw new InvalidArgumentError(`load[${l}]`, `a list of ${experts} expert loads`);
    for (let e = 0; e < experts; e++) {
      const v = row[e];
      if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw new InvalidArgumentError(`load[${l}][${e}]`, `a finite non-negative number (got ${String(v)})`);
    }
  }
}

function checkWarm(warm: PlanPlacementOptions['warm'], layers: number, experts: number): void {
  if (warm === undefined) return;
  const ok = Array.isArray(warm) && warm.length === layers && warm.every((row) => Array.isArray(row) && row.length === experts
    && row.every((ds) => Array.isArray(ds) && ds.every((d) => Number.isSafeInteger(d) && d >= 0)));
  if (!ok) throw new InvalidArgumentError('warm', `${layers} rows (layers) of ${experts} lists (experts) of device ordinals`);
}

function checkSizes(sizes: PlanSizes): void {
  for (const k of ['expertBytes', 'denseBytes'] as const) {
    const v = sizes?.[k];
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw new InvalidArgumentError(`sizes.${k}`, `a non-negative number of bytes (got ${String(v)})`);
  }
}

/** One layer's expert loads; all-zero (or absent) load is uniform. */
function layerWeights(load: number[][] | undefined, layer: number, experts: number): number[] {
  const row = load?.[layer];
  if (!row || !row.some((v) => v > 0)) return new Array<number>(experts).fill(1);
  return [...row];
}

const epsilonOf = (weights: readonly number[]) => 1e-9 * Math.max(1, weights.reduce((a, b) => a + b, 0));

/** Lexicographic comparison of rank tuples. */
function lexLess(a: readonly number[], b: readonly number[]): boolean {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i]! < b[i]!;
  return false;
}

/**
 * Instances per expert: one each, plus `extra` handed out one at a time to the expert
 * with the highest load per instance (ties: lower index), at most one per device, within
 * the slots. Experts with no load get no extra instance.
 */
export function replicaCounts(weights: readonly number[], extra: number, devices: number, slotsPerDevice = Infinity): number[] {
  const E = weights.length;
  const r = new Array<number>(E).fill(1);
  let left = Math.min(Math.max(0, Math.floor(extra)), E * (devices - 1), devices * slotsPerDevice - E);
  while (left-- > 0) {
    let best = -1;
    for (let e = 0; e < E; e++) {
      if (r[e]! >= devices || weights[e]! <= 0) continue;
      if (best < 0 || weights[e]! / r[e]! > weights[best]! / r[best]!) best = e;
    }
    if (best < 0) break;
    r[best]!++;
  }
  return r;
}

/**
 * An LPT placement from scratch: instances heaviest first (ties: lower expert) onto the
 * least loaded device (ties: fewer experts, lower index) that lacks the expert and has a
 * free slot. Bins are anonymous (any permutation onto devices is as good). Undefined
 * when an instance finds no device.
 */
function lptBins(weights: readonly number[], r: readonly number[], devices: number, slots: number): { bins: number[][]; load: number[] } | undefined {
  const inst: Array<[number, number]> = [];
  weights.forEach((w, e) => { for (let k = 0; k < r[e]!; k++) inst.push([e, w / r[e]!]); });
  inst.sort((a, b) => b[1] - a[1] || a[0] - b[0]);
  const load = new Array<number>(devices).fill(0);
  const bins = Array.from({ length: devices }, () => [] as number[]);
  const holds = Array.from({ length: devices }, () => new Set<number>());
  for (const [e, w] of inst) {
    let best = -1;
    for (let i = 0; i < devices; i++) {
      if (holds[i]!.has(e) || bins[i]!.length >= slots) continue;
      if (best < 0 || load[i]! < load[best]! || (load[i] === load[best] && bins[i]!.length < bins[best]!.length)) best = i;
    }
    if (best < 0) return undefined;
    load[best]! += w;
    bins[best]!.push(e);
    holds[best]!.add(e);
  }
  return { bins, load };
}

/** The load a device of one layer may carry: max(balance × mean, what an LPT placement from scratch reaches). */
export function balanceCap(weights: readonly number[], replicas: readonly number[], devices: number, balance: number, slotsPerDevice = Infinity): number {
  const total = weights.reduce((a, b) => a + b, 0);
  const lpt = lptBins(weights, replicas, devices, slotsPerDevice);
  return Math.max(balance * total / devices, lpt ? Math.max(...lpt.load) : 0);
}

/** Per layer, per device of spec.devices (in that order): the load it carries, a replicated expert's load split evenly. */
export function layerLoads(spec: LayoutSpec, load?: number[][]): number[][] {
  const index = new Map(spec.devices.map((d, i) => [d, i]));
  return spec.placement.map((row, l) => {
    const w = layerWeights(load, l, row.length);
    const out = new Array<number>(spec.devices.length).fill(0);
    row.forEach((holders, e) => { for (const d of holders) out[index.get(d)!]! += w[e]! / holders.length; });
    return out;
  });
}

/** Max over layers of (max device load / mean device load). */
export function imbalance(spec: LayoutSpec, load?: number[][]): number {
  let worst = 1;
  for (const loads of layerLoads(spec, load)) {
    const mean = loads.reduce((a, b) => a + b, 0) / loads.length;
    if (mean > 0) worst = Math.max(worst, Math.max(...loads) / mean);
  }
  return worst;
}

// ---------------------------------------------------------------- placement of one layer

interface LayerState {
  D: number;
  isNew: boolean[];
  load: number[];
  count: number[];
  /** Experts on each device index. */
  on: Array<Set<number>>;
  /** Device indices holding each expert. */
  holders: Array<Set<number>>;
  /** Device indices holding each expert in the current layout (an instance elsewhere is a copy). */
  orig: Array<Set<number>>;
  /** Device indices holding each expert warm (PlanPlacementOptions.warm). */
  warm: Array<Set<number>>;
  share: number[];
  eps: number;
}

/** Device a before b as a target: lower load, fewer experts, new first, then order. */
function targetBefore(s: LayerState, a: number, b: number): boolean {
  const dl = s.load[a]! - s.load[b]!;
  if (Math.abs(dl) > s.eps) return dl < 0;
  if (s.count[a] !== s.count[b]) return s.count[a]! < s.count[b]!;
  if (s.isNew[a] !== s.isNew[b]) return s.isNew[a]!;
  return a < b;
}

function targetOrder(s: LayerState, exclude = -1): number[] {
  const idx: number[] = [];
  for (let i = 0; i < s.D; i++) if (i !== exclude) idx.push(i);
  return idx.sort((a, b) => (a === b ? 0 : targetBefore(s, a, b) ? -1 : 1));
}

function add(s: LayerState, e: number, i: number): void {
  s.holders[e]!.add(i);
  s.on[i]!.add(e);
  s.load[i]! += s.share[e]!;
  s.count[i]!++;
}

function remove(s: LayerState, e: number, i: number): void {
  s.holders[e]!.delete(i);
  s.on[i]!.delete(e);
  s.load[i]! -= s.share[e]!;
  s.count[i]!--;
}

/** Chunks saved by keeping the instance of e on device i: 1 if it was there before, 0 if it is a copy of this plan. */
const moveCost = (s: LayerState, e: number, i: number) => (s.orig[e]!.has(i) ? 1 : 0);
/** Change in chunks copied when the instance of e moves from device i to device j (−1 when it goes back home). */
const moveDelta = (s: LayerState, e: number, i: number, j: number) => moveCost(s, e, i) - moveCost(s, e, j);
/** Tie-break: 0 when device i holds e warm (its bytes are there, outside the layout), else 1. */
const cold = (s: LayerState, e: number, i: number) => (s.warm[e]!.has(i) ? 0 : 1);

function newState(cur: number[][], target: number[], isNewDevice: boolean[], w: number[], r: number[], warm?: ReadonlyArray<readonly number[]>): LayerState {
  const D = target.length;
  const E = w.length;
  const index = new Map(target.map((d, i) => [d, i]));
  const s: LayerState = {
    D, isNew: isNewDevice, load: new Array<number>(D).fill(0), count: new Array<number>(D).fill(0),
    on: Array.from({ length: D }, () => new Set<number>()),
    holders: Array.from({ length: E }, () => new Set<number>()),
    orig: Array.from({ length: E }, () => new Set<number>()),
    warm: Array.from({ length: E }, (_, e) => new Set((warm?.[e] ?? []).flatMap((d) => (index.has(d) ? [index.get(d)!] : [])))),
    share: w.map((x, e) => x / r[e]!), eps: epsilonOf(w),
  };
  // Keep every instance on a device that stays.
  for (let e = 0; e < E; e++) {
    for (const d of cur[e]!) {
      const i = index.get(d);
      if (i !== undefined && !s.holders[e]!.has(i)) { add(s, e, i); s.orig[e]!.add(i); }
    }
  }
  for (let e = 0; e < E; e++) {
    while (s.holders[e]!.size > r[e]!) {
      // Drop the instance on the most loaded device (the last in target order).
      const order = [...s.holders[e]!].sort((a, b) => (targetBefore(s, a, b) ? -1 : 1));
      remove(s, e, order[order.length - 1]!);
    }
  }
  return s;
}

interface Variant { place: 'lpt' | 'bfd'; shed: 'greedy' | 'set' }
const VARIANTS: readonly Variant[] = [
  { place: 'lpt', shed: 'greedy' }, { place: 'bfd', shed: 'greedy' }, { place: 'lpt', shed: 'set' }, { place: 'bfd', shed: 'set' },
];

/** Homes instances heaviest first: least loaded device ('lpt') or fullest device it fits on under the cap ('bfd'). */
function placeAll(s: LayerState, items: number[], v: Variant, cap: number, slots: number): void {
  items.sort((a, b) => s.share[b]! - s.share[a]! || a - b);
  for (const e of items) {
    const open = targetOrder(s).filter((i) => !s.holders[e]!.has(i) && s.count[i]! < slots);
    let t = open[0];
    // A device holding e warm takes it when it fits under the cap there (as the 'bfd' homes do).
    const warmT = open.find((i) => s.warm[e]!.has(i) && s.load[i]! + s.share[e]! <= cap + s.eps);
    if (warmT !== undefined) {
      add(s, e, warmT);
      continue;
    }
    if (v.place === 'bfd') {
      const fits = open.filter((i) => s.load[i]! + s.share[e]! <= cap + s.eps);
      if (fits.length > 0) t = fits[fits.length - 1];
    }
    if (t !== undefined) add(s, e, t);
    else relocateFor(s, e, slots);
  }
}

/** Every device with a free slot already holds e: move one instance off a full device to a free slot, and put e there. */
function relocateFor(s: LayerState, e: number, slots: number): void {
  for (const t of targetOrder(s)) {
    if (s.holders[e]!.has(t)) continue;
    const movable = [...s.on[t]!].sort((a, b) => moveCost(s, a, t) - moveCost(s, b, t) || s.share[a]! - s.share[b]! || a - b);
    for (const x of movable) {
      const free = targetOrder(s, t).find((i) => s.count[i]! < slots && !s.holders[x]!.has(i));
      if (free === undefined) continue;
      remove(s, x, t);
      add(s, x, free);
      add(s, e, t);
      return;
    }
  }
  throw new InvalidArgumentError('slotsPerDevice', `enough free slots to place expert ${e} (add devices or raise slotsPerDevice)`);
}

/** The fewest instances of device d whose load covers its excess over the cap, with the least load among those (swap-down greedy). */
function shedSet(s: LayerState, d: number, cap: number): number[] {
  const excess = s.load[d]! - cap;
  // Instances already copied in this plan go first (free to move again), then the largest.
  const warmElsewhere = (e: number) => ([...s.warm[e]!].some((i) => i !== d) ? 0 : 1);
  const items = [...s.on[d]!].sort((a, b) => moveCost(s, a, d) - moveCost(s, b, d) || s.share[b]! - s.share[a]! || warmElsewhere(a) - warmElsewhere(b) || a - b);
  const chosen: number[] = [];
  let sum = 0;
  for (const e of items) {
    if (sum >= excess - s.eps) break;
    chosen.push(e);
    sum += s.share[e]!;
  }
  if (sum < excess - s.eps) return chosen;
  const rest = items.filter((e) => !chosen.includes(e)).sort((a, b) => s.share[a]! - s.share[b]! || a - b);
  for (let k = 0; k < chosen.length; k++) {
    const e = chosen[k]!;
    if (moveCost(s, e, d) === 0) continue;
    const swap = rest.findIndex((b) => moveCost(s, b, d) === 1 && s.share[b]! < s.share[e]! && sum - s.share[e]! + s.share[b]! >= excess - s.eps);
    if (swap < 0) continue;
    const b = rest[swap]!;
    sum += s.share[b]! - s.share[e]!;
    chosen[k] = b;
    rest.splice(swap, 1, e);
    rest.sort((x, y) => s.share[x]! - s.share[y]! || x - y);
  }
  return chosen;
}

/** Move instance e from the device being relieved to t; with `swap`, instance `swap` comes back from t in exchange. */
type Move = { e: number; t: number; swap?: number };

function loadMove(s: LayerState, d: number, cap: number, slots: number): Move | undefined {
  const excess = s.load[d]! - cap;
  const order = targetOrder(s, d).filter((t) => s.count[t]! < slots);
  let best: Move | undefined;
  let bestRank: number[] = [];
  order.forEach((t, rank) => {
    for (const e of s.on[d]!) {
      if (s.holders[e]!.has(t)) continue;
      const x = s.share[e]!;
      if (x <= s.eps || s.load[t]! + x > cap + s.eps) continue;
      const covers = x >= excess - s.eps;
      const key = [moveDelta(s, e, d, t), covers ? 0 : 1, covers ? x : -x, rank, cold(s, e, t), e];
      if (!best || lexLess(key, bestRank)) { best = { e, t }; bestRank = key; }
    }
  });
  if (best && bestRank[0]! <= 0) return best;
  // No free single move: an exchange that costs nothing (two instances copied in this
  // plan) repairs what the homing of instances packed badly.
  const free = swapMove(s, d, cap, excess, 0);
  if (free) return free;
  if (best) return best;
  // Every device that could take load is full (slots) or would go over the cap: exchange.
  const paid = swapMove(s, d, cap, excess, 2);
  if (paid) return paid;
  // Nothing fits under the cap: a move that lowers the larger of the two loads, if any.
  order.forEach((t, rank) => {
    for (const e of s.on[d]!) {
      if (s.holders[e]!.has(t)) continue;
      const x = s.share[e]!;
      const m = Math.max(s.load[d]! - x, s.load[t]! + x);
      if (x <= s.eps || m >= s.load[d]! - s.eps) continue;
      const key = [moveDelta(s, e, d, t), m, rank, cold(s, e, t), e];
      if (!best || lexLess(key, bestRank)) { best = { e, t }; bestRank = key; }
    }
  });
  return best;
}

/** The best exchange of an instance a on d with a lighter b on t that keeps t within the cap and costs at most maxDelta chunks. */
function swapMove(s: LayerState, d: number, cap: number, excess: number, maxDelta: number): Move | undefined {
  let best: Move | undefined;
  let bestRank: number[] = [];
  const mine = [...s.on[d]!].filter((a) => s.share[a]! > s.eps);
  targetOrder(s, d).forEach((t, rank) => {
    const room = cap + s.eps - s.load[t]!;
    // Theirs by share ascending: for each a, only b with share in [share(a) − room, share(a) − eps) qualify.
    const theirs = [...s.on[t]!].filter((b) => !s.holders[b]!.has(d)).sort((x, y) => s.share[x]! - s.share[y]! || x - y);
    if (theirs.length === 0) return;
    for (const a of mine) {
      if (s.holders[a]!.has(t)) continue;
      const da = moveDelta(s, a, d, t);
      if (da - 1 > maxDelta) continue;
      const hi = s.share[a]! - s.eps;
      const lo = s.share[a]! - room;
      let k = 0;
      let n = theirs.length;
      while (k < n) { const m = (k + n) >> 1; if (s.share[theirs[m]!]! < lo) k = m + 1; else n = m; }
      for (; k < theirs.length; k++) {
        const b = theirs[k]!;
        if (s.share[b]! >= hi) break;
        const cost = da + moveDelta(s, b, t, d);
        if (cost > maxDelta) continue;
        const delta = s.share[a]! - s.share[b]!;
        const covers = delta >= excess - s.eps;
        const key = [cost, covers ? 0 : 1, covers ? delta : -delta, rank, cold(s, a, t) + cold(s, b, d), a, b];
        if (!best || lexLess(key, bestRank)) { best = { e: a, t, swap: b }; bestRank = key; }
      }
    }
  });
  return best;
}

function slotMove(s: LayerState, d: number, cap: number, slots: number): Move | undefined {
  let best: Move | undefined;
  let bestRank: number[] = [];
  targetOrder(s, d).filter((t) => s.count[t]! < slots).forEach((t, rank) => {
    for (const e of s.on[d]!) {
      if (s.holders[e]!.has(t)) continue;
      const fits = s.load[t]! + s.share[e]! <= cap + s.eps ? 0 : 1;
      const key = [moveDelta(s, e, d, t), fits, rank, s.share[e]!, cold(s, e, t), e];
      if (!best || lexLess(key, bestRank)) { best = { e, t }; bestRank = key; }
    }
  });
  return best;
}

function runVariant(v: Variant, cur: number[][], target: number[], isNewDevice: boolean[], w: number[], r: number[], cap: number, slots: number,
  warm?: ReadonlyArray<readonly number[]>): LayerState {
  const s = newState(cur, target, isNewDevice, w, r, warm);
  const D = s.D;
  const E = w.length;
  const pending: number[] = [];
  for (let e = 0; e < E; e++) for (let k = s.holders[e]!.size; k < r[e]!; k++) pending.push(e);
  placeAll(s, pending, v, cap, slots);
  if (v.shed === 'set') {
    const lifted: number[] = [];
    const over = targetOrder(s).reverse().filter((i) => s.load[i]! > cap + s.eps);
    for (const d of over) for (const e of shedSet(s, d, cap)) { remove(s, e, d); lifted.push(e); }
    placeAll(s, lifted, v, cap, slots);
  }
  const stuck = new Set<number>();
  const limit = 10 * (pending.length + E * Math.max(...r) + D);
  for (let iter = 0; iter < limit; iter++) {
    let d = -1;
    let overSlots = false;
    for (let i = 0; i < D; i++) {
      if (!stuck.has(i) && s.count[i]! > slots && (d < 0 || s.count[i]! > s.count[d]!)) { d = i; overSlots = true; }
    }
    if (d < 0) {
      for (let i = 0; i < D; i++) {
        if (!stuck.has(i) && s.load[i]! > cap + s.eps && (d < 0 || s.load[i]! > s.load[d]! + s.eps)) d = i;
      }
    }
    if (d < 0) break;
    const mv = overSlots ? slotMove(s, d, cap, slots) : loadMove(s, d, cap, slots);
    if (!mv) { stuck.add(d); continue; }
    remove(s, mv.e, d);
    if (mv.swap !== undefined) { remove(s, mv.swap, mv.t); add(s, mv.swap, d); }
    add(s, mv.e, mv.t);
  }
  return s;
}

/**
 * The safety net: the LPT placement from scratch (whose max load the cap admits by
 * construction), its bins matched to devices so that as many instances as possible
 * stay (greedy matching on overlap, then pairwise exchanges while they help).
 */
function fromScratch(cur: number[][], target: number[], isNewDevice: boolean[], w: number[], r: number[], slots: number): LayerState | undefined {
  const lpt = lptBins(w, r, target.length, slots);
  if (!lpt) return undefined;
  const D = target.length;
  const index = new Map(target.map((d, i) => [d, i]));
  const overlap = lpt.bins.map((bin) => {
    const row = new Array<number>(D).fill(0);
    for (const e of bin) for (const d of cur[e]!) { const i = index.get(d); if (i !== undefined) row[i]!++; }
    return row;
  });
  const deviceOf = new Array<number>(D).fill(-1);
  const taken = new Set<number>();
  for (let k = 0; k < D; k++) {
    let bb = -1;
    let bd = -1;
    for (let b = 0; b < D; b++) {
      if (deviceOf[b]! >= 0) continue;
      for (let i = 0; i < D; i++) if (!taken.has(i) && (bb < 0 || overlap[b]![i]! > overlap[bb]![bd]!)) { bb = b; bd = i; }
    }
    deviceOf[bb] = bd;
    taken.add(bd);
  }
  for (let improved = true; improved;) {
    improved = false;
    for (let x = 0; x < D; x++) {
      for (let y = x + 1; y < D; y++) {
        const dx = deviceOf[x]!;
        const dy = deviceOf[y]!;
        if (overlap[x]![dy]! + overlap[y]![dx]! > overlap[x]![dx]! + overlap[y]![dy]!) { deviceOf[x] = dy; deviceOf[y] = dx; improved = true; }
      }
    }
  }
  const s = newState(cur, target, isNewDevice, w, r);
  for (let e = 0; e < w.length; e++) for (const i of [...s.holders[e]!]) remove(s, e, i);
  lpt.bins.forEach((bin, b) => { for (const e of bin) add(s, e, deviceOf[b]!); });
  return s;
}

function copiesOf(s: LayerState): number {
  let n = 0;
  s.holders.forEach((h, e) => { for (const i of h) if (!s.orig[e]!.has(i)) n++; });
  return n;
}

function planLayer(cur: number[][], target: number[], isNewDevice: boolean[], w: number[], r: number[], cap: number, slots: number, bound: number,
  warm?: ReadonlyArray<readonly number[]>): number[][] {
  let best: LayerState | undefined;
  let bestKey: number[] = [];
  const consider = (s: LayerState) => {
    const maxLoad = Math.max(...s.load);
    const key = [s.count.some((c) => c > slots) ? 1 : 0, maxLoad > cap + s.eps ? 1 : 0, copiesOf(s), maxLoad];
    if (!best || lexLess(key, bestKey)) { best = s; bestKey = key; }
  };
  // Variants in order; stop at the first that meets the slots and the cap with no more copies than the lower bound.
  for (const v of VARIANTS) {
    consider(runVariant(v, cur, target, isNewDevice, w, r, cap, slots, warm));
    if (bestKey[0] === 0 && bestKey[1] === 0 && bestKey[2]! <= bound) break;
  }
  if (!(bestKey[0] === 0 && bestKey[1] === 0 && bestKey[2]! <= bound)) {
    const scratch = fromScratch(cur, target, isNewDevice, w, r, slots);
    if (scratch) consider(scratch);
  }
  return best!.holders.map((h) => [...h].map((i) => target[i]!).sort((a, b) => a - b));
}

function planContext(opts: {
  current: LayoutSpec; targetDevices: number[]; load?: number[][] | undefined; balance: number; replicateHot: number; slotsPerDevice?: number | undefined;
}) {
  const { layers, experts } = shapeOf(opts.current, 'current');
  const target = checkDevices('targetDevices', opts.targetDevices);
  checkBalance(opts.balance);
  const slots = checkSlots(opts.slotsPerDevice);
  checkLoad(opts.load, layers, experts);
  if (!Number.isSafeInteger(opts.replicateHot) || opts.replicateHot < 0) {
    throw new InvalidArgumentError('replicateHot', `a non-negative integer (got ${String(opts.replicateHot)})`);
  }
  const tp = opts.current.tp;
  if (!Number.isSafeInteger(tp) || tp < 1) throw new InvalidArgumentError('current.tp', `a positive integer (got ${String(tp)})`);
  if (target.length % tp !== 0) {
    throw new InvalidArgumentError('targetDevices', `a multiple of tp = ${tp} devices (got ${target.length}; TP is fixed, add or drop devices)`);
  }
  if (target.length * slots < experts) {
    throw new InvalidArgumentError('targetDevices',
      `at least ${Math.ceil(experts / slots)} devices to hold ${experts} experts in ${slots} slots each (got ${target.length}; add devices or raise slotsPerDevice)`);
  }
  const layerPlan = (l: number) => {
    const w = layerWeights(opts.load, l, experts);
    const r = replicaCounts(w, opts.replicateHot, target.length, slots);
    return { w, r, cap: balanceCap(w, r, target.length, opts.balance, slots) };
  };
  return { layers, experts, target, slots, tp, layerPlan };
}

/**
 * A placement of every expert over `targetDevices` that keeps each device's load
 * within the balance bound where possible and moves as few expert chunks as it
 * can (see the algorithm at the top of this file). Deterministic.
 */
export function planPlacement(options: PlanPlacementOptions): LayoutSpec {
  const balance = options.balance ?? 1.1;
  const ctx = planContext({ ...options, balance, replicateHot: options.replicateHot ?? 0 });
  checkWarm(options.warm, ctx.layers, ctx.experts);
  const old = new Set(options.current.devices);
  const isNew = ctx.target.map((d) => !old.has(d));
  const stay = new Set(ctx.target);
  const retained = options.current.devices.filter((d) => stay.has(d));
  const placement: number[][][] = [];
  // Layers with the same placement and load get the same plan (a pure function of them): with a
  // uniform load every layer of a round-robin layout is one case, planned once (Qwen3-30B-A3B,
  // 48 layers: 2→3 in ~2 ms instead of ~20 ms, median of 20 JIT-warm runs on the development machine).
  const planned = new Map<string, number[][]>();
  for (let l = 0; l < ctx.layers; l++) {
    const { w, r, cap } = ctx.layerPlan(l);
    const row = options.current.placement[l]!;
    const warm = options.warm?.[l];
    const key = JSON.stringify([row, w, r, cap, warm ?? null]);
    let plan = planned.get(key);
    if (!plan) {
      plan = planLayer(row, ctx.target, isNew, w, r, cap, ctx.slots, layerBound(row, stay, retained, w, r, cap, ctx.slots), warm);
      planned.set(key, plan);
    }
    placement.push(plan.map((h) => [...h]));
  }
  return { devices: [...ctx.target], tp: ctx.tp, dp: ctx.target.length / ctx.tp, ep: ctx.target.length, placement };
}

// ---------------------------------------------------------------- plan and bound

/** The difference between two layouts: chunks reused in place, copied (with every current holder as a possible source), released. */
export function diffLayouts(current: LayoutSpec, next: LayoutSpec, sizes: PlanSizes): ScalePlan {
  const a = shapeOf(current, 'current');
  const b = shapeOf(next, 'next');
  if (a.layers !== b.layers || a.experts !== b.experts) {
    throw new InvalidArgumentError('next.placement', `${a.layers} layers of ${a.experts} experts like the current layout (got ${b.layers} × ${b.experts})`);
  }
  checkSizes(sizes);
  const { expertBytes, denseBytes } = sizes;
  const reuse: ChunkRef[] = [];
  const copy: ExpertCopy[] = [];
  const release: ChunkRef[] = [];
  const curDevices = new Set(current.devices);
  const nextDevices = new Set(next.devices);
  const sortedCur = [...current.devices].sort((x, y) => x - y);
  const denseCopies: DenseCopy[] = [];
  for (const d of [...next.devices].sort((x, y) => x - y)) {
    if (curDevices.has(d)) reuse.push({ kind: 'dense', group: 'dense', device: d, bytes: denseBytes });
    else denseCopies.push({ target: d, sources: [...sortedCur], bytes: denseBytes });
  }
  for (const d of sortedCur) if (!nextDevices.has(d)) release.push({ kind: 'dense', group: 'dense', device: d, bytes: denseBytes });
  for (let l = 0; l < a.layers; l++) {
    for (let e = 0; e < a.experts; e++) {
      const group = expertGroup(l, e);
      const was = [...new Set(current.placement[l]![e]!)].sort((x, y) => x - y);
      const now = [...new Set(next.placement[l]![e]!)].sort((x, y) => x - y);
      const wasSet = new Set(was);
      const nowSet = new Set(now);
      for (const d of now) {
        if (wasSet.has(d)) reuse.push({ kind: 'expert', group, device: d, bytes: expertBytes, layer: l, expert: e });
        else copy.push({ group, layer: l, expert: e, bytes: expertBytes, sources: [...was], target: d });
      }
      for (const d of was) if (!nowSet.has(d)) release.push({ kind: 'expert', group, device: d, bytes: expertBytes, layer: l, expert: e });
    }
  }
  const expertBytesMoved = copy.length * expertBytes;
  const denseBytesMoved = denseCopies.length * denseBytes;
  return {
    from: [...current.devices], to: [...next.devices], reuse, copy, release, denseCopies,
    bytesMoved: expertBytesMoved + denseBytesMoved, expertBytesMoved, denseBytesMoved,
  };
}

export interface LowerBoundOptions {
  load?: number[][];
  replicateHot?: number;
  slotsPerDevice?: number;
}

/**
 * A lower bound on the bytes any plan from `current` to `targetDevices` must move
 * while meeting the planner's balance cap (see the top of this file): dense weights
 * for each new device plus, per layer, the expert chunks that cannot stay.
 */
export function lowerBoundBytes(current: LayoutSpec, targetDevices: number[], sizes: PlanSizes, balance = 1.1, options: LowerBoundOptions = {}): number {
  checkSizes(sizes);
  const ctx = planContext({ current, targetDevices, load: options.load, balance, replicateHot: options.replicateHot ?? 0, slotsPerDevice: options.slotsPerDevice });
  const stay = new Set(ctx.target);
  const curSet = new Set(current.devices);
  const retained = current.devices.filter((d) => stay.has(d));
  const newDevices = ctx.target.filter((d) => !curSet.has(d)).length;
  let copies = 0;
  for (let l = 0; l < ctx.layers; l++) {
    const { w, r, cap } = ctx.layerPlan(l);
    copies += layerBound(current.placement[l]!, stay, retained, w, r, cap, ctx.slots);
  }
  return copies * sizes.expertBytes + newDevices * sizes.denseBytes;
}

/** Per layer: the fewest expert chunks any plan meeting the cap must copy (see the top of this file). */
function layerBound(row: number[][], stay: ReadonlySet<number>, retained: readonly number[], w: number[], r: number[], cap: number, slots: number): number {
  const experts = w.length;
  const eps = epsilonOf(w);
  let orphans = 0;
  let keepable = 0; // instances that could stay: per expert, min(retained holders, wanted instances)
  const onRetained = new Map<number, number[]>(retained.map((d) => [d, []]));
  for (let e = 0; e < experts; e++) {
    const kept = [...new Set(row[e]!)].filter((d) => stay.has(d));
    if (kept.length === 0) orphans++;
    keepable += Math.min(kept.length, r[e]!);
    for (const d of kept) onRetained.get(d)!.push(e);
  }
  const instances = r.reduce((x, y) => x + y, 0);
  let slotKeep = 0;
  for (const list of onRetained.values()) slotKeep += Math.min(list.length, slots);
  let bound = Math.max(orphans, instances - keepable, instances - slotKeep);
  if (r.every((k) => k === 1)) {
    // (b) each remaining device keeps at most its smallest experts that fit under the cap.
    let keepUpper = 0;
    for (const list of onRetained.values()) {
      const sorted = list.map((e) => w[e]!).sort((x, y) => x - y);
      let sum = 0;
      let k = 0;
      while (k < sorted.length && k < slots && sum + sorted[k]! <= cap + eps) sum += sorted[k++]!;
      keepUpper += k;
    }
    bound = Math.max(bound, experts - keepUpper);
    // (c) the load the remaining devices cannot carry lands on new devices, in the fewest (heaviest) experts.
    const total = w.reduce((x, y) => x + y, 0);
    const need = total - retained.length * cap;
    if (need > eps) {
      const desc = [...w].sort((x, y) => y - x);
      let sum = 0;
      let k = 0;
      while (k < desc.length && sum < need - eps) sum += desc[k++]!;
      bound = Math.max(bound, k);
    }
  }
  return bound;
}

export function planEfficiency(plan: ScalePlan, bound: number): PlanEfficiency {
  const moved = plan.bytesMoved;
  return {
    bytesMoved: moved,
    lowerBound: bound,
    ratio: bound === 0 ? (moved === 0 ? 1 : Infinity) : moved / bound,
    efficiency: moved === 0 ? 1 : bound / moved,
  };
}

// ---------------------------------------------------------------- transfer schedule

interface Job {
  order: number;
  group: string;
  sourceId: (d: number) => string;
  targetId: string;
  bytes: number;
  candidates: number[];
  target: number;
  maxSources: number;
  sortKey: number[];
}

/**
 * Transfers for CopyService.copy: every expert copy of the plan once (and every dense
 * chunk of each new device when `denseChunkSizes` is given), each striped across up
 * to `maxSourcesPerTransfer` holders. Greedy: copies with the fewest possible sources
 * first, larger first; each takes the holders that have sent the fewest bytes so far
 * (then those that sent the least to this target, then device order), the least
 * loaded as primary with the largest stripe. So a device already sending a lot is
 * not picked while another holder sent less, and a new device's intake comes from
 * every holder that can give it. Output order: by target, dense first, then layer
 * and expert.
 */
export function scheduleTransfers(plan: ScalePlan, options: ScheduleOptions = {}): ScheduledTransfer[] {
  const maxSources = options.maxSourcesPerTransfer ?? 2;
  const maxDense = options.maxDenseSourcesPerTransfer ?? Infinity;
  const alignment = options.stripeAlignment ?? 2 * MIB;
  if (!Number.isSafeInteger(maxSources) || maxSources < 1) throw new InvalidArgumentError('maxSourcesPerTransfer', `a positive integer (got ${String(maxSources)})`);
  if (maxDense !== Infinity && (!Number.isSafeInteger(maxDense) || maxDense < 1)) {
    throw new InvalidArgumentError('maxDenseSourcesPerTransfer', `a positive integer (got ${String(maxDense)})`);
  }
  if (!Number.isSafeInteger(alignment) || alignment < 1) throw new InvalidArgumentError('stripeAlignment', `a positive integer (got ${String(alignment)})`);
  const jobs: Job[] = [];
  let order = 0;
  if (options.denseChunkSizes) {
    for (const dc of plan.denseCopies) {
      options.denseChunkSizes.forEach((bytes, i) => {
        jobs.push({
          order: order++, group: 'dense', sourceId: (d) => `dense@${d}#${i}`, targetId: `dense@${dc.target}#${i}`, bytes,
          candidates: dc.sources.filter((d) => d !== dc.target), target: dc.target, maxSources: maxDense, sortKey: [dc.target, 0, 0, i],
        });
      });
    }
  }
  for (const c of plan.copy) {
    jobs.push({
      order: order++, group: c.group, sourceId: (d) => `${c.group}@${d}`, targetId: `${c.group}@${c.target}`, bytes: c.bytes,
      candidates: c.sources.filter((d) => d !== c.target), target: c.target, maxSources, sortKey: [c.target, 1, c.layer, c.expert],
    });
  }
  for (const j of jobs) {
    if (j.candidates.length === 0) throw new InvalidArgumentError('plan.copy', `copies with a source other than the target (${j.targetId} has none)`);
  }
  const sent = new Map<number, number>();
  const sentTo = new Map<string, number>();
  const sentBy = (d: number) => sent.get(d) ?? 0;
  const sentByTo = (d: number, t: number) => sentTo.get(`${d}>${t}`) ?? 0;
  const processing = [...jobs].sort((x, y) => x.candidates.length - y.candidates.length || y.bytes - x.bytes || x.order - y.order);
  const result = new Map<Job, ScheduledTransfer>();
  for (const j of processing) {
    const k = Math.min(j.maxSources, j.candidates.length);
    const cuts = j.bytes > 0 ? stripes(j.bytes, k, alignment) : [{ sourceIndex: 0, offset: 0, bytes: 0 }];
    const chosen = [...j.candidates]
      .sort((a, b) => sentBy(a) - sentBy(b) || sentByTo(a, j.target) - sentByTo(b, j.target) || a - b)
      .slice(0, cuts.length);
    cuts.forEach((c, i) => {
      const d = chosen[i]!;
      sent.set(d, sentBy(d) + c.bytes);
      sentTo.set(`${d}>${j.target}`, sentByTo(d, j.target) + c.bytes);
    });
    const t: ScheduledTransfer = {
      sourceId: j.sourceId(chosen[0]!), targetDevice: j.target, targetId: j.targetId, group: j.group, bytes: j.bytes,
      sourceDevices: chosen, stripeBytes: cuts.map((c) => c.bytes),
    };
    if (chosen.length > 1) t.extraSourceIds = chosen.slice(1).map((d) => j.sourceId(d));
    result.set(j, t);
  }
  return [...jobs]
    .sort((x, y) => (lexLess(x.sortKey, y.sortKey) ? -1 : lexLess(y.sortKey, x.sortKey) ? 1 : x.order - y.order))
    .map((j) => result.get(j)!);
}

/** Bytes each device sends and receives under a schedule. */
export function transferSummary(transfers: readonly ScheduledTransfer[]): { sent: Map<number, number>; received: Map<number, number> } {
  const sent = new Map<number, number>();
  const received = new Map<number, number>();
  for (const t of transfers) {
    t.sourceDevices.forEach((d, i) => sent.set(d, (sent.get(d) ?? 0) + t.stripeBytes[i]!));
    received.set(t.targetDevice, (received.get(t.targetDevice) ?? 0) + t.bytes);
  }
  return { sent, received };
}
