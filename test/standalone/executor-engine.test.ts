// The request engine over a fake forward pass: the next token of a sequence is
// (sum of its tokens so far) % VOCAB, computed from what the fake "KV cache"
// holds, so any scheduling mistake (a skipped chunk, a wrong startPos, a
// recompute that forgets a token) changes the output.
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';

import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';

import { type GenerateCommandOptions, runGenerate } from '../../src/cli/generate.js';

import { Engine, type EngineOptions, type KvAllocator, type Stepper, type StepFigures, kvAllocatorFromClient } from '../../src/executor/engine.js';
import { ForwardEngine } from '../../src/executor/forward.js';
import { type MappedKvPool, mapHmmKvPools } from '../../src/executor/kv-view.js';
import { type StepBatch, type StepResult, kvGeometry } from '../../src/executor/types.js';
import { storeWeights } from '../../src/executor/weights.js';
import { HmmClient } from '../../src/hmm/client.js';
import { HmmDaemon } from '../../src/hmm/daemon.js';
import { Hmm } from '../../src/hmm/hmm.js';
import { KvExhaustedError } from '../../src/hmm/kv-pool.js';
import type { TensorLocation } from '../../src/hmm/placement.js';
import { writeSafetensors } from '../../src/hmm/safetensors.js';
import { parseConfig } from '../../src/model/config.js';
import { roundRobinPlacement, weightShapes, weightSpecs } from '../../src/model/weights.js';
import type { Runtime } from '../../src/runtime/runtime.js';
import { MIB, openMock } from '../helpers/mock.js';

const VOCAB = 1000;
const nextOf = (tokens: readonly number[]) => tokens.reduce((a, b) => a + b, 0) % VOCAB;

/** What greedy generation gives for a prompt (stopping before a token in `stop`). */
function reference(prompt: readonly number[], maxTokens: number, stop: ReadonlySet<number> = new Set()): number[] {
  const seq = [...prompt];
  const out: number[] = [];
  while (out.length < maxTokens) {
    const t = nextOf(seq);
    if (stop.has(t)) break;
    seq.push(t);
    out.push(t);
  }
  return out;
}

interface FakeOptions {
  blockTokens: number;
  /** Device of each DP rank. */
  devices: number[];
  /** Shared with the allocator, which poisons blocks it hands out. */
  memory: BlockMemory;
  delayMs?: number;
  /** Throw from this step (1-based) when it returns true. */
  failWhen?: (batch: StepBatch, step: number) => boolean;
  next?: (tokens: readonly number[]) => number;
}

/**
 * What each KV block holds, slot by slot (a token id stands for its K and V).
 * A block handed out by the allocator is poisoned (emptied), as real memory
 * holds another sequence's leftovers: reading a slot nobody wrote since is an error.
 */
class BlockMemory {
  private readonly blocks = new Map<string, Array<number | undefined>>();
  constructor(readonly blockTokens: number) {}
  poison(device: number, blocks: readonly number[]): void {
    for (const b of blocks) this.blocks.set(`${device}:${b}`, new Array(this.blockTokens));
  }
  slot(device: number, block: number): Array<number | undefined> {
    const k = `${device}:${block}`;
    return this.blocks.get(k) ?? this.blocks.set(k, new Array(this.blockTokens)).get(k)!;
  }
}

/** The forward pass: writes each step's tokens into the sequence's blocks and predicts from what the blocks hold. */
class FakeStepper implements Stepper {
  readonly batches: StepBatch[] = [];
  /** The DP rank each sequence ran on, every time. */
  readonly rankOf = new Map<string, Set<number>>();
  calls = 0;
  constructor(private readonly o: FakeOptions) {}

  async step(batch: StepBatch): Promise<StepResult> {
    this.calls++;
    this.batches.push(structuredClone(batch));
    if (this.o.delayMs) await new Promise((r) => setTimeout(r, this.o.delayMs));
    else await Promise.resolve();
    if (this.o.failWhen?.(batch, this.calls)) throw new Error('injected device fault');
    const bt = this.o.blockTokens;
    const mem = this.o.memory;
    const next = new Map<string, number>();
    let tokens = 0;
    for (const [r, seqs] of batch.ranks.entries()) {
      const device = this.o.devices[r]!;
      const used = new Set<number>();
      for (const s of seqs) {
        (this.rankOf.get(s.seqId) ?? this.rankOf.set(s.seqId, new Set()).get(s.seqId)!).add(r);
        if (s.tokens.length === 0) throw new Error(`${s.seqId}: an empty step`);
        const end = s.startPos + s.tokens.length;
        if (s.blockTable.length * bt < end) throw new Error(`${s.seqId}: block table of ${s.blockTable.length} blocks does not cover ${end} tokens`);
        for (const b of s.blockTable) {
          if (used.has(b)) throw new Error(`block ${b} of rank ${r} used by two sequences in one step`);
          used.add(b);
        }
        s.tokens.forEach((t, i) => {
          const p = s.startPos + i;
          mem.slot(device, s.blockTable[Math.floor(p / bt)]!)[p % bt] = t;
        });
        tokens += s.tokens.length;
        if (!s.sample) continue;
        const seen: number[] = [];
        for (let p = 0; p < end; p++) {
          const t = mem.slot(device, s.blockTable[Math.floor(p / bt)]!)[p % bt];
          if (t === undefined) throw new Error(`${s.seqId}: position ${p} was never written to its block`);
          seen.push(t);
        }
        next.set(s.seqId, (this.o.next ?? nextOf)(seen));
      }
    }
    return { next, ms: 0, tokens };
  }
}

/** An allocator like the HMM's; `withInfo: false` hides pool figures (as an allocator that cannot tell them). */
function fakeKv(blocksPerDevice: number[], memory: BlockMemory, withInfo = true) {
  const free = blocksPerDevice.map((n) => Array.from({ length: n }, (_, i) => n - 1 - i));
  const tables = new Map<string, { device: number; blocks: number[] }>();
  const kv: KvAllocator & { tables: typeof tables; freeCount(d: number): number } = {
    tables,
    freeCount: (d) => free[d]!.length,
    allocate(id, device, count) {
      const t = tables.get(id);
      if (t && t.device !== device) throw new Error(`request ${id} is on device ${t.device}`);
      const pool = free[device]!;
      if (pool.length < count) throw new KvExhaustedError('OUT_OF_MEMORY', `device ${device}: ${pool.length} free, ${count} asked`);
      const got = pool.splice(pool.length - count, count).reverse();
      memory.poison(device, got);
      if (t) t.blocks.push(...got);
      else tables.set(id, { device, blocks: got });
      return got;
    },
    free(id) {
      const t = tables.get(id);
      if (!t) return;
      tables.delete(id);
      free[t.device]!.push(...t.blocks.reverse());
    },
    table: (id) => tables.get(id),
  };
  if (withInfo) kv.info = (d) => ({ blocks: blocksPerDevice[d]!, freeBlocks: free[d]!.length });
  return kv;
}

const LETTERS = 'abcdefghijklmnopqrstuvwxyz';
const letters = (tokens: number[]) => tokens.map((t) => LETTERS[t % 26]).join('');

function make(o: Partial<EngineOptions> & { fake?: Partial<FakeOptions>; pools?: number[]; withInfo?: boolean } = {}) {
  const blockTokens = o.blockTokens ?? 4;
  const memory = new BlockMemory(blockTokens);
  const pools = o.pools ?? [1000];
  const stepper = new FakeStepper({ blockTokens, memory, devices: pools.map((_, i) => i), ...o.fake });
  const kv = fakeKv(pools, memory, o.withInfo ?? true);
  const steps: StepFigures[] = [];
  const engine = new Engine({
    stepper,
    kv,
    devices: (o.pools ?? [1000]).map((_, i) => i),
    blockTokens,
    onStep: (f) => steps.push(f),
    ...o,
  });
  return { engine, stepper, kv, steps };
}

const prompt = (n: number, seed: number) => Array.from({ length: n }, (_, i) => (seed * 31 + i * 7) % VOCAB);

describe('Engine: batching and scheduling', () => {
  it('admits new requests while others decode (continuous batching)', async () => {
    const { engine, stepper } = make();
    let aTokens = 0;
    let submitB!: () => void;
    const bStarted = new Promise<void>((r) => (submitB = r));
    const a = engine.submit({ id: 'a', prompt: prompt(5, 1), maxTokens: 30, ignoreEos: true }, {
      onToken: () => {
        if (++aTokens === 5) submitB();
      },
    });
    await bStarted;
    const b = engine.submit({ id: 'b', prompt: prompt(7, 2), maxTokens: 5 });
    const [ca, cb] = await Promise.all([a, b]);
    expect(ca.outputTokens).toEqual(reference(prompt(5, 1), 30));
    expect(cb.outputTokens).toEqual(reference(prompt(7, 2), 5));
    // Some step ran a's decode beside b's prefill, and b finished while a was still decoding.
    const mixed = stepper.batches.find((bt) => bt.ranks[0]!.some((s) => s.seqId === 'a' && s.tokens.length === 1)
      && bt.ranks[0]!.some((s) => s.seqId === 'b' && s.startPos === 0));
    expect(mixed).toBeDefined();
    const lastB = stepper.batches.findLastIndex((bt) => bt.ranks[0]!.some((s) => s.seqId === 'b'));
    const lastA = stepper.batches.findLastIndex((bt) => bt.ranks[0]!.some((s) => s.seqId === 'a'));
    expect(lastB).toBeLessThan(lastA);
    expect(ca.finishReason).toBe('length');
    expect(ca.timings.ttftMs).not.toBeNull();
    expect(ca.timings.tpotMs).not.toBeNull();
  });

  it('splits a long prompt into chunks within the step budget, decodes first', async () => {
    const { engine, stepper, steps } = make({ maxTokensPerStep: 32 });
    let started!: () => void;
    const aRunning = new Promise<void>((r) => (started = r));
    const a = engine.submit({ id: 'a', prompt: prompt(3, 3), maxTokens: 40, ignoreEos: true }, { onToken: () => started() });
    await aRunning;
    const long = prompt(100, 4);
    const b = engine.submit({ id: 'b', prompt: long, maxTokens: 3 });
    const [ca, cb] = await Promise.all([a, b]);
    expect(cb.outputTokens).toEqual(reference(long, 3));
    expect(ca.outputTokens).toEqual(reference(prompt(3, 3), 40));
    const chunks = stepper.batches.flatMap((bt) => bt.ranks[0]!.filter((s) => s.seqId === 'b' && s.startPos < 100));
    // a decodes one token per step beside it, so each chunk is 31 tokens until the prompt ends.
    expect(chunks.map((c) => c.tokens.length)).toEqual([31, 31, 31, 7]);
    expect(chunks.map((c) => c.startPos)).toEqual([0, 31, 62, 93]);
    expect(chunks.map((c) => c.sample)).toEqual([false, false, false, true]);
    expect(chunks.flatMap((c) => c.tokens)).toEqual(long);
    for (const f of steps) expect(f.tokens).toBeLessThanOrEqual(32);
    const withB = steps.filter((f) => f.prefillTokens === 31);
    expect(withB.length).toBe(3);
    for (const f of withB) expect(f.decodeTokens).toBe(1);
  });

  it('completes 50 concurrent requests exactly once each, with the right tokens, over 2 DP ranks', async () => {
    let seed = 12345;
    const rand = (n: number) => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    const { engine, stepper, kv, steps } = make({ pools: [64, 64], maxSeqs: 6, maxTokensPerStep: 48 });
    const reqs = Array.from({ length: 50 }, (_, i) => ({ id: `r${i}`, prompt: prompt(1 + rand(60), i), maxTokens: 1 + rand(40), ignoreEos: true }));
    const streamed = new Map<string, number[]>();
    const done = new Map<string, number>();
    const all = await Promise.all(reqs.map(async (r) => {
      streamed.set(r.id, []);
      const c = await engine.submit(r, { onToken: (t) => streamed.get(r.id)!.push(t) });
      done.set(r.id, (done.get(r.id) ?? 0) + 1);
      return c;
    }));
    await engine.drain();
    expect([...done.values()].every((n) => n === 1)).toBe(true);
    expect(new Set(all.map((c) => c.id)).size).toBe(50);
    for (const [i, c] of all.entries()) {
      const r = reqs[i]!;
      expect(c.id).toBe(r.id);
      expect(c.finishReason).toBe('length');
      expect(c.outputTokens).toHaveLength(r.maxTokens);
      expect(c.outputTokens).toEqual(reference(r.prompt, r.maxTokens));
      expect(streamed.get(r.id)).toEqual(c.outputTokens);
      expect(stepper.rankOf.get(r.id)!.size).toBe(1); // sticky rank
      expect([...stepper.rankOf.get(r.id)!][0]).toBe(c.rank);
    }
    expect(new Set(all.map((c) => c.rank))).toEqual(new Set([0, 1]));
    for (const bt of stepper.batches) for (const r of bt.ranks) expect(r.length).toBeLessThanOrEqual(6);
    for (const f of steps) for (const n of f.rankSeqs) expect(n).toBeLessThanOrEqual(6);
    expect(kv.tables.size).toBe(0);
    expect(kv.freeCount(0)).toBe(64);
    expect(kv.freeCount(1)).toBe(64);
    const s = engine.stats();
    expect(s).toMatchObject({ waiting: 0, running: 0, requestsDone: 50, requestsCancelled: 0, requestsFailed: 0 });
    expect(s.tokensOut).toBe(reqs.reduce((a, r) => a + r.maxTokens, 0));
  });

  it('preempts the youngest sequence when decodes exhaust the pool, and its output stays right', async () => {
    // No pool figures: admission is optimistic, so growth runs out and preemption must recover.
    const { engine, kv } = make({ pools: [12], withInfo: false });
    const reqs = Array.from({ length: 6 }, (_, i) => ({ id: `p${i}`, prompt: prompt(6, i + 40), maxTokens: 20, ignoreEos: true }));
    const streamed = new Map(reqs.map((r) => [r.id, [] as number[]]));
    const all = await Promise.all(reqs.map((r) => engine.submit(r, { onToken: (t) => streamed.get(r.id)!.push(t) })));
    for (const [i, c] of all.entries()) {
      expect(c.finishReason).toBe('length');
      expect(c.outputTokens).toEqual(reference(reqs[i]!.prompt, 20));
      expect(streamed.get(c.id)).toEqual(c.outputTokens); // nothing streamed twice after a recompute
    }
    expect(engine.stats().preemptions).toBeGreaterThan(0);
    expect(all.some((c) => c.preemptions > 0)).toBe(true);
    expect(all[0]!.preemptions).toBe(0); // the oldest always keeps its blocks: it is never the youngest
    expect(kv.freeCount(0)).toBe(12);
  });
});

describe('Engine: stop conditions', () => {
  const p = prompt(8, 77);
  const full = reference(p, 30);

  it('stops on EOS unless ignoreEos, on stop ids, and at maxTokens', async () => {
    const eos = full[4]!;
    expect(full.indexOf(eos)).toBe(4);
    const { engine } = make({ eosTokenIds: [eos] });
    const stopped = await engine.submit({ prompt: p, maxTokens: 30 });
    expect(stopped.finishReason).toBe('stop');
    expect(stopped.stopReason).toBe(eos);
    expect(stopped.outputTokens).toEqual(full.slice(0, 4));
    const ignored = await engine.submit({ prompt: p, maxTokens: 30, ignoreEos: true });
    expect(ignored.finishReason).toBe('length');
    expect(ignored.outputTokens).toEqual(full);

    const stopId = full[9]!;
    const byId = await engine.submit({ prompt: p, maxTokens: 30, ignoreEos: true, stop: { tokenIds: [stopId] } });
    expect(byId.finishReason).toBe('stop');
    expect(byId.stopReason).toBe(stopId);
    expect(byId.outputTokens).toEqual(full.slice(0, full.indexOf(stopId)));

    const short = await engine.submit({ prompt: p, maxTokens: 3, ignoreEos: true });
    expect(short.finishReason).toBe('length');
    expect(short.outputTokens).toEqual(full.slice(0, 3));
  });

  it('cuts the output before a stop string and streams exactly the kept text', async () => {
    const fullText = letters(full);
    const stop = fullText.slice(11, 14);
    const at = fullText.indexOf(stop);
    const { engine } = make({ decode: letters });
    const pieces: string[] = [];
    const tokens: number[] = [];
    const c = await engine.submit({ prompt: p, maxTokens: 30, ignoreEos: true, stop: { strings: ['zzzzzz', stop] } }, {
      onToken: (t, text) => {
        tokens.push(t);
        pieces.push(text!);
      },
    });
    expect(c.finishReason).toBe('stop');
    expect(c.stopReason).toBe(stop);
    expect(c.text).toBe(fullText.slice(0, at));
    expect(c.outputTokens).toEqual(full.slice(0, at));
    expect(pieces.join('')).toBe(c.text);
    expect(tokens).toEqual(c.outputTokens);
    // Without a stop string the whole text comes back, token by token.
    const plain: string[] = [];
    const d = await engine.submit({ prompt: p, maxTokens: 30, ignoreEos: true }, { onToken: (_t, text) => plain.push(text!) });
    expect(d.text).toBe(fullText);
    expect(plain).toEqual([...fullText]);
  });

  it('holds back incomplete characters while streaming', async () => {
    // Token 900 is the first half of "é": alone at the end it decodes to U+FFFD.
    const decode = (ts: number[]) => ts.map((t, i) => (t === 900 ? (i + 1 < ts.length ? '' : '\uFFFD') : ts[i - 1] === 900 ? 'é' : 'x')).join('');
    const script = [1, 900, 2, 3, 900, 4, 900];
    const { engine } = make({ decode, fake: { next: (c) => script[c.length - 2] ?? 5 } });
    const seen: Array<[number, string]> = [];
    const c = await engine.submit({ prompt: [7, 8], maxTokens: 7, ignoreEos: true }, { onToken: (t, text) => seen.push([t, text!]) });
    expect(c.outputTokens).toEqual(script);
    expect(seen.map(([t]) => t)).toEqual(script);
    expect(seen.map(([, s]) => s).join('')).toBe(c.text);
    expect(seen[1]).toEqual([900, '']);
    expect(seen[2]).toEqual([2, 'é']);
    expect(c.text).toBe('xéxé\uFFFD');
  });

  it('refuses stop strings without a detokenizer, bad prompts and duplicate ids', async () => {
    const { engine } = make({ vocabSize: VOCAB, maxSeqLen: 64 });
    await expect(engine.submit({ prompt: [1], maxTokens: 2, stop: { strings: ['x'] } })).rejects.toThrow(/stop\.strings.*detokenizer/);
    await expect(engine.submit({ prompt: [], maxTokens: 2 })).rejects.toThrow(/prompt.*at least one token/);
    await expect(engine.submit({ prompt: [VOCAB], maxTokens: 2 })).rejects.toThrow(/prompt\[0\]/);
    await expect(engine.submit({ prompt: [1], maxTokens: 0 })).rejects.toThrow(/maxTokens/);
    await expect(engine.submit({ prompt: prompt(40, 1), maxTokens: 30 })).rejects.toThrow(/64 positions/);
    const first = engine.submit({ id: 'same', prompt: [1, 2], maxTokens: 5 });
    await expect(engine.submit({ id: 'same', prompt: [1, 2], maxTokens: 5 })).rejects.toThrow(/already active/);
    expect((await first).outputTokens).toHaveLength(5);
  });
});

describe('Engine: KV blocks, cancellation, failures (HMM pools on the mock)', () => {
  let rt: Runtime | undefined;
  let hmm: Hmm | undefined;
  afterEach(() => {
    hmm?.dispose();
    rt?.dispose();
    hmm = undefined;
    rt = undefined;
  });

  function withHmm(blocks: number, o: Partial<EngineOptions> & { fake?: Partial<FakeOptions> } = {}) {
    rt = openMock({ mockDevices: 2 });
    hmm = new Hmm(rt);
    hmm.kv.createPool({ device: 1, blockBytes: 64 * 1024, blocks });
    const memory = new BlockMemory(4);
    const stepper = new FakeStepper({ blockTokens: 4, memory, devices: [1], ...o.fake });
    const steps: StepFigures[] = [];
    // The in-process KvManager is a KvAllocator as it is; this wrapper only poisons the blocks it hands out.
    const direct: KvAllocator = hmm.kv;
    const kv: KvAllocator = {
      allocate(id, device, count) {
        const got = direct.allocate(id, device, count) as number[];
        memory.poison(device, got);
        return got;
      },
      free: (id) => direct.free(id),
      info: (d) => direct.info!(d),
    };
    const engine = new Engine({ stepper, kv, devices: [1], blockTokens: 4, onStep: (f) => steps.push(f), ...o });
    return { engine, stepper, kv: hmm.kv, steps };
  }

  it('afterNextStep: at once when idle, after the next step while running, and when queued work cannot get blocks', async () => {
    const { engine, steps, kv } = withHmm(32, { fake: { delayMs: 5 } });
    await engine.afterNextStep(); // idle: nothing to wait for
    const c = engine.submit({ id: 'x', prompt: prompt(9, 5), maxTokens: 6, ignoreEos: true });
    await new Promise((r) => setTimeout(r, 1));
    const before = steps.length;
    await engine.afterNextStep();
    expect(steps.length).toBe(before + 1);
    await c;
    // Blocks held outside the engine: the request waits, and no step comes.
    const all = kv.info!(1).freeBlocks;
    kv.allocate('hog', 1, all);
    const waiting = engine.submit({ id: 'w', prompt: prompt(9, 5), maxTokens: 2, ignoreEos: true });
    await new Promise((r) => setTimeout(r, 5));
    const n = steps.length;
    await engine.afterNextStep();
    expect(steps.length).toBe(n);
    kv.free('hog');
    expect((await waiting).outputTokens.length).toBe(2);
  });

  it('cancellation mid-generation frees the blocks and resolves as cancelled', async () => {
    const { engine, kv } = withHmm(32, { fake: { delayMs: 5 } });
    const ac = new AbortController();
    let n = 0;
    let atAbort = -1;
    let tableDuring: number[] | undefined;
    const c = engine.submit({ id: 'x', prompt: prompt(9, 5), maxTokens: 100, ignoreEos: true }, {
      signal: ac.signal,
      onToken: () => {
        if (++n === 3) {
          tableDuring = kv.table('x')?.blocks;
          // Lands while the next step is in flight: its token for x must be dropped.
          setTimeout(() => {
            atAbort = n;
            ac.abort();
          }, 2);
        }
      },
    });
    const other = engine.submit({ id: 'y', prompt: prompt(5, 6), maxTokens: 12, ignoreEos: true });
    const done = await c;
    expect(done.finishReason).toBe('cancelled');
    expect(tableDuring!.length).toBeGreaterThanOrEqual(3);
    expect(kv.table('x')).toBeUndefined();
    expect(atAbort).toBe(3);
    expect(n).toBe(3); // nothing streamed after the abort
    expect(done.outputTokens).toEqual(reference(prompt(9, 5), 3));
    expect((await other).outputTokens).toEqual(reference(prompt(5, 6), 12));
    expect(kv.info(1).freeBlocks).toBe(32);

    // Cancelled before it ever ran: resolves at once with nothing.
    const pre = new AbortController();
    pre.abort();
    const never = await engine.submit({ prompt: [1, 2], maxTokens: 5 }, { signal: pre.signal });
    expect(never).toMatchObject({ finishReason: 'cancelled', outputTokens: [] });
    expect(engine.stats()).toMatchObject({ requestsCancelled: 2, requestsDone: 1 });
  });

  it('requests wait for KV blocks when the pool is exhausted, then complete', async () => {
    // 8 blocks of 4 tokens; each request needs ceil((10 + 10 - 1) / 4) = 5 blocks: one at a time fits.
    const { engine, kv, steps } = withHmm(8, { fake: { delayMs: 1 } });
    const reqs = Array.from({ length: 4 }, (_, i) => ({ id: `w${i}`, prompt: prompt(10, i + 20), maxTokens: 10, ignoreEos: true }));
    const queuedCancel = new AbortController();
    const all = Promise.all(reqs.map((r) => engine.submit(r)));
    const cancelled = engine.submit({ id: 'c', prompt: prompt(10, 99), maxTokens: 10 }, { signal: queuedCancel.signal });
    await new Promise((r) => setTimeout(r, 5));
    queuedCancel.abort(); // waiting for blocks: leaves the queue
    expect((await cancelled).finishReason).toBe('cancelled');
    const done = await all;
    for (const [i, c] of done.entries()) {
      expect(c.finishReason).toBe('length');
      expect(c.outputTokens).toEqual(reference(reqs[i]!.prompt, 10));
    }
    expect(Math.max(...steps.map((f) => f.batchSeqs))).toBeLessThan(4);
    expect(done[3]!.timings.queuedMs).toBeGreaterThan(done[0]!.timings.queuedMs);
    expect(kv.info(1).freeBlocks).toBe(8);
    expect(kv.requests()).toEqual([]);
  });

  it('refuses a request that can never fit the pool, with the numbers', async () => {
    const { engine } = withHmm(8);
    await expect(engine.submit({ id: 'big', prompt: prompt(20, 1), maxTokens: 20 }))
      .rejects.toThrow(/big needs 10 blocks of 4 tokens \(prompt 20 \+ maxTokens 20\), the pools hold 8 blocks/);
    // The largest that fits: 32 tokens of KV (the last sampled token needs none).
    const fits = await engine.submit({ prompt: prompt(20, 1), maxTokens: 13, ignoreEos: true });
    expect(fits.outputTokens).toHaveLength(13);
  });

  it('a failing step fails only the requests of that batch; later requests complete', async () => {
    const { engine, kv } = withHmm(64, { fake: { failWhen: (b) => b.ranks[0]!.some((s) => s.seqId === 'bad' && s.startPos > 0) } });
    const bad = engine.submit({ id: 'bad', prompt: prompt(6, 1), maxTokens: 10, ignoreEos: true });
    const mate = engine.submit({ id: 'mate', prompt: prompt(6, 2), maxTokens: 10, ignoreEos: true });
    const [cb, cm] = await Promise.all([bad, mate]);
    expect(cb.finishReason).toBe('error');
    expect(cb.error).toMatch(/step \d+ failed: injected device fault/);
    expect(cm.finishReason).toBe('error'); // it was in the same batch
    expect(kv.requests()).toEqual([]);
    const later = await Promise.all([1, 2, 3].map((i) => engine.submit({ prompt: prompt(7, i + 10), maxTokens: 6, ignoreEos: true })));
    for (const [k, c] of later.entries()) {
      expect(c.finishReason).toBe('length');
      expect(c.outputTokens).toEqual(reference(prompt(7, k + 11), 6));
    }
    expect(engine.stats()).toMatchObject({ requestsFailed: 2, requestsDone: 3 });
    expect(kv.info(1).freeBlocks).toBe(64);
  });

  it('allocates through the HMM daemon (HmmClient): async allocation, waiting, every block back', async () => {
    rt = openMock({ mockDevices: 2 });
    hmm = new Hmm(rt);
    hmm.kv.createPool({ device: 1, blockBytes: 64 * 1024, blocks: 10 });
    const dir = mkdtempSync(path.join(os.tmpdir(), 'emoe-eng-'));
    const daemon = await HmmDaemon.listen(hmm, path.join(dir, 'hmm.sock'));
    const client = await HmmClient.connect(path.join(dir, 'hmm.sock'), rt, { name: 'engine-test' });
    try {
      const memory = new BlockMemory(4);
      const remote = kvAllocatorFromClient(client);
      const kv: KvAllocator = {
        ...remote,
        async allocate(id, device, count) {
          const got = await remote.allocate(id, device, count);
          memory.poison(device, got);
          return got;
        },
      };
      const engine = new Engine({ stepper: new FakeStepper({ blockTokens: 4, memory, devices: [1] }), kv, devices: [1], blockTokens: 4 });
      await expect(engine.submit({ id: 'huge', prompt: prompt(30, 1), maxTokens: 20 })).rejects.toThrow(/needs 13 blocks.*pools hold 10 blocks/);
      const reqs = Array.from({ length: 8 }, (_, i) => ({ id: `d${i}`, prompt: prompt(7, i + 60), maxTokens: 9, ignoreEos: true }));
      const all = await Promise.all(reqs.map((r) => engine.submit(r)));
      all.forEach((c, i) => expect(c.outputTokens).toEqual(reference(reqs[i]!.prompt, 9)));
      expect(hmm.kv.requests()).toEqual([]);
      expect(hmm.kv.info(1).freeBlocks).toBe(10);
    } finally {
      client.close();
      await daemon.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a throwing onToken or detokenizer ends only its own request', async () => {
    const { engine, kv } = withHmm(32, { decode: (ts) => {
      if (ts.includes(4242)) throw new Error('bad bytes');
      return letters(ts);
    } });
    const throwing = engine.submit({ prompt: prompt(5, 1), maxTokens: 10, ignoreEos: true }, {
      onToken: () => {
        throw new Error('client went away');
      },
    });
    const undecodable = engine.submit({ prompt: [4242, 1], maxTokens: 10, ignoreEos: true });
    const fine = engine.submit({ prompt: prompt(5, 2), maxTokens: 10, ignoreEos: true });
    const [a, b, c] = await Promise.all([throwing, undecodable, fine]);
    expect(a).toMatchObject({ finishReason: 'error', error: 'onToken threw: client went away' });
    expect(b.finishReason).toBe('error');
    expect(b.error).toMatch(/detokenizer failed: bad bytes/);
    expect(c.finishReason).toBe('length');
    expect(c.text).toBe(letters(reference(prompt(5, 2), 10)));
    expect(kv.info(1).freeBlocks).toBe(32);
  });

  it('close() cancels what is running and queued and frees every block', async () => {
    const { engine, kv } = withHmm(16, { fake: { delayMs: 1 } });
    const a = engine.submit({ prompt: prompt(5, 1), maxTokens: 50, ignoreEos: true });
    const b = engine.submit({ prompt: prompt(5, 2), maxTokens: 50, ignoreEos: true });
    await new Promise((r) => setTimeout(r, 10));
    await engine.close();
    expect((await a).finishReason).toBe('cancelled');
    expect((await b).finishReason).toBe('cancelled');
    expect(kv.info(1).freeBlocks).toBe(16);
    await expect(engine.submit({ prompt: [1], maxTokens: 1 })).rejects.toThrow(/closed/);
  });
});

// ---- end to end: the engine over the real forward pass on the mock backend

describe('Engine over the real ForwardEngine (mock backend)', () => {
  const config = parseConfig({
    model_type: 'qwen3_moe', hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16,
    vocab_size: 97, num_experts: 8, moe_intermediate_size: 32, norm_topk_prob: true, num_experts_per_tok: 2, max_position_embeddings: 256,
  });
  /** Weight scales that keep activations near unit size (non-degenerate greedy tokens). */
  const scaleFor = (t: TensorLocation) => (t.shape.length === 1 ? 1.0 : t.name.includes('embed_tokens') || t.name.includes('lm_head') ? 1.0 : 0.25);
  const ALL = [0, 1, 2, 3];
  let rt: Runtime;
  let hmm: Hmm;
  let views: Map<number, MappedKvPool>;
  const forwards: ForwardEngine[] = [];

  beforeAll(async () => {
    rt = openMock({ mockCapacity: 128 * MIB });
    hmm = new Hmm(rt);
    await hmm.loadSynthetic(weightSpecs(config, ALL, () => ALL), { seed: 7n, scaleFor });
    const { blockBytes } = kvGeometry(config, 16);
    // Devices 0, 1: the engine's two DP ranks; 2: a pool too small for all requests at once; 3: the baseline.
    for (const [d, blocks] of [[0, 64], [1, 64], [2, 5], [3, 64]] as const) hmm.kv.createPool({ device: d, blockBytes, blocks });
    views = mapHmmKvPools(rt, hmm, ALL);
  });
  afterAll(() => {
    for (const f of forwards) f.dispose();
    for (const v of views.values()) v.dispose();
    hmm.dispose();
    rt.dispose();
  });

  const forward = async (devices: number[], maxTokensPerStep: number) => {
    const f = await ForwardEngine.create(rt, config, { devices, placement: roundRobinPlacement(config.experts, devices) }, storeWeights(hmm.store),
      new Map(devices.map((d) => [d, views.get(d)!])), { maxTokensPerStep });
    forwards.push(f);
    return f;
  };

  /** One sequence alone on device 3: the whole prompt in one step, then one token per step. */
  async function baseline(f: ForwardEngine, prompt: number[], n: number): Promise<number[]> {
    const id = `baseline-${prompt.join('.')}`;
    const blocks = hmm.kv.allocate(id, 3, Math.ceil((prompt.length + n) / 16));
    try {
      const out: number[] = [];
      let tokens = prompt;
      let pos = 0;
      while (out.length < n) {
        const r = await f.step({ ranks: [[{ seqId: id, tokens, startPos: pos, blockTable: blocks, sample: true }]] });
        pos += tokens.length;
        out.push(r.next.get(id)!);
        tokens = [out[out.length - 1]!];
      }
      return out;
    } finally {
      hmm.kv.free(id);
    }
  }

  async function baselines(prompts: number[][]): Promise<number[][]> {
    const f = await forward([3], 64);
    const out: number[][] = [];
    for (const [i, p] of prompts.entries()) out.push(await baseline(f, p, MAX[i]!));
    return out;
  }

  const PROMPTS = [
    [5, 17, 33, 2, 90],
    Array.from({ length: 40 }, (_, i) => (i * 13 + 3) % 97),
    [42, 7, 64],
    Array.from({ length: 23 }, (_, i) => (i * 29 + 11) % 97),
    [1, 96, 50, 3, 77, 8, 29, 61],
    [60],
  ];
  const MAX = [12, 9, 16, 10, 14, 11];

  it('serves concurrent requests over 2 DP ranks with chunked prefill: tokens identical to one sequence alone', async () => {
    const want = await baselines(PROMPTS);
    expect(new Set(want.flat()).size).toBeGreaterThan(5); // not degenerate: the comparison means something
    const steps: StepFigures[] = [];
    const engine = new Engine({
      stepper: await forward([0, 1], 16), kv: hmm.kv, devices: [0, 1], blockTokens: 16, maxTokensPerStep: 16,
      maxSeqLen: config.maxPositions, vocabSize: config.vocabSize, onStep: (f) => steps.push(f),
    });
    const got = await Promise.all(PROMPTS.map((prompt, i) => engine.submit({ prompt, maxTokens: MAX[i]!, ignoreEos: true })));
    got.forEach((c, i) => {
      expect(c.finishReason).toBe('length');
      expect(c.outputTokens, `request ${i}`).toEqual(want[i]);
    });
    expect(new Set(got.map((c) => c.rank))).toEqual(new Set([0, 1]));
    expect(steps.some((f) => f.prefillTokens > 0 && f.decodeTokens > 0)).toBe(true);
    expect(Math.max(...steps.map((f) => Math.max(...f.rankSeqs)))).toBeGreaterThan(1);
    expect(hmm.kv.info(0).freeBlocks).toBe(64);
    expect(hmm.kv.info(1).freeBlocks).toBe(64);
  });

  it('recomputes sequences that lost their KV blocks on a small pool: the same tokens', async () => {
    // Five 15-token prompts take the 5 blocks; each needs a second block at its second token.
    const prompts = Array.from({ length: 5 }, (_, k) => Array.from({ length: 15 }, (_, i) => (i * 7 + k * 31 + 1) % 97));
    const f = await forward([3], 64);
    const want: number[][] = [];
    for (const p of prompts) want.push(await baseline(f, p, 10));
    // Without pool figures admission is optimistic: decodes run out of blocks and preempt (recompute) the youngest.
    const kv: KvAllocator = { allocate: (id, d, n) => hmm.kv.allocate(id, d, n), free: (id) => hmm.kv.free(id) };
    const engine = new Engine({ stepper: await forward([2], 16), kv, devices: [2], blockTokens: 16, maxTokensPerStep: 16 });
    const got = await Promise.all(prompts.map((prompt) => engine.submit({ prompt, maxTokens: 10, ignoreEos: true })));
    got.forEach((c, i) => expect(c.outputTokens, `request ${i}`).toEqual(want[i]));
    expect(engine.stats().preemptions).toBeGreaterThan(0);
    expect(hmm.kv.info(2).freeBlocks).toBe(5);
  });
});

// ---- the generate command, in process on the mock

describe('elasticmoe generate', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'emoe-gen-'));
  const TOKENIZER = path.resolve(__dirname, '../fixtures/tokenizer');
  // The fixture tokenizer has 116 ids: the model's vocabulary matches it.
  const raw = {
    model_type: 'qwen3_moe', hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16,
    vocab_size: 116, num_experts: 8, moe_intermediate_size: 32, norm_topk_prob: true, num_experts_per_tok: 2, max_position_embeddings: 128,
    eos_token_id: 115,
  };
  const runtime = { backend: 'mock' as const, mockDevices: 2, mockCapacity: '64MiB' };
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  function sink() {
    let text = '';
    const stream = new Writable({
      write(chunk, _enc, cb) {
        text += String(chunk);
        cb();
      },
    });
    return { stream, text: () => text };
  }

  async function run(o: Omit<GenerateCommandOptions, 'runtime'>) {
    const out = sink();
    const err = sink();
    const code = await runGenerate({ ...o, runtime }, { out: out.stream, err: err.stream });
    return { code, out: out.text(), err: err.text() };
  }

  it('loads a checkpoint and its tokenizer, streams the text, prints the timing line', async () => {
    const model = path.join(dir, 'model');
    mkdirSync(model);
    writeFileSync(path.join(model, 'config.json'), JSON.stringify(raw));
    for (const f of ['tokenizer.json', 'tokenizer_config.json']) copyFileSync(path.join(TOKENIZER, f), path.join(model, f));
    // bf16 weights: norms 1, embeddings and LM head in [-1, 1], the rest in [-0.25, 0.25].
    let x = 12345;
    const tensors = weightShapes(parseConfig(raw)).map((w) => {
      const n = w.shape.reduce((a, b) => a * b, 1);
      const scale = w.shape.length === 1 ? 0 : /embed|lm_head/.test(w.name) ? 1 : 0.25;
      const f = new Float32Array(n);
      for (let i = 0; i < n; i++) {
        x = (x * 1103515245 + 12345) % 2 ** 31;
        f[i] = w.shape.length === 1 ? 1 : ((x / 2 ** 31) * 2 - 1) * scale;
      }
      const u16 = Uint16Array.from(new Uint32Array(f.buffer), (u) => u >>> 16);
      return { name: w.name, dtype: 'bf16' as const, shape: w.shape, data: new Uint8Array(u16.buffer) };
    });
    await writeSafetensors(path.join(model, 'model.safetensors'), tensors);

    const r = await run({ model, devices: '0,1', prompt: 'hello world', chat: true, maxTokens: '8', ignoreEos: true });
    expect(r.err).toMatch(/loading weights\s+100\.0%/);
    expect(r.err).toMatch(/generate: mock, devices 0,1: prompt \d+ tokens, 8 generated \(length\); weights [\d.]+ s; TTFT [\d.]+ ms; [\d.]+ tokens\/s/);
    expect(r.code).toBe(0);
    expect(r.out.endsWith('\n')).toBe(true);

    const j = await run({ model, devices: '1', promptIds: '101,106', maxTokens: '5', ignoreEos: true, json: true });
    const c = JSON.parse(j.out);
    expect(c).toMatchObject({ finishReason: 'length', promptTokens: [101, 106], backend: 'mock', devices: [1] });
    expect(c.outputTokens).toHaveLength(5);
    expect(typeof c.text).toBe('string');
    // The same weights on another layout give the same greedy tokens.
    const k = await run({ model, devices: '0,1', promptIds: '101,106', maxTokens: '5', ignoreEos: true, json: true, kvBlocks: '4' });
    expect(JSON.parse(k.out).outputTokens).toEqual(c.outputTokens);
    expect(JSON.parse(k.out).kvBlocks).toEqual([4, 4]);
  });

  it('runs synthetic weights on prompt ids, and refuses text without a tokenizer', async () => {
    const file = path.join(dir, 'synthetic.json');
    writeFileSync(file, JSON.stringify(raw));
    const r = await run({ synthetic: file, devices: '0,1', promptIds: '1,2,3', maxTokens: '6', ignoreEos: true, seed: '3' });
    expect(r.code).toBe(0);
    expect(r.out.trim().split(' ').map(Number)).toHaveLength(6);
    expect(r.err).toMatch(/synthetic weights\s+100\.0%/);
    await expect(run({ synthetic: file, prompt: 'hello' })).rejects.toThrow(/--prompt must be used with a tokenizer: synthetic weights have none.*--prompt-ids/);
    await expect(run({ model: dir, prompt: 'hello' })).rejects.toThrow(/config\.json/);
    await expect(run({ synthetic: file, promptIds: '1,2,999' })).rejects.toThrow(/--prompt-ids.*below the vocabulary size 116.*999/);
    await expect(run({ synthetic: file, promptIds: '1', maxTokens: '200' })).rejects.toThrow(/--max-tokens must be at most 127/);
  });

  it('--kv-dtype f32: f32 pools and engines, the same tokens on one and two devices; another dtype is refused', async () => {
    const file = path.join(dir, 'synthetic-f32.json');
    writeFileSync(file, JSON.stringify(raw));
    const create = vi.spyOn(ForwardEngine, 'create');
    try {
      const args = { synthetic: file, promptIds: '1,2,3', maxTokens: '6', ignoreEos: true, json: true, seed: '3', kvDtype: 'f32' };
      const one = JSON.parse((await run({ ...args, devices: '1' })).out);
      const two = JSON.parse((await run({ ...args, devices: '0,1' })).out);
      expect(one.kvDtype).toBe('f32');
      expect(one.outputTokens).toHaveLength(6);
      expect(two.outputTokens).toEqual(one.outputTokens);
      // The pools were made for f32 and the engines asked for it (with blockTokens, so a mismatch would be refused).
      expect(create).toHaveBeenCalledTimes(2);
      const f32Block = kvGeometry(parseConfig(raw), 16, 'f32').blockBytes;
      for (const [, , , , views, options] of create.mock.calls) {
        expect(options).toMatchObject({ kvDtype: 'f32', blockTokens: 16 });
        for (const v of views.values()) expect(v.blockBytes).toBe(f32Block);
      }
    } finally {
      create.mockRestore();
    }
    await expect(run({ synthetic: file, promptIds: '1', kvDtype: 'f16' })).rejects.toThrow(/--kv-dtype must be 'bf16' or 'f32'.*got 'f16'/);
  });
});
