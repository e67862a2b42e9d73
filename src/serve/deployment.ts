// What the HTTP server needs from whatever serves the model: submit requests,
// read the engine's counters and the current layout, and (when it can) change
// the devices. The server depends on this interface only, so the in-process
// stack of today (`EngineDeployment` over a LocalStack) and the scaling
// orchestrator's Deployment plug in the same way.
import type { Completion, EngineStats, GenerationCallbacks, GenerationRequest, StepFigures } from '../executor/engine.js';
import type { DeviceAccounting } from '../hmm/chunk-store.js';
import type { Hmm } from '../hmm/hmm.js';
import type { TextTokenizer } from '../model/tokenizer.js';
import type { ExpertPlacement } from '../model/weights.js';
import type { LocalStack } from './local.js';

export interface ServedModel {
  /** The name clients pass as `model` (GET /v1/models lists it). */
  id: string;
  /** Longest sequence (prompt + output) the model takes. */
  maxPositions: number;
  /** Token ids must be below this. */
  vocabSize: number;
  /** Absent: prompts are token ids only, and chat is refused. */
  tokenizer?: TextTokenizer;
  /** Unix seconds (GET /v1/models `created`). */
  created?: number;
}

export interface LayoutInfo {
  /** DP rank r runs on devices[r] (TP = 1). */
  devices: number[];
  tp: number;
  dp: number;
  ep: number;
  /** placement[layer][expert] = the devices holding it. */
  placement?: number[][][];
}

export interface KvPoolState {
  device: number;
  blocks: number;
  freeBlocks: number;
  blockBytes: number;
}

/** What a scale reports back (the orchestrator's ScaleReport fits). */
export interface ScaleResult {
  from: number[];
  to: number[];
  ms: number;
}

export interface ServingDeployment {
  readonly model: ServedModel;
  submit(request: GenerationRequest, callbacks?: GenerationCallbacks): Promise<Completion>;
  stats(): EngineStats;
  layout(): LayoutInfo;
  /** Moves serving onto `devices` while serving. Absent: POST /admin/scale answers 501. */
  scale?(devices: number[]): Promise<ScaleResult>;
  /** True while a scale is in progress. */
  readonly isScaling?: boolean;
  /** Device memory by kind (the HMM's accounting), for /metrics. */
  memory?(): DeviceAccounting[];
  /** The standby engines made ahead for the scale-ups onto idle devices, with the graphs each captured ahead, for /metrics. */
  standbyEngines?(): Array<{ device: number; precaptured: number }>;
  /** The serving engine's graph counts since its layout began (in-process executors), for /metrics; undefined when none. */
  graphStats?(): { captures: number; replays: number; covered: number; deferred: number } | undefined;
  /** KV pools of the current layout's devices. */
  kvPools?(): KvPoolState[];
  /** Subscribes to the engine's per-step figures; returns the unsubscriber. */
  onStep?(listener: (f: StepFigures) => void): () => void;
}

/** Builds placement[layer][expert] from a placement function. */
export function placementTable(placement: ExpertPlacement, layers: number, experts: number): number[][][] {
  return Array.from({ length: layers }, (_, l) => Array.from({ length: experts }, (_, e) => [...placement(l, e)]));
}

export interface EngineDeploymentParts {
  engine: {
    submit(request: GenerationRequest, callbacks?: GenerationCallbacks): Promise<Completion>;
    stats(): EngineStats;
  };
  model: ServedModel;
  devices: readonly number[];
  /** Expert placement of the layout, with the model's layer and expert counts. */
  placement?: { table: ExpertPlacement; layers: number; experts: number };
  /** The HMM that owns the weights and KV pools (memory accounting, KV pool state). */
  hmm?: Pick<Hmm, 'accounting' | 'kv'>;
  onStep?: (listener: (f: StepFigures) => void) => () => void;
}

/**
 * A fixed-layout deployment over one engine (the in-process stack of
 * `elasticmoe generate` and `elasticmoe serve` today): no `scale`.
 */
export class EngineDeployment implements ServingDeployment {
  readonly model: ServedModel;
  private readonly devices: number[];
  private table: number[][][] | undefined;

  constructor(private readonly parts: EngineDeploymentParts) {
    this.model = parts.model;
    this.devices = [...parts.devices];
    if (parts.onStep) this.onStep = parts.onStep;
  }

  onStep?: (listener: (f: StepFigures) => void) => () => void;

  submit(request: GenerationRequest, callbacks?: GenerationCallbacks): Promise<Completion> {
    return this.parts.engine.submit(request, callbacks);
  }

  stats(): EngineStats {
    return this.parts.engine.stats();
  }

  layout(): LayoutInfo {
    const n = this.devices.length;
    const out: LayoutInfo = { devices: [...this.devices], tp: 1, dp: n, ep: n };
    const p = this.parts.placement;
    if (p) {
      this.table ??= placementTable(p.table, p.layers, p.experts);
      out.placement = this.table.map((layer) => layer.map((holders) => [...holders]));
    }
    return out;
  }

  memory(): DeviceAccounting[] {
    return this.parts.hmm?.accounting() ?? [];
  }

  kvPools(): KvPoolState[] {
    const kv = this.parts.hmm?.kv;
    if (!kv) return [];
    return kv.poolDevices().map((d) => {
      const i = kv.info(d);
      return { device: d, blocks: i.blocks, freeBlocks: i.freeBlocks, blockBytes: i.blockBytes };
    });
  }
}

/** The deployment of a local stack (fixed layout). */
export function localDeployment(stack: LocalStack, model: { id: string; created?: number }): EngineDeployment {
  const served: ServedModel = { id: model.id, maxPositions: stack.config.maxPositions, vocabSize: stack.config.vocabSize };
  if (model.created !== undefined) served.created = model.created;
  if (stack.tokenizer) served.tokenizer = stack.tokenizer;
  return new EngineDeployment({
    engine: stack.engine,
    model: served,
    devices: stack.devices,
    placement: { table: stack.placement, layers: stack.config.layers, experts: stack.config.experts },
    hmm: stack.hmm,
    onStep: (l) => stack.onStep(l),
  });
}

/** The scaling orchestrator's Deployment as the server sees it (structural: no import of the orchestrator). */
export interface ScalableLike {
  readonly engine: { stats(): EngineStats };
  readonly hmm: Pick<Hmm, 'accounting' | 'kv'>;
  readonly config: { maxPositions: number; vocabSize: number };
  readonly layout: LayoutInfo;
  readonly isScaling: boolean;
  /** The orchestrator's standby state (its standby engines made ahead), when it has one. */
  readonly standby?: { engines: ReadonlyArray<{ device: number; precaptured: number }> };
  /** The serving engine's graph counts (in-process executors), when it has them. */
  readonly graphStats?: { captures: number; replays: number; covered: number; deferred: number } | undefined;
  submit(request: GenerationRequest, callbacks?: GenerationCallbacks): Promise<Completion>;
  scale(target: { devices: number[] }): Promise<ScaleResult>;
}

/**
 * A deployment that scales: the orchestrator's Deployment (or anything of its
 * shape) behind the server's interface. `onStep` subscribes to its engine's
 * step figures when the caller wired them (DeploymentOptions.onStep).
 */
export function scalableDeployment(d: ScalableLike, model: { id: string; created?: number; tokenizer?: TextTokenizer },
  onStep?: (listener: (f: StepFigures) => void) => () => void): ServingDeployment {
  const served: ServedModel = { id: model.id, maxPositions: d.config.maxPositions, vocabSize: d.config.vocabSize };
  if (model.created !== undefined) served.created = model.created;
  if (model.tokenizer) served.tokenizer = model.tokenizer;
  const kvView = new EngineDeployment({ engine: { submit: (r, c) => d.submit(r, c), stats: () => d.engine.stats() }, model: served, devices: [], hmm: d.hmm });
  const out: ServingDeployment = {
    model: served,
    submit: (request, callbacks) => d.submit(request, callbacks),
    stats: () => d.engine.stats(),
    layout: () => {
      const l = d.layout;
      const info: LayoutInfo = { devices: [...l.devices], tp: l.tp, dp: l.dp, ep: l.ep };
      if (l.placement) info.placement = l.placement;
      return info;
    },
    scale: (devices) => d.scale({ devices }),
    get isScaling() {
      return d.isScaling;
    },
    memory: () => d.hmm.accounting(),
    // Pools of the current layout only (a scale in progress may have made pools for devices not serving yet).
    kvPools: () => {
      const current = new Set(d.layout.devices);
      return kvView.kvPools().filter((p) => current.has(p.device));
    },
  };
  if (d.standby !== undefined) out.standbyEngines = () => (d.standby?.engines ?? []).map((e) => ({ device: e.device, precaptured: e.precaptured }));
  if ('graphStats' in d) out.graphStats = () => d.graphStats;
  if (onStep) out.onStep = onStep;
  return out;
}
