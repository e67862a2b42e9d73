// The forward pass over a layout: data-parallel attention (DP rank r on
// layout.devices[r], its sequences' KV blocks in that device's pool) and
// expert-parallel FFN (each routed expert computed on a device that holds it).
//
// A step runs the ranks in lockstep, one layer at a time, in three phases: (A) every
// rank's attention and router, (B) every rank's routed experts, (C) every rank's
// combination. Queuing one phase for all ranks before the next keeps each stream
// busy: device e's stream runs its rank's attention, then the expert rows of every
// rank it computes for (its own included), then its rank's combination. For rank r
// on device d, on d's stream unless said otherwise ("computing device e": the device
// that computes an expert for r, fixed at create(): d itself when it holds a replica,
// else the first holder in the placement):
//   embed → for each layer:
//   (A) rmsnorm(input_layernorm) → q, k, v in one launch (emoe_matmul_qkv_bf16; three
//       matmuls above QKV_FUSED_MAX_ROWS = 64 tokens) (+ bias, qwen2_moe: three launches)
//       → q/k RMSNorm per head (qwen3_moe) and rope of q and k in one launch
//       (emoe_qk_norm_rope; rope only without q/k norm) → kvStore at the tokens' slots
//       → paged attention → o_proj → residual add and rmsnorm(post_attention_layernorm) in
//       one launch (emoe_add_rmsnorm) → router logits → top-k
//       → [host path: download the top-k ids (T*K i32)] → record an event (unless d
//       computes all of the layer's experts for r on the device path)
//       → the qwen2_moe shared expert (needs no routing: it overlaps the routing)
//   (B) routed experts, by one of two paths (the rule is below); the device-path ranks'
//       work is queued first, then the host waits for the host-path ranks' ids:
//       Device path, no host wait: for each computing device e of r's layer (a static
//       list), on e's stream: wait for r's event (e != d), then
//         emoe_route_rows: reads r's top-k ids (through a peer pointer when e != d),
//           keeps the experts that r's route table (static, in e's scratch) gives to e,
//           and writes in e's scratch their row offsets [E + 1] (offsets[E] = e's row
//           count), gather rows (sorted row → token) and permutation (sorted row →
//           t*K + k), sorted by (expert, token, k), and the active list [E + 1] (its
//           count, then the experts that got rows on e, ascending);
//         gatherRowsCount(r's normed x, peer read → e's recv) → grouped gate and up
//           matmuls with G = E groups over e's static address table of the layer (experts
//           e does not compute: address 0, never read, their groups have no rows) that
//           visit only the active list's groups, their grid's group dimension sized for
//           min(E, T*K) (no more experts can have rows: at decode 8 of 128 for
//           Qwen3-30B-A3B, not a block row per expert) → siluMulCount → grouped down
//           matmul (the same list) → scatterRowsCount into r's `slots` at row t*K + k
//           (peer write); every launch is sized for the upper bound T*K and takes the real
//           row count and experts from device memory, so no row past it is read;
//         record an event (e != d).
//       Host path: wait on the host for the downloaded ids, for all host-path ranks of
//       the step together (none when every rank is on the device path)    [sync 1/layer]
//         → on the host: each (token, k) goes to the device that computes its expert;
//           rows are sorted by (device, grouped or large, expert, token)
//         → upload the sorted row list, its permutation and, per device, the grouped
//           experts' weight addresses and row offsets (one upload); gatherRows(normed x)
//           into `sorted` [T*K, H], segment by segment per device
//         → local segment, in place, on d: the expert FFN. Experts with at most
//           groupedMaxRows rows (all of them at decode) run together: one grouped gate,
//           one grouped up matmul, one siluMul over the segment, one grouped down matmul
//           (emoe_grouped_matmul_bf16, reading the uploaded addresses and offsets); an
//           expert with more rows runs its own three matmuls (the tiled path).
//           Remote segment on device e, on e's stream: wait for d's event, copy the
//           segment's rows to e (P2P), the same expert FFN there (its grouped launches
//           read the addresses of e's replicas from d's upload), copy the result back
//           into d's `sorted`, record an event.
//   (C) d waits for the events of the other computing devices → [host path:
//       scatterRows(sorted → slots, row t*K + k)] → combineTopk into the residual in k
//       order (plus the sigmoid-gated shared expert, qwen2_moe).
//   final rmsnorm on the last token of each sampled sequence only → LM head in
//   groups of rows → argmax → download the ids (and logits when asked); then the host
//   waits for every device that worked in the step                       [sync 1/step]
//
// Kernels per layer and rank, at decode (T <= 64) on the device path with one computing
// device: 9 in (A) (rmsnorm, qkv, qk-norm+rope, kvStore, attention, o_proj, add+rmsnorm,
// router, top-k), 7 in (B) (route, gather, gate, up, SwiGLU, down, scatter), 1 in (C)
// (combineTopk): 17 for qwen3_moe and mixtral (23 and 21 before the three fusions);
// qwen2_moe adds 3 bias launches, 6 for the shared expert and 1 add: 27 (31 before). Each
// further computing device adds 7. The fused kernels give the unfused sequence's bits (on
// the mock by construction, on CUDA by sharing its per-element helpers), so the fusions
// change no result and apply to every step, prefill and decode, either routing path.
//
// Which path: a rank's step takes the device path when its T*K (token, expert) rows are
// at most deviceRoutingMaxRows (default min(MAX_ROUTE_ROWS = 4096, 32 * E): at most 32
// rows per expert on average; measured on 4 x H200 with Qwen3-30B-A3B under load, mixed
// prefill steps of ~156 tokens ran 114 ms on the device path against 178 ms on the host
// path, docs/benchmarks.md), else the host path. The
// rule depends on the rank's batch and the model only, never on the layout. The host
// path costs a host round trip per layer but can give an expert with many rows the
// tiled matmul (prefill); the device path runs every expert's rows in the grouped kernel.
//
// Why results do not depend on the layout: every expert row is computed from the
// same inputs with the same kernels whichever device computes the expert (on the mock
// the kernels are row-independent and sequential, and the grouped twin computes a row
// exactly as the per-expert one does, so the two paths agree bit for bit too; on CUDA
// the grouped kernel's result for a row does not depend on the other rows, and the path
// and the per-expert row count, which pick grouped or per-expert and the matmul path, are
// the same for a given rank and batch), and the combination of a token's K expert
// outputs always runs in k order on the rank's own device (combineTopk), never in the
// order the devices answered. Each (token, k) has exactly one computing device, so the
// devices' scatters into `slots` never overlap.
//
// Graphs: a step whose ranks all take the device path, and that asks for no logits, is
// queued with no host wait from its metadata upload (read from the rank's pinned host
// buffer) to its argmax download (into the same buffer). Each rank's part of such a step (its
// attention, its expert rows on every computing device, its combination and head) may be
// captured once into a graph of its own (Stream.beginCapture on the rank's stream; every other
// stream the part uses joins by waiting on an event recorded there right after, and is joined
// back by an event the origin stream waits on before endCapture) and replayed with one launch
// for every later step where that rank has the same shape, whatever the other ranks run. Ranks'
// graphs run at once: a computing device keeps separate scratch for each rank it serves (Lent).
// The shape is what enters kernel arguments and copy sizes: the rank and its T, S, MB and
// sampled sequences' count. T and S are padded up to the step buckets first (padToBucket:
// padding sequences whose tokens sit at position -1, so attention and the KV store skip them),
// so that decode steps and mixed steps (decodes plus a prompt chunk) recur while requests come
// and go. Token ids, positions, KV slots and block tables travel in the metadata the graph's
// upload node reads from the host buffer when it runs, so a replay refills the host buffer and
// launches. MB, the block table's row stride, is rounded up to a power of two (the rows padded;
// attention reads only the blocks a token's position needs), so a decoding rank captures again
// only when its longest sequence doubles. A shape is captured at its captureAfter-th sighting
// (default 1; before that the step runs as usual). Graphs are cached per rank and shape (LRU,
// maxGraphs) and die with the engine; precapture() captures given shapes ahead (a scale's
// standby engine captures the serving engine's recent shapes before the switch-over). Events
// recorded during a capture come from their own per-device pool: an event the engine
// synchronizes or reuses outside a capture is never one recorded inside it. A backend that
// cannot capture (NotSupportedError: ACL, an old CUDA driver, or anything a capture refuses)
// turns graphs off for the engine, the step runs as usual, and graphStats says why.
//
// Sync points per step: the host path's one host wait per layer (the expert row lists
// are built on the host; none in a step whose ranks all take the device path: the whole
// step is queued without waiting), and one at the end (replayed graphs: one wait per rank, on
// its stream, which its graph's joins make wait for every device it used). Cross-device
// dependencies go through events recorded by the producer before the consumer waits on
// them, so no stream ever waits on work that is not queued yet. On the device path, a
// computing device keeps its scratch for each rank apart (Lent: rows received, gate and up
// outputs, the routing and active lists), so ranks' graphs may run at once; the host path's
// scratch (recv, expGate, expUp) is used by its device's stream only, one rank after another.
import type { ModelConfig } from '../model/config.js';
import { type KvDtype, MAX_ROUTE_EXPERTS, MAX_ROUTE_ROWS, ModelKernels, checkKvDtype, kvDtypeBytes } from '../model/kernels/index.js';
import { runEach } from '../runtime/cleanup.js';
import { InvalidArgumentError, NotSupportedError } from '../runtime/errors.js';
import type { Graph } from '../runtime/graph.js';
import type { HostBufferPool } from '../runtime/host-pool.js';
import type { Chunk, DevicePointer, HostBuffer, VirtualRange } from '../runtime/memory.js';
import type { Runtime } from '../runtime/runtime.js';
import type { Event, Stream } from '../runtime/stream.js';
import { type KvPoolView, type Layout, type StepBatch, type StepResult, type WeightSource, kvBytesPerToken } from './types.js';
import { type ExpertWeights, type LayerWeights, type ModelWeights, expertWeights, resolveLayerWeights, resolveModelWeights } from './weights.js';

/** Milliseconds ForwardEngine.create spent, summed over the layout's devices. */
export interface ForwardCreateStats {
  /** Model kernels loaded on every device (in parallel). */
  kernelsMs: number;
  /** Weight addresses resolved from the weight source (the per-device expert tables built). */
  weightsMs: number;
  /** Scratch chunk, host buffer and stream of each device. */
  buffersMs: number;
  /** Routing and expert address tables uploaded (device routing). */
  tablesMs: number;
  /** Device memory of the scratch chunks, all devices together. */
  scratchBytes: number;
}

export interface ForwardEngineOptions {
  /** Tokens one rank may run in one step (default 512). Scratch buffers are sized for it. */
  maxTokensPerStep?: number;
  /** Tokens per KV block; default: derived from the pools' block size. */
  blockTokens?: number;
  /** Rows of the LM head computed at once (its logits buffer is rows * vocab f32; default 32). */
  lmHeadRows?: number;
  /**
   * Routed experts with at most this many rows in a rank's step run in the grouped expert
   * matmul (three launches per device and layer for all of them); an expert with more rows
   * runs its own matmuls (the tiled path, better for prefill). Default 64; 0: never grouped.
   * Host routing path only: the device path runs every expert grouped.
   */
  groupedMaxRows?: number;
  /**
   * A rank's step routes its experts on the device (no host wait per layer) when its T*K
   * (token, expert) rows are at most this, else on the host (one host wait per layer; experts
   * with more than groupedMaxRows rows take the tiled matmul). Default min(4096, 32 * experts);
   * 0: always the host path; at most 4096 (MAX_ROUTE_ROWS). A function of the rank's batch only,
   * so results stay independent of the layout.
   */
  deviceRoutingMaxRows?: number;
  /**
   * Replay steps as captured graphs (see the header): a step whose ranks all take the device
   * routing path and that asks for no logits is padded to the step buckets, captured at the
   * captureAfter-th step of its shape (default 1) and replayed with one launch after. Default true (at most
   * 64 graphs cached, the least recently used evicted); `{ maxGraphs, captureAfter }` set the
   * bound (at least 1) and the sightings (at least 1); false: never. Where the backend cannot
   * capture (NotSupportedError), graphs turn off for the engine at the first try and steps run
   * as usual: `graphStats.disabledReason` says why. `instantiate` says where a captured graph is
   * instantiated (host work, 5-20 ms for a 48-layer rank step on H100): 'thread-pool' (the
   * default) off the event loop, so an engine serving in this process keeps stepping while a
   * standby engine captures ahead; 'inline' on it (the previous behaviour, for A/B runs).
   * `coveredCaptureAfter` (default 4, at least 1): a rank's shape with no graph of its own but a
   * cached graph of the same rank that covers it (as many sampled sequences more as sequences
   * more, at least its block-table stride, at most 16 tokens more) replays that graph, padded up
   * to it, until the shape's coveredCaptureAfter-th sighting, when it is captured, one such shape
   * per step (graphStats.covered counts those replays). A capture holds the step for 15-25 ms on
   * H100 (48 layers); a padded decode replay costs the padding rows, which all route alike. 1:
   * capture at once, as before.
   */
  graphs?: boolean | { maxGraphs?: number; captureAfter?: number; coveredCaptureAfter?: number; instantiate?: GraphInstantiate };
  /**
   * Observe the experts' load: every n-th step (counted from the first) runs its ranks on the
   * host routing path, whose row lists are built from the top-k ids on the host, and those
   * ids are counted per layer and expert (every other host-path step counts too). Such a
   * step groups every expert's rows (no tiled matmul), so its results equal the device
   * path's. Default 0: off. Read with `expertLoad`.
   */
  observeLoadEvery?: number;
  /**
   * Element type of the KV cache (default 'bf16'). 'f32' keeps K and V unrounded, so the
   * whole pass runs in f32 (for comparisons with a higher-precision reference), at twice the
   * KV memory per token: the pools must be made for it, kvGeometry(config, blockTokens, 'f32').
   * A pool holds bytes only, so its block size in tokens is derived from this dtype; give
   * blockTokens too and a pool made for the other dtype is refused.
   */
  kvDtype?: KvDtype;
  /**
   * Pinned host buffers are taken from this pool and given back to it when the engine is
   * disposed (default: allocated and freed by the engine). A deployment passes one pool to
   * the engines of its successive layouts: freeing pinned memory right after a switch-over
   * stalled the event loop for 64-109 ms while the new layout stepped.
   */
  hostPool?: HostBufferPool;
}

/** Where captured graphs are instantiated (ForwardEngineOptions.graphs.instantiate). */
export type GraphInstantiate = 'thread-pool' | 'inline';

/** Tokens routed to each expert in the steps observed (ForwardEngineOptions.observeLoadEvery). */
export interface ExpertLoad {
  /** Steps whose routing was counted. */
  steps: number;
  /** load[layer][expert]: (token, k) pairs routed to the expert. */
  load: number[][];
}

/** How an engine's steps used graphs so far. */
export interface GraphStats {
  /** Whether steps may still be replayed as graphs (false: the option said so, or capture failed). */
  enabled: boolean;
  /** Rank graphs captured by a step (each also ran, by one launch of it). A graph step has one graph per rank. */
  captures: number;
  /**
   * Captures a step began (counted before the capture: one begun before capturesPaused was set
   * may still end in a graph after it, while its instantiation runs on the thread pool).
   */
  capturesBegun: number;
  /** Rank graphs a step launched from the cache. */
  replays: number;
  /** Rank graphs captured ahead of their first step (precapture). */
  precaptured: number;
  /** Graphs cached now. */
  cached: number;
  /** Graphs evicted by the maxGraphs bound (and disposed). */
  evicted: number;
  /** Graph-eligible steps run as usual because their shape had been seen fewer than captureAfter times. */
  deferred: number;
  /** Of the replays, those of a graph of a larger shape of their rank, the step padded up to it (graphs.coveredCaptureAfter). */
  covered: number;
  /** Why graphs are off: 'graphs: false', or the NotSupportedError that turned them off. */
  disabledReason?: string;
}

const DEFAULT_GROUPED_MAX_ROWS = 64;
const DEFAULT_MAX_GRAPHS = 64;
/**
 * Sizes a graph step's token and sequence counts are padded up to (see the header): under
 * request churn the exact counts change nearly every step, so without padding almost no
 * shape recurred (H200, bench-scale: steps that could not replay ran 80-240 ms against
 * 29-38 ms for replays). At most 1.5x the rows; padded rows cost little at decode, where a
 * step's time is the expert weights it reads, and they all route alike (one token, one
 * position), so they touch at most top-k more experts per layer.
 */
const STEP_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096];
/** The step buckets (token and sequence counts a step is padded to), ascending, up to 4096. */
export const STEP_BUCKET_LIST: readonly number[] = STEP_BUCKETS;

/** The smallest bucket at or above n (beyond the list: n rounded up to a multiple of 1024). */
export function stepBucket(n: number): number {
  for (const b of STEP_BUCKETS) if (b >= n) return b;
  return Math.ceil(n / 1024) * 1024;
}
/**
 * Default sightings of a step shape before it is captured: the first. With step buckets and
 * block-table strides rounded to powers of two, shapes recur under churn, and on H200
 * (4 GPUs) a capture cost little more than running the step eagerly (214 against 184 ms; a
 * replay 30 ms), so waiting for a second sighting only added an eager step per shape. (Before
 * the buckets most shapes never recurred and 2 was the better default.)
 */
const DEFAULT_CAPTURE_AFTER = 1;
/** Default sightings of a shape that a cached graph covers before it gets a graph of its own (graphs.coveredCaptureAfter). */
const DEFAULT_COVERED_CAPTURE_AFTER = 4;
/**
 * A covering graph has at most this many tokens more than the shape. Padding rows all route alike
 * (one token, one position), so at decode they add at most top-k experts' weights per layer to
 * read; a mixed step's are not cheap: on 4 x H100 (Qwen3-30B-A3B shapes), mixed rank steps padded
 * from 96 to 128-192 tokens ran 78-87 ms against 54 ms for their own graphs.
 */
const COVER_MAX_EXTRA_TOKENS = 16;
/**
 * Layers whose weights are resolved between two turns of the event loop while an engine is made,
 * and layers of a precaptured graph queued per turn (ForwardEngine.precapture). A scale's attach
 * phase keeps the host busy for most of its 150-450 ms (CPU profiles on 4 x H100), and a
 * serving step whose GPU work ends meanwhile is noticed, and the next one launched, only when
 * the piece then running yields: the pieces' length is the serving steps' delay. 2 layers of
 * Qwen3-30B-A3B shapes is ~1 ms of host work (8 was 4-5 ms).
 */
const RESOLVE_LAYERS_PER_TURN = 2;
const PRECAPTURE_LAYERS_PER_TURN = 2;

/** A rank's weights as device pointers (ForwardEngine.resolveWeights). */
interface ResolvedWeights {
  model: ModelWeights;
  layers: LayerWeights[];
  experts: Array<ExpertWeights | undefined>;
  expertWords: Int32Array;
}
/**
 * Default deviceRoutingMaxRows per expert: 32 rows on average. Mixed prefill steps are
 * faster on the device path than with a host round trip per layer (measured: see the header).
 */
const DEVICE_ROUTING_ROWS_PER_EXPERT = 32;

interface ExpertGroup {
  expert: number;
  /** First row, relative to its segment. */
  offset: number;
  rows: number;
}

/** The rows of one rank's step that one device computes. */
interface Segment {
  /** The computing device's index in the layout. */
  rank: number;
  /** First row in the rank's `sorted`. */
  offset: number;
  rows: number;
  /** Experts of at most groupedMaxRows rows: rows 0..groupedRows-1 of the segment, in expert order. */
  grouped: ExpertGroup[];
  groupedRows: number;
  /**
   * i32 offset in the lists buffer (even: 8-byte aligned) of the grouped launches' arrays:
   * gate, up and down addresses (u64 [G] each, on the computing device), then row offsets (i32 [G + 1]).
   */
  meta: number;
  /** The other experts, after the grouped rows, in expert order. */
  large: ExpertGroup[];
}

const alignEven = (n: number) => n + (n & 1);

/** i32 words of one layer's row lists: perm and gather rows [T*K each], then the grouped launches' arrays. */
function listWords(TK: number, experts: number, devices: number): number {
  // At most min(TK, E) groups over all segments (each expert has one computing device per rank):
  // 7 words each, plus 1 offset and 1 alignment word per segment.
  return alignEven(alignEven(2 * TK) + 7 * Math.min(TK, experts) + 2 * devices);
}

/** Writes a device address as two i32 words (little-endian u64). */
function putAddress(words: Int32Array, at: number, p: DevicePointer): void {
  const a = p.address;
  words[at] = Number(a & 0xffffffffn) | 0;
  words[at + 1] = Number(a >> 32n) | 0;
}

export interface StepOptions {
  /** Also return the f32 logits of the last position of each sampled sequence (such a step runs without a graph). */
  returnLogits?: boolean;
  /**
   * false: run this step as usual even where a graph could (same results; for same-run
   * comparisons). Default true; graphs off for the engine win.
   */
  graph?: boolean;
}

const ALIGN = 256;
const alignUp = (n: number, a = ALIGN) => Math.ceil(n / a) * a;

/** Bump allocator over one mapped scratch range. */
class Arena {
  private next = 0;
  constructor(private readonly base: DevicePointer | undefined) {}
  /** Bytes needed so far (for a sizing pass with no base). */
  get used(): number {
    return this.next;
  }
  alloc(bytes: number): DevicePointer {
    const at = this.next;
    this.next = alignUp(at + Math.max(bytes, 4));
    // Sizing pass: any pointer will do, it is never used.
    return this.base ? this.base.add(at) : (undefined as unknown as DevicePointer);
  }
}

/** Scratch of one device: its rank's activations and the expert FFN buffers others use too. */
interface Buffers {
  x: DevicePointer; // [T, H] residual stream
  xn: DevicePointer; // [T, H] normed
  proj: DevicePointer; // [T, H] o_proj output
  q: DevicePointer; // [T, NH*D]
  att: DevicePointer; // [T, NH*D]
  k: DevicePointer; // [T, KVH*D]
  v: DevicePointer; // [T, KVH*D]
  routerLogits: DevicePointer; // [T, E]
  ids: DevicePointer; // [T*K] i32
  wts: DevicePointer; // [T*K] f32
  sorted: DevicePointer; // [T*K, H] rows sorted by (device, expert, token); expert outputs in place
  slots: DevicePointer; // [T*K, H] row t*K + k
  sharedGate?: DevicePointer; // [T, S]
  sharedUp?: DevicePointer; // [T, S]
  sharedOut?: DevicePointer; // [T, H]
  sharedLogit?: DevicePointer; // [T]
  meta: DevicePointer; // i32: tokens, tokSeq, tokPos, kvSlot, lastRows [T each], blockTable [T * MBmax]
  lists: DevicePointer; // i32: perm [T*K], gather rows [T*K], grouped launch arrays (listWords)
  lastX: DevicePointer; // [T, H]
  lmLogits: DevicePointer; // [G, V]
  argOut: DevicePointer; // [T] i32
  recv: DevicePointer; // [T*K, H] rows received from another rank (device path: gathered rows, then outputs)
  expGate: DevicePointer; // [T*K, I]
  expUp: DevicePointer; // [T*K, I]
  // Device routing path (absent when it is off):
  /** Per rank served: the scratch this device computes that rank's expert rows in (see Lent). */
  lent?: Lent[];
  routeTable?: DevicePointer; // static [ranks, L, E] i32: the device index that computes each expert for each rank
  weightTable?: DevicePointer; // static [L, 3, E] u64: this device's gate, up, down addresses; 0 where it computes nothing
}

/**
 * Scratch a device keeps for one rank's expert rows on the device path, one set per rank of
 * the layout: each rank's step may be a graph of its own (see the header), and two ranks'
 * graphs run at once, so no two ranks share these.
 */
interface Lent {
  recv: DevicePointer; // [T*K, H] the rank's rows gathered, then the expert outputs
  expGate: DevicePointer; // [T*K, I]
  expUp: DevicePointer; // [T*K, I]
  routeOffsets: DevicePointer; // [E + 1] i32: per expert row offsets; [E] = the row count
  routeRows: DevicePointer; // [T*K] i32: sorted row → token
  routePerm: DevicePointer; // [T*K] i32: sorted row → slot t*K + k
  routeActive: DevicePointer; // [E + 1] i32: the count, then the experts with rows, ascending
}

interface DeviceState {
  rank: number;
  device: number;
  kernels: ModelKernels;
  stream: Stream;
  chunk: Chunk;
  range: VirtualRange;
  buf: Buffers;
  host: HostBuffer;
  hostI32: Int32Array;
  /** Where the pinned buffers come from and go back to (ForwardEngineOptions.hostPool). */
  hostPool?: HostBufferPool;
  /** Pinned source of the routing and expert address tables' upload (device routing) and the event after it. */
  tables?: { host: HostBuffer; uploaded: Event; done?: boolean };
  events: Event[];
  eventsUsed: number;
  /** Events recorded only inside captures (never synchronized, never recorded outside one). */
  captureEvents: Event[];
  captureEventsUsed: number;
  model: ModelWeights;
  layers: LayerWeights[];
  /** Experts this device computes: index layer * E + expert. */
  experts: Array<ExpertWeights | undefined>;
  /** Their addresses as i32 words: (layer * E + expert) * 6 + gate 0/1, up 2/3, down 4/5. */
  expertWords: Int32Array;
  kv: KvPoolView;
  /** Per layer * E + expert: the rank (device index) that computes it for this rank. */
  route: Int32Array;
}

interface SeqPlan {
  seqId: string;
  sample: boolean;
  /** Row of its last token in the rank's flattened batch. */
  lastRow: number;
  /** A padding sequence of a graph step (padToBucket): no request's, its token never read. */
  padding?: boolean;
}

/** A rank's graph shape: what enters its kernel arguments and copy sizes (padded, see padToBucket). */
export interface GraphShape {
  /** The rank (index of its device in the layout). */
  rank: number;
  /** Its device (graphShapes() sets it; precapture reads `rank`). */
  device?: number;
  T: number;
  S: number;
  /** Block-table stride (a power of two). */
  MB: number;
  /** Sequences sampled (the padding ones included). */
  sampled: number;
}

interface CachedGraph {
  graph: Graph;
  shape: GraphShape;
}

function shapeOf(rank: number, p: RankPlan): GraphShape {
  return { rank, T: p.T, S: p.S, MB: p.MB, sampled: p.sampled.length };
}

function shapeKey(rank: number, p: RankPlan): string {
  return `${rank}:${p.T},${p.S},${p.MB},${p.sampled.length}`;
}

interface RankPlan {
  T: number;
  S: number;
  MB: number;
  tokens: Int32Array;
  tokSeq: Int32Array;
  tokPos: Int32Array;
  kvSlot: Int32Array;
  blockTable: Int32Array; // [S, MB] view block indices
  seqs: SeqPlan[];
  sampled: SeqPlan[];
}

/** Per-rank host buffer layout (i32 offsets). */
interface HostLayout {
  meta: number; // mirrors the device meta buffer
  metaMax: number;
  lists: number; // layers regions of listStride
  listStride: number; // listWords(T * K, E, devices)
  ids: number; // T * K
  argmax: number; // T
  total: number;
}

export class ForwardEngine implements Disposable {
  private readonly H: number;
  private readonly QD: number;
  private readonly KVD: number;
  private readonly MBmax: number;
  /** Per rank and layer: its computing devices, the others first, then its own (static). */
  private readonly expertOrder: number[][][];
  private busy = false;
  private disposed = false;
  /** Captured steps by shape key, least recently used first. */
  private readonly graphCache = new Map<string, CachedGraph>();
  /** Set while a step is being captured: event() then draws from the capture pool. */
  private capturing = false;
  private graphCounts = { captures: 0, capturesBegun: 0, replays: 0, evicted: 0, deferred: 0, precaptured: 0, covered: 0 };
  /** Host-path routing counts per layer * E + expert, and the steps they cover; steps run so far. */
  private readonly observed: Float64Array;
  private observedSteps = 0;
  private stepCount = 0;
  /** groupedMaxRows for the step being queued (Infinity in a load-observing step). */
  private groupedLimit: number;
  /** Shapes seen but not captured yet, with their sightings (bounded: least recently seen dropped). */
  private readonly graphSightings = new Map<string, number>();
  private graphsOff: string | undefined;
  /**
   * While true, a step whose shape has no graph yet runs as usual instead of being captured
   * (cached graphs still replay; graphStats.deferred counts the others). A capture holds the
   * host thread for longer than the step it records (200-300 ms on 4 H200s), so a scale's
   * prepare phase, which creates its chunks on the same thread, may pause them
   * (DeploymentOptions.pauseCaptures).
   */
  capturesPaused = false;

  /** The rank shapes the last graph step captured (diagnostics: which shapes a new layout's first steps lacked). */
  lastStepCaptures: GraphShape[] = [];

  /** Where ForwardEngine.create spent its time (the attach phase of a scale builds one). */
  createStats: ForwardCreateStats = { kernelsMs: 0, weightsMs: 0, buffersMs: 0, tablesMs: 0, scratchBytes: 0 };

  private constructor(
    private readonly rt: Runtime,
    readonly config: ModelConfig,
    readonly layout: Layout,
    private readonly devs: DeviceState[],
    readonly maxTokensPerStep: number,
    readonly blockTokens: number,
    private readonly lmHeadRows: number,
    private readonly hostLayout: HostLayout,
    private readonly groupedMaxRows: number,
    /** Largest T*K of a rank's step that takes the device routing path (0: never). */
    readonly deviceRoutingMaxRows: number,
    /** Per rank and layer: the device indices that compute its experts, ascending (static). */
    private readonly computers: number[][][],
    /** Graphs cached at most (0: graphs off by option). */
    private readonly maxGraphs: number,
    /** Sightings of a shape before it is captured. */
    private readonly captureAfter: number,
    /** Sightings of a shape that a cached graph covers before it is captured. */
    private readonly coveredCaptureAfter: number,
    /** Where captured graphs are instantiated. */
    private readonly instantiate: GraphInstantiate,
    /** Every n-th step observes the experts' load on the host path (0: never). */
    private readonly observeLoadEvery: number,
    /** Element type of the KV cache (ForwardEngineOptions.kvDtype). */
    readonly kvDtype: KvDtype,
  ) {
    this.observed = new Float64Array(config.layers * config.experts);
    this.groupedLimit = groupedMaxRows;
    if (maxGraphs === 0) this.graphsOff = 'graphs: false';
    this.H = config.hiddenSize;
    this.QD = config.heads * config.headDim;
    this.KVD = config.kvHeads * config.headDim;
    this.MBmax = Math.ceil(config.maxPositions / blockTokens);
    // Other devices first, then r's own, so r's stream does not wait before its own work.
    this.expertOrder = computers.map((layers, r) => layers.map((list) => [...list.filter((e) => e !== r), ...list.filter((e) => e === r)]));
  }

  static async create(rt: Runtime, config: ModelConfig, layout: Layout, weights: WeightSource, kv: Map<number, KvPoolView>,
    options: ForwardEngineOptions = {}): Promise<ForwardEngine> {
    const devices = layout.devices;
    if (!Array.isArray(devices) || devices.length === 0) throw new InvalidArgumentError('layout.devices', 'at least one device');
    devices.forEach((d, i) => {
      if (!Number.isInteger(d) || d < 0 || d >= rt.deviceCount) throw new InvalidArgumentError(`layout.devices[${i}]`, `a device ordinal below ${rt.deviceCount}`);
      if (devices.indexOf(d) !== i) throw new InvalidArgumentError(`layout.devices[${i}]`, `distinct devices (${d} appears twice)`);
    });
    const T = options.maxTokensPerStep ?? 512;
    if (!Number.isSafeInteger(T) || T < 1 || T > 65536) throw new InvalidArgumentError('maxTokensPerStep', 'an integer in 1..65536');
    const G = Math.min(T, options.lmHeadRows ?? 32);
    if (!Number.isSafeInteger(G) || G < 1) throw new InvalidArgumentError('lmHeadRows', 'a positive integer');
    const groupedMaxRows = options.groupedMaxRows ?? DEFAULT_GROUPED_MAX_ROWS;
    if (!Number.isSafeInteger(groupedMaxRows) || groupedMaxRows < 0) throw new InvalidArgumentError('groupedMaxRows', 'a non-negative integer');
    const c = config;
    const routable = c.experts <= MAX_ROUTE_EXPERTS;
    const deviceRoutingMaxRows = options.deviceRoutingMaxRows ??
      (routable ? Math.min(MAX_ROUTE_ROWS, DEVICE_ROUTING_ROWS_PER_EXPERT * c.experts) : 0);
    if (!Number.isSafeInteger(deviceRoutingMaxRows) || deviceRoutingMaxRows < 0 || deviceRoutingMaxRows > MAX_ROUTE_ROWS) {
      throw new InvalidArgumentError('deviceRoutingMaxRows', `an integer in 0..${MAX_ROUTE_ROWS}`);
    }
    if (deviceRoutingMaxRows > 0 && !routable) {
      throw new InvalidArgumentError('deviceRoutingMaxRows', `0 for a model of more than ${MAX_ROUTE_EXPERTS} experts (got ${c.experts})`);
    }
    const deviceRouting = deviceRoutingMaxRows > 0;
    const graphs = options.graphs ?? true;
    let maxGraphs: number;
    let captureAfter = DEFAULT_CAPTURE_AFTER;
    let coveredCaptureAfter = DEFAULT_COVERED_CAPTURE_AFTER;
    let instantiate: GraphInstantiate = 'thread-pool';
    if (typeof graphs === 'boolean') {
      maxGraphs = graphs ? DEFAULT_MAX_GRAPHS : 0;
    } else if (graphs !== null && typeof graphs === 'object') {
      maxGraphs = graphs.maxGraphs ?? DEFAULT_MAX_GRAPHS;
      if (!Number.isSafeInteger(maxGraphs) || maxGraphs < 1) throw new InvalidArgumentError('graphs.maxGraphs', 'a positive integer');
      captureAfter = graphs.captureAfter ?? DEFAULT_CAPTURE_AFTER;
      if (!Number.isSafeInteger(captureAfter) || captureAfter < 1) throw new InvalidArgumentError('graphs.captureAfter', 'a positive integer');
      coveredCaptureAfter = graphs.coveredCaptureAfter ?? DEFAULT_COVERED_CAPTURE_AFTER;
      if (!Number.isSafeInteger(coveredCaptureAfter) || coveredCaptureAfter < 1) {
        throw new InvalidArgumentError('graphs.coveredCaptureAfter', 'a positive integer (1: capture every shape at once)');
      }
      instantiate = graphs.instantiate ?? instantiate;
      if (instantiate !== 'thread-pool' && instantiate !== 'inline') throw new InvalidArgumentError('graphs.instantiate', "'thread-pool' or 'inline'");
    } else {
      throw new InvalidArgumentError('graphs', 'a boolean or { maxGraphs, captureAfter, coveredCaptureAfter, instantiate }');
    }
    const observeLoadEvery = options.observeLoadEvery ?? 0;
    if (!Number.isSafeInteger(observeLoadEvery) || observeLoadEvery < 0) throw new InvalidArgumentError('observeLoadEvery', 'a non-negative integer (0: off)');
    const kvDtype = checkKvDtype('kvDtype', options.kvDtype ?? 'bf16');
    const perToken = kvBytesPerToken(c, kvDtype);
    const otherDtype: KvDtype = kvDtype === 'f32' ? 'bf16' : 'f32';
    let BS = options.blockTokens;
    for (const d of devices) {
      const view = kv.get(d);
      if (!view) throw new InvalidArgumentError('kv', `a KV pool view for every device of the layout (none for device ${d})`);
      if (view.device !== d) throw new InvalidArgumentError('kv', `views keyed by their device (the view under ${d} is on ${view.device})`);
      // A pool is bytes only: with blockTokens given, a pool made for the other dtype is recognised by its size.
      const want = options.blockTokens;
      if (want !== undefined && view.blockBytes !== want * perToken && view.blockBytes === want * kvBytesPerToken(c, otherDtype)) {
        throw new InvalidArgumentError('kvDtype', `'${otherDtype}', the dtype device ${d}'s pool was made for (${view.blockBytes} bytes a block: ${want} tokens of ${otherDtype}, `
          + `where kvDtype '${kvDtype}' needs ${want * perToken}); for '${kvDtype}', make the pools with kvGeometry(config, ${want}, '${kvDtype}')`);
      }
      const bs = view.blockBytes / perToken;
      if (!Number.isInteger(bs) || bs < 1) {
        throw new InvalidArgumentError('kv', `pools whose block size is a multiple of ${perToken} bytes (layers*2*kvHeads*headDim*${kvDtypeBytes(kvDtype)} for kvDtype '${kvDtype}'; `
          + `device ${d} has ${view.blockBytes}): make them with kvGeometry(config, blockTokens, '${kvDtype}')`);
      }
      if (BS === undefined) BS = bs;
      if (bs !== BS) throw new InvalidArgumentError(options.blockTokens === undefined ? 'kv' : 'blockTokens', `one block size on every device (${BS} tokens; device ${d} has ${bs})`);
      if (view.spanBlocks * bs > 0x7fffffff) throw new InvalidArgumentError('kv', `a pool whose slots fit an i32 (device ${d})`);
    }
    const blockTokens = BS!;
    // Placement: every expert of every layer on at least one device of the layout.
    const E = c.experts;
    const holders: number[][] = [];
    for (let l = 0; l < c.layers; l++) {
      for (let e = 0; e < E; e++) {
        const h = layout.placement(l, e);
        if (!h || h.length === 0) throw new InvalidArgumentError('layout.placement', `at least one device for expert ${e} of layer ${l}`);
        const idx = h.map((d) => {
          const j = devices.indexOf(d);
          if (j < 0) throw new InvalidArgumentError('layout.placement', `devices of the layout (expert ${e} of layer ${l} names ${d})`);
          return j;
        });
        holders.push(idx);
      }
    }
    const routes = devices.map((_, r) => Int32Array.from(holders, (h) => (h.includes(r) ? r : h[0]!)));
    const computers = routes.map((route) => Array.from({ length: c.layers },
      (_, l) => [...new Set(route.subarray(l * E, (l + 1) * E))].sort((a, b) => a - b)));

    const MBmax = Math.ceil(c.maxPositions / blockTokens);
    const hostLayout = (() => {
      const TK = T * c.topK;
      const metaMax = 5 * T + T * MBmax;
      const lists = metaMax;
      const listStride = listWords(TK, E, devices.length);
      const ids = lists + c.layers * listStride;
      const argmax = ids + TK;
      return { meta: 0, metaMax, lists, listStride, ids, argmax, total: argmax + T };
    })();

    const stats: ForwardCreateStats = { kernelsMs: 0, weightsMs: 0, buffersMs: 0, tablesMs: 0, scratchBytes: 0 };
    let t = performance.now();
    const lap = () => {
      const ms = performance.now() - t;
      t += ms;
      return ms;
    };
    const loaded = await Promise.allSettled(devices.map((d) => ModelKernels.load(rt, d)));
    stats.kernelsMs = lap();
    const kernels = loaded.map((k) => (k.status === 'fulfilled' ? k.value : undefined));
    const made: DeviceState[] = [];
    try {
      const bad = loaded.find((k): k is PromiseRejectedResult => k.status === 'rejected');
      if (bad) throw bad.reason;
      for (const [r, d] of devices.entries()) {
        // A turn between devices (each takes 10-30 ms of host time on Qwen3-30B-A3B shapes): an engine
        // serving in this process meanwhile (a scale's standby being made) launches its next step.
        if (r > 0) {
          const t0 = performance.now();
          await new Promise<void>((resolve) => setImmediate(resolve));
          t += performance.now() - t0; // not this engine's time
        }
        const resolved = await ForwardEngine.resolveWeights(c, layout, weights, r, routes, stats);
        made.push(ForwardEngine.deviceState(rt, c, layout, resolved, kv.get(d)!, r, kernels[r]!, routes, T, G, MBmax, hostLayout, deviceRoutingMaxRows, stats,
          options.hostPool));
        kernels[r] = undefined; // owned by its state now
      }
      lap();
      if (deviceRouting) {
        for (const s of made) ForwardEngine.uploadTables(rt, c, s, routes);
        // One wait for all: a rank's routing kernels read other devices' tables too.
        await Promise.all(made.map((s) => s.tables!.uploaded.synchronize()));
        for (const s of made) s.tables!.done = true;
      }
      stats.tablesMs = lap();
    } catch (e) {
      for (const s of made) ForwardEngine.disposeState(s);
      for (const k of kernels) k?.dispose();
      throw e;
    }
    const engine = new ForwardEngine(rt, c, layout, made, T, blockTokens, G, hostLayout, groupedMaxRows, deviceRoutingMaxRows, computers,
      maxGraphs, captureAfter, coveredCaptureAfter, instantiate, observeLoadEvery, kvDtype);
    engine.createStats = stats;
    return engine;
  }

  private static buffers(c: ModelConfig, arena: Arena, T: number, G: number, MBmax: number, listStride: number,
    ranks: number, routedRows: number): Buffers {
    const H = c.hiddenSize, QD = c.heads * c.headDim, KVD = c.kvHeads * c.headDim, TK = T * c.topK, I = c.expertIntermediate;
    const S = c.sharedIntermediate;
    const f = (n: number) => arena.alloc(n * 4);
    const b: Buffers = {
      x: f(T * H), xn: f(T * H), proj: f(T * H), q: f(T * QD), att: f(T * QD), k: f(T * KVD), v: f(T * KVD),
      routerLogits: f(T * c.experts), ids: f(TK), wts: f(TK), sorted: f(TK * H), slots: f(TK * H),
      meta: f(5 * T + T * MBmax), lists: f(listStride), lastX: f(T * H), lmLogits: f(G * c.vocabSize), argOut: f(T),
      recv: f(TK * H), expGate: f(TK * I), expUp: f(TK * I),
    };
    if (S > 0) Object.assign(b, { sharedGate: f(T * S), sharedUp: f(T * S), sharedOut: f(T * H), sharedLogit: f(T) });
    if (routedRows > 0) {
      const E = c.experts;
      // A rank's step takes the device path only up to deviceRoutingMaxRows (token, expert) rows.
      const R = Math.min(TK, routedRows);
      const lent = Array.from({ length: ranks }, (): Lent => ({
        recv: f(R * H), expGate: f(R * I), expUp: f(R * I), routeOffsets: f(E + 1), routeRows: f(R), routePerm: f(R), routeActive: f(E + 1),
      }));
      Object.assign(b, { lent, routeTable: f(ranks * c.layers * E), weightTable: arena.alloc(c.layers * 3 * E * 8) });
    }
    return b;
  }

  /** Uploads a device's static routing tables (device routing path) and waits. */
  /**
   * Queues the upload of the routing and expert address tables on the device's stream, from a
   * pinned buffer the state keeps, and records an event after it; create() waits for all
   * devices' events at once (a scale's attach phase spent 46-153 ms in two synchronous
   * writes per device, with a pinned buffer allocated and freed for each, while serving kept
   * the thread pool busy).
   */
  private static uploadTables(rt: Runtime, c: ModelConfig, s: DeviceState, routes: Int32Array[]): void {
    const L = c.layers, E = c.experts;
    const table = new Int32Array(routes.length * L * E);
    routes.forEach((route, r) => table.set(route, r * L * E));
    const addrs = new BigUint64Array(L * 3 * E);
    s.experts.forEach((w, key) => {
      if (!w) return;
      const l = Math.floor(key / E), x = key % E;
      addrs[(l * 3 + 0) * E + x] = w.gate.address;
      addrs[(l * 3 + 1) * E + x] = w.up.address;
      addrs[(l * 3 + 2) * E + x] = w.down.address;
    });
    const host = ForwardEngine.takeHost(rt, s.hostPool, table.byteLength + addrs.byteLength);
    host.bytes(0, table.byteLength).set(new Uint8Array(table.buffer));
    host.bytes(table.byteLength, addrs.byteLength).set(new Uint8Array(addrs.buffer));
    s.stream.upload(s.buf.routeTable!, host, table.byteLength);
    s.stream.upload(s.buf.weightTable!, host, addrs.byteLength, table.byteLength);
    s.tables = { host, uploaded: rt.createEvent(s.device).record(s.stream) };
  }

  /**
   * A rank's weights resolved to device pointers (the dense weights of every layer, the experts
   * the routes send to it, and their address words), RESOLVE_LAYERS_PER_TURN layers at a time
   * with a turn of the event loop between them: on Qwen3-30B-A3B shapes this is 15-25 ms of host
   * time per device on H200, and an engine serving in this process meanwhile (a scale's standby
   * being made) would otherwise have its next step held up behind it. Weights come first, so a
   * missing tensor fails before anything is allocated.
   */
  private static async resolveWeights(c: ModelConfig, layout: Layout, weights: WeightSource, r: number, routes: Int32Array[],
    stats: ForwardCreateStats): Promise<ResolvedWeights> {
    const device = layout.devices[r]!;
    let t = performance.now();
    const model = resolveModelWeights(c, weights, device);
    const layers: LayerWeights[] = [];
    const experts: Array<ExpertWeights | undefined> = new Array(c.layers * c.experts).fill(undefined);
    for (let l = 0; l < c.layers; l++) {
      layers.push(resolveLayerWeights(c, weights, device, l));
      for (let x = 0; x < c.experts; x++) {
        const key = l * c.experts + x;
        if (routes.some((route) => route[key] === r)) experts[key] = expertWeights(c, weights, device, l, x);
      }
      if ((l + 1) % RESOLVE_LAYERS_PER_TURN === 0 && l + 1 < c.layers) {
        stats.weightsMs += performance.now() - t;
        await new Promise<void>((resolve) => setImmediate(resolve));
        t = performance.now();
      }
    }
    const expertWords = new Int32Array(experts.length * 6);
    experts.forEach((w, key) => {
      if (!w) return;
      putAddress(expertWords, key * 6, w.gate);
      putAddress(expertWords, key * 6 + 2, w.up);
      putAddress(expertWords, key * 6 + 4, w.down);
    });
    stats.weightsMs += performance.now() - t;
    return { model, layers, experts, expertWords };
  }

  private static deviceState(rt: Runtime, c: ModelConfig, layout: Layout, resolved: ResolvedWeights, kv: KvPoolView, r: number,
    kernels: ModelKernels, routes: Int32Array[], T: number, G: number, MBmax: number, hl: HostLayout, routedRows: number,
    stats: ForwardCreateStats, hostPool: HostBufferPool | undefined): DeviceState {
    const device = layout.devices[r]!;
    const { model, layers, experts, expertWords } = resolved;
    const hostI32 = hl.total;
    const t1 = performance.now();
    const sizing = new Arena(undefined);
    ForwardEngine.buffers(c, sizing, T, G, MBmax, hl.listStride, routes.length, routedRows);
    const size = rt.roundUp(sizing.used, device);
    let chunk: Chunk | undefined;
    let range: VirtualRange | undefined;
    let host: HostBuffer | undefined;
    let stream: Stream | undefined;
    try {
      chunk = rt.createChunk(device, size);
      stats.scratchBytes += size;
      range = rt.reserve(size);
      range.map(0, chunk);
      // Every device of the layout may read and write it (P2P copies run on either side; the
      // device routing path's kernels read and write other ranks' scratch directly).
      range.setAccess(0, size, layout.devices);
      const buf = ForwardEngine.buffers(c, new Arena(range.at(0)), T, G, MBmax, hl.listStride, routes.length, routedRows);
      host = ForwardEngine.takeHost(rt, hostPool, hostI32 * 4);
      const bytes = host.bytes();
      stream = rt.createStream(device);
      stats.buffersMs += performance.now() - t1;
      return {
        rank: r, device, kernels, stream, chunk, range, buf, host, ...(hostPool ? { hostPool } : {}),
        hostI32: new Int32Array(bytes.buffer, bytes.byteOffset, hostI32),
        events: [], eventsUsed: 0, captureEvents: [], captureEventsUsed: 0, model, layers, experts, expertWords, kv, route: routes[r]!,
      };
    } catch (e) {
      stream?.dispose();
      if (host) ForwardEngine.giveHost(hostPool, host);
      range?.dispose();
      chunk?.dispose();
      throw e;
    }
  }

  private static takeHost(rt: Runtime, pool: HostBufferPool | undefined, size: number): HostBuffer {
    return pool ? pool.take(size) : rt.hostBuffer(size);
  }

  private static giveHost(pool: HostBufferPool | undefined, host: HostBuffer): void {
    if (pool) pool.give(host);
    else host.dispose();
  }

  /** Frees a device's resources, each whatever the others do (a free the backend refuses is rethrown after the rest). */
  private static disposeState(s: DeviceState): void {
    const events = [...s.events, ...s.captureEvents];
    s.events.length = 0;
    s.captureEvents.length = 0;
    // The tables' pinned buffer goes once its upload has run: at once for an engine made (create
    // waited for it), later when create failed before that.
    const t = s.tables;
    const pool = s.hostPool;
    s.tables = undefined;
    runEach([
      ...events.map((e) => () => e.dispose()),
      () => s.stream.dispose(),
      () => s.kernels.dispose(),
      // Its last step has run (the engine is disposed between steps).
      () => ForwardEngine.giveHost(s.hostPool, s.host),
      () => {
        if (t?.done) {
          t.uploaded.dispose();
          ForwardEngine.giveHost(pool, t.host);
        } else if (t) t.uploaded.synchronize().catch(() => undefined).finally(() => { t.uploaded.dispose(); ForwardEngine.giveHost(pool, t.host); });
      },
      () => s.range.dispose(),
      () => s.chunk.dispose(),
    ]);
  }

  /**
   * An event of device slot j, unused in this step (events are reused across steps). While a step
   * is captured, one of the capture pool: those are recorded only inside captures (and waited on
   * only there), the others only outside, so none is synchronized after a capture recorded it.
   */
  private event(j: number): Event {
    const s = this.devs[j]!;
    if (this.capturing) {
      if (s.captureEventsUsed === s.captureEvents.length) s.captureEvents.push(this.rt.createEvent(s.device));
      return s.captureEvents[s.captureEventsUsed++]!;
    }
    if (s.eventsUsed === s.events.length) s.events.push(this.rt.createEvent(s.device));
    return s.events[s.eventsUsed++]!;
  }

  /** Tokens routed per layer and expert in the host-path steps so far (ForwardEngineOptions.observeLoadEvery). */
  get expertLoad(): ExpertLoad {
    const E = this.config.experts;
    return {
      steps: this.observedSteps,
      load: Array.from({ length: this.config.layers }, (_, l) => Array.from(this.observed.subarray(l * E, (l + 1) * E))),
    };
  }

  /** Starts the load counts over. */
  resetExpertLoad(): void {
    this.observed.fill(0);
    this.observedSteps = 0;
  }

  /**
   * The expert weights rank `rank` computes with, indexed layer * experts + expert (undefined where
   * its routes send it none): where its kernels read them (diagnostics and tests).
   */
  expertWeights(rank: number): ReadonlyArray<ExpertWeights | undefined> {
    const dev = this.devs[rank];
    if (!dev) throw new InvalidArgumentError('rank', `a rank below ${this.devs.length} (got ${String(rank)})`);
    return dev.experts;
  }

  /** How steps used graphs so far (see ForwardEngineOptions.graphs). */
  get graphStats(): GraphStats {
    const stats: GraphStats = { enabled: this.graphsOff === undefined, ...this.graphCounts, cached: this.graphCache.size };
    if (this.graphsOff !== undefined) stats.disabledReason = this.graphsOff;
    return stats;
  }

  // ---- validation ----

  private plan(batch: StepBatch): Array<RankPlan | undefined> {
    if (!batch || !Array.isArray(batch.ranks)) throw new InvalidArgumentError('batch.ranks', 'an array (one list of sequences per rank)');
    const nr = this.devs.length;
    if (batch.ranks.length > nr) throw new InvalidArgumentError('batch.ranks', `at most ${nr} ranks, one per device of the layout (got ${batch.ranks.length})`);
    const c = this.config;
    const BS = this.blockTokens;
    const seen = new Set<string>();
    return batch.ranks.map((seqs, r) => {
      if (!Array.isArray(seqs)) throw new InvalidArgumentError(`batch.ranks[${r}]`, 'an array of sequences');
      if (seqs.length === 0) return undefined;
      const view = this.devs[r]!.kv;
      let T = 0;
      let MB = 1;
      seqs.forEach((q, i) => {
        const at = `batch.ranks[${r}][${i}]`;
        if (!q || typeof q !== 'object') throw new InvalidArgumentError(at, 'a SeqStep');
        if (typeof q.seqId !== 'string' || q.seqId.length === 0) throw new InvalidArgumentError(`${at}.seqId`, 'a non-empty string');
        if (seen.has(q.seqId)) throw new InvalidArgumentError(`${at}.seqId`, `unique in the step ('${q.seqId}' appears twice)`);
        seen.add(q.seqId);
        if (!Array.isArray(q.tokens) || q.tokens.length === 0) throw new InvalidArgumentError(`${at}.tokens`, 'a non-empty array of token ids');
        q.tokens.forEach((tok, j) => {
          if (!Number.isInteger(tok) || tok < 0 || tok >= c.vocabSize) {
            throw new InvalidArgumentError(`${at}.tokens[${j}]`, `a token id in 0..${c.vocabSize - 1} (got ${String(tok)})`);
          }
        });
        if (!Number.isSafeInteger(q.startPos) || q.startPos < 0) throw new InvalidArgumentError(`${at}.startPos`, `a non-negative integer (got ${String(q.startPos)})`);
        const end = q.startPos + q.tokens.length;
        if (end > c.maxPositions) throw new InvalidArgumentError(`${at}.startPos`, `such that startPos + tokens.length <= ${c.maxPositions} (max_position_embeddings; got ${end})`);
        if (typeof q.sample !== 'boolean') throw new InvalidArgumentError(`${at}.sample`, 'a boolean');
        const need = Math.ceil(end / BS);
        if (!Array.isArray(q.blockTable) || q.blockTable.length < need) {
          throw new InvalidArgumentError(`${at}.blockTable`, `at least ${need} blocks for ${end} tokens of ${BS} per block (got ${Array.isArray(q.blockTable) ? q.blockTable.length : 'none'})`);
        }
        for (let j = 0; j < need; j++) {
          const b = q.blockTable[j];
          if (!Number.isInteger(b) || b! < 0 || b! >= view.blocks) {
            throw new InvalidArgumentError(`${at}.blockTable[${j}]`, `a block id of device ${view.device}'s pool, in 0..${view.blocks - 1} (got ${String(b)})`);
          }
        }
        T += q.tokens.length;
        MB = Math.max(MB, need);
      });
      if (T > this.maxTokensPerStep) {
        throw new InvalidArgumentError(`batch.ranks[${r}]`, `at most maxTokensPerStep = ${this.maxTokensPerStep} tokens in a rank's step (got ${T})`);
      }
      const S = seqs.length;
      const p: RankPlan = {
        T, S, MB, tokens: new Int32Array(T), tokSeq: new Int32Array(T), tokPos: new Int32Array(T), kvSlot: new Int32Array(T),
        blockTable: new Int32Array(S * MB), seqs: [], sampled: [],
      };
      const written = new Set<number>();
      let row = 0;
      seqs.forEach((q, i) => {
        const idx = (j: number) => view.blockOffset(q.blockTable[j]!) / view.blockBytes;
        const need = Math.ceil((q.startPos + q.tokens.length) / BS);
        for (let j = 0; j < need; j++) p.blockTable[i * MB + j] = idx(j);
        q.tokens.forEach((tok, j) => {
          const pos = q.startPos + j;
          const slot = p.blockTable[i * MB + Math.floor(pos / BS)]! * BS + (pos % BS);
          if (written.has(slot)) {
            throw new InvalidArgumentError(`batch.ranks[${r}][${i}].blockTable`, `blocks whose written slots no other token of the step writes (block ${q.blockTable[Math.floor(pos / BS)]})`);
          }
          written.add(slot);
          p.tokens[row] = tok;
          p.tokSeq[row] = i;
          p.tokPos[row] = pos;
          p.kvSlot[row] = slot;
          row++;
        });
        const s: SeqPlan = { seqId: q.seqId, sample: q.sample, lastRow: row - 1 };
        p.seqs.push(s);
        if (q.sample) p.sampled.push(s);
      });
      return p;
    });
  }

  // ---- the step ----

  async step(batch: StepBatch, options: StepOptions = {}): Promise<StepResult> {
    if (this.disposed) throw new InvalidArgumentError('engine', 'not disposed');
    if (this.busy) throw new InvalidArgumentError('step', 'called once the previous step has resolved');
    const plans = this.plan(batch);
    const returnLogits = options.returnLogits === true;
    this.busy = true;
    const t0 = performance.now();
    const logitsHost: Array<HostBuffer | undefined> = [];
    try {
      plans.forEach((p, r) => {
        if (p && returnLogits && p.sampled.length > 0) logitsHost[r] = this.rt.hostBuffer(p.sampled.length * this.config.vocabSize * 4);
      });
      try {
        await this.run(plans, logitsHost, returnLogits || options.graph === false);
      } catch (e) {
        // Let whatever was queued drain before the host buffers go away.
        await Promise.allSettled(this.devs.map((d) => d.stream.synchronize()));
        throw e;
      }
      const next = new Map<string, number>();
      const logits = returnLogits ? new Map<string, Float32Array>() : undefined;
      let tokens = 0;
      plans.forEach((p, r) => {
        if (!p) return;
        tokens += p.T;
        const d = this.devs[r]!;
        const V = this.config.vocabSize;
        p.sampled.forEach((s, i) => {
          next.set(s.seqId, d.hostI32[this.hostLayout.argmax + i]!);
          if (logits) {
            const bytes = logitsHost[r]!.bytes(i * V * 4, V * 4);
            logits.set(s.seqId, new Float32Array(bytes.slice().buffer));
          }
        });
      });
      const result: StepResult = { next, ms: performance.now() - t0, tokens };
      if (logits) result.logits = logits;
      return result;
    } finally {
      for (const h of logitsHost) h?.dispose();
      for (const d of this.devs) {
        d.eventsUsed = 0;
        d.captureEventsUsed = 0;
      }
      this.busy = false;
    }
  }

  /** Whether a rank's step routes its experts on the device (see the header: a function of its batch only). */
  private onDevice(p: RankPlan): boolean {
    return p.T * this.config.topK <= this.deviceRoutingMaxRows;
  }

  /**
   * Queues the step for every rank, layer by layer in lockstep (phases A, B, C of the header), and
   * waits; a decode step whose ranks all take the device path as a graph, unless `eager`.
   */
  private async run(plans: Array<RankPlan | undefined>, logitsHost: Array<HostBuffer | undefined>, eager: boolean): Promise<void> {
    this.lastStepCaptures = [];
    const ranks = plans.flatMap((p, r) => (p ? [r] : []));
    // A load-observing step: every rank on the host path, every expert's rows grouped.
    const observe = this.observeLoadEvery > 0 && this.stepCount++ % this.observeLoadEvery === 0;
    this.groupedLimit = observe ? Infinity : this.groupedMaxRows;
    const onDevice = plans.map((p) => p !== undefined && !observe && this.onDevice(p));
    const hostRanks = ranks.filter((r) => !onDevice[r]);
    if (hostRanks.length > 0) this.observedSteps++;
    // Any all-device-path step may replay as a graph: padded to the step buckets, decode steps
    // and mixed steps (decodes plus a prompt chunk) recur under churn; a shape seen fewer
    // than captureAfter times runs as usual.
    if (ranks.length > 0 && hostRanks.length === 0 && !eager && this.graphsOff === undefined) {
      if (await this.runGraph(plans, ranks)) return;
    }
    /** Devices that got work in this step: the final wait covers each. */
    const used = new Set(ranks);
    if (hostRanks.length === 0) this.queueOnDevice(plans, ranks, logitsHost, used);
    else await this.queueMixed(plans, ranks, onDevice, logitsHost, used);
    // Sync point: every device that worked is done (a rank's stream waited for its computing devices).
    await Promise.all([...used].sort((a, b) => a - b).map((j) => this.event(j).record(this.devs[j]!.stream).synchronize()));
  }

  /**
   * Queues a step whose ranks all take the device path: no host wait anywhere, so this is also
   * what a capture records. `used` gets every device that got work.
   */
  private queueOnDevice(plans: Array<RankPlan | undefined>, ranks: number[], logitsHost: Array<HostBuffer | undefined>,
    used: Set<number>): void {
    for (const r of ranks) this.begin(r, plans[r]!);
    this.queueLayers(plans, ranks, 0, this.config.layers, used);
    for (const r of ranks) this.head(r, plans[r]!, logitsHost[r]);
  }

  /** Layers [from, to) of a device-path step (queueOnDevice's middle). */
  private queueLayers(plans: Array<RankPlan | undefined>, ranks: number[], from: number, to: number, used: Set<number>): void {
    for (let l = from; l < to; l++) {
      const routed = new Map<number, Event | undefined>();
      for (const r of ranks) routed.set(r, this.attentionAndRouter(r, plans[r]!, l, false));
      const answers = new Map<number, Event[]>();
      for (const r of ranks) answers.set(r, this.expertsOnDevice(r, plans[r]!, l, routed.get(r), used));
      for (const r of ranks) this.combine(r, plans[r]!, l, answers.get(r)!, false);
    }
  }

  /** Queues a step with host-path ranks (one host wait per layer, for all of them together). */
  private async queueMixed(plans: Array<RankPlan | undefined>, ranks: number[], onDevice: boolean[],
    logitsHost: Array<HostBuffer | undefined>, used: Set<number>): Promise<void> {
    const hostRanks = ranks.filter((r) => !onDevice[r]);
    for (const r of ranks) this.begin(r, plans[r]!);
    for (let l = 0; l < this.config.layers; l++) {
      // (A) attention and router; the event marks the top-k ids (and their download).
      const routed = new Map<number, Event | undefined>();
      for (const r of ranks) routed.set(r, this.attentionAndRouter(r, plans[r]!, l, !onDevice[r]));
      // (B) routed experts: the device path's first (nothing to wait for), then the host path's;
      // each rank's events of other computing devices.
      const answers = new Map<number, Event[]>();
      for (const r of ranks) if (onDevice[r]) answers.set(r, this.expertsOnDevice(r, plans[r]!, l, routed.get(r), used));
      // Sync point (host path only): the host builds the expert row lists from the top-k ids.
      if (hostRanks.length > 0) await Promise.all(hostRanks.map((r) => routed.get(r)!.synchronize()));
      for (const r of hostRanks) answers.set(r, this.expertsOnHost(r, plans[r]!, l, used));
      // (C) combination on each rank's own device, in k order.
      for (const r of ranks) this.combine(r, plans[r]!, l, answers.get(r)!, !onDevice[r]);
    }
    for (const r of ranks) this.head(r, plans[r]!, logitsHost[r]);
  }

  // ---- graphs

  /**
   * Runs an all-device-path step as graphs, one per rank: each rank's step (its attention, its
   * expert rows on every computing device, its combination and head) is a graph of its own, keyed
   * by the rank and its padded shape, so a rank's graph replays whatever the other ranks run.
   * Launches each rank's cached graph after refilling its host buffer, then captures and launches
   * the ranks whose shape has none, and waits once per rank. False when the step is to run as
   * usual instead: a rank's shape has not been seen captureAfter times yet or captures are paused
   * (nothing was queued), or graphs turned off (what was launched has run to the end first; the
   * step's rerun rewrites the same KV slots).
   */
  private async runGraph(plans: Array<RankPlan | undefined>, ranks: number[]): Promise<boolean> {
    const padded = plans.map((p) => p && this.padBlockTable(this.padToBucket(p)));
    const keys = new Map(ranks.map((r) => [r, shapeKey(r, padded[r]!)]));
    const uncached = () => ranks.filter((r) => !this.graphCache.has(keys.get(r)!));
    let missing = uncached();
    if (missing.length > 0) {
      // Each sighting of a shape with no graph counts (least recently seen dropped first).
      const seen = new Map<number, number>();
      for (const r of missing) {
        const key = keys.get(r)!;
        const n = (this.graphSightings.get(key) ?? 0) + 1;
        this.graphSightings.delete(key); // most recently seen last
        this.graphSightings.set(key, n);
        seen.set(r, n);
      }
      while (this.graphSightings.size > 4 * this.maxGraphs) this.graphSightings.delete(this.graphSightings.keys().next().value!);
      // A shape that a cached graph of its rank covers replays that graph, padded up to it, until
      // its coveredCaptureAfter-th sighting (and while captures are paused): the first steps of a
      // new layout, whose ranks pass through shapes they will not keep, then capture nothing.
      // At most one such shape is captured per step (a capture holds the step: the ranks of a new
      // layout reach their shapes' sightings together), the others stay covered meanwhile.
      let covered = 0;
      let ownCapture = false;
      for (const r of missing) {
        const cover = this.coverFor(r, padded[r]!);
        if (!cover) continue;
        if (!this.capturesPaused && !ownCapture && seen.get(r)! >= this.coveredCaptureAfter) {
          ownCapture = true;
          continue;
        }
        padded[r] = cover;
        keys.set(r, shapeKey(r, cover));
        covered++;
      }
      missing = uncached();
      // A shape seen fewer than captureAfter times runs as usual (the caller queues the step), and so
      // does every shape while captures are paused: a step runs as graphs only when every rank can.
      if (missing.length > 0 && (this.capturesPaused || missing.some((r) => seen.get(r)! < this.captureAfter))) {
        this.graphCounts.deferred++;
        return false;
      }
      for (const r of missing) this.graphSightings.delete(keys.get(r)!);
      this.graphCounts.covered += covered;
    }
    const step = new Set(keys.values());
    // The step's cached graphs become the most recently used (last), so that caching its new
    // ones evicts others.
    for (const key of step) {
      const hit = this.graphCache.get(key);
      if (!hit) continue;
      this.graphCache.delete(key);
      this.graphCache.set(key, hit);
    }
    // Ranks with a graph launch first, so that their GPUs run while the host captures (and the
    // thread pool instantiates) the missing ranks' graphs: the first steps of a rank that joined
    // in a scale overlap the others' replays instead of waiting behind its captures. A rank's
    // graph uses only its own scratch on every device, so it runs beside another rank's capture.
    const missingSet = new Set(missing);
    const launched: number[] = [];
    const launch = (r: number) => {
      this.fillMeta(r, padded[r]!);
      this.graphCache.get(keys.get(r)!)!.graph.launch(this.devs[r]!.stream);
      launched.push(r);
    };
    try {
      for (const r of ranks) if (!missingSet.has(r)) launch(r);
      for (const r of missing) {
        this.graphCounts.capturesBegun++;
        const graph = await this.capture(padded, [r], 0);
        if (!graph) {
          // Graphs turned off: those launched run to the end; the caller then runs the step as usual
          // (it rewrites the same KV slots).
          await Promise.all(launched.map((j) => this.devs[j]!.stream.synchronize()));
          return false;
        }
        this.graphCounts.captures++;
        this.lastStepCaptures.push(shapeOf(r, padded[r]!));
        this.cacheGraph(keys.get(r)!, { graph, shape: shapeOf(r, padded[r]!) }, step);
        launch(r);
      }
    } catch (e) {
      // Nothing of this engine may be reused while launched graphs still run.
      await Promise.allSettled(launched.map((j) => this.devs[j]!.stream.synchronize()));
      if (!(e instanceof NotSupportedError)) throw e;
      this.disableGraphs(e);
      return false;
    }
    this.graphCounts.replays += ranks.length - missing.length;
    // One host wait per rank: its stream joined every other stream of its graph. Events recorded
    // outside the captures, after the launches.
    await Promise.all(ranks.map((r) => this.event(r).record(this.devs[r]!.stream).synchronize()));
    return true;
  }

  /**
   * Caches a graph, evicting (and disposing) the least recently used beyond maxGraphs, never one of
   * `keep` (the graphs of the step being made: with fewer maxGraphs than its ranks, the cache holds
   * them all until a later step evicts them).
   */
  private cacheGraph(key: string, entry: CachedGraph, keep: ReadonlySet<string> = new Set()): void {
    for (const oldest of [...this.graphCache.keys()]) {
      if (this.graphCache.size < this.maxGraphs) break;
      if (keep.has(oldest)) continue;
      this.graphCache.get(oldest)!.graph.dispose();
      this.graphCache.delete(oldest);
      this.graphCounts.evicted++;
    }
    this.graphCache.set(key, entry);
  }

  /**
   * Captures an all-device-path step of `ranks` (queued exactly as queueOnDevice queues it) into a
   * graph, with a turn of the event loop every `layersPerTurn` layers (0: none, the capture is then
   * synchronous). Undefined when the backend refused (NotSupportedError): graphs are then off, and
   * nothing ran. While it waits for a turn, nothing else may queue work on this engine's streams
   * (precapture holds the engine busy).
   */
  private async capture(plans: Array<RankPlan | undefined>, ranks: number[], layersPerTurn: number): Promise<Graph | undefined> {
    const first = ranks[0]!;
    const os = this.devs[first]!.stream;
    // Every device the step queues work on: its ranks' and their computing devices' (static).
    const joined = new Set<number>(ranks);
    for (const r of ranks) for (const list of this.computers[r]!) for (const e of list) joined.add(e);
    const others = [...joined].filter((j) => j !== first).sort((a, b) => a - b);
    try {
      os.beginCapture();
    } catch (e) {
      if (!(e instanceof NotSupportedError)) throw e;
      this.disableGraphs(e);
      return undefined;
    }
    this.capturing = true;
    let ending = false;
    try {
      // Fork: every other stream joins the capture.
      const fork = this.event(first).record(os);
      for (const j of others) this.devs[j]!.stream.wait(fork);
      const used = new Set(ranks);
      for (const r of ranks) this.begin(r, plans[r]!);
      const L = this.config.layers;
      const step = layersPerTurn > 0 ? layersPerTurn : L;
      for (let l = 0; l < L; l += step) {
        if (l > 0) {
          this.capturing = false;
          await new Promise<void>((resolve) => setImmediate(resolve));
          if (this.disposed) throw new InvalidArgumentError('engine', 'not disposed while it captures');
          this.capturing = true;
        }
        this.queueLayers(plans, ranks, l, Math.min(L, l + step), used);
      }
      for (const r of ranks) this.head(r, plans[r]!, undefined);
      for (const j of used) {
        if (!joined.has(j)) throw new Error(`internal: device slot ${j} got work outside the step's static device set`);
      }
      // Join: the origin stream waits for each other stream's last captured work.
      for (const j of others) os.wait(this.event(j).record(this.devs[j]!.stream));
      this.capturing = false;
      ending = true;
      // Both end the capture even when they fail; the thread pool instantiates while this
      // thread serves other engines' steps.
      const graph = this.instantiate === 'inline' ? os.endCapture() : await os.endCaptureAsync();
      if (this.disposed) {
        graph.dispose();
        throw new InvalidArgumentError('engine', 'not disposed while it captures');
      }
      return graph;
    } catch (e) {
      this.capturing = false;
      if (!ending) {
        try {
          os.endCapture().dispose();
        } catch {
          // Ended either way; the first error is the one to report.
        }
      }
      if (!(e instanceof NotSupportedError)) throw e;
      this.disableGraphs(e);
      return undefined;
    }
  }

  /**
   * The shapes of the graphs cached now, most recently used first, with the device of their rank:
   * what a standby engine for another layout may capture ahead (precapture), mapping each device
   * to its rank there.
   */
  graphShapes(): GraphShape[] {
    return [...this.graphCache.values()].reverse().map(({ shape }) => ({ ...shape, device: this.layout.devices[shape.rank]! }));
  }

  /** Of `shapes`, those precapture would capture now: possible for this engine and not cached. */
  uncachedShapes(shapes: readonly GraphShape[]): GraphShape[] {
    if (this.graphsOff !== undefined) return [];
    return shapes.filter((shape) => {
      const plan = this.syntheticPlan(shape);
      return plan !== undefined && !this.graphCache.has(shapeKey(shape.rank, plan));
    });
  }

  /**
   * Captures the graphs of the given rank shapes ahead of their first step (a standby engine does
   * it while the serving one still runs: its next steps replay at once), with a turn of the event
   * loop every `layersPerTurn` layers (default 2) so that an engine serving in this process issues
   * its steps in between. Shapes already cached, or not possible for this engine, are skipped.
   * Resolves with the number captured; the engine is busy meanwhile (step() refuses).
   */
  async precapture(shapes: readonly GraphShape[], options: { layersPerTurn?: number } = {}): Promise<number> {
    if (this.disposed) throw new InvalidArgumentError('engine', 'not disposed');
    if (this.busy) throw new InvalidArgumentError('precapture', 'called while no step runs');
    const layersPerTurn = options.layersPerTurn ?? PRECAPTURE_LAYERS_PER_TURN;
    if (!Number.isSafeInteger(layersPerTurn) || layersPerTurn < 1) throw new InvalidArgumentError('layersPerTurn', 'a positive integer');
    if (this.graphsOff !== undefined) return 0;
    this.busy = true;
    let made = 0;
    try {
      for (const shape of shapes) {
        if (this.graphsOff !== undefined || this.disposed) break;
        const plan = this.syntheticPlan(shape);
        if (!plan) continue;
        const key = shapeKey(shape.rank, plan);
        if (this.graphCache.has(key)) continue;
        const plans: Array<RankPlan | undefined> = [];
        plans[shape.rank] = plan;
        const graph = await this.capture(plans, [shape.rank], layersPerTurn);
        if (!graph) break;
        this.cacheGraph(key, { graph, shape: shapeOf(shape.rank, plan) });
        this.graphCounts.precaptured++;
        made++;
      }
    } finally {
      for (const d of this.devs) d.captureEventsUsed = 0;
      this.busy = false;
    }
    return made;
  }

  /**
   * A plan with a graph shape's sizes (its contents are placeholders: a graph reads the metadata
   * from the host buffer when it runs), or undefined when no step of this engine has that shape:
   * rank out of range, a padded size that padToBucket would not produce, beyond the buffers.
   */
  private syntheticPlan(g: GraphShape): RankPlan | undefined {
    const { rank, T, S, MB, sampled } = g;
    const ok = Number.isSafeInteger(rank) && rank >= 0 && rank < this.devs.length && [T, S, MB, sampled].every(Number.isSafeInteger) &&
      S >= 1 && T >= S && T <= this.maxTokensPerStep && T * this.config.topK <= this.deviceRoutingMaxRows &&
      stepBucket(T) === T && stepBucket(S) === S && MB >= 1 && MB <= this.MBmax && (MB & (MB - 1)) === 0 && sampled >= 0 && sampled <= S;
    if (!ok) return undefined;
    const seqs: SeqPlan[] = Array.from({ length: S }, (_, i) => ({ seqId: '', sample: i < sampled, lastRow: i, padding: true }));
    return {
      T, S, MB, tokens: new Int32Array(T), tokSeq: new Int32Array(T), tokPos: new Int32Array(T).fill(-1), kvSlot: new Int32Array(T).fill(-1),
      blockTable: new Int32Array(S * MB), seqs, sampled: seqs.slice(0, sampled),
    };
  }

  /** Turns graphs off for the engine (the backend cannot capture or replay) and frees the cached ones. */
  private disableGraphs(e: Error): void {
    this.graphsOff = `${e.name}: ${e.message}`;
    for (const g of this.graphCache.values()) g.graph.dispose();
    this.graphCache.clear();
  }

  /**
   * A plan padded up to the step buckets (stepBucket) for a graph: S' - S padding sequences of
   * one token each (the last takes any tokens left to reach T'), token id 0 at position -1
   * with KV slot -1 (attention gives them a zero row, the KV store skips them), block table
   * rows of block 0, sampled (they get an argmax nobody reads: step() reads the real
   * sequences', which come first). Rows never mix, so the real rows' results are the same bits
   * as unpadded. The plan itself when it is already on a bucket, or when the padded step
   * would leave the device path or the buffers (maxTokensPerStep, deviceRoutingMaxRows).
   */
  private padToBucket(p: RankPlan, sAtLeast = p.S): RankPlan {
    let S = stepBucket(Math.max(p.S, sAtLeast));
    let T = stepBucket(p.T + S - p.S);
    if (T > p.T + S - p.S && S === p.S) {
      // Tokens to pad but no padding sequence to own them: one more sequence.
      S = stepBucket(p.S + 1);
      T = stepBucket(p.T + S - p.S);
    }
    const maxT = Math.min(this.maxTokensPerStep, Math.floor(this.deviceRoutingMaxRows / this.config.topK));
    if ((T === p.T && S === p.S) || T > maxT) return p;
    return this.padWith(p, S, T);
  }

  /**
   * The cached graph of rank r that covers the (padded) plan p with the least tokens (then
   * sequences, then block-table stride), p padded up to its shape: its S - p.S more sequences
   * are padding ones, all sampled, that own its T - p.T more tokens (at least one each, at most
   * COVER_MAX_EXTRA_TOKENS), and its stride is at least p's. Undefined when none does.
   */
  private coverFor(r: number, p: RankPlan): RankPlan | undefined {
    const maxT = p.T + COVER_MAX_EXTRA_TOKENS;
    let best: GraphShape | undefined;
    for (const { shape: g } of this.graphCache.values()) {
      const extraS = g.S - p.S;
      const extraT = g.T - p.T;
      if (g.rank !== r || g.T > maxT || extraS < 0 || g.MB < p.MB || extraT < extraS || (extraT > 0 && extraS === 0)) continue;
      if (g.sampled !== p.sampled.length + extraS) continue;
      if (!best || g.T < best.T || (g.T === best.T && (g.S < best.S || (g.S === best.S && g.MB < best.MB)))) best = g;
    }
    return best && this.padBlockTable(this.padWith(p, best.S, best.T), best.MB);
  }

  /**
   * p with S - p.S padding sequences of one token each (the last takes any tokens left to reach T):
   * token id 0 at position -1 with KV slot -1, block table rows of block 0, sampled. Needs S > p.S
   * when T > p.T, and T - p.T >= S - p.S.
   */
  private padWith(p: RankPlan, S: number, T: number): RankPlan {
    if (S === p.S && T === p.T) return p;
    const pad = <A extends Int32Array>(a: A, n: number, fill: number) => {
      const out = new Int32Array(n).fill(fill);
      out.set(a);
      return out;
    };
    const tokSeq = pad(p.tokSeq, T, 0);
    const seqs = [...p.seqs];
    const sampled = [...p.sampled];
    for (let i = 0; i < S - p.S; i++) {
      const first = p.T + i;
      const last = i === S - p.S - 1 ? T - 1 : first;
      for (let row = first; row <= last; row++) tokSeq[row] = p.S + i;
      const q: SeqPlan = { seqId: '', sample: true, lastRow: last, padding: true };
      seqs.push(q);
      sampled.push(q);
    }
    return {
      T, S, MB: p.MB, tokens: pad(p.tokens, T, 0), tokSeq, tokPos: pad(p.tokPos, T, -1), kvSlot: pad(p.kvSlot, T, -1),
      blockTable: pad(p.blockTable, S * p.MB, 0), seqs, sampled,
    };
  }

  /** A plan whose block table stride MB is `atLeast` rounded up to a power of two (at most MBmax), rows padded with block 0. */
  private padBlockTable(p: RankPlan, atLeast = p.MB): RankPlan {
    let MB = 1;
    while (MB < Math.max(p.MB, atLeast)) MB *= 2;
    MB = Math.min(MB, this.MBmax);
    if (MB === p.MB) return p;
    const blockTable = new Int32Array(p.S * MB);
    for (let i = 0; i < p.S; i++) blockTable.set(p.blockTable.subarray(i * p.MB, (i + 1) * p.MB), i * MB);
    return { ...p, MB, blockTable };
  }

  /** Device pointers into a rank's step metadata (device layout = host layout, offsets for Tmax). */
  private metaOf(b: Buffers) {
    const Tmax = this.maxTokensPerStep;
    return {
      tokens: b.meta,
      tokSeq: b.meta.add(Tmax * 4),
      tokPos: b.meta.add(2 * Tmax * 4),
      kvSlot: b.meta.add(3 * Tmax * 4),
      lastRows: b.meta.add(4 * Tmax * 4),
      blockTable: b.meta.add(5 * Tmax * 4),
    };
  }

  /** Writes the step's metadata into the rank's host buffer (what begin() uploads, and a graph's upload reads). */
  private fillMeta(r: number, p: RankPlan): void {
    const Tmax = this.maxTokensPerStep;
    const h32 = this.devs[r]!.hostI32;
    h32.set(p.tokens, 0);
    h32.set(p.tokSeq, Tmax);
    h32.set(p.tokPos, 2 * Tmax);
    h32.set(p.kvSlot, 3 * Tmax);
    p.sampled.forEach((q, i) => (h32[4 * Tmax + i] = q.lastRow));
    h32.set(p.blockTable, 5 * Tmax);
  }

  /** The step's metadata (one upload from the pinned host buffer) and the embedding, on the rank's stream. */
  private begin(r: number, p: RankPlan): void {
    const dev = this.devs[r]!;
    const { stream: s, kernels: kn, buf: b } = dev;
    const Tmax = this.maxTokensPerStep;
    this.fillMeta(r, p);
    s.upload(b.meta, dev.host, (5 * Tmax + p.S * p.MB) * 4, this.hostLayout.meta * 4);
    kn.embed(s, { out: b.x, table: dev.model.embed, tokens: b.meta, T: p.T, H: this.H, V: this.config.vocabSize });
  }

  /**
   * Phase A of layer l for rank r: attention block, router top-k (its ids downloaded to the host
   * when `download`), an event recorded after them, then the shared expert. Returns the event
   * (none for the device path when r's own device computes all of the layer's experts for it).
   */
  private attentionAndRouter(r: number, p: RankPlan, l: number, download: boolean): Event | undefined {
    const c = this.config;
    const dev = this.devs[r]!;
    const { stream: s, kernels: kn, buf: b } = dev;
    const w = dev.layers[l]!;
    const { T, S, MB } = p;
    const { H, QD, KVD } = this;
    const NH = c.heads, KVH = c.kvHeads, D = c.headDim, E = c.experts, K = c.topK;
    const eps = c.rmsNormEps;
    const { tokSeq, tokPos, kvSlot, blockTable } = this.metaOf(b);
    const kvg = { KVH, D, L: c.layers, BS: this.blockTokens, blocks: dev.kv.spanBlocks, dtype: this.kvDtype };
    kn.rmsnorm(s, { out: b.xn, x: b.x, w: w.inputNorm, R: T, N: H, eps });
    // q, k and v in one launch (three above QKV_FUSED_MAX_ROWS tokens).
    kn.matmulQkv(s, { q: b.q, k: b.k, v: b.v, x: b.xn, wq: w.q, wk: w.k, wv: w.v, M: T, Nq: QD, Nkv: KVD, K: H });
    if (w.qBias) {
      kn.addBias(s, { x: b.q, b: w.qBias, M: T, N: QD });
      kn.addBias(s, { x: b.k, b: w.kBias!, M: T, N: KVD });
      kn.addBias(s, { x: b.v, b: w.vBias!, M: T, N: KVD });
    }
    // q/k RMSNorm per head (qwen3_moe) and rope of q and k: one launch (rope only without q/k norm).
    kn.qkNormRope(s, { q: b.q, k: b.k, qNorm: w.qNorm, kNorm: w.kNorm, pos: tokPos, T, NH, KVH, D, eps, theta: c.ropeTheta });
    kn.kvStore(s, { pool: dev.kv.base, k: b.k, v: b.v, slots: kvSlot, T, layer: l, ...kvg });
    kn.attention(s, {
      out: b.att, q: b.q, pool: dev.kv.base, blockTable, tokSeq, tokPos, T, NH, layer: l, MB, scale: 1 / Math.sqrt(D), S, ...kvg,
    });
    kn.matmul(s, { out: b.proj, x: b.att, w: w.o, M: T, N: H, K: QD });
    // Residual add and the post-attention norm in one launch.
    kn.addRmsnorm(s, { x: b.x, y: b.proj, xn: b.xn, w: w.postNorm, R: T, N: H, eps });

    // Router.
    kn.matmul(s, { out: b.routerLogits, x: b.xn, w: w.router, M: T, N: E, K: H });
    kn.routerTopk(s, { ids: b.ids, weights: b.wts, logits: b.routerLogits, T, E, K, renorm: c.normTopK });
    if (download) s.download(dev.host, b.ids, T * K * 4, this.hostLayout.ids * 4);
    const routed = download || this.computers[r]![l]!.some((e) => e !== r) ? this.event(r).record(s) : undefined;
    // The shared expert (qwen2_moe) needs no routing: queue it behind the routing's event.
    if (w.shared) {
      const Sh = c.sharedIntermediate;
      kn.matmul(s, { out: b.sharedGate!, x: b.xn, w: w.shared.gate, M: T, N: Sh, K: H });
      kn.matmul(s, { out: b.sharedUp!, x: b.xn, w: w.shared.up, M: T, N: Sh, K: H });
      kn.siluMul(s, { out: b.sharedGate!, gate: b.sharedGate!, up: b.sharedUp!, n: T * Sh });
      kn.matmul(s, { out: b.sharedOut!, x: b.sharedGate!, w: w.shared.down, M: T, N: H, K: Sh });
      kn.matmul(s, { out: b.sharedLogit!, x: b.xn, w: w.shared.gateLogit, M: T, N: 1, K: H });
      kn.sigmoidScaleRows(s, { y: b.sharedOut!, g: b.sharedLogit!, T, H });
    }
    return routed;
  }

  /**
   * Phase B, device path: each computing device of rank r's layer l routes, gathers, runs the expert
   * FFN over its rows and scatters them into r's `slots`, all on its own stream with no host wait.
   * Returns the events of the devices other than r's.
   */
  private expertsOnDevice(r: number, p: RankPlan, l: number, routed: Event | undefined, used: Set<number>): Event[] {
    const c = this.config;
    const E = c.experts, K = c.topK, L = c.layers, I = c.expertIntermediate;
    const H = this.H;
    const { T } = p;
    const TK = T * K;
    const b = this.devs[r]!.buf;
    const answers: Event[] = [];
    const maxActive = Math.min(E, TK);
    for (const e of this.expertOrder[r]![l]!) {
      const dev = this.devs[e]!;
      const { stream: s, kernels: kn, buf: eb } = dev;
      const x = eb.lent![r]!; // e's scratch for r's rows
      used.add(e);
      if (e !== r) s.wait(routed!);
      const rowOffsets = x.routeOffsets;
      const count = rowOffsets.add(E * 4);
      const active = x.routeActive;
      kn.routeRows(s, {
        rowOffsets, rows: x.routeRows, perm: x.routePerm, active, ids: b.ids, route: eb.routeTable!.add((r * L + l) * E * 4),
        device: e, T, K, E,
      });
      kn.gatherRowsCount(s, { out: x.recv, x: b.xn, rows: x.routeRows, count, M: TK, H, R: T });
      // Only the experts with rows, a block row for each of at most min(E, T*K) of them.
      const table = eb.weightTable!;
      const at = l * 3 * E * 8;
      kn.groupedMatmul(s, { rowOffsets, active, maxActive, G: E, M: TK, out: x.expGate, x: x.recv, weights: table.add(at), N: I, K: H });
      kn.groupedMatmul(s, { rowOffsets, active, maxActive, G: E, M: TK, out: x.expUp, x: x.recv, weights: table.add(at + E * 8), N: I, K: H });
      kn.siluMulCount(s, { out: x.expGate, gate: x.expGate, up: x.expUp, count, M: TK, N: I });
      kn.groupedMatmul(s, { rowOffsets, active, maxActive, G: E, M: TK, out: x.recv, x: x.expGate, weights: table.add(at + 2 * E * 8), N: H, K: I });
      kn.scatterRowsCount(s, { out: b.slots, x: x.recv, rows: x.routePerm, count, M: TK, H, R: TK });
      if (e !== r) answers.push(this.event(e).record(s));
    }
    return answers;
  }

  /**
   * Phase B, host path (the ids are on the host): builds and uploads the row lists, gathers the
   * rows into `sorted` and runs each device's segment. Returns the events of the devices other than r's.
   */
  private expertsOnHost(r: number, p: RankPlan, l: number, used: Set<number>): Event[] {
    const c = this.config;
    const dev = this.devs[r]!;
    const { stream: s, kernels: kn, buf: b } = dev;
    const { T } = p;
    const K = c.topK, TK = T * K;
    const H = this.H;
    const hl = this.hostLayout;
    const h32 = dev.hostI32;
    const listsAt = hl.lists + l * hl.listStride;
    const { segments, words } = this.routeRows(dev, l, h32.subarray(hl.ids, hl.ids + TK), T, listsAt);
    s.upload(b.lists, dev.host, words * 4, listsAt * 4);
    const rows = b.lists.add(TK * 4);
    kn.gatherRows(s, { out: b.sorted, x: b.xn, rows, M: TK, H, R: T });
    const gathered = segments.some((g) => g.rank !== r) ? this.event(r).record(s) : undefined;
    const answers: Event[] = [];
    // Other devices' segments first, then r's own, so r's stream does not wait before its own work.
    for (const seg of [...segments.filter((g) => g.rank !== r), ...segments.filter((g) => g.rank === r)]) {
      const at = b.sorted.add(seg.offset * H * 4);
      const meta = b.lists.add(seg.meta * 4);
      if (seg.rank === r) {
        this.expertFfn(dev, l, seg, meta, at, at, s);
        continue;
      }
      const other = this.devs[seg.rank]!;
      const os = other.stream;
      const bytes = seg.rows * H * 4;
      used.add(seg.rank);
      os.wait(gathered!);
      os.copy(other.buf.recv, at, bytes);
      this.expertFfn(other, l, seg, meta, other.buf.recv, other.buf.recv, os);
      os.copy(at, other.buf.recv, bytes);
      answers.push(this.event(seg.rank).record(os));
    }
    return answers;
  }

  /** Phase C: waits for the other computing devices, [host path: scatter sorted → slots], combineTopk in k order. */
  private combine(r: number, p: RankPlan, l: number, answers: Event[], scatter: boolean): void {
    const c = this.config;
    const dev = this.devs[r]!;
    const { stream: s, kernels: kn, buf: b } = dev;
    const { T } = p;
    const K = c.topK, TK = T * K, H = this.H;
    for (const e of answers) s.wait(e);
    if (scatter) kn.scatterRows(s, { out: b.slots, x: b.sorted, rows: b.lists, M: TK, H, R: TK });
    if (dev.layers[l]!.shared) {
      // HF order: (routed + shared) + residual; combineTopk adds the routed sum to sharedOut.
      kn.combineTopk(s, { out: b.sharedOut!, slots: b.slots, weights: b.wts, T, K, H });
      kn.add(s, { out: b.x, a: b.x, b: b.sharedOut!, n: T * H });
    } else {
      kn.combineTopk(s, { out: b.x, slots: b.slots, weights: b.wts, T, K, H });
    }
  }

  /** Final norm and LM head on the sampled sequences' last tokens only, argmax, downloads. */
  private head(r: number, p: RankPlan, logitsHost: HostBuffer | undefined): void {
    const dev = this.devs[r]!;
    const { stream: s, kernels: kn, buf: b } = dev;
    const { H } = this;
    const V = this.config.vocabSize;
    const R = p.sampled.length;
    if (R === 0) return;
    kn.gatherRows(s, { out: b.lastX, x: b.x, rows: this.metaOf(b).lastRows, M: R, H, R: p.T });
    kn.rmsnorm(s, { out: b.lastX, x: b.lastX, w: dev.model.finalNorm, R, N: H, eps: this.config.rmsNormEps });
    for (let g0 = 0; g0 < R; g0 += this.lmHeadRows) {
      const n = Math.min(this.lmHeadRows, R - g0);
      kn.matmul(s, { out: b.lmLogits, x: b.lastX.add(g0 * H * 4), w: dev.model.lmHead, M: n, N: V, K: H });
      kn.argmax(s, { out: b.argOut.add(g0 * 4), x: b.lmLogits, R: n, N: V });
      if (logitsHost) s.download(logitsHost, b.lmLogits, n * V * 4, g0 * V * 4);
    }
    s.download(dev.host, b.argOut, R * 4, this.hostLayout.argmax * 4);
  }

  /**
   * Sorts the rank's T*K (token, k) pairs by (computing device, grouped or large, expert,
   * token) and writes, into the host buffer at i32 offset `at`, the permutation (sorted row
   * → t*K + k), the gather rows (sorted row → t) and each segment's grouped-launch arrays
   * (Segment.meta). Returns the per-device segments and the words written.
   */
  private routeRows(dev: DeviceState, layer: number, ids: Int32Array, T: number, at: number): { segments: Segment[]; words: number } {
    const E = this.config.experts, K = this.config.topK, TK = T * K;
    const nd = this.devs.length;
    const route = dev.route;
    const keyOf = (x: number) => route[layer * E + x]! * E + x;
    const counts = new Int32Array(nd * E);
    for (let i = 0; i < TK; i++) {
      const x = ids[i]!;
      if (!(x >= 0 && x < E)) throw new InvalidArgumentError('router', `expert ids in 0..${E - 1} from emoe_router_topk (got ${x})`);
      counts[keyOf(x)]!++;
      this.observed[layer * E + x]!++;
    }
    const h32 = dev.hostI32;
    const starts = new Int32Array(nd * E); // first sorted row of each key
    const segments: Segment[] = [];
    let pos = 0;
    let meta = alignEven(2 * TK);
    for (let rank = 0; rank < nd; rank++) {
      const offset = pos;
      const grouped: ExpertGroup[] = [];
      const large: ExpertGroup[] = [];
      for (const big of [false, true]) {
        for (let x = 0; x < E; x++) {
          const m = counts[rank * E + x]!;
          if (m === 0 || (m > this.groupedLimit) !== big) continue;
          starts[rank * E + x] = pos;
          (big ? large : grouped).push({ expert: x, offset: pos - offset, rows: m });
          pos += m;
        }
      }
      if (pos === offset) continue;
      const groupedRows = large.length > 0 ? large[0]!.offset : pos - offset;
      segments.push({ rank, offset, rows: pos - offset, grouped, groupedRows, meta, large });
      const G = grouped.length;
      if (G === 0) continue;
      // Addresses of the computing device's replicas: gate [G], up [G], down [G] (u64), then offsets [G + 1].
      const addr = this.devs[rank]!.expertWords;
      for (let q = 0; q < G; q++) {
        const src = (layer * E + grouped[q]!.expert) * 6;
        for (let j = 0; j < 3; j++) {
          h32[at + meta + 2 * (j * G + q)] = addr[src + 2 * j]!;
          h32[at + meta + 2 * (j * G + q) + 1] = addr[src + 2 * j + 1]!;
        }
        h32[at + meta + 6 * G + q] = grouped[q]!.offset;
      }
      h32[at + meta + 7 * G] = groupedRows;
      meta = alignEven(meta + 7 * G + 1);
    }
    for (let i = 0; i < TK; i++) {
      const j = starts[keyOf(ids[i]!)]!++;
      h32[at + j] = i; // perm: sorted row j holds (t, k) = row i of slots
      h32[at + TK + j] = Math.floor(i / K); // gather: token t
    }
    return { segments, words: meta };
  }

  /**
   * Routed experts' FFN over a segment's rows [input, input + rows) on `dev` (output may be
   * input): the grouped experts in three grouped matmuls, the large ones one matmul each.
   * `meta` is the segment's grouped-launch arrays (on the rank's device, readable by `dev`).
   */
  private expertFfn(dev: DeviceState, layer: number, seg: Segment, meta: DevicePointer, input: DevicePointer,
    output: DevicePointer, s: Stream): void {
    const c = this.config;
    const H = this.H, I = c.expertIntermediate;
    const kn = dev.kernels;
    const b = dev.buf;
    const G = seg.grouped.length;
    const rowOffsets = meta.add(6 * G * 4);
    const grouped = (matrix: number, out: DevicePointer, x: DevicePointer, N: number, K: number) =>
      kn.groupedMatmul(s, { out, x, weights: meta.add(matrix * G * 8), rowOffsets, G, M: seg.groupedRows, N, K });
    if (G > 0) {
      grouped(0, b.expGate, input, I, H);
      grouped(1, b.expUp, input, I, H);
    }
    for (const g of seg.large) {
      const w = dev.experts[layer * c.experts + g.expert]!;
      const x = input.add(g.offset * H * 4);
      kn.matmul(s, { out: b.expGate.add(g.offset * I * 4), x, w: w.gate, M: g.rows, N: I, K: H });
      kn.matmul(s, { out: b.expUp.add(g.offset * I * 4), x, w: w.up, M: g.rows, N: I, K: H });
    }
    kn.siluMul(s, { out: b.expGate, gate: b.expGate, up: b.expUp, n: seg.rows * I });
    if (G > 0) grouped(2, output, b.expGate, H, I);
    for (const g of seg.large) {
      const w = dev.experts[layer * c.experts + g.expert]!;
      kn.matmul(s, { out: output.add(g.offset * H * 4), x: b.expGate.add(g.offset * I * 4), w: w.down, M: g.rows, N: H, K: I });
    }
  }

  /** Frees graphs, scratch, streams, events and kernels. Call only when no step is running. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    const graphs = [...this.graphCache.values()];
    this.graphCache.clear();
    runEach([...graphs.map((g) => () => g.graph.dispose()), ...this.devs.map((s) => () => ForwardEngine.disposeState(s))]);
  }

  /**
   * dispose() in pieces with a turn of the event loop between them (a few graphs, then each
   * device's resources), for an engine released while another one serves in this process:
   * disposed at once, a 3-device engine held the loop for 27-78 ms right after a scale's first
   * new step (4 x H200). Unusable from the first call; resolves with the time spent per piece.
   */
  async disposeAsync(graphsPerTurn = 4): Promise<{ ms: number; maxBlockMs: number; pieces: number }> {
    const stats = { ms: 0, maxBlockMs: 0, pieces: 0 };
    if (this.disposed) return stats;
    this.disposed = true;
    const graphs = [...this.graphCache.values()];
    this.graphCache.clear();
    const pieces: Array<() => void> = [];
    for (let i = 0; i < graphs.length; i += graphsPerTurn) {
      pieces.push(() => runEach(graphs.slice(i, i + graphsPerTurn).map((g) => () => g.graph.dispose())));
    }
    for (const s of this.devs) pieces.push(() => ForwardEngine.disposeState(s));
    // Each piece whatever the others do; the first error is rethrown once all have run.
    let failed: { error: unknown } | undefined;
    for (const piece of pieces) {
      if (stats.pieces > 0) await new Promise<void>((resolve) => setImmediate(resolve));
      const t = performance.now();
      try {
        piece();
      } catch (e) {
        failed ??= { error: e };
      }
      const ms = performance.now() - t;
      stats.ms += ms;
      stats.maxBlockMs = Math.max(stats.maxBlockMs, ms);
      stats.pieces++;
    }
    if (failed) throw failed.error;
    return stats;
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}
