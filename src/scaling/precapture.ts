// Which of the serving engine's graph shapes a scale's standby engine captures ahead
// (ForwardEngine.precapture), as a pure function: the sequences of a device that stays keep
// their rank's batch across the switch-over, so that device's recent shapes are the likeliest
// first steps of its new rank. A decode shape (one token per sequence, T = S) comes first: the
// new devices take the waiting requests' prompts, the staying ones go on decoding.
import { type GraphShape, STEP_BUCKET_LIST, stepBucket } from '../executor/forward.js';

/**
 * Shapes per staying device a scale's standby captures ahead unless told (DeploymentOptions.precaptureGraphs).
 * 3 against 1, two same-machine runs (4 x H200, tensor-core experts, 2026-11-26): serving work during
 * 3->4 0.96-0.98 against 0.63-0.91, 2->3 0.81-0.86 against 0.70-0.76, scale-ups 60-180 ms longer.
 */
export const DEFAULT_PRECAPTURE_GRAPHS = 3;

/**
 * Up to `perDevice` shapes for each device of `devices` that has any in `recent` (most recently
 * used first, each with its device), renumbered to the device's rank in `devices`: its most
 * recent decode shape, then its most recent others. Devices not in `devices` are left out.
 * `joining`: a device of `devices` with no shape in `recent` (one the scale adds) gets the most
 * recent distinct shapes of all devices, those with prompt tokens (T > S) first: it takes the
 * waiting requests, so its first steps run their prompts.
 * `balancedSeqs`: the switch-over balances that many running sequences over `devices`
 * (DeploymentOptions.balanceOnScale): every device's first shape is the decode step of its share
 * (S = T = the step bucket of seqs / devices, rounded up), with the block-table stride of its
 * most recent decode shape (any device's for one without; the most recent shape's when there is
 * no decode shape yet), counted within `perDevice`.
 * `ramp` (the sequences running): rampShapes' shapes first; with `joining` (a standby made in the
 * background) beyond `perDevice` and with the joining device's climb, else (a scale's attach phase,
 * a scale-down's too) within `perDevice`, the staying devices' steps at their new share only.
 */
export function precaptureShapes(recent: readonly GraphShape[], devices: readonly number[], perDevice: number,
  options: { joining?: boolean; balancedSeqs?: number; ramp?: number } = {}): GraphShape[] {
  if (perDevice <= 0) return [];
  const out: GraphShape[] = [];
  const ramp = (options.ramp ?? 0) > 0 ? rampShapes(recent, devices, options.ramp!, options.joining === true) : new Map<number, GraphShape[]>();
  const distinct = (shapes: readonly GraphShape[]) => {
    const seen = new Set<string>();
    return shapes.filter((g) => {
      const key = `${g.T},${g.S},${g.MB},${g.sampled}`;
      if (seen.has(key)) return false;
      seen.add(key);
      return true;
    });
  };
  devices.forEach((device, rank) => {
    const mine = recent.filter((g) => g.device === device);
    const ordered = mine.length > 0 || !options.joining
      ? [...mine.filter((g) => g.T === g.S), ...mine.filter((g) => g.T !== g.S)]
      : distinct([...recent.filter((g) => g.T !== g.S), ...recent.filter((g) => g.T === g.S)]);
    const seqs = options.balancedSeqs ?? 0;
    // The block-table stride: of the device's most recent decode step, else any device's, else its (any) most recent step.
    const decode = mine.find((g) => g.T === g.S) ?? recent.find((g) => g.T === g.S) ?? mine[0] ?? recent[0];
    const first: GraphShape[] = [];
    if (seqs > 0 && decode) {
      const S = stepBucket(Math.ceil(seqs / devices.length));
      first.push({ ...decode, T: S, S, sampled: S });
    }
    const extra = ramp.get(device) ?? [];
    const same = (a: GraphShape, b: GraphShape) => a.T === b.T && a.S === b.S && a.MB === b.MB && a.sampled === b.sampled;
    const rest = ordered.filter((g) => !first.some((f) => same(f, g)));
    const own = [...first, ...rest];
    // Made in the background (joining): the climb's shapes beyond perDevice. At scale time: within it, first.
    const taken = options.joining
      ? [...extra.filter((x) => !own.slice(0, perDevice).some((y) => same(x, y))), ...own.slice(0, perDevice)]
      : [...extra, ...own.filter((g) => !extra.some((x) => same(x, g)))].slice(0, perDevice);
    for (const g of taken) out.push({ ...g, rank, device });
  });
  return out;
}

/**
 * The shapes a new layout's first steps pass through (options.ramp: the sequences running), beyond
 * the recent ones: every staying device's decode and mixed step at its new share of the
 * sequences (S = the step bucket of seqs / devices; the mixed T of its own recent shapes, the
 * widest block-table stride of its own recent shapes or, in a scale-down, of the leaving devices'
 * when wider: their sequences come over. On 4 x H100 a 4->3's first two steps captured the staying
 * ranks' decode at stride 16 when their own had been 8, 42-57 ms steps against 20; with `joining`,
 * also its decode at up to two buckets between the share and its current count, on its way
 * down), and for a
 * joining device (none of its own) the mixed steps of its climb to that share (S = each step
 * bucket up to it: the bucket below the smallest mixed T of any device with one sequence, that
 * T from one, up to two buckets between it and the next smallest and that one from two; the
 * stride after the smallest seen, where seen: fresh sequences growing) and its decode step at
 * the share. On 4 x H100 (Qwen3-30B-A3B shapes, 32 sequences, 64-token prompts) these
 * were the 10-13 shapes captured in the first 1.5 s of a new layout, each holding its step
 * 15-25 ms (docs/benchmarks.md, ninth session). The joining device's climb only with `joining`.
 */
function rampShapes(recent: readonly GraphShape[], devices: readonly number[], seqs: number, joining: boolean): Map<number, GraphShape[]> {
  const out = new Map<number, GraphShape[]>();
  const share = stepBucket(Math.ceil(seqs / devices.length));
  const isMixed = (g: GraphShape) => g.T > g.S;
  const unsampled = (g: GraphShape) => g.S - g.sampled;
  // The joining rank's prompts: one per step or two (their token counts: the two smallest mixed T seen).
  const mixedByT = new Map<number, GraphShape>();
  for (const g of recent) if (isMixed(g) && !mixedByT.has(g.T)) mixedByT.set(g.T, g);
  const joiningMixed = [...mixedByT.values()].sort((a, b) => a.T - b.T).slice(0, 2);
  // A joining rank's sequences are fresh (the smallest stride seen), and grow into the next stride
  // within its first second (4 x H100: its climb captured at stride 4 ran at 8): captured at the
  // next one where the layout has seen it, a graph of a wider stride covering a narrower one.
  const minMB = recent.length > 0 ? Math.min(...recent.map((g) => g.MB)) : undefined;
  const freshMB = minMB === undefined ? undefined : Math.min(2 * minMB, Math.max(...recent.map((g) => g.MB)));
  // A scale-down hands the leaving devices' sequences to the staying ones: a staying rank's
  // block-table stride becomes at least theirs.
  const leavingMB = Math.max(0, ...recent.filter((g) => g.device !== undefined && !devices.includes(g.device)).map((g) => g.MB));
  for (const device of devices) {
    const mine = recent.filter((g) => g.device === device);
    const shapes: GraphShape[] = [];
    if (mine.length > 0) {
      const dec = mine.find((g) => !isMixed(g));
      const mix = mine.find(isMixed);
      // The widest stride the rank had lately (it moves as long sequences end and new ones grow; a
      // graph of a wider stride covers a narrower one: ForwardEngine's covered graphs).
      const MB = Math.max(leavingMB, ...mine.map((g) => g.MB));
      // Decode first: the staying ranks go on decoding, the new one takes the waiting prompts.
      if (dec) shapes.push({ ...dec, T: share, S: share, MB, sampled: share });
      // A scale-up moves no sequence off a staying rank: it declines to its share as its requests end,
      // through the buckets between (2 x H100: a 1->2's staying rank captured its decode at 24 of 32).
      if (dec && joining) {
        for (const S of STEP_BUCKET_LIST.filter((b) => b > share && b < dec.S).slice(-2)) shapes.push({ ...dec, T: S, S, MB, sampled: S });
      }
      if (mix && mix.T >= share) shapes.push({ ...mix, S: share, MB, sampled: Math.max(0, share - unsampled(mix)) });
    } else if (joining && freshMB !== undefined && joiningMixed.length > 0) {
      // Its prompts come in bursts, without the decodes a serving rank's mixed steps carry: a prompt
      // alone (the step bucket below the smallest mixed T seen, one sequence), the smallest mixed T
      // from one sequence, the buckets between it and the next (two prompts together: at most two of
      // them), and the next, from two sequences (2 x H100: the first second after a 1->2 captured T =
      // 64 alone and T = 128 or 192 at 4-12 sequences when the recent mixed T were 96 and 192).
      const [low, high] = joiningMixed;
      const below = STEP_BUCKET_LIST.filter((b) => b < low!.T).at(-1);
      const between = high ? STEP_BUCKET_LIST.filter((b) => b > low!.T && b < high.T).slice(0, 2) : [];
      const climb: Array<{ T: number; from: number; upto: number; like: GraphShape }> = [
        ...(below !== undefined && below > 1 ? [{ T: below, from: 1, upto: 1, like: low! }] : []),
        { T: low!.T, from: 1, upto: share, like: low! },
        ...between.map((T) => ({ T, from: 2, upto: share, like: low! })),
        ...(high ? [{ T: high.T, from: 2, upto: share, like: high }] : []),
      ];
      for (const { T, from, upto, like } of climb) {
        for (let S = from; S <= upto && S <= T; S = stepBucket(S + 1)) {
          shapes.push({ rank: 0, T, S, MB: freshMB, sampled: Math.max(0, S - unsampled(like)) });
        }
      }
      shapes.push({ rank: 0, T: share, S: share, MB: freshMB, sampled: share });
    }
    out.set(device, shapes);
  }
  return out;
}
