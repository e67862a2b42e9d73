// The standby executor process made ahead (executor processes; ExecutorMode process.initAhead):
// for the planned scale-up onto an idle device whose standby chunks hold that scale's bytes
// (prefillStandby), the filled standby chunks are adopted ahead as the scale's target chunks,
// held by a holder of their own (so the HMM daemon can hand them to a process), and the process
// started ahead is initialised for the planned layout: it attaches, builds its engine and
// captures its graphs before the command. The scale-up then keeps the adopted chunks for its
// layout and switches over (orchestrator.ts). The store side is here; the process side is the
// orchestrator's.
import type { ChunkStore } from '../hmm/chunk-store.js';
import { targetPlan } from '../hmm/copy-service.js';
import type { RemoteStepper } from '../executor/remote.js';
import type { ScalePlan } from './ahead.js';

export interface ReadyProcess {
  /** The layout it was made from (its id), the planned scale's target and the device it adds. */
  fromId: string;
  to: number[];
  device: number;
  /** The kept plan it was made for (ScalePlans): a scale with another plan cannot use it as it is. */
  planned: ScalePlan;
  /** The executor process, initialised for planned.next (no step yet: it can be initialised again). */
  stepper: RemoteStepper;
  /** The target chunks adopted ahead (ids), held by `holder`. */
  holder: string;
  adopted: string[];
  /** Wall time of its making (ms). */
  ms: number;
  /** The graph shapes sent to it to capture (graphShapeKey), at init and following the serving shapes since. */
  sent: Set<string>;
  /** Graphs it captured following the serving shapes, and the wall time of those captures (ms). */
  followed: number;
  followMs: number;
}

/** A graph shape as a key (rank, tokens, sequences, block-table stride, sampled). */
export const graphShapeKey = (g: { rank: number; T: number; S: number; MB: number; sampled: number }) => `${g.rank}:${g.T}:${g.S}:${g.MB}:${g.sampled}`;

/** The holder of the chunks adopted ahead for the scale from `layoutId` adding `device`. */
export const aheadHolder = (layoutId: string, device: number) => `ahead:${layoutId}:${device}`;

/**
 * Adopts, for `holder`, the filled standby chunks of `device` as the target chunks of every copy
 * `planned` makes (ChunkStore.adoptFilled: the same chunks and mappings, registered under their
 * ids). Undefined, with nothing taken, unless the plan copies into `device` only and each of its
 * targets is in a filled standby chunk there.
 */
export function adoptAhead(store: ChunkStore, planned: ScalePlan, device: number, holder: string): string[] | undefined {
  if (planned.transfers.some((t) => t.targetDevice !== device || !store.filledRange(t.targetId, device))) return undefined;
  const adopted: string[] = [];
  for (const t of planned.transfers) {
    const sources = [t.sourceId, ...(t.extraSourceIds ?? [])].map((id) => store.get(id));
    const c = store.adoptFilled(targetPlan(sources[0]!.plan, device, t.targetId), holder, [device]);
    if (!c) {
      unadopt(store, adopted, holder);
      return undefined;
    }
    adopted.push(c.plan.id);
  }
  return adopted;
}

/**
 * Gives back what adoptAhead took: each chunk `holder` alone holds becomes a standby chunk again,
 * filled as its id (ChunkStore.release asSpare); one something else holds too (a scale's layout)
 * just loses `holder`. Returns the number given back as standby chunks.
 */
export function unadopt(store: ChunkStore, ids: readonly string[], holder: string): number {
  let spares = 0;
  for (const id of ids) {
    if (!store.has(id)) continue;
    const c = store.get(id);
    if (!c.holders.has(holder)) continue;
    if (store.release(id, holder, { asSpare: c.holders.size === 1 })) spares++;
  }
  return spares;
}
