// The executor as its own process (src/executor/process.ts, driven through
// RemoteStepper) on the mock backend: it serves from weights and KV attached from
// the HMM daemon with bit-identical results to an in-process ForwardEngine, and
// (DESIGN invariant 6) when it is SIGKILLed mid-generation the HMM keeps every
// weight and KV block, and a new executor process continues the same sequences.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { ForwardEngine } from '../../src/executor/forward.js';
import { type MappedKvPool, mapHmmKvPools } from '../../src/executor/kv-view.js';
import { ExecutorCrashedError, RemoteStepper } from '../../src/executor/remote.js';
import { type Layout, type SeqStep, type StepResult, kvGeometry } from '../../src/executor/types.js';
import { storeWeights } from '../../src/executor/weights.js';
import { HmmDaemon } from '../../src/hmm/daemon.js';
import { Hmm } from '../../src/hmm/hmm.js';
import type { TensorLocation } from '../../src/hmm/placement.js';
import { parseConfig } from '../../src/model/config.js';
import { roundRobinPlacement, weightSpecs } from '../../src/model/weights.js';
import type { Runtime } from '../../src/index.js';
import { MIB, openMock, sameBytes } from '../helpers/mock.js';

const CHILD = path.resolve(__dirname, '../fixtures/executor-child.mjs');
const CHILD_ENV = { ...process.env, ELASTICMOE_BACKEND: 'mock', ELASTICMOE_NO_WARN_MOCK: '1' };
const SEED = 20251127n;
const ALL = [0, 1, 2, 3];
const STEPS = 8;

const config = parseConfig({
  hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16,
  vocab_size: 97, num_experts_per_tok: 2, rms_norm_eps: 1e-6, rope_theta: 10000, max_position_embeddings: 256,
  model_type: 'qwen3_moe', num_experts: 8, moe_intermediate_size: 32, norm_topk_prob: true,
});
const scaleFor = (t: TensorLocation) => {
  if (t.shape.length === 1) return t.name.endsWith('.bias') ? 0.1 : 1.0;
  return t.name.includes('embed_tokens') || t.name.includes('lm_head') ? 1.0 : 0.25;
};
const PROMPTS = [
  { id: 'a', prompt: [5, 17, 33, 2, 90] },
  { id: 'b', prompt: [11, 12, 13, 14, 15, 16, 17, 18, 19] },
  { id: 'c', prompt: [42, 7, 64] },
  { id: 'd', prompt: [1, 96, 50, 3, 77, 8, 29, 61, 44, 0, 23, 85, 39, 70, 18, 55, 31] },
];
const LAYOUT: Layout = { devices: [0, 1], placement: roundRobinPlacement(8, [0, 1]) };
const ENGINE_OPTIONS = { maxTokensPerStep: 32 };

interface StepperLike {
  step(batch: { ranks: SeqStep[][] }, options?: { returnLogits?: boolean }): Promise<StepResult>;
}

interface Seq {
  id: string;
  prompt: number[];
  rank: number;
  req: string;
  blocks: number[];
  out: number[];
  logits: Float32Array[];
}

let runCounter = 0;
/** Allocates each prompt's KV blocks (in the in-process HMM) on rank i % 2. */
function sequences(hmm: Hmm, steps = STEPS): Seq[] {
  const BS = kvGeometry(config).blockTokens;
  const run = ++runCounter;
  return PROMPTS.map((p, i) => {
    const rank = i % LAYOUT.devices.length;
    const req = `run${run}:${p.id}`;
    const blocks = hmm.kv.allocate(req, LAYOUT.devices[rank]!, Math.ceil((p.prompt.length + steps + 1) / BS));
    return { ...p, rank, req, blocks, out: [], logits: [] };
  });
}

function batchOf(seqs: Seq[], make: (s: Seq) => SeqStep) {
  const ranks: SeqStep[][] = LAYOUT.devices.map(() => []);
  for (const s of seqs) ranks[s.rank]!.push(make(s));
  return { ranks };
}
const prefill = (s: Seq): SeqStep => ({ seqId: s.id, tokens: s.prompt, startPos: 0, blockTable: s.blocks, sample: true });
/** Decode step i (0-based): feeds the token sampled by the step before. */
const decode = (i: number) => (s: Seq): SeqStep => ({
  seqId: s.id, tokens: [s.out[i]!], startPos: s.prompt.length + i, blockTable: s.blocks, sample: true,
});

function record(seqs: Seq[], r: StepResult): void {
  for (const s of seqs) {
    s.out.push(r.next.get(s.id)!);
    s.logits.push(r.logits!.get(s.id)!);
  }
}

/** Prefill then decode steps `from`..`to`-1 (all when from = 0 and prefill is run). */
async function run(stepper: StepperLike, seqs: Seq[], { from = 0, to = STEPS, withPrefill = true } = {}): Promise<void> {
  if (withPrefill) record(seqs, await stepper.step(batchOf(seqs, prefill), { returnLogits: true }));
  for (let i = from; i < to; i++) record(seqs, await stepper.step(batchOf(seqs, decode(i)), { returnLogits: true }));
}

const bytesOf = (x: Float32Array) => new Uint8Array(x.buffer, x.byteOffset, x.byteLength);
function expectIdentical(got: Seq[], want: Seq[], what: string): void {
  for (const [k, w] of want.entries()) {
    const g = got[k]!;
    expect(g.out, `${what}: tokens of ${w.id}`).toEqual(w.out);
    expect(g.logits.length).toBe(w.logits.length);
    for (let i = 0; i < w.logits.length; i++) {
      expect(sameBytes(bytesOf(g.logits[i]!), bytesOf(w.logits[i]!)), `${what}: logits of ${w.id} at step ${i}`).toBe(true);
    }
  }
}

describe('executor process', () => {
  let dir: string;
  let rt: Runtime;
  let hmm: Hmm;
  let daemon: HmmDaemon;
  let views: Map<number, MappedKvPool>;
  let local: ForwardEngine;
  let baseline: Seq[];
  const steppers: RemoteStepper[] = [];

  const spawnExecutor = async () => {
    const s = await RemoteStepper.spawn({
      script: CHILD, args: [sock()], env: CHILD_ENV, config, layout: LAYOUT, options: ENGINE_OPTIONS,
    });
    steppers.push(s);
    return s;
  };
  const sock = () => path.join(dir, 'hmm.sock');

  beforeAll(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'emoe-exproc-'));
    rt = openMock({ mockCapacity: 256 * MIB });
    hmm = new Hmm(rt);
    await hmm.loadSynthetic(weightSpecs(config, ALL, () => ALL), { seed: SEED, scaleFor });
    for (const d of ALL) hmm.kv.createPool({ device: d, blockBytes: kvGeometry(config).blockBytes, blocks: 64 });
    daemon = await HmmDaemon.listen(hmm, sock());
    views = mapHmmKvPools(rt, hmm, ALL);
    local = await ForwardEngine.create(rt, config, LAYOUT, storeWeights(hmm.store), views, ENGINE_OPTIONS);
    // The uninterrupted in-process run every other run must match.
    baseline = sequences(hmm);
    await run(local, baseline);
    expect(new Set(baseline.flatMap((s) => s.out)).size).toBeGreaterThan(5); // not degenerate
  });

  afterAll(async () => {
    for (const s of steppers) s.kill();
    await Promise.all(steppers.map((s) => s.exited));
    local?.dispose();
    if (views) for (const v of views.values()) v.dispose();
    await daemon?.close();
    hmm?.dispose();
    rmSync(dir, { recursive: true, force: true });
  });

  it('gives bit-identical tokens and logits to an in-process ForwardEngine', async () => {
    const remote = await spawnExecutor();
    expect(remote.pid).not.toBe(process.pid);
    expect(daemon.sessionCount).toBe(1);
    const seqs = sequences(hmm);
    await run(remote, seqs);
    expectIdentical(seqs, baseline, 'remote');
    // A bad step is refused by the executor, which keeps serving.
    await expect(remote.step({ ranks: [[{ seqId: 'x', tokens: [1], startPos: 0, blockTable: [], sample: true }], []] }))
      .rejects.toThrow();
    const again = sequences(hmm, 0);
    const r = await remote.step(batchOf(again, prefill));
    for (const [k, s] of again.entries()) expect(r.next.get(s.id)).toBe(baseline[k]!.out[0]);
    await remote.close();
    expect(await remote.exited).toEqual({ code: 0, signal: null });
    await expect.poll(() => daemon.sessionCount).toBe(0);
    await expect(remote.step(batchOf(again, prefill))).rejects.toBeInstanceOf(ExecutorCrashedError);
  }, 20_000);

  it('takes init again until its first step (a process initialised ahead for another layout): then the in-process tokens; refused after a step', async () => {
    const ahead = await RemoteStepper.spawn({
      script: CHILD, args: [sock()], env: CHILD_ENV, config, options: ENGINE_OPTIONS,
      layout: { devices: [2, 3], placement: roundRobinPlacement(8, [2, 3]) },
    });
    steppers.push(ahead);
    const first = ahead.session;
    await ahead.reinit({ config, layout: LAYOUT, options: ENGINE_OPTIONS });
    expect(ahead.session).toBe(first); // the same process and HMM session
    expect(ahead.preattached).toMatchObject({ kept: expect.any(Number), dropped: expect.any(Number) });
    expect(ahead.preattached!.dropped).toBeGreaterThan(0); // what only [2, 3] used
    // Before its first step it captures graph shapes it is sent (a process initialised ahead following the serving ones).
    const shape = { rank: 0, T: 6, S: 6, MB: 2, sampled: 6, device: LAYOUT.devices[0]! };
    expect((await ahead.precapture([shape])).graphs).toBe(1);
    expect((await ahead.precapture([shape])).graphs).toBe(0); // captured already
    expect((await ahead.precapture([{ ...shape, T: 5 }])).graphs).toBe(0); // no step has that shape (5 is not a step bucket)
    const seqs = sequences(hmm);
    await run(ahead, seqs);
    expectIdentical(seqs, baseline, 're-initialised');
    await expect(ahead.reinit({ config, layout: LAYOUT, options: ENGINE_OPTIONS })).rejects.toThrow(/before the executor's first step/);
    await expect(ahead.precapture([shape])).rejects.toThrow(/before the executor's first step/);
    await ahead.close();
  }, 20_000);

  it('sends init without holding the parent\'s thread while the process is still starting: a 1.5 MB init to a child that reads nothing for 1.5 s', async () => {
    // Shapes no step has (rank 99): skipped by the child, but they make the init far larger than the socket holds.
    const precapture = Array.from({ length: 30_000 }, (_, i) => ({ rank: 99, T: 1 + (i % 7), S: 1, MB: 1, sampled: 0, device: 0 }));
    let last = performance.now();
    let longest = 0;
    const timer = setInterval(() => {
      const now = performance.now();
      longest = Math.max(longest, now - last);
      last = now;
    }, 10);
    try {
      const slow = await RemoteStepper.spawn({
        script: CHILD, args: [sock()], env: { ...CHILD_ENV, EMOE_TEST_START_DELAY_MS: '1500' }, config, layout: LAYOUT, options: ENGINE_OPTIONS, precapture,
      });
      steppers.push(slow);
      expect(slow.precaptured?.graphs).toBe(0);
      await slow.close();
    } finally {
      clearInterval(timer);
    }
    // A blocking send would have held this thread until the child read: ~1.5 s without a timer firing.
    expect(longest).toBeLessThan(1000);
  }, 20_000);

  it('invariant 6: a SIGKILLed executor loses no weights; a new one continues the same sequences', async () => {
    const weightIds = hmm.store.all().filter((c) => c.plan.kind === 'weight').map((c) => c.plan.id);
    const sums = new Map<string, bigint>();
    for (const id of weightIds) sums.set(id, await hmm.store.checksumChunk(id));
    const accounting = hmm.accounting();
    const chunkIds = hmm.store.all().map((c) => c.plan.id).sort();

    const first = await spawnExecutor();
    const seqs = sequences(hmm);
    const tables = seqs.map((s) => structuredClone(hmm.kv.table(s.req)));
    const KILL_AT = 4;
    await run(first, seqs, { to: KILL_AT });
    // Mid-generation: the executor dies with decode step KILL_AT in flight. Stopped first (SIGSTOP), so that it
    // cannot answer the step before the kill lands (on a loaded machine it once did: the test raced).
    first.proc!.kill('SIGSTOP');
    const inFlight = first.step(batchOf(seqs, decode(KILL_AT)), { returnLogits: true });
    first.proc!.kill('SIGKILL');
    await expect(inFlight).rejects.toBeInstanceOf(ExecutorCrashedError);
    await expect(inFlight).rejects.toThrow(/SIGKILL|closed its channel/);
    // Later steps fail the same way, at once.
    await expect(first.step(batchOf(seqs, decode(KILL_AT)))).rejects.toBeInstanceOf(ExecutorCrashedError);
    expect((await first.exited)?.signal).toBe('SIGKILL');
    await expect.poll(() => daemon.sessionCount).toBe(0);

    // The HMM lost nothing: same chunks, same weight bytes, same accounting, same block tables.
    expect(hmm.store.all().map((c) => c.plan.id).sort()).toEqual(chunkIds);
    for (const [id, sum] of sums) expect(await hmm.store.checksumChunk(id), id).toBe(sum);
    expect(hmm.accounting()).toEqual(accounting);
    for (const [k, s] of seqs.entries()) expect(hmm.kv.table(s.req), s.req).toEqual(tables[k]);

    // A new executor attaches and continues from the KV blocks: it redoes the lost step
    // (its writes to the cache, if any, are the same bytes) and goes on to the end.
    const second = await spawnExecutor();
    expect(second.pid).not.toBe(first.pid);
    await run(second, seqs, { from: KILL_AT, to: STEPS, withPrefill: false });
    expectIdentical(seqs, baseline, 'after the crash');
    await second.close();
    expect((await second.exited)?.code).toBe(0);
    for (const s of seqs) hmm.kv.free(s.req);
  }, 20_000);
});

describe('layoutChunkIds (pure)', () => {
  it('keeps dense chunks and KV pools of the layout devices and only the experts placed there', async () => {
    const { layoutChunkIds } = await import('../../src/executor/process.js');
    const chunks = [
      { id: 'dense@0#0', group: 'dense', device: 0, kind: 'weight' },
      { id: 'dense@2#0', group: 'dense', device: 2, kind: 'weight' },
      { id: 'L0.E0@0', group: 'L0.E0', device: 0, kind: 'weight' },
      { id: 'L0.E1@0', group: 'L0.E1', device: 0, kind: 'weight' }, // held by an old layout only
      { id: 'L0.E1@1', group: 'L0.E1', device: 1, kind: 'weight' },
      { id: 'kv@0#0', group: 'kv', device: 0, kind: 'kv' },
      { id: 'kv@2#0', group: 'kv', device: 2, kind: 'kv' },
    ];
    const placement = [[[0], [1]]];
    expect(layoutChunkIds(chunks, [0, 1], placement, [{ chunkIds: ['kv@0#0'] }]).sort())
      .toEqual(['L0.E0@0', 'L0.E1@1', 'dense@0#0', 'kv@0#0']);
  });
});
