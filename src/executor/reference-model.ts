// A slow pure-TypeScript forward pass for tiny configs, used by the tests as an
// independent check of the executor (src/executor/forward.ts). It shares nothing
// with the executor but the single-row math of src/model/kernels/reference.ts:
// one token at a time, a dense per-sequence KV cache (values rounded to bf16, as
// the executor's paged cache stores them, or kept in f32 with kvDtype 'f32'), its
// own attention loop, every routed expert evaluated per token and combined in top-k
// order; no paging, no batching, no devices. Weights come from host arrays (bf16
// bits, Hugging Face names).
import type { ChunkStore } from '../hmm/chunk-store.js';
import type { ModelConfig } from '../model/config.js';
import { type KvDtype, checkKvDtype } from '../model/kernels/index.js';
import * as ref from '../model/kernels/reference.js';
import { weightShapes } from '../model/weights.js';
import type { Runtime } from '../runtime/runtime.js';
import { expertWeightNames, layerWeightNames } from './weights.js';

const f = Math.fround;

/** Tensor name → bf16 bits. */
export type HostWeights = Map<string, Uint16Array>;

/** Downloads every tensor of the model (the replica on the lowest device) from an in-process store. */
export async function readHostWeights(rt: Runtime, store: ChunkStore, config: ModelConfig): Promise<HostWeights> {
  const out: HostWeights = new Map();
  for (const w of weightShapes(config)) {
    const t = store.tensor(w.name);
    const bytes = await rt.read(t.ptr, t.location.bytes, store.stream(t.chunk.plan.device));
    out.set(w.name, new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2));
  }
  return out;
}

export interface ReferenceModelOptions {
  /** Element type of the KV cache (default 'bf16'), as ForwardEngineOptions.kvDtype. */
  kvDtype?: KvDtype;
}

export class ReferenceModel {
  readonly kvDtype: KvDtype;

  constructor(readonly config: ModelConfig, private readonly weights: HostWeights, options: ReferenceModelOptions = {}) {
    this.kvDtype = checkKvDtype('kvDtype', options.kvDtype ?? 'bf16');
  }

  /** @internal */
  w(name: string): Uint16Array {
    const t = this.weights.get(name);
    if (!t) throw new Error(`reference model: no weight '${name}'`);
    return t;
  }

  sequence(): ReferenceSequence {
    return new ReferenceSequence(this);
  }

  /** Greedy generation: the prompt, then `steps` more tokens; returns the generated tokens and each step's logits. */
  greedy(prompt: number[], steps: number): { tokens: number[]; logits: Float32Array[] } {
    const s = this.sequence();
    const tokens: number[] = [];
    const logits: Float32Array[] = [];
    let last = s.forward(prompt);
    for (let i = 0; ; i++) {
      logits.push(last);
      tokens.push(argmax(last));
      if (i === steps) break;
      last = s.forward([tokens[tokens.length - 1]!]);
    }
    return { tokens, logits };
  }
}

export function argmax(x: Float32Array): number {
  let bi = 0;
  for (let i = 1; i < x.length; i++) if (x[i]! > x[bi]!) bi = i;
  return bi;
}

/** A K or V row as the cache keeps it: rounded to bf16, or an f32 copy. */
const cached = (x: Float32Array, dtype: KvDtype) => {
  if (dtype === 'f32') return x.slice();
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = ref.bf16ToF32(ref.f32ToBf16(x[i]!));
  return out;
};

/** One sequence: a dense KV cache per layer, fed one token at a time. */
export class ReferenceSequence {
  /** [layer][position] → k / v rows [KVH * D] (bf16-rounded, or f32 with kvDtype 'f32'). */
  private readonly keys: Float32Array[][];
  private readonly values: Float32Array[][];

  constructor(private readonly model: ReferenceModel) {
    this.keys = Array.from({ length: model.config.layers }, () => []);
    this.values = Array.from({ length: model.config.layers }, () => []);
  }

  get length(): number {
    return this.keys[0]!.length;
  }

  /** Runs the tokens; returns the logits of the last one. */
  forward(tokens: number[]): Float32Array {
    let logits: Float32Array | undefined;
    for (const t of tokens) logits = this.token(t);
    return logits!;
  }

  private token(token: number): Float32Array {
    const c = this.model.config;
    const w = (n: string) => this.model.w(n);
    const H = c.hiddenSize, NH = c.heads, KVH = c.kvHeads, D = c.headDim, E = c.experts, K = c.topK;
    const I = c.expertIntermediate, S = c.sharedIntermediate;
    const pos = this.length;
    const posArr = Int32Array.of(pos);
    const eps = c.rmsNormEps;
    const mm = (x: Float32Array, wt: Uint16Array, N: number, Kd: number) => {
      const out = new Float32Array(N);
      ref.matmul({ out, x, w: wt, M: 1, N, K: Kd });
      return out;
    };
    const norm = (x: Float32Array, wt: Uint16Array, R: number, N: number) => {
      const out = new Float32Array(R * N);
      ref.rmsnorm({ out, x, w: wt, R, N, eps });
      return out;
    };
    const ffn = (x: Float32Array, g: Uint16Array, u: Uint16Array, d: Uint16Array, inter: number) => {
      const gate = mm(x, g, inter, H);
      const up = mm(x, u, inter, H);
      const act = new Float32Array(inter);
      ref.siluMul({ out: act, gate, up, n: inter });
      return mm(act, d, H, inter);
    };

    const x = new Float32Array(H);
    ref.embed({ out: x, table: w('model.embed_tokens.weight'), tokens: Int32Array.of(token), T: 1, H });
    for (let l = 0; l < c.layers; l++) {
      const n = layerWeightNames(c, l);
      let xn = norm(x, w(n.inputNorm!), 1, H);
      let q = mm(xn, w(n.q!), NH * D, H);
      let k = mm(xn, w(n.k!), KVH * D, H);
      const v = mm(xn, w(n.v!), KVH * D, H);
      if (c.qkvBias) {
        ref.addBias({ x: q, b: w(n.qBias!), M: 1, N: NH * D });
        ref.addBias({ x: k, b: w(n.kBias!), M: 1, N: KVH * D });
        ref.addBias({ x: v, b: w(n.vBias!), M: 1, N: KVH * D });
      }
      if (c.qkNorm) {
        q = norm(q, w(n.qNorm!), NH, D);
        k = norm(k, w(n.kNorm!), KVH, D);
      }
      ref.rope({ x: q, pos: posArr, T: 1, heads: NH, D, theta: c.ropeTheta });
      ref.rope({ x: k, pos: posArr, T: 1, heads: KVH, D, theta: c.ropeTheta });
      this.keys[l]!.push(cached(k, this.model.kvDtype));
      this.values[l]!.push(cached(v, this.model.kvDtype));

      // Causal attention over positions 0..pos (softmax with the max subtracted).
      const att = new Float32Array(NH * D);
      const scale = f(1 / Math.sqrt(D));
      const group = NH / KVH;
      const scores = new Float32Array(pos + 1);
      for (let h = 0; h < NH; h++) {
        const g = Math.floor(h / group);
        let m = -Infinity;
        for (let j = 0; j <= pos; j++) {
          const kr = this.keys[l]![j]!;
          let dot = 0;
          for (let d = 0; d < D; d++) dot = f(dot + f(q[h * D + d]! * kr[g * D + d]!));
          scores[j] = f(dot * scale);
          m = Math.max(m, scores[j]!);
        }
        let sum = 0;
        for (let j = 0; j <= pos; j++) {
          scores[j] = f(Math.exp(f(scores[j]! - m)));
          sum = f(sum + scores[j]!);
        }
        for (let d = 0; d < D; d++) {
          let acc = 0;
          for (let j = 0; j <= pos; j++) acc = f(acc + f(scores[j]! * this.values[l]![j]![g * D + d]!));
          att[h * D + d] = f(acc / sum);
        }
      }
      const o = mm(att, w(n.o!), H, NH * D);
      for (let i = 0; i < H; i++) x[i] = f(x[i]! + o[i]!);

      // Mixture of experts.
      xn = norm(x, w(n.postNorm!), 1, H);
      const logits = mm(xn, w(n.router!), E, H);
      const ids = new Int32Array(K);
      const weights = new Float32Array(K);
      ref.routerTopk({ ids, weights, logits, T: 1, E, K, renorm: c.normTopK });
      const outs = Array.from(ids, (e) => {
        const en = expertWeightNames(c, l, e);
        return ffn(xn, w(en.gate), w(en.up), w(en.down), I);
      });
      const moe = new Float32Array(H);
      for (let i = 0; i < H; i++) {
        let acc = 0;
        for (let kk = 0; kk < K; kk++) acc = f(acc + f(weights[kk]! * outs[kk]![i]!));
        moe[i] = acc;
      }
      if (S > 0) {
        const sh = ffn(xn, w(n.sharedGate!), w(n.sharedUp!), w(n.sharedDown!), S);
        const gl = mm(xn, w(n.sharedGateLogit!), 1, H)[0]!;
        const sg = f(1 / f(1 + f(Math.exp(-gl))));
        for (let i = 0; i < H; i++) moe[i] = f(moe[i]! + f(sh[i]! * sg));
      }
      for (let i = 0; i < H; i++) x[i] = f(x[i]! + moe[i]!);
    }
    const xf = norm(x, w('model.norm.weight'), 1, H);
    return mm(xf, w(c.tieEmbeddings ? 'model.embed_tokens.weight' : 'lm_head.weight'), c.vocabSize, H);
  }
}
