// Seeded synthetic weights, generated on the devices themselves (no host bytes,
// no disk): for shape-only runs of large published configs and for benchmarks.
// The same seed and tensor name always give the same bytes, on cuda and mock alike.
import { fnv1a64 } from '../runtime/basic-kernels.js';
import { arg } from '../runtime/kernel.js';
import type { ChunkStore, StoredChunk } from './chunk-store.js';
import type { ChunkPlan, TensorLocation } from './placement.js';

export interface SyntheticOptions {
  seed?: bigint;
  holder?: string;
  /** Uniform range [-scale, scale] per tensor; default 0.02 (1.0 for 1-D tensors such as norms). */
  scaleFor?: (t: TensorLocation) => number;
  onProgress?: (p: { bytesDone: number; bytesTotal: number }) => void;
}

export function tensorSeed(seed: bigint, name: string): bigint {
  return fnv1a64(name) ^ (seed & 0xffffffffffffffffn);
}

const defaultScale = (t: TensorLocation) => (t.shape.length === 1 ? 1.0 : 0.02);

/** Allocates the planned chunks and fills every tensor on its device. All or nothing. */
export async function fillSynthetic(store: ChunkStore, plans: readonly ChunkPlan[], options: SyntheticOptions = {}): Promise<StoredChunk[]> {
  const holder = options.holder ?? 'hmm';
  const scaleFor = options.scaleFor ?? defaultScale;
  const seed = options.seed ?? 0n;
  const made = store.allocate(plans, holder);
  try {
    const bytesTotal = plans.reduce((a, p) => a + p.tensors.reduce((b, t) => b + t.bytes, 0), 0);
    let bytesDone = 0;
    const devices = [...new Set(plans.map((p) => p.device))];
    const modules = new Map(await Promise.all(devices.map(async (d) => [d, await store.basicKernels(d)] as const)));
    for (const plan of plans) {
      const mod = modules.get(plan.device)!;
      const s = store.stream(plan.device);
      for (const t of plan.tensors) {
        const ptr = store.tensor(t.name, plan.device).ptr;
        const tseed = tensorSeed(seed, t.name);
        const elems = t.bytes / (t.dtype === 'bf16' ? 2 : t.dtype === 'f32' ? 4 : 1);
        const dims = { grid: Math.max(1, Math.min(4096, Math.ceil(elems / 256))), block: 256 };
        if (t.dtype === 'bf16') {
          s.launch(mod.kernel('emoe_fill_uniform_bf16'), dims, [ptr, arg.u64(elems), arg.u64(tseed), arg.f32(scaleFor(t))]);
        } else if (t.dtype === 'f32') {
          s.launch(mod.kernel('emoe_fill_uniform_f32'), dims, [ptr, arg.u64(elems), arg.u64(tseed), arg.f32(scaleFor(t))]);
        } else {
          // Other dtypes get random bits; the padding after a tensor (alignment >= 4) absorbs the last word.
          s.launch(mod.kernel('emoe_fill_random_u32'), dims, [ptr, arg.u64(Math.ceil(t.bytes / 4)), arg.u64(tseed)]);
        }
        bytesDone += t.bytes;
      }
      options.onProgress?.({ bytesDone, bytesTotal });
    }
    await Promise.all(devices.map((d) => store.stream(d).synchronize()));
    options.onProgress?.({ bytesDone: bytesTotal, bytesTotal });
  } catch (e) {
    for (const c of made) store.release(c.plan.id, holder);
    throw e;
  }
  return made;
}
