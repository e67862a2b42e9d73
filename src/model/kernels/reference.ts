// Plain TypeScript references of the model kernels (src/model/kernels/source.ts),
// for tests. Each takes the kernel's arguments by name, with typed arrays in place of
// device pointers, and writes its outputs into them exactly as the kernel does
// (in place where the kernel is in place; `combine` accumulates into `out`).
//
// Every float operation is rounded with Math.fround in the same order as the mock's
// CPU twins (native/backends/mock/model_kernels.cc), so the two agree bit for bit:
// a product or sum of two floats computed in double and rounded once equals the float
// operation, as do division and square root. exp/pow/cos/sin are taken in double and
// rounded once, like the twins' (float)std::exp((double)x); V8 and glibc agree on
// those to far below a float ulp, so results differ only if a double result sits
// within ~2^-29 of a float rounding boundary.
const f = Math.fround;

const scratch = new DataView(new ArrayBuffer(4));

/** bf16 bits to f32 (exact). */
export function bf16ToF32(bits: number): number {
  scratch.setUint32(0, (bits & 0xffff) << 16, true);
  return scratch.getFloat32(0, true);
}

/** f32 to bf16 bits, round to nearest even; NaN stays a quiet NaN. */
export function f32ToBf16(value: number): number {
  scratch.setFloat32(0, value, true);
  let b = scratch.getUint32(0, true);
  if ((b & 0x7fffffff) >>> 0 > 0x7f800000) return ((b >>> 16) | 0x40) & 0xffff;
  b = (b + 0x7fff + ((b >>> 16) & 1)) >>> 0;
  return b >>> 16;
}

/** Rounds each value to bf16. */
export function toBf16(values: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = f32ToBf16(values[i]!);
  return out;
}

/** bf16 array to f32 values. */
export function fromBf16(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = bf16ToF32(bits[i]!);
  return out;
}

const expD = (x: number): number => f(Math.exp(x));

/** Elements per KV block in the pool: L * 2 * BS * KVH * D. */
export function kvBlockElements(o: { L: number; BS: number; KVH: number; D: number }): number {
  return o.L * 2 * o.BS * o.KVH * o.D;
}

/** Element offset of (block, layer, k|v, slot in block, kv head 0, dim 0) in the pool. */
export function kvOffset(o: { L: number; BS: number; KVH: number; D: number }, block: number, layer: number,
  kv: 0 | 1, slotInBlock: number): number {
  const row = o.KVH * o.D;
  return block * kvBlockElements(o) + ((layer * 2 + kv) * o.BS + slotInBlock) * row;
}

export function embed(o: { out: Float32Array; table: Uint16Array; tokens: Int32Array; T: number; H: number }): void {
  for (let t = 0; t < o.T; t++) {
    const base = o.tokens[t]! * o.H;
    for (let h = 0; h < o.H; h++) o.out[t * o.H + h] = bf16ToF32(o.table[base + h]!);
  }
}

/** out may be the same array as x. */
export function rmsnorm(o: { out: Float32Array; x: Float32Array; w: Uint16Array; R: number; N: number; eps: number }): void {
  const { R, N } = o;
  const eps = f(o.eps);
  for (let r = 0; r < R; r++) {
    let ss = 0;
    for (let j = 0; j < N; j++) {
      const v = o.x[r * N + j]!;
      ss = f(ss + f(v * v));
    }
    const mean = f(ss / N);
    const inv = f(1 / f(Math.sqrt(f(mean + eps))));
    for (let j = 0; j < N; j++) o.out[r * N + j] = f(f(o.x[r * N + j]! * inv) * bf16ToF32(o.w[j]!));
  }
}

export function matmul(o: { out: Float32Array; x: Float32Array; w: Uint16Array; M: number; N: number; K: number }): void {
  const { M, N, K } = o;
  const wf = new Float32Array(K);
  for (let n = 0; n < N; n++) {
    for (let k = 0; k < K; k++) wf[k] = bf16ToF32(o.w[n * K + k]!);
    for (let m = 0; m < M; m++) {
      let acc = 0;
      for (let k = 0; k < K; k++) acc = f(acc + f(o.x[m * K + k]! * wf[k]!));
      o.out[m * N + n] = acc;
    }
  }
}

/**
 * Grouped matmul: rows rowOffsets[g]..rowOffsets[g+1]-1 of out = the same rows of x . weights[g]^T
 * (weights[g] is group g's [N, K] bf16 matrix, where the kernel takes its device address). Each
 * element is `matmul`'s sequential dot product; rows outside the groups are left as they are.
 * With `active` (active[0] = A, then A group ids), only the listed groups, in list order; a count
 * outside 0..G or an id outside 0..G-1 throws (the kernel traps). A listed group's rows are the
 * same as without the list.
 */
export function groupedMatmul(o: {
  out: Float32Array; x: Float32Array; weights: ArrayLike<Uint16Array>; rowOffsets: Int32Array; active?: Int32Array;
  G: number; M: number; N: number; K: number;
}): void {
  const { G, N, K } = o;
  const wf = new Float32Array(K);
  for (const g of activeGroups(o.active, G)) {
    const r0 = o.rowOffsets[g]!, r1 = o.rowOffsets[g + 1]!;
    if (r1 <= r0) continue;
    const w = o.weights[g]!;
    for (let n = 0; n < N; n++) {
      for (let k = 0; k < K; k++) wf[k] = bf16ToF32(w[n * K + k]!);
      for (let m = r0; m < r1; m++) {
        let acc = 0;
        for (let k = 0; k < K; k++) acc = f(acc + f(o.x[m * K + k]! * wf[k]!));
        o.out[m * N + n] = acc;
      }
    }
  }
}

/** The groups a grouped launch visits: 0..G-1, or those of the active list (validated). */
function activeGroups(active: Int32Array | undefined, G: number): number[] {
  if (active === undefined) return Array.from({ length: G }, (_, g) => g);
  const A = active[0]!;
  if (!(A >= 0 && A <= G)) throw new RangeError(`active list count ${A} is outside 0..${G}`);
  const groups = Array.from(active.subarray(1, 1 + A));
  groups.forEach((g, a) => {
    if (!(g >= 0 && g < G)) throw new RangeError(`active list entry ${a + 1} is group ${g}, outside 0..${G - 1}`);
  });
  return groups;
}

export function addBias(o: { x: Float32Array; b: Uint16Array; M: number; N: number }): void {
  for (let m = 0; m < o.M; m++) {
    for (let n = 0; n < o.N; n++) o.x[m * o.N + n] = f(o.x[m * o.N + n]! + bf16ToF32(o.b[n]!));
  }
}

export function rope(o: { x: Float32Array; pos: Int32Array; T: number; heads: number; D: number; theta: number }): void {
  const { T, heads, D } = o;
  const theta = f(o.theta);
  const half = D / 2;
  for (let t = 0; t < T; t++) {
    for (let j = 0; j < half; j++) {
      const e = f((2 * j) / D);
      const p = f(Math.pow(theta, e));
      const inv = f(1 / p);
      const a = f(f(o.pos[t]!) * inv);
      const c = f(Math.cos(a));
      const s = f(Math.sin(a));
      for (let h = 0; h < heads; h++) {
        const b = (t * heads + h) * D;
        const x1 = o.x[b + j]!;
        const x2 = o.x[b + j + half]!;
        o.x[b + j] = f(f(x1 * c) - f(x2 * s));
        o.x[b + j + half] = f(f(x2 * c) + f(x1 * s));
      }
    }
  }
}

/**
 * emoe_qk_norm_rope: with norm weights (qw and kw), rmsnorm in place over q's T*NH and k's T*KVH
 * head rows of D, then rope over q and k; without, rope only. The unfused sequence, step by step.
 */
export function qkNormRope(o: {
  q: Float32Array; k: Float32Array; qw?: Uint16Array; kw?: Uint16Array; pos: Int32Array;
  T: number; NH: number; KVH: number; D: number; eps: number; theta: number;
}): void {
  const { T, NH, KVH, D } = o;
  if ((o.qw === undefined) !== (o.kw === undefined)) throw new RangeError('qkNormRope: both norm weights or neither');
  if (o.qw) {
    rmsnorm({ out: o.q, x: o.q, w: o.qw, R: T * NH, N: D, eps: o.eps });
    rmsnorm({ out: o.k, x: o.k, w: o.kw!, R: T * KVH, N: D, eps: o.eps });
  }
  rope({ x: o.q, pos: o.pos, T, heads: NH, D, theta: o.theta });
  rope({ x: o.k, pos: o.pos, T, heads: KVH, D, theta: o.theta });
}

/** emoe_matmul_qkv_bf16: q = x . wq^T [M, Nq], k = x . wk^T and v = x . wv^T [M, Nkv]. */
export function matmulQkv(o: {
  q: Float32Array; k: Float32Array; v: Float32Array; x: Float32Array; wq: Uint16Array; wk: Uint16Array; wv: Uint16Array;
  M: number; Nq: number; Nkv: number; K: number;
}): void {
  const { x, M, K } = o;
  matmul({ out: o.q, x, w: o.wq, M, N: o.Nq, K });
  matmul({ out: o.k, x, w: o.wk, M, N: o.Nkv, K });
  matmul({ out: o.v, x, w: o.wv, M, N: o.Nkv, K });
}

/** emoe_add_rmsnorm: x += y (in place), then xn = rmsnorm(x) * w, rows of N. */
export function addRmsnorm(o: { x: Float32Array; xn: Float32Array; y: Float32Array; w: Uint16Array; R: number; N: number; eps: number }): void {
  addF32({ out: o.x, a: o.x, b: o.y, n: o.R * o.N });
  rmsnorm({ out: o.xn, x: o.x, w: o.w, R: o.R, N: o.N, eps: o.eps });
}

/**
 * A KV pool: bf16 bits (emoe_kv_store / emoe_attention) or f32 elements (their _f32 twins). The array
 * type is the dtype, so kvStore and attention serve both with the same loops, as the twins do.
 */
export type KvPool = Uint16Array | Float32Array;

/** How the pool's elements are written and read: rounded to bf16 and back, or kept as f32. */
function kvCodec(pool: KvPool): { put: (x: number) => number; get: (e: number) => number } {
  return pool instanceof Float32Array ? { put: f, get: (e) => e } : { put: f32ToBf16, get: bf16ToF32 };
}

export function kvStore(o: {
  pool: KvPool; k: Float32Array; v: Float32Array; slots: Int32Array;
  T: number; KVH: number; D: number; layer: number; L: number; BS: number;
}): void {
  const { put } = kvCodec(o.pool);
  const row = o.KVH * o.D;
  for (let t = 0; t < o.T; t++) {
    const slot = o.slots[t]!;
    if (slot < 0) continue;
    const kb = kvOffset(o, Math.floor(slot / o.BS), o.layer, 0, slot % o.BS);
    const vb = kvOffset(o, Math.floor(slot / o.BS), o.layer, 1, slot % o.BS);
    for (let r = 0; r < row; r++) {
      o.pool[kb + r] = put(o.k[t * row + r]!);
      o.pool[vb + r] = put(o.v[t * row + r]!);
    }
  }
}

export function attention(o: {
  out: Float32Array; q: Float32Array; pool: KvPool; blockTable: Int32Array; tokSeq: Int32Array; tokPos: Int32Array;
  T: number; NH: number; KVH: number; D: number; layer: number; L: number; BS: number; MB: number; scale: number;
}): void {
  const { T, NH, KVH, D, BS, MB } = o;
  const { get } = kvCodec(o.pool);
  const scale = f(o.scale);
  const group = NH / KVH;
  const acc = new Float32Array(D);
  for (let t = 0; t < T; t++) {
    const p = o.tokPos[t]!;
    if (p < 0) {
      o.out.fill(0, t * NH * D, (t + 1) * NH * D);
      continue;
    }
    const s = o.tokSeq[t]!;
    const scores = new Float32Array(p + 1);
    for (let h = 0; h < NH; h++) {
      const g = Math.floor(h / group);
      const qb = (t * NH + h) * D;
      const at = (j: number, kv: 0 | 1) => kvOffset(o, o.blockTable[s * MB + Math.floor(j / BS)]!, o.layer, kv, j % BS) + g * D;
      for (let j = 0; j <= p; j++) {
        const kb = at(j, 0);
        let dot = 0;
        for (let d = 0; d < D; d++) dot = f(dot + f(o.q[qb + d]! * get(o.pool[kb + d]!)));
        scores[j] = f(dot * scale);
      }
      let m = scores[0]!;
      for (let j = 1; j <= p; j++) m = Math.max(m, scores[j]!);
      let sum = 0;
      for (let j = 0; j <= p; j++) {
        scores[j] = expD(f(scores[j]! - m));
        sum = f(sum + scores[j]!);
      }
      acc.fill(0);
      for (let j = 0; j <= p; j++) {
        const vb = at(j, 1);
        for (let d = 0; d < D; d++) acc[d] = f(acc[d]! + f(scores[j]! * get(o.pool[vb + d]!)));
      }
      for (let d = 0; d < D; d++) o.out[qb + d] = f(acc[d]! / sum);
    }
  }
}

export function routerTopk(o: {
  ids: Int32Array; weights: Float32Array; logits: Float32Array; T: number; E: number; K: number; renorm: boolean | number;
}): void {
  const { T, E, K } = o;
  const probs = new Float32Array(E);
  for (let t = 0; t < T; t++) {
    const lb = t * E;
    let m = o.logits[lb]!;
    for (let e = 1; e < E; e++) m = Math.max(m, o.logits[lb + e]!);
    let sum = 0;
    for (let e = 0; e < E; e++) {
      probs[e] = expD(f(o.logits[lb + e]! - m));
      sum = f(sum + probs[e]!);
    }
    for (let e = 0; e < E; e++) probs[e] = f(probs[e]! / sum);
    for (let k = 0; k < K; k++) {
      let bv = -1;
      let bi = 0;
      for (let e = 0; e < E; e++) {
        if (probs[e]! > bv) {
          bv = probs[e]!;
          bi = e;
        }
      }
      o.ids[t * K + k] = bi;
      o.weights[t * K + k] = bv;
      probs[bi] = -2;
    }
    if (o.renorm) {
      let s = 0;
      for (let k = 0; k < K; k++) s = f(s + o.weights[t * K + k]!);
      for (let k = 0; k < K; k++) o.weights[t * K + k] = f(o.weights[t * K + k]! / s);
    }
  }
}

export function siluMul(o: { out: Float32Array; gate: Float32Array; up: Float32Array; n: number }): void {
  for (let i = 0; i < o.n; i++) {
    const g = o.gate[i]!;
    const d = f(1 + expD(-g));
    o.out[i] = f(f(g / d) * o.up[i]!);
  }
}

export function gatherRows(o: { out: Float32Array; x: Float32Array; rows: Int32Array; M: number; H: number }): void {
  for (let i = 0; i < o.M; i++) o.out.set(o.x.subarray(o.rows[i]! * o.H, (o.rows[i]! + 1) * o.H), i * o.H);
}

export function scatterRows(o: { out: Float32Array; x: Float32Array; rows: Int32Array; M: number; H: number }): void {
  for (let i = 0; i < o.M; i++) o.out.set(o.x.subarray(i * o.H, (i + 1) * o.H), o.rows[i]! * o.H);
}

export function combineTopk(o: { out: Float32Array; slots: Float32Array; weights: Float32Array; T: number; K: number; H: number }): void {
  const { T, K, H } = o;
  for (let t = 0; t < T; t++) {
    for (let h = 0; h < H; h++) {
      let acc = 0;
      for (let k = 0; k < K; k++) acc = f(acc + f(o.weights[t * K + k]! * o.slots[(t * K + k) * H + h]!));
      o.out[t * H + h] = f(o.out[t * H + h]! + acc);
    }
  }
}

export function sigmoidScaleRows(o: { y: Float32Array; g: Float32Array; T: number; H: number }): void {
  for (let t = 0; t < o.T; t++) {
    const sg = f(1 / f(1 + expD(-o.g[t]!)));
    for (let h = 0; h < o.H; h++) o.y[t * o.H + h] = f(o.y[t * o.H + h]! * sg);
  }
}

export function argmax(o: { out: Int32Array; x: Float32Array; R: number; N: number }): void {
  for (let r = 0; r < o.R; r++) {
    let best = o.x[r * o.N]!;
    let bi = 0;
    for (let j = 1; j < o.N; j++) {
      if (o.x[r * o.N + j]! > best) {
        best = o.x[r * o.N + j]!;
        bi = j;
      }
    }
    o.out[r] = bi;
  }
}

export function copyF32(o: { out: Float32Array; x: Float32Array; n: number }): void {
  o.out.set(o.x.subarray(0, o.n));
}

export function addF32(o: { out: Float32Array; a: Float32Array; b: Float32Array; n: number }): void {
  for (let i = 0; i < o.n; i++) o.out[i] = f(o.a[i]! + o.b[i]!);
}

/**
 * Device-side routing of a rank's T*K (token, k) pairs for one computing device: for the experts x
 * with route[x] === device, rowOffsets[x]..rowOffsets[x+1]-1 are expert x's sorted rows (the others
 * get none; rowOffsets[E] is the total), and sorted row p < total has rows[p] = t, perm[p] = t*K + k,
 * in increasing (t, k) order within an expert. Entries of rows and perm past the total are left as
 * they are. active[0] = A, the number of experts with rows, active[1..A] those experts ascending
 * (entries past A left as they are). Throws on an id outside 0..E-1 (the kernel traps).
 */
export function routeRows(o: {
  rowOffsets: Int32Array; rows: Int32Array; perm: Int32Array; active: Int32Array; ids: Int32Array; route: Int32Array;
  device: number; T: number; K: number; E: number;
}): void {
  const { K, E } = o;
  const TK = o.T * K;
  const next = new Int32Array(E + 1);
  for (let i = 0; i < TK; i++) {
    const x = o.ids[i]!;
    if (!(x >= 0 && x < E)) throw new RangeError(`routeRows: id ${x} at ${i} is outside 0..${E - 1}`);
    if (o.route[x] === o.device) next[x]!++;
  }
  let total = 0, A = 0;
  for (let x = 0; x < E; x++) {
    const c = next[x]!;
    if (c > 0) o.active[1 + A++] = x;
    o.rowOffsets[x] = total;
    next[x] = total;
    total += c;
  }
  o.rowOffsets[E] = total;
  o.active[0] = A;
  for (let i = 0; i < TK; i++) {
    const x = o.ids[i]!;
    if (o.route[x] !== o.device) continue;
    const p = next[x]!++;
    o.rows[p] = Math.floor(i / K);
    o.perm[p] = i;
  }
}

/** gatherRows over the first count[0] (<= M) rows. */
export function gatherRowsCount(o: { out: Float32Array; x: Float32Array; rows: Int32Array; count: Int32Array; M: number; H: number }): void {
  gatherRows({ ...o, M: rowCount(o.count, o.M) });
}

/** scatterRows over the first count[0] (<= M) rows. */
export function scatterRowsCount(o: { out: Float32Array; x: Float32Array; rows: Int32Array; count: Int32Array; M: number; H: number }): void {
  scatterRows({ ...o, M: rowCount(o.count, o.M) });
}

/** siluMul over the first count[0] (<= M) rows of N elements. */
export function siluMulCount(o: { out: Float32Array; gate: Float32Array; up: Float32Array; count: Int32Array; M: number; N: number }): void {
  siluMul({ out: o.out, gate: o.gate, up: o.up, n: rowCount(o.count, o.M) * o.N });
}

function rowCount(count: Int32Array, M: number): number {
  const n = count[0]!;
  if (!(n >= 0 && n <= M)) throw new RangeError(`row count ${n} is outside 0..${M}`);
  return n;
}
