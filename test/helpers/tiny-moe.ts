// The tiny qwen3_moe the scaling suites serve on the mock (hidden 64, 2 layers, 8 experts, top-2),
// and the weight scales that keep its activations near unit size (non-degenerate greedy tokens).
import type { TensorLocation } from '../../src/hmm/placement.js';
import { type ModelConfig, parseConfig } from '../../src/model/config.js';

/** The tiny model with room for `maxPositions` positions (a suite's longest request). */
export function tinyMoe(maxPositions: number): ModelConfig {
  return parseConfig({
    model_type: 'qwen3_moe', hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16,
    vocab_size: 97, num_experts: 8, moe_intermediate_size: 32, norm_topk_prob: true, num_experts_per_tok: 2, max_position_embeddings: maxPositions,
  });
}

/** Synthetic weight scale per tensor: norms and the embedding/head at 1, the matrices at 0.25. */
export const unitScale = (t: TensorLocation) => (t.shape.length === 1 ? 1.0 : t.name.includes('embed_tokens') || t.name.includes('lm_head') ? 1.0 : 0.25);
