// Weight names and shapes for a layout: which tensors exist for a config, and on
// which device each lives under data-parallel attention + expert parallelism
// (TP = 1): every device of the layout holds the dense weights (attention,
// norms, router, embeddings, LM head); each expert lives on the devices its
// placement names, in a chunk of its own (group "L<layer>.E<expert>").
import { InvalidArgumentError } from '../runtime/errors.js';
import type { DType } from '../hmm/dtype.js';
import type { TensorSpec } from '../hmm/placement.js';
import type { ModelConfig } from './config.js';

export interface WeightShape {
  name: string;
  shape: number[];
  /** 'dense' or the expert index it belongs to. */
  expert?: number;
  layer?: number;
}

function expertNames(c: ModelConfig, l: number, e: number): Array<[string, number[]]> {
  const H = c.hiddenSize;
  const I = c.expertIntermediate;
  if (c.architecture === 'mixtral') {
    const p = `model.layers.${l}.block_sparse_moe.experts.${e}`;
    return [[`${p}.w1.weight`, [I, H]], [`${p}.w3.weight`, [I, H]], [`${p}.w2.weight`, [H, I]]];
  }
  const p = `model.layers.${l}.mlp.experts.${e}`;
  return [[`${p}.gate_proj.weight`, [I, H]], [`${p}.up_proj.weight`, [I, H]], [`${p}.down_proj.weight`, [H, I]]];
}

/** Every tensor of the model with its shape, in a stable order. */
export function weightShapes(c: ModelConfig): WeightShape[] {
  const H = c.hiddenSize;
  const out: WeightShape[] = [{ name: 'model.embed_tokens.weight', shape: [c.vocabSize, H] }];
  for (let l = 0; l < c.layers; l++) {
    const a = `model.layers.${l}.self_attn`;
    const dense: Array<[string, number[]]> = [
      [`model.layers.${l}.input_layernorm.weight`, [H]],
      [`${a}.q_proj.weight`, [c.heads * c.headDim, H]],
      [`${a}.k_proj.weight`, [c.kvHeads * c.headDim, H]],
      [`${a}.v_proj.weight`, [c.kvHeads * c.headDim, H]],
      [`${a}.o_proj.weight`, [H, c.heads * c.headDim]],
      [`model.layers.${l}.post_attention_layernorm.weight`, [H]],
    ];
    if (c.qkvBias) {
      dense.push([`${a}.q_proj.bias`, [c.heads * c.headDim]], [`${a}.k_proj.bias`, [c.kvHeads * c.headDim]], [`${a}.v_proj.bias`, [c.kvHeads * c.headDim]]);
    }
    if (c.qkNorm) dense.push([`${a}.q_norm.weight`, [c.headDim]], [`${a}.k_norm.weight`, [c.headDim]]);
    const router = c.architecture === 'mixtral' ? `model.layers.${l}.block_sparse_moe.gate.weight` : `model.layers.${l}.mlp.gate.weight`;
    dense.push([router, [c.experts, H]]);
    if (c.sharedIntermediate > 0) {
      const s = `model.layers.${l}.mlp.shared_expert`;
      const S = c.sharedIntermediate;
      dense.push([`${s}.gate_proj.weight`, [S, H]], [`${s}.up_proj.weight`, [S, H]], [`${s}.down_proj.weight`, [H, S]],
        [`model.layers.${l}.mlp.shared_expert_gate.weight`, [1, H]]);
    }
    for (const [name, shape] of dense) out.push({ name, shape, layer: l });
    for (let e = 0; e < c.experts; e++) for (const [name, shape] of expertNames(c, l, e)) out.push({ name, shape, layer: l, expert: e });
  }
  out.push({ name: 'model.norm.weight', shape: [H] });
  if (!c.tieEmbeddings) out.push({ name: 'lm_head.weight', shape: [c.vocabSize, H] });
  return out;
}

/** Which devices hold expert e of layer l (replicas allowed). */
export type ExpertPlacement = (layer: number, expert: number) => readonly number[];

/** Round-robin placement of experts over the devices, the same for every layer. */
export function roundRobinPlacement(experts: number, devices: readonly number[]): ExpertPlacement {
  if (devices.length === 0) throw new InvalidArgumentError('devices', 'at least one device');
  const table = Array.from({ length: experts }, (_, e) => [devices[e % devices.length]!]);
  return (_l, e) => table[e]!;
}

export const expertGroup = (layer: number, expert: number) => `L${layer}.E${expert}`;

/**
 * Tensor specs for the HMM: dense weights replicated on every device (one
 * packed group per device), each expert in its own chunk on its devices.
 */
export function weightSpecs(c: ModelConfig, devices: readonly number[], placement: ExpertPlacement, dtype: DType = 'bf16'): TensorSpec[] {
  if (devices.length === 0) throw new InvalidArgumentError('devices', 'at least one device');
  const specs: TensorSpec[] = [];
  for (const w of weightShapes(c)) {
    if (w.expert === undefined) {
      for (const d of devices) specs.push({ name: w.name, dtype, shape: w.shape, device: d, group: 'dense', packing: 'packed' });
      continue;
    }
    const holders = placement(w.layer!, w.expert);
    if (holders.length === 0) throw new InvalidArgumentError('placement', `at least one device for expert ${w.expert} of layer ${w.layer}`);
    for (const d of holders) {
      if (!devices.includes(d)) throw new InvalidArgumentError('placement', `devices of the layout (expert ${w.expert} names ${d})`);
      specs.push({ name: w.name, dtype, shape: w.shape, device: d, group: expertGroup(w.layer!, w.expert) });
    }
  }
  return specs;
}
