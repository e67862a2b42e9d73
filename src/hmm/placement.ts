// Which tensors share which physical chunk: a pure function of the manifest.
// Every tensor names a `group`; a group's tensors are packed into chunks of their
// own. Expert groups ("L3.E17") get exactly one chunk each, so one expert can
// move by copying one chunk and remapping one slot. Shared groups (dense
// weights) are packed into chunks of at most `maxSharedChunkBytes`.
import { InvalidArgumentError } from '../runtime/errors.js';
import { type DType, isDType, tensorBytes } from './dtype.js';

export type ChunkKind = 'weight' | 'kv' | 'workspace';

export interface TensorSpec {
  name: string;
  dtype: DType;
  shape: number[];
  device: number;
  /** Tensors with the same group (on the same device) share chunks. */
  group: string;
  /** 'single': the whole group must fit one chunk (experts). 'packed': split across chunks as needed. */
  packing?: 'single' | 'packed';
}

export interface TensorLocation {
  name: string;
  dtype: DType;
  shape: number[];
  bytes: number;
  /** Byte offset inside the chunk. */
  offset: number;
}

export interface ChunkPlan {
  /** Stable id: `${group}@${device}` or `${group}@${device}#${index}` for packed groups. */
  id: string;
  group: string;
  device: number;
  kind: ChunkKind;
  /** Bytes, a multiple of the granularity. */
  size: number;
  tensors: TensorLocation[];
}

export interface PlacementOptions {
  granularity: number;
  /** Alignment of each tensor inside a chunk (bytes). */
  tensorAlignment?: number;
  maxSharedChunkBytes?: number;
}

const roundUp = (n: number, m: number) => Math.ceil(n / m) * m;

export function validateSpecs(specs: readonly TensorSpec[]): void {
  const seen = new Set<string>();
  for (const [i, s] of specs.entries()) {
    if (!s.name) throw new InvalidArgumentError(`specs[${i}].name`, 'a non-empty string');
    // A name may repeat on different devices (replicas), never on one device.
    const key = `${s.name}@${s.device}`;
    if (seen.has(key)) throw new InvalidArgumentError(`specs[${i}].name`, `unique per device (${s.name} appears twice on device ${s.device})`);
    seen.add(key);
    if (!isDType(s.dtype)) throw new InvalidArgumentError(`${s.name}.dtype`, 'a known dtype');
    if (!Array.isArray(s.shape) || s.shape.some((d) => !Number.isSafeInteger(d) || d < 0)) {
      throw new InvalidArgumentError(`${s.name}.shape`, 'an array of non-negative integers');
    }
    if (!Number.isInteger(s.device) || s.device < 0) throw new InvalidArgumentError(`${s.name}.device`, 'a device ordinal');
    if (!s.group) throw new InvalidArgumentError(`${s.name}.group`, 'a non-empty string');
  }
}

/** Lays tensors out into chunks. Deterministic: the same specs give the same plan. */
export function planChunks(specs: readonly TensorSpec[], options: PlacementOptions, kind: ChunkKind = 'weight'): ChunkPlan[] {
  validateSpecs(specs);
  const align = options.tensorAlignment ?? 256;
  const maxShared = options.maxSharedChunkBytes ?? 512 * 1024 * 1024;
  const g = options.granularity;
  const groups = new Map<string, TensorSpec[]>();
  for (const s of specs) {
    const key = `${s.group}@${s.device}`;
    const list = groups.get(key);
    if (list) list.push(s);
    else groups.set(key, [s]);
  }
  const plans: ChunkPlan[] = [];
  for (const [key, members] of groups) {
    const first = members[0]!;
    const single = (first.packing ?? 'single') === 'single';
    let current: ChunkPlan | undefined;
    let used = 0;
    let index = 0;
    const close = () => {
      if (!current) return;
      current.size = Math.max(g, roundUp(used, g));
      plans.push(current);
      current = undefined;
    };
    for (const s of members) {
      const bytes = tensorBytes(s.dtype, s.shape);
      const at = roundUp(used, align);
      if (current && !single && at + bytes > maxShared) close();
      if (!current) {
        current = { id: single ? key : `${key}#${index++}`, group: first.group, device: first.device, kind, size: 0, tensors: [] };
        used = 0;
      }
      const offset = roundUp(used, align);
      current.tensors.push({ name: s.name, dtype: s.dtype, shape: [...s.shape], bytes, offset });
      used = offset + bytes;
    }
    close();
  }
  return plans;
}
