// Layouts: the parallel configuration one executor serves — the devices, the
// tensor parallel degree (fixed; 1 for now), the data parallel degree, the
// expert parallel degree and where every expert of every layer lives (replicas
// allowed). A layout is plain data, so the planner can build, compare and test
// layouts with no device at all; validateLayout says precisely which field of an
// impossible layout is wrong and what to do about it.
import { InvalidArgumentError } from '../runtime/errors.js';
import type { ExpertPlacement } from '../model/weights.js';

export interface LayoutSpec {
  /** Devices of the layout; DP rank r runs on devices[r] (TP = 1). */
  devices: number[];
  /** Tensor parallel degree: fixed for the life of a deployment (1 for now). */
  tp: number;
  /** Data parallel degree: devices.length / tp. */
  dp: number;
  /** Expert parallel degree: experts are spread over every device of the layout, so dp * tp. */
  ep: number;
  /** placement[layer][expert] = the devices holding that expert (one chunk each; replicas allowed). */
  placement: number[][][];
}

export interface LayoutLimits {
  /** Routed experts per layer. */
  experts: number;
  /** MoE layers. */
  layers: number;
  /** Devices present on the node: ordinals 0 .. deviceCount - 1. */
  deviceCount: number;
  /** peers[a][b]: device a can access device b's memory peer-to-peer (default: every pair). */
  peers?: boolean[][];
  /** Expert slots of one device's virtual expert table, per layer (default: unlimited). */
  slotsPerDevice?: number;
}

const isCount = (n: unknown): n is number => typeof n === 'number' && Number.isSafeInteger(n) && n > 0;
const isOrdinal = (n: unknown): n is number => typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;

/**
 * Throws InvalidArgumentError, naming the field, for a layout that cannot be served:
 * devices absent from the node or repeated, two devices of the layout without peer
 * access, TP not dividing the device count, dp * tp or ep not matching the devices,
 * an expert with no holder or a holder outside the layout, more experts on a device
 * than its slots.
 */
export function validateLayout(spec: LayoutSpec, limits: LayoutLimits): void {
  const { experts, layers, deviceCount, peers, slotsPerDevice } = limits;
  if (!isCount(experts)) throw new InvalidArgumentError('experts', `a positive integer (got ${String(experts)})`);
  if (!isCount(layers)) throw new InvalidArgumentError('layers', `a positive integer (got ${String(layers)})`);
  if (!isCount(deviceCount)) throw new InvalidArgumentError('deviceCount', `a positive integer (got ${String(deviceCount)})`);
  if (slotsPerDevice !== undefined && !isCount(slotsPerDevice)) {
    throw new InvalidArgumentError('slotsPerDevice', `a positive integer (got ${String(slotsPerDevice)})`);
  }

  const devices = spec.devices;
  if (!Array.isArray(devices) || devices.length === 0) {
    throw new InvalidArgumentError('devices', 'a non-empty list of device ordinals (name at least one device)');
  }
  const seen = new Set<number>();
  for (const [i, d] of devices.entries()) {
    if (!isOrdinal(d)) throw new InvalidArgumentError(`devices[${i}]`, `a device ordinal (got ${String(d)})`);
    if (d >= deviceCount) {
      throw new InvalidArgumentError(`devices[${i}]`,
        `a device present on this node: 0..${deviceCount - 1} (device ${d} is absent; see \`elasticmoe devices\`)`);
    }
    if (seen.has(d)) throw new InvalidArgumentError(`devices[${i}]`, `listed once (device ${d} is repeated; remove the duplicate)`);
    seen.add(d);
  }
  if (peers) {
    for (const a of devices) {
      for (const b of devices) {
        if (a !== b && peers[a]?.[b] !== true) {
          throw new InvalidArgumentError('devices',
            `devices that reach each other peer-to-peer (device ${a} has no peer access to device ${b}; ` +
            'drop one of them or pick devices of one peer group, see `elasticmoe devices`)');
        }
      }
    }
  }

  if (!isCount(spec.tp)) throw new InvalidArgumentError('tp', `a positive integer (got ${String(spec.tp)})`);
  if (devices.length % spec.tp !== 0) {
    throw new InvalidArgumentError('tp',
      `a divisor of the device count ${devices.length} (got tp = ${spec.tp}; use a multiple of ${spec.tp} devices)`);
  }
  if (spec.dp * spec.tp !== devices.length) {
    throw new InvalidArgumentError('dp',
      `devices / tp = ${devices.length / spec.tp} (got dp = ${String(spec.dp)}; dp * tp must equal the ${devices.length} devices)`);
  }
  if (spec.ep !== devices.length) {
    throw new InvalidArgumentError('ep',
      `dp * tp = ${devices.length}: experts are spread over every device of the layout (got ep = ${String(spec.ep)})`);
  }

  const placement = spec.placement;
  if (!Array.isArray(placement) || placement.length !== layers) {
    throw new InvalidArgumentError('placement', `a list of ${layers} layers (got ${Array.isArray(placement) ? placement.length : typeof placement})`);
  }
  if (slotsPerDevice !== undefined && devices.length * slotsPerDevice < experts) {
    throw new InvalidArgumentError('devices',
      `at least ${Math.ceil(experts / slotsPerDevice)} devices to hold ${experts} experts in ${slotsPerDevice} slots each ` +
      `(got ${devices.length}; add devices or raise slotsPerDevice)`);
  }
  for (let l = 0; l < layers; l++) {
    const row = placement[l];
    if (!Array.isArray(row) || row.length !== experts) {
      throw new InvalidArgumentError(`placement[${l}]`, `a list of ${experts} experts (got ${Array.isArray(row) ? row.length : typeof row})`);
    }
    const perDevice = new Map<number, number>();
    for (let e = 0; e < experts; e++) {
      const holders = row[e];
      const field = `placement[${l}][${e}]`;
      if (!Array.isArray(holders) || holders.length === 0) {
        throw new InvalidArgumentError(field, `a non-empty list of devices (expert ${e} of layer ${l} has no holder; place it on a device of the layout)`);
      }
      const own = new Set<number>();
      for (const d of holders) {
        if (!seen.has(d)) {
          throw new InvalidArgumentError(field,
            `devices of the layout [${devices.join(', ')}] (expert ${e} of layer ${l} names device ${String(d)}; move it to a device of the layout)`);
        }
        if (own.has(d)) throw new InvalidArgumentError(field, `distinct devices (device ${d} is named twice; a device holds one copy of an expert)`);
        own.add(d);
        perDevice.set(d, (perDevice.get(d) ?? 0) + 1);
      }
    }
    if (slotsPerDevice !== undefined) {
      for (const d of devices) {
        const n = perDevice.get(d) ?? 0;
        if (n > slotsPerDevice) {
          throw new InvalidArgumentError(`placement[${l}]`,
            `at most ${slotsPerDevice} experts per device (device ${d} holds ${n} in layer ${l}; move experts to devices with free slots, or add devices)`);
        }
      }
    }
  }
}

/** The layout's placement as the ExpertPlacement function of src/model/weights.ts (a private copy: later edits to spec do not leak in). */
export function toExpertPlacement(spec: LayoutSpec): ExpertPlacement {
  const table = spec.placement.map((row) => row.map((holders) => Object.freeze([...holders])));
  return (layer, expert) => {
    const holders = table[layer]?.[expert];
    if (!holders) throw new InvalidArgumentError('expert', `an expert of the layout (layer ${layer}, expert ${expert} is out of range)`);
    return holders;
  };
}

/** A layout with experts dealt round robin over the devices, the same in every layer (TP = 1 unless given). */
export function roundRobinLayout(devices: readonly number[], layers: number, experts: number, tp = 1): LayoutSpec {
  if (devices.length === 0) throw new InvalidArgumentError('devices', 'at least one device');
  const row = Array.from({ length: experts }, (_, e) => [devices[e % devices.length]!]);
  return {
    devices: [...devices],
    tp,
    dp: devices.length / tp,
    ep: devices.length,
    placement: Array.from({ length: layers }, () => row.map((h) => [...h])),
  };
}
