import { readFileSync } from 'node:fs';
import path from 'node:path';

import { describe, expect, it } from 'vitest';

import { parseConfig } from '../../src/model/config.js';
import { roundRobinPlacement, weightShapes, weightSpecs } from '../../src/model/weights.js';

const qwen3 = JSON.parse(readFileSync(path.resolve(__dirname, '../../scripts/configs/qwen3-30b-a3b.json'), 'utf8'));

describe('model config', () => {
  it('reads Qwen3-30B-A3B and counts its 30.5 B parameters', () => {
    const c = parseConfig(qwen3);
    expect(c).toMatchObject({ architecture: 'qwen3_moe', experts: 128, topK: 8, headDim: 128, kvHeads: 4, qkNorm: true, normTopK: true });
    const params = weightShapes(c).reduce((a, w) => a + w.shape.reduce((x, y) => x * y, 1), 0);
    expect(params).toBeGreaterThan(30.4e9);
    expect(params).toBeLessThan(30.6e9);
  });

  it('reads the transformers 5 spelling (num_local_experts, rope_parameters)', () => {
    const { num_experts: _e, rope_theta: _r, ...rest } = qwen3;
    const c = parseConfig({ ...rest, num_local_experts: 16, rope_parameters: { rope_theta: 5e5, rope_type: 'default' } });
    expect(c.experts).toBe(16);
    expect(c.ropeTheta).toBe(5e5);
    expect(() => parseConfig({ ...rest, num_local_experts: 16, rope_parameters: { rope_type: 'yarn' } })).toThrow(/rope_type/);
  });

  it('refuses other architectures and missing fields, naming the field', () => {
    expect(() => parseConfig({ ...qwen3, model_type: 'llama' })).toThrow(/config\.model_type must be one of qwen3_moe, qwen2_moe, mixtral/);
    const { num_experts: _, ...noExperts } = qwen3;
    expect(() => parseConfig(noExperts)).toThrow(/config\.num_experts/);
    expect(() => parseConfig({ ...qwen3, hidden_size: -1 })).toThrow(/config\.hidden_size/);
    expect(() => parseConfig({ ...qwen3, mlp_only_layers: [0] })).toThrow(/decoder_sparse_step/);
  });

  it('names mixtral and qwen2_moe weights the Hugging Face way', () => {
    const mix = parseConfig({ model_type: 'mixtral', hidden_size: 64, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 100, num_local_experts: 4, num_experts_per_tok: 2, intermediate_size: 128 });
    const names = weightShapes(mix).map((w) => w.name);
    expect(names).toContain('model.layers.0.block_sparse_moe.experts.3.w2.weight');
    expect(names).toContain('lm_head.weight');
    const q2 = parseConfig({ model_type: 'qwen2_moe', hidden_size: 64, num_hidden_layers: 1, num_attention_heads: 4, vocab_size: 100, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 32, shared_expert_intermediate_size: 96, tie_word_embeddings: true });
    const n2 = weightShapes(q2).map((w) => w.name);
    expect(n2).toContain('model.layers.0.mlp.shared_expert_gate.weight');
    expect(n2).toContain('model.layers.0.self_attn.q_proj.bias');
    expect(n2).not.toContain('lm_head.weight');
  });

  it('replicates dense weights per device and places each expert by the placement', () => {
    const c = parseConfig({ ...qwen3, num_hidden_layers: 2 });
    const specs = weightSpecs(c, [0, 1], roundRobinPlacement(c.experts, [0, 1]));
    expect(specs.filter((s) => s.name === 'model.norm.weight').map((s) => s.device)).toEqual([0, 1]);
    const e5 = specs.filter((s) => s.group === 'L1.E5');
    expect(e5).toHaveLength(3);
    expect(e5.every((s) => s.device === 1)).toBe(true);
    expect(() => weightSpecs(c, [0], () => [3])).toThrow(/placement/);
  });
});
