// Hugging Face config.json for the MoE architectures elasticmoe serves:
// qwen3_moe, qwen2_moe (with shared experts) and mixtral. Anything else is
// refused with an error naming the field.
import { readFile } from 'node:fs/promises';
import path from 'node:path';

import { z } from 'zod';

import { InvalidArgumentError } from '../runtime/errors.js';

export const SUPPORTED_ARCHITECTURES = ['qwen3_moe', 'qwen2_moe', 'mixtral'] as const;
export type Architecture = (typeof SUPPORTED_ARCHITECTURES)[number];

const positive = z.number().int().positive();

const RawConfig = z
  .object({
    model_type: z.string(),
    hidden_size: positive,
    num_hidden_layers: positive,
    num_attention_heads: positive,
    num_key_value_heads: positive.optional(),
    head_dim: positive.optional().nullable(),
    vocab_size: positive,
    rms_norm_eps: z.number().positive().default(1e-6),
    rope_theta: z.number().positive().optional(),
    // transformers 5 writes the RoPE base here instead of rope_theta.
    rope_parameters: z.object({ rope_theta: z.number().positive().optional(), rope_type: z.string().optional() }).passthrough().optional().nullable(),
    max_position_embeddings: positive.default(32768),
    tie_word_embeddings: z.boolean().default(false),
    torch_dtype: z.string().optional(),
    // qwen*_moe
    num_experts: positive.optional(),
    moe_intermediate_size: positive.optional(),
    norm_topk_prob: z.boolean().optional(),
    shared_expert_intermediate_size: z.number().int().nonnegative().optional(),
    decoder_sparse_step: positive.optional(),
    mlp_only_layers: z.array(z.number().int().nonnegative()).optional(),
    intermediate_size: positive.optional(),
    // mixtral
    num_local_experts: positive.optional(),
    num_experts_per_tok: positive,
    eos_token_id: z.union([z.number().int(), z.array(z.number().int())]).optional().nullable(),
    bos_token_id: z.number().int().optional().nullable(),
  })
  .passthrough();

/** The model shape every other layer works from. */
export interface ModelConfig {
  architecture: Architecture;
  hiddenSize: number;
  layers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  vocabSize: number;
  experts: number;
  topK: number;
  /** Intermediate size of one routed expert. */
  expertIntermediate: number;
  /** Shared expert intermediate size (qwen2_moe), 0 when absent. */
  sharedIntermediate: number;
  normTopK: boolean;
  /** qk RMSNorm on each head (qwen3_moe). */
  qkNorm: boolean;
  /** Bias on q/k/v projections (qwen2_moe). */
  qkvBias: boolean;
  rmsNormEps: number;
  ropeTheta: number;
  maxPositions: number;
  tieEmbeddings: boolean;
  eosTokenIds: number[];
}

function need<T>(value: T | undefined | null, field: string, arch: string): T {
  if (value === undefined || value === null) throw new InvalidArgumentError(`config.${field}`, `present for ${arch}`);
  return value;
}

export function parseConfig(json: unknown): ModelConfig {
  const r = RawConfig.safeParse(json);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    throw new InvalidArgumentError(`config.${issue.path.join('.') || 'root'}`, issue.message.toLowerCase());
  }
  const c = r.data;
  if (!(SUPPORTED_ARCHITECTURES as readonly string[]).includes(c.model_type)) {
    throw new InvalidArgumentError('config.model_type', `one of ${SUPPORTED_ARCHITECTURES.join(', ')} (got "${c.model_type}")`);
  }
  const arch = c.model_type as Architecture;
  if ((c.decoder_sparse_step ?? 1) !== 1 || (c.mlp_only_layers ?? []).length > 0) {
    throw new InvalidArgumentError('config.decoder_sparse_step', '1 with no mlp_only_layers (every layer MoE)');
  }
  const heads = c.num_attention_heads;
  // transformers 5 writes num_local_experts for the Qwen MoE models too.
  const experts = arch === 'mixtral' ? need(c.num_local_experts, 'num_local_experts', arch) : need(c.num_experts ?? c.num_local_experts, 'num_experts', arch);
  const ropeType = c.rope_parameters?.rope_type;
  if (ropeType && ropeType !== 'default') throw new InvalidArgumentError('config.rope_parameters.rope_type', `"default" (RoPE scaling "${ropeType}" is not supported yet)`);
  const expertIntermediate = arch === 'mixtral' ? need(c.intermediate_size, 'intermediate_size', arch) : need(c.moe_intermediate_size, 'moe_intermediate_size', arch);
  if (c.num_experts_per_tok > experts) throw new InvalidArgumentError('config.num_experts_per_tok', `at most the expert count ${experts}`);
  const kvHeads = c.num_key_value_heads ?? heads;
  if (heads % kvHeads !== 0) throw new InvalidArgumentError('config.num_key_value_heads', `a divisor of num_attention_heads (${heads})`);
  const eos = c.eos_token_id;
  return {
    architecture: arch,
    hiddenSize: c.hidden_size,
    layers: c.num_hidden_layers,
    heads,
    kvHeads,
    headDim: c.head_dim ?? c.hidden_size / heads,
    vocabSize: c.vocab_size,
    experts,
    topK: c.num_experts_per_tok,
    expertIntermediate,
    sharedIntermediate: arch === 'qwen2_moe' ? (c.shared_expert_intermediate_size ?? 0) : 0,
    normTopK: arch === 'mixtral' ? true : (c.norm_topk_prob ?? false),
    qkNorm: arch === 'qwen3_moe',
    qkvBias: arch === 'qwen2_moe',
    rmsNormEps: c.rms_norm_eps,
    ropeTheta: c.rope_theta ?? c.rope_parameters?.rope_theta ?? 10000,
    maxPositions: c.max_position_embeddings,
    tieEmbeddings: c.tie_word_embeddings,
    eosTokenIds: eos === undefined || eos === null ? [] : Array.isArray(eos) ? eos : [eos],
  };
}

/** Reads DIR/config.json (or a config file path). */
export async function readConfig(dirOrFile: string): Promise<ModelConfig> {
  const file = dirOrFile.endsWith('.json') ? dirOrFile : path.join(dirOrFile, 'config.json');
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw new InvalidArgumentError('model', `a folder with a readable config.json (${file}: ${(e as Error).message})`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new InvalidArgumentError('config.json', `valid JSON (${file}: ${(e as Error).message})`);
  }
  return parseConfig(json);
}
