// Where the forward pass finds its weights: WeightSource adapters over the
// in-process chunk store and over an attached set (another process's HMM), and the
// Hugging Face names of each layer's tensors resolved to device pointers.
import type { AttachedSet } from '../hmm/client.js';
import type { ChunkStore } from '../hmm/chunk-store.js';
import type { ModelConfig } from '../model/config.js';
import type { DevicePointer } from '../runtime/memory.js';
import type { WeightSource } from './types.js';

/** Weights of the in-process HMM (its own mappings: each chunk is accessible to its own device). */
export function storeWeights(store: ChunkStore): WeightSource {
  return { tensor: (name, device) => store.tensor(name, device).ptr };
}

/**
 * Weights of the in-process HMM including the chunks it is still making off the main thread
 * (ChunkStore.allocateOffThread: their addresses are final, their memory not there yet). For an
 * engine whose graphs and steps run only once those chunks exist (a scale's standby engine: the
 * switch-over waits for the copies into them).
 */
export function futureWeights(store: ChunkStore): WeightSource {
  return { tensor: (name, device) => store.futureTensor(name, device) };
}

/** Weights of chunks attached from the HMM daemon and mapped in this process. */
export function attachedWeights(set: AttachedSet): WeightSource {
  return { tensor: (name, device) => set.tensor(name, device) };
}

/** Dense weights of one decoder layer on one device (bf16, Hugging Face layouts [out, in]). */
export interface LayerWeights {
  inputNorm: DevicePointer;
  q: DevicePointer;
  k: DevicePointer;
  v: DevicePointer;
  o: DevicePointer;
  postNorm: DevicePointer;
  /** qwen2_moe */
  qBias?: DevicePointer;
  kBias?: DevicePointer;
  vBias?: DevicePointer;
  /** qwen3_moe: RMSNorm weights over head_dim */
  qNorm?: DevicePointer;
  kNorm?: DevicePointer;
  /** [experts, hidden] */
  router: DevicePointer;
  /** qwen2_moe shared expert; gateLogit is shared_expert_gate.weight [1, hidden]. */
  shared?: { gate: DevicePointer; up: DevicePointer; down: DevicePointer; gateLogit: DevicePointer };
}

export interface ExpertWeights {
  /** [I, H] (mixtral w1) */ gate: DevicePointer;
  /** [I, H] (mixtral w3) */ up: DevicePointer;
  /** [H, I] (mixtral w2) */ down: DevicePointer;
}

export interface ModelWeights {
  /** [V, H] */ embed: DevicePointer;
  /** [H] */ finalNorm: DevicePointer;
  /** [V, H]: lm_head.weight, or the embedding table when tied. */
  lmHead: DevicePointer;
}

/** The tensor names of layer `layer`'s dense weights (the same keys as LayerWeights). */
export function layerWeightNames(config: ModelConfig, layer: number): Record<string, string> {
  const a = `model.layers.${layer}.self_attn`;
  const names: Record<string, string> = {
    inputNorm: `model.layers.${layer}.input_layernorm.weight`,
    q: `${a}.q_proj.weight`,
    k: `${a}.k_proj.weight`,
    v: `${a}.v_proj.weight`,
    o: `${a}.o_proj.weight`,
    postNorm: `model.layers.${layer}.post_attention_layernorm.weight`,
    router: config.architecture === 'mixtral' ? `model.layers.${layer}.block_sparse_moe.gate.weight` : `model.layers.${layer}.mlp.gate.weight`,
  };
  if (config.qkvBias) Object.assign(names, { qBias: `${a}.q_proj.bias`, kBias: `${a}.k_proj.bias`, vBias: `${a}.v_proj.bias` });
  if (config.qkNorm) Object.assign(names, { qNorm: `${a}.q_norm.weight`, kNorm: `${a}.k_norm.weight` });
  if (config.sharedIntermediate > 0) {
    const s = `model.layers.${layer}.mlp.shared_expert`;
    Object.assign(names, {
      sharedGate: `${s}.gate_proj.weight`,
      sharedUp: `${s}.up_proj.weight`,
      sharedDown: `${s}.down_proj.weight`,
      sharedGateLogit: `model.layers.${layer}.mlp.shared_expert_gate.weight`,
    });
  }
  return names;
}

export function resolveLayerWeights(config: ModelConfig, source: WeightSource, device: number, layer: number): LayerWeights {
  const n = layerWeightNames(config, layer);
  const t = (key: string) => source.tensor(n[key]!, device);
  const w: LayerWeights = {
    inputNorm: t('inputNorm'), q: t('q'), k: t('k'), v: t('v'), o: t('o'), postNorm: t('postNorm'), router: t('router'),
  };
  if (config.qkvBias) Object.assign(w, { qBias: t('qBias'), kBias: t('kBias'), vBias: t('vBias') });
  if (config.qkNorm) Object.assign(w, { qNorm: t('qNorm'), kNorm: t('kNorm') });
  if (config.sharedIntermediate > 0) {
    w.shared = { gate: t('sharedGate'), up: t('sharedUp'), down: t('sharedDown'), gateLogit: t('sharedGateLogit') };
  }
  return w;
}

/** Tensor names of one routed expert: gate, up, down (mixtral w1, w3, w2). */
export function expertWeightNames(config: ModelConfig, layer: number, expert: number): { gate: string; up: string; down: string } {
  if (config.architecture === 'mixtral') {
    const p = `model.layers.${layer}.block_sparse_moe.experts.${expert}`;
    return { gate: `${p}.w1.weight`, up: `${p}.w3.weight`, down: `${p}.w2.weight` };
  }
  const p = `model.layers.${layer}.mlp.experts.${expert}`;
  return { gate: `${p}.gate_proj.weight`, up: `${p}.up_proj.weight`, down: `${p}.down_proj.weight` };
}

export function expertWeights(config: ModelConfig, source: WeightSource, device: number, layer: number, expert: number): ExpertWeights {
  const n = expertWeightNames(config, layer, expert);
  return { gate: source.tensor(n.gate, device), up: source.tensor(n.up, device), down: source.tensor(n.down, device) };
}

export function resolveModelWeights(config: ModelConfig, source: WeightSource, device: number): ModelWeights {
  const embed = source.tensor('model.embed_tokens.weight', device);
  return {
    embed,
    finalNorm: source.tensor('model.norm.weight', device),
    lmHead: config.tieEmbeddings ? embed : source.tensor('lm_head.weight', device),
  };
}
