// Typed launchers of the model kernels (CUDA source in ./source.ts, CPU twins in
// native/backends/mock/model_kernels.cc, references in ./reference.ts).
//
// Each method validates its sizes (an InvalidArgumentError naming the field), checks
// that every pointer of a statically known extent has that many bytes left in its
// virtual range and is aligned for its element type, chooses grid and block itself
// (grid-stride kernels, grids capped at 65535), and queues one launch on the stream.
// A call with nothing to do (T, M, R or n = 0) queues nothing.
//
// Buffers whose extent depends on data (the embedding table, the KV pool, a block
// table, gather sources and scatter targets) take an optional size (V, blocks, S, R)
// that, when given, is checked too; the kernels themselves trust the indices.
import { InvalidArgumentError } from '../../runtime/errors.js';
import { type Kernel, type KernelArg, type Module, arg } from '../../runtime/kernel.js';
import { DevicePointer } from '../../runtime/memory.js';
import type { Runtime } from '../../runtime/runtime.js';
import type { Dim3, Event, Stream } from '../../runtime/stream.js';
import { MODEL_KERNELS_SOURCE, MODEL_KERNEL_NAMES, type ModelKernelName } from './source.js';

export { MODEL_KERNELS_SOURCE, MODEL_KERNEL_NAMES, type ModelKernelName } from './source.js';

const U32_MAX = 0xffffffff;
const MAX_GRID = 65535;
/** x floats emoe_grouped_matmul_bf16 stages in shared memory at most (EMOE_GMM_SMEM_FLOATS: 48 KiB). */
const GMM_SMEM_FLOATS = 12288;
const BLOCK = 256;
/**
 * Rows per group slot (on average, M / slots) up to which the tensor-core grouped matmul takes its
 * few-rows tiling (16-row passes, 128-k stages). Same bits either way. 2 x H100, gate + up + down
 * per layer, all 128 experts on one GPU, against the CUDA-core kernel (scripts/gmm-mma-bench.sh,
 * 2026-11-26 11:19 UTC): few-rows 0.92x / 1.36x / 3.67x at 1 / 8 / 128 tokens (1, 1.2 and 8 rows per
 * active expert) against 0.73x / 1.29x / 3.52x; at 256 tokens (16 per expert) 4.67x against 6.10x.
 */
const MMA_FEWROWS_MAX = 8;
/** Largest head dim emoe_attention supports (registers per lane: 8 dims). */
export const MAX_HEAD_DIM = 256;
/** Largest expert count emoe_router_topk supports (E floats of shared memory, 48 KiB). */
export const MAX_EXPERTS = 12288;
/** Largest T*K emoe_route_rows takes (its pairs' keys and ranks live in shared memory). */
export const MAX_ROUTE_ROWS = 4096;
/** Largest expert count emoe_route_rows takes ((2 * MAX_ROUTE_ROWS + E + 1) i32 of shared memory stay within 48 KiB). */
export const MAX_ROUTE_EXPERTS = 2048;
/**
 * Largest M that matmulQkv computes in one launch (emoe_matmul_qkv_bf16, emoe_matmul_bf16's warp-per-column
 * path); above it, three matmul launches (the tiled path).
 */
export const QKV_FUSED_MAX_ROWS = 64;

/**
 * Element type of the paged KV cache: 'bf16' (the default: half the memory) or 'f32' (K and V
 * exactly as computed, so that the whole forward pass runs in f32: for comparisons with an f32
 * or f64 reference, where a bf16 rounding of K or V can flip a near-tied greedy token).
 */
export type KvDtype = 'bf16' | 'f32';

/** `value` as a KvDtype, or an InvalidArgumentError naming `field`. */
export function checkKvDtype(field: string, value: unknown): KvDtype {
  if (value !== 'bf16' && value !== 'f32') {
    throw new InvalidArgumentError(field, `'bf16' or 'f32', the KV cache's element type (got ${typeof value === 'string' ? `'${value}'` : String(value)})`);
  }
  return value;
}

/** Bytes of one KV cache element. */
export function kvDtypeBytes(dtype: KvDtype): 2 | 4 {
  return checkKvDtype('kvDtype', dtype) === 'f32' ? 4 : 2;
}

function u32(name: string, value: number, min = 0): number {
  if (!Number.isInteger(value) || value < min || value > U32_MAX) {
    throw new InvalidArgumentError(name, `an integer in [${min}, ${U32_MAX}] (got ${String(value)})`);
  }
  return value;
}

function count(name: string, value: number): number {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new InvalidArgumentError(name, `a non-negative safe integer (got ${String(value)})`);
  }
  return value;
}

function f32(name: string, value: number, { positive = false } = {}): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || (positive ? !(value > 0) : false)) {
    throw new InvalidArgumentError(name, `a finite${positive ? ' positive' : ''} number (got ${String(value)})`);
  }
  if (!Number.isFinite(Math.fround(value))) throw new InvalidArgumentError(name, 'representable as f32');
  return value;
}

/** A pointer with `elements` elements of `bytesPer` bytes left in its range, aligned to bytesPer. */
function ptr(name: string, p: DevicePointer, elements: number, bytesPer: number): DevicePointer {
  if (!(p instanceof DevicePointer)) throw new InvalidArgumentError(name, 'a DevicePointer');
  if (p.address % BigInt(bytesPer) !== 0n) {
    throw new InvalidArgumentError(name, `aligned to ${bytesPer} bytes (address ${p.toString()})`);
  }
  const bytes = elements * bytesPer;
  if (bytes > p.range.size - p.offset) {
    throw new InvalidArgumentError(name,
      `a pointer with ${bytes} bytes left in its range (offset ${p.offset} of ${p.range.size})`);
  }
  return p;
}

/** Rejects two buffers of one range that overlap without being the same buffer. */
function disjoint(name: string, a: DevicePointer, aBytes: number, other: string, b: DevicePointer, bBytes: number): void {
  if (a.range !== b.range || aBytes === 0 || bBytes === 0) return;
  if (a.offset < b.offset + bBytes && b.offset < a.offset + aBytes) {
    throw new InvalidArgumentError(name, `a buffer that does not overlap ${other}`);
  }
}

function gridFor(work: number, perBlock: number): number {
  return Math.max(1, Math.min(MAX_GRID, Math.ceil(work / perBlock)));
}

export interface EmbedArgs {
  /** [T, H] f32 */ out: DevicePointer;
  /** [V, H] bf16 */ table: DevicePointer;
  /** [T] i32 */ tokens: DevicePointer;
  T: number;
  H: number;
  /** Vocabulary size, to check the table's extent (optional). */
  V?: number;
}
export interface RmsnormArgs {
  /** [R, N] f32; may be the same buffer as x */ out: DevicePointer;
  /** [R, N] f32 */ x: DevicePointer;
  /** [N] bf16 */ w: DevicePointer;
  R: number;
  N: number;
  eps: number;
}
export interface MatmulArgs {
  /** [M, N] f32 (must not overlap x) */ out: DevicePointer;
  /** [M, K] f32 */ x: DevicePointer;
  /** [N, K] bf16, row-major as in Hugging Face (out_features, in_features) */ w: DevicePointer;
  M: number;
  N: number;
  K: number;
}
export interface GroupedMatmulArgs {
  /** [M, N] f32 (must not overlap x); rows outside rowOffsets[0]..rowOffsets[G]-1 are left as they are */ out: DevicePointer;
  /** [M, K] f32 */ x: DevicePointer;
  /**
   * [G] u64: the device address of each group's [N, K] bf16 matrix (row-major, as in Hugging Face).
   * The kernel trusts them; a group of 0 rows never reads its entry.
   */
  weights: DevicePointer;
  /** [G + 1] i32, non-decreasing, in 0..M: group g is rows rowOffsets[g]..rowOffsets[g+1]-1 */ rowOffsets: DevicePointer;
  /**
   * Optional [G + 1] i32 active list (as routeRows writes it): active[0] = A in 0..G, then A group ids
   * in 0..G-1. Given, only the listed groups run (the others' offsets, addresses and rows are not
   * touched) and a listed group's rows get exactly the bits the launch without the list gives them;
   * a count or id out of range is a launch failure (the kernel traps; the mock: illegal address).
   * Absent: every group runs.
   */
  active?: DevicePointer;
  /**
   * With `active` only: an upper bound on the list's count A that sizes the launch's group
   * dimension (grid.y = min(G, maxActive, 65535); any value is correct, the kernel strides over
   * the list). Default G. The device-routed FFN passes min(E, T*K): no more experts have rows.
   */
  maxActive?: number;
  G: number;
  M: number;
  N: number;
  K: number;
}
export interface AddBiasArgs {
  /** [M, N] f32, in place */ x: DevicePointer;
  /** [N] bf16 */ b: DevicePointer;
  M: number;
  N: number;
}
export interface RopeArgs {
  /** [T, heads, D] f32, in place */ x: DevicePointer;
  /** [T] i32 */ pos: DevicePointer;
  T: number;
  heads: number;
  D: number;
  theta: number;
}
export interface QkNormRopeArgs {
  /** [T, NH, D] f32, in place */ q: DevicePointer;
  /** [T, KVH, D] f32, in place (must not overlap q) */ k: DevicePointer;
  /** [D] bf16: q_norm's weight; given with kNorm (per-head RMSNorm, then rope) or neither (rope only) */ qNorm?: DevicePointer | undefined;
  /** [D] bf16: k_norm's weight */ kNorm?: DevicePointer | undefined;
  /** [T] i32 */ pos: DevicePointer;
  T: number;
  NH: number;
  KVH: number;
  D: number;
  /** The RMSNorm epsilon; required with the norm weights, ignored without. */
  eps?: number;
  theta: number;
}
export interface MatmulQkvArgs {
  /** [M, Nq] f32 */ q: DevicePointer;
  /** [M, Nkv] f32 */ k: DevicePointer;
  /** [M, Nkv] f32 */ v: DevicePointer;
  /** [M, K] f32 (must not overlap q, k or v) */ x: DevicePointer;
  /** [Nq, K] bf16 */ wq: DevicePointer;
  /** [Nkv, K] bf16 */ wk: DevicePointer;
  /** [Nkv, K] bf16 */ wv: DevicePointer;
  M: number;
  Nq: number;
  Nkv: number;
  K: number;
}
export interface AddRmsnormArgs {
  /** [R, N] f32, the residual: x += y in place */ x: DevicePointer;
  /** [R, N] f32: rmsnorm(x + y) * w (must not overlap x or y) */ xn: DevicePointer;
  /** [R, N] f32 (must not overlap x) */ y: DevicePointer;
  /** [N] bf16 */ w: DevicePointer;
  R: number;
  N: number;
  eps: number;
}
export interface KvGeometry {
  KVH: number;
  D: number;
  layer: number;
  /** Layers held in each KV block. */
  L: number;
  /** Tokens per KV block. */
  BS: number;
  /** Blocks in the pool, to check its extent (optional). */
  blocks?: number;
  /** Element type of the pool (default 'bf16'): picks the kernel (emoe_kv_store / emoe_attention, or their _f32 twins). */
  dtype?: KvDtype;
}
export interface KvStoreArgs extends KvGeometry {
  /** pool of `dtype` elements: block b at b * L*2*BS*KVH*D elements, inside [layer][k|v][slot][KVH][D] */ pool: DevicePointer;
  /** [T, KVH, D] f32 */ k: DevicePointer;
  /** [T, KVH, D] f32 */ v: DevicePointer;
  /** [T] i32: block * BS + offset; negative = skip (padding) */ slots: DevicePointer;
  T: number;
}
export interface AttentionArgs extends KvGeometry {
  /** [T, NH, D] f32 (must not overlap q) */ out: DevicePointer;
  /** [T, NH, D] f32 */ q: DevicePointer;
  pool: DevicePointer;
  /** [S, MB] i32 */ blockTable: DevicePointer;
  /** [T] i32: the sequence (row of blockTable) of each token */ tokSeq: DevicePointer;
  /** [T] i32: the position of each token; keys 0..pos are attended; negative = zero output */ tokPos: DevicePointer;
  T: number;
  NH: number;
  /** Block-table columns (blocks per sequence). */
  MB: number;
  scale: number;
  /** Sequences in the block table, to check its extent (optional). */
  S?: number;
}
export interface RouterTopkArgs {
  /** [T, K] i32 */ ids: DevicePointer;
  /** [T, K] f32 */ weights: DevicePointer;
  /** [T, E] f32 */ logits: DevicePointer;
  T: number;
  E: number;
  K: number;
  /** Divide the K weights by their sum (qwen3_moe norm_topk_prob, mixtral). */
  renorm: boolean;
}
export interface SiluMulArgs {
  /** [n] f32 */ out: DevicePointer;
  /** [n] f32 */ gate: DevicePointer;
  /** [n] f32 */ up: DevicePointer;
  n: number;
}
export interface GatherRowsArgs {
  /** [M, H] f32 (must not overlap x) */ out: DevicePointer;
  /** [R, H] f32 */ x: DevicePointer;
  /** [M] i32 */ rows: DevicePointer;
  M: number;
  H: number;
  /** Rows of x, to check its extent (optional). */
  R?: number;
}
export interface ScatterRowsArgs {
  /** [R, H] f32 (must not overlap x) */ out: DevicePointer;
  /** [M, H] f32 */ x: DevicePointer;
  /** [M] i32, distinct */ rows: DevicePointer;
  M: number;
  H: number;
  /** Rows of out, to check its extent (optional). */
  R?: number;
}
export interface RouteRowsArgs {
  /**
   * [E + 1] i32, written: rowOffsets[x]..rowOffsets[x+1]-1 are expert x's sorted rows when route[x] = device,
   * none otherwise; rowOffsets[E] is the total (the row count of the *Count launchers).
   */
  rowOffsets: DevicePointer;
  /** [T*K] i32, written below the total: sorted row → token t */ rows: DevicePointer;
  /** [T*K] i32, written below the total: sorted row → slot t*K + k */ perm: DevicePointer;
  /**
   * [E + 1] i32, written: active[0] = A, the number of experts with rows on this device (at most
   * min(E, T*K)), and active[1..A] those experts in ascending order (groupedMatmul's `active`); the
   * entries past A are not written.
   */
  active: DevicePointer;
  /** [T, K] i32: the rank's top-k expert ids, in 0..E-1 (may be another device's memory) */ ids: DevicePointer;
  /** [E] i32: for each expert, the index of the device that computes it for the rank */ route: DevicePointer;
  /** The index (in route's numbering) of the device this launch routes for. */
  device: number;
  T: number;
  K: number;
  E: number;
}
export interface GatherRowsCountArgs extends GatherRowsArgs {
  /** [1] i32: rows to gather, in 0..M (M is the upper bound the buffers are sized for) */ count: DevicePointer;
}
export interface ScatterRowsCountArgs extends ScatterRowsArgs {
  /** [1] i32: rows to scatter, in 0..M */ count: DevicePointer;
}
export interface SiluMulCountArgs {
  /** [M, N] f32 */ out: DevicePointer;
  /** [M, N] f32 */ gate: DevicePointer;
  /** [M, N] f32 */ up: DevicePointer;
  /** [1] i32: rows to compute, in 0..M */ count: DevicePointer;
  M: number;
  N: number;
}
export interface CombineTopkArgs {
  /** [T, H] f32, accumulated into (must not overlap slots) */ out: DevicePointer;
  /** [T*K, H] f32: row t*K + k is token t's k-th expert output */ slots: DevicePointer;
  /** [T, K] f32 */ weights: DevicePointer;
  T: number;
  K: number;
  H: number;
}
export interface SigmoidScaleRowsArgs {
  /** [T, H] f32, in place */ y: DevicePointer;
  /** [T] f32 */ g: DevicePointer;
  T: number;
  H: number;
}
export interface ArgmaxArgs {
  /** [R] i32 */ out: DevicePointer;
  /** [R, N] f32 */ x: DevicePointer;
  R: number;
  N: number;
}
export interface CopyArgs {
  out: DevicePointer;
  x: DevicePointer;
  n: number;
}
export interface AddArgs {
  /** may be the same buffer as a */ out: DevicePointer;
  a: DevicePointer;
  b: DevicePointer;
  n: number;
}

/** The model kernels loaded on one device, with one typed launcher per kernel. */
/** A device's model-kernel module, shared by every ModelKernels of one runtime on it. */
interface SharedModule {
  module: Promise<Module>;
  refs: number;
}
const sharedModules = new WeakMap<Runtime, Map<number, SharedModule>>();

/** One profiled launch (ModelKernels.profile): timing events recorded around it on its stream. */
export interface KernelTiming {
  name: ModelKernelName;
  device: number;
  start: Event;
  end: Event;
}
/** Where launches are recorded while profiling (a diagnostic: graphs must be off meanwhile). */
let profileSink: KernelTiming[] | undefined;

export type GroupedMatmulKernel = 'tensor-cores' | 'cuda-cores';

/**
 * The grouped matmul every device of a runtime runs (one for all, since the two differ by rounding
 * and a row's result must not depend on which device computes it): `choice` when forced, else
 * tensor cores when every device has them for bf16 (compute capability 8.0 and later; the mock's
 * twin serves both names), else CUDA cores. Forcing tensor cores on a device without them is an error.
 */
export function groupedMatmulKernel(backend: string, capabilities: readonly string[],
  choice: 'auto' | GroupedMatmulKernel = 'auto'): GroupedMatmulKernel {
  const lacking = backend === 'mock' ? [] : capabilities.filter((cc) => !(Number.parseFloat(cc) >= 8));
  if (choice === 'cuda-cores') return choice;
  if (choice === 'tensor-cores' && lacking.length > 0) {
    throw new InvalidArgumentError('groupedMatmul', `cuda-cores or auto: tensor cores need compute capability 8.0 or later (${backend} devices have ${capabilities.map((c) => c || 'none').join(', ')})`);
  }
  return lacking.length === 0 ? 'tensor-cores' : 'cuda-cores';
}
const groupedKernels = new WeakMap<Runtime, GroupedMatmulKernel>();

/** The grouped matmul `rt`'s devices run: groupedMatmulKernel of its backend, devices and option, decided once per runtime. */
export function runtimeGroupedMatmul(rt: Runtime): GroupedMatmulKernel {
  let chosen = groupedKernels.get(rt);
  if (!chosen) {
    chosen = groupedMatmulKernel(rt.backend, rt.devices().map((d) => d.computeCapability), rt.options.groupedMatmul);
    groupedKernels.set(rt, chosen);
  }
  return chosen;
}

export class ModelKernels implements Disposable {
  private readonly kernels: Map<ModelKernelName, Kernel>;
  private released = false;
  /** The grouped matmul this runtime's devices run (runtimeGroupedMatmul). */
  readonly groupedKernel: GroupedMatmulKernel;

  private constructor(readonly module: Module, readonly device: number, private readonly release: () => void,
    private readonly rt: Runtime) {
    this.kernels = new Map(MODEL_KERNEL_NAMES.map((name) => [name, module.kernel(name)]));
    this.groupedKernel = runtimeGroupedMatmul(rt);
  }

  /**
   * Compiles (cuda: NVRTC) or resolves (mock: CPU twins) every model kernel on `device`. The
   * module is loaded once per runtime and device and shared while any ModelKernels of it is
   * alive (reference counted; unloaded with the last dispose): a scale's standby engine then
   * pays no module load on the devices it shares with the serving one (H200: 100-190 ms of
   * the attach phase), and a deployment can keep the kernels of idle devices loaded ahead.
   */
  static async load(rt: Runtime, device: number): Promise<ModelKernels> {
    let perRt = sharedModules.get(rt);
    if (!perRt) sharedModules.set(rt, (perRt = new Map()));
    const table = perRt;
    let shared = table.get(device);
    if (!shared) {
      const entry: SharedModule = {
        module: rt.loadModule(device, { format: 'cuda', data: MODEL_KERNELS_SOURCE, name: 'emoe_model_kernels.cu' }),
        refs: 0,
      };
      shared = entry;
      table.set(device, entry);
      // A failed load is not cached: the next call tries again.
      entry.module.catch(() => { if (table.get(device) === entry) table.delete(device); });
    }
    shared.refs++;
    const entry = shared;
    const release = () => {
      if (--entry.refs > 0) return;
      if (table.get(device) === entry) table.delete(device);
      entry.module.then((m) => m.dispose(), () => undefined);
    };
    let module: Module;
    try {
      module = await entry.module;
    } catch (e) {
      entry.refs--;
      throw e;
    }
    try {
      return new ModelKernels(module, device, release, rt);
    } catch (e) {
      release();
      throw e;
    }
  }

  /**
   * Diagnostics: while `sink` is set, every launch of every ModelKernels records a pair of
   * timing events around it on its stream and pushes them to `sink` (the caller synchronizes,
   * reads elapsed times and disposes the events). The events serialize launches with the host
   * a little; steps must run without graphs meanwhile (a capture would record the events).
   * `undefined` stops it.
   */
  static profile(sink: KernelTiming[] | undefined): void {
    profileSink = sink;
  }

  private launch(stream: Stream, name: ModelKernelName, grid: Dim3, block: number, args: KernelArg[], sharedBytes = 0): void {
    if (stream.device !== this.device) {
      throw new InvalidArgumentError('stream', `a stream on device ${this.device} (got device ${stream.device})`);
    }
    const sink = profileSink;
    const start = sink && this.rt.createEvent(this.device, { timing: true }).record(stream);
    stream.launch(this.kernels.get(name)!, { grid, block, sharedBytes }, args);
    if (sink) sink.push({ name, device: this.device, start: start!, end: this.rt.createEvent(this.device, { timing: true }).record(stream) });
  }

  /** out[t, :] = table[tokens[t], :] as f32. */
  embed(stream: Stream, a: EmbedArgs): void {
    const T = u32('T', a.T);
    const H = u32('H', a.H, 1);
    ptr('out', a.out, T * H, 4);
    ptr('tokens', a.tokens, T, 4);
    ptr('table', a.table, a.V === undefined ? 0 : u32('V', a.V, 1) * H, 2);
    if (T === 0) return;
    this.launch(stream, 'emoe_embed', gridFor(T * H, BLOCK), BLOCK,
      [a.out, a.table, a.tokens, arg.u32(T), arg.u32(H)]);
  }

  /** out = x / sqrt(mean(x^2) + eps) * w per row of N. */
  rmsnorm(stream: Stream, a: RmsnormArgs): void {
    const R = u32('R', a.R);
    const N = u32('N', a.N, 1);
    const eps = f32('eps', a.eps);
    if (eps < 0) throw new InvalidArgumentError('eps', 'non-negative');
    ptr('out', a.out, R * N, 4);
    ptr('x', a.x, R * N, 4);
    ptr('w', a.w, N, 2);
    if (R === 0) return;
    if (a.out.range === a.x.range && a.out.offset !== a.x.offset) disjoint('out', a.out, R * N * 4, 'x', a.x, R * N * 4);
    this.launch(stream, 'emoe_rmsnorm', Math.min(R, MAX_GRID), BLOCK,
      [a.out, a.x, a.w, arg.u32(R), arg.u32(N), arg.f32(eps)]);
  }

  /** out[M, N] = x[M, K] . w[N, K]^T with f32 accumulation. */
  matmul(stream: Stream, a: MatmulArgs): void {
    const M = u32('M', a.M);
    const N = u32('N', a.N, 1);
    const K = u32('K', a.K, 1);
    ptr('out', a.out, M * N, 4);
    ptr('x', a.x, M * K, 4);
    ptr('w', a.w, N * K, 2);
    if (M === 0) return;
    disjoint('out', a.out, M * N * 4, 'x', a.x, M * K * 4);
    // The kernel picks its path from (M, N) alone (emoe_matmul_path): M <= QKV_FUSED_MAX_ROWS
    // (EMOE_MATMUL_SMALL_ROWS), one warp per output column (8 per block); else 64x64 tiles
    // when there are at least 256 of them, 32x32 tiles otherwise; always 256 threads.
    const tile = M <= QKV_FUSED_MAX_ROWS ? 0 : Math.ceil(M / 64) * Math.ceil(N / 64) >= 256 ? 64 : 32;
    const grid = tile === 0 ? gridFor(N, BLOCK / 32) : Math.min(MAX_GRID, Math.ceil(M / tile) * Math.ceil(N / tile));
    this.launch(stream, 'emoe_matmul_bf16', grid, BLOCK, [a.out, a.x, a.w, arg.u32(M), arg.u32(N), arg.u32(K)]);
  }

  /**
   * Rows rowOffsets[g]..rowOffsets[g+1]-1 of out = the same rows of x . W_g^T for each group g (W_g at
   * weights[g]), f32 accumulation, one launch for all groups, or for the groups of the `active` list
   * only. A row's result does not depend on the other rows of its group nor on the list (on CUDA too:
   * both kernels' summation order is per row). Tensor cores (emoe_grouped_matmul_bf16_mma) or CUDA
   * cores (emoe_grouped_matmul_bf16): `groupedKernel`.
   */
  groupedMatmul(stream: Stream, a: GroupedMatmulArgs): void {
    const G = u32('G', a.G, 1);
    const M = u32('M', a.M);
    const N = u32('N', a.N, 1);
    const K = u32('K', a.K, 1);
    ptr('out', a.out, M * N, 4);
    ptr('x', a.x, M * K, 4);
    ptr('weights', a.weights, G, 8);
    ptr('rowOffsets', a.rowOffsets, G + 1, 4);
    const listed = a.active !== undefined;
    if (listed) ptr('active', a.active!, G + 1, 4);
    let slots = G;
    if (a.maxActive !== undefined) {
      if (!listed) throw new InvalidArgumentError('maxActive', 'given only with an active list');
      slots = Math.min(G, u32('maxActive', a.maxActive, 1));
    }
    if (M === 0) return;
    disjoint('out', a.out, M * N * 4, 'x', a.x, M * K * 4);
    if (listed) disjoint('out', a.out, M * N * 4, 'active', a.active!, (G + 1) * 4);
    const grid2 = Math.min(slots, MAX_GRID);
    const args = [a.out, a.x, a.weights, a.rowOffsets, listed ? a.active! : arg.u64(0), arg.u32(G), arg.u32(M), arg.u32(N), arg.u32(K)];
    if (this.groupedKernel === 'tensor-cores') {
      // 128 output columns (8 warps) of one group per block: grid (columns / 128, group slots). Up
      // to MMA_FEWROWS_MAX rows per group slot on average, the tiling for few rows (same bits).
      const name = M <= MMA_FEWROWS_MAX * grid2 ? 'emoe_grouped_matmul_bf16_mma_fewrows' : 'emoe_grouped_matmul_bf16_mma';
      this.launch(stream, name, [gridFor(N, 128), grid2], BLOCK, args);
      return;
    }
    // One warp per two output columns (16 per block) of one group: grid (columns / 16, group
    // slots), both capped; the kernel strides over columns and over the groups (all G, or the
    // listed ones: then at most maxActive slots are worth a block row). Dynamic shared memory
    // for the x rows the kernel stages (as many of 8 as GMM_SMEM_FLOATS holds; see the kernel).
    const staged = K % 8 === 0 && K <= GMM_SMEM_FLOATS ? Math.min(8, Math.floor(GMM_SMEM_FLOATS / K)) : 0;
    this.launch(stream, 'emoe_grouped_matmul_bf16', [gridFor(N, (BLOCK / 32) * 2), grid2], BLOCK, args, staged * K * 4);
  }

  /** x[M, N] += b[N]. */
  addBias(stream: Stream, a: AddBiasArgs): void {
    const M = u32('M', a.M);
    const N = u32('N', a.N, 1);
    ptr('x', a.x, M * N, 4);
    ptr('b', a.b, N, 2);
    if (M === 0) return;
    this.launch(stream, 'emoe_add_bias_bf16', gridFor(M * N, BLOCK), BLOCK, [a.x, a.b, arg.u32(M), arg.u32(N)]);
  }

  /** Rotary embedding in place (rotate_half / neox style) over x[T, heads, D]. */
  rope(stream: Stream, a: RopeArgs): void {
    const T = u32('T', a.T);
    const heads = u32('heads', a.heads, 1);
    const D = u32('D', a.D, 2);
    if (D % 2 !== 0) throw new InvalidArgumentError('D', `even (got ${D})`);
    const theta = f32('theta', a.theta, { positive: true });
    ptr('x', a.x, T * heads * D, 4);
    ptr('pos', a.pos, T, 4);
    if (T === 0) return;
    this.launch(stream, 'emoe_rope', gridFor(T * (D / 2), BLOCK), BLOCK,
      [a.x, a.pos, arg.u32(T), arg.u32(heads), arg.u32(D), arg.f32(theta)]);
  }

  /**
   * Per-head RMSNorm (qNorm, kNorm) then rotary embedding, in place, over q [T, NH, D] and k [T, KVH, D]
   * in one launch: rmsnorm(q rows), rmsnorm(k rows), rope(q), rope(k) (the same bits on the mock;
   * on CUDA too, see emoe_qk_norm_rope). Without the norm weights: rope(q) and rope(k) in one launch.
   */
  qkNormRope(stream: Stream, a: QkNormRopeArgs): void {
    const T = u32('T', a.T);
    const NH = u32('NH', a.NH, 1);
    const KVH = u32('KVH', a.KVH, 1);
    const D = u32('D', a.D, 2);
    if (D % 2 !== 0) throw new InvalidArgumentError('D', `even (got ${D})`);
    const theta = f32('theta', a.theta, { positive: true });
    const norm = a.qNorm !== undefined;
    if (a.kNorm !== undefined && !norm) throw new InvalidArgumentError('qNorm', 'given with kNorm (or neither)');
    if (norm && a.kNorm === undefined) throw new InvalidArgumentError('kNorm', 'given with qNorm (or neither)');
    let eps = 0;
    if (norm) {
      if (a.eps === undefined) throw new InvalidArgumentError('eps', 'given with the norm weights');
      eps = f32('eps', a.eps);
      if (eps < 0) throw new InvalidArgumentError('eps', 'non-negative');
    }
    const rows = T * (NH + KVH);
    if (!Number.isSafeInteger(rows * D)) throw new InvalidArgumentError('T', 'T * (NH + KVH) * D a safe integer');
    ptr('q', a.q, T * NH * D, 4);
    ptr('k', a.k, T * KVH * D, 4);
    if (norm) {
      ptr('qNorm', a.qNorm!, D, 2);
      ptr('kNorm', a.kNorm!, D, 2);
    }
    ptr('pos', a.pos, T, 4);
    if (T === 0) return;
    disjoint('k', a.k, T * KVH * D * 4, 'q', a.q, T * NH * D * 4);
    // One block per head row. With the norm: D threads (rounded up to a warp, at most 256), so a
    // row's sum of squares is emoe_rmsnorm's (256 threads) bit for bit; rope only: a thread per pair.
    const threads = Math.min(BLOCK, Math.ceil((norm ? D : D / 2) / 32) * 32);
    this.launch(stream, 'emoe_qk_norm_rope', Math.min(rows, MAX_GRID), threads, [
      a.q, a.k, norm ? a.qNorm! : arg.u64(0), norm ? a.kNorm! : arg.u64(0), a.pos,
      arg.u32(T), arg.u32(NH), arg.u32(KVH), arg.u32(D), arg.f32(eps), arg.f32(theta),
    ]);
  }

  /**
   * q = x . wq^T, k = x . wk^T, v = x . wv^T (f32 accumulation): one launch for M <= QKV_FUSED_MAX_ROWS
   * (each element the bits matmul gives it), else three matmul launches.
   */
  matmulQkv(stream: Stream, a: MatmulQkvArgs): void {
    const M = u32('M', a.M);
    const Nq = u32('Nq', a.Nq, 1);
    const Nkv = u32('Nkv', a.Nkv, 1);
    const K = u32('K', a.K, 1);
    ptr('q', a.q, M * Nq, 4);
    ptr('k', a.k, M * Nkv, 4);
    ptr('v', a.v, M * Nkv, 4);
    ptr('x', a.x, M * K, 4);
    ptr('wq', a.wq, Nq * K, 2);
    ptr('wk', a.wk, Nkv * K, 2);
    ptr('wv', a.wv, Nkv * K, 2);
    if (M === 0) return;
    const outs: Array<[string, DevicePointer, number]> = [['q', a.q, M * Nq * 4], ['k', a.k, M * Nkv * 4], ['v', a.v, M * Nkv * 4]];
    outs.forEach(([name, p, bytes], i) => {
      for (const [other, o, oBytes] of outs.slice(i + 1)) disjoint(name, p, bytes, other, o, oBytes);
      disjoint(name, p, bytes, 'x', a.x, M * K * 4);
    });
    if (M > QKV_FUSED_MAX_ROWS) {
      this.matmul(stream, { out: a.q, x: a.x, w: a.wq, M, N: Nq, K });
      this.matmul(stream, { out: a.k, x: a.x, w: a.wk, M, N: Nkv, K });
      this.matmul(stream, { out: a.v, x: a.x, w: a.wv, M, N: Nkv, K });
      return;
    }
    // One warp per output column of the Nq + 2 Nkv (8 per block), as matmul's M <= 16 path.
    this.launch(stream, 'emoe_matmul_qkv_bf16', gridFor(Nq + 2 * Nkv, BLOCK / 32), BLOCK, [
      a.q, a.k, a.v, a.x, a.wq, a.wk, a.wv, arg.u32(M), arg.u32(Nq), arg.u32(Nkv), arg.u32(K),
    ]);
  }

  /** x += y, then xn = x / sqrt(mean(x^2) + eps) * w per row of N: add then rmsnorm in one launch (the same bits). */
  addRmsnorm(stream: Stream, a: AddRmsnormArgs): void {
    const R = u32('R', a.R);
    const N = u32('N', a.N, 1);
    const eps = f32('eps', a.eps);
    if (eps < 0) throw new InvalidArgumentError('eps', 'non-negative');
    ptr('x', a.x, R * N, 4);
    ptr('xn', a.xn, R * N, 4);
    ptr('y', a.y, R * N, 4);
    ptr('w', a.w, N, 2);
    if (R === 0) return;
    disjoint('xn', a.xn, R * N * 4, 'x', a.x, R * N * 4);
    disjoint('xn', a.xn, R * N * 4, 'y', a.y, R * N * 4);
    disjoint('y', a.y, R * N * 4, 'x', a.x, R * N * 4);
    // 256 threads, as rmsnorm: the same per-thread sums and reduction.
    this.launch(stream, 'emoe_add_rmsnorm', Math.min(R, MAX_GRID), BLOCK,
      [a.x, a.xn, a.y, a.w, arg.u32(R), arg.u32(N), arg.f32(eps)]);
  }

  private kvGeometry(g: KvGeometry): { KVH: number; D: number; layer: number; L: number; BS: number; dtype: KvDtype } {
    const dtype = checkKvDtype('dtype', g.dtype ?? 'bf16');
    const KVH = u32('KVH', g.KVH, 1);
    const D = u32('D', g.D, 1);
    const L = u32('L', g.L, 1);
    const layer = u32('layer', g.layer);
    if (layer >= L) throw new InvalidArgumentError('layer', `less than L = ${L} (got ${layer})`);
    const BS = u32('BS', g.BS, 1);
    const blockElements = L * 2 * BS * KVH * D;
    if (!Number.isSafeInteger(blockElements)) throw new InvalidArgumentError('BS', 'a KV block size that fits a safe integer');
    return { KVH, D, layer, L, BS, dtype };
  }

  private checkPool(pool: DevicePointer, g: KvGeometry, dtype: KvDtype): void {
    const blocks = g.blocks === undefined ? 0 : count('blocks', g.blocks);
    ptr('pool', pool, blocks * g.L * 2 * g.BS * g.KVH * g.D, kvDtypeBytes(dtype));
  }

  /** Writes each token's K and V (rounded to bf16, or as they are for an f32 pool) into its slot of the paged cache at `layer`. */
  kvStore(stream: Stream, a: KvStoreArgs): void {
    const T = u32('T', a.T);
    const { KVH, D, layer, L, BS, dtype } = this.kvGeometry(a);
    ptr('k', a.k, T * KVH * D, 4);
    ptr('v', a.v, T * KVH * D, 4);
    ptr('slots', a.slots, T, 4);
    this.checkPool(a.pool, a, dtype);
    if (T === 0) return;
    this.launch(stream, dtype === 'f32' ? 'emoe_kv_store_f32' : 'emoe_kv_store', gridFor(T * KVH * D, BLOCK), BLOCK,
      [a.pool, a.k, a.v, a.slots, arg.u32(T), arg.u32(KVH), arg.u32(D), arg.u32(layer), arg.u32(L), arg.u32(BS)]);
  }

  /** Causal attention of each token over positions 0..tokPos[t] of its sequence in the paged cache. */
  attention(stream: Stream, a: AttentionArgs): void {
    const T = u32('T', a.T);
    const NH = u32('NH', a.NH, 1);
    const { KVH, D, layer, L, BS, dtype } = this.kvGeometry(a);
    if (NH % KVH !== 0) throw new InvalidArgumentError('KVH', `a divisor of NH = ${NH} (got ${KVH})`);
    if (D > MAX_HEAD_DIM) throw new InvalidArgumentError('D', `at most ${MAX_HEAD_DIM} (got ${D})`);
    const MB = u32('MB', a.MB, 1);
    const scale = f32('scale', a.scale);
    ptr('out', a.out, T * NH * D, 4);
    ptr('q', a.q, T * NH * D, 4);
    ptr('tokSeq', a.tokSeq, T, 4);
    ptr('tokPos', a.tokPos, T, 4);
    ptr('blockTable', a.blockTable, a.S === undefined ? 0 : count('S', a.S) * MB, 4);
    this.checkPool(a.pool, a, dtype);
    if (T === 0) return;
    disjoint('out', a.out, T * NH * D * 4, 'q', a.q, T * NH * D * 4);
    this.launch(stream, dtype === 'f32' ? 'emoe_attention_f32' : 'emoe_attention', Math.min(T * NH, MAX_GRID), 256, [
      a.out, a.q, a.pool, a.blockTable, a.tokSeq, a.tokPos, arg.u32(T), arg.u32(NH), arg.u32(KVH), arg.u32(D),
      arg.u32(layer), arg.u32(L), arg.u32(BS), arg.u32(MB), arg.f32(scale),
    ]);
  }

  /** Softmax over E experts, the K most probable in descending order, optionally renormalised. */
  routerTopk(stream: Stream, a: RouterTopkArgs): void {
    const T = u32('T', a.T);
    const E = u32('E', a.E, 1);
    if (E > MAX_EXPERTS) throw new InvalidArgumentError('E', `at most ${MAX_EXPERTS} (got ${E})`);
    const K = u32('K', a.K, 1);
    if (K > E) throw new InvalidArgumentError('K', `at most E = ${E} (got ${K})`);
    if (typeof a.renorm !== 'boolean') throw new InvalidArgumentError('renorm', 'a boolean');
    ptr('ids', a.ids, T * K, 4);
    ptr('weights', a.weights, T * K, 4);
    ptr('logits', a.logits, T * E, 4);
    if (T === 0) return;
    this.launch(stream, 'emoe_router_topk', Math.min(T, MAX_GRID), 32,
      [a.ids, a.weights, a.logits, arg.u32(T), arg.u32(E), arg.u32(K), arg.u32(a.renorm ? 1 : 0)], E * 4);
  }

  /** out = silu(gate) * up, element-wise. */
  siluMul(stream: Stream, a: SiluMulArgs): void {
    const n = count('n', a.n);
    ptr('out', a.out, n, 4);
    ptr('gate', a.gate, n, 4);
    ptr('up', a.up, n, 4);
    if (n === 0) return;
    this.launch(stream, 'emoe_silu_mul', gridFor(n, BLOCK), BLOCK, [a.out, a.gate, a.up, arg.u64(n)]);
  }

  /** out[i, :] = x[rows[i], :]. */
  gatherRows(stream: Stream, a: GatherRowsArgs): void {
    const M = u32('M', a.M);
    const H = u32('H', a.H, 1);
    ptr('out', a.out, M * H, 4);
    ptr('rows', a.rows, M, 4);
    ptr('x', a.x, a.R === undefined ? 0 : u32('R', a.R) * H, 4);
    if (M === 0) return;
    if (a.R !== undefined) disjoint('out', a.out, M * H * 4, 'x', a.x, a.R * H * 4);
    this.launch(stream, 'emoe_gather_rows', gridFor(M * H, BLOCK), BLOCK, [a.out, a.x, a.rows, arg.u32(M), arg.u32(H)]);
  }

  /** out[rows[i], :] = x[i, :] (rows distinct). */
  scatterRows(stream: Stream, a: ScatterRowsArgs): void {
    const M = u32('M', a.M);
    const H = u32('H', a.H, 1);
    ptr('x', a.x, M * H, 4);
    ptr('rows', a.rows, M, 4);
    ptr('out', a.out, a.R === undefined ? 0 : u32('R', a.R) * H, 4);
    if (M === 0) return;
    if (a.R !== undefined) disjoint('out', a.out, a.R * H * 4, 'x', a.x, M * H * 4);
    this.launch(stream, 'emoe_scatter_rows', gridFor(M * H, BLOCK), BLOCK, [a.out, a.x, a.rows, arg.u32(M), arg.u32(H)]);
  }

  /**
   * Routes a rank's T*K (token, k) pairs for one computing device, on the device: the experts that
   * route[] gives to `device` get their rows (stable: increasing (t, k) within an expert), the others
   * none, and the experts that got rows are listed in `active` (ascending). One block; no host round trip. An id outside 0..E-1 is a launch failure (illegal address).
   */
  routeRows(stream: Stream, a: RouteRowsArgs): void {
    const T = u32('T', a.T);
    const K = u32('K', a.K, 1);
    const E = u32('E', a.E, 1);
    const device = u32('device', a.device);
    if (device > 0x7fffffff) throw new InvalidArgumentError('device', `an i32 index (got ${device})`);
    if (E > MAX_ROUTE_EXPERTS) throw new InvalidArgumentError('E', `at most ${MAX_ROUTE_EXPERTS} (got ${E})`);
    const TK = T * K;
    if (TK > MAX_ROUTE_ROWS) throw new InvalidArgumentError('T', `T * K at most ${MAX_ROUTE_ROWS} (got ${T} * ${K})`);
    ptr('rowOffsets', a.rowOffsets, E + 1, 4);
    ptr('rows', a.rows, TK, 4);
    ptr('perm', a.perm, TK, 4);
    ptr('active', a.active, E + 1, 4);
    ptr('ids', a.ids, TK, 4);
    ptr('route', a.route, E, 4);
    if (T === 0) return;
    const outs: Array<[string, DevicePointer, number]> = [
      ['rowOffsets', a.rowOffsets, (E + 1) * 4], ['rows', a.rows, TK * 4], ['perm', a.perm, TK * 4], ['active', a.active, (E + 1) * 4],
    ];
    outs.forEach(([name, p, bytes], i) => {
      for (const [other, q, qBytes] of outs.slice(i + 1)) disjoint(name, p, bytes, other, q, qBytes);
      disjoint(name, p, bytes, 'ids', a.ids, TK * 4);
      disjoint(name, p, bytes, 'route', a.route, E * 4);
    });
    this.launch(stream, 'emoe_route_rows', 1, BLOCK,
      [a.rowOffsets, a.rows, a.perm, a.active, a.ids, a.route, arg.u32(device), arg.u32(T), arg.u32(K), arg.u32(E)],
      (2 * TK + E + 1) * 4);
  }

  /** gatherRows over the first *count rows (count in device memory, at most M; M sizes the buffers and the grid). */
  gatherRowsCount(stream: Stream, a: GatherRowsCountArgs): void {
    const M = u32('M', a.M);
    const H = u32('H', a.H, 1);
    ptr('out', a.out, M * H, 4);
    ptr('rows', a.rows, M, 4);
    ptr('count', a.count, 1, 4);
    ptr('x', a.x, a.R === undefined ? 0 : u32('R', a.R) * H, 4);
    if (M === 0) return;
    if (a.R !== undefined) disjoint('out', a.out, M * H * 4, 'x', a.x, a.R * H * 4);
    this.launch(stream, 'emoe_gather_rows_count', gridFor(M * H, BLOCK), BLOCK,
      [a.out, a.x, a.rows, a.count, arg.u32(M), arg.u32(H)]);
  }

  /** scatterRows over the first *count rows (count in device memory, at most M). */
  scatterRowsCount(stream: Stream, a: ScatterRowsCountArgs): void {
    const M = u32('M', a.M);
    const H = u32('H', a.H, 1);
    ptr('x', a.x, M * H, 4);
    ptr('rows', a.rows, M, 4);
    ptr('count', a.count, 1, 4);
    ptr('out', a.out, a.R === undefined ? 0 : u32('R', a.R) * H, 4);
    if (M === 0) return;
    if (a.R !== undefined) disjoint('out', a.out, a.R * H * 4, 'x', a.x, M * H * 4);
    this.launch(stream, 'emoe_scatter_rows_count', gridFor(M * H, BLOCK), BLOCK,
      [a.out, a.x, a.rows, a.count, arg.u32(M), arg.u32(H)]);
  }

  /** siluMul over the first *count rows of N elements (count in device memory, at most M). */
  siluMulCount(stream: Stream, a: SiluMulCountArgs): void {
    const M = u32('M', a.M);
    const N = u32('N', a.N, 1);
    ptr('out', a.out, M * N, 4);
    ptr('gate', a.gate, M * N, 4);
    ptr('up', a.up, M * N, 4);
    ptr('count', a.count, 1, 4);
    if (M === 0) return;
    this.launch(stream, 'emoe_silu_mul_count', gridFor(M * N, BLOCK), BLOCK, [a.out, a.gate, a.up, a.count, arg.u32(M), arg.u32(N)]);
  }

  /** out[t, :] += sum over k in order of weights[t, k] * slots[t*K + k, :]. */
  combineTopk(stream: Stream, a: CombineTopkArgs): void {
    const T = u32('T', a.T);
    const K = u32('K', a.K, 1);
    const H = u32('H', a.H, 1);
    ptr('out', a.out, T * H, 4);
    ptr('slots', a.slots, T * K * H, 4);
    ptr('weights', a.weights, T * K, 4);
    if (T === 0) return;
    disjoint('out', a.out, T * H * 4, 'slots', a.slots, T * K * H * 4);
    this.launch(stream, 'emoe_combine_topk', gridFor(T * H, BLOCK), BLOCK,
      [a.out, a.slots, a.weights, arg.u32(T), arg.u32(K), arg.u32(H)]);
  }

  /** y[t, :] *= sigmoid(g[t]). */
  sigmoidScaleRows(stream: Stream, a: SigmoidScaleRowsArgs): void {
    const T = u32('T', a.T);
    const H = u32('H', a.H, 1);
    ptr('y', a.y, T * H, 4);
    ptr('g', a.g, T, 4);
    if (T === 0) return;
    this.launch(stream, 'emoe_sigmoid_scale_rows', Math.min(T, MAX_GRID), BLOCK, [a.y, a.g, arg.u32(T), arg.u32(H)]);
  }

  /** out[r] = index of the first maximum of row r. */
  argmax(stream: Stream, a: ArgmaxArgs): void {
    const R = u32('R', a.R);
    const N = u32('N', a.N, 1);
    ptr('out', a.out, R, 4);
    ptr('x', a.x, R * N, 4);
    if (R === 0) return;
    this.launch(stream, 'emoe_argmax', Math.min(R, MAX_GRID), BLOCK, [a.out, a.x, arg.u32(R), arg.u32(N)]);
  }

  /** out[0..n) = x[0..n) (f32 elements). */
  copy(stream: Stream, a: CopyArgs): void {
    const n = count('n', a.n);
    ptr('out', a.out, n, 4);
    ptr('x', a.x, n, 4);
    if (n === 0) return;
    if (a.out.range === a.x.range && a.out.offset !== a.x.offset) disjoint('out', a.out, n * 4, 'x', a.x, n * 4);
    this.launch(stream, 'emoe_copy_f32', gridFor(n, BLOCK), BLOCK, [a.out, a.x, arg.u64(n)]);
  }

  /** out = a + b (f32 elements); out may be a. */
  add(stream: Stream, a: AddArgs): void {
    const n = count('n', a.n);
    ptr('out', a.out, n, 4);
    ptr('a', a.a, n, 4);
    ptr('b', a.b, n, 4);
    if (n === 0) return;
    this.launch(stream, 'emoe_add_f32', gridFor(n, BLOCK), BLOCK, [a.out, a.a, a.b, arg.u64(n)]);
  }

  dispose(): void {
    if (this.released) return;
    this.released = true;
    this.kernels.clear();
    this.release();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}
