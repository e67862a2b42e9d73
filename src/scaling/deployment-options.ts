// What a deployment is started with (DeploymentOptions, ExecutorMode), and what a scale takes
// (ScaleTarget, ScaleOptions), reports as it goes (ScaleProgress) and returns (ScaleReport).
// Types only: the Deployment (orchestrator.ts) implements them.
import type { ReconfigureReport, StepFigures } from '../executor/engine.js';
import type { ForwardCreateStats, ForwardEngineOptions } from '../executor/forward.js';
import type { CopyProgress } from '../hmm/copy-service.js';
import type { TensorLocation } from '../hmm/placement.js';
import type { ModelConfig } from '../model/config.js';
import type { Runtime } from '../runtime/runtime.js';
import type { LayoutSpec } from './layout.js';
import type { PacedCopyStats, PrepareOptions } from './pacing.js';

export interface DeploymentOptions {
  rt: Runtime;
  config: ModelConfig;
  /** Devices of the initial layout (experts dealt round robin over them). */
  devices: number[];
  /**
   * A safetensors checkpoint (its folder, or one file) to load the weights from, through the
   * HMM (pinned staging, the chunks of the initial layout). Without it the weights are
   * synthetic (`seed`, `scaleFor`). A scale copies the loaded chunks between devices either way.
   */
  checkpoint?: string;
  /** Progress of loading the weights (checkpoint or synthetic), in bytes. */
  onLoadProgress?: (p: { bytesDone: number; bytesTotal: number }) => void;
  /** Token ids that end a request besides the config's (a tokenizer's, say). */
  extraEosTokenIds?: readonly number[];
  /** Seed of the synthetic weights (default 0). */
  seed?: bigint;
  /** Uniform range of each synthetic tensor (see SyntheticOptions.scaleFor). */
  scaleFor?: (t: TensorLocation) => number;
  /** KV blocks of the pool created on every device of a layout. */
  kvBlocksPerDevice: number;
  /** Tokens per KV block (default 16). */
  blockTokens?: number;
  /** Token budget of one step on each DP rank (default 64). */
  maxTokensPerStep?: number;
  /** Most running sequences per DP rank (default 64). */
  maxSeqs?: number;
  /** Planner balance bound: max device load over mean (default 1.1). */
  balance?: number;
  /** Sources one expert copy is striped across (default 2). */
  maxSourcesPerTransfer?: number;
  onStep?: (figures: StepFigures) => void;
  /**
   * Pacing of the prepare phase's copies (src/scaling/pacing.ts): bounded batches,
   * the serving loop given turns between them, target chunks created ahead in
   * groups. Defaults: DEFAULT_PREPARE. A scale may override it (ScaleOptions.prepare).
   */
  prepare?: PrepareOptions;
  /**
   * Where the forward passes run (default 'in-process'). `{ process: { script } }`:
   * `node script SOCKET` for each layout, a script that calls runExecutorProcess
   * with channelFd 3; `env` is added to this process's environment.
   */
  executor?: ExecutorMode;
  /** Forward-pass options of every layout's engine (graphs, routing thresholds, kvDtype); executor processes get kvDtype only. */
  forward?: Omit<ForwardEngineOptions, 'maxTokensPerStep' | 'blockTokens'>;
  /**
   * Observe the experts' load while serving and plan scales with it (ScaleTarget.load wins):
   * every `every`-th engine step counts the routed tokens per layer and expert
   * (ForwardEngineOptions.observeLoadEvery); `{}` observes every 32 steps. Default false: plan
   * with a uniform load (observed counts of a few steps are noisy and can make a plan move
   * more bytes than a uniform one; not measured on GPUs yet). In-process executors only.
   */
  observeLoad?: { every?: number } | false;
  /**
   * Load the model kernels on every device of the node at start and keep them (default true,
   * in-process executors): the standby engine of a scale then finds them loaded on the devices
   * it adds, instead of loading them inside the attach phase (100-190 ms on H200). Costs a
   * loaded module (a few MB) on each idle device.
   */
  preloadKernels?: boolean;
  /**
   * 'own' (default): chunks are mapped for their own device, and a scale's copies are pushed by
   * their sources into targets mapped for the target and source devices. 'all': every weight
   * chunk is readable from every device of the node, so a scale's copies are pulled by their
   * targets, whose new chunks are mapped for their own device only (granted the rest in the
   * background after the switch-over). Measured on 2 x H200, same run (bench-scale 1→2→1):
   * pulls were slower, 1,141 / 984 ms against 851 / 854 ms, chunk creation on the target
   * device slowing down while that device also ran the copies (721 against 577 ms).
   */
  peerAccess?: 'all' | 'own';
  /**
   * Virtual expert tables (src/hmm/expert-tables.ts; default false): each device reserves one
   * address range with a slot for every routed expert of the model (layer l's expert e at
   * (l * experts + e) * stride) and maps into it the expert chunks it holds; the engines read the
   * experts there. A scale maps its new expert chunks into their slots before the switch-over and
   * unmaps the old layout's after it; rolled back, it unmaps what it mapped. Executor processes
   * keep tables of their own: each maps its layout's expert chunks, as it imports them, at its
   * init. Run on the mock only: no GPU has run it yet.
   */
  expertTables?: boolean;
  /**
   * Pause graph captures of the serving engine from the plan to the switch-over (default
   * false): shapes with a graph still replay, new ones run as usual instead of being captured,
   * leaving the host thread to the prepare phase's chunk creation (in-process executors). Not
   * measured on GPUs yet (bench-scale: BENCH_PAUSE_CAPTURES=1).
   */
  pauseCaptures?: boolean;
  /**
   * Keep, on every device of the node outside the layout, the chunks a scale-up onto that
   * device would copy into, created, mapped and granted access ahead (default true): the
   * prepare phase then takes them instead of calling the driver (~0.2 ms per 12 MiB expert
   * chunk on H200, ~1,700 chunks for a Qwen3-30B-A3B 2→3). They are sized by planning "the
   * layout plus that device", created in the background (groups of 8, the loop given a turn
   * in between) after start and after each scale, paused while a scale runs, and counted as
   * `spareBytes`. Costs that memory on idle devices; devices of the layout keep none (see
   * scaleDownSpares).
   */
  standbyChunks?: boolean;
  /**
   * With standbyChunks: the devices of the layout also keep, as standby chunks, what a scale-down
   * by any one device would copy onto them (the experts and dense chunks of the leaving device
   * that they take over), so a scale-down takes them instead of creating chunks at scale time
   * (default false). Costs that memory on the serving devices for as long as they serve; worth it
   * where their memory is idle beside fixed-size KV pools. Measured (H100/H200, 2026-11-26):
   * scale-downs 179-287 ms against 403-902 ms, but the copies then overlap serving (work done
   * during the scale-down 0.58-0.91 of before, against 0.86-0.96).
   */
  scaleDownSpares?: boolean;
  /**
   * With standbyChunks: the standby chunks of each device outside the layout are also filled, in
   * the background, with the bytes a scale-up onto that device would copy (the planned ahead
   * scale's expert and dense chunks, which never change once loaded), so that scale-up adopts
   * them and copies nothing at command time: no copy traffic beside serving, and no copy to wait
   * for (default true). Costs no memory beyond the standby chunks; costs a copy of each joining
   * device's intake after every scale (PREFILL_GROUP chunks at a time, a turn of the loop
   * between groups), which settled() waits for. A scale to another target than the planned
   * ones (an observed or given load) copies as usual.
   */
  prefillStandby?: boolean;
  /**
   * With prefillStandby, in-process executors and a uniform-load plan: after each scale, in the
   * background, make the standby engine of each planned scale-up onto an idle device (ready.ts):
   * that device's KV pool and mapping, the new layout's forward engine reading the serving chunks
   * and the filled standby chunks in place, and the serving engine's recent graph shapes captured
   * (default true). The scale-up to one of those targets adopts the chunks and switches over: its
   * attach phase only captures the shapes that appeared since. Costs, for as long as the layout
   * serves, one engine's scratch per idle device on every device of the layout plus the idle
   * device (ForwardCreateStats.scratchBytes), the idle devices' KV pools (made at the scale
   * otherwise), and the host time of making them after each scale instead of during the next.
   * `{ follow }`: while the layout serves, every 200 ms each of them captures the shapes it would
   * capture ahead now that it lacks, up to `follow` per staying device (default precaptureGraphs;
   * 0: none; the scale captures the rest), so a scale finds the serving engine's newer shapes
   * captured too; costs host time while serving (each capture ~20-35 ms in ~1 ms pieces on H100).
   */
  standbyEngines?: boolean | { follow?: number };
  /**
   * At each switch-over, also move running sequences (their KV blocks, through the HMM) between
   * the new layout's ranks until no two are more than one sequence apart (default false): a device
   * a scale-up adds starts with its share of the batch instead of growing into it from new
   * requests, one step bucket at a time. The standby engines made ahead then capture each rank's
   * decode step of its share first. Costs the KV copies of the sequences moved at the
   * switch-over. Tested on the mock; not measured on GPUs yet.
   */
  balanceOnScale?: boolean;
  /**
   * The shapes the new layout's first steps pass through (the staying ranks' decode and mixed
   * steps at their new share of the running sequences, a joining rank's prompt steps on its climb
   * to its share: precaptureShapes' `ramp`): each standby engine made ahead captures them too, and
   * a scale's attach phase (a scale-down's included) captures the staying ranks' ones first, within
   * precaptureGraphs. Default true; false for A/B runs.
   */
  rampShapes?: boolean;
  /**
   * When every target chunk of a scale is a standby chunk: queue all the copies at once and make
   * the standby (engine, or executor process) while they run, instead of after (default true).
   * Otherwise, in process with prepare.offThread (default): make the standby engine as soon as
   * the targets' addresses are reserved, while a worker thread makes their chunks and the copies
   * follow (ScaleReport.attachBeforeTargets).
   */
  attachDuringCopies?: boolean;
  /**
   * Graph shapes per staying device that a scale's standby captures ahead, before the
   * switch-over (default DEFAULT_PRECAPTURE_GRAPHS = 3, 0: none): the serving engine's most recent
   * decode shape of that device, then its others (precaptureShapes). The first steps on the new layout then replay
   * instead of capturing. In process: host work done in pieces of 2 layers with a turn of the
   * event loop between them, while the old layout serves. Executor processes: the standby
   * process captures them before it answers ready (the serving process sends its shapes with
   * its step results).
   */
  precaptureGraphs?: number;
  /**
   * In process: the engines' pinned host buffers (a few tens of MB per device) are kept when
   * a layout's engine is released and handed to the next scale's engine (default true; at
   * most 1 GiB kept, freed at close). false: each engine allocates its own and frees them at
   * release, where cuMemFreeHost held the event loop for 64-109 ms while the new layout
   * stepped (CPU profiles on 4 x H100).
   */
  hostPool?: boolean;
}

/**
 * `prestart` (default true): keep one executor process started ahead, warmed up (runtime open,
 * kernels loaded on every device) and waiting for its layout, so a scale's attach phase does not
 * start a process; a new one is started after each scale. `preattach` (default true, with
 * prestart): that process also attaches the serving layout's chunks ahead (a scale keeps most of
 * them), so the attach phase imports only what the new layout adds. `initAhead` (default true,
 * with prestart, standby chunks filled ahead and standbyEngines not false): that process is
 * initialised ahead for the planned scale-up onto the lowest idle device, over that scale's
 * target chunks adopted ahead from the filled standby chunks (ready-process.ts), so the scale-up
 * only switches over; a scale it was not made for initialises it again for its own layout.
 */
export type ExecutorMode = 'in-process' | { process: { script: string; env?: Record<string, string>; prestart?: boolean; preattach?: boolean; initAhead?: boolean } };

export type ScalePhase = 'plan' | 'prepare' | 'attach' | 'switch' | 'release' | 'rollback' | 'done';

export interface ScaleProgress {
  phase: ScalePhase;
  from: number[];
  to: number[];
  /** Peer-to-peer copies of the prepare phase, as they complete. */
  copy?: CopyProgress;
  /** The error being rolled back (phase 'rollback'). */
  error?: unknown;
}

export interface ScaleOptions {
  onProgress?: (p: ScaleProgress) => void;
  /** Pacing of this scale's prepare phase, over DeploymentOptions.prepare. */
  prepare?: PrepareOptions;
}

export interface ScaleTarget {
  devices: number[];
  /** load[layer][expert]: tokens per expert (default: the load observed while serving, else uniform). */
  load?: number[][];
}

export interface ScaleReport {
  from: number[];
  to: number[];
  /** Command to release done. */
  ms: number;
  /** Bytes of the chunks copied peer-to-peer (dense and experts, granularity-rounded). */
  bytesCopied: number;
  chunksCopied: number;
  /** Of the chunks copied into, those taken from the standby chunks made ahead (DeploymentOptions.standbyChunks). */
  chunksFromStandby: number;
  /**
   * Of the new chunks, those whose standby chunk had been filled ahead (DeploymentOptions.prefillStandby)
   * and their bytes: moved before the command, not during the scale (bytesCopied counts them too).
   */
  chunksPrefilled: number;
  bytesPrefilled: number;
  /** Whether the plan was made ahead, in the background after the last scale (uniform-load scales by one device). */
  plannedAhead: boolean;
  /** Whether the standby engine was made while the copies ran (DeploymentOptions.attachDuringCopies). */
  attachDuringCopies: boolean;
  /**
   * Whether it was made before the target chunks existed, against their reserved addresses, while
   * a worker thread made them (in process, prepare.offThread, targets not all standby chunks).
   */
  attachBeforeTargets: boolean;
  /**
   * The standby engine was made ahead, after the last scale (DeploymentOptions.standbyEngines):
   * how long that took in the background and the graphs it captured then. `attach` is absent:
   * the attach phase only captured the shapes missing (`precapture`).
   */
  standbyMadeAhead?: {
    ms: number;
    precaptured: number;
    /** In process: the graph shapes it had cached at the switch-over, [rank, T, S, MB, sampled], most recent first (diagnostics). */
    shapes?: number[][];
  };
  /** Executor processes: whether the standby was the process started ahead (ExecutorMode prestart). */
  prestartedExecutor?: boolean;
  /** Executor processes: chunks the standby had attached ahead and kept, and those it dropped (ExecutorMode preattach). */
  preattachedChunks?: { kept: number; dropped: number };
  /** Weight chunks of the old layout the new one uses in place. */
  chunksReused: number;
  /**
   * Weight chunks of a leaving device kept at release as its standby chunks, with their bytes
   * (DeploymentOptions.standbyChunks): a later scale-up onto it adopts them with no copy.
   */
  chunksKeptAsStandby: number;
  /**
   * With expertTables: the new layout's expert chunks mapped into their slots before the
   * switch-over (`mapped`), those found mapped ahead with the standby engine made for this plan
   * (`taken`), the old layout's unmapped at release, and the host time of each. With executor
   * processes: every expert chunk of the new layout, mapped by the new process at its init, and
   * `read`: how many of its engine's expert weights (by rank, layer and expert) it reads there.
   */
  expertTables?: { mapped: number; taken: number; unmapped: number; mapMs: number; unmapMs: number; read?: number };
  /** Weight chunks freed at release (held by the old layout only). */
  chunksReleased: number;
  /** Bytes any plan meeting the same balance bound must move (planner.lowerBoundBytes). */
  lowerBoundBytes: number;
  /**
   * Milliseconds of each phase, one after another. With `attachDuringCopies`, prepareMs ends
   * when every target exists and its copies are queued, attachMs runs while they copy, and
   * copyWaitMs is the wait for the copies after it (0 otherwise). firstStepMs: from the switch-over to the end of the first
   * engine step on the new layout (0 when the engine was idle); the release waits for it.
   */
  phases: { planMs: number; prepareMs: number; attachMs: number; copyWaitMs: number; switchMs: number; firstStepMs: number; releaseMs: number };
  /** Where the attach phase spent its time (in-process executors): the standby engine's creation. */
  attach?: { viewsMs: number; forward: ForwardCreateStats };
  /**
   * Graphs the standby captured ahead, before the switch-over, and how long that took (within the
   * attach phase; DeploymentOptions.precaptureGraphs), and why it stopped early if a capture failed
   * (best effort: the scale goes on, those graphs are captured at their first step). Absent with
   * executor processes when the serving process had no shapes to give.
   */
  precapture?: { graphs: number; ms: number; error?: string };
  /**
   * In process: the release's host work, the old engine's disposal (in pieces) and the chunk
   * frees (in groups of RELEASE_GROUP), with the longest piece: how long it held the event loop.
   */
  release?: { engine: { ms: number; maxBlockMs: number; pieces: number }; chunks: { ms: number; maxBlockMs: number; groups: number } };
  /**
   * What the release after the switch-over could not do ("what: error"): the scale is done (the new
   * layout serves) and the rest was released; a chunk whose free the driver refused is tried again
   * at the HMM's next free.
   */
  releaseErrors?: string[];
  /** What the switch-over did to the requests in flight. */
  switchover: ReconfigureReport;
  /** Each copied chunk and the chunks it was copied from (identical bytes). */
  copies: Array<{ targetId: string; sourceIds: string[] }>;
  /** The new layout. */
  layout: LayoutSpec;
  /** The pacing the prepare phase ran with and, when paced, what it did. */
  prepare: { options: Required<PrepareOptions>; stats?: PacedCopyStats };
  /** The expert load the plan balanced: given with the target, observed while serving (over `observedSteps`), or uniform. */
  load: { source: 'given' | 'observed' | 'uniform'; observedSteps?: number };
}
