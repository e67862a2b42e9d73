// The executor as a process of its own (DESIGN "Processes on one node"): it opens
// its runtime, connects to the HMM daemon, attaches the chunks of its layout (weights and KV),
// maps the KV pools from the daemon's manifest and runs a ForwardEngine for the
// layout its parent sends. The weights and the KV cache live in the HMM, not here,
// so when this process dies nothing is lost: a new one attaches and serves again
// (invariant 6).
//
// The parent talks to it over a UnixChannel (SOCK_SEQPACKET; one JSON message per
// packet), normally inherited as fd 3:
//   parent → executor  { type: 'preattach', devices, placement }   (optional, before init)
//   parent → executor  { type: 'init', config, devices, placement, options? }
//   executor → parent  { type: 'ready', pid, session, chunks } | { type: 'error', message, name }
//   parent → executor  { type: 'init', ... } again, any number of times before the first step: the
//                      engine is rebuilt for that layout, what was attached kept as attached ahead
//                      (a process initialised ahead for a planned scale and given another)
//   parent → executor  { type: 'precapture', shapes } after ready, before the first step, any number of
//                      times: those graphs captured (a process initialised ahead follows the serving
//                      process's shapes) → executor → parent { type: 'precaptured', graphs, ms, error? }
//   parent → executor  { type: 'step', id, batch, returnLogits? }
//   executor → parent  { type: 'result', id, result } | { type: 'error', id, message, name }
//   parent → executor  { type: 'shutdown' }
// Steps are answered in the order they arrive. The process ends cleanly on
// `shutdown` or when the parent's end of the channel closes.
//
// While it waits for `init` it warms up: the runtime opened (a context on every device)
// and the model kernels loaded on every device of the node (`preloadKernels`), so a process
// started ahead — a deployment's pre-started standby executor — pays only for attaching
// its layout when the scale comes. A `preattach` before init attaches a layout's chunks
// ahead (the deployment sends the layout serving now: a scale keeps most of it); init then
// attaches only what its layout adds and drops what it does not use.
import { closeSync } from 'node:fs';

import { HmmClient } from '../hmm/client.js';
import { ExpertTables } from '../hmm/expert-tables.js';
import type { ModelConfig } from '../model/config.js';
import { ModelKernels } from '../model/kernels/index.js';
import { type ChannelMessage, UnixChannel } from '../runtime/channel.js';
import { InvalidArgumentError } from '../runtime/errors.js';
import type { RuntimeOptionsInput } from '../runtime/config.js';
import { Runtime } from '../runtime/runtime.js';
import { trace } from '../runtime/trace.js';
import { ForwardEngine, type ForwardEngineOptions, type GraphShape } from './forward.js';
import { type MappedKvPool, mapAttachedKvPools } from './kv-view.js';
import type { Layout, StepBatch, StepResult } from './types.js';
import { attachedWeights } from './weights.js';

/**
 * The chunks a layout needs: dense weights and KV pools on its devices, and each
 * expert's chunk on the devices its placement names (groups `L<layer>.E<expert>`).
 */
export function layoutChunkIds(chunks: ReadonlyArray<{ id: string; group: string; device: number; kind: string }>,
  devices: readonly number[], placement: PlacementTable, pools: ReadonlyArray<{ chunkIds: string[] }>): string[] {
  const kv = new Set(pools.flatMap((p) => p.chunkIds));
  return chunks.filter((c) => {
    if (kv.has(c.id)) return true;
    if (c.kind !== 'weight' || !devices.includes(c.device)) return false;
    const m = /^L(\d+)\.E(\d+)$/.exec(c.group);
    if (!m) return true; // dense weights
    return placement[Number(m[1])]?.[Number(m[2])]?.includes(c.device) ?? false;
  }).map((c) => c.id);
}

/** Expert placement as data: placement[layer][expert] = the devices holding it. */
export type PlacementTable = number[][][];

export interface InitMessage {
  type: 'init';
  config: ModelConfig;
  devices: number[];
  placement: PlacementTable;
  options?: ForwardEngineOptions;
  /** Graph shapes to capture before answering ready (ForwardEngine.precapture; a scale's standby). */
  precapture?: GraphShape[];
  /**
   * Virtual expert tables (DeploymentOptions.expertTables): the layout's expert chunks, as imported
   * here, mapped into this process's tables too, and the engine reading them there.
   */
  expertTables?: boolean;
}
export interface StepMessage {
  type: 'step';
  id: number;
  batch: StepBatch;
  returnLogits?: boolean;
}
export interface ShutdownMessage {
  type: 'shutdown';
}
/** The chunks of a layout to attach ahead of init (see the top of this file). */
export interface PreattachMessage {
  type: 'preattach';
  devices: number[];
  placement: PlacementTable;
}
/** Graphs to capture before the first step (after ready): a process initialised ahead follows the serving shapes. */
export interface PrecaptureMessage {
  type: 'precapture';
  shapes: GraphShape[];
}
export type ToExecutor = InitMessage | PreattachMessage | PrecaptureMessage | StepMessage | ShutdownMessage;

/** A StepResult as JSON: maps as entry arrays, logits as base64 of their f32 bytes (bit-exact). */
export interface WireStepResult {
  next: Array<[string, number]>;
  logits?: Array<[string, string]>;
  ms: number;
  tokens: number;
}
export interface ReadyMessage {
  type: 'ready';
  pid: number;
  /** The executor's HMM session. */
  session: string;
  /** Chunks it attached (weights and KV). */
  chunks: number;
  /** Of those, the ones attached ahead (preattach), and the ones attached ahead that init dropped. */
  preattached?: { kept: number; dropped: number };
  /** Graphs captured from init's precapture list, the milliseconds it took, and why it stopped early (a failed capture). */
  precaptured?: { graphs: number; ms: number; error?: string };
  /**
   * With expertTables: the expert chunks mapped into this process's tables, per device, the host time
   * it took, and how many of the engine's expert weights (by rank, layer and expert) it reads there.
   */
  expertTables?: { mapped: Array<[number, number]>; ms: number; read: number };
}
export interface ResultMessage {
  type: 'result';
  id: number;
  result: WireStepResult;
  /**
   * The engine's most recently used graph shapes (ForwardEngine.graphShapes, at most
   * GRAPH_SHAPES_SENT), sent with a result when they changed since the last one sent.
   */
  graphShapes?: GraphShape[];
}

/** Graph shapes a result carries at most (what a scale's standby may capture ahead). */
export const GRAPH_SHAPES_SENT = 16;
export interface ErrorMessage {
  type: 'error';
  /** Absent for a failed init. */
  id?: number;
  name: string;
  message: string;
}
/** The answer to a precapture: graphs captured, the milliseconds it took, why it stopped early. */
export interface PrecapturedMessage {
  type: 'precaptured';
  graphs: number;
  ms: number;
  error?: string;
}
export type FromExecutor = ReadyMessage | ResultMessage | ErrorMessage | PrecapturedMessage;

export function placementTable(config: ModelConfig, layout: Layout): PlacementTable {
  const table: PlacementTable = [];
  for (let l = 0; l < config.layers; l++) {
    const row: number[][] = [];
    for (let e = 0; e < config.experts; e++) row.push([...layout.placement(l, e)]);
    table.push(row);
  }
  return table;
}

export function layoutFromTable(devices: number[], table: PlacementTable): Layout {
  return {
    devices,
    placement: (l, e) => {
      const h = table[l]?.[e];
      if (!h) throw new Error(`placement table has no entry for expert ${e} of layer ${l}`);
      return h;
    },
  };
}

export function encodeStepResult(r: StepResult): WireStepResult {
  const out: WireStepResult = { next: [...r.next.entries()], ms: r.ms, tokens: r.tokens };
  if (r.logits) {
    out.logits = [...r.logits.entries()].map(([id, x]) => [id, Buffer.from(x.buffer, x.byteOffset, x.byteLength).toString('base64')]);
  }
  return out;
}

export function decodeStepResult(w: WireStepResult): StepResult {
  const r: StepResult = { next: new Map(w.next), ms: w.ms, tokens: w.tokens };
  if (w.logits) {
    r.logits = new Map(w.logits.map(([id, b64]) => {
      const bytes = Buffer.from(b64, 'base64');
      // Copy into an aligned buffer of its own.
      const f = new Float32Array(bytes.byteLength / 4);
      new Uint8Array(f.buffer).set(bytes);
      return [id, f];
    }));
  }
  return r;
}

export interface ExecutorProcessOptions {
  /** Socket of the HMM daemon. */
  socket: string;
  /** The channel to the parent: an inherited descriptor (usually 3) or an open channel. */
  channelFd?: number;
  channel?: UnixChannel;
  /** Runtime options (backend, mock devices...); ELASTICMOE_* variables fill in the rest. */
  runtime?: RuntimeOptionsInput;
  /** HMM client request timeout (ms). */
  timeoutMs?: number;
  /** Load the model kernels on every device while waiting for init (default true). */
  preloadKernels?: boolean;
}

const send = (ch: UnixChannel, m: FromExecutor) => ch.send(JSON.stringify(m));
const errorMessage = (e: unknown, id?: number): ErrorMessage => {
  const err = e instanceof Error ? e : new Error(String(e));
  const m: ErrorMessage = { type: 'error', name: err.name, message: err.message };
  if (id !== undefined) m.id = id;
  return m;
};

/**
 * Runs an executor until `shutdown` or until the parent hangs up. Resolves once
 * everything it opened is released (the caller may then exit the process).
 */
export async function runExecutorProcess(options: ExecutorProcessOptions): Promise<void> {
  const channel = options.channel ?? (options.channelFd !== undefined ? UnixChannel.fromFd(options.channelFd) : undefined);
  if (!channel) throw new Error('runExecutorProcess: a channel or channelFd is needed');
  let rt: Runtime | undefined;
  let client: HmmClient | undefined;
  let set: Awaited<ReturnType<HmmClient['attach']>> | undefined;
  let views: Map<number, MappedKvPool> | undefined;
  let engine: ForwardEngine | undefined;
  /** This process's virtual expert tables (init's expertTables), made again at each init. */
  let tables: ExpertTables | undefined;
  let kernels: ModelKernels[] = [];
  // Warm-up while init is on its way (see the top of this file); its failure is init's.
  const warm = (async () => {
    trace('exec.warm');
    rt = Runtime.open(options.runtime ?? {});
    trace('exec.runtime-open');
    if (options.preloadKernels !== false) {
      const r = rt;
      const loaded = await Promise.allSettled(Array.from({ length: r.deviceCount }, (_, d) => ModelKernels.load(r, d)));
      kernels = loaded.flatMap((k) => (k.status === 'fulfilled' ? [k.value] : []));
      const bad = loaded.find((k): k is PromiseRejectedResult => k.status === 'rejected');
      if (bad) throw bad.reason;
      trace('exec.kernels-loaded');
    }
  })();
  warm.catch(() => undefined); // reported at init
  try {
    const receive = async (): Promise<ToExecutor | undefined> => {
      let m: ChannelMessage;
      try {
        m = await channel.receive();
      } catch {
        return undefined; // the parent left
      }
      return JSON.parse(m.data.toString('utf8')) as ToExecutor;
    };
    const connect = async () => {
      await warm;
      if (!rt) throw new Error('internal: the runtime did not open');
      client ??= await HmmClient.connect(options.socket, rt, {
        name: `executor-${process.pid}`,
        ...(options.timeoutMs !== undefined ? { timeoutMs: options.timeoutMs } : {}),
      });
      return { rt, client };
    };
    let init = await receive();
    let unused: string[] = [];
    // Chunks attached ahead: a failure here is not the executor's (init attaches everything then).
    let ahead: Awaited<ReturnType<HmmClient['attach']>> | undefined;
    if (init?.type === 'preattach') {
      const pre = init;
      try {
        const { client: c } = await connect();
        const manifest = await c.manifest({ tensors: false });
        const pools = manifest.kvPools.filter((p) => pre.devices.includes(p.device));
        const ids = layoutChunkIds(manifest.chunks, pre.devices, pre.placement, pools);
        trace('exec.preattach', { chunks: ids.length });
        ahead = await c.attach(ids);
        trace('exec.preattached');
      } catch {
        ahead = undefined;
        // What the daemon attached for this session before the failure: init attaches afresh.
        await client?.detach().catch(() => undefined);
      }
      init = await receive();
    }
    if (init === undefined || init.type === 'shutdown') {
      ahead?.dispose();
      await warm.catch(() => undefined);
      return;
    }
    // Init, and again for each init that comes before the first step (a process initialised ahead
    // for a planned layout and then given another: it keeps what it attached as its `ahead`).
    let first: ToExecutor | undefined = init;
    let layers = 0;
    while (first?.type === 'init' || first?.type === 'precapture') {
      if (first.type === 'precapture') {
        // After ready: the graphs, in one piece each (nothing else runs in this process yet).
        const t = performance.now();
        const reply: PrecapturedMessage = { type: 'precaptured', graphs: 0, ms: 0 };
        try {
          if (!engine) throw new InvalidArgumentError('precapture', 'sent after ready (no engine yet)');
          reply.graphs = await engine.precapture(first.shapes, { layersPerTurn: layers });
        } catch (e) {
          const err = e instanceof Error ? e : new Error(String(e));
          reply.error = `${err.name}: ${err.message}`;
        }
        reply.ms = performance.now() - t;
        send(channel, reply);
        first = await receive();
        continue;
      }
      const msg: InitMessage = first;
      layers = msg.config.layers;
      trace('exec.init', { devices: msg.devices });
      try {
        tables?.dispose(); // before the chunks it maps can be dropped
        tables = undefined;
        if (engine) {
          engine.dispose();
          engine = undefined;
          for (const v of views?.values() ?? []) v.dispose();
          views = undefined;
          ahead = set;
          set = undefined;
          trace('exec.reinit-disposed');
        }
        const { rt: r, client: c } = await connect();
        // Attach only what this layout uses: an imported chunk stays allocated on the device for as long
        // as any process holds it, so holding another layout's chunks would keep them alive.
        const manifest = await c.manifest({ tensors: false });
        trace('exec.manifest', { chunks: manifest.chunks.length });
        const pools = manifest.kvPools.filter((p) => msg.devices.includes(p.device));
        const needed = layoutChunkIds(manifest.chunks, msg.devices, msg.placement, pools);
        let preattached: ReadyMessage['preattached'];
        if (ahead) {
          // Chunks attached ahead that this layout does not use are unmapped after ready (the parent
          // drops them from this session at the daemon, and frees them once nobody holds them).
          const want = new Set(needed);
          const have = new Set(ahead.entries.map((e) => e.id));
          unused = [...have].filter((id) => !want.has(id));
          const rest = needed.filter((id) => !have.has(id));
          trace('exec.attach', { chunks: rest.length, kept: have.size - unused.length });
          if (rest.length > 0) ahead.absorb(await c.attach(rest));
          set = ahead;
          ahead = undefined;
          preattached = { kept: have.size - unused.length, dropped: unused.length };
        } else {
          trace('exec.attach', { chunks: needed.length });
          set = await c.attach(needed);
        }
        trace('exec.attached');
        views = mapAttachedKvPools(r, set, pools);
        let weights = attachedWeights(set);
        let tableFigures: ReadyMessage['expertTables'];
        if (msg.expertTables) {
          // This layout's expert chunks into their slots (those attached ahead and unused are dropped below, never mapped).
          const t = performance.now();
          const attached = set;
          tables = ExpertTables.fromPlans(r, attached.entries, msg.config.layers, msg.config.experts);
          tables.mapAll(needed.map((id) => ({ plan: attached.chunk(id).entry, chunk: attached.chunk(id).chunk })));
          weights = tables.weights(weights);
          tableFigures = { mapped: tables.stats.devices.map((d) => [d.device, d.mapped]), ms: performance.now() - t, read: 0 };
        }
        engine = await ForwardEngine.create(r, msg.config, layoutFromTable(msg.devices, msg.placement),
          weights, views, msg.options ?? {});
        if (tables && tableFigures) {
          const made = engine;
          const t = tables;
          tableFigures.read = msg.devices.reduce((n, _, rank) => n + made.expertWeights(rank).filter((w) => w && t.contains(w.gate)).length, 0);
        }
        // Nothing else runs in this process: each graph in one piece.
        // Best effort: graphs not captured ahead are captured at their first step.
        let precaptured: ReadyMessage['precaptured'];
        trace('exec.engine-made');
        if (msg.precapture && msg.precapture.length > 0) {
          const t = performance.now();
          try {
            await engine.precapture(msg.precapture, { layersPerTurn: msg.config.layers });
            precaptured = { graphs: engine.graphStats.precaptured, ms: performance.now() - t };
          } catch (e) {
            const err = e instanceof Error ? e : new Error(String(e));
            precaptured = { graphs: engine.graphStats.precaptured, ms: performance.now() - t, error: `${err.name}: ${err.message}` };
          }
        }
        // Chunks attached ahead that this layout does not use, unmapped before ready: the parent drops them from
        // this session at the daemon then (it frees those nobody holds). Not after: the first step on the new
        // layout, sent right after ready, waited for it (~170 ms for ~2,800 chunks on H100), and unmapping in
        // pieces between steps instead went with steps 20-60 ms slower for over a second (2 x H100).
        if (unused.length > 0) {
          trace('exec.drop', { chunks: unused.length });
          try {
            set.drop(unused);
          } catch {
            // Best effort: what could not be unmapped here is released when this process exits.
          }
          trace('exec.dropped');
        }
        unused = [];
        trace('exec.ready', { precaptured: precaptured?.graphs ?? 0 });
        send(channel, {
          type: 'ready', pid: process.pid, session: c.session, chunks: set.size, ...(preattached ? { preattached } : {}),
          ...(precaptured ? { precaptured } : {}), ...(tableFigures ? { expertTables: tableFigures } : {}),
        });
      } catch (e) {
        ahead?.dispose();
        send(channel, errorMessage(e));
        return;
      }
      first = await receive();
    }
    if (first === undefined || first.type === 'shutdown') {
      ahead?.dispose();
      return;
    }
    if (!engine || first.type !== 'step') {
      ahead?.dispose();
      send(channel, errorMessage(new Error(engine ? `unexpected '${first.type}' message` : `expected an init message first (got '${first.type}')`)));
      return;
    }

    // Steps in order: each waits for the one before it.
    trace('exec.first-step');
    const eng = engine!;
    let shapesSent = '[]';
    const firstStep = first;
    await new Promise<void>((resolve) => {
      let chain = Promise.resolve();
      let done = false;
      const finish = () => {
        if (done) return;
        done = true;
        // Let steps already queued finish answering (their replies may go nowhere).
        void chain.then(resolve);
      };
      channel.onMessage(({ data, fds }) => {
        for (const fd of fds) {
          try {
            closeSync(fd); // no descriptors are expected on this channel
          } catch {
            // already closed
          }
        }
        if (done) return;
        let m: ToExecutor;
        try {
          m = JSON.parse(data.toString('utf8')) as ToExecutor;
        } catch (e) {
          send(channel, errorMessage(new Error(`unreadable message: ${(e as Error).message}`)));
          return;
        }
        if (m.type === 'shutdown') return finish();
        if (m.type !== 'step') {
          send(channel, errorMessage(new Error(`unexpected '${m.type}' message`)));
          return;
        }
        runStep(m);
      });
      const runStep = (m: StepMessage) => {
        chain = chain.then(async () => {
          let reply: FromExecutor;
          try {
            const r = await eng.step(m.batch, { returnLogits: m.returnLogits === true });
            reply = { type: 'result', id: m.id, result: encodeStepResult(r) };
            const shapes = eng.graphShapes().slice(0, GRAPH_SHAPES_SENT);
            const key = JSON.stringify(shapes);
            if (key !== shapesSent) {
              reply.graphShapes = shapes;
              shapesSent = key;
            }
          } catch (e) {
            reply = errorMessage(e, m.id);
          }
          try {
            send(channel, reply);
          } catch {
            // the parent is gone
          }
        });
      };
      runStep(firstStep);
      void channel.closed.then(finish);
    });
  } finally {
    trace('exec.end');
    await warm.catch(() => undefined);
    engine?.dispose();
    tables?.dispose();
    for (const k of kernels) k.dispose();
    if (views) for (const v of views.values()) v.dispose();
    set?.dispose();
    client?.close();
    channel.close();
    trace('exec.released');
  }
}
