// The baselines elastic scaling is measured against, in the same process and the
// same run (scripts/bench-scale.mjs), built from the same parts as Deployment —
// Hmm (chunk store, KV pools), ForwardEngine, Engine — with nothing shared with
// the elastic path that would flatter them or hold them back:
//
// Cold restart (the bench itself): stop, load the weights from safetensors on
//   local disk, start, first token.
//
// Replica (horizontal scaling): a second, independent copy of the model on fresh
//   devices — its own Hmm, weights loaded from the same source the cold restart
//   uses (safetensors on local disk), its own KV pools, forward pass and engine —
//   while the original keeps serving. Horizontal scaling adds a whole replica of
//   the current configuration at once (2 devices → 4), not one device.
//
// Vertical, the paper's "extravagant" baseline (VerticalBaseline): the new layout
//   over all target devices is built on fresh memory while the old layout keeps
//   serving — every weight chunk of the new layout is allocated anew and copied
//   from the running layout's chunks, a new forward pass is created on them, then
//   the engine switches over and the old layout's weight memory is released. Peak
//   weight memory on a device that stays is about twice its weights.
//   Source of the copies: the paper's variant loads the new layout's weights from
//   the surviving devices by peer-to-peer copy (we could not retrieve the paper's
//   exact wording; this is our reading). A chunk of the new layout whose group the
//   old layout holds on the same device is copied device-locally from it (the
//   cheapest source there is); any other chunk is copied P2P from the devices that
//   hold it (up to two, striped), as the elastic path does. Its placement is round
//   robin over the target devices, as a fresh instance would start. The KV cache is
//   handled exactly as in the elastic path (kept in place on devices that stay,
//   moved off leaving devices at the switch), so the comparison isolates what the
//   weights cost; the copies are paced with the same PrepareOptions.
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';

import { Engine, type Completion, type GenerationCallbacks, type GenerationRequest, type ReconfigureReport, type StepFigures } from '../executor/engine.js';
import { ForwardEngine, type ForwardEngineOptions } from '../executor/forward.js';
import { type MappedKvPool, mapHmmKvPools } from '../executor/kv-view.js';
import { type WeightSource, kvGeometry } from '../executor/types.js';
import { storeWeights } from '../executor/weights.js';
import type { ChunkStore, StoredChunk } from '../hmm/chunk-store.js';
import { Hmm } from '../hmm/hmm.js';
import type { TensorLocation } from '../hmm/placement.js';
import { INDEX_FILE, openCheckpoint, writeSafetensors, type TensorData } from '../hmm/safetensors.js';
import { type LoadOptions, loadCheckpoint } from '../hmm/weight-loader.js';
import type { ModelConfig } from '../model/config.js';
import { weightShapes, weightSpecs } from '../model/weights.js';
import { InvalidArgumentError } from '../runtime/errors.js';
import type { Runtime } from '../runtime/runtime.js';
import { type LayoutSpec, roundRobinLayout, toExpertPlacement, validateLayout } from './layout.js';
import { switchOver } from './orchestrator.js';
import { type CopyJob, type PacedCopyStats, type PrepareOptions, pacedCopy, resolvePrepare } from './pacing.js';

/** What a serving instance needs besides its weights (the same fields as DeploymentOptions). */
export interface ServingOptions {
  rt: Runtime;
  config: ModelConfig;
  /** KV blocks of the pool created on every device of a layout. */
  kvBlocksPerDevice: number;
  /** Tokens per KV block (default 16). */
  blockTokens?: number;
  /** Token budget of one step on each DP rank (default 64). */
  maxTokensPerStep?: number;
  /** Most running sequences per DP rank (default 64). */
  maxSeqs?: number;
  onStep?: (figures: StepFigures) => void;
  /** Forward-pass options of the baseline's engines (graphs, routing thresholds, kvDtype), as DeploymentOptions.forward. */
  forward?: Omit<ForwardEngineOptions, 'maxTokensPerStep' | 'blockTokens'>;
}

const now = () => performance.now();
/** The KV pools' geometry for the engines' kvDtype. */
const geometryOf = (o: ServingOptions) => kvGeometry(o.config, o.blockTokens ?? 16, o.forward?.kvDtype ?? 'bf16');
const cloneLayout = (l: LayoutSpec): LayoutSpec => ({ ...l, devices: [...l.devices], placement: l.placement.map((row) => row.map((h) => [...h])) });

function checkBlocks(o: ServingOptions): void {
  const b = o.kvBlocksPerDevice;
  if (!Number.isSafeInteger(b) || b < 1) throw new InvalidArgumentError('kvBlocksPerDevice', `a positive integer (got ${String(b)})`);
}

function layoutFor(o: ServingOptions, devices: number[]): LayoutSpec {
  const layout = roundRobinLayout(devices, o.config.layers, o.config.experts);
  validateLayout(layout, { experts: o.config.experts, layers: o.config.layers, deviceCount: o.rt.deviceCount, peers: o.rt.peerMatrix() });
  return layout;
}

function createForward(o: ServingOptions, weights: WeightSource, layout: LayoutSpec, views: ReadonlyMap<number, MappedKvPool>): Promise<ForwardEngine> {
  const kv = new Map(layout.devices.map((d) => [d, views.get(d)!] as const));
  return ForwardEngine.create(o.rt, o.config, { devices: [...layout.devices], placement: toExpertPlacement(layout) }, weights, kv,
    { ...o.forward, maxTokensPerStep: o.maxTokensPerStep ?? 64, blockTokens: o.blockTokens ?? 16 });
}

function createEngine(o: ServingOptions, forward: ForwardEngine, hmm: Hmm, devices: number[]): Engine {
  return new Engine({
    stepper: forward,
    kv: hmm.kv,
    devices,
    blockTokens: o.blockTokens ?? 16,
    maxTokensPerStep: o.maxTokensPerStep ?? 64,
    maxSeqs: o.maxSeqs ?? 64,
    eosTokenIds: o.config.eosTokenIds,
    maxSeqLen: o.config.maxPositions,
    vocabSize: o.config.vocabSize,
    ...(o.onStep ? { onStep: o.onStep } : {}),
  });
}

/** Bytes of weight chunks per device ordinal (0 .. deviceCount - 1) in a store. */
export function weightBytesByDevice(store: ChunkStore, deviceCount: number): number[] {
  const out = new Array<number>(deviceCount).fill(0);
  for (const c of store.all()) if (c.plan.kind === 'weight') out[c.plan.device]! += c.plan.size;
  return out;
}

// ---------------------------------------------------------------- checkpoint export

/**
 * Writes the model's weights as held in `store` (one replica of each tensor) as a
 * sharded safetensors checkpoint in `dir` (`files` shards and the index), so a
 * replica or a cold restart loads exactly the weights a synthetic deployment serves.
 */
export async function exportCheckpoint(store: ChunkStore, config: ModelConfig, dir: string, options: { files?: number } = {}): Promise<{ bytes: number; files: string[] }> {
  const names = weightShapes(config).map((w) => w.name);
  const files = Math.max(1, Math.min(names.length, options.files ?? 1));
  mkdirSync(dir, { recursive: true });
  const perFile = Math.ceil(names.length / files);
  const weightMap: Record<string, string> = {};
  const written: string[] = [];
  let bytes = 0;
  for (let f = 0; f * perFile < names.length; f++) {
    const file = `model-${String(f + 1).padStart(5, '0')}-of-${String(files).padStart(5, '0')}.safetensors`;
    const tensors: TensorData[] = [];
    for (const name of names.slice(f * perFile, (f + 1) * perFile)) {
      const ref = store.tensor(name);
      const data = await store.rt.read(ref.ptr, ref.location.bytes, store.stream(ref.chunk.plan.device));
      tensors.push({ name, dtype: ref.location.dtype, shape: [...ref.location.shape], data });
      weightMap[name] = file;
      bytes += data.byteLength;
    }
    await writeSafetensors(path.join(dir, file), tensors);
    written.push(path.join(dir, file));
  }
  writeFileSync(path.join(dir, INDEX_FILE), JSON.stringify({ metadata: { total_size: bytes }, weight_map: weightMap }));
  return { bytes, files: written };
}

// ---------------------------------------------------------------- horizontal: a replica on fresh devices

export interface ReplicaOptions extends ServingOptions {
  /** Fresh devices: none may be used by another instance (the replica's weights and KV pools go there). */
  devices: number[];
  /** A safetensors checkpoint (folder or file) on local disk: the source the cold restart uses. */
  checkpoint: string;
  /** Staging of the load (see LoadOptions). */
  load?: Omit<LoadOptions, 'holder'>;
}

export interface ReplicaTimings {
  /** Reading the checkpoint's headers. */
  openMs: number;
  /** Weights from disk onto the devices. */
  loadMs: number;
  /** KV pools created and mapped. */
  kvMs: number;
  /** Forward pass (kernels, scratch) and engine. */
  engineMs: number;
  totalMs: number;
}

/**
 * Horizontal scaling's new instance: an independent copy of the model on fresh
 * devices, loaded from disk, with its own HMM, KV pools, forward pass and engine.
 * Routing requests between it and the original is the caller's (the bench's) job.
 */
export class Replica {
  private closed = false;

  private constructor(
    readonly hmm: Hmm,
    readonly engine: Engine,
    readonly layout: LayoutSpec,
    readonly timings: ReplicaTimings,
    private readonly forward: ForwardEngine,
    private readonly views: Map<number, MappedKvPool>,
  ) {}

  static async start(options: ReplicaOptions): Promise<Replica> {
    checkBlocks(options);
    const t0 = now();
    const layout = layoutFor(options, options.devices);
    const { rt, config } = options;
    const hmm = new Hmm(rt);
    let views: Map<number, MappedKvPool> | undefined;
    let forward: ForwardEngine | undefined;
    try {
      let t = now();
      const checkpoint = await openCheckpoint(options.checkpoint);
      const openMs = now() - t;
      t = now();
      await loadCheckpoint(hmm.store, hmm.placement(weightSpecs(config, layout.devices, toExpertPlacement(layout))), checkpoint, options.load ?? {});
      const loadMs = now() - t;
      t = now();
      const { blockBytes } = geometryOf(options);
      for (const d of layout.devices) hmm.kv.createPool({ device: d, blockBytes, blocks: options.kvBlocksPerDevice });
      views = mapHmmKvPools(rt, hmm, layout.devices);
      const kvMs = now() - t;
      t = now();
      forward = await createForward(options, storeWeights(hmm.store), layout, views);
      const engine = createEngine(options, forward, hmm, layout.devices);
      const engineMs = now() - t;
      return new Replica(hmm, engine, layout, { openMs, loadMs, kvMs, engineMs, totalMs: now() - t0 }, forward, views);
    } catch (e) {
      forward?.dispose();
      for (const v of views?.values() ?? []) v.dispose();
      hmm.dispose();
      throw e;
    }
  }

  get devices(): number[] {
    return [...this.layout.devices];
  }

  submit(request: GenerationRequest, callbacks?: GenerationCallbacks): Promise<Completion> {
    return this.engine.submit(request, callbacks);
  }

  /** Cancels its requests in flight and frees everything it allocated. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.engine.close();
    this.forward.dispose();
    for (const v of this.views.values()) v.dispose();
    this.views.clear();
    this.hmm.dispose();
  }
}

// ---------------------------------------------------------------- vertical: the paper's "extravagant" scaling

export interface VerticalBaselineOptions extends ServingOptions {
  /** Devices of the initial layout (experts dealt round robin). */
  devices: number[];
  /** Seed of the synthetic weights (default 0); the same weights as a Deployment with the same seed. */
  seed?: bigint;
  scaleFor?: (t: TensorLocation) => number;
  /** Pacing of the copies (the same options and defaults as the elastic prepare phase). */
  prepare?: PrepareOptions;
}

export type VerticalPhase = 'plan' | 'prepare' | 'attach' | 'switch' | 'release' | 'rollback' | 'done';

export interface VerticalScaleReport {
  from: number[];
  to: number[];
  /** Command to release done. */
  ms: number;
  phases: { planMs: number; prepareMs: number; attachMs: number; switchMs: number; releaseMs: number };
  /** Every weight byte of the new layout, copied into new chunks. */
  bytesCopied: number;
  /** Of which copied within a device (the group was already there) and peer-to-peer. */
  bytesCopiedLocal: number;
  bytesCopiedPeer: number;
  chunksCopied: number;
  /** Weight bytes per device ordinal: before the scale, at its peak (both layouts' weights), after release. */
  weightBytes: { before: number[]; peak: number[]; after: number[] };
  switchover: ReconfigureReport;
  prepare: { options: Required<PrepareOptions>; stats?: PacedCopyStats };
  layout: LayoutSpec;
}

/**
 * A serving instance that scales vertically the paper's "extravagant" way (see the
 * top of this file). The KV pools live in one HMM for the instance's life; the
 * weights of the current layout in another, replaced wholesale by each scale.
 */
export class VerticalBaseline {
  private scaling: Promise<unknown> | undefined;
  private closed = false;
  private switches = 0;

  private constructor(
    private readonly options: VerticalBaselineOptions,
    /** KV pools (and only those). */
    readonly kvHmm: Hmm,
    /** The current layout's weights. */
    private weightHmm: Hmm,
    readonly engine: Engine,
    private layoutSpec: LayoutSpec,
    private forward: ForwardEngine,
    private readonly views: Map<number, MappedKvPool>,
  ) {}

  static async start(options: VerticalBaselineOptions): Promise<VerticalBaseline> {
    checkBlocks(options);
    const { rt, config } = options;
    const layout = layoutFor(options, options.devices);
    const kvHmm = new Hmm(rt);
    const weightHmm = new Hmm(rt);
    let views: Map<number, MappedKvPool> | undefined;
    let forward: ForwardEngine | undefined;
    try {
      const load: { seed?: bigint; scaleFor?: (t: TensorLocation) => number } = {};
      if (options.seed !== undefined) load.seed = options.seed;
      if (options.scaleFor) load.scaleFor = options.scaleFor;
      await weightHmm.loadSynthetic(weightSpecs(config, layout.devices, toExpertPlacement(layout)), load);
      const { blockBytes } = geometryOf(options);
      for (const d of layout.devices) kvHmm.kv.createPool({ device: d, blockBytes, blocks: options.kvBlocksPerDevice });
      views = mapHmmKvPools(rt, kvHmm, layout.devices);
      forward = await createForward(options, storeWeights(weightHmm.store), layout, views);
      const engine = createEngine(options, forward, kvHmm, layout.devices);
      return new VerticalBaseline(options, kvHmm, weightHmm, engine, layout, forward, views);
    } catch (e) {
      forward?.dispose();
      for (const v of views?.values() ?? []) v.dispose();
      weightHmm.dispose();
      kvHmm.dispose();
      throw e;
    }
  }

  get rt(): Runtime {
    return this.options.rt;
  }
  get devices(): number[] {
    return [...this.layoutSpec.devices];
  }
  get layout(): LayoutSpec {
    return cloneLayout(this.layoutSpec);
  }
  /** Switch-overs done so far. */
  get epoch(): number {
    return this.switches;
  }
  /** The store holding the current layout's weights. */
  get weights(): ChunkStore {
    return this.weightHmm.store;
  }

  submit(request: GenerationRequest, callbacks?: GenerationCallbacks): Promise<Completion> {
    return this.engine.submit(request, callbacks);
  }

  /**
   * Scales to `target.devices` the extravagant way while serving. Rejects (after
   * freeing everything made for the new layout, the old one still serving) when a
   * step before the switch-over fails. One scale at a time.
   */
  async scale(target: { devices: number[] }, options: { onProgress?: (phase: VerticalPhase) => void; prepare?: PrepareOptions } = {}): Promise<VerticalScaleReport> {
    if (this.closed) throw new InvalidArgumentError('deployment', 'open (it is closed)');
    if (this.scaling) throw new InvalidArgumentError('scale', 'called once the previous scale has finished');
    const run = this.doScale(target, options);
    this.scaling = run;
    try {
      return await run;
    } finally {
      this.scaling = undefined;
    }
  }

  private async doScale(target: { devices: number[] }, options: { onProgress?: (phase: VerticalPhase) => void; prepare?: PrepareOptions }): Promise<VerticalScaleReport> {
    const { rt, config } = this.options;
    const t0 = now();
    let mark = t0;
    const lap = () => {
      const t = now();
      const ms = t - mark;
      mark = t;
      return ms;
    };
    const progress = (p: VerticalPhase) => options.onProgress?.(p);
    const from = this.devices;
    const to = Array.isArray(target?.devices) ? [...target.devices] : [];
    const old = this.weightHmm.store;
    const phases = { planMs: 0, prepareMs: 0, attachMs: 0, switchMs: 0, releaseMs: 0 };
    const before = weightBytesByDevice(old, rt.deviceCount);

    const fresh = new Hmm(rt);
    const createdPools: number[] = [];
    let newViews = new Map<number, MappedKvPool>();
    let standby: ForwardEngine | undefined;
    const rollback = () => {
      progress('rollback');
      for (const step of [
        () => standby?.dispose(),
        ...[...newViews.values()].map((v) => () => v.dispose()),
        () => fresh.dispose(),
        ...createdPools.map((d) => () => this.kvHmm.kv.destroyPool(d)),
      ]) {
        try {
          step();
        } catch {
          // Best effort: the original error is what the caller needs to see.
        }
      }
      newViews = new Map();
    };

    let next: LayoutSpec;
    let prep: Required<PrepareOptions>;
    let stats: PacedCopyStats;
    let bytesLocal = 0;
    let bytesPeer = 0;
    let jobs: CopyJob[];
    let peak: number[];
    try {
      // 1. Plan: a fresh round-robin layout over the target devices; every chunk of it is copied.
      progress('plan');
      prep = resolvePrepare(this.options.prepare, options.prepare);
      next = layoutFor(this.options, to);
      const plans = fresh.placement(weightSpecs(config, next.devices, toExpertPlacement(next)));
      const byGroup = new Map<string, StoredChunk[]>();
      for (const c of old.all()) {
        if (c.plan.kind !== 'weight') continue;
        // Dense chunks are packed the same way on every device: dense@<d>#<i> matches dense@<d'>#<i>.
        const key = c.plan.group === 'dense' ? `dense${c.plan.id.slice(c.plan.id.indexOf('#'))}` : c.plan.group;
        const list = byGroup.get(key);
        if (list) list.push(c);
        else byGroup.set(key, [c]);
      }
      jobs = plans.map((plan) => {
        const key = plan.group === 'dense' ? `dense${plan.id.slice(plan.id.indexOf('#'))}` : plan.group;
        const holders = (byGroup.get(key) ?? []).filter((c) => c.plan.size === plan.size);
        const local = holders.find((c) => c.plan.device === plan.device);
        if (local) {
          bytesLocal += plan.size;
          return { plan, sources: [local] };
        }
        if (holders.length === 0) throw new InvalidArgumentError('plan', `a chunk of the running layout to copy ${plan.id} from (none holds ${key})`);
        bytesPeer += plan.size;
        // As the elastic path: striped over up to two holders (dense: over every replica).
        const sorted = [...holders].sort((a, b) => a.plan.device - b.plan.device);
        return { plan, sources: plan.group === 'dense' ? sorted : sorted.slice(0, 2) };
      });
      phases.planMs = lap();

      // 2. Prepare: KV pools on new devices; every weight of the new layout into new chunks.
      progress('prepare');
      const oldSet = new Set(from);
      const { blockBytes } = geometryOf(this.options);
      for (const d of next.devices) {
        if (oldSet.has(d)) continue;
        this.kvHmm.kv.createPool({ device: d, blockBytes, blocks: this.options.kvBlocksPerDevice });
        createdPools.push(d);
      }
      ({ stats } = await pacedCopy(fresh.store, jobs, { ...prep, holder: 'hmm', stripeAlignment: rt.granularity(0) }));
      const added = weightBytesByDevice(fresh.store, rt.deviceCount);
      peak = before.map((b, d) => b + added[d]!);
      phases.prepareMs = lap();

      // 3. Attach: a new forward pass on the new chunks.
      progress('attach');
      newViews = mapHmmKvPools(rt, this.kvHmm, createdPools);
      standby = await createForward(this.options, storeWeights(fresh.store), next, new Map([...this.views, ...newViews]));
      phases.attachMs = lap();
    } catch (e) {
      rollback();
      throw e;
    }

    // 4. Switch over between two engine steps (the same as the elastic path).
    progress('switch');
    let switchover: ReconfigureReport;
    try {
      switchover = await switchOver(this.engine, standby, next.devices, this.kvHmm);
    } catch (e) {
      rollback();
      throw e;
    }
    const oldForward = this.forward;
    const oldWeights = this.weightHmm;
    this.forward = standby;
    this.weightHmm = fresh;
    this.layoutSpec = next;
    this.switches++;
    for (const [d, v] of newViews) this.views.set(d, v);
    phases.switchMs = lap();

    // 5. Release the old layout's weights (all of them) and the pools of devices that left,
    // after the first step on the new layout, as the elastic path does (a fair baseline: the
    // release's frees do not delay that step).
    await this.engine.afterNextStep();
    progress('release');
    oldForward.dispose();
    oldWeights.dispose();
    const stay = new Set(next.devices);
    for (const d of from) {
      if (stay.has(d)) continue;
      this.views.get(d)?.dispose();
      this.views.delete(d);
      this.kvHmm.kv.destroyPool(d);
    }
    phases.releaseMs = lap();
    progress('done');
    return {
      from, to: [...next.devices], ms: now() - t0, phases, bytesCopied: bytesLocal + bytesPeer, bytesCopiedLocal: bytesLocal, bytesCopiedPeer: bytesPeer,
      chunksCopied: jobs.length, weightBytes: { before, peak, after: weightBytesByDevice(fresh.store, rt.deviceCount) }, switchover,
      prepare: { options: prep, stats }, layout: cloneLayout(next),
    };
  }

  /** Cancels the requests in flight, waits for a scale in progress, frees everything. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.scaling?.catch(() => undefined);
    await this.engine.close();
    this.forward.dispose();
    for (const v of this.views.values()) v.dispose();
    this.views.clear();
    this.weightHmm.dispose();
    this.kvHmm.dispose();
  }
}
