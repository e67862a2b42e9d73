// Which of the serving engine's graph shapes a scale's standby engine captures ahead
// (ForwardEngine.precapture), as a pure function: the sequences of a device that stays keep
// their rank's batch across the switch-over, so that device's recent shapes are the likeliest
// first steps of its new rank. A decode shape (one token per sequence, T = S) comes first: the
// new devices take the waiting requests' prompts, the staying ones go on decoding.
import { type GraphShape, stepBucket } from '../executor/forward.js';

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
 */
export function precaptureShapes(recent: readonly GraphShape[], devices: readonly number[], perDevice: number,
  options: { joining?: boolean; balancedSeqs?: number } = {}): GraphShape[] {
  if (perDevice <= 0) return [];
  const out: GraphShape[] = [];
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
    const rest = ordered.filter((g) => !first.some((f) => f.T === g.T && f.S === g.S && f.MB === g.MB && f.sampled === g.sampled));
    for (const g of [...first, ...rest].slice(0, perDevice)) out.push({ ...g, rank, device });
  });
  return out;
}
