// GPU time per kernel name of whatever `run` launches: every launch of every ModelKernels
// timed by an event pair while it runs (ModelKernels.profile; graphs must be off meanwhile).
import { ModelKernels } from '../../dist/model/kernels/index.js';

/**
 * Runs `run` with kernel profiling on. Resolves with { wallMs, launches, gpuMs, kernels }:
 * kernels = [{ name, launches, ms }] summed over launches and devices, largest first.
 */
export async function profileKernels(run) {
  const sink = [];
  ModelKernels.profile(sink);
  const t = performance.now();
  try {
    await run();
  } finally {
    ModelKernels.profile(undefined);
  }
  const wallMs = performance.now() - t;
  await Promise.all(sink.map((k) => k.end.synchronize()));
  const byName = new Map();
  for (const k of sink) {
    const e = byName.get(k.name) ?? { name: k.name, launches: 0, ms: 0 };
    e.launches++;
    e.ms += k.end.elapsedSince(k.start);
    byName.set(k.name, e);
    k.start.dispose();
    k.end.dispose();
  }
  const kernels = [...byName.values()].sort((a, b) => b.ms - a.ms);
  return { wallMs, launches: sink.length, gpuMs: kernels.reduce((a, k) => a + k.ms, 0), kernels };
}
