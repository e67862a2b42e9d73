// The request engine: continuous batching of generation requests over a
// forward pass (`Stepper`), with chunked prefill, data parallel rank
// assignment, paged KV blocks from the HMM, stop conditions, streaming and
// cancellation.
//
// How one step is built, for each DP rank, within the rank's token budget:
//   1. decode: every running sequence whose prompt is in the KV cache feeds its
//      last sampled token (oldest first);
//   2. prefill: sequences still reading their prompt get the next chunk
//      (oldest first), as much as the remaining budget allows;
//   3. admission: waiting requests (FIFO) join the least loaded rank with room
//      (fewest sequences), allocating the KV blocks of everything they already
//      know (the prompt), and start their first chunk in this same step. When
//      the allocator tells its free blocks (the in-process KvManager does), a
//      request is admitted only if one block per running sequence of the rank
//      stays free afterwards, so admissions rarely force preemptions.
// `maxTokensPerStep` and `maxSeqs` apply to each DP rank (each rank's device
// runs its own attention); the forward pass must accept that many tokens per rank.
// Blocks grow one at a time as decoding crosses a block boundary. When a
// decoding sequence finds its pool exhausted, the youngest running sequence of
// its rank is preempted: its blocks are freed and it goes back to the head of
// the queue, to be recomputed (prompt + what it already generated) when blocks
// free up. Its output so far is kept and never streamed twice. A request that
// could never fit its pool (prompt + maxTokens) is refused at submission.
//
// The loop is one async loop: a step is built, run, and its results applied
// before the next is built. Cancellation (AbortSignal) only marks the request;
// the loop removes it before building the next step and frees its blocks only
// once no step in flight can still write them.
import { ElasticMoeError, InvalidArgumentError } from '../runtime/errors.js';
import { KvExhaustedError } from '../hmm/kv-pool.js';
import type { SeqStep, StepBatch, StepResult } from './types.js';

/** The forward pass as the engine sees it (ForwardEngine satisfies it). */
export interface Stepper {
  step(batch: StepBatch, options?: { returnLogits?: boolean }): Promise<StepResult>;
}

/**
 * KV block allocation. `hmm.kv` (the in-process KvManager) satisfies it as is;
 * `kvAllocatorFromClient` adapts an HmmClient. Blocks are appended to the
 * request's table; `free` returns all of them and is idempotent.
 */
export interface KvAllocator {
  /** Appends `count` blocks on `device` to the request's table, all or nothing; throws KvExhaustedError when the pool lacks them. */
  allocate(id: string, device: number, count: number): number[] | Promise<number[]>;
  free(id: string): void | Promise<void>;
  table?(id: string): { device: number; blocks: number[] } | undefined | null | Promise<{ device: number; blocks: number[] } | undefined | null>;
  /** The device's pool: its size (for the never-fits check) and, when cheap to know, its free blocks (for admission headroom). */
  info?(device: number): { blocks: number; freeBlocks?: number } | Promise<{ blocks: number; freeBlocks?: number }>;
}

/** The HmmClient calls the engine needs (kept structural so the engine does not depend on the client). */
export interface KvClientLike {
  kvAllocate(request: string, device: number, count: number): Promise<number[]>;
  kvFree(request: string): Promise<void>;
  kvTable(request: string): Promise<{ device: number; blocks: number[] } | null>;
  manifest(): Promise<{ kvPools: Array<{ device: number; blocks: number }> }>;
}

/** A KvAllocator over the HMM daemon's protocol. Pool sizes come from the manifest (read once per device). */
export function kvAllocatorFromClient(client: KvClientLike): KvAllocator {
  const sizes = new Map<number, number>();
  return {
    allocate: (id, device, count) => client.kvAllocate(id, device, count),
    free: (id) => client.kvFree(id),
    table: (id) => client.kvTable(id),
    async info(device) {
      if (!sizes.has(device)) for (const p of (await client.manifest()).kvPools) sizes.set(p.device, p.blocks);
      const blocks = sizes.get(device);
      if (blocks === undefined) throw new InvalidArgumentError('device', `a device with a KV pool (device ${device} has none)`);
      return { blocks };
    },
  };
}

export type FinishReason = 'stop' | 'length' | 'cancelled' | 'error';

export interface GenerationRequest {
  /** Unique among the engine's active requests; also the KV block table's key in the HMM. Default: a generated id. */
  id?: string;
  prompt: number[];
  /** Most tokens to generate (at least 1). */
  maxTokens: number;
  stop?: {
    /** Tokens that end generation (not included in the output). */
    tokenIds?: number[];
    /** Strings that end generation; the output is cut before the first match. Needs the engine's `decode`. */
    strings?: string[];
  };
  /** Ignore the model's EOS ids (generate exactly maxTokens unless another stop matches). */
  ignoreEos?: boolean;
}

export interface GenerationCallbacks {
  /**
   * Each output token once, in order. `text` is the text it releases (with a
   * detokenizer): the concatenation of every `text` equals the completion's
   * text. Tokens that might start a stop string are held back until decided;
   * tokens cut by a stop string are never reported.
   */
  onToken?(token: number, text?: string): void;
  signal?: AbortSignal;
}

export interface Completion {
  id: string;
  promptTokens: number[];
  outputTokens: number[];
  /** Decoded output (with a detokenizer), cut before a matched stop string. */
  text?: string;
  finishReason: FinishReason;
  /** The EOS / stop token id or the stop string that ended it (finishReason 'stop'). */
  stopReason?: number | string;
  /** What went wrong (finishReason 'error'). */
  error?: string;
  /** The DP rank that ran it (undefined when it never ran). */
  rank?: number;
  /** Times it lost its KV blocks and was recomputed. */
  preemptions: number;
  timings: {
    /** Submission to first admission. */
    queuedMs: number;
    /** Submission to first output token (null when none came). */
    ttftMs: number | null;
    /** Mean time per output token after the first (null with fewer than 2). */
    tpotMs: number | null;
    totalMs: number;
  };
}

export interface StepFigures {
  step: number;
  batchSeqs: number;
  tokens: number;
  prefillTokens: number;
  decodeTokens: number;
  /** Wall time of the step call. */
  ms: number;
  /** The forward pass's own time (for an executor process, inside it: ms less this is the round trip's). */
  forwardMs: number;
  /** Sequences per DP rank. */
  rankSeqs: number[];
}

export interface EngineStats {
  waiting: number;
  running: number;
  requestsDone: number;
  requestsCancelled: number;
  requestsFailed: number;
  tokensOut: number;
  promptTokens: number;
  steps: number;
  preemptions: number;
  /** Steps run again on a replacement forward pass after theirs failed (EngineOptions.recover). */
  recoveries: number;
}

/** How many times in a row one step is run again on a replacement (EngineOptions.recover). */
const MAX_RECOVERIES = 2;

export interface EngineOptions {
  stepper: Stepper;
  kv: KvAllocator;
  /** Device of each DP rank (layout.devices); KV blocks of a rank's sequences live there. */
  devices: readonly number[];
  /** Tokens per KV block (kvGeometry(config).blockTokens). */
  blockTokens: number;
  /** Token budget of one step on each DP rank (default 512). */
  maxTokensPerStep?: number;
  /** Most sequences running at once on each DP rank (default 64). */
  maxSeqs?: number;
  /** Model EOS ids (config.eosTokenIds). */
  eosTokenIds?: readonly number[];
  /** Detokenizer: needed for stop strings and for text in completions and onToken. */
  decode?: (tokens: number[]) => string;
  /** Longest sequence (prompt + maxTokens) the model takes (config.maxPositions). */
  maxSeqLen?: number;
  /** Token ids must be below this (config.vocabSize). */
  vocabSize?: number;
  onStep?: (figures: StepFigures) => void;
  /**
   * Called when a step fails, with the error and the forward pass it failed on: a forward pass it
   * resolves with (one replacing an executor process that died) runs the same step again, with the
   * same KV blocks (a step rewrites only its own positions, so running it again gives the same
   * tokens), at most MAX_RECOVERIES times in a row; undefined, or a rejection, fails the step's
   * requests with the error, as without it.
   */
  recover?: (error: unknown, failed: Stepper) => Promise<Stepper | undefined>;
}

export class EngineClosedError extends ElasticMoeError {}

/**
 * A new forward pass and rank→device assignment for `Engine.reconfigure` (the
 * scaling switch-over).
 */
export interface EngineReconfiguration {
  /** The forward pass to run from the next step on (the new layout's). */
  stepper: Stepper;
  /** Device of each DP rank from the next step on. */
  devices: readonly number[];
  /**
   * Moves a request's KV blocks to `toDevice` and returns its new block table
   * (`(id, d) => hmm.kv.move(id, d).then((t) => t.blocks)`). Used for running
   * sequences whose device is not in `devices`; without it, or when it fails,
   * such a sequence is preempted and recomputed on a remaining rank.
   */
  move?: (id: string, toDevice: number) => Promise<number[]> | number[];
  /**
   * Also move running sequences between the ranks that stay or join, with `move`, until no two
   * ranks run more than one sequence apart: a rank the change adds starts with its share of the
   * batch instead of growing into it from the waiting requests (default false). The sequences
   * holding the fewest KV blocks move first (the least to copy); a failed move leaves its
   * sequence where it was and ends the balancing.
   */
  balance?: boolean;
}

/** What a switch-over did to the running sequences. */
export interface ReconfigureReport {
  /** Running sequences whose device stayed: their KV blocks were kept in place. */
  kept: number;
  /** Running sequences whose KV blocks were moved off a leaving device. */
  moved: number;
  /** Running sequences that could not be moved and were put back in the queue (to be recomputed). */
  requeued: number;
  /** Requests waiting at the switch-over (they are admitted on the new ranks). */
  waiting: number;
  /** Running sequences moved between remaining ranks to balance them (EngineReconfiguration.balance). */
  balanced: number;
}

/** Prompt tokens kept before the output as context for incremental detokenization. */
const DETOK_CONTEXT = 5;
const REPLACEMENT = '\uFFFD';

/** Output text of one sequence, built incrementally (a small window decoded per token). */
class Detokenizer {
  private readonly ids: number[];
  private prefixOffset = 0;
  private readOffset: number;
  text = '';
  /** text.length after each output token. */
  readonly ends: number[] = [];

  constructor(private readonly decode: (t: number[]) => string, prompt: readonly number[]) {
    this.ids = prompt.slice(-DETOK_CONTEXT);
    this.readOffset = this.ids.length;
  }

  /** Adds one output token; returns the text it completes ('' while a character is incomplete). */
  push(token: number): string {
    this.ids.push(token);
    const prefix = this.decode(this.ids.slice(this.prefixOffset, this.readOffset));
    const full = this.decode(this.ids.slice(this.prefixOffset));
    let delta = '';
    if (full.length > prefix.length && !full.endsWith(REPLACEMENT)) {
      delta = full.slice(prefix.length);
      this.prefixOffset = this.readOffset;
      this.readOffset = this.ids.length;
    }
    this.text += delta;
    this.ends.push(this.text.length);
    return delta;
  }

  /** Text not yet released (an incomplete character at the end), for the final output. */
  tail(): string {
    const prefix = this.decode(this.ids.slice(this.prefixOffset, this.readOffset));
    const full = this.decode(this.ids.slice(this.prefixOffset));
    return full.length > prefix.length ? full.slice(prefix.length) : '';
  }
}

type SeqState = 'waiting' | 'running' | 'done';

class Seq {
  state: SeqState = 'waiting';
  /** Prompt followed by output: what the KV cache must eventually hold. */
  readonly tokens: number[];
  readonly output: number[] = [];
  /** Tokens already in the KV cache. */
  computed = 0;
  /** Whether the tokens known at (re)admission are all in the KV cache (decoding). */
  prefilled = false;
  blockTable: number[] = [];
  rank: number | undefined;
  /** Admission order (for oldest-first scheduling and youngest-first preemption). */
  admitOrder = -1;
  cancelled = false;
  /** Set when the request must end with an error at the next reap (a callback threw). */
  failure: string | undefined;
  preemptions = 0;
  readonly submitted = performance.now();
  admitted: number | undefined;
  firstToken: number | undefined;
  lastToken: number | undefined;
  detok: Detokenizer | undefined;
  /** Output tokens already reported through onToken, and the text they carried. */
  emitted = 0;
  emittedChars = 0;
  detach: (() => void) | undefined;

  constructor(
    readonly id: string,
    readonly order: number,
    readonly req: GenerationRequest,
    readonly callbacks: GenerationCallbacks,
    readonly stopIds: ReadonlySet<number>,
    readonly stopStrings: readonly string[],
    readonly resolve: (c: Completion) => void,
    decode: ((t: number[]) => string) | undefined,
  ) {
    this.tokens = [...req.prompt];
    if (decode) this.detok = new Detokenizer(decode, req.prompt);
  }
}

interface Entry {
  seq: Seq;
  step: SeqStep;
  decode: boolean;
}

const isExhausted = (e: unknown) => e instanceof KvExhaustedError
  || (e instanceof ElasticMoeError && e.code === 'OUT_OF_MEMORY' && e.name === 'KvExhaustedError');

const message = (e: unknown) => (e instanceof Error ? e.message : String(e));

function checkCount(name: string, v: number, min = 1): number {
  if (!Number.isSafeInteger(v) || v < min) throw new InvalidArgumentError(name, `an integer >= ${min} (got ${v})`);
  return v;
}

export class Engine {
  private stepper: Stepper;
  private readonly kv: KvAllocator;
  private devices: readonly number[];
  private readonly blockTokens: number;
  private readonly maxTokensPerStep: number;
  private readonly maxSeqs: number;
  private readonly eos: readonly number[];
  private readonly decode: ((t: number[]) => string) | undefined;
  private readonly maxSeqLen: number | undefined;
  private readonly vocabSize: number | undefined;
  private readonly onStep: ((f: StepFigures) => void) | undefined;

  /** Waiting requests in submission order (preempted ones go back to their place). */
  private waiting: Seq[] = [];
  private running: Seq[] = [];
  private readonly active = new Map<string, Seq>();
  private readonly capacity = new Map<number, number>();
  private counter = 0;
  private orderCounter = 0;
  private admitCounter = 0;
  private stepCounter = 0;
  private loop: Promise<void> | undefined;
  private wake: (() => void) | undefined;
  private closed = false;
  /** Callers of afterNextStep, resolved when a step ends or the loop stops. */
  private readonly stepWaiters: Array<() => void> = [];
  /** A switch-over waiting for the next step boundary (see reconfigure). */
  private pendingReconfigure:
    | { change: EngineReconfiguration; resolve: (r: ReconfigureReport) => void; reject: (e: unknown) => void }
    | undefined;
  private readonly counters = { requestsDone: 0, requestsCancelled: 0, requestsFailed: 0, tokensOut: 0, promptTokens: 0, preemptions: 0, recoveries: 0 };
  private readonly recover: EngineOptions['recover'];

  constructor(options: EngineOptions) {
    this.stepper = options.stepper;
    this.recover = options.recover;
    this.kv = options.kv;
    if (options.devices.length === 0) throw new InvalidArgumentError('devices', 'at least one device (one per DP rank)');
    this.devices = [...options.devices];
    this.blockTokens = checkCount('blockTokens', options.blockTokens);
    this.maxTokensPerStep = checkCount('maxTokensPerStep', options.maxTokensPerStep ?? 512);
    this.maxSeqs = checkCount('maxSeqs', options.maxSeqs ?? 64);
    this.eos = [...(options.eosTokenIds ?? [])];
    this.decode = options.decode;
    this.maxSeqLen = options.maxSeqLen;
    this.vocabSize = options.vocabSize;
    this.onStep = options.onStep;
  }

  get ranks(): number {
    return this.devices.length;
  }

  /** Device of each DP rank. */
  get rankDevices(): readonly number[] {
    return [...this.devices];
  }

  /**
   * Switches to another forward pass and rank→device assignment (the scaling
   * switch-over), applied between two steps: the step in flight, if any, finishes
   * on the old stepper and the next one is built for the new ranks. Running
   * sequences whose device stays keep their KV blocks in place (rank index
   * remapped); those on a leaving device get their blocks moved with
   * `change.move` to the least loaded new rank before the first new step (or,
   * if that fails, are preempted and recomputed: never dropped, never duplicated).
   * Waiting requests and new submissions are admitted on the new ranks. Resolves
   * once applied: from then on the old stepper is never called again. Rejects,
   * changing nothing, for an invalid change or while another is pending.
   */
  reconfigure(change: EngineReconfiguration): Promise<ReconfigureReport> {
    const devices = change.devices;
    if (!Array.isArray(devices) || devices.length === 0) {
      return Promise.reject(new InvalidArgumentError('devices', 'at least one device (one per DP rank)'));
    }
    if (new Set(devices).size !== devices.length || devices.some((d) => !Number.isSafeInteger(d) || d < 0)) {
      return Promise.reject(new InvalidArgumentError('devices', `distinct device ordinals (got ${devices.join(', ')})`));
    }
    if (this.pendingReconfigure) {
      return Promise.reject(new InvalidArgumentError('reconfigure', 'called once the previous reconfiguration has been applied'));
    }
    return new Promise<ReconfigureReport>((resolve, reject) => {
      this.pendingReconfigure = { change: { ...change, devices: [...devices] }, resolve, reject };
      this.kick(); // an idle loop starts, applies it and stops again
    });
  }

  stats(): EngineStats {
    return { waiting: this.waiting.length, running: this.running.length, steps: this.stepCounter, ...this.counters };
  }

  /**
   * Queues a request; resolves once it has finished (stop, length, cancelled or
   * error). Rejects at once, before queuing, when the request is invalid or
   * could never fit its KV pool.
   */
  async submit(request: GenerationRequest, callbacks: GenerationCallbacks = {}): Promise<Completion> {
    if (this.closed) throw new EngineClosedError('INVALID_ARGUMENT', 'the engine is closed');
    const id = request.id ?? `req-${++this.counter}`;
    this.validate(id, request);
    const need = this.blocksFor(request.prompt.length + request.maxTokens - 1);
    const fits = await this.fittingRanks(need);
    if (fits.length === 0) {
      const sizes = this.devices.map((d) => this.capacity.get(d));
      throw new InvalidArgumentError('request', `a request that fits a KV pool: ${request.id ?? id} needs ${need} blocks `
        + `of ${this.blockTokens} tokens (prompt ${request.prompt.length} + maxTokens ${request.maxTokens}), `
        + `the pools hold ${sizes.join(', ')} blocks`);
    }
    if (this.closed) throw new EngineClosedError('INVALID_ARGUMENT', 'the engine is closed');
    if (this.active.has(id)) throw new InvalidArgumentError('id', `a request id not already active ('${id}' is)`);
    const stop = request.stop ?? {};
    const stopIds = new Set<number>([...(request.ignoreEos ? [] : this.eos), ...(stop.tokenIds ?? [])]);
    return new Promise<Completion>((resolve) => {
      const seq = new Seq(id, ++this.orderCounter, request, callbacks, stopIds, stop.strings ?? [], resolve, this.decode);
      const { signal } = callbacks;
      if (signal?.aborted) {
        seq.cancelled = true;
        this.active.set(id, seq);
        void this.finish(seq, 'cancelled');
        return;
      }
      if (signal) {
        const onAbort = () => {
          seq.cancelled = true;
          this.kick();
        };
        signal.addEventListener('abort', onAbort, { once: true });
        seq.detach = () => signal.removeEventListener('abort', onAbort);
      }
      this.active.set(id, seq);
      this.counters.promptTokens += request.prompt.length;
      this.waiting.push(seq);
      this.kick();
    });
  }

  /** Resolves once every queued and running request has finished. */
  async drain(): Promise<void> {
    while (this.loop) await this.loop;
  }

  /** Refuses new requests, cancels the queued and running ones (freeing their blocks) and waits for the loop to stop. */
  async close(): Promise<void> {
    this.closed = true;
    for (const s of [...this.waiting, ...this.running]) s.cancelled = true;
    this.kick();
    await this.drain();
  }

  // ---- submission checks

  private validate(id: string, r: GenerationRequest): void {
    if (typeof id !== 'string' || id.length === 0 || id.length > 1024) throw new InvalidArgumentError('id', 'a string of 1 to 1024 characters');
    if (!Array.isArray(r.prompt) || r.prompt.length === 0) throw new InvalidArgumentError('prompt', 'at least one token');
    const bad = r.prompt.findIndex((t) => !Number.isSafeInteger(t) || t < 0 || (this.vocabSize !== undefined && t >= this.vocabSize));
    if (bad >= 0) {
      throw new InvalidArgumentError(`prompt[${bad}]`, `a token id in 0..${this.vocabSize === undefined ? 'N' : this.vocabSize - 1} (got ${r.prompt[bad]})`);
    }
    checkCount('maxTokens', r.maxTokens);
    if (this.maxSeqLen !== undefined && r.prompt.length + r.maxTokens > this.maxSeqLen) {
      throw new InvalidArgumentError('maxTokens', `at most ${this.maxSeqLen - r.prompt.length} (prompt ${r.prompt.length} + maxTokens ${r.maxTokens} exceeds the model's ${this.maxSeqLen} positions)`);
    }
    const strings = r.stop?.strings ?? [];
    if (strings.length > 0 && !this.decode) throw new InvalidArgumentError('stop.strings', 'used only with a detokenizer (the engine has no decode)');
    if (strings.some((s) => typeof s !== 'string' || s.length === 0)) throw new InvalidArgumentError('stop.strings', 'non-empty strings');
    if ((r.stop?.tokenIds ?? []).some((t) => !Number.isSafeInteger(t))) throw new InvalidArgumentError('stop.tokenIds', 'integers');
  }

  private blocksFor(tokens: number): number {
    return Math.ceil(tokens / this.blockTokens);
  }

  /** Pool size of a device, asked once (undefined when the allocator cannot say). */
  private async poolBlocks(device: number): Promise<number | undefined> {
    if (!this.kv.info) return undefined;
    let blocks = this.capacity.get(device);
    if (blocks === undefined) {
      blocks = (await this.kv.info(device)).blocks;
      this.capacity.set(device, blocks);
    }
    return blocks;
  }

  private async fittingRanks(need: number): Promise<number[]> {
    // A switch-over applied during the awaits below (reconfigure) may remove a device and its pool: ask again.
    for (;;) {
      const devices = this.devices;
      const out: number[] = [];
      try {
        for (const [r, d] of devices.entries()) {
          const blocks = await this.poolBlocks(d);
          if (blocks === undefined || blocks >= need) out.push(r);
        }
      } catch (e) {
        if (devices !== this.devices) continue;
        throw e;
      }
      if (devices === this.devices) return out;
    }
  }

  // ---- the loop

  /**
   * Resolves once the engine has finished its next step (on whatever stepper it has then),
   * or as soon as it has no step to run (idle, or queued work waiting for KV blocks): the
   * scale orchestrator frees the old layout only after the first step on the new one, so the
   * release never delays that step, and never waits on a step that cannot come.
   */
  afterNextStep(): Promise<void> {
    if (!this.loop) return Promise.resolve();
    return new Promise<void>((resolve) => this.stepWaiters.push(resolve));
  }

  private settleStepWaiters(): void {
    const ws = this.stepWaiters.splice(0);
    for (const w of ws) w();
  }

  private kick(): void {
    if (this.wake) {
      const w = this.wake;
      this.wake = undefined;
      w();
    }
    if (!this.loop) {
      this.loop = this.run().finally(() => {
        this.loop = undefined;
        this.settleStepWaiters(); // idle: no step is coming
        // Work that arrived while the loop was ending.
        if (this.waiting.length > 0 || this.running.length > 0) this.kick();
      });
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.wake = undefined;
        resolve();
      }, ms);
      this.wake = () => {
        clearTimeout(t);
        resolve();
      };
    });
  }

  private async run(): Promise<void> {
    let backoff = 1;
    while (true) {
      // Let the event loop turn between steps (timers, sockets, submissions made meanwhile join this step).
      await new Promise<void>((resolve) => setImmediate(resolve));
      try {
        // A step boundary: no step is in flight, so a switch-over is safe here.
        if (this.pendingReconfigure) await this.applyReconfigure();
        await this.reap();
        if (this.waiting.length === 0 && this.running.length === 0) return;
        const entries = await this.schedule();
        if (entries.length === 0) {
          // No step is coming now: whoever waits for the next one (afterNextStep) goes on.
          this.settleStepWaiters();
          // Queued work, but no KV blocks to admit it (they are held outside this engine): poll until some free.
          await this.sleep(backoff);
          backoff = Math.min(backoff * 2, 100);
          continue;
        }
        backoff = 1;
        await this.runStep(entries);
        this.settleStepWaiters();
      } catch (e) {
        // A bug in the engine itself: fail everything rather than hang.
        for (const s of [...this.running, ...this.waiting]) {
          await this.finish(s, 'error', `engine error: ${message(e)}`).catch(() => undefined);
        }
      }
    }
  }

  /** Applies the pending switch-over (between two steps; see reconfigure). */
  private async applyReconfigure(): Promise<void> {
    const pending = this.pendingReconfigure!;
    this.pendingReconfigure = undefined;
    const { change } = pending;
    const from = this.devices;
    const to = change.devices;
    const rankOn = (rank: number | undefined) => (rank === undefined ? -1 : to.indexOf(from[rank]!));
    const report: ReconfigureReport = { kept: 0, moved: 0, requeued: 0, waiting: 0, balanced: 0 };
    try {
      // Sequences whose device stays keep their blocks; count them per new rank first.
      const load = to.map(() => 0);
      const leaving: Seq[] = [];
      for (const s of this.running) {
        const r = rankOn(s.rank);
        if (r >= 0) {
          s.rank = r;
          load[r]!++;
          report.kept++;
        } else {
          leaving.push(s);
        }
      }
      // Sequences on leaving devices, oldest first: KV blocks moved to the least loaded new rank.
      leaving.sort((a, b) => a.admitOrder - b.admitOrder);
      for (const s of leaving) {
        if (s.failure !== undefined || s.cancelled) {
          // Ending anyway: free its blocks now, before the device leaves.
          await this.finish(s, s.failure !== undefined ? 'error' : 'cancelled', s.failure);
          continue;
        }
        let target = 0;
        for (let r = 1; r < to.length; r++) if (load[r]! < load[target]!) target = r;
        let blocks: number[] | undefined;
        if (change.move) {
          try {
            blocks = [...(await change.move(s.id, to[target]!))];
          } catch {
            blocks = undefined; // recomputed below: slower, never wrong
          }
        }
        if (blocks) {
          s.blockTable = blocks;
          s.rank = target;
          load[target]!++;
          report.moved++;
          continue;
        }
        try {
          await this.preempt(s); // back to the queue with its old rank index, remapped below
          report.requeued++;
        } catch (e) {
          await this.finish(s, 'error', `switch-over: freeing KV blocks failed: ${message(e)}`);
        }
      }
      if (change.balance && change.move) await this.balance(change.move, to, load, report);
      // Waiting requests (preempted ones keep a rank): the same rank's new index, or any rank when it left.
      for (const s of this.waiting) {
        const r = rankOn(s.rank);
        s.rank = r >= 0 ? r : undefined;
      }
      report.waiting = this.waiting.length;
      for (const d of [...this.capacity.keys()]) if (!to.includes(d)) this.capacity.delete(d);
      this.stepper = change.stepper;
      this.devices = [...to];
    } catch (e) {
      pending.reject(e);
      throw e;
    }
    pending.resolve(report);
  }

  /** EngineReconfiguration.balance: `load` is the running sequences per new rank, updated as they move. */
  private async balance(move: NonNullable<EngineReconfiguration['move']>, to: readonly number[], load: number[], report: ReconfigureReport): Promise<void> {
    for (;;) {
      let hi = 0;
      let lo = 0;
      for (let r = 1; r < to.length; r++) {
        if (load[r]! > load[hi]!) hi = r;
        if (load[r]! < load[lo]!) lo = r;
      }
      if (load[hi]! - load[lo]! <= 1) return;
      let pick: Seq | undefined;
      for (const s of this.running) {
        if (s.rank !== hi || s.failure !== undefined || s.cancelled || s.blockTable.length === 0) continue;
        if (!pick || s.blockTable.length < pick.blockTable.length) pick = s;
      }
      if (!pick) return;
      try {
        pick.blockTable = [...(await move(pick.id, to[lo]!))];
      } catch {
        return; // its blocks stay where they were (a move is all or nothing): still correct, less balanced
      }
      pick.rank = lo;
      load[hi]!--;
      load[lo]!++;
      report.balanced++;
    }
  }

  /** Removes cancelled (and failed) requests, freeing their blocks. */
  private async reap(): Promise<void> {
    for (const s of [...this.waiting, ...this.running]) {
      if (s.failure !== undefined) await this.finish(s, 'error', s.failure);
      else if (s.cancelled) await this.finish(s, 'cancelled');
    }
  }

  /** Calls onToken; a callback that throws ends its request with an error (never the loop). */
  private emit(seq: Seq, token: number, text?: string): void {
    const onToken = seq.callbacks.onToken;
    if (!onToken || seq.failure !== undefined) return;
    try {
      if (text === undefined) onToken(token);
      else onToken(token, text);
    } catch (e) {
      seq.failure = `onToken threw: ${message(e)}`;
      this.kick();
    }
  }

  /** Makes the sequence's table cover `tokens`; false when the pool is exhausted. Throws other allocator errors. */
  private async grow(seq: Seq, tokens: number): Promise<boolean> {
    const need = this.blocksFor(tokens) - seq.blockTable.length;
    if (need <= 0) return true;
    try {
      const got = await this.kv.allocate(seq.id, this.devices[seq.rank!]!, need);
      seq.blockTable.push(...got);
      return true;
    } catch (e) {
      if (isExhausted(e)) return false;
      throw e;
    }
  }

  /** Frees a running sequence's blocks and puts it back in the queue, to be recomputed. */
  private async preempt(seq: Seq): Promise<void> {
    this.running = this.running.filter((s) => s !== seq);
    await this.kv.free(seq.id);
    seq.blockTable = [];
    seq.computed = 0;
    seq.prefilled = false;
    seq.state = 'waiting';
    seq.preemptions++;
    this.counters.preemptions++;
    const at = this.waiting.findIndex((s) => s.order > seq.order);
    if (at < 0) this.waiting.push(seq);
    else this.waiting.splice(at, 0, seq);
  }

  private async schedule(): Promise<Entry[]> {
    const entries: Entry[] = [];
    const scheduled = new Set<Seq>();
    const budget = this.devices.map(() => this.maxTokensPerStep);
    const add = (seq: Seq, n: number, decode: boolean) => {
      const start = seq.computed;
      entries.push({
        seq,
        decode,
        step: {
          seqId: seq.id,
          tokens: seq.tokens.slice(start, start + n),
          startPos: start,
          blockTable: [...seq.blockTable],
          sample: start + n === seq.tokens.length,
        },
      });
      scheduled.add(seq);
      budget[seq.rank!]! -= n;
    };

    for (let r = 0; r < this.devices.length; r++) {
      const mine = () => this.running.filter((s) => s.rank === r).sort((a, b) => a.admitOrder - b.admitOrder);
      // 1. decode, oldest first; a sequence that cannot grow preempts the youngest unscheduled one (maybe itself).
      for (const seq of mine().filter((s) => s.prefilled)) {
        if (budget[r]! <= 0) break;
        if (seq.state !== 'running') continue; // preempted by an older sequence below
        let ok = false;
        try {
          while (!(ok = await this.grow(seq, seq.computed + 1))) {
            const victim = mine().filter((s) => !scheduled.has(s)).pop()!;
            await this.preempt(victim);
            if (victim === seq) break;
          }
        } catch (e) {
          await this.finish(seq, 'error', `KV allocation failed: ${message(e)}`);
          continue;
        }
        if (ok) add(seq, 1, true);
      }
      // 2. prefill chunks, oldest first (their blocks were allocated at admission).
      for (const seq of mine().filter((s) => !s.prefilled)) {
        if (budget[r]! <= 0) break;
        const n = Math.min(seq.tokens.length - seq.computed, budget[r]!);
        try {
          if (!(await this.grow(seq, seq.computed + n))) continue;
        } catch (e) {
          await this.finish(seq, 'error', `KV allocation failed: ${message(e)}`);
          continue;
        }
        add(seq, n, false);
      }
    }

    // 3. admission, FIFO; a rank whose pool cannot take the head request takes no later one this step.
    const closedRanks = new Set<number>();
    for (const seq of [...this.waiting]) {
      if (seq.cancelled) continue;
      const rank = await this.pickRank(seq, budget, closedRanks);
      if (rank === undefined) {
        if (seq.rank === undefined) break; // no rank has room: later requests wait their turn
        continue; // a preempted request waits for its own rank; others may still go elsewhere
      }
      const admitted = await this.admit(seq, rank);
      if (admitted === 'exhausted') {
        closedRanks.add(rank);
        if (closedRanks.size === this.devices.length) break;
        continue;
      }
      if (admitted === 'failed') continue;
      add(seq, Math.min(seq.tokens.length, budget[rank]!), false);
    }
    return entries;
  }

  /** The least loaded rank with room for the sequence (its own rank when it has one). */
  private async pickRank(seq: Seq, budget: number[], closedRanks: ReadonlySet<number>): Promise<number | undefined> {
    const need = this.blocksFor(seq.req.prompt.length + seq.req.maxTokens - 1);
    const candidates = seq.rank !== undefined ? [seq.rank] : [...this.devices.keys()];
    let best: number | undefined;
    let bestLoad = Infinity;
    for (const r of candidates) {
      if (closedRanks.has(r) || budget[r]! <= 0) continue;
      const load = this.running.filter((s) => s.rank === r).length;
      if (load >= this.maxSeqs) continue;
      const blocks = await this.poolBlocks(this.devices[r]!);
      if (blocks !== undefined && blocks < need) continue;
      if (load < bestLoad || (load === bestLoad && budget[r]! > budget[best!]!)) {
        best = r;
        bestLoad = load;
      }
    }
    return best;
  }

  /** Allocates the blocks of every known token and moves the sequence to running. */
  private async admit(seq: Seq, rank: number): Promise<'ok' | 'exhausted' | 'failed'> {
    const device = this.devices[rank]!;
    const need = this.blocksFor(seq.tokens.length);
    // Headroom: leave one block per running sequence of the rank, so admitting does not immediately starve decodes.
    if (this.kv.info) {
      const running = this.running.filter((s) => s.rank === rank).length;
      try {
        const { freeBlocks } = await this.kv.info(device);
        if (freeBlocks !== undefined && freeBlocks < need + running) return 'exhausted';
      } catch (e) {
        await this.finish(seq, 'error', `KV pool of device ${device}: ${message(e)}`);
        return 'failed';
      }
    }
    try {
      seq.blockTable = [...(await this.kv.allocate(seq.id, device, need))];
    } catch (e) {
      if (isExhausted(e)) return 'exhausted';
      await this.finish(seq, 'error', `KV allocation failed: ${message(e)}`);
      return 'failed';
    }
    this.waiting = this.waiting.filter((s) => s !== seq);
    seq.rank = rank;
    seq.state = 'running';
    seq.admitOrder = ++this.admitCounter;
    seq.admitted ??= performance.now();
    this.running.push(seq);
    return 'ok';
  }

  private async runStep(entries: Entry[]): Promise<void> {
    const batch: StepBatch = { ranks: this.devices.map(() => []) };
    for (const e of entries) batch.ranks[e.seq.rank!]!.push(e.step);
    const step = ++this.stepCounter;
    const t0 = performance.now();
    let result: StepResult;
    for (let attempt = 0; ; attempt++) {
      try {
        result = await this.stepper.step(batch);
        break;
      } catch (e) {
        const failed = this.stepper;
        const replacement = this.recover && attempt < MAX_RECOVERIES ? await this.recover(e, failed).catch(() => undefined) : undefined;
        if (replacement) {
          // The same step on the replacement (a reconfigure cannot come between: the loop is here).
          this.stepper = replacement;
          this.counters.recoveries++;
          continue;
        }
        const why = `step ${step} failed: ${message(e)}`;
        for (const { seq } of entries) if (seq.state !== 'done') await this.finish(seq, 'error', why);
        return;
      }
    }
    const ms = performance.now() - t0;
    let prefillTokens = 0;
    let decodeTokens = 0;
    for (const e of entries) {
      if (e.decode) decodeTokens += e.step.tokens.length;
      else prefillTokens += e.step.tokens.length;
    }
    this.onStep?.({
      step,
      batchSeqs: entries.length,
      tokens: prefillTokens + decodeTokens,
      prefillTokens,
      decodeTokens,
      ms,
      forwardMs: result.ms,
      rankSeqs: batch.ranks.map((r) => r.length),
    });
    const now = performance.now();
    for (const { seq, step: s } of entries) {
      if (seq.state !== 'running') continue;
      seq.computed = s.startPos + s.tokens.length;
      if (!s.sample) continue;
      if (seq.cancelled || seq.failure !== undefined) continue; // the reaper finishes it before the next step
      const token = result.next.get(seq.id);
      if (token === undefined || !Number.isSafeInteger(token)) {
        await this.finish(seq, 'error', `step ${step} returned no token for ${seq.id}`);
        continue;
      }
      seq.prefilled = true;
      await this.accept(seq, token, now);
    }
  }

  /** Applies one sampled token: stop checks, output, streaming. */
  private async accept(seq: Seq, token: number, now: number): Promise<void> {
    // The sampled token after a recompute continues the output: it is new.
    seq.firstToken ??= now;
    seq.lastToken = now;
    if (seq.stopIds.has(token)) {
      await this.finish(seq, 'stop', undefined, token);
      return;
    }
    seq.output.push(token);
    seq.tokens.push(token);
    this.counters.tokensOut++;
    const d = seq.detok;
    if (d) {
      const before = d.text.length;
      try {
        d.push(token);
      } catch (e) {
        await this.finish(seq, 'error', `detokenizer failed: ${message(e)}`);
        return;
      }
      if (seq.stopStrings.length > 0) {
        const maxLen = Math.max(...seq.stopStrings.map((s) => s.length));
        const from = Math.max(0, before - maxLen + 1);
        let at = -1;
        let which = '';
        for (const s of seq.stopStrings) {
          const i = d.text.indexOf(s, from);
          if (i >= 0 && (at < 0 || i < at)) {
            at = i;
            which = s;
          }
        }
        if (at >= 0) {
          await this.finish(seq, 'stop', undefined, which, at);
          return;
        }
      }
    }
    if (seq.output.length >= seq.req.maxTokens) {
      await this.finish(seq, 'length');
      return;
    }
    this.release(seq);
  }

  /** Reports output tokens no stop string can still take back. */
  private release(seq: Seq): void {
    const d = seq.detok;
    if (!d) {
      for (; seq.emitted < seq.output.length; seq.emitted++) this.emit(seq, seq.output[seq.emitted]!);
      return;
    }
    let safe = d.text.length;
    for (const s of seq.stopStrings) {
      for (let k = Math.min(s.length - 1, d.text.length); k > 0; k--) {
        if (d.text.endsWith(s.slice(0, k))) {
          safe = Math.min(safe, d.text.length - k);
          break;
        }
      }
    }
    while (seq.emitted < seq.output.length && d.ends[seq.emitted]! <= safe) {
      const end = d.ends[seq.emitted]!;
      const text = d.text.slice(seq.emittedChars, end);
      seq.emittedChars = end;
      this.emit(seq, seq.output[seq.emitted++]!, text);
    }
  }

  /**
   * Ends a request exactly once: leaves the queue or batch, frees its blocks,
   * reports its last tokens, resolves its promise.
   */
  private async finish(seq: Seq, reason: FinishReason, error?: string, stopReason?: number | string, cutAt?: number): Promise<void> {
    if (seq.state === 'done') return;
    const wasRunning = seq.state === 'running' || seq.blockTable.length > 0;
    seq.state = 'done';
    this.waiting = this.waiting.filter((s) => s !== seq);
    this.running = this.running.filter((s) => s !== seq);
    seq.detach?.();
    let freeError: string | undefined;
    if (wasRunning || seq.rank !== undefined) {
      try {
        await this.kv.free(seq.id);
      } catch (e) {
        freeError = `freeing KV blocks failed: ${message(e)}`;
      }
    }
    seq.blockTable = [];

    // Final output: text cut before a stop string; tokens that begin at or after the cut are dropped.
    let text: string | undefined;
    let keep = seq.output.length;
    const d = seq.detok;
    if (d) {
      if (cutAt !== undefined) {
        text = d.text.slice(0, cutAt);
        keep = 0;
        while (keep < seq.output.length && (keep === 0 ? 0 : d.ends[keep - 1]!) < cutAt) keep++;
      } else {
        let tail = '';
        try {
          tail = d.tail();
        } catch {
          // The detokenizer already failed on this sequence: keep the text it gave.
        }
        text = d.text + tail;
      }
    }
    const outputTokens = seq.output.slice(0, keep);
    if (reason !== 'cancelled' && reason !== 'error') {
      for (; seq.emitted < keep; seq.emitted++) {
        if (!d) {
          this.emit(seq, outputTokens[seq.emitted]!);
          continue;
        }
        const end = seq.emitted === keep - 1 ? text!.length : Math.min(d.ends[seq.emitted]!, text!.length);
        const piece = text!.slice(seq.emittedChars, end);
        seq.emittedChars = end;
        this.emit(seq, outputTokens[seq.emitted]!, piece);
      }
    }

    if (reason === 'cancelled') this.counters.requestsCancelled++;
    else if (reason === 'error') this.counters.requestsFailed++;
    else this.counters.requestsDone++;
    this.active.delete(seq.id);

    const now = performance.now();
    const n = outputTokens.length;
    const completion: Completion = {
      id: seq.id,
      promptTokens: [...seq.req.prompt],
      outputTokens,
      finishReason: reason,
      preemptions: seq.preemptions,
      timings: {
        queuedMs: (seq.admitted ?? now) - seq.submitted,
        ttftMs: seq.firstToken === undefined ? null : seq.firstToken - seq.submitted,
        tpotMs: n >= 2 && seq.firstToken !== undefined ? (seq.lastToken! - seq.firstToken) / (n - 1) : null,
        totalMs: now - seq.submitted,
      },
    };
    if (text !== undefined) completion.text = text;
    if (stopReason !== undefined) completion.stopReason = stopReason;
    if (seq.rank !== undefined) completion.rank = seq.rank;
    const why = [error, freeError].filter(Boolean).join('; ');
    if (why) completion.error = why;
    seq.resolve(completion);
  }
}
