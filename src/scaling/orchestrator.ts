// The scale orchestrator: one serving deployment — an in-process HMM that owns
// every weight and KV byte, the current layout, its forward pass and the request
// engine — that grows and shrinks one device set to another while it serves
// (DESIGN.md "Scale-up, L → L'"):
//
//   1. plan      planPlacement / diffLayouts / scheduleTransfers (pure): the new
//                placement, what is reused in place, copied, released.
//   2. prepare   while the engine keeps stepping on the old layout: KV pools on
//                the new devices; dense weights and expert chunks copied P2P
//                (all or nothing) under the new layout's holder, paced
//                (pacing.ts: bounded batches, one host wait per batch, target
//                chunks created ahead in groups, the serving loop given turns
//                in between; `prepare: { paced: false }` is the HMM's
//                CopyService, everything at once); chunks the new layout
//                reuses retained under that holder too. Targets whose standby
//                chunk was filled ahead (prefillStandby) are adopted, not copied.
//   3. attach    a standby ForwardEngine for the new layout (kernels loaded,
//                scratch allocated, new KV pools mapped, weights resolved), which
//                then captures the staying devices' recent step graphs ahead
//                (precaptureGraphs; best effort), so the first new steps replay.
//                For a planned scale-up the engine was made ahead (standbyEngines,
//                ready.ts): the attach phase only captures the shapes it lacks.
//   4. switch    Engine.reconfigure, applied between two engine steps: the new
//                forward pass and rank→device assignment from the next step on;
//                sequences whose device stays keep their KV blocks in place,
//                those on a leaving device get their blocks moved (hmm.kv.move)
//                before the first new step; submissions are admitted throughout.
//   5. release   after the first step on the new layout: the old forward pass
//                disposed in pieces (its pinned buffers kept for the next engine,
//                hostPool), chunks held only by the old layout freed in groups,
//                KV pools of leaving devices destroyed.
//   6. roll back on any failure before the switch-over: the old layout never
//                stopped serving; the standby engine, new KV views, new pools and
//                every chunk held for the new layout are freed, so device memory
//                is exactly as before the attempt.
//
// Ahead of the next scale (after start, and after every scale or rollback), in the
// background: the plans of the scales by one device, the standby chunks a scale-up onto
// each idle device would copy into (taken by its prepare phase instead of creating
// chunks), filled with the bytes that scale-up would copy (prefillStandby), the standby engine of
// each such scale-up made over them and kept following the serving engine's shapes
// (standbyEngines), and, with executor processes, one process started, warmed up and attaching the
// serving layout's chunks (preattach: its init then imports only what the new layout
// adds). When the
// standby chunks cover a scale, its copies are queued at once and the attach phase runs
// while they copy; the switch-over waits for them.
//
// Modules: what a deployment takes and a scale reports (deployment-options.ts), the executor
// processes and their daemon (executor-processes.ts), the release after a switch-over
// (release.ts), the work ahead (ahead.ts, ready.ts, ready-process.ts), pacing (pacing.ts).
//
// Holders: every weight chunk of a layout is held by that layout's id
// (`layout-<n>`), so a chunk shared by two layouts lives until both let go and
// "release" is releaseHolder(old id). KV pools belong to the HMM's KvManager.
//
// The standby executor is in process by default (a second ForwardEngine over the
// same chunk store). With `executor: { process: { script } }` every executor is a
// process of its own (src/executor/process.ts) attaching through an HmmDaemon the
// deployment runs on a temporary socket: attach spawns the standby process for
// the new layout (after prepare, so the new chunks and KV pools exist; the one started
// ahead when alive) and waits for its `ready`, the serving process's recent graph shapes
// in its init for it to capture first; the standby's daemon session keeps only the new layout's
// chunks and KV pools; release closes the old process; rollback kills the standby.
import { Engine, type Completion, type GenerationCallbacks, type GenerationRequest, type ReconfigureReport, type Stepper } from '../executor/engine.js';
import { ForwardEngine, type GraphShape, type GraphStats } from '../executor/forward.js';
import { type PreattachMessage, placementTable } from '../executor/process.js';
import { ExecutorCrashedError, RemoteStepper } from '../executor/remote.js';
import { type MappedKvPool, mapHmmKvPools } from '../executor/kv-view.js';
import { kvGeometry } from '../executor/types.js';
import { futureWeights, storeWeights } from '../executor/weights.js';
import type { WeightSource } from '../executor/types.js';
import { type CopyProgress, CopyService, targetPlan } from '../hmm/copy-service.js';
import type { StoredChunk } from '../hmm/chunk-store.js';
import { ExpertTables, type ExpertTableStats, expertOf } from '../hmm/expert-tables.js';
import { Hmm } from '../hmm/hmm.js';
import { openCheckpoint } from '../hmm/safetensors.js';
import type { ModelConfig } from '../model/config.js';
import { ModelKernels } from '../model/kernels/index.js';
import { weightSpecs } from '../model/weights.js';
import { InvalidArgumentError } from '../runtime/errors.js';
import { DEFAULT_HOST_POOL_BYTES, HostBufferPool, type HostPoolStats } from '../runtime/host-pool.js';
import type { Runtime } from '../runtime/runtime.js';
import { runEach } from '../runtime/cleanup.js';
import { trace } from '../runtime/trace.js';
import { type LayoutLimits, type LayoutSpec, roundRobinLayout, toExpertPlacement, validateLayout } from './layout.js';
import { type PacedCopyStats, type PrepareOptions, pacedCopy, resolvePrepare } from './pacing.js';
import { DEFAULT_PRECAPTURE_GRAPHS, precaptureShapes } from './precapture.js';
import { ScalePlans, planScaleDowns, syncStandby } from './ahead.js';
import { type ReadyStandby, captureMissing, disposeReady, makeReadyStandby } from './ready.js';
import { RELEASE_GROUP, grantNodeAccess, releaseHolder } from './release.js';
import { type ReadyProcess, adoptAhead, aheadHolder, graphShapeKey, unadopt } from './ready-process.js';

export type { DeploymentOptions, ExecutorMode, ScaleOptions, ScalePhase, ScaleProgress, ScaleReport, ScaleTarget } from './deployment-options.js';
import type { DeploymentOptions, ScaleOptions, ScalePhase, ScaleProgress, ScaleReport, ScaleTarget } from './deployment-options.js';
import { type DaemonState, type Executor, type Spawned, closeDaemon, disposeExecutor, dismiss, executorInit, forwardLayout, initExecutor, openDaemon,
  settleSessions, spawnProcess } from './executor-processes.js';



/** Filled standby chunks adopted per synchronous group at a scale (the loop gets a turn between groups, ~1 ms apart). */
const ADOPT_GROUP = 64;

/** How often the standby engines made ahead capture the serving engine's new shapes (ms). */
const FOLLOW_MS = 200;

/** Default steps between load observations (ForwardEngineOptions.observeLoadEvery). */
const DEFAULT_OBSERVE_EVERY = 32;

/**
 * Switches `engine` to `stepper` on `devices` between two engine steps; requests in flight
 * keep their KV blocks, moved through the HMM where their rank changes device. Rejects only
 * before anything changed (the old layout still serves). Shared by the elastic scale and the
 * vertical baseline, so both switch over the same way.
 */
export function switchOver(engine: Engine, stepper: Parameters<Engine['reconfigure']>[0]['stepper'], devices: readonly number[],
  hmm: Hmm, balance = false): Promise<ReconfigureReport> {
  return engine.reconfigure({ stepper, devices: [...devices], move: async (id, device) => (await hmm.kv.move(id, device)).blocks, balance });
}

const now = () => performance.now();
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms).unref());
/**
 * An executor process's tables as a scale reports them: the new process mapped every expert of its
 * layout at its init (what it imported; the old process's tables end with it).
 */
const processTables = (x: NonNullable<RemoteStepper['expertTables']>): NonNullable<ScaleReport['expertTables']> => ({
  mapped: x.mapped.reduce((a, [, n]) => a + n, 0), taken: 0, unmapped: 0, mapMs: x.ms, unmapMs: 0, read: x.read,
});
const cloneLayout = (l: LayoutSpec): LayoutSpec => ({ ...l, devices: [...l.devices], placement: l.placement.map((row) => row.map((h) => [...h])) });

export class Deployment {
  private layoutSpec: LayoutSpec;
  private layoutId: string;
  private layoutCounter: number;
  private forward: Executor;
  /** The HMM daemon executor processes attach through (process mode only). */
  private readonly daemon: DaemonState | undefined;
  /** KV views of this process, per device of the current layout. */
  private readonly views: Map<number, MappedKvPool>;
  private readonly copier: CopyService;
  private scaling: Promise<unknown> | undefined;
  private closed = false;
  /** Access for every device being granted to the last scale's new chunks (after its release). */
  private accessGrant: Promise<void> | undefined;
  /** Kernels kept loaded on every device (DeploymentOptions.preloadKernels), freed at close. */
  private preloaded: ModelKernels[] = [];
  private switches = 0;
  private recoveries = 0;
  /** The background work ahead of the next scale: plans, standby chunks (startAhead). */
  private ahead: Promise<void> | undefined;
  private aheadStop = false;
  /** Scale plans; the uniform-load ones of the current layout's scales by one device are kept (ahead.ts). */
  private readonly plans: ScalePlans;
  /** The last error of the work ahead (best effort: a scale then plans and creates its chunks itself). */
  private aheadError: unknown;
  /** The executor process started ahead for the next scale's standby (executor processes, prestart). */
  private prestarted: Spawned | undefined;
  /** Executor processes: the process started ahead, initialised for the planned scale-up (ExecutorMode initAhead). */
  private readyProc: ReadyProcess | undefined;
  /** Whether standby chunks are kept (DeploymentOptions.standbyChunks; setStandbyChunks). */
  private standbyOn: boolean;
  /** Standby engines made ahead by the joining device (DeploymentOptions.standbyEngines); a scale takes or frees them all. */
  private readonly readies = new Map<number, ReadyStandby>();
  /** The standby engines made ahead following the serving engine's new shapes (followShapes), and its wake-up. */
  private following: Promise<void> | undefined;
  private wakeFollower: (() => void) | undefined;

  private constructor(
    readonly rt: Runtime,
    readonly config: ModelConfig,
    readonly hmm: Hmm,
    readonly engine: Engine,
    private readonly options: DeploymentOptions,
    layout: LayoutSpec,
    layoutId: string,
    forward: Executor,
    views: Map<number, MappedKvPool>,
    daemon: DaemonState | undefined,
    private readonly hostPool: HostBufferPool,
    /** The virtual expert tables (DeploymentOptions.expertTables), else undefined. */
    private readonly tables: ExpertTables | undefined,
  ) {
    this.daemon = daemon;
    this.layoutSpec = layout;
    this.layoutId = layoutId;
    this.layoutCounter = 1;
    this.forward = forward;
    this.views = views;
    this.copier = new CopyService(hmm.store);
    this.plans = new ScalePlans(hmm.store, () => Deployment.limits(rt, config), {
      balance: options.balance ?? 1.1, maxSourcesPerTransfer: options.maxSourcesPerTransfer ?? 2, stripeAlignment: rt.granularity(0),
    });
    this.standbyOn = options.standbyChunks !== false;
  }

  /** Loads synthetic weights for a round-robin layout over `devices`, creates KV pools, the forward pass and the engine. */
  static async start(options: DeploymentOptions): Promise<Deployment> {
    const { rt, config } = options;
    const blocks = options.kvBlocksPerDevice;
    if (!Number.isSafeInteger(blocks) || blocks < 1) throw new InvalidArgumentError('kvBlocksPerDevice', `a positive integer (got ${String(blocks)})`);
    const pre = options.precaptureGraphs;
    if (pre !== undefined && (!Number.isSafeInteger(pre) || pre < 0)) {
      throw new InvalidArgumentError('precaptureGraphs', `a non-negative integer: graph shapes per device captured ahead of a scale (got ${String(pre)})`);
    }
    const se = options.standbyEngines;
    if (se !== undefined && typeof se !== 'boolean' && (se === null || typeof se !== 'object'
      || (se.follow !== undefined && (!Number.isSafeInteger(se.follow) || se.follow < 0)))) {
      throw new InvalidArgumentError('standbyEngines', `true, false or { follow }: follow a non-negative integer, shapes per staying device (got ${JSON.stringify(se)})`);
    }
    if (options.hostPool !== undefined && typeof options.hostPool !== 'boolean') {
      throw new InvalidArgumentError('hostPool', `true or false (got ${String(options.hostPool)})`);
    }
    const layout = roundRobinLayout(options.devices, config.layers, config.experts);
    validateLayout(layout, Deployment.limits(rt, config));
    const id = 'layout-1';
    const hmm = new Hmm(rt);
    // The in-process engines' pinned buffers, handed from each layout's engine to the next.
    const hostPool = new HostBufferPool(rt, options.hostPool === false ? 0 : DEFAULT_HOST_POOL_BYTES);
    let views: Map<number, MappedKvPool> | undefined;
    let forward: Executor | undefined;
    let daemon: DaemonState | undefined;
    let preloaded: ModelKernels[] = [];
    let tables: ExpertTables | undefined;
    const mode = options.executor ?? 'in-process';
    if (mode !== 'in-process' && (typeof mode !== 'object' || typeof mode.process?.script !== 'string')) {
      throw new InvalidArgumentError('executor', `'in-process' or { process: { script } } (got ${JSON.stringify(mode)})`);
    }
    if (options.expertTables !== undefined && typeof options.expertTables !== 'boolean') {
      throw new InvalidArgumentError('expertTables', `true or false (got ${String(options.expertTables)})`);
    }
    try {
      const placement = toExpertPlacement(layout);
      if (options.checkpoint !== undefined && (typeof options.checkpoint !== 'string' || options.checkpoint.length === 0)) {
        throw new InvalidArgumentError('checkpoint', 'the path of a safetensors checkpoint (a folder or a file)');
      }
      await hmm.loadWeights(weightSpecs(config, layout.devices, placement), {
        holder: id,
        ...(options.checkpoint !== undefined ? { checkpoint: await openCheckpoint(options.checkpoint) } : {}),
        ...(options.seed !== undefined ? { seed: options.seed } : {}),
        ...(options.scaleFor ? { scaleFor: options.scaleFor } : {}),
        ...(options.onLoadProgress ? { onProgress: options.onLoadProgress } : {}),
      });
      // peerAccess 'all': every weight chunk readable from every device, so a scale's copies are
      // pulled by the devices they go to, whose new chunks need a mapping for their own device only.
      const peerAccess = options.peerAccess ?? 'own';
      if (peerAccess !== 'all' && peerAccess !== 'own') throw new InvalidArgumentError('peerAccess', `'all' or 'own' (got ${String(peerAccess)})`);
      const node = Array.from({ length: rt.deviceCount }, (_, d) => d);
      if (peerAccess === 'all') for (const c of hmm.store.all()) if (c.plan.kind === 'weight') hmm.store.grantAccess(c.plan.id, node);
      const { blockBytes } = Deployment.geometry(options);
      for (const d of layout.devices) hmm.kv.createPool({ device: d, blockBytes, blocks });
      // In process; executor processes make their own over the chunks they import (process.ts).
      if (options.expertTables === true && mode === 'in-process') {
        tables = ExpertTables.fromStore(hmm.store, config.layers, config.experts);
        tables.mapAll(hmm.store.all().filter((c) => c.holders.has(id)));
      }
      if (mode === 'in-process') {
        views = mapHmmKvPools(rt, hmm, layout.devices);
        forward = await Deployment.createForward(options, hmm, layout, views, hostPool, tables);
      } else {
        views = new Map();
        daemon = await openDaemon(hmm, mode);
        forward = await initExecutor(options, spawnProcess(daemon), layout);
      }
      if (mode === 'in-process' && options.preloadKernels !== false) {
        preloaded = await Promise.all(Array.from({ length: rt.deviceCount }, (_, d) => ModelKernels.load(rt, d)));
      }
      // Executor processes: a serving process that dies is replaced and the failed step run again (recoverExecutor).
      let self: Deployment | undefined;
      const engine = new Engine({
        stepper: forward,
        ...(daemon ? { recover: (e: unknown, failed: Stepper) => self?.recoverExecutor(e, failed) ?? Promise.resolve(undefined) } : {}),
        kv: hmm.kv,
        devices: layout.devices,
        blockTokens: options.blockTokens ?? 16,
        maxTokensPerStep: options.maxTokensPerStep ?? 64,
        maxSeqs: options.maxSeqs ?? 64,
        eosTokenIds: [...new Set([...config.eosTokenIds, ...(options.extraEosTokenIds ?? [])])],
        maxSeqLen: config.maxPositions,
        vocabSize: config.vocabSize,
        ...(options.onStep ? { onStep: options.onStep } : {}),
      });
      const deployment = new Deployment(rt, config, hmm, engine, options, layout, id, forward, views, daemon, hostPool, tables);
      self = deployment;
      deployment.preloaded = preloaded;
      deployment.startAhead();
      return deployment;
    } catch (e) {
      for (const k of preloaded) k.dispose();
      if (forward instanceof RemoteStepper) {
        forward.kill();
        await forward.exited;
      } else forward?.dispose();
      hostPool.dispose();
      for (const v of views?.values() ?? []) v.dispose();
      if (daemon) await closeDaemon(daemon);
      tables?.dispose();
      hmm.dispose();
      throw e;
    }
  }

  /** The pinned host buffers the in-process engines hand from one layout to the next. */
  get hostPoolStats(): HostPoolStats {
    return this.hostPool.stats;
  }

  /** How the current layout's engine used graphs (in-process executors; undefined with executor processes). */
  get graphStats(): GraphStats | undefined {
    return this.forward instanceof ForwardEngine ? this.forward.graphStats : undefined;
  }

  /** The rank shapes the serving engine's last step captured (in process; diagnostics). */
  get lastStepCaptures(): GraphShape[] {
    return this.forward instanceof ForwardEngine ? this.forward.lastStepCaptures : [];
  }

  /** The virtual expert tables' figures (DeploymentOptions.expertTables), else undefined. */
  get expertTables(): ExpertTableStats | undefined {
    return this.tables?.stats;
  }

  /** The serving engine's expert weights by rank (in process; diagnostics: ForwardEngine.expertWeights). */
  expertWeights(rank: number): ReturnType<ForwardEngine['expertWeights']> {
    if (!(this.forward instanceof ForwardEngine)) throw new InvalidArgumentError('expertWeights', 'asked of in-process executors only');
    return this.forward.expertWeights(rank);
  }

  /** Pid of the executor process started ahead for the next scale (process mode, prestart), else undefined. */
  get prestartedPid(): number | undefined {
    return this.prestarted?.proc.pid;
  }

  /** Pid of the executor process initialised ahead for the planned scale-up (process mode, initAhead), else undefined. */
  get readyExecutorPid(): number | undefined {
    return this.readyProc?.stepper.pid;
  }

  /** Pid of the executor process serving the current layout (process mode), else undefined. */
  get executorPid(): number | undefined {
    return this.forward instanceof RemoteStepper ? this.forward.pid : undefined;
  }

  private static limits(rt: Runtime, config: ModelConfig): LayoutLimits {
    return { experts: config.experts, layers: config.layers, deviceCount: rt.deviceCount, peers: rt.peerMatrix() };
  }

  /** The KV pools' geometry, for the engines' kvDtype (forward.kvDtype): pools and engines must agree on it. */
  private static geometry(options: DeploymentOptions) {
    return kvGeometry(options.config, options.blockTokens ?? 16, options.forward?.kvDtype ?? 'bf16');
  }

  /** Steps between load observations for in-process engines (0: off). */
  private static observeEvery(options: DeploymentOptions): number {
    const o = options.observeLoad ?? false;
    if (o === false) return 0;
    const every = o.every ?? DEFAULT_OBSERVE_EVERY;
    if (!Number.isSafeInteger(every) || every < 1) throw new InvalidArgumentError('observeLoad.every', 'a positive integer (or observeLoad: false)');
    return every;
  }

  /**
   * The load observed by the serving engine, smoothed toward uniform: each expert's count plus
   * the layer's mean count, so that a short observation does not make the plan chase noise.
   * Undefined when nothing was observed (then the plan is uniform).
   */
  private observedLoad(): { load: number[][]; steps: number } | undefined {
    // Off unless asked for (host-path steps count too, whether or not observation was asked for).
    if (Deployment.observeEvery(this.options) === 0 || !(this.forward instanceof ForwardEngine)) return undefined;
    const { steps, load } = this.forward.expertLoad;
    if (steps === 0) return undefined;
    return {
      steps,
      load: load.map((row) => {
        const mean = row.reduce((a, b) => a + b, 0) / row.length;
        return row.map((v) => v + mean);
      }),
    };
  }

  /** A forward engine for `layout`; with expert tables it reads the experts there (the rest from `weights`). */
  private static createForward(options: DeploymentOptions, hmm: Hmm, layout: LayoutSpec, views: ReadonlyMap<number, MappedKvPool>,
    hostPool: HostBufferPool, tables: ExpertTables | undefined, weights: WeightSource = storeWeights(hmm.store)): Promise<ForwardEngine> {
    const kv = new Map(layout.devices.map((d) => [d, views.get(d)!] as const));
    return ForwardEngine.create(options.rt, options.config, forwardLayout(layout),
      tables ? tables.weights(weights) : weights, kv, {
        observeLoadEvery: Deployment.observeEvery(options), hostPool, ...options.forward,
        maxTokensPerStep: options.maxTokensPerStep ?? 64, blockTokens: options.blockTokens ?? 16,
      });
  }

  /** The current layout (a copy). */
  get layout(): LayoutSpec {
    return cloneLayout(this.layoutSpec);
  }
  get devices(): number[] {
    return [...this.layoutSpec.devices];
  }
  /** Switch-overs done so far. */
  get epoch(): number {
    return this.switches;
  }
  get isScaling(): boolean {
    return this.scaling !== undefined;
  }
  /** Ids of the weight chunks the current layout holds. */
  chunkIds(): string[] {
    return this.hmm.store.all().filter((c) => c.holders.has(this.layoutId)).map((c) => c.plan.id).sort();
  }

  submit(request: GenerationRequest, callbacks?: GenerationCallbacks): Promise<Completion> {
    return this.engine.submit(request, callbacks);
  }

  /** Every device of the node. */
  private get nodeDevices(): number[] {
    return Array.from({ length: this.rt.deviceCount }, (_, d) => d);
  }

  /** Resolves when the background work after the last scale (access grants, the work ahead: plans, standby chunks, a process) is done. */
  async settled(): Promise<void> {
    await this.accessGrant;
    await this.ahead;
  }

  /** Standby chunks kept on the devices outside the layout (DeploymentOptions.standbyChunks), and the last error of the work ahead. */
  get standby(): {
    devices: Array<{ device: number; chunks: number; bytes: number; filled: number }>;
    /**
     * precaptured: graphs captured ahead (made and followed); followMs: host time of following the serving
     * engine's shapes; missing: the shapes its scale-up's attach phase would still capture now.
     */
    engines: Array<{ device: number; precaptured: number; followMs: number; missing: number }>;
    /**
     * Executor processes: the process initialised ahead (initAhead), by the device its scale-up adds; its graphs
     * captured (at init and following the serving shapes since), its making's wall time and the following's.
     */
    process?: { device: number; precaptured: number; ms: number; followMs: number };
    error?: unknown;
  } {
    const store = this.hmm.store;
    const devices = Array.from({ length: this.rt.deviceCount }, (_, device) => {
      const sizes = [...store.spareSizes(device)];
      return {
        device, chunks: sizes.reduce((a, [, n]) => a + n, 0), bytes: sizes.reduce((a, [size, n]) => a + size * n, 0),
        // Of those, filled ahead with a planned scale-up's bytes (prefillStandby).
        filled: store.filledSpares(device),
      };
    }).filter((x) => x.chunks > 0);
    // The standby engines made ahead (standbyEngines), by the device their scale-up adds, with the graphs captured so far.
    const engines = [...this.readies.values()].sort((a, b) => a.device - b.device).map((r) => ({
      device: r.device, precaptured: r.precaptured, followMs: r.followMs,
      missing: r.engine.uncachedShapes(this.shapesAhead(r.planned.next, undefined, false)).length,
    }));
    const r = this.readyProc;
    const process = r ? { device: r.device, precaptured: (r.stepper.precaptured?.graphs ?? 0) + r.followed, ms: r.ms, followMs: r.followMs } : undefined;
    return { devices, engines, ...(process ? { process } : {}), ...(this.aheadError !== undefined ? { error: this.aheadError } : {}) };
  }

  /**
   * Turns the standby chunks (DeploymentOptions.standbyChunks) off or on while serving. Off: the
   * work ahead stops and every standby chunk is freed (in groups, the loop given a turn in
   * between), for example before the idle devices are lent to something else; later scale-ups
   * create their chunks when they run. On: they are made again in the background. Refused
   * while a scale runs.
   */
  async setStandbyChunks(on: boolean): Promise<void> {
    if (typeof on !== 'boolean') throw new InvalidArgumentError('on', `a boolean (got ${String(on)})`);
    if (this.closed) throw new InvalidArgumentError('deployment', 'open (it is closed)');
    if (this.scaling) throw new InvalidArgumentError('setStandbyChunks', 'called once the scale in progress has finished');
    // The work ahead frees the standby chunks no longer wanted (all of them when off) or makes them.
    await this.stopAhead();
    await this.dropReadies();
    await this.dropReadyProc();
    this.standbyOn = on;
    this.startAhead();
    await this.ahead;
  }

  /**
   * Starts the background work ahead of the next scale, for the current layout: the plans of
   * the scales by one device (each device of the node added, each device of the layout
   * removed), then the standby chunks (when standbyChunks is on). Stopped when a scale starts.
   */
  private startAhead(): void {
    if (this.closed) return;
    this.aheadStop = false;
    this.aheadError = undefined;
    this.ahead = this.workAhead().catch((e: unknown) => {
      this.aheadError = e;
    });
  }

  /** Stops the background work after its current group (syncStandby's), plan or capture. */
  private async stopAhead(): Promise<void> {
    this.aheadStop = true;
    this.wakeFollower?.();
    await this.ahead;
    this.ahead = undefined;
    await this.following;
    this.following = undefined;
  }

  /**
   * While the layout serves, every FOLLOW_MS: each standby engine made ahead captures the shapes
   * its scale would capture ahead now (the serving engine's recent ones, which change as requests
   * come and go) that it has no graph for yet, so the scale finds them captured. Not part of
   * settled(); stopped with the work ahead (at once: the wait between rounds is cut short).
   */
  private async followShapes(): Promise<void> {
    while (!this.aheadStop && this.readies.size > 0) {
      await this.followerPause();
      for (const r of this.readies.values()) {
        if (this.aheadStop) return;
        const t = now();
        const made = await captureMissing(r.engine, this.shapesAhead(r.planned.next, this.followPerDevice()), () => this.aheadStop);
        r.precaptured += made;
        if (made > 0) r.followMs += now() - t;
      }
    }
  }

  /** FOLLOW_MS, cut short by stopAhead (wakeFollower). */
  private async followerPause(): Promise<void> {
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, FOLLOW_MS);
      this.wakeFollower = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    this.wakeFollower = undefined;
  }

  /**
   * followShapes for the executor process initialised ahead (ExecutorMode initAhead): every FOLLOW_MS, the
   * shapes its scale-up would capture ahead now that it was not sent yet, sent one at a time (a precapture
   * message each; the scale waits at most for the one in progress: stopAhead awaits this).
   */
  private async followProcess(): Promise<void> {
    while (!this.aheadStop && this.readyProc) {
      await this.followerPause();
      const r = this.readyProc;
      if (!r) return;
      for (const shape of this.shapesAhead(r.planned.next, this.followPerDevice())) {
        if (this.aheadStop || this.readyProc !== r) return;
        const key = graphShapeKey(shape);
        if (r.sent.has(key)) continue;
        r.sent.add(key);
        const t = now();
        const got = await r.stepper.precapture([shape]);
        r.followed += got.graphs;
        if (got.graphs > 0) r.followMs += now() - t;
      }
    }
  }

  /**
   * The serving engine's recent shapes a standby for `next` captures ahead (precaptureShapes), `perDevice` per device,
   * with balanceOnScale each rank's share of the running sequences first; `joining`: the device the scale adds too
   * (for a standby made in the background, where the time is there).
   */
  private shapesAhead(next: LayoutSpec, perDevice = this.options.precaptureGraphs ?? DEFAULT_PRECAPTURE_GRAPHS, joining = true): GraphShape[] {
    const serving = this.forward;
    const running = this.engine.stats().running;
    const balancedSeqs = this.options.balanceOnScale ? running : 0;
    // The shapes of the new layout's climb to its shares (precaptureShapes' ramp): beyond perDevice for a standby made
    // in the background (joining), within it at scale time.
    const ramp = this.options.rampShapes !== false ? running : 0;
    const recent = serving instanceof ForwardEngine ? serving.graphShapes() : serving instanceof RemoteStepper ? serving.graphShapes : [];
    return precaptureShapes(recent, next.devices, perDevice, { joining, balancedSeqs, ramp });
  }

  /** Shapes per staying device the standby engines made ahead keep captured while serving (DeploymentOptions.standbyEngines.follow). */
  private followPerDevice(): number {
    const o = this.options.standbyEngines;
    const follow = typeof o === 'object' ? o.follow : undefined;
    return follow ?? this.options.precaptureGraphs ?? DEFAULT_PRECAPTURE_GRAPHS;
  }

  /**
   * The work ahead (startAhead): the next standby executor process started first (its warm-up
   * runs in its own process), then the plans and the standby chunks (syncStandby).
   */
  private async workAhead(): Promise<void> {
    trace('ahead.begin');
    if (this.daemon?.prestart && !this.prestarted) {
      this.prestarted = spawnProcess(this.daemon);
      // The chunks the next scale most likely keeps, attached ahead (best effort: init attaches whatever is missing
      // and drops what its layout does not use): the serving layout's, all of them, while a device is idle (a scale-up
      // keeps them); with every device serving, the next scale removes one: the layout less its highest device, the
      // one the autoscaler removes (removeDevice, with the default pool). Dropping the other's at init took 110-160 ms
      // of a 2->1's attach phase (~2,800 chunks, 2 x H100).
      if (this.daemon.preattach) {
        try {
          const spec = this.layoutSpec;
          const full = spec.devices.length > 1 && this.nodeDevices.every((d) => spec.devices.includes(d));
          const devices = full ? spec.devices.filter((d) => d !== Math.max(...spec.devices)) : [...spec.devices];
          const msg: PreattachMessage = { type: 'preattach', devices, placement: placementTable(this.options.config, forwardLayout(spec)) };
          this.prestarted.channel.send(JSON.stringify(msg));
        } catch {
          // The process is gone or its channel closed: the scale finds it dead and spawns another.
        }
      }
    }
    const { blockBytes } = Deployment.geometry(this.options);
    // The standby chunks are brought to the plans with no standby engine reading them (a scale took or freed them all).
    await this.dropReadies();
    await syncStandby(this.hmm.store, this.rt, this.plans, this.layoutSpec, this.layoutId, {
      standby: this.standbyOn, prefill: this.options.prefillStandby !== false, scaleDownSpares: this.options.scaleDownSpares === true,
      offThread: resolvePrepare(this.options.prepare).offThread, kvBlockBytes: blockBytes, kvBlocks: this.options.kvBlocksPerDevice,
    }, () => this.aheadStop, (e) => (this.aheadError = e));
    trace('ahead.standby-synced');
    await this.makeReadies();
    await this.makeReadyProcess();
    trace('ahead.readies-made');
    // Last: the scale-down plans (the standby engines first: they serve the scale-ups' latency and serving).
    if (!this.options.scaleDownSpares) await planScaleDowns(this.plans, this.layoutSpec, this.layoutId, () => this.aheadStop, (e) => (this.aheadError = e));
    if (!this.aheadStop && this.readies.size > 0 && this.followPerDevice() > 0) this.following = this.followShapes().catch(() => undefined);
    else if (!this.aheadStop && this.readyProc && this.followPerDevice() > 0) this.following = this.followProcess().catch(() => undefined);
    trace('ahead.end');
  }

  /** Whether standby engines are made ahead (DeploymentOptions.standbyEngines and what it needs). */
  private readiesWanted(): boolean {
    return this.options.standbyEngines !== false && this.standbyOn && this.options.prefillStandby !== false
      && this.forward instanceof ForwardEngine && Deployment.observeEvery(this.options) === 0;
  }

  /**
   * The standby engine of each planned scale-up onto an idle device (ready.ts), one device after
   * another; best effort (a failure is the work ahead's last error). Stops between devices once
   * a scale wants to start.
   */
  private async makeReadies(): Promise<void> {
    if (!this.readiesWanted()) return;
    const layout = this.layoutSpec;
    const layoutId = this.layoutId;
    const { blockBytes } = Deployment.geometry(this.options);
    const inputs = {
      hmm: this.hmm, layoutId, views: this.views, kvPool: { blockBytes, blocks: this.options.kvBlocksPerDevice },
      create: (next: LayoutSpec, weights: WeightSource, views: ReadonlyMap<number, MappedKvPool>) =>
        Deployment.createForward(this.options, this.hmm, next, views, this.hostPool, this.tables, weights),
      shapes: (next: LayoutSpec) => this.shapesAhead(next),
      stopped: () => this.aheadStop,
    };
    for (let d = 0; d < this.rt.deviceCount; d++) {
      if (this.aheadStop) return;
      const to = [...layout.devices, d];
      if (layout.devices.includes(d) || this.readies.has(d) || !this.plans.has(layoutId, to)) continue;
      try {
        const ready = await makeReadyStandby(inputs, this.plans.planFor(layout, layoutId, to, undefined), d);
        if (ready) this.readies.set(d, ready);
        if (ready && this.tables) await this.mapReadyAhead(ready);
      } catch (e) {
        this.aheadError = e;
      }
    }
  }

  /**
   * Executor processes (ExecutorMode initAhead): initialises the process started ahead for the
   * planned scale-up onto the lowest idle device whose filled standby chunks hold every target of
   * its plan: the targets adopted ahead (ready-process.ts), the device's KV pool made, then the
   * process's init (attach, engine, graphs of the serving process's recent shapes). Best effort:
   * on failure the process is gone, the chunks are standby chunks again and the pool is freed.
   */
  private async makeReadyProcess(): Promise<void> {
    const d0 = this.daemon;
    const spawned = this.prestarted;
    if (!d0?.initAhead || !spawned || this.readyProc || this.aheadStop || !this.standbyOn || this.options.prefillStandby === false
      || this.options.standbyEngines === false || !(this.forward instanceof RemoteStepper)) return;
    if (spawned.proc.exitCode !== null || spawned.proc.signalCode !== null) return;
    const layout = this.layoutSpec;
    const layoutId = this.layoutId;
    const store = this.hmm.store;
    const { blockBytes } = Deployment.geometry(this.options);
    for (let device = 0; device < this.rt.deviceCount; device++) {
      const to = [...layout.devices, device];
      if (layout.devices.includes(device) || !this.plans.has(layoutId, to)) continue;
      const planned = this.plans.planFor(layout, layoutId, to, undefined);
      const holder = aheadHolder(layoutId, device);
      const adopted = adoptAhead(store, planned, device, holder);
      if (!adopted) continue;
      const t0 = now();
      this.prestarted = undefined;
      let pool = false;
      try {
        this.hmm.kv.createPool({ device, blockBytes, blocks: this.options.kvBlocksPerDevice });
        pool = true;
        const shapes = this.shapesAhead(planned.next);
        trace('ahead.init-process', { device, adopted: adopted.length, shapes: shapes.length });
        const stepper = await initExecutor(this.options, spawned, planned.next, shapes);
        trace('ahead.process-initialised');
        this.readyProc = {
          fromId: layoutId, to: [...planned.next.devices], device, planned, stepper, holder, adopted, ms: now() - t0,
          sent: new Set(shapes.map(graphShapeKey)), followed: 0, followMs: 0,
        };
      } catch (e) {
        // initExecutor killed the process; its session ends with it, then the chunks go back.
        await settleSessions(this.hmm, this.forward);
        unadopt(store, adopted, holder);
        if (pool) this.hmm.kv.destroyPool(device);
        this.aheadError = e;
      }
      return;
    }
  }

  /**
   * Executor processes (DESIGN invariant 6): the serving process died and a step failed on it. A new
   * process (the one started ahead, when alive) is initialised for the serving layout, capturing the
   * dead one's recent graph shapes first, and serves in its place; the engine runs the failed step
   * again on it (the HMM kept every weight and KV block; the dead process's daemon session ended with
   * its connection). Undefined, so that the step's requests fail, when the failure was not a dead
   * process, when the deployment is closing, or when the new process cannot be made.
   */
  private async recoverExecutor(error: unknown, failed: Stepper): Promise<Stepper | undefined> {
    const d = this.daemon;
    if (!d || this.closed || failed !== this.forward || !(failed instanceof RemoteStepper) || !(error instanceof ExecutorCrashedError)) return undefined;
    trace('coord.recover', { pid: failed.pid });
    failed.kill();
    await Promise.race([failed.exited, sleep(5000)]);
    let spawned = this.prestarted;
    this.prestarted = undefined;
    if (spawned && (spawned.proc.exitCode !== null || spawned.proc.signalCode !== null)) {
      spawned.channel.close();
      spawned = undefined;
    }
    try {
      const shapes = precaptureShapes(failed.graphShapes, this.layoutSpec.devices, this.options.precaptureGraphs ?? DEFAULT_PRECAPTURE_GRAPHS);
      const fresh = await initExecutor(this.options, spawned ?? spawnProcess(d), this.layoutSpec, shapes);
      // (No switch-over can come meanwhile: the engine applies one between steps, and it is inside this step.)
      if (this.closed) {
        await disposeExecutor(fresh, true);
        return undefined;
      }
      this.forward = fresh;
      this.recoveries++;
      trace('coord.recovered', { pid: fresh.pid });
      return fresh;
    } catch {
      return undefined;
    }
  }

  /** Serving executor processes replaced after they died (recoverExecutor). */
  get executorRecoveries(): number {
    return this.recoveries;
  }

  /** Ends the process initialised ahead (if any): its session ends, its chunks are standby chunks again, its device's pool is freed. */
  private async dropReadyProc(): Promise<void> {
    const r = this.readyProc;
    if (!r) return;
    this.readyProc = undefined;
    await disposeExecutor(r.stepper, true);
    await settleSessions(this.hmm, this.forward);
    this.giveBack(r, !this.layoutSpec.devices.includes(r.device));
  }

  /** What a process initialised ahead had taken: its adopted chunks (standby chunks again where nothing else holds them) and, with `destroyPool`, its device's KV pool. */
  private giveBack(r: ReadyProcess, destroyPool: boolean): void {
    unadopt(this.hmm.store, r.adopted, r.holder);
    if (destroyPool) this.hmm.kv.destroyPool(r.device);
  }

  /** Frees every standby engine made ahead, with its KV pool (the loop given turns in between). */
  private async dropReadies(): Promise<void> {
    const all = [...this.readies.values()];
    this.readies.clear();
    for (const r of all) await disposeReady(this.hmm, r);
    // Their standby chunks mapped ahead leave the tables (the work ahead may free or refill them next), between serving steps.
    await this.tables?.retainPaced((id) => this.hmm.store.has(id) && this.hmm.store.get(id).holders.has(this.layoutId), RELEASE_GROUP);
  }

  /**
   * Expert tables: maps the filled standby chunks a standby engine made ahead reads into their slots
   * of its device's table, under the ids its scale-up adopts them as, so that scale maps none of them
   * (ExpertTables.mapAhead). In groups with a turn of the loop between them (serving goes on); stops
   * when a scale wants to start. Best effort: what is not mapped ahead is mapped by the scale.
   */
  private async mapReadyAhead(r: ReadyStandby): Promise<void> {
    const store = this.hmm.store;
    const targets = r.planned.transfers.filter((t) => t.targetDevice === r.device);
    try {
      for (let i = 0; i < targets.length; i += ADOPT_GROUP) {
        if (this.aheadStop) return;
        await new Promise<void>((resolve) => setImmediate(resolve));
        for (const t of targets.slice(i, i + ADOPT_GROUP)) {
          const plan = targetPlan(store.get(t.sourceId).plan, r.device, t.targetId);
          const chunk = store.filledChunk(t.targetId, r.device);
          if (chunk && expertOf(plan)) this.tables!.mapAhead(plan, chunk);
        }
      }
    } catch (e) {
      this.aheadError = e;
    }
  }

  /**
   * Changes the deployment to `target.devices` while it serves (see the top of
   * this file). Resolves with what moved once the old layout is released; rejects
   * (after rolling back, with the old layout still serving) when any step before
   * the switch-over fails. One scale at a time.
   */
  async scale(target: ScaleTarget, options: ScaleOptions = {}): Promise<ScaleReport> {
    if (this.closed) throw new InvalidArgumentError('deployment', 'open (it is closed)');
    if (this.scaling) throw new InvalidArgumentError('scale', 'called once the previous scale has finished');
    // Refused before anything is touched: the work ahead (standby chunks and engines) goes on undisturbed.
    const devices: unknown = target?.devices;
    if (!Array.isArray(devices) || devices.length === 0) throw new InvalidArgumentError('devices', 'a non-empty array of device ordinals');
    devices.forEach((d: unknown, i) => {
      if (!Number.isSafeInteger(d) || (d as number) < 0 || (d as number) >= this.rt.deviceCount) {
        throw new InvalidArgumentError(`devices[${i}]`, `a device ordinal below ${this.rt.deviceCount} (got ${String(d)})`);
      }
      if (devices.indexOf(d) !== i) throw new InvalidArgumentError(`devices[${i}]`, `distinct devices (${String(d)} appears twice)`);
    });
    const run = this.doScale(target, options);
    this.scaling = run;
    try {
      return await run;
    } finally {
      this.scaling = undefined;
    }
  }

  private async doScale(target: ScaleTarget, options: ScaleOptions): Promise<ScaleReport> {
    // The previous scale's new chunks become this one's sources: readable from every device first.
    await this.accessGrant;
    // The work ahead stops after its current group or plan, and starts again (for the layout then serving) after the scale.
    await this.stopAhead();
    try {
      return await this.scaleNow(target, options);
    } finally {
      this.startAhead();
    }
  }

  private async scaleNow(target: ScaleTarget, options: ScaleOptions): Promise<ScaleReport> {
    const t0 = now();
    let mark = t0;
    const lap = () => {
      const t = now();
      const ms = t - mark;
      mark = t;
      return ms;
    };
    const current = this.layoutSpec;
    const from = [...current.devices];
    const to = Array.isArray(target?.devices) ? [...target.devices] : [];
    const progress = (phase: ScalePhase, extra: Partial<ScaleProgress> = {}) => {
      trace(`scale.${phase}`, { from, to });
      options.onProgress?.({ phase, from, to, ...extra });
    };
    const store = this.hmm.store;
    const oldId = this.layoutId;
    const newId = `layout-${this.layoutCounter + 1}`;

    // Everything allocated for the new layout, to free on rollback.
    const createdPools: number[] = [];
    let newViews = new Map<number, MappedKvPool>();
    let standby: Executor | undefined;
    let holderUsed = false;
    const serving = this.forward;
    const pause = (on: boolean) => {
      if (this.options.pauseCaptures && serving instanceof ForwardEngine) serving.capturesPaused = on;
    };
    pause(true);
    // The standby engines made ahead (standbyEngines): the one made for this scale's plan is taken, the
    // KV pools of the others' devices this scale adds too; everything else of theirs is freed after the
    // switch-over (or at rollback). None is left for the next scale: the work ahead makes new ones.
    const readies = [...this.readies.values()];
    this.readies.clear();
    // Executor processes: the process initialised ahead is this scale's standby, as it is when it was
    // made for this scale's plan, else initialised again for this layout.
    let readyProc = this.readyProc;
    this.readyProc = undefined;
    if (readyProc && (readyProc.stepper.proc?.exitCode !== null || readyProc.stepper.proc?.signalCode !== null)) {
      // It died while waiting: its session is ending; its chunks go back once it has (below, at rollback or release).
      readyProc.stepper.kill();
    }
    /** The process initialised ahead was made for this scale's plan: taken as it is (else initialised again). */
    let readyProcMade = false;
    /** Readies whose device's KV pool and mapping this scale took (they serve any layout with that device). */
    const readyPools = new Set<number>();
    let ready: ReadyStandby | undefined;
    /** Frees everything allocated for the new layout, each step on its own (one failing does not keep the rest). */
    const rollback = async (error: unknown) => {
      pause(false);
      progress('rollback', { error });
      if (this.daemon) {
        // The standby process (if any) dies first, then its daemon session ends, releasing its holds.
        try {
          if (readyProc && readyProc.stepper !== standby) await disposeExecutor(readyProc.stepper, true);
          await disposeExecutor(standby, true);
          await settleSessions(this.hmm, this.forward); // the serving process now (replaced if it died: recoverExecutor)
        } catch {
          // Best effort, as below.
        }
      }
      const steps: Array<() => void> = [
        () => void (standby instanceof ForwardEngine && standby.dispose()),
        ...readies.filter((r) => r.engine !== standby).map((r) => () => r.engine.dispose()),
        ...readies.filter((r) => !readyPools.has(r.device)).flatMap((r) => [
          ...[...r.views.values()].map((v) => () => v.dispose()), () => this.hmm.kv.destroyPool(r.device)]),
        ...[...newViews.values()].map((v) => () => v.dispose()),
        // Out of the tables, before their chunks can be freed (a mapped chunk's memory outlives its release):
        // what this scale mapped and what was mapped ahead; the old layout's chunks stay.
        () => void this.tables?.retain((id) => store.has(id) && store.get(id).holders.has(oldId)),
        () => void (holderUsed && store.releaseHolder(newId)),
        ...createdPools.map((d) => () => this.hmm.kv.destroyPool(d)),
        // The chunks adopted ahead are standby chunks again, the pool made ahead freed (the old layout lacks its device).
        ...(readyProc ? [() => this.giveBack(readyProc!, true)] : []),
      ];
      newViews = new Map();
      try {
        runEach(steps);
      } catch {
        // Best effort: the original error is what the caller needs to see.
      }
    };

    let next: LayoutSpec;
    let lower: number;
    let reused: string[];
    let copies: ScaleReport['copies'];
    let bytesCopied = 0;
    let fromStandby = 0;
    let prefilled = 0;
    let prefilledBytes = 0;
    let plannedAhead = false;
    let overlapped = false;
    let attachEarly = false;
    let copying: ReturnType<typeof pacedCopy> | undefined;
    let prestartedUsed = false;
    let prep: Required<PrepareOptions>;
    let copyStats: PacedCopyStats | undefined;
    const phases = { planMs: 0, prepareMs: 0, attachMs: 0, copyWaitMs: 0, switchMs: 0, firstStepMs: 0, releaseMs: 0 };
    let attachStats: ScaleReport['attach'];
    let madeAhead: ScaleReport['standbyMadeAhead'];
    let precapture: ScaleReport['precapture'];
    let loadUsed: ScaleReport['load'] = { source: 'uniform' };
    const tableFigures = { mapped: 0, taken: 0, unmapped: 0, mapMs: 0, unmapMs: 0 };
    try {
      // 1. Plan (pure).
      progress('plan');
      prep = resolvePrepare(this.options.prepare, options.prepare);
      const observed = target.load ? undefined : this.observedLoad();
      const load = target.load ?? observed?.load;
      loadUsed = target.load ? { source: 'given' } : observed ? { source: 'observed', observedSteps: observed.steps } : { source: 'uniform' };
      // Planned ahead for the scales by one device (startAhead), else now.
      plannedAhead = !load && this.plans.has(oldId, to);
      const planned = this.plans.planFor(this.layoutSpec, oldId, to, load);
      ({ next, lower } = planned);
      const { plan, transfers, denseChunkSizes } = planned;
      reused = [];
      for (const r of plan.reuse) {
        if (r.kind === 'expert') reused.push(`${r.group}@${r.device}`);
        else denseChunkSizes.forEach((_, i) => reused.push(`dense@${r.device}#${i}`));
      }
      for (const id of reused) {
        if (!store.get(id).holders.has(oldId)) throw new InvalidArgumentError('plan', `chunks of the current layout (${id} is not one)`);
      }
      copies = transfers.map((t) => ({ targetId: t.targetId, sourceIds: [t.sourceId, ...(t.extraSourceIds ?? [])] }));
      ready = readies.find((r) => r.fromId === oldId && r.planned === planned);
      const procAlive = readyProc !== undefined && readyProc.stepper.proc?.exitCode === null && readyProc.stepper.proc?.signalCode === null;
      if (readyProc && procAlive && readyProc.fromId === oldId && readyProc.planned === planned) readyProcMade = true;
      else if (readyProc && !procAlive) {
        // Died while waiting: ended now, its chunks given back first.
        const r = readyProc;
        readyProc = undefined;
        await disposeExecutor(r.stepper, true);
        await settleSessions(this.hmm, this.forward); // the serving process now (replaced if it died: recoverExecutor)
        this.giveBack(r, true);
      }
      phases.planMs = lap();

      // 2. Prepare, while the engine keeps stepping on the old layout.
      progress('prepare');
      const oldSet = new Set(from);
      const { blockBytes } = Deployment.geometry(this.options);
      for (const d of next.devices) {
        if (oldSet.has(d)) continue;
        if (readyProc && d === readyProc.device) continue; // made ahead with the process initialised ahead, given back at rollback
        const made = readies.find((r) => r.device === d);
        if (made) {
          // Made ahead with its standby engine: the same pool and mapping, whichever engine uses them.
          readyPools.add(d);
          for (const [dv, v] of made.views) newViews.set(dv, v);
        } else {
          this.hmm.kv.createPool({ device: d, blockBytes, blocks: this.options.kvBlocksPerDevice });
        }
        createdPools.push(d);
      }
      holderUsed = true;
      for (const id of reused) store.retain(id, newId);
      const takenBefore = store.sparesTaken;
      const copyOptions = { holder: newId, stripeAlignment: this.rt.granularity(0), onProgress: (copy: CopyProgress) => progress('prepare', { copy }) };
      // Targets whose standby chunk was filled ahead (prefillStandby) are taken as they are; the rest are copied.
      const adopted: StoredChunk[] = [];
      const toCopy: typeof transfers = [];
      for (const [i, t] of transfers.entries()) {
        if (readyProc && store.has(t.targetId) && store.get(t.targetId).holders.has(readyProc.holder)) {
          // Adopted ahead (ready-process.ts; every target when the process was made for this plan): this layout holds them too.
          store.retain(t.targetId, newId);
          adopted.push(store.get(t.targetId));
          continue;
        }
        // A turn of the loop every ADOPT_GROUP: the serving engine's next step is not held up behind them.
        if (i > 0 && i % ADOPT_GROUP === 0) await new Promise<void>((r) => setImmediate(r));
        const source = store.get(t.sourceId);
        const c = store.adoptFilled(targetPlan(source.plan, t.targetDevice, t.targetId), newId,
          [t.targetDevice, ...[t.sourceId, ...(t.extraSourceIds ?? [])].map((id) => store.get(id).plan.device)]);
        if (c) adopted.push(c);
        else toCopy.push(t);
      }
      prefilled = adopted.length;
      prefilledBytes = adopted.reduce((a, c) => a + c.plan.size, 0);
      let copied: StoredChunk[] | undefined;
      if (prep.paced) {
        const jobs = toCopy.map((t) => {
          const sources = [t.sourceId, ...(t.extraSourceIds ?? [])].map((id) => store.get(id));
          return { plan: targetPlan(sources[0]!.plan, t.targetDevice, t.targetId), sources };
        });
        // Every target in the standby chunks: the copies are queued at once (taking the chunks costs
        // ~10 µs each, not ~0.2 ms) and the standby (an engine here, or an executor process importing
        // the chunks) is made while they run; its pointers are final once the targets exist.
        overlapped = this.options.attachDuringCopies !== false && jobs.length > 0
          && store.sparesCover(jobs.map((j) => ({ device: j.plan.device, size: j.plan.size, access: [j.plan.device, ...j.sources.map((x) => x.plan.device)] })));
        // Taking standby chunks costs ~10 µs each: groups of 256 block the loop ~3 ms (groups of 8 with a
        // turn between them put 2,790 takings across ~100 ms on 2 x H200, the copies waiting behind them).
        if (overlapped) prep = { ...prep, maxInflightBytes: Infinity, allocateGroup: Math.max(prep.allocateGroup, 256) };
        // Otherwise, with the targets made off the main thread: the standby is made as soon as their
        // addresses are final, so the attach runs while the driver makes the chunks and the copies
        // follow (graphs captured against them run only after the switch-over, which waits for the
        // copies). In process the engine reads them through futureTensor; an executor process attaches
        // through the daemon, whose attach waits for each chunk still being made (HmmDaemon).
        const early = !overlapped && prep.offThread && this.options.attachDuringCopies !== false && jobs.length > 0;
        let allocated!: () => void;
        const ready = new Promise<void>((resolve) => (allocated = resolve));
        const run = pacedCopy(store, jobs, { ...prep, ...copyOptions, onAllocated: () => allocated(), onReserved: early ? () => allocated() : undefined });
        if (overlapped || early) {
          copying = run;
          attachEarly = early;
          run.catch(() => undefined); // observed below, or by the rollback
          await Promise.race([ready, run.then(() => undefined)]);
        } else {
          const r = await run;
          copied = r.chunks;
          copyStats = r.stats;
        }
      } else {
        copied = await this.copier.copy(toCopy, copyOptions);
      }
      phases.prepareMs = lap();

      // 3. Attach: the standby forward pass maps the new layout.
      progress('attach');
      if (this.daemon) {
        // A standby executor process (the one started ahead, when it is alive) attaches through the
        // daemon and maps the KV pools of next.devices only.
        // The serving process's recent graph shapes, captured by the standby before it answers ready.
        const shapes = this.forward instanceof RemoteStepper
          ? precaptureShapes(this.forward.graphShapes, next.devices, this.options.precaptureGraphs ?? DEFAULT_PRECAPTURE_GRAPHS) : [];
        let proc: RemoteStepper;
        if (readyProcMade) {
          proc = readyProc!.stepper;
          prestartedUsed = true;
          madeAhead = { ms: readyProc!.ms, precaptured: (proc.precaptured?.graphs ?? 0) + readyProc!.followed };
          if (proc.precaptured) precapture = proc.precaptured;
        } else if (readyProc) {
          // Initialised ahead for another scale: initialised again for this one (it keeps what it attached).
          proc = readyProc.stepper;
          standby = proc; // killed by the rollback if this fails
          prestartedUsed = true;
          await proc.reinit(executorInit(this.options, next, shapes));
          if (shapes.length > 0) precapture = proc.precaptured ?? { graphs: 0, ms: 0 };
        } else {
          let spawned = this.prestarted;
          this.prestarted = undefined;
          if (spawned && (spawned.proc.exitCode !== null || spawned.proc.signalCode !== null)) {
            spawned.channel.close();
            spawned = undefined;
          }
          prestartedUsed = spawned !== undefined;
          proc = await initExecutor(this.options, spawned ?? spawnProcess(this.daemon), next, shapes);
          if (shapes.length > 0) precapture = proc.precaptured ?? { graphs: 0, ms: 0 };
        }
        standby = proc;
        // Its session keeps only the new layout's chunks and KV pools, so release can free the rest.
        const needed = new Set(store.all().filter((c) => c.holders.has(newId)).map((c) => c.plan.id));
        for (const d of next.devices) for (const id of this.hmm.kv.info(d).chunkIds) needed.add(id);
        const session = this.hmm.session(proc.session);
        session.detach([...session.attached].filter((id) => !needed.has(id)));
      } else {
        const tv = now();
        for (const [d, v] of mapHmmKvPools(this.rt, this.hmm, createdPools.filter((d) => !newViews.has(d)))) newViews.set(d, v);
        const viewsMs = now() - tv;
        const allViews = new Map([...this.views, ...newViews]);
        // The engine made ahead reads the filled standby chunks where they are mapped: usable when
        // every target was adopted from them (the same mappings), else one is made now.
        if (ready && !copying && toCopy.length === 0 && adopted.every((c) => ready!.ranges.get(c.plan.id) === c.range)
          && adopted.length === ready.ranges.size) {
          standby = ready.engine;
          madeAhead = { ms: ready.ms, precaptured: ready.precaptured };
        } else {
          ready = undefined;
          standby = await Deployment.createForward(this.options, this.hmm, next, allViews, this.hostPool, this.tables, futureWeights(store));
          attachStats = { viewsMs, forward: standby.createStats };
        }
        // The serving engine's recent shapes, captured ahead on the standby engine (while the copies run, too).
        if (this.forward instanceof ForwardEngine) {
          // Best effort: graphs not captured ahead are captured at their first step. Not the joining device's
          // shapes: at scale time they would lengthen the scale (an engine made ahead has them already).
          const tp = now();
          const shapes = this.shapesAhead(next, undefined, false);
          const before = standby.graphStats.precaptured;
          try {
            await standby.precapture(shapes);
            precapture = { graphs: standby.graphStats.precaptured - before, ms: now() - tp };
          } catch (e) {
            precapture = { graphs: standby.graphStats.precaptured - before, ms: now() - tp, error: `${(e as Error).name}: ${(e as Error).message}` };
          }
        }
      }
      phases.attachMs = lap();
      if (copying) {
        const r = await copying;
        copied = r.chunks;
        copyStats = r.stats;
        phases.copyWaitMs = lap();
      }
      if (this.tables) {
        // The new layout's expert chunks into their slots (the staying ones are mapped already), before
        // any step reads them; in groups with a turn of the loop between them.
        const tm = now();
        // Those mapped ahead with the standby engine made for this plan (mapReadyAhead) are taken as they are.
        const news = store.all().filter((c) => c.holders.has(newId) && expertOf(c.plan) && !this.tables!.has(c.plan.id));
        for (let i = 0; i < news.length; i += ADOPT_GROUP) {
          if (i > 0) await new Promise<void>((r) => setImmediate(r));
          for (const c of news.slice(i, i + ADOPT_GROUP)) {
            if (this.tables.map(c) === 'taken') tableFigures.taken++;
            else tableFigures.mapped++;
          }
        }
        tableFigures.mapMs = now() - tm;
      }
      bytesCopied = prefilledBytes + copied!.reduce((a, c) => a + c.plan.size, 0);
      fromStandby = store.sparesTaken - takenBefore;
    } catch (e) {
      // Copies still queued finish (or fail and free their targets) before anything is freed; a
      // failed copy is the cause to report (the standby engine then fails on its freed targets).
      const copyError = copying ? await copying.then(() => undefined, (c: unknown) => c) : undefined;
      const error = copyError ?? e;
      await rollback(error);
      throw error;
    }

    // 4. Switch over between two engine steps.
    progress('switch');
    let switchover: ReconfigureReport;
    try {
      switchover = await switchOver(this.engine, standby, next.devices, this.hmm, this.options.balanceOnScale === true);
    } catch (e) {
      // reconfigure rejects only before changing anything: the old layout still serves.
      await rollback(e);
      throw e;
    }
    const old = this.forward;
    this.forward = standby;
    this.layoutSpec = next;
    this.layoutId = newId;
    this.layoutCounter++;
    this.switches++;
    for (const [d, v] of newViews) this.views.set(d, v);
    if (madeAhead && standby instanceof ForwardEngine) madeAhead.shapes = standby.graphShapes().map((g) => [g.rank, g.T, g.S, g.MB, g.sampled]);
    phases.switchMs = lap();

    // 5. Release what only the old layout used. The old forward pass ran its last step before
    // the switch. The release waits for the first step on the new layout (freeing ~1,700
    // chunks blocks this thread for ~0.1 s, which would otherwise delay that step), then frees
    // in groups with the event loop given a turn between them, so serving keeps stepping.
    // From here on the scale is done (the new layout serves): what the release cannot free is reported
    // (releaseErrors) and the rest is freed all the same; a store free the driver refused is tried again later.
    const releaseErrors: string[] = [];
    const bestEffort = async <T>(what: string, fn: () => T | Promise<T>): Promise<T | undefined> => {
      try {
        return await fn();
      } catch (e) {
        releaseErrors.push(`${what}: ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`);
        trace('scale.release-error', { what });
        return undefined;
      }
    };
    await bestEffort('first step on the new layout', () => this.engine.afterNextStep());
    phases.firstStepMs = lap();
    progress('release');
    if (old instanceof RemoteStepper) {
      // The old process exits and its daemon session ends before its chunks are released.
      await bestEffort('old executor process', async () => {
        await old.close();
        trace('coord.old-process-ended');
        await settleSessions(this.hmm, standby);
      });
    }
    const engineRelease = old instanceof ForwardEngine ? await bestEffort('old engine', () => old.disposeAsync()) : undefined;
    const releaseStats: ScaleReport['release'] = engineRelease ? { engine: engineRelease, chunks: { ms: 0, maxBlockMs: 0, groups: 0 } } : undefined;
    // The standby engines made ahead that this scale did not use (their pools too, unless taken).
    for (const r of readies) if (r.engine !== standby) await bestEffort(`standby engine of device ${r.device}`, () => disposeReady(this.hmm, r, readyPools.has(r.device)));
    // With standby chunks, a leaving device's chunks stay as its standby chunks, filled with the
    // bytes a later scale-up onto it would copy back, and with scaleDownSpares so do a staying
    // device's (what a scale back down would copy onto it): the planner then puts experts back
    // where their bytes are (ScalePlans' warm experts), and the work ahead trims what no plan wants.
    const stay = new Set(next.devices);
    const keepAsSpare = (c: StoredChunk) => this.standbyOn && c.plan.kind === 'weight' && (!stay.has(c.plan.device) || this.options.scaleDownSpares === true);
    const tables = this.tables;
    if (tables) {
      // The old layout's last step ran: its expert chunks leave the tables before they are freed or kept as standby chunks.
      const tu = now();
      tableFigures.unmapped = await bestEffort('expert tables', () => tables.retainPaced((id) => store.has(id) && store.get(id).holders.has(newId), RELEASE_GROUP)) ?? 0;
      tableFigures.unmapMs = now() - tu;
    }
    const freed = await releaseHolder(store, oldId, { keepAsSpare, node: this.nodeDevices, turnFirst: releaseStats !== undefined });
    releaseErrors.push(...freed.errors);
    const chunksReleased = freed.released;
    const chunksKept = freed.kept;
    if (releaseStats) releaseStats.chunks = { ms: freed.ms, maxBlockMs: freed.maxBlockMs, groups: freed.groups };
    for (const d of from) {
      if (stay.has(d)) continue;
      const view = this.views.get(d);
      this.views.delete(d);
      await bestEffort(`KV mapping of device ${d}`, () => view?.dispose());
      await bestEffort(`KV pool of device ${d}`, () => this.hmm.kv.destroyPool(d));
    }
    // The chunks adopted ahead: this layout's where it took them, else standby chunks again; the pool made
    // ahead is this layout's when it has the device, else freed.
    if (readyProc) await bestEffort('process made ahead', () => this.giveBack(readyProc!, !stay.has(readyProc!.device)));
    phases.releaseMs = lap();
    trace('scale.released', { chunksReleased, chunksKept, errors: releaseErrors.length });
    if (this.options.peerAccess === 'all') this.accessGrant = grantNodeAccess(store, newId, this.nodeDevices);
    progress('done');
    return {
      from, to: [...next.devices], ms: now() - t0, bytesCopied, chunksCopied: copies.length, chunksFromStandby: fromStandby,
      chunksPrefilled: prefilled, bytesPrefilled: prefilledBytes, plannedAhead, attachDuringCopies: overlapped || attachEarly, attachBeforeTargets: attachEarly, ...(this.daemon ? { prestartedExecutor: prestartedUsed } : {}),
      ...(standby instanceof RemoteStepper && standby.preattached ? { preattachedChunks: standby.preattached } : {}), chunksReused: reused.length, chunksReleased,
      chunksKeptAsStandby: chunksKept, ...(this.tables ? { expertTables: tableFigures } : {}),
      ...(standby instanceof RemoteStepper && standby.expertTables ? { expertTables: processTables(standby.expertTables) } : {}), lowerBoundBytes: lower, phases, switchover, copies, layout: cloneLayout(next),
      prepare: { options: prep!, ...(copyStats ? { stats: copyStats } : {}) }, load: loadUsed,
      ...(attachStats ? { attach: attachStats } : {}),
      ...(madeAhead ? { standbyMadeAhead: madeAhead } : {}),
      ...(precapture ? { precapture } : {}),
      ...(releaseStats ? { release: releaseStats } : {}),
      ...(releaseErrors.length > 0 ? { releaseErrors } : {}),
    };
  }

  /** Cancels the requests in flight, waits for a scale in progress, frees the forward pass, the views and the HMM. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.scaling?.catch(() => undefined);
    await this.accessGrant?.catch(() => undefined);
    await this.stopAhead();
    await this.dropReadies();
    await this.dropReadyProc();
    if (this.prestarted) await dismiss(this.prestarted);
    this.prestarted = undefined;
    await this.engine.close();
    await disposeExecutor(this.forward, false);
    this.hostPool.dispose();
    for (const k of this.preloaded) k.dispose();
    this.preloaded = [];
    for (const v of this.views.values()) v.dispose();
    this.views.clear();
    if (this.daemon) {
      await settleSessions(this.hmm, undefined);
      await closeDaemon(this.daemon);
    }
    this.tables?.dispose();
    this.hmm.dispose();
  }
}
