// The work a deployment does ahead of its next scale, in the background after each scale:
// the plans of the scales by one device, kept per layout (ScalePlans), and the standby chunks
// those plans allocate, made on each device and filled with what they copy (syncStandby).
// The orchestrator starts and stops it; the pure planning is planner.ts's.
import type { ChunkStore } from '../hmm/chunk-store.js';
import { kvPoolLayout } from '../hmm/kv-pool.js';
import { expertGroup } from '../model/weights.js';
import type { Runtime } from '../runtime/runtime.js';
import { type LayoutLimits, type LayoutSpec, validateLayout } from './layout.js';
import { type PlanSizes, diffLayouts, lowerBoundBytes, planPlacement, scheduleTransfers } from './planner.js';

/** A scale's plan: the new layout, what is reused, copied and released, the bytes bound and the copies. */
export interface ScalePlan {
  next: LayoutSpec;
  plan: ReturnType<typeof diffLayouts>;
  lower: number;
  transfers: ReturnType<typeof scheduleTransfers>;
  denseChunkSizes: number[];
}

/** Spare chunks created per synchronous group (the loop gets a turn between groups). */
const SPARE_GROUP = 8;
/** Spare chunks made per worker-thread call with offThread (stopped() is checked between calls: a scale waits for at most one, ~5 ms with access for 4 devices). */
const SPARE_GROUP_OFF_THREAD = 32;

/** Standby chunks filled per group (prefillStandby): one wait for their copies, then a turn of the loop. */
export const PREFILL_GROUP = 32;

const turn = () => new Promise<void>((r) => setImmediate(r));

/** Scale plans from the current layout; the uniform-load ones are kept until the layout changes. */
export class ScalePlans {
  private readonly kept = new Map<string, ScalePlan>();

  constructor(private readonly store: ChunkStore, private readonly limits: () => LayoutLimits,
    private readonly options: { balance: number; maxSourcesPerTransfer: number; stripeAlignment: number }) {}

  /** Whether the uniform plan from `layoutId` to `to` is kept (made ahead). */
  has(layoutId: string, to: readonly number[]): boolean {
    return this.kept.has(`${layoutId}|${to.join(',')}`);
  }

  /** The plan of a scale from `current` (id `layoutId`) to `to` with `load` (uniform when undefined). */
  planFor(current: LayoutSpec, layoutId: string, to: number[], load: number[][] | undefined): ScalePlan {
    const run = this.stages(current, layoutId, to, load);
    for (let r = run.next(); ; r = run.next()) if (r.done) return r.value;
  }

  /**
   * planFor in the background (the uniform-load plan, kept): a turn of the event loop between its
   * stages (placement, sizes, diff, bound, schedule: each 1-20 ms of host time on Qwen3-30B-A3B
   * shapes on the development machine's CPU), so that an engine serving in this process launches
   * its steps in between.
   */
  async planAhead(current: LayoutSpec, layoutId: string, to: number[]): Promise<ScalePlan> {
    const run = this.stages(current, layoutId, to, undefined);
    for (let r = run.next(); ; r = run.next()) {
      if (r.done) return r.value;
      await turn();
    }
  }

  /** planFor's stages, yielding between them. */
  private *stages(current: LayoutSpec, layoutId: string, to: number[], load: number[][] | undefined): Generator<void, ScalePlan> {
    const key = `${layoutId}|${to.join(',')}`;
    const kept = load ? undefined : this.kept.get(key);
    if (kept) return kept;
    const { balance } = this.options;
    const warm = this.warm(current, to);
    const next = planPlacement({ current, targetDevices: to, balance, ...(load ? { load } : {}), ...(warm ? { warm } : {}) });
    validateLayout(next, this.limits());
    yield;
    const { sizes, denseChunkSizes } = this.sizes(current, layoutId);
    yield;
    const plan = diffLayouts(current, next, sizes);
    yield;
    const lower = lowerBoundBytes(current, to, sizes, balance, load ? { load } : {});
    yield;
    const transfers = scheduleTransfers(plan, {
      denseChunkSizes, maxSourcesPerTransfer: this.options.maxSourcesPerTransfer, stripeAlignment: this.options.stripeAlignment,
    });
    const made: ScalePlan = { next, plan, lower, transfers, denseChunkSizes };
    if (!load) {
      // Plans of an earlier layout are no use any more.
      for (const k of [...this.kept.keys()]) if (!k.startsWith(`${layoutId}|`)) this.kept.delete(k);
      this.kept.set(key, made);
    }
    return made;
  }

  /**
   * The experts each target device holds warm: standby chunks filled with an expert's bytes (kept
   * from an earlier layout, `${group}@${device}`) on a device of `to` that does not hold it now.
   * Undefined when there are none.
   */
  private warm(current: LayoutSpec, to: readonly number[]): number[][][] | undefined {
    let any = false;
    const warm = current.placement.map((row, l) => row.map((holders, e) => {
      const ds = to.filter((d) => !holders.includes(d) && this.store.filledRange(`${expertGroup(l, e)}@${d}`, d) !== undefined);
      if (ds.length > 0) any = true;
      return ds;
    }));
    return any ? warm : undefined;
  }

  /** Chunk sizes for the planner, from the chunks of the current layout. */
  private sizes(current: LayoutSpec, layoutId: string): { sizes: PlanSizes; denseChunkSizes: number[] } {
    const d0 = current.devices[0]!;
    const dense = this.store.all()
      .filter((c) => c.plan.group === 'dense' && c.plan.device === d0 && c.holders.has(layoutId))
      .sort((a, b) => a.plan.id.localeCompare(b.plan.id, 'en', { numeric: true }));
    const expertHolder = current.placement[0]![0]![0]!;
    const expertBytes = this.store.get(`${expertGroup(0, 0)}@${expertHolder}`).plan.size;
    const denseChunkSizes = dense.map((c) => c.plan.size);
    return { sizes: { expertBytes, denseBytes: denseChunkSizes.reduce((a, b) => a + b, 0) }, denseChunkSizes };
  }
}

/** What syncStandby keeps: its switches and the KV pool geometry of a joining device. */
export interface StandbyOptions {
  /** Standby chunks on the devices outside the layout (DeploymentOptions.standbyChunks). */
  standby: boolean;
  /** Filled with the planned scale-up's bytes (DeploymentOptions.prefillStandby). */
  prefill: boolean;
  /** The layout's devices also keep what a scale-down onto them copies (DeploymentOptions.scaleDownSpares). */
  scaleDownSpares: boolean;
  /** Standby chunks made on a worker thread (DeploymentOptions.prepare.offThread). */
  offThread: boolean;
  kvBlockBytes: number;
  kvBlocks: number;
}

/** The targets of the scales by one device down from `devices`. */
const scaleDowns = (devices: readonly number[]) => (devices.length > 1 ? devices.map((d) => devices.filter((x) => x !== d)) : []);

/**
 * Plans every scale-down by one device from `layout` ahead (ScalePlans keeps them), a turn of the
 * loop between stages; best effort, as syncStandby. syncStandby made them already with scaleDownSpares.
 */
export async function planScaleDowns(plans: ScalePlans, layout: LayoutSpec, layoutId: string, stopped: () => boolean,
  onError: (e: unknown) => void): Promise<void> {
  for (const to of scaleDowns(layout.devices)) {
    if (stopped()) return;
    try {
      await plans.planAhead(layout, layoutId, to);
    } catch (e) {
      onError(e);
    }
  }
}

/**
 * Chunk sizes and counts a scale allocates on `device`: the chunks the plan copies into it and,
 * for a device joining (`kvPool`), its KV pool.
 */
function intake(store: ChunkStore, rt: Runtime, o: StandbyOptions, device: number, planned: ScalePlan, kvPool: boolean): Map<number, number> {
  const out = new Map<number, number>();
  const add = (size: number) => out.set(size, (out.get(size) ?? 0) + 1);
  if (kvPool) for (const size of kvPoolLayout({ device, blockBytes: o.kvBlockBytes, blocks: o.kvBlocks }, rt.granularity(device)).sizes) add(size);
  for (const t of planned.transfers) if (t.targetDevice === device) add(store.get(t.sourceId).plan.size);
  return out;
}

/**
 * Plans every scale-up by one device from `layout` (each device of the node added, and with
 * scaleDownSpares each device of the layout removed; a turn of the loop between plans and their
 * stages), then brings every device's standby
 * chunks to what those plans allocate there (none on the layout's devices unless
 * scaleDownSpares; freed and created in groups with a turn in between), then fills each idle
 * device's with what the plan adding it copies. Best effort: a target no scale could reach, a
 * device short of memory or a failed fill is reported to `onError` and the rest goes on.
 * Returns early, between groups, once `stopped()` says so.
 */
export async function syncStandby(store: ChunkStore, rt: Runtime, plans: ScalePlans, layout: LayoutSpec, layoutId: string,
  o: StandbyOptions, stopped: () => boolean, onError: (e: unknown) => void): Promise<void> {
  const node = Array.from({ length: rt.deviceCount }, (_, d) => d);
  const devices = layout.devices;
  const want = new Map<number, Map<number, number>>(node.map((d) => [d, new Map()]));
  const targets = [
    ...node.filter((d) => !devices.includes(d)).map((d) => ({ to: [...devices, d], joining: d as number | undefined })),
    // The scale-downs' plans are needed here only for their standby chunks; else planScaleDowns makes them later.
    ...(o.scaleDownSpares ? scaleDowns(devices).map((to) => ({ to, joining: undefined })) : []),
  ];
  const fills: Array<{ device: number; planned: ScalePlan }> = [];
  /** The chunk ids each joining device's plan copies there: standby chunks holding them are the last trimmed. */
  const wantedIds = new Map<number, Set<string>>();
  for (const { to, joining } of targets) {
    // Never inside the call that starts it (a scale's end): what ran just before settles first.
    await turn();
    if (stopped()) return;
    try {
      const planned = await plans.planAhead(layout, layoutId, to);
      if (stopped()) return;
      if (joining !== undefined && o.standby) {
        want.set(joining, intake(store, rt, o, joining, planned, true));
        wantedIds.set(joining, new Set(planned.transfers.filter((t) => t.targetDevice === joining).map((t) => t.targetId)));
        if (o.prefill) fills.push({ device: joining, planned });
      }
      // A scale-down: each staying device keeps the most any single removal copies onto it.
      if (joining === undefined && o.standby && o.scaleDownSpares) {
        for (const d of to) {
          const mine = want.get(d)!;
          for (const [size, n] of intake(store, rt, o, d, planned, false)) mine.set(size, Math.max(mine.get(size) ?? 0, n));
          // The standby chunks can hold one removal's copies: those of the device that joined last
          // (the last of the layout), likeliest to leave first, are the ones kept when trimming.
          if (!to.includes(devices[devices.length - 1]!)) {
            wantedIds.set(d, new Set(planned.transfers.filter((t) => t.targetDevice === d).map((t) => t.targetId)));
          }
        }
      }
    } catch (e) {
      // A target no scale could reach (a device without peer access to the layout's, say): the
      // others are still planned and their devices still get standby chunks.
      onError(e);
    }
  }
  // Free first (spares left on devices that joined the layout, sizes or counts no longer wanted), then create.
  for (const d of node) {
    for (const [size, have] of store.spareSizes(d)) {
      const keep = want.get(d)!.get(size) ?? 0;
      for (let n = have; n > keep; n -= SPARE_GROUP) {
        if (stopped()) return;
        store.trimSpares(d, Math.max(keep, n - SPARE_GROUP), size, wantedIds.get(d));
        await turn();
      }
    }
  }
  // Best effort per device: one that lacks the memory keeps what it got, the others still get theirs.
  for (const d of node) {
    try {
      for (const [size, count] of want.get(d)!) {
        for (let have = store.spareCount(d, size); have < count; have = store.spareCount(d, size)) {
          if (stopped()) return;
          if (o.offThread) {
            await store.addSparesOffThread(d, size, Math.min(SPARE_GROUP_OFF_THREAD, count - have), node, { group: SPARE_GROUP_OFF_THREAD });
          } else {
            store.addSpares(d, size, Math.min(SPARE_GROUP, count - have), node);
            await turn();
          }
        }
      }
    } catch (e) {
      onError(e);
    }
  }
  // Then the fills: each joining device's planned copies, into its standby chunks.
  for (const { device, planned } of fills) {
    const mine = planned.transfers.filter((t) => t.targetDevice === device);
    // What the device's spares held for an earlier layout's plan is overwritten where this one wants other chunks.
    const keep = new Set(mine.map((t) => t.targetId));
    try {
      for (let i = 0; i < mine.length; i += PREFILL_GROUP) {
        if (stopped()) return;
        await store.fillSpares(device, mine.slice(i, i + PREFILL_GROUP).map((t) => ({ id: t.targetId, source: store.get(t.sourceId) })), keep);
        await turn();
      }
    } catch (e) {
      onError(e);
    }
  }
}
