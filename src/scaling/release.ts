// What follows a switch-over, off the path to the first token: the old layout's chunks released
// (or kept as standby chunks where the policy says so) and the new layout's chunks granted access
// from every device. Both work in groups with a turn of the event loop between them, so the
// serving engine keeps stepping.
import type { ChunkStore, StoredChunk } from '../hmm/chunk-store.js';

/** Chunks released or granted access per synchronous group (the loop gets a turn between groups). */
export const RELEASE_GROUP = 64;

const turn = () => new Promise<void>((r) => setImmediate(r));

export interface ReleaseFigures {
  /** Chunks freed. */
  released: number;
  /** Chunks kept as standby chunks (their holder gone, their bytes still there). */
  kept: number;
  /** Host time in the groups, the longest group, and how many there were. */
  ms: number;
  maxBlockMs: number;
  groups: number;
  /** Chunks whose free the driver refused ("id: error"; the store tries them again at its next free). */
  errors: string[];
}

/**
 * Lets go of every chunk `holder` holds. A chunk `keepAsSpare` picks, held by `holder` alone, stays
 * as a standby chunk, first given access from every device of `node` (what standby chunks have: a
 * later scale copies into it from any); one that cannot be given access is freed instead.
 * `turnFirst`: a turn of the loop before the first group too (after other blocking work).
 */
export async function releaseHolder(store: ChunkStore, holder: string, options: {
  keepAsSpare: (c: StoredChunk) => boolean; node: number[]; turnFirst?: boolean;
}): Promise<ReleaseFigures> {
  const figures: ReleaseFigures = { released: 0, kept: 0, ms: 0, maxBlockMs: 0, groups: 0, errors: [] };
  const held = store.all().filter((c) => c.holders.has(holder));
  for (let i = 0; i < held.length; i += RELEASE_GROUP) {
    if (i > 0 || options.turnFirst) await turn();
    const t = performance.now();
    for (const c of held.slice(i, i + RELEASE_GROUP)) {
      let asSpare = options.keepAsSpare(c) && c.holders.size === 1;
      if (asSpare) {
        try {
          store.grantAccess(c.plan.id, options.node);
        } catch {
          asSpare = false; // freed instead: a standby chunk made later gets its access
        }
      }
      try {
        if (!store.release(c.plan.id, holder, { asSpare })) continue;
      } catch (e) {
        // Best effort: the rest are released all the same.
        figures.errors.push(`${c.plan.id}: ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`);
        continue;
      }
      if (asSpare) figures.kept++;
      else figures.released++;
    }
    const ms = performance.now() - t;
    figures.ms += ms;
    figures.maxBlockMs = Math.max(figures.maxBlockMs, ms);
    figures.groups++;
  }
  return figures;
}

/**
 * Grants every device of `node` access to the weight chunks `holder` holds that lack it (a scale's
 * pulled copies, mapped for their own device only). Best effort: a chunk left without access for
 * some device keeps its access set, and a later copy from it is pushed by its own device instead
 * of pulled (pacing.ts).
 */
export async function grantNodeAccess(store: ChunkStore, holder: string, node: number[]): Promise<void> {
  const ids = store.all().filter((c) => c.plan.kind === 'weight' && c.holders.has(holder) && c.access.size < node.length).map((c) => c.plan.id);
  for (let i = 0; i < ids.length; i += RELEASE_GROUP) {
    await turn();
    for (const id of ids.slice(i, i + RELEASE_GROUP)) {
      try {
        if (store.has(id)) store.grantAccess(id, node);
      } catch {
        // Best effort (above).
      }
    }
  }
}
