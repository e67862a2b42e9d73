#!/usr/bin/env node
// Runs elasticmoe on the folders written by scripts/hf_reference.py and compares
// with transformers: greedy tokens over all steps (against the f32 reference with
// a bf16 KV cache, "f32kv16", when available)
// and per-step logits (against the f32 and the bf16 references), on each layout
// given (default: "0" and "0,1"). Exit code 0 when every token matches, 3 when every
// divergence is a near tie of the reference, 1 otherwise.
//   python3 scripts/hf_reference.py /tmp/hfref
//   ELASTICMOE_BACKEND=cuda node scripts/check-vs-transformers.mjs /tmp/hfref [0] [0,1]
import { readFileSync } from 'node:fs';
import path from 'node:path';

import { Runtime } from '../dist/index.js';
import { Hmm } from '../dist/hmm/hmm.js';
import { planChunks } from '../dist/hmm/placement.js';
import { openCheckpoint } from '../dist/hmm/safetensors.js';
import { loadCheckpoint } from '../dist/hmm/weight-loader.js';
import { readConfig } from '../dist/model/config.js';
import { roundRobinPlacement, weightSpecs } from '../dist/model/weights.js';
import { ForwardEngine } from '../dist/executor/forward.js';
import { mapHmmKvPools } from '../dist/executor/kv-view.js';
import { kvGeometry } from '../dist/executor/types.js';
import { storeWeights } from '../dist/executor/weights.js';

const [root, ...layoutArgs] = process.argv.slice(2);
if (!root) {
  console.error('usage: check-vs-transformers.mjs REF_DIR [devices ...]');
  process.exit(2);
}
const layouts = (layoutArgs.length ? layoutArgs : ['0', '0,1']).map((s) => s.split(',').map(Number));
const rt = Runtime.open({});
let failures = 0;
let unexplained = 0;
const emit = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);

for (const arch of ['qwen3_moe', 'mixtral']) {
  const dir = path.join(root, arch);
  const ref = JSON.parse(readFileSync(path.join(dir, 'reference.json'), 'utf8'));
  const config = await readConfig(dir);
  for (const devices of layouts) {
    if (devices.some((d) => d >= rt.deviceCount)) continue;
    const hmm = new Hmm(rt);
    const placement = roundRobinPlacement(config.experts, devices);
    const plans = planChunks(weightSpecs(config, devices, placement), { granularity: rt.granularity(0) });
    await loadCheckpoint(hmm.store, plans, await openCheckpoint(dir));
    const geo = kvGeometry(config, 16);
    const blocksPerSeq = Math.ceil((Math.max(...ref.prompts.map((p) => p.length)) + ref.steps) / geo.blockTokens);
    for (const d of devices) hmm.kv.createPool({ device: d, blockBytes: geo.blockBytes, blocks: blocksPerSeq * ref.prompts.length + 4 });
    const pools = mapHmmKvPools(rt, hmm, devices, () => devices);
    const engine = await ForwardEngine.create(rt, config, { devices, placement }, storeWeights(hmm.store), pools, { blockTokens: geo.blockTokens });
    // Prompts spread over the DP ranks, all run in the same batched steps.
    const seqs = ref.prompts.map((prompt, i) => {
      const rank = i % devices.length;
      const id = `p${i}`;
      const blocks = hmm.kv.allocate(id, devices[rank], blocksPerSeq);
      return { id, rank, prompt, blocks, out: [], logits: [] };
    });
    let pos = seqs.map(() => 0);
    for (let step = 0; step < ref.steps; step++) {
      const ranks = devices.map(() => []);
      seqs.forEach((s, i) => {
        const tokens = step === 0 ? s.prompt : [s.out[s.out.length - 1]];
        ranks[s.rank].push({ seqId: s.id, tokens, startPos: pos[i], blockTable: s.blocks, sample: true });
      });
      const r = await engine.step({ ranks }, { returnLogits: true });
      seqs.forEach((s, i) => {
        pos[i] += step === 0 ? s.prompt.length : 1;
        s.out.push(r.next.get(s.id));
        s.logits.push(r.logits.get(s.id));
      });
    }
    // The strict reference: transformers in f32 with a bf16 KV cache like ours, when it could be made.
    const strict = ref.f32kv16 ? 'f32kv16' : 'f32';
    for (const [i, s] of seqs.entries()) {
      const want = ref[strict][i].tokens;
      const firstDiff = s.out.findIndex((t, k) => t !== want[k]);
      const maxDiff = (which) => {
        let worst = 0;
        let scale = 0;
        // Compare logits only up to the first token divergence from that reference (after it the inputs differ).
        const diverge = s.out.findIndex((t, k) => t !== ref[which][i].tokens[k]);
        const upto = diverge < 0 ? ref.steps : diverge + 1;
        for (let k = 0; k < upto; k++) {
          const a = s.logits[k];
          const b = ref[which][i].logits[k];
          for (let v = 0; v < a.length; v++) {
            worst = Math.max(worst, Math.abs(a[v] - b[v]));
            scale = Math.max(scale, Math.abs(b[v]));
          }
        }
        return { maxAbs: worst, maxRef: scale, rel: worst / scale };
      };
      const bf16Same = s.out.filter((t, k) => t === ref.bf16[i].tokens[k]).length;
      // At the first divergence: was it a near tie? The reference's top-1 / top-2 margin at that step,
      // against the largest logit difference seen before it (rounding noise). A divergence is
      // "explained" when the margin is within twice that noise.
      let divergence;
      if (firstDiff >= 0) {
        const r = ref[strict][i].logits[firstDiff];
        const sorted = [...r].sort((a, b) => b - a);
        const margin = sorted[0] - sorted[1];
        let noise = 0;
        for (let k = 0; k <= firstDiff; k++) {
          const a = s.logits[k];
          const b = ref[strict][i].logits[k];
          for (let v = 0; v < a.length; v++) noise = Math.max(noise, Math.abs(a[v] - b[v]));
        }
        divergence = { step: firstDiff, refMargin: margin, noiseBefore: noise, explainedAsNearTie: margin <= 2 * noise };
      }
      const row = { arch, devices: devices.join(','), prompt: i, promptLen: s.prompt.length, steps: ref.steps,
        strictReference: strict, tokensEqual: firstDiff < 0, firstDiffStep: firstDiff, tokensSameAsBf16: bf16Same,
        logitsVsStrict: maxDiff(strict), logitsVsF32: maxDiff('f32'), logitsVsBf16: maxDiff('bf16'),
        step0MaxAbsVsF32: Math.max(...s.logits[0].map((v, k) => Math.abs(v - ref.f32[i].logits[0][k]))) };
      if (firstDiff >= 0) failures++;
      if (divergence && !divergence.explainedAsNearTie) unexplained++;
      row.divergence = divergence;
      emit(row);
    }
    engine.dispose();
    for (const p of pools.values()) p.dispose();
    for (const s of seqs) hmm.kv.free(s.id);
    hmm.dispose();
  }
}
emit({ summary: true, failures, unexplained });
// Exit 1 only for divergences that are not near ties (see `divergence` in each row); 3 when every
// divergence is a near tie, so a caller can tell "exact" (0) from "equal up to ties" (3).
process.exitCode = unexplained ? 1 : failures ? 3 : 0;
