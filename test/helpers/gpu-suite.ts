// Setup shared by the GPU suites that can dry-run on the mock (EMOE_GPU_SUITE_ON_MOCK=1):
// the runtime (cuda with ELASTICMOE_BACKEND=cuda, else none, and the suite skips), up to 4
// devices, and a qwen3_moe small enough to load in seconds with 32 experts over them.
import { parseConfig } from '../../src/model/config.js';
import { Runtime } from '../../src/runtime/runtime.js';

export function gpuSuite(mockCapacity: number): { backend: 'mock' | 'cuda' | undefined; rt: Runtime | undefined; devices: number[] } {
  const onMock = process.env.EMOE_GPU_SUITE_ON_MOCK === '1';
  const backend = onMock ? 'mock' : process.env.ELASTICMOE_BACKEND === 'cuda' ? 'cuda' : undefined;
  const rt = backend ? Runtime.open({ backend, ...(onMock ? { mockDevices: 4, mockCapacity } : {}) }) : undefined;
  const devices = rt ? Array.from({ length: Math.min(4, rt.deviceCount) }, (_, d) => d) : [];
  return { backend, rt, devices };
}

/** 4 layers, 32 experts (top-4), hidden 256, vocab 512: every rank routes to every device of 4. */
export const SMALL_MOE = parseConfig({
  model_type: 'qwen3_moe', hidden_size: 256, num_hidden_layers: 4, num_attention_heads: 8, num_key_value_heads: 2, head_dim: 32,
  vocab_size: 512, num_experts: 32, moe_intermediate_size: 128, norm_topk_prob: true, num_experts_per_tok: 4,
  max_position_embeddings: 1024,
});
