// Contracts inside the executor: where weights and KV blocks are, what one
// forward step takes and returns. The forward pass (forward.ts) and the
// request engine (engine.ts) meet here.
import type { DevicePointer } from '../runtime/memory.js';
import type { ModelConfig } from '../model/config.js';
import { type KvDtype, kvDtypeBytes } from '../model/kernels/index.js';
import type { ExpertPlacement } from '../model/weights.js';

export type { KvDtype } from '../model/kernels/index.js';

/** Where each weight tensor is mapped in this process. */
export interface WeightSource {
  /** The replica of `name` on `device` (dense weights exist on every device of the layout). */
  tensor(name: string, device: number): DevicePointer;
}

/**
 * A device's KV pool as the executor sees it: one mapping of all its blocks.
 * The pool's chunks may end in padding (a chunk is granularity-rounded), so
 * block b starts at base + blockOffset(b), always a multiple of blockBytes: the
 * kernels address it as block index blockOffset(b) / blockBytes of the view.
 * When every chunk holds exactly blocksPerChunk * blockBytes bytes,
 * blockOffset(b) = b * blockBytes.
 */
export interface KvPoolView {
  device: number;
  /** Start of the mapping (block 0 is at base). */
  base: DevicePointer;
  /** Blocks of the pool (block ids 0..blocks-1, as the HMM hands them out). */
  blocks: number;
  blockBytes: number;
  /** Byte offset of block b from base: a multiple of blockBytes. */
  blockOffset(block: number): number;
  /** Slots of blockBytes the mapping spans: every blockOffset(b) / blockBytes is below it. */
  spanBlocks: number;
}

/** The KV geometry the model needs: blocks hold every layer's K and V for blockTokens tokens (bf16 or f32 elements). */
export interface KvGeometry {
  blockTokens: number;
  /** layers * 2 * blockTokens * kvHeads * headDim * (2 for bf16, 4 for f32) bytes. */
  blockBytes: number;
}

/** KV cache bytes of one token: every layer's K and V, layers * 2 * kvHeads * headDim elements of kvDtype. */
export function kvBytesPerToken(config: ModelConfig, kvDtype: KvDtype = 'bf16'): number {
  return config.layers * 2 * config.kvHeads * config.headDim * kvDtypeBytes(kvDtype);
}

/**
 * The pools an engine with ForwardEngineOptions.kvDtype = kvDtype needs: create them with this
 * blockBytes and give the engine the same kvDtype (and blockTokens, so a mismatch is refused).
 */
export function kvGeometry(config: ModelConfig, blockTokens = 16, kvDtype: KvDtype = 'bf16'): KvGeometry {
  return { blockTokens, blockBytes: blockTokens * kvBytesPerToken(config, kvDtype) };
}

/** Data parallel attention + expert parallel FFN over `devices`; TP is 1. */
export interface Layout {
  /** Devices of the layout; DP rank r runs on devices[r]. */
  devices: number[];
  /** Which devices hold each expert (must be devices of the layout). */
  placement: ExpertPlacement;
}

/** One sequence's share of a step. */
export interface SeqStep {
  seqId: string;
  /** Tokens to run this step: a prompt chunk (prefill) or the last sampled token (decode). */
  tokens: number[];
  /** Position of tokens[0] in the sequence (tokens already in the KV cache). */
  startPos: number;
  /** KV blocks of the sequence, on its DP rank's device, covering startPos + tokens.length tokens. */
  blockTable: number[];
  /** Whether to return the next token (greedy) for the last position. */
  sample: boolean;
}

/** A step: for each DP rank (index into layout.devices), its sequences. */
export interface StepBatch {
  ranks: SeqStep[][];
}

export interface StepResult {
  /** Next token (greedy argmax) per sequence with sample = true. */
  next: Map<string, number>;
  /** Logits of the last position of each sampled sequence, when asked (f32, vocab entries). */
  logits?: Map<string, Float32Array>;
  ms: number;
  tokens: number;
}
