// The in-process serving stack, shared by `elasticmoe generate` and `elasticmoe
// serve`: model files (config.json, tokenizer when present), an in-process HMM
// holding the weights (a checkpoint, or a seeded synthetic fill of the config's
// shape) and one KV pool per device, the forward pass over a DP+EP layout with
// round-robin experts, and the request engine. The caller owns the runtime (it
// opens it, parses device lists against it, and disposes it after `close`).
import path from 'node:path';

import { Engine, type StepFigures } from '../executor/engine.js';
import { ForwardEngine } from '../executor/forward.js';
import { mapHmmKvPools, type MappedKvPool } from '../executor/kv-view.js';
import { type KvDtype, kvGeometry } from '../executor/types.js';
import { storeWeights } from '../executor/weights.js';
import { Hmm } from '../hmm/hmm.js';
import { openCheckpoint } from '../hmm/safetensors.js';
import { type ModelConfig, readConfig } from '../model/config.js';
import { checkKvDtype } from '../model/kernels/index.js';
import { loadTokenizer, type TextTokenizer } from '../model/tokenizer.js';
import { type ExpertPlacement, roundRobinPlacement, weightSpecs } from '../model/weights.js';
import { InvalidArgumentError } from '../runtime/errors.js';
import type { Runtime } from '../runtime/runtime.js';

export interface ModelFilesOptions {
  /** A Hugging Face model folder: config.json, *.safetensors, tokenizer.json (optional). */
  model?: string;
  /** A config.json: seeded synthetic weights of that shape instead of a checkpoint. */
  synthetic?: string;
  /** Folder of tokenizer.json (default: `model`). */
  tokenizer?: string;
}

export interface ModelFiles {
  config: ModelConfig;
  /** Absent when there is no tokenizer.json: callers work on token ids only. */
  tokenizer?: TextTokenizer;
  /** Where the weights come from. */
  weights: { kind: 'checkpoint'; dir: string } | { kind: 'synthetic'; config: string };
  /** A short name: the model folder's name, or the synthetic config file's name without `.json`. */
  name: string;
  /** The tokenizer folder that was looked at (undefined for synthetic weights without `tokenizer`). */
  tokenizerDir?: string;
}

/** Reads the model's config and its tokenizer (exactly one of `model` and `synthetic`). */
export async function loadModelFiles(o: ModelFilesOptions): Promise<ModelFiles> {
  if ((o.model === undefined) === (o.synthetic === undefined)) throw new InvalidArgumentError('--model / --synthetic', 'exactly one of them');
  const config = await readConfig(o.model ?? o.synthetic!);
  const tokenizerDir = o.tokenizer ?? o.model;
  const tokenizer = tokenizerDir === undefined ? undefined : await loadTokenizer(tokenizerDir);
  if (o.tokenizer !== undefined && !tokenizer) throw new InvalidArgumentError('--tokenizer', `a folder with tokenizer.json (${path.resolve(o.tokenizer)} has none)`);
  const weights = o.model !== undefined ? { kind: 'checkpoint' as const, dir: o.model } : { kind: 'synthetic' as const, config: o.synthetic! };
  const name = o.model !== undefined ? path.basename(path.resolve(o.model)) : path.basename(o.synthetic!).replace(/\.json$/i, '');
  const files: ModelFiles = { config, weights, name };
  if (tokenizer) files.tokenizer = tokenizer;
  if (tokenizerDir !== undefined) files.tokenizerDir = tokenizerDir;
  return files;
}

/** Upper bound of the default pool: this many full-length sequences per device. */
const KV_DEFAULT_SEQS = 8;
/** Share of free memory (after weights, less a reserve for the forward pass's scratch) given to KV by default. */
const KV_MEMORY_FRACTION = 0.9;

/** KV blocks for a device from its free memory: a reserve for scratch is kept back, and the pool is capped at KV_DEFAULT_SEQS full-length sequences. */
export function kvBlocksFromMemory(freeBytes: number, blockBytes: number, blockTokens: number, config: ModelConfig): number {
  const reserve = Math.min(1024 ** 3, freeBytes * 0.1);
  const byMemory = Math.floor(((freeBytes - reserve) * KV_MEMORY_FRACTION) / blockBytes);
  const cap = KV_DEFAULT_SEQS * Math.ceil(config.maxPositions / blockTokens);
  return Math.max(0, Math.min(byMemory, cap));
}

export interface LocalStackOptions {
  /** One DP rank per device, experts round robin over them. */
  devices: readonly number[];
  /** Synthetic seed (default 0). */
  seed?: bigint;
  /** KV blocks per device (default: sized from free device memory). */
  kvBlocks?: number;
  /** Token budget of one step per rank (default 512). */
  maxTokensPerStep?: number;
  /** Element type of the KV cache (default 'bf16'; 'f32': twice the KV memory per token, K and V unrounded). */
  kvDtype?: KvDtype;
  /** Most running sequences per rank (default: the engine's, 64). */
  maxSeqs?: number;
  /** A progress reporter for the weight load, made with its label ('loading weights' or 'synthetic weights'). */
  progress?: (label: string) => { update(done: number, total: number): void; finish(): void };
  /** Aborts a checkpoint load. */
  signal?: AbortSignal;
}

export interface LocalStack {
  rt: Runtime;
  config: ModelConfig;
  tokenizer?: TextTokenizer;
  hmm: Hmm;
  devices: number[];
  placement: ExpertPlacement;
  forward: ForwardEngine;
  views: Map<number, MappedKvPool>;
  engine: Engine;
  /** Tokens per KV block. */
  blockTokens: number;
  /** Weight load time. */
  loadMs: number;
  /** Adds a listener of the engine's per-step figures; returns its remover. */
  onStep(listener: (f: StepFigures) => void): () => void;
  /** Closes the engine (cancelling what still runs) and frees everything but the runtime. Idempotent. */
  close(): Promise<void>;
}

/**
 * Loads the weights into an in-process HMM, creates a KV pool per device, the
 * forward pass and the engine. On failure everything it made is freed (the
 * runtime stays open).
 */
export async function startLocalStack(rt: Runtime, model: ModelFiles, o: LocalStackOptions): Promise<LocalStack> {
  const { config, tokenizer } = model;
  const devices = [...o.devices];
  const kvDtype = checkKvDtype('kvDtype', o.kvDtype ?? 'bf16'); // before the weights load
  const hmm = new Hmm(rt);
  let views: Map<number, MappedKvPool> | undefined;
  let forward: ForwardEngine | undefined;
  try {
    const placement = roundRobinPlacement(config.experts, devices);
    const specs = weightSpecs(config, devices, placement);
    const t0 = performance.now();
    // Headers first: a folder without a checkpoint fails before any progress is shown.
    const checkpoint = model.weights.kind === 'checkpoint' ? await openCheckpoint(model.weights.dir) : undefined;
    const bar = o.progress?.(checkpoint ? 'loading weights' : 'synthetic weights');
    const onProgress = (p: { bytesDone: number; bytesTotal: number }) => bar?.update(p.bytesDone, p.bytesTotal);
    try {
      await hmm.loadWeights(specs, { onProgress, seed: o.seed ?? 0n, ...(checkpoint ? { checkpoint } : {}), ...(o.signal ? { signal: o.signal } : {}) });
    } finally {
      bar?.finish();
    }
    const loadMs = performance.now() - t0;

    const geometry = kvGeometry(config, 16, kvDtype);
    for (const d of devices) {
      const free = rt.deviceInfo(d).freeBytes;
      const blocks = o.kvBlocks ?? kvBlocksFromMemory(free, geometry.blockBytes, geometry.blockTokens, config);
      if (!Number.isSafeInteger(blocks) || blocks < 1) {
        throw new InvalidArgumentError('--kv-blocks', `given: device ${d} has too little free memory for a KV pool (${(free / 1024 ** 2).toFixed(1)} MiB free)`);
      }
      hmm.kv.createPool({ device: d, blockBytes: geometry.blockBytes, blocks });
    }
    views = mapHmmKvPools(rt, hmm, devices);
    // blockTokens too, so the engine checks the pools against the dtype instead of deriving their block size.
    forward = await ForwardEngine.create(rt, config, { devices, placement }, storeWeights(hmm.store), views,
      { maxTokensPerStep: o.maxTokensPerStep ?? 512, blockTokens: geometry.blockTokens, kvDtype });

    const listeners = new Set<(f: StepFigures) => void>();
    const eos = [...new Set([...config.eosTokenIds, ...(tokenizer?.eosTokenIds ?? [])])];
    const engine = new Engine({
      stepper: forward,
      kv: hmm.kv,
      devices,
      blockTokens: forward.blockTokens,
      maxTokensPerStep: o.maxTokensPerStep ?? 512,
      ...(o.maxSeqs !== undefined ? { maxSeqs: o.maxSeqs } : {}),
      eosTokenIds: eos,
      maxSeqLen: config.maxPositions,
      vocabSize: config.vocabSize,
      ...(tokenizer ? { decode: (ids: number[]) => tokenizer.decode(ids) } : {}),
      onStep: (f) => {
        for (const l of listeners) {
          try {
            l(f);
          } catch {
            // A listener's failure is its own: the engine's loop goes on.
          }
        }
      },
    });
    const fw = forward;
    const vw = views;
    let closing: Promise<void> | undefined;
    const stack: LocalStack = {
      rt, config, hmm, devices, placement, forward: fw, views: vw, engine, blockTokens: forward.blockTokens, loadMs,
      onStep(listener) {
        listeners.add(listener);
        return () => listeners.delete(listener);
      },
      close() {
        closing ??= (async () => {
          try {
            await engine.close();
          } finally {
            fw.dispose();
            for (const v of vw.values()) v.dispose();
            hmm.dispose();
          }
        })();
        return closing;
      },
    };
    if (tokenizer) stack.tokenizer = tokenizer;
    return stack;
  } catch (e) {
    forward?.dispose();
    for (const v of views?.values() ?? []) v.dispose();
    hmm.dispose();
    throw e;
  }
}
