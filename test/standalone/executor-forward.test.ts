// The executor's forward pass (src/executor/forward.ts) on the mock backend, for tiny
// qwen3_moe, mixtral and qwen2_moe configs with synthetic weights loaded by the HMM:
// greedy tokens and logits are bit-identical whatever the layout and expert placement
// (DESIGN invariant 1), match an independent TypeScript reference, do not depend on
// the batch a sequence runs in, on how its prompt is chunked, on the expert routing
// path (on the device or on the host) or on decode steps replaying as captured graphs
// (cached per step shape, LRU-bounded, off where the backend refuses); the same holds with an
// f32 KV cache (kvDtype 'f32'), which equals the reference model with an f32 cache bit for
// bit; bad steps and pools made for another KV dtype are refused.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';

import { ForwardEngine, type ForwardEngineOptions, stepBucket } from '../../src/executor/forward.js';
import { precaptureShapes } from '../../src/scaling/precapture.js';
import { mapAttachedKvPools, mapHmmKvPools, mapKvPool, hmmKvChunks, type MappedKvPool } from '../../src/executor/kv-view.js';
import { type HostWeights, ReferenceModel, readHostWeights } from '../../src/executor/reference-model.js';
import { type Layout, type SeqStep, kvGeometry } from '../../src/executor/types.js';
import { attachedWeights, storeWeights } from '../../src/executor/weights.js';
import { HmmClient } from '../../src/hmm/client.js';
import { HmmDaemon } from '../../src/hmm/daemon.js';
import { Hmm } from '../../src/hmm/hmm.js';
import type { TensorLocation } from '../../src/hmm/placement.js';
import { type ModelConfig, parseConfig } from '../../src/model/config.js';
import { MAX_ROUTE_ROWS, ModelKernels, QKV_FUSED_MAX_ROWS } from '../../src/model/kernels/index.js';
import { Event, Stream } from '../../src/runtime/stream.js';
import { Graph } from '../../src/runtime/graph.js';
import { type ExpertPlacement, roundRobinPlacement, weightSpecs } from '../../src/model/weights.js';
import { InvalidArgumentError, OutOfMemoryError, type Runtime } from '../../src/index.js';
import { MIB, openMock, pattern, sameBytes } from '../helpers/mock.js';
import { runStepScript } from '../helpers/step-script.js';

const SEED = 20251127n;
const STEPS = 12;
const ALL = [0, 1, 2, 3];

const base = {
  hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16,
  vocab_size: 97, num_experts_per_tok: 2, rms_norm_eps: 1e-6, rope_theta: 10000, max_position_embeddings: 256,
};
const CONFIGS: Record<string, ModelConfig> = {
  qwen3_moe: parseConfig({ ...base, model_type: 'qwen3_moe', num_experts: 8, moe_intermediate_size: 32, norm_topk_prob: true }),
  mixtral: parseConfig({ ...base, model_type: 'mixtral', num_local_experts: 8, intermediate_size: 32, tie_word_embeddings: true }),
  qwen2_moe: parseConfig({
    ...base, model_type: 'qwen2_moe', num_experts: 8, moe_intermediate_size: 32, shared_expert_intermediate_size: 48, norm_topk_prob: false,
  }),
};

/** Weight scales that keep activations near unit size for hidden 64. */
const scaleFor = (t: TensorLocation) => {
  if (t.shape.length === 1) return t.name.endsWith('.bias') ? 0.1 : 1.0;
  return t.name.includes('embed_tokens') || t.name.includes('lm_head') ? 1.0 : 0.25;
};

const PROMPTS: Array<{ id: string; prompt: number[] }> = [
  { id: 'a', prompt: [5, 17, 33, 2, 90] },
  { id: 'b', prompt: [11, 12, 13, 14, 15, 16, 17, 18, 19] },
  { id: 'c', prompt: [42, 7, 64] },
  { id: 'd', prompt: [1, 96, 50, 3, 77, 8, 29, 61, 44, 0, 23, 85, 39, 70, 18, 55, 31] },
];

const reversedPlacement = (experts: number, devices: number[]): ExpertPlacement => {
  const n = devices.length;
  return (_l, e) => [devices[n - 1 - (e % n)]!];
};
/** Every expert on two devices; layer 1 shifted, so replicas differ per layer. */
const replicatedPlacement = (devices: number[]): ExpertPlacement => {
  const n = devices.length;
  return (l, e) => [devices[(e + l) % n]!, devices[(e + l + 1) % n]!];
};

interface Generated {
  tokens: Map<string, number[]>;
  /** Last-position logits of every step (undefined for a step that asked for none). */
  logits: Map<string, Array<Float32Array | undefined>>;
}

let runCounter = 0;

/**
 * Prefill then STEPS greedy decode steps for each prompt. Sequence i runs on rank
 * rankOf(i) (default i % ranks); `split` prefills in two steps, the first chunk of
 * `split` tokens unsampled. Step j (counting the prefill steps) asks for logits when
 * logitsAt(j) (default: every step); a step that asks for none may run as a graph.
 */
async function generate(engine: ForwardEngine, hmm: Hmm, prompts: typeof PROMPTS,
  { rankOf, split, steps = STEPS, logitsAt = () => true }:
  { rankOf?: (i: number) => number; split?: number; steps?: number; logitsAt?: (step: number) => boolean } = {}): Promise<Generated> {
  const devices = engine.layout.devices;
  const BS = engine.blockTokens;
  const run = ++runCounter;
  const seqs = prompts.map((p, i) => {
    const rank = rankOf ? rankOf(i) : i % devices.length;
    const req = `run${run}:${p.id}`;
    const blocks = hmm.kv.allocate(req, devices[rank]!, Math.ceil((p.prompt.length + steps + 1) / BS));
    return { ...p, rank, req, blocks, out: [] as number[], logits: [] as Array<Float32Array | undefined> };
  });
  let stepIndex = 0;
  try {
    const doStep = async (make: (s: (typeof seqs)[number]) => SeqStep | undefined) => {
      const ranks: SeqStep[][] = devices.map(() => []);
      for (const s of seqs) {
        const st = make(s);
        if (st) ranks[s.rank]!.push(st);
      }
      const returnLogits = logitsAt(stepIndex++);
      const r = await engine.step({ ranks }, { returnLogits });
      expect(r.logits !== undefined).toBe(returnLogits);
      for (const s of seqs) {
        if (!r.next.has(s.id)) continue;
        s.out.push(r.next.get(s.id)!);
        s.logits.push(returnLogits ? r.logits!.get(s.id)! : undefined);
      }
      return r;
    };
    if (split !== undefined) {
      await doStep((s) => ({ seqId: s.id, tokens: s.prompt.slice(0, split), startPos: 0, blockTable: s.blocks, sample: false }));
      await doStep((s) => ({ seqId: s.id, tokens: s.prompt.slice(split), startPos: split, blockTable: s.blocks, sample: true }));
    } else {
      const r = await doStep((s) => ({ seqId: s.id, tokens: s.prompt, startPos: 0, blockTable: s.blocks, sample: true }));
      expect(r.tokens).toBe(prompts.reduce((a, p) => a + p.prompt.length, 0));
    }
    for (let i = 0; i < steps; i++) {
      await doStep((s) => ({ seqId: s.id, tokens: [s.out[s.out.length - 1]!], startPos: s.prompt.length + i, blockTable: s.blocks, sample: true }));
    }
  } finally {
    for (const s of seqs) hmm.kv.free(s.req);
  }
  return { tokens: new Map(seqs.map((s) => [s.id, s.out])), logits: new Map(seqs.map((s) => [s.id, s.logits])) };
}

const bytesOf = (x: Float32Array) => new Uint8Array(x.buffer, x.byteOffset, x.byteLength);

/** Same tokens, and bit for bit the logits of every step that returned them in `got` (`want` has all). */
function expectIdentical(got: Generated, want: Generated, what: string): void {
  for (const [id, tokens] of want.tokens) {
    expect(got.tokens.get(id), `${what}: tokens of ${id}`).toEqual(tokens);
    const gl = got.logits.get(id)!;
    const wl = want.logits.get(id)!;
    expect(gl.length).toBe(wl.length);
    for (let i = 0; i < wl.length; i++) {
      if (gl[i] === undefined) continue;
      expect(sameBytes(bytesOf(gl[i]!), bytesOf(wl[i]!)), `${what}: logits of ${id} at step ${i}`).toBe(true);
    }
  }
}

/** Counts the graph disposals (evictions, engine disposal) from now on. */
const spyGraphDispose = () => vi.spyOn(Graph.prototype, 'dispose');

/** Counts turns of the event loop (a chain of setImmediate) from now until stop(). */
function countTurns(): { stop: () => number } {
  let turns = 0;
  let on = true;
  const tick = () => {
    if (!on) return;
    turns++;
    setImmediate(tick);
  };
  setImmediate(tick);
  return { stop: () => ((on = false), turns) };
}


interface Fixture {
  rt: Runtime;
  hmm: Hmm;
  config: ModelConfig;
  /** bf16 KV pools (the default kvDtype) on every device, in `hmm`. */
  views: Map<number, MappedKvPool>;
  engines: ForwardEngine[];
  /** f32 KV pools on every device, in an HMM of their own (an HMM has one pool per device); made by f32Kv. */
  kv32?: { hmm: Hmm; views: Map<number, MappedKvPool> };
}

async function fixture(config: ModelConfig): Promise<Fixture> {
  const rt = openMock({ mockCapacity: 256 * MIB });
  const hmm = new Hmm(rt);
  // Every expert on every device: each layout below picks its own holders from these replicas.
  await hmm.loadSynthetic(weightSpecs(config, ALL, () => ALL), { seed: SEED, scaleFor });
  for (const d of ALL) hmm.kv.createPool({ device: d, blockBytes: kvGeometry(config).blockBytes, blocks: 256 });
  return { rt, hmm, config, views: mapHmmKvPools(rt, hmm, ALL), engines: [] };
}

/**
 * An engine over the fixture's weights. Unless the options say otherwise, a decode shape is captured
 * at its first sighting, covered or not (graphs: { captureAfter: 1, coveredCaptureAfter: 1 }), so the graph tests see each capture at once;
 * the default of 2 has its own test.
 */
async function engineFor(fx: Fixture, layout: Layout, maxTokensPerStep = 64, options: ForwardEngineOptions = {}): Promise<ForwardEngine> {
  const pools = options.kvDtype === 'f32' ? f32Kv(fx).views : fx.views;
  const views = new Map(layout.devices.map((d) => [d, pools.get(d)!]));
  const e = await ForwardEngine.create(fx.rt, fx.config, layout, storeWeights(fx.hmm.store), views,
    { maxTokensPerStep, graphs: { captureAfter: 1, coveredCaptureAfter: 1 }, ...options });
  fx.engines.push(e);
  return e;
}

/** The fixture's f32 KV pools (kvGeometry(config, 16, 'f32')), made on first use. */
function f32Kv(fx: Fixture): { hmm: Hmm; views: Map<number, MappedKvPool> } {
  if (!fx.kv32) {
    const hmm = new Hmm(fx.rt);
    for (const d of ALL) hmm.kv.createPool({ device: d, blockBytes: kvGeometry(fx.config, 16, 'f32').blockBytes, blocks: 256 });
    fx.kv32 = { hmm, views: mapHmmKvPools(fx.rt, hmm, ALL) };
  }
  return fx.kv32;
}

function disposeFixture(fx: Fixture | undefined): void {
  if (!fx) return;
  for (const e of fx.engines) e.dispose();
  for (const v of fx.views.values()) v.dispose();
  for (const v of fx.kv32?.views.values() ?? []) v.dispose();
  fx.kv32?.hmm.dispose();
  fx.hmm.dispose();
}

function maxAbs(x: Float32Array): number {
  let m = 0;
  for (const v of x) m = Math.max(m, Math.abs(v));
  return m;
}

for (const [arch, config] of Object.entries(CONFIGS)) {
  describe(`forward pass: ${arch}`, () => {
    let fx: Fixture;
    let baseline: Generated;
    let host: HostWeights;

    beforeAll(async () => {
      fx = await fixture(config);
      const engine = await engineFor(fx, { devices: [0], placement: () => [0] });
      baseline = await generate(engine, fx.hmm, PROMPTS);
      host = await readHostWeights(fx.rt, fx.hmm.store, config);
    });
    afterAll(() => disposeFixture(fx));

    it('gives identical tokens and bit-identical logits on every layout and expert placement', async () => {
      // The greedy tokens are not degenerate (the comparison means something).
      const distinct = new Set([...baseline.tokens.values()].flat());
      expect(distinct.size).toBeGreaterThan(5);
      const layouts: Array<[string, Layout]> = [
        ['[0,1] round robin', { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) }],
        ['[0,1,2,3] round robin', { devices: ALL, placement: roundRobinPlacement(8, ALL) }],
        ['[0,1,2,3] reversed', { devices: ALL, placement: reversedPlacement(8, ALL) }],
        ['[0,1,2,3] replicated on two devices', { devices: ALL, placement: replicatedPlacement(ALL) }],
        ['[3,1] every expert on device 1', { devices: [3, 1], placement: () => [1] }],
      ];
      for (const [what, layout] of layouts) {
        const engine = await engineFor(fx, layout);
        expectIdentical(await generate(engine, fx.hmm, PROMPTS), baseline, what);
        // The same sequences placed on other ranks.
        if (layout.devices.length > 1) {
          expectIdentical(await generate(engine, fx.hmm, PROMPTS, { rankOf: (i) => (i + 1) % layout.devices.length }), baseline, `${what}, ranks shifted`);
        }
      }
    });

    it('matches the independent TypeScript reference model', () => {
      const model = new ReferenceModel(config, host);
      let worst = 0;
      for (const p of PROMPTS) {
        const want = model.greedy(p.prompt, STEPS);
        expect(baseline.tokens.get(p.id), `tokens of ${p.id}`).toEqual(want.tokens);
        const got = baseline.logits.get(p.id)!;
        want.logits.forEach((w, i) => {
          const g = got[i]!;
          let diff = 0;
          for (let j = 0; j < w.length; j++) diff = Math.max(diff, Math.abs(g[j]! - w[j]!));
          worst = Math.max(worst, diff / Math.max(1, maxAbs(w)));
        });
      }
      expect(worst).toBeLessThan(1e-5);
    });

    it('with an f32 KV cache: the f32 kernels, the same tokens and logits on 1, 2 and 4 devices, bit for bit the reference model with an f32 cache', async () => {
      const kv = f32Kv(fx);
      const layouts: Array<[string, Layout]> = [
        ['[0]', { devices: [0], placement: () => [0] }],
        ['[0,1] round robin', { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) }],
        ['[0,1,2,3] reversed', { devices: ALL, placement: reversedPlacement(8, ALL) }],
        ['[0,1,2,3] replicated on two devices', { devices: ALL, placement: replicatedPlacement(ALL) }],
      ];
      let first: Generated | undefined;
      const launch = vi.spyOn(Stream.prototype, 'launch');
      try {
        for (const [what, layout] of layouts) {
          const engine = await engineFor(fx, layout, 64, { kvDtype: 'f32', blockTokens: 16 });
          expect([engine.kvDtype, engine.blockTokens]).toEqual(['f32', 16]);
          launch.mockClear();
          const got = await generate(engine, kv.hmm, PROMPTS);
          const names = new Set(launch.mock.calls.map(([k]) => k.name));
          expect(names.has('emoe_kv_store_f32') && names.has('emoe_attention_f32'), `${what}: the f32 kernels`).toBe(true);
          expect(names.has('emoe_kv_store') || names.has('emoe_attention'), `${what}: no bf16 KV kernel`).toBe(false);
          if (first) expectIdentical(got, first, `f32 KV, ${what}`);
          else first = got;
        }
      } finally {
        launch.mockRestore();
      }
      const model = new ReferenceModel(config, host, { kvDtype: 'f32' });
      let differs = false;
      for (const p of PROMPTS) {
        const want = model.greedy(p.prompt, STEPS);
        expectIdentical({ tokens: new Map([[p.id, first!.tokens.get(p.id)!]]), logits: new Map([[p.id, first!.logits.get(p.id)!]]) },
          { tokens: new Map([[p.id, want.tokens]]), logits: new Map([[p.id, want.logits]]) }, `f32 KV against the reference model: ${p.id}`);
        // Not the bf16 cache's results: K and V were kept unrounded.
        differs ||= want.logits.some((w, i) => !sameBytes(bytesOf(w), bytesOf(baseline.logits.get(p.id)![i]!)));
      }
      expect(differs).toBe(true);
    });

    it('gives bit-identical results with the experts grouped, one matmul each, or mixed', async () => {
      // Host routing path. groupedMaxRows 0: every expert its own matmuls; 3: prefill mixes
      // both kinds in one segment; the default groups everything here. Remote segments run
      // grouped launches too.
      const layouts: Array<[string, Layout]> = [
        ['[0]', { devices: [0], placement: () => [0] }],
        ['[0,1,2,3] reversed', { devices: ALL, placement: reversedPlacement(8, ALL) }],
      ];
      for (const [what, layout] of layouts) {
        for (const groupedMaxRows of [0, 3]) {
          const engine = await engineFor(fx, layout, 64, { groupedMaxRows, deviceRoutingMaxRows: 0 });
          expectIdentical(await generate(engine, fx.hmm, PROMPTS), baseline, `${what}, groupedMaxRows ${groupedMaxRows}`);
        }
      }
    });

    it('gives bit-identical results with the experts routed on the device, on the host, or both in one step', async () => {
      // The default (8 rows per expert: 64 here) already mixes the paths across the layouts
      // above (the one-device prefill of 34 tokens is routed on the host, everything else on
      // the device). Here: every step on one path, and a step whose ranks take different paths.
      const layouts: Array<[string, Layout]> = [
        ['[0]', { devices: [0], placement: () => [0] }],
        ['[0,1] round robin', { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) }],
        ['[0,1,2,3] reversed', { devices: ALL, placement: reversedPlacement(8, ALL) }],
        ['[0,1,2,3] replicated on two devices', { devices: ALL, placement: replicatedPlacement(ALL) }],
        ['[3,1] every expert on device 1', { devices: [3, 1], placement: () => [1] }],
      ];
      // The device path's grouped launches visit the active list only, their grid sized for
      // min(E, T*K) groups: below E at decode (T*K = 2 of 8 experts here), E for a long prefill.
      const grouped = vi.spyOn(ModelKernels.prototype, 'groupedMatmul');
      const bounds = new Set<number>();
      try {
        for (const [what, layout] of layouts) {
          for (const deviceRoutingMaxRows of [0, MAX_ROUTE_ROWS]) {
            grouped.mockClear();
            const engine = await engineFor(fx, layout, 64, { deviceRoutingMaxRows });
            expectIdentical(await generate(engine, fx.hmm, PROMPTS), baseline, `${what}, ${deviceRoutingMaxRows ? 'device' : 'host'} routing`);
            expect(grouped).toHaveBeenCalled();
            for (const [, a] of grouped.mock.calls) {
              expect(a.active !== undefined, `${what}: an active list on the device path only`).toBe(deviceRoutingMaxRows > 0);
              if (a.active === undefined) continue;
              expect([a.G, a.maxActive]).toEqual([config.experts, Math.min(config.experts, a.M)]);
              bounds.add(a.maxActive!);
            }
          }
        }
      } finally {
        grouped.mockRestore();
      }
      expect(bounds.has(config.experts) && bounds.has(config.topK)).toBe(true);
      // Prefill rows per rank on four ranks: 10, 18, 6, 34: ranks 0 and 2 on the device, 1 and 3 on the host.
      const mixed = await engineFor(fx, { devices: ALL, placement: roundRobinPlacement(8, ALL) }, 64, { deviceRoutingMaxRows: 12 });
      expectIdentical(await generate(mixed, fx.hmm, PROMPTS), baseline, 'device and host routing in one step');
      expectIdentical(await generate(mixed, fx.hmm, PROMPTS, { rankOf: (i) => 3 - i }), baseline, 'device and host routing in one step, ranks reversed');
    });

    it('queues the fused attention block: the kernel sequence of a step, computed from the config', async () => {
      // One rank on one device, device routing path (T*K <= 64), no graph: embed, then per layer
      // (A) norm, q/k/v (one launch up to QKV_FUSED_MAX_ROWS tokens), [biases], q/k norm + rope in
      // one launch, KV store, attention, o_proj, add + norm in one launch, router, top-k, [shared
      // expert]; (B) the device-routed experts; (C) the combination [+ the shared expert's add];
      // then the head on the one sampled token.
      const L = config.layers;
      const shared = config.sharedIntermediate > 0;
      // The tensor-core grouped matmul (the mock's choice) over T*K rows and min(E, T*K) group slots:
      // the few-rows tiling up to 8 rows per slot.
      const gmm = (T: number) => (T * config.topK <= 8 * Math.min(config.experts, T * config.topK)
        ? 'emoe_grouped_matmul_bf16_mma_fewrows' : 'emoe_grouped_matmul_bf16_mma');
      const layerKernels = (T: number) => [
        'emoe_rmsnorm',
        ...(T <= QKV_FUSED_MAX_ROWS ? ['emoe_matmul_qkv_bf16'] : new Array<string>(3).fill('emoe_matmul_bf16')),
        ...(config.qkvBias ? new Array<string>(3).fill('emoe_add_bias_bf16') : []),
        'emoe_qk_norm_rope', 'emoe_kv_store', 'emoe_attention', 'emoe_matmul_bf16', 'emoe_add_rmsnorm', 'emoe_matmul_bf16', 'emoe_router_topk',
        ...(shared ? ['emoe_matmul_bf16', 'emoe_matmul_bf16', 'emoe_silu_mul', 'emoe_matmul_bf16', 'emoe_matmul_bf16', 'emoe_sigmoid_scale_rows'] : []),
        'emoe_route_rows', 'emoe_gather_rows_count', gmm(T), gmm(T), 'emoe_silu_mul_count', gmm(T), 'emoe_scatter_rows_count',
        'emoe_combine_topk', ...(shared ? ['emoe_add_f32'] : []),
      ];
      const stepKernels = (T: number) => [
        'emoe_embed', ...Array.from({ length: L }, () => layerKernels(T)).flat(), 'emoe_gather_rows', 'emoe_rmsnorm', 'emoe_matmul_bf16', 'emoe_argmax',
      ];
      // At decode: 17 per layer (23 unfused with q/k norm, 21 without); qwen2_moe 27 (31 unfused).
      expect(layerKernels(1).length).toBe(shared ? 27 : 17);
      const e = await engineFor(fx, { devices: [0], placement: () => [0] }, 128, { graphs: false });
      const launch = vi.spyOn(Stream.prototype, 'launch');
      // 70 tokens: a prefill above QKV_FUSED_MAX_ROWS.
      const p = { prompt: Array.from({ length: 70 }, (_, i) => (i * 37 + 11) % config.vocabSize) };
      const blocks = fx.hmm.kv.allocate('fused', 0, Math.ceil(71 / e.blockTokens));
      try {
        // A prefill of 5 tokens, one of all 70 (the same positions written again), then a decode step.
        const steps: Array<[number[], number]> = [[p.prompt.slice(0, 5), 0], [p.prompt, 0], [[7], 70]];
        expect(p.prompt.length).toBeGreaterThan(QKV_FUSED_MAX_ROWS);
        for (const [tokens, startPos] of steps) {
          expect(tokens.length * config.topK).toBeLessThanOrEqual(e.deviceRoutingMaxRows);
          launch.mockClear();
          await e.step({ ranks: [[{ seqId: 'f', tokens, startPos, blockTable: blocks, sample: true }]] });
          expect(launch.mock.calls.map(([k]) => k.name), `T = ${tokens.length}`).toEqual(stepKernels(tokens.length));
        }
      } finally {
        launch.mockRestore();
        fx.hmm.kv.free('fused');
      }
    });

    it('gives the same tokens and logits with steps replayed as graphs, on 1, 2 and 4 devices', async () => {
      const layouts: Array<[string, Layout]> = [
        ['[0]', { devices: [0], placement: () => [0] }],
        ['[0,1] round robin', { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) }],
        ['[0,1,2,3] replicated on two devices', { devices: ALL, placement: replicatedPlacement(ALL) }],
      ];
      for (const [what, layout] of layouts) {
        const engine = await engineFor(fx, layout);
        // Steps as graphs (padded to the step buckets), with an eager step returning logits every
        // fourth step: the KV cache the graphs wrote is bit-identical too. The prefill (step 0, no
        // logits, on the device path) is a graph as well.
        const got = await generate(engine, fx.hmm, PROMPTS, { logitsAt: (i) => i % 4 === 3 });
        expectIdentical(got, baseline, `${what}, graphs`);
        const st = engine.graphStats;
        expect(st.enabled).toBe(true);
        expect(st.disabledReason).toBeUndefined();
        // Every step without logits ran as graphs, one per rank with sequences (4 prompts, i % devices).
        const ranksUsed = Math.min(PROMPTS.length, layout.devices.length);
        expect(st.captures + st.replays).toBe((STEPS - 2) * ranksUsed);
        expect(st.replays).toBeGreaterThan(st.captures);
      }
    });

    it('replays one graph for sequences of the same shape with other tokens, positions and blocks', async () => {
      const engine = await engineFor(fx, { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) });
      const none = () => false;
      const a = PROMPTS[0]!, c = PROMPTS[2]!;
      const alone = (p: typeof a, got: Generated) =>
        expectIdentical(got, { tokens: new Map([[p.id, baseline.tokens.get(p.id)!]]), logits: new Map([[p.id, baseline.logits.get(p.id)!]]) }, `${p.id} alone`);
      alone(a, await generate(engine, fx.hmm, [a], { rankOf: () => 1, logitsAt: none }));
      const before = engine.graphStats;
      // c: its prefill (3 tokens: bucket 3, a's 5 tokens bucket 6) is a new shape, captured; then
      // decode steps of a's shape (T = S = R = 1, MB = 1) replayed.
      expect(stepBucket(c.prompt.length)).not.toBe(stepBucket(a.prompt.length));
      alone(c, await generate(engine, fx.hmm, [c], { rankOf: () => 1, logitsAt: none }));
      const after = engine.graphStats;
      expect(after.captures).toBe(before.captures + 1);
      expect(after.replays - before.replays).toBe(STEPS);
      // And a again, now that c's steps ran in between (its blocks are others).
      alone(a, await generate(engine, fx.hmm, [a], { rankOf: () => 1, logitsAt: none }));
      expect(engine.graphStats.captures).toBe(after.captures);
    });

    it('gives each sequence the same tokens alone as in a batch', async () => {
      const engine = await engineFor(fx, { devices: ALL, placement: roundRobinPlacement(8, ALL) });
      for (const [i, p] of PROMPTS.entries()) {
        const alone = await generate(engine, fx.hmm, [p], { rankOf: () => i % 4 });
        expectIdentical(alone, { tokens: new Map([[p.id, baseline.tokens.get(p.id)!]]), logits: new Map([[p.id, baseline.logits.get(p.id)!]]) }, `${p.id} alone`);
      }
    });

    it('gives the same tokens with the prompt prefilled in two chunks', async () => {
      const engine = await engineFor(fx, { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) });
      const chunked = await generate(engine, fx.hmm, PROMPTS.filter((p) => p.prompt.length > 3), { split: 3 });
      expectIdentical(chunked, {
        tokens: new Map([...baseline.tokens].filter(([id]) => id !== 'c')),
        logits: new Map([...baseline.logits].filter(([id]) => id !== 'c')),
      }, 'chunked prefill');
    });
  });
}

describe('forward pass: validation, KV views, attached weights (qwen3_moe)', () => {
  const config = CONFIGS.qwen3_moe!;
  let fx: Fixture;
  let engine: ForwardEngine;
  let baseline: Generated;
  const dirs: string[] = [];

  beforeAll(async () => {
    fx = await fixture(config);
    engine = await engineFor(fx, { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) }, 16);
    baseline = await generate(engine, fx.hmm, PROMPTS.slice(0, 3), { steps: 4 });
  });
  afterAll(() => {
    disposeFixture(fx);
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  it('rejects bad steps naming the field, and keeps serving after', async () => {
    const blocks = fx.hmm.kv.allocate('bad', 0, 2);
    const ok: SeqStep = { seqId: 's', tokens: [1, 2, 3], startPos: 0, blockTable: blocks, sample: true };
    const bad = async (ranks: unknown, field: RegExp) => {
      const e = await engine.step({ ranks } as never).then(() => undefined, (x: unknown) => x);
      expect(e).toBeInstanceOf(InvalidArgumentError);
      expect((e as InvalidArgumentError).argument).toMatch(field);
    };
    await bad([[{ ...ok, tokens: [1, 97] }]], /^batch\.ranks\[0\]\[0\]\.tokens\[1\]$/);
    await bad([[{ ...ok, tokens: [-1] }]], /tokens\[0\]$/);
    await bad([[{ ...ok, tokens: [1.5] }]], /tokens\[0\]$/);
    await bad([[{ ...ok, tokens: [] }]], /\.tokens$/);
    await bad([[{ ...ok, startPos: 30 }]], /\.blockTable$/); // 33 tokens need 3 blocks of 16
    await bad([[{ ...ok, startPos: 16, blockTable: [blocks[0]!, 256] }], []], /blockTable\[1\]$/);
    await bad([[], [{ ...ok, blockTable: [] }]], /^batch\.ranks\[1\]\[0\]\.blockTable$/);
    await bad([[{ ...ok, startPos: 255 }]], /\.startPos$/); // past max_position_embeddings
    await bad([[{ ...ok, startPos: -1 }]], /\.startPos$/);
    await bad([[{ ...ok, tokens: Array(17).fill(1) }]], /^batch\.ranks\[0\]$/); // maxTokensPerStep = 16
    await bad([[ok], [{ ...ok, blockTable: fx.hmm.kv.allocate('bad1', 1, 1) }]], /^batch\.ranks\[1\]\[0\]\.seqId$/);
    await bad([[ok, { ...ok, seqId: 't' }]], /^batch\.ranks\[0\]\[1\]\.blockTable$/); // same slots written twice
    await bad([[{ ...ok, sample: 1 }]], /\.sample$/);
    await bad([[], [], []], /^batch\.ranks$/);
    await bad('x', /^batch\.ranks$/);
    fx.hmm.kv.free('bad');
    fx.hmm.kv.free('bad1');
    // Nothing ran: the engine still serves, with the same results.
    expectIdentical(await generate(engine, fx.hmm, PROMPTS.slice(0, 3), { steps: 4 }), baseline, 'after rejected steps');
    // A step with no sequences does nothing.
    expect((await engine.step({ ranks: [[], []] })).tokens).toBe(0);
  });

  it('rejects bad layouts and pools naming the field', async () => {
    const ws = storeWeights(fx.hmm.store);
    const create = (layout: Layout, views = fx.views) => ForwardEngine.create(fx.rt, config, layout, ws, views).then(() => undefined, (e: unknown) => e);
    const arg = async (p: Promise<unknown>) => ((await p) as InvalidArgumentError).argument;
    expect(await arg(create({ devices: [], placement: () => [0] }))).toBe('layout.devices');
    expect(await arg(create({ devices: [0, 0], placement: () => [0] }))).toBe('layout.devices[1]');
    expect(await arg(create({ devices: [0, 7], placement: () => [0] }))).toBe('layout.devices[1]');
    expect(await arg(create({ devices: [0, 1], placement: () => [2] }))).toBe('layout.placement');
    expect(await arg(create({ devices: [0, 1], placement: () => [] }))).toBe('layout.placement');
    expect(await arg(create({ devices: [0, 1], placement: () => [0] }, new Map([[0, fx.views.get(0)!]])))).toBe('kv');
    for (const groupedMaxRows of [-1, 1.5]) {
      expect(await arg(ForwardEngine.create(fx.rt, config, { devices: [0], placement: () => [0] }, ws, fx.views, { groupedMaxRows })
        .then(() => undefined, (e: unknown) => e))).toBe('groupedMaxRows');
    }
    for (const deviceRoutingMaxRows of [-1, 1.5, MAX_ROUTE_ROWS + 1]) {
      expect(await arg(ForwardEngine.create(fx.rt, config, { devices: [0], placement: () => [0] }, ws, fx.views, { deviceRoutingMaxRows })
        .then(() => undefined, (e: unknown) => e))).toBe('deviceRoutingMaxRows');
    }
    for (const [graphs, field] of [[{ maxGraphs: 0 }, 'graphs.maxGraphs'], [{ maxGraphs: 2.5 }, 'graphs.maxGraphs'],
      [{ captureAfter: 0 }, 'graphs.captureAfter'], [{ instantiate: 'worker' }, 'graphs.instantiate'], ['yes', 'graphs'], [1, 'graphs']] as const) {
      expect(await arg(ForwardEngine.create(fx.rt, config, { devices: [0], placement: () => [0] }, ws, fx.views, { graphs: graphs as never })
        .then(() => undefined, (e: unknown) => e))).toBe(field);
    }
    for (const observeLoadEvery of [-1, 0.5]) {
      expect(await arg(ForwardEngine.create(fx.rt, config, { devices: [0], placement: () => [0] }, ws, fx.views, { observeLoadEvery })
        .then(() => undefined, (e: unknown) => e))).toBe('observeLoadEvery');
    }
    const one = { devices: [0], placement: () => [0] };
    for (const kvDtype of ['f16', 'fp32', 2]) {
      expect(await arg(ForwardEngine.create(fx.rt, config, one, ws, fx.views, { kvDtype: kvDtype as never })
        .then(() => undefined, (e: unknown) => e))).toBe('kvDtype');
    }
    // The fixture's pools are bf16 blocks of 16 tokens: an engine asked for an f32 cache of 16-token blocks
    // refuses them (and an f32 pool for a bf16 engine), saying which dtype they were made for and how to make the right ones.
    const mismatch = async (views: Map<number, MappedKvPool>, kvDtype: 'bf16' | 'f32', madeFor: string) => {
      const e = await ForwardEngine.create(fx.rt, config, one, ws, views, { kvDtype, blockTokens: 16 }).then(() => undefined, (x: unknown) => x);
      expect(e).toBeInstanceOf(InvalidArgumentError);
      expect((e as InvalidArgumentError).argument).toBe('kvDtype');
      expect((e as Error).message).toContain(`'${madeFor}', the dtype device 0's pool was made for`);
      expect((e as Error).message).toContain(`kvGeometry(config, 16, '${kvDtype}')`);
    };
    await mismatch(fx.views, 'f32', 'bf16');
    await mismatch(f32Kv(fx).views, 'bf16', 'f32');
    // Without blockTokens a pool is taken as bytes: the same bf16 pool reads as f32 blocks of 8 tokens.
    const derived = await ForwardEngine.create(fx.rt, config, one, ws, fx.views, { kvDtype: 'f32' });
    fx.engines.push(derived);
    expect([derived.kvDtype, derived.blockTokens]).toEqual(['f32', 8]);
  });

  it('runs each device\'s routed experts in three grouped launches per layer (host routing, decode)', async () => {
    const grouped = vi.spyOn(ModelKernels.prototype, 'groupedMatmul');
    const matmul = vi.spyOn(ModelKernels.prototype, 'matmul');
    const qkv = vi.spyOn(ModelKernels.prototype, 'matmulQkv');
    try {
      for (const [devices, placement] of [[[0], () => [0]], [[0, 1], roundRobinPlacement(8, [0, 1])]] as const) {
        const e = await engineFor(fx, { devices: [...devices], placement }, 64, { deviceRoutingMaxRows: 0 });
        const blocks = fx.hmm.kv.allocate('launches', 0, 1);
        try {
          // Prefill of 5 tokens (at most 5 rows per expert), then one decode step; one rank.
          for (const [tokens, startPos] of [[[5, 17, 33, 2, 90], 0], [[7], 5]] as const) {
            grouped.mockClear();
            matmul.mockClear();
            qkv.mockClear();
            await e.step({ ranks: [[{ seqId: 'g', tokens: [...tokens], startPos, blockTable: blocks, sample: true }]] });
            const L = config.layers, K = config.topK;
            // Each device that computed experts in a layer: gate, up and down, one launch each.
            expect(grouped.mock.calls.length % 3).toBe(0);
            expect(grouped.mock.calls.length).toBeGreaterThanOrEqual(3 * L);
            expect(grouped.mock.calls.length).toBeLessThanOrEqual(3 * L * devices.length);
            // Rows of a launch: all the layer's rows that device computes; G: its distinct experts.
            let rows = 0;
            for (const [, a] of grouped.mock.calls) {
              expect(a.G).toBeGreaterThanOrEqual(1);
              expect(a.G).toBeLessThanOrEqual(Math.min(a.M, config.experts));
              rows += a.M;
            }
            expect(rows).toBe(3 * L * tokens.length * K);
            // The only plain matmuls left: o and router per layer and the LM head; q, k and v go
            // through matmulQkv (one launch; three matmuls only above QKV_FUSED_MAX_ROWS tokens).
            expect(qkv.mock.calls.length).toBe(L);
            expect(matmul.mock.calls.length).toBe((tokens.length > QKV_FUSED_MAX_ROWS ? 3 * L : 0) + 2 * L + 1);
          }
        } finally {
          fx.hmm.kv.free('launches');
        }
      }
    } finally {
      grouped.mockRestore();
      matmul.mockRestore();
      qkv.mockRestore();
    }
  });

  it('routes on the device with no host wait until the end of the step; the host path waits once per layer', async () => {
    const route = vi.spyOn(ModelKernels.prototype, 'routeRows');
    const grouped = vi.spyOn(ModelKernels.prototype, 'groupedMatmul');
    const scatter = vi.spyOn(ModelKernels.prototype, 'scatterRowsCount');
    const eventWaits = vi.spyOn(Event.prototype, 'synchronize');
    const streamWaits = vi.spyOn(Stream.prototype, 'synchronize');
    const L = config.layers, K = config.topK, E = config.experts;
    try {
      const layouts = [
        { devices: [0], placement: () => [0] },
        { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) },
        { devices: ALL, placement: replicatedPlacement(ALL) },
      ];
      for (const layout of layouts) {
        const n = layout.devices.length;
        const e = await engineFor(fx, layout, 16, { graphs: false });
        expect(e.deviceRoutingMaxRows).toBe(32 * E); // 32 rows per expert
        expect(e.graphStats).toEqual({ enabled: false, captures: 0, capturesBegun: 0, replays: 0, precaptured: 0, cached: 0, evicted: 0, deferred: 0, covered: 0, disabledReason: 'graphs: false' });
        const blocks = layout.devices.map((_, r) => fx.hmm.kv.allocate(`dev${r}`, layout.devices[r]!, 1));
        const gblocks = layout.devices.map((_, r) => fx.hmm.kv.allocate(`gdev${r}`, layout.devices[r]!, 1));
        try {
          // Every rank decodes one token: T*K = 2 rows each, the device path.
          for (const mocks of [route, grouped, scatter, eventWaits, streamWaits]) mocks.mockClear();
          const ranks = layout.devices.map((_, r) => [{ seqId: `d${r}`, tokens: [3 + r], startPos: 0, blockTable: blocks[r]!, sample: true }]);
          const res = await e.step({ ranks });
          expect(res.next.size).toBe(n);
          // One host wait per device that worked, all at the end; nothing per layer.
          expect(streamWaits).not.toHaveBeenCalled();
          expect(eventWaits.mock.calls.length).toBe(n);
          // Per rank, layer and computing device: one routing launch, three grouped launches over
          // all E experts sized for the T*K rows, one scatter into the rank's slots.
          // The computing devices are static: those the placement gives any of the rank's experts of
          // the layer (its own device where it holds a replica, else the first holder).
          let computing = 0;
          for (let r = 0; r < n; r++) {
            for (let l = 0; l < L; l++) {
              const by = new Set<number>();
              for (let x = 0; x < E; x++) {
                const h = layout.placement(l, x);
                by.add(h.includes(layout.devices[r]!) ? layout.devices[r]! : h[0]!);
              }
              computing += by.size;
            }
          }
          expect(route.mock.calls.length).toBe(computing);
          expect(grouped.mock.calls.length).toBe(3 * computing);
          // Each visits the active list its device's routing launch wrote, a block row per expert
          // that can have rows: min(E, T*K) = K.
          grouped.mock.calls.forEach(([, a], j) => {
            expect([a.G, a.M, a.maxActive]).toEqual([E, K, Math.min(E, K)]);
            const [rs, ra] = route.mock.calls[Math.floor(j / 3)]!;
            expect(a.active).toBe(ra.active);
            expect(grouped.mock.calls[j]![0]).toBe(rs);
          });
          expect(scatter.mock.calls.length).toBe(computing);
          for (const [, a] of route.mock.calls) expect([a.T, a.K, a.E]).toEqual([1, K, E]);

          // The same step on the host path: one wait per layer for all ranks together.
          const h = await engineFor(fx, layout, 16, { deviceRoutingMaxRows: 0 });
          eventWaits.mockClear();
          route.mockClear();
          const hres = await h.step({ ranks: ranks.map((q) => q.map((x) => ({ ...x }))) });
          expect(route).not.toHaveBeenCalled();
          expect(eventWaits.mock.calls.length).toBe(L * n + n);
          expect(hres.next).toEqual(res.next);

          // As graphs, one per rank: the captures queue the same launches, a replay none; one host
          // wait per rank.
          const g = await engineFor(fx, layout, 16);
          const granks = ranks.map((q, r) => q.map((x) => ({ ...x, blockTable: gblocks[r]! })));
          for (const mocks of [route, eventWaits, streamWaits]) mocks.mockClear();
          const gres = await g.step({ ranks: granks });
          expect(gres.next).toEqual(res.next);
          expect(g.graphStats).toMatchObject({ enabled: true, captures: n, replays: 0, cached: n });
          expect(route.mock.calls.length).toBe(computing);
          expect(streamWaits).not.toHaveBeenCalled();
          expect(eventWaits.mock.calls.length).toBe(n);
          for (const mocks of [route, eventWaits]) mocks.mockClear();
          // The same shapes again (the same tokens at the same positions: the same KV written, the same results).
          expect((await g.step({ ranks: granks })).next).toEqual(res.next);
          expect(g.graphStats).toMatchObject({ captures: n, replays: n, cached: n });
          expect(route).not.toHaveBeenCalled();
          expect(streamWaits).not.toHaveBeenCalled();
          expect(eventWaits.mock.calls.length).toBe(n);
        } finally {
          layout.devices.forEach((_, r) => fx.hmm.kv.free(`dev${r}`));
          layout.devices.forEach((_, r) => fx.hmm.kv.free(`gdev${r}`));
        }
      }
    } finally {
      for (const mocks of [route, grouped, scatter, eventWaits, streamWaits]) mocks.mockRestore();
    }
  });

  /**
   * Runs `script` on `e`: each step lists, per rank, the sequences that decode one token (fed their
   * last token, positions from 0), with no logits. Sequence names are prefixed with `tag` for their
   * KV blocks (one rank each, fixed by their first step). Returns each step's tokens by name.
   */
  async function decodeScript(e: ForwardEngine, tag: string, script: string[][][], after?: () => void): Promise<Array<Record<string, number>>> {
    return runStepScript(e, fx.hmm.kv, tag, script, { blocks: 4, first: (name) => [name.charCodeAt(0) % 97], ...(after ? { after } : {}) });
  }

  it('captures each new step shape, replays a known one, and evicts the least recently used beyond maxGraphs', async () => {
    const layout = { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) };
    // Graphs are per rank and shape: a = rank 0 with one sequence, b = rank 1 with one, c = rank 0 with two.
    const A: string[][] = [['p'], []]; // a
    const B: string[][] = [['p'], ['q']]; // a and b
    const C: string[][] = [['p', 'r'], []]; // c
    const script = [A, A, B, C, A, C, C, B];
    // With maxGraphs 2 (LRU, least recently used first): A captures a [a]; A replays a; B replays a
    // and captures b [a b]; C captures c, evicting a [b c]; A captures a, evicting b [c a]; C replays
    // c [a c]; C replays c; B replays a and captures b, evicting c (never a graph of the step) [a b].
    const expected = [
      [1, 0, 0, 1], [1, 1, 0, 1], [2, 2, 0, 2], [3, 2, 1, 2], [4, 2, 2, 2], [4, 3, 2, 2], [4, 4, 2, 2], [5, 5, 3, 2],
    ].map(([captures, replays, evicted, cached]) => ({ enabled: true, captures, capturesBegun: captures, replays, evicted, cached, deferred: 0, precaptured: 0, covered: 0 }));
    const want = await decodeScript(await engineFor(fx, layout, 16, { graphs: false }), 'eager', script);
    const disposed = spyGraphDispose();
    try {
      const g = await engineFor(fx, layout, 16, { graphs: { maxGraphs: 2, captureAfter: 1, coveredCaptureAfter: 1 } });
      const stats: unknown[] = [];
      expect(await decodeScript(g, 'graph', script, () => stats.push(g.graphStats))).toEqual(want);
      expect(stats).toEqual(expected);
      expect(disposed.mock.calls.length).toBe(3); // the evicted graphs
      g.dispose();
      expect(disposed.mock.calls.length).toBe(5); // and the cached ones, with the engine
    } finally {
      disposed.mockRestore();
    }
  });

  it('pads steps to the step buckets: 5 and 6 sequences share one graph, 7 takes the next, tokens as eager', async () => {
    const layout = { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) };
    const five = ['p', 'q', 'r', 's', 't'];
    const S5: string[][] = [five, []];
    const S6: string[][] = [[...five, 'u'], []];
    const S7: string[][] = [[...five, 'u', 'v'], []];
    expect([stepBucket(5), stepBucket(6), stepBucket(7)]).toEqual([6, 6, 8]);
    const script = [S5, S6, S5, S7, S6];
    const want = await decodeScript(await engineFor(fx, layout, 16, { graphs: false }), 'eager', script);
    const g = await engineFor(fx, layout, 16, { graphs: { captureAfter: 1 } });
    const stats: Array<{ captures: number; replays: number }> = [];
    expect(await decodeScript(g, 'graph', script, () => stats.push(g.graphStats))).toEqual(want);
    // S5 capture (bucket 6); S6 replay; S5 replay; S7 capture (bucket 8); S6 replay.
    expect(stats.map((x) => [x.captures, x.replays])).toEqual([[1, 0], [1, 1], [1, 2], [2, 2], [2, 3]]);
  });

  it('replays a rank\'s graph whatever the other ranks run, and pads each rank to its own buckets', async () => {
    const layout = { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) };
    // p decodes on rank 0 throughout; rank 1 runs q, then q and r, then nothing, then s.
    const script: string[][][] = [[['p'], ['q']], [['p'], ['q']], [['p'], ['q', 'r']], [['p'], []], [['p'], ['s']]];
    const want = await decodeScript(await engineFor(fx, layout, 16, { graphs: false }), 'eager', script);
    const g = await engineFor(fx, layout, 16, { graphs: { captureAfter: 1 } });
    const stats: Array<[number, number]> = [];
    // In a step where one rank captures, the ranks with a graph launch before that capture begins.
    const order: string[] = [];
    const origLaunch = Graph.prototype.launch;
    const origBegin = Stream.prototype.beginCapture;
    Graph.prototype.launch = function (this: Graph, s: Stream) {
      order.push(`launch ${s.device}`);
      return origLaunch.call(this, s);
    };
    Stream.prototype.beginCapture = function (this: Stream) {
      order.push(`capture ${this.device}`);
      return origBegin.call(this);
    };
    try {
      expect(await decodeScript(g, 'graph', script, () => {
        stats.push([g.graphStats.captures, g.graphStats.replays]);
        order.push('|');
      })).toEqual(want);
    } finally {
      Graph.prototype.launch = origLaunch;
      Stream.prototype.beginCapture = origBegin;
    }
    // Step 1 captures both ranks; step 2 replays both; step 3 replays p's graph and captures rank 1
    // with two sequences (rank 0 stays padded to one); step 4 replays p alone; step 5 replays p and
    // rank 1's one-sequence graph (s has q's shape).
    expect(stats).toEqual([[2, 0], [2, 2], [3, 3], [3, 4], [3, 6]]);
    // Step 3: rank 0's graph launched, then rank 1 captured and launched.
    expect(order.join(' ').split(' | ')[2]).toBe('launch 0 capture 1 launch 1');
  });

  it('precaptures another layout\'s recent shapes in pieces: their first steps replay, with the eager tokens', async () => {
    const a = await engineFor(fx, { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) }, 16);
    const script: string[][][] = [[['p'], ['q', 'r']], [['p'], ['q', 'r']]];
    await decodeScript(a, 'a', script);
    // Most recently used first: rank 1's graph launched after rank 0's.
    const shapes = a.graphShapes();
    expect(shapes.map((g) => [g.device, g.rank, g.T, g.S, g.MB, g.sampled])).toEqual([[1, 1, 2, 2, 1, 2], [0, 0, 1, 1, 1, 1]]);
    const layout3 = { devices: [0, 1, 2], placement: roundRobinPlacement(8, [0, 1, 2]) };
    const script3 = script.map((st) => [...st, []]);
    const want = await decodeScript(await engineFor(fx, layout3, 16, { graphs: false }), 'eager', script3);
    const b = await engineFor(fx, layout3, 16);
    // One layer per piece: the event loop turns between pieces.
    let turns = countTurns();
    const pending = b.precapture(precaptureShapes(shapes, layout3.devices, 1), { layersPerTurn: 1 });
    await expect(b.step({ ranks: [] })).rejects.toThrow(/previous step/); // busy meanwhile
    expect(await pending).toBe(2);
    expect(turns.stop()).toBeGreaterThanOrEqual(2); // 2 layers: a turn inside each of the 2 captures
    expect(b.graphStats).toMatchObject({ precaptured: 2, cached: 2, captures: 0, replays: 0 });
    expect(await decodeScript(b, 'b', script3)).toEqual(want);
    expect(b.graphStats).toMatchObject({ precaptured: 2, captures: 0, replays: 4 });
    // One piece per graph, instantiated inline: no turn of the loop inside.
    const c = await engineFor(fx, layout3, 16, { graphs: { instantiate: 'inline' } });
    turns = countTurns();
    expect(await c.precapture(precaptureShapes(shapes, layout3.devices, 1), { layersPerTurn: 2 })).toBe(2);
    expect(turns.stop()).toBe(0);
    expect(await decodeScript(c, 'c', script3)).toEqual(want);
    // One piece per graph, instantiated on the thread pool (the default): the loop turns while each is.
    const d = await engineFor(fx, layout3, 16);
    turns = countTurns();
    expect(await d.precapture(precaptureShapes(shapes, layout3.devices, 1), { layersPerTurn: 2 })).toBe(2);
    expect(turns.stop()).toBeGreaterThanOrEqual(2);
    expect(await decodeScript(d, 'd', script3)).toEqual(want);
    // Shapes no step of b can have are skipped (rank out of range, T off the buckets, MB not a
    // power of two, more sampled than sequences), and so are those cached already.
    expect(await b.precapture([
      { rank: 3, T: 1, S: 1, MB: 1, sampled: 1 }, { rank: 0, T: 5, S: 5, MB: 1, sampled: 5 }, { rank: 0, T: 1, S: 1, MB: 3, sampled: 1 },
      { rank: 0, T: 2, S: 2, MB: 1, sampled: 3 }, ...precaptureShapes(shapes, layout3.devices, 1),
    ])).toBe(0);
    await expect(b.precapture([], { layersPerTurn: 0 })).rejects.toBeInstanceOf(InvalidArgumentError);
    // Graphs off: nothing to capture.
    expect(await (await engineFor(fx, layout3, 16, { graphs: false })).precapture(shapes)).toBe(0);
  });

  it('disposeAsync frees everything in pieces, a turn of the event loop between them, and the engine refuses steps from the first call', async () => {
    const layout = { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) };
    const free = () => fx.rt.devices().map((d) => d.freeBytes);
    const before = free();
    const e = await ForwardEngine.create(fx.rt, fx.config, layout, storeWeights(fx.hmm.store),
      new Map(layout.devices.map((d) => [d, fx.views.get(d)!])), { maxTokensPerStep: 16, graphs: { captureAfter: 1 } });
    await decodeScript(e, 'x', [[['p'], ['q', 'r']], [['p'], ['q', 'r']]]);
    const graphs = e.graphStats.cached;
    expect(graphs).toBe(2);
    expect(layout.devices.every((d) => free()[d]! < before[d]!)).toBe(true);
    const turns = countTurns();
    const pending = e.disposeAsync(1);
    await expect(e.step({ ranks: [] })).rejects.toThrow(/not disposed/);
    const stats = await pending;
    expect(stats.pieces).toBe(graphs + layout.devices.length);
    expect(turns.stop()).toBeGreaterThanOrEqual(stats.pieces - 1);
    expect(stats.maxBlockMs).toBeLessThanOrEqual(stats.ms);
    expect(free()).toEqual(before);
    expect(await e.disposeAsync()).toEqual({ ms: 0, maxBlockMs: 0, pieces: 0 });
  });

  it('fails a precapture whose capture fails, leaving the engine serving; a refused one turns graphs off', async () => {
    const layout = { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) };
    const shapes = [{ rank: 0, T: 1, S: 1, MB: 1, sampled: 1 }, { rank: 1, T: 1, S: 1, MB: 1, sampled: 1 }];
    const script: string[][][] = [[['p'], ['q']], [['p'], ['q']]];
    const want = await decodeScript(await engineFor(fx, layout, 16, { graphs: false }), 'eager', script);
    try {
      const e = await engineFor(fx, layout, 16);
      fx.rt.injectFault('EndCapture', 2, 'OUT_OF_MEMORY');
      await expect(e.precapture(shapes, { layersPerTurn: 1 })).rejects.toBeInstanceOf(OutOfMemoryError);
      expect(e.graphStats).toMatchObject({ enabled: true, precaptured: 1, cached: 1 });
      expect(await decodeScript(e, 'oom', script)).toEqual(want); // rank 1's graph captured at its first step
      expect(e.graphStats).toMatchObject({ precaptured: 1, captures: 1, replays: 3 });
      const n = await engineFor(fx, layout, 16);
      fx.rt.injectFault('BeginCapture', 1, 'NOT_SUPPORTED');
      expect(await n.precapture(shapes)).toBe(0);
      expect(n.graphStats).toMatchObject({ enabled: false, precaptured: 0, cached: 0 });
      expect(await decodeScript(n, 'off', script)).toEqual(want);
    } finally {
      fx.rt.clearFaults();
    }
  });

  it('observes the experts\' load on every n-th step without changing a token', async () => {
    const layout = { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) };
    const A: string[][] = [['p'], ['q']];
    const script = [A, A, A, A, A, A, A];
    const want = await decodeScript(await engineFor(fx, layout, 16, { graphs: false }), 'eager', script);
    const K = config.topK, L = config.layers;
    // Every step on the host path (deviceRoutingMaxRows 0) counts every step: the reference counts.
    const host = await engineFor(fx, layout, 16, { deviceRoutingMaxRows: 0, graphs: false });
    expect(await decodeScript(host, 'host', script)).toEqual(want);
    const all = host.expertLoad;
    expect(all.steps).toBe(script.length);
    expect(all.load).toHaveLength(L);
    // Two tokens per step (one per rank), K experts each, in every layer.
    for (const row of all.load) expect(row.reduce((a, b) => a + b, 0)).toBe(script.length * 2 * K);
    // Observing every step on the device-path engine: the same counts and the same tokens.
    const every = await engineFor(fx, layout, 16, { observeLoadEvery: 1 });
    expect(await decodeScript(every, 'every', script)).toEqual(want);
    expect(every.expertLoad).toEqual(all);
    expect(every.graphStats.captures).toBe(0); // observing steps run on the host path, never as graphs
    // Every third step: steps 0, 3 and 6 are counted; the others replay graphs as usual.
    const third = await engineFor(fx, layout, 16, { observeLoadEvery: 3 });
    expect(await decodeScript(third, 'third', script)).toEqual(want);
    expect(third.expertLoad.steps).toBe(3);
    for (const row of third.expertLoad.load) expect(row.reduce((a, b) => a + b, 0)).toBe(3 * 2 * K);
    expect(third.graphStats.captures + third.graphStats.replays).toBe(4 * 2); // 4 graph steps of 2 ranks
    third.resetExpertLoad();
    expect(third.expertLoad.steps).toBe(0);
    expect(third.expertLoad.load.flat().every((v) => v === 0)).toBe(true);
    // Off by default.
    const off = await engineFor(fx, layout, 16);
    await decodeScript(off, 'off', [A]);
    expect(off.expertLoad.steps).toBe(0);
  });

  it('with captureAfter 2 captures a shape at its second sighting (a shape seen once runs as usual); by default at its first', async () => {
    const layout = { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) };
    const A: string[][] = [['p'], []];
    const B: string[][] = [['p'], ['q']];
    const C: string[][] = [['p', 'r'], []];
    const script = [A, B, A, A, C, B, A];
    // Rank shapes: a = rank 0 with one sequence, b = rank 1 with one, c = rank 0 with two. A: a seen
    // once (deferred); B: a twice, b once (deferred: a step runs as graphs only when all its ranks
    // can); A: a captured; A: a replayed; C: c seen once (deferred); B: a replayed, b captured; A: a replayed.
    const expected = [
      [0, 0, 1], [0, 0, 2], [1, 0, 2], [1, 1, 2], [1, 1, 3], [2, 2, 3], [2, 3, 3],
    ].map(([captures, replays, deferred]) => ({ captures, replays, deferred }));
    const want = await decodeScript(await engineFor(fx, layout, 16, { graphs: false }), 'eager', script);
    const g = await engineFor(fx, layout, 16, { graphs: { captureAfter: 2 } });
    const stats: unknown[] = [];
    expect(await decodeScript(g, 'graph', script, () => {
      const { captures, replays, deferred } = g.graphStats;
      stats.push({ captures, replays, deferred });
    })).toEqual(want);
    expect(stats).toEqual(expected);
    expect(g.graphStats.cached).toBe(2);
    const d = await engineFor(fx, layout, 16, { graphs: true });
    expect(await decodeScript(d, 'default', [A, A])).toEqual(await decodeScript(await engineFor(fx, layout, 16, { graphs: false }), 'eager2', [A, A]));
    expect(d.graphStats).toMatchObject({ captures: 1, replays: 1, deferred: 0 });
  });

  it('replays a larger graph of the rank for a shape it covers, padded up to it, until the shape\'s coveredCaptureAfter-th sighting', async () => {
    const layout = { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) };
    const C: string[][] = [['p', 'r'], []]; // rank 0 with two sequences: c
    const A: string[][] = [['p'], []]; // rank 0 with one: a, which c covers (one padding sequence more)
    const B: string[][] = [[], ['q']]; // rank 1 with one: b, which no graph of rank 1 covers
    const script = [C, A, A, B, A, A];
    // C captures c; A replays c padded (covered, sighting 1); A again (sighting 2); B captures b (a
    // graph of rank 0 never covers rank 1); A captures a at its third sighting; A replays a.
    const expected = [[1, 0, 0], [1, 1, 1], [1, 2, 2], [2, 2, 2], [3, 2, 2], [3, 3, 2]];
    const want = await decodeScript(await engineFor(fx, layout, 16, { graphs: false }), 'eager', script);
    const g = await engineFor(fx, layout, 16, { graphs: { captureAfter: 1, coveredCaptureAfter: 3 } });
    const stats: number[][] = [];
    expect(await decodeScript(g, 'graph', script, () => stats.push([g.graphStats.captures, g.graphStats.replays, g.graphStats.covered]))).toEqual(want);
    expect(stats).toEqual(expected);
    expect(g.graphStats).toMatchObject({ cached: 3, deferred: 0 });
  });

  it('covers a shape only with a graph of at most 16 tokens more; by default captures a covered shape at its fourth sighting', async () => {
    const layout = { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) };
    const many = Array.from({ length: 17 }, (_, i) => `s${i}`); // 17 sequences: the 24 bucket
    const big: string[][] = [many, []];
    const eight: string[][] = [many.slice(0, 8), []];
    const one: string[][] = [['s0'], []];
    const script = [big, one, eight, one];
    // big captures (24 tokens); one (1 token: 23 more) is not covered by it, captured; eight (16 more) is
    // covered by big; one replays its own.
    const want = await decodeScript(await engineFor(fx, layout, 64, { graphs: false }), 'eager', script);
    const g = await engineFor(fx, layout, 64, { graphs: { captureAfter: 1, coveredCaptureAfter: 99 } });
    const stats: number[][] = [];
    expect(await decodeScript(g, 'graph', script, () => stats.push([g.graphStats.captures, g.graphStats.covered]))).toEqual(want);
    expect(stats).toEqual([[1, 0], [2, 0], [2, 1], [2, 1]]);
    // With the default, a fresh engine: eight captures, then one (covered by it: 7 more) is covered three
    // times and captured at its fourth sighting.
    const d = await engineFor(fx, layout, 64, { graphs: true });
    const defaultScript = [eight, one, one, one, one, one];
    const dstats: number[][] = [];
    expect(await decodeScript(d, 'default', defaultScript, () => dstats.push([d.graphStats.captures, d.graphStats.covered])))
      .toEqual(await decodeScript(await engineFor(fx, layout, 64, { graphs: false }), 'eager2', defaultScript));
    expect(dstats).toEqual([[1, 0], [1, 1], [1, 2], [1, 3], [2, 3], [2, 3]]);
  });

  it('captures at most one covered shape per step when several reach coveredCaptureAfter together', async () => {
    const layout = { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) };
    const two: string[][] = [['p', 'r'], ['q', 's']];
    const one: string[][] = [['p'], ['q']];
    const script = [two, one, one, one, one];
    // two captures both ranks; one: both covered (sighting 1); one: both at sighting 2, rank 0
    // captured, rank 1 covered; one: rank 1 captured (rank 0 replays its own); one: both replay.
    const want = await decodeScript(await engineFor(fx, layout, 16, { graphs: false }), 'eager', script);
    const g = await engineFor(fx, layout, 16, { graphs: { captureAfter: 1, coveredCaptureAfter: 2 } });
    const stats: number[][] = [];
    const captured: number[][][] = [];
    expect(await decodeScript(g, 'graph', script, () => {
      stats.push([g.graphStats.captures, g.graphStats.replays, g.graphStats.covered]);
      captured.push(g.lastStepCaptures.map((x) => [x.rank, x.T, x.S]));
    })).toEqual(want);
    expect(stats).toEqual([[2, 0, 0], [2, 2, 2], [3, 3, 3], [4, 4, 3], [4, 6, 3]]);
    // lastStepCaptures: the rank shapes each step captured (padded: one sequence is bucket 1, two bucket 2).
    expect(captured).toEqual([[[0, 2, 2], [1, 2, 2]], [], [[0, 1, 1]], [[1, 1, 1]], []]);
  });

  it('captures a decoding batch again only when its block table stride doubles (padded to a power of two)', async () => {
    const layout = { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) };
    // Two sequences on rank 1 from position 0 to 49: 1, 2, 3 then 4 blocks of 16 (MB 3 runs padded to 4).
    const script: string[][][] = Array.from({ length: 50 }, () => [[], ['p', 'q']]);
    const want = await decodeScript(await engineFor(fx, layout, 16, { graphs: false }), 'eager', script);
    const g = await engineFor(fx, layout, 16);
    expect(await decodeScript(g, 'graph', script)).toEqual(want);
    expect(g.graphStats).toMatchObject({ captures: 3, replays: 47 });
  });

  it('runs host-path, mixed, prompt-chunk, logits and graph: false steps without a graph, and a decode step with one', async () => {
    // T*K <= 12: at most 6 tokens per rank on the device path.
    const e = await engineFor(fx, { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) }, 16, { deviceRoutingMaxRows: 12 });
    const eager = await engineFor(fx, { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) }, 16, { deviceRoutingMaxRows: 12, graphs: false });
    const route = vi.spyOn(ModelKernels.prototype, 'routeRows');
    const gotTokens: number[] = [];
    const wantTokens: number[] = [];
    try {
      for (const [engine, tag] of [[eager, 'e'], [e, 'g']] as const) {
        const b0 = fx.hmm.kv.allocate(`${tag}0`, 0, 2), b1 = fx.hmm.kv.allocate(`${tag}1`, 1, 2);
        try {
          const prompt = [5, 17, 33, 2, 90, 11, 12, 13, 14];
          const results: number[] = [];
          const pos = { x: 0, y: 0 };
          const last = { x: 0, y: 0 };
          /** x (rank 0) and y (rank 1) decode one token each. */
          const decodeXY = (options?: { returnLogits?: boolean; graph?: boolean }) => engine.step({ ranks: [
            [{ seqId: 'x', tokens: [last.x], startPos: pos.x, blockTable: b0, sample: true }],
            [{ seqId: 'y', tokens: [last.y], startPos: pos.y, blockTable: b1, sample: true }]] }, options);
          const took = (res: { next: Map<string, number> }, ...ids: Array<'x' | 'y' | 'z'>) => {
            for (const id of ids) {
              results.push(res.next.get(id)!);
              if (id !== 'z') {
                last[id] = res.next.get(id)!;
                pos[id] += pos[id] === 0 ? prompt.length : 1; // a prefill of the prompt, or one decoded token
              }
            }
          };
          const stats = (captures: number) => {
            if (engine === e) expect(e.graphStats).toMatchObject({ captures, replays: 0 });
          };
          // Prefill of 9 tokens on rank 0 (host path).
          took(await engine.step({ ranks: [[{ seqId: 'x', tokens: prompt, startPos: 0, blockTable: b0, sample: true }]] }), 'x');
          stats(0);
          // Mixed: rank 0 decodes (device path), rank 1 prefills 9 tokens (host path).
          took(await engine.step({ ranks: [[{ seqId: 'x', tokens: [last.x], startPos: pos.x, blockTable: b0, sample: true }],
            [{ seqId: 'y', tokens: prompt, startPos: 0, blockTable: b1, sample: true }]] }), 'x', 'y');
          stats(0);
          // Device path, a prompt chunk of 3 tokens on rank 1 (T > S): a graph (padded to T = 4, S = 2).
          const z = fx.hmm.kv.allocate(`${tag}z`, 1, 1);
          took(await engine.step({ ranks: [[], [{ seqId: 'z', tokens: [1, 2, 3], startPos: 0, blockTable: z, sample: true }]] }), 'z');
          fx.hmm.kv.free(`${tag}z`);
          stats(1);
          // Device path with logits: as usual.
          route.mockClear();
          const withLogits = await decodeXY({ returnLogits: true });
          expect(withLogits.logits!.size).toBe(2);
          expect(route).toHaveBeenCalled();
          took(withLogits, 'x', 'y');
          stats(1);
          // Device path, a graph declined by the step.
          took(await decodeXY({ graph: false }), 'x', 'y');
          stats(1);
          // Device path, no logits: a graph per rank (both shapes new).
          took(await decodeXY(), 'x', 'y');
          stats(3);
          expect(pos).toEqual({ x: 13, y: 12 });
          (engine === e ? gotTokens : wantTokens).push(...results);
        } finally {
          fx.hmm.kv.free(`${tag}0`);
          fx.hmm.kv.free(`${tag}1`);
        }
      }
      expect(gotTokens).toEqual(wantTokens);
    } finally {
      route.mockRestore();
    }
  });

  it('turns graphs off when the backend refuses a capture (NotSupportedError) and runs the step as usual', async () => {
    const layout = { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) };
    const script: string[][][] = [[['p'], ['q']], [['p'], ['q']], [['p'], ['q']]];
    const want = await decodeScript(await engineFor(fx, layout, 16, { graphs: false }), 'eager', script);
    try {
      // Refused at once (as ACL does), or in the middle of the capture (a launch it cannot record).
      for (const [op, nth] of [['BeginCapture', 1], ['Launch', 5]] as const) {
        const e = await engineFor(fx, layout, 16);
        fx.rt.injectFault(op, nth, 'NOT_SUPPORTED');
        expect(await decodeScript(e, `${op}`, script)).toEqual(want);
        const st = e.graphStats;
        expect(st).toMatchObject({ enabled: false, captures: 0, replays: 0, cached: 0 });
        expect(st.disabledReason).toMatch(/^NotSupportedError: .*injected fault/);
      }
      // Any other capture failure fails the step; the engine keeps serving, with graphs.
      const e = await engineFor(fx, layout, 16);
      fx.rt.injectFault('EndCapture', 1, 'OUT_OF_MEMORY');
      await expect(decodeScript(e, 'oom', script.slice(0, 1))).rejects.toBeInstanceOf(OutOfMemoryError);
      expect(e.graphStats).toMatchObject({ enabled: true, captures: 0, cached: 0 });
      expect(await decodeScript(e, 'after', script)).toEqual(want);
      expect(e.graphStats).toMatchObject({ enabled: true, captures: 2, replays: 4 }); // one graph per rank
    } finally {
      fx.rt.clearFaults();
    }
  });

  it('maps a pool whose chunks end in padding: blocks where the HMM has them, same tokens', async () => {
    const rt = openMock({ mockCapacity: 128 * MIB });
    const hmm = new Hmm(rt);
    try {
      await hmm.loadSynthetic(weightSpecs(config, [0, 1], roundRobinPlacement(8, [0, 1])), { seed: SEED, scaleFor });
      // 12-token blocks of 3072 bytes: 682 per 2 MiB chunk, 1024 bytes of padding each.
      const geo = kvGeometry(config, 12);
      for (const d of [0, 1]) hmm.kv.createPool({ device: d, blockBytes: geo.blockBytes, blocks: 1500, maxChunkBytes: 2 * MIB });
      const views = mapHmmKvPools(rt, hmm, [0, 1]);
      try {
        const v0 = views.get(0)!;
        expect(v0.blocksPerChunk).toBe(682);
        expect(v0.blockOffset(681)).toBe(681 * 3072);
        expect(v0.blockOffset(682)).toBe(v0.stride);
        expect(v0.stride % 3072).toBe(0);
        expect(v0.stride).toBeGreaterThanOrEqual(2 * MIB);
        // A block written through the HMM's mapping reads back through the view.
        for (const b of [0, 681, 682, 1499]) {
          const data = pattern(3072, b + 1);
          await rt.write(hmm.kv.blockPointer(0, b), data, hmm.store.stream(0));
          expect(sameBytes(await rt.read(v0.base.add(v0.blockOffset(b)), 3072, hmm.store.stream(0)), data)).toBe(true);
        }
        // The sequences straddle chunk boundaries: push them to blocks 678.. on both devices.
        hmm.kv.allocate('filler0', 0, 678);
        hmm.kv.allocate('filler1', 1, 678);
        const e = await ForwardEngine.create(rt, config, { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) }, storeWeights(hmm.store), views, { maxTokensPerStep: 16 });
        try {
          expect(e.blockTokens).toBe(12);
          expectIdentical(await generate(e, hmm, PROMPTS.slice(0, 3), { steps: 4 }), baseline, 'padded pool');
        } finally {
          e.dispose();
        }
        hmm.kv.free('filler0');
        hmm.kv.free('filler1');
      } finally {
        for (const v of views.values()) v.dispose();
      }
      // A chunk list that breaks the pool's rule is refused.
      const { chunks, info } = hmmKvChunks(hmm, 0);
      const other = hmmKvChunks(hmm, 1).chunks;
      expect(() => mapKvPool(rt, [chunks[0]!, other[1]!], info.blocksPerChunk, info.blockBytes, [0])).toThrow(/chunks\[1\]/);
      expect(() => mapKvPool(rt, chunks, 700, info.blockBytes, [0])).toThrow(/chunks\[0\]\.size/);
      expect(() => mapKvPool(rt, chunks, info.blocksPerChunk, info.blockBytes, [0], 5000)).toThrow(/blocks/);
    } finally {
      hmm.dispose();
    }
  });

  it('serves from weights and KV chunks attached through the HMM daemon', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'emoe-fwd-'));
    dirs.push(dir);
    const daemon = await HmmDaemon.listen(fx.hmm, path.join(dir, 'hmm.sock'));
    const client = await HmmClient.connect(path.join(dir, 'hmm.sock'), fx.rt, { name: 'forward-test' });
    try {
      const set = await client.attach();
      const manifest = await client.manifest();
      const views = mapAttachedKvPools(fx.rt, set, manifest.kvPools.filter((p) => p.device < 2));
      try {
        const e = await ForwardEngine.create(fx.rt, config, { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) },
          attachedWeights(set), views, { maxTokensPerStep: 16 });
        try {
          expectIdentical(await generate(e, fx.hmm, PROMPTS.slice(0, 3), { steps: 4 }), baseline, 'attached');
        } finally {
          e.dispose();
        }
      } finally {
        for (const v of views.values()) v.dispose();
        set.dispose();
      }
    } finally {
      client.close();
      await daemon.close();
    }
  });
});
