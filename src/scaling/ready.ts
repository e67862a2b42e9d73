// Standby engines made ahead (DeploymentOptions.standbyEngines): for a planned scale-up onto an idle
// device whose standby chunks hold the bytes that scale copies (prefillStandby), the device's KV
// pool, its mapping, and the new layout's forward engine — reading the serving layout's chunks and
// the filled standby chunks in place — with the serving engine's recent graph shapes captured. The
// scale-up then adopts the chunks (the same mappings: the engine's pointers stay valid) and
// switches over; the host work of the attach phase is done before the command, not during it.
import { targetPlan } from '../hmm/copy-service.js';
import type { Hmm } from '../hmm/hmm.js';
import type { TensorLocation } from '../hmm/placement.js';
import type { ForwardEngine, GraphShape } from '../executor/forward.js';
import { type MappedKvPool, mapHmmKvPools } from '../executor/kv-view.js';
import type { WeightSource } from '../executor/types.js';
import { NotFoundError } from '../runtime/errors.js';
import type { DevicePointer, VirtualRange } from '../runtime/memory.js';
import type { ScalePlan } from './ahead.js';
import { runEach, runEachAsync } from '../runtime/cleanup.js';
import type { LayoutSpec } from './layout.js';

/** A scale-up's standby, made ahead: what the scale takes instead of making it. */
export interface ReadyStandby {
  /** The layout it was made from (its id) and the scale's target. */
  fromId: string;
  to: number[];
  /** The device the scale adds (its KV pool and mapping are made ahead too). */
  device: number;
  /** The kept plan it was made for (ScalePlans): a scale with another plan cannot use it. */
  planned: ScalePlan;
  engine: ForwardEngine;
  /** The KV pool mapping of `device` (the other devices' are the serving layout's). */
  views: Map<number, MappedKvPool>;
  /** The mapping of each filled standby chunk the engine reads, by chunk id: adoption must register these very ones. */
  ranges: Map<string, VirtualRange>;
  /** Graphs captured ahead (at its making, then following the serving engine's shapes), and the making's wall time (ms). */
  precaptured: number;
  ms: number;
  /** Wall time of the captures that followed the serving engine's shapes (ms). */
  followMs: number;
}

/** What making a standby needs from the deployment. */
export interface ReadyInputs {
  hmm: Hmm;
  /** The serving layout's id. */
  layoutId: string;
  /** The serving layout's KV mappings, by device. */
  views: ReadonlyMap<number, MappedKvPool>;
  kvPool: { blockBytes: number; blocks: number };
  /** A forward engine for `next` over these weights and KV mappings (the deployment's options). */
  create(next: LayoutSpec, weights: WeightSource, views: ReadonlyMap<number, MappedKvPool>): Promise<ForwardEngine>;
  /** The shapes to capture ahead (the serving engine's recent ones, renumbered to `next`'s ranks). */
  shapes(next: LayoutSpec): GraphShape[];
  /** True once a scale wants to start: the captures stop between shapes (the scale captures the rest). */
  stopped(): boolean;
}

/**
 * The mappings of the filled standby chunks a standby made ahead for `planned` onto `device` would
 * read, by chunk id; undefined when none can be made: the plan must copy into `device` only (a
 * scale-up by that one device), and every target must be in a filled standby chunk of it.
 */
function readyRanges(hmm: Hmm, planned: ScalePlan, device: number): Map<string, VirtualRange> | undefined {
  const ranges = new Map<string, VirtualRange>();
  for (const t of planned.transfers) {
    const range = t.targetDevice === device ? hmm.store.filledRange(t.targetId, device) : undefined;
    if (!range) return undefined;
    ranges.set(t.targetId, range);
  }
  return ranges;
}

/**
 * Makes the standby of the planned scale-up from the serving layout to `planned.next` (adding `device`):
 * `device`'s KV pool (from its standby chunks) and mapping, then the engine, then the graphs
 * captured ahead (best effort: a failed capture leaves the shape to be captured at scale time).
 * Undefined, with nothing left behind, when readyRanges says it cannot; on failure everything it
 * made is freed before it rethrows.
 */
export async function makeReadyStandby(inputs: ReadyInputs, planned: ScalePlan, device: number): Promise<ReadyStandby | undefined> {
  const t0 = performance.now();
  const { hmm } = inputs;
  const ranges = readyRanges(hmm, planned, device);
  if (!ranges) return undefined;
  const next = planned.next;
  // The joining device's tensors: in the filled standby chunks, at the offsets the plan's chunks give them.
  const joining = new Map<string, DevicePointer>();
  for (const t of planned.transfers) {
    const plan = targetPlan(hmm.store.get(t.sourceId).plan, device, t.targetId);
    const range = ranges.get(t.targetId)!;
    for (const loc of plan.tensors as TensorLocation[]) joining.set(loc.name, range.at(loc.offset));
  }
  const weights: WeightSource = {
    tensor: (name, d) => {
      if (d !== device) return hmm.store.tensor(name, d).ptr;
      const ptr = joining.get(name);
      if (ptr === undefined) throw new NotFoundError('NOT_FOUND', `tensor '${name}' is not among the planned copies onto device ${device} (standby engine made ahead)`);
      return ptr;
    },
  };
  let views: Map<number, MappedKvPool> | undefined;
  let engine: ForwardEngine | undefined;
  hmm.kv.createPool({ device, blockBytes: inputs.kvPool.blockBytes, blocks: inputs.kvPool.blocks });
  try {
    views = mapHmmKvPools(hmm.store.rt, hmm, [device]);
    engine = await inputs.create(next, weights, new Map([...inputs.views, ...views]));
    const precaptured = await captureMissing(engine, inputs.shapes(next), inputs.stopped);
    return { fromId: inputs.layoutId, to: [...next.devices], device, planned, engine, views, ranges, precaptured, ms: performance.now() - t0, followMs: 0 };
  } catch (e) {
    // Each freed whatever the others do (the cause is what the caller sees).
    try {
      runEach([() => engine?.dispose(), ...[...views?.values() ?? []].map((v) => () => v.dispose()), () => hmm.kv.destroyPool(device)]);
    } catch {
      // Best effort: the store tries a refused free again later.
    }
    throw e;
  }
}

/**
 * Captures on `engine` the shapes it has no graph for, one at a time (ForwardEngine.precapture: a
 * turn of the loop every 2 layers), until `stopped()`; best effort (a failed capture ends it: the
 * scale captures what is missing). Resolves with the number captured.
 */
export async function captureMissing(engine: ForwardEngine, shapes: readonly GraphShape[], stopped: () => boolean): Promise<number> {
  let made = 0;
  try {
    for (const shape of shapes) {
      if (stopped()) break;
      made += await engine.precapture([shape]);
    }
  } catch {
    // Best effort, as above.
  }
  return made;
}

/**
 * Frees a standby made ahead that no scale took: its engine (in pieces, a turn of the loop
 * between them), then its KV mapping and pool. `keepPool`: the pool and mapping were taken by a
 * scale (they serve any layout with that device), only the engine goes.
 */
export async function disposeReady(hmm: Hmm, r: ReadyStandby, keepPool = false): Promise<void> {
  await runEachAsync([
    () => r.engine.disposeAsync(),
    ...(keepPool ? [] : [...[...r.views.values()].map((v) => () => v.dispose()), () => hmm.kv.destroyPool(r.device)]),
  ]);
}
