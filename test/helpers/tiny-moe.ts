// The tiny qwen3_moe the scaling suites serve on the mock (hidden 64, 2 layers, 8 experts, top-2),
// and the weight scales that keep its activations near unit size (non-degenerate greedy tokens).
import type { TensorLocation } from '../../src/hmm/placement.js';
import { type ModelConfig, parseConfig } from '../../src/model/config.js';
import type { Runtime } from '../../src/runtime/runtime.js';
import { Deployment, type DeploymentOptions } from '../../src/scaling/orchestrator.js';
import { openMock } from './mock.js';

/** The tiny model with room for `maxPositions` positions (a suite's longest request). */
export function tinyMoe(maxPositions: number): ModelConfig {
  return parseConfig({
    model_type: 'qwen3_moe', hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16,
    vocab_size: 97, num_experts: 8, moe_intermediate_size: 32, norm_topk_prob: true, num_experts_per_tok: 2, max_position_embeddings: maxPositions,
  });
}

/** Synthetic weight scale per tensor: norms and the embedding/head at 1, the matrices at 0.25. */
export const unitScale = (t: TensorLocation) => (t.shape.length === 1 ? 1.0 : t.name.includes('embed_tokens') || t.name.includes('lm_head') ? 1.0 : 0.25);

/** What the suites generate with: a deployment's submit. */
interface Submits {
  submit(request: { prompt: number[]; maxTokens: number; ignoreEos: boolean }): Promise<{ outputTokens: number[] }>;
}

/** Each prompt's greedy tokens on `dep` (a fixed layout: the reference a scaled one must give); throws on degenerate output. */
export async function greedyTokens(dep: Submits, prompts: readonly number[][], maxTokens: number): Promise<number[][]> {
  const done = await Promise.all(prompts.map((prompt) => dep.submit({ prompt, maxTokens, ignoreEos: true })));
  const tokens = done.map((c) => c.outputTokens);
  const distinct = new Set(tokens.flat()).size;
  if (distinct <= 10) throw new Error(`degenerate reference: ${distinct} distinct tokens over ${prompts.length} prompts`);
  return tokens;
}

/** Closes the deployments a suite opened, then their runtimes. */
export async function closeAll(opened: ReadonlyArray<{ rt: { dispose(): void }; dep: { close(): Promise<void> } }>): Promise<void> {
  for (const { dep, rt } of opened) {
    await dep.close();
    rt.dispose();
  }
}

/**
 * A suite's deployments on the mock: `start(devices, extra)` opens a mock runtime of `capacity`
 * bytes per device and starts the tiny model on it (seed, weight scales, KV blocks, step budget as
 * given), remembering both in `opened` for closeAll.
 */
export function deploymentsOf(base: { config: ModelConfig; seed: bigint; capacity: number; kvBlocksPerDevice: number }) {
  const opened: Array<{ rt: Runtime; dep: Deployment }> = [];
  const start = async (devices: number[], extra: Partial<DeploymentOptions> = {}) => {
    const rt = openMock({ mockCapacity: base.capacity });
    const dep = await Deployment.start({
      rt, config: base.config, devices, seed: base.seed, scaleFor: unitScale, kvBlocksPerDevice: base.kvBlocksPerDevice, maxTokensPerStep: 64, ...extra,
    });
    opened.push({ rt, dep });
    return { rt, dep };
  };
  return { opened, start };
}
