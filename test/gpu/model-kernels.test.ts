// The model kernels compiled by NVRTC and run on a real GPU, against the TypeScript
// references (src/model/kernels/reference.ts) on the same inputs. Runs only when the
// CUDA backend is selected (ELASTICMOE_BACKEND=cuda).
//
// Tolerances:
// - kernels that only move data or do one correctly rounded operation per element in
//   a fixed order (embed, gather, scatter, copy, add, add_bias, combine_topk, kv_store
//   bf16 stores and f32 copies, argmax ids): bit for bit;
// - router ids: exact; f32 math (everything else): |got - ref| <= 1e-4 * max(|ref|, rms(ref)),
//   where rms(ref) is the tensor's root mean square: parallel reductions (matmul,
//   rmsnorm, attention) add in another order than the sequential reference, and an
//   element near zero after cancellation is judged against the tensor's scale. The
//   element-wise transcendental kernels (silu, sigmoid, rope, router) use double-precision
//   exp/pow/cos/sin rounded once and are expected to match exactly; the test reports
//   how many elements did, but only asserts the tolerance.
// - grouped matmul: the matmul tolerance against the reference; against itself bit for
//   bit, since its summation order is per row (the same result for a row whatever rows
//   share its group, and on the 16-byte and the scalar load paths), and with an active
//   list against the same launch without it (the list picks the groups, not the order).
// - device routing (route_rows, its active list included: integers only) and the *_count
//   gather/scatter: bit for bit;
//   silu_mul_count and the grouped matmuls of the device-routed expert FFN: the tolerance.
// - fused kernels (qk_norm_rope, matmul_qkv, add_rmsnorm): the tolerance against the
//   references, and bit for bit against the unfused CUDA kernels they replace (rmsnorm q,
//   rmsnorm k, rope q, rope k; three matmuls; add then rmsnorm), with the count of bit-exact
//   elements logged. Bit for bit holds by construction: each fused kernel computes an element
//   with the unfused kernels' helpers and rounded operations (emoe_rms_inv, emoe_rope_cs,
//   emoe_matmul_small_col), and its RMSNorm reduction has the same shape: one block per row,
//   thread j summing elements j, j + blockDim.x, ...; qk_norm_rope's block of D threads (D <=
//   256) only drops warps that add zeros in rmsnorm's 256, and add_rmsnorm uses 256 like rmsnorm.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { type DevicePointer, Runtime, type Stream } from '../../src/index.js';
import { ModelKernels } from '../../src/model/kernels/index.js';
import * as ref from '../../src/model/kernels/reference.js';
import { Arena, type Typed, expectSame, randBf16, randF32, randInt, rng } from '../helpers/arrays.js';

const onCuda = process.env.ELASTICMOE_BACKEND === 'cuda';
const MIB = 1024 * 1024;
const RTOL = 1e-4;


/** |got - want| <= rtol * max(|want|, rms(want)) everywhere; logs the worst ratio and exact matches. */
function expectClose(got: Float32Array, want: Float32Array, what: string, rtol = RTOL): void {
  expect(got.length, `${what}: length`).toBe(want.length);
  let ss = 0;
  for (let i = 0; i < want.length; i++) ss += want[i]! * want[i]!;
  const rms = Math.sqrt(ss / Math.max(1, want.length));
  let worst = 0, worstAt = -1, exact = 0;
  for (let i = 0; i < want.length; i++) {
    if (Object.is(got[i], want[i])) { exact++; continue; }
    const r = Math.abs(got[i]! - want[i]!) / (rtol * Math.max(Math.abs(want[i]!), rms, 1e-30));
    if (!(r <= worst)) { worst = r; worstAt = i; }
  }
  console.log(`${what}: ${exact}/${want.length} bit-exact, worst error ${(worst * rtol).toExponential(2)} of scale (limit ${rtol})`);
  if (worstAt >= 0 && !(worst <= 1)) expect.fail(`${what}: element ${worstAt} is ${got[worstAt]}, reference ${want[worstAt]} (rms ${rms})`);
}

/** Logs how many elements of a fused kernel's output equal the unfused kernels' bits, and asserts all do. */
function expectUnfused(got: Float32Array, unfused: Float32Array, what: string): void {
  let exact = 0;
  for (let i = 0; i < got.length; i++) if (Object.is(got[i], unfused[i])) exact++;
  console.log(`${what}: ${exact}/${got.length} bit-exact against the unfused kernels`);
  expectSame(got, unfused, `${what}: fused vs unfused`);
}

/** Random bf16 bits in [-scale, scale], without an f32 staging array (large weight sets). */
function bf16Weights(n: number, seed: number, scale: number): Uint16Array {
  const r = rng(seed);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  const out = new Uint16Array(n);
  for (let i = 0; i < n; i++) {
    f[0] = scale * (2 * r() - 1);
    const b = u[0]!;
    out[i] = (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
  }
  return out;
}

/** Group g is rows offsets[g]..offsets[g+1]-1 of a matrix with offsets[0] = 0. */
function offsetsOf(rows: number[]): Int32Array {
  const o = new Int32Array(rows.length + 1);
  rows.forEach((m, g) => (o[g + 1] = o[g]! + m));
  return o;
}


describe.runIf(onCuda)('model kernels on a real GPU (NVRTC) against the TypeScript references', () => {
  let rt: Runtime;
  let s: Stream;
  let mk: ModelKernels;
  let arena: Arena;

  beforeAll(async () => {
    rt = Runtime.open({ backend: 'cuda' });
    s = rt.createStream(0);
    mk = await ModelKernels.load(rt, 0);
    arena = new Arena(rt, s, 512 * MIB);
  }, 120_000);
  afterAll(() => {
    arena?.dispose();
    mk?.dispose();
  });

  it('runs the grouped matmul kernel asked for: tensor cores on compute capability >= 8.0 unless ELASTICMOE_GROUPED_MATMUL=cuda-cores', () => {
    const cc = Number.parseFloat(rt.deviceInfo(0).computeCapability);
    const forced = process.env.ELASTICMOE_GROUPED_MATMUL;
    const want = forced === 'cuda-cores' || !(cc >= 8) ? 'cuda-cores' : 'tensor-cores';
    console.log(`grouped matmul kernel: ${mk.groupedKernel} (compute capability ${cc})`);
    expect(mk.groupedKernel).toBe(want);
  });

  it('embed (Qwen3 hidden size)', async () => {
    arena.reset();
    const V = 1000, H = 2048, T = 77;
    const table = randBf16(V * H, 1);
    const tokens = randInt(T, 2, V);
    const out = arena.alloc(T * H * 4);
    mk.embed(s, { out, table: await arena.put(table), tokens: await arena.put(tokens), T, H, V });
    const want = new Float32Array(T * H);
    ref.embed({ out: want, table, tokens, T, H });
    expectSame(await arena.get(out, want), want, 'embed');
  });

  it.each([[300, 2048], [70_000, 64], [3, 5]])('rmsnorm R=%i N=%i (in place too)', async (R, N) => {
    arena.reset();
    const x = randF32(R * N, 3, -3, 3);
    const w = randBf16(N, 4, 2);
    const px = await arena.put(x);
    const pw = await arena.put(w);
    const out = arena.alloc(R * N * 4);
    mk.rmsnorm(s, { out, x: px, w: pw, R, N, eps: 1e-6 });
    const want = new Float32Array(R * N);
    ref.rmsnorm({ out: want, x, w, R, N, eps: 1e-6 });
    expectClose(await arena.get(out, want), want, `rmsnorm ${R}x${N}`);
    mk.rmsnorm(s, { out: px, x: px, w: pw, R, N, eps: 1e-6 });
    expectClose(await arena.get(px, want), want, `rmsnorm in place ${R}x${N}`);
  }, 60_000);

  it.each([
    [8, 768, 2048], // Qwen3-30B-A3B expert gate/up projection at decode
    [1, 2048, 768], // its down projection, one token
    [3, 50, 37], // K not a multiple of 8: scalar path
    [16, 130, 264],
    [17, 65, 130], // just above the decode path: 32x32 tiles with ragged edges
    [100, 200, 300],
    [256, 512, 1024],
    [1030, 1000, 70], // 272 tiles of 64x64, ragged edges, K not a multiple of 32
  ])('matmul M=%i N=%i K=%i', async (M, N, K) => {
    arena.reset();
    const x = randF32(M * K, 5 + M);
    const w = randBf16(N * K, 6 + N, 0.05);
    const out = arena.alloc(M * N * 4);
    mk.matmul(s, { out, x: await arena.put(x), w: await arena.put(w), M, N, K });
    const want = new Float32Array(M * N);
    ref.matmul({ out: want, x, w, M, N, K });
    expectClose(await arena.get(out, want), want, `matmul ${M}x${N}x${K}`);
  }, 60_000);

  /** Uploads the address array of the given device pointers. */
  const putAddresses = (ptrs: DevicePointer[]) => arena.put(new Int32Array(BigUint64Array.from(ptrs, (p) => p.address).buffer));

  it('grouped_matmul: Qwen3-30B-A3B experts at decode, G=64 groups of 1-8 rows: gate/up (768x2048) and down (2048x768)', async () => {
    arena.reset();
    const G = 64, NI = 768, NH = 2048;
    const r = rng(77);
    const rows = Array.from({ length: G }, () => 1 + Math.floor(r() * 8));
    const offsets = offsetsOf(rows);
    const M = offsets[G]!;
    // 64 distinct matrices of 768 * 2048 bf16, read as [768, 2048] (gate/up) and as [2048, 768] (down).
    const ws = Array.from({ length: G }, (_, g) => bf16Weights(NI * NH, 1000 + g, 0.05));
    const ptrs: DevicePointer[] = [];
    for (const w of ws) ptrs.push(await arena.put(w));
    const table = await putAddresses(ptrs);
    const po = await arena.put(offsets);
    for (const [what, N, K] of [['gate/up', NI, NH], ['down', NH, NI]] as const) {
      const x = randF32(M * K, 80 + N);
      const out = arena.alloc(M * N * 4);
      mk.groupedMatmul(s, { out, x: await arena.put(x), weights: table, rowOffsets: po, G, M, N, K });
      const want = new Float32Array(M * N);
      ref.groupedMatmul({ out: want, x, weights: ws, rowOffsets: offsets, G, M, N, K });
      expectClose(await arena.get(out, want), want, `grouped_matmul ${what} G=${G} M=${M} N=${N} K=${K}`);
    }
  }, 300_000);

  it.each([
    [20, 37, 45], // K odd: scalar loads
    [20, 64, 264], // K % 8 == 0: 16-byte loads
    [7, 130, 2048],
  ])('grouped_matmul: groups of 0, 1, 3, 17, 70 rows, G=%i N=%i K=%i; a row\'s result does not depend on its group', async (G, N, K) => {
    arena.reset();
    // 70 rows: three passes of the tensor-core kernel's 32-row tiles, the last one partial.
    const sizes = [0, 1, 3, 17, 70];
    const rows = Array.from({ length: G }, (_, g) => sizes[g % 5]!);
    const offsets = offsetsOf(rows);
    const M = offsets[G]!;
    const x = randF32(M * K, 90 + K);
    const ws = Array.from({ length: G }, (_, g) => randBf16(N * K, 400 + g, 0.05));
    const ptrs: DevicePointer[] = [];
    for (const w of ws) ptrs.push(await arena.put(w));
    const px = await arena.put(x);
    const out = arena.alloc(M * N * 4);
    mk.groupedMatmul(s, { out, x: px, weights: await putAddresses(ptrs), rowOffsets: await arena.put(offsets), G, M, N, K });
    const want = new Float32Array(M * N);
    ref.groupedMatmul({ out: want, x, weights: ws, rowOffsets: offsets, G, M, N, K });
    const got = await arena.get(out, want);
    expectClose(got, want, `grouped_matmul G=${G} N=${N} K=${K}`);

    // Every row alone in its own group (an empty group after each), from x at a 4-byte
    // offset (the scalar load path): the same bits.
    const single: DevicePointer[] = [];
    const singleRows: number[] = [];
    rows.forEach((m, g) => {
      for (let i = 0; i < m; i++) {
        single.push(ptrs[g]!, ptrs[g]!);
        singleRows.push(1, 0);
      }
    });
    const xs = arena.alloc(M * K * 4 + 16).add(4);
    await rt.write(xs, new Uint8Array(x.buffer, x.byteOffset, x.byteLength), s);
    const out2 = arena.alloc(M * N * 4);
    mk.groupedMatmul(s, {
      out: out2, x: xs, weights: await putAddresses(single), rowOffsets: await arena.put(offsetsOf(singleRows)), G: single.length, M, N, K,
    });
    expectSame(await arena.get(out2, want), got, `grouped_matmul G=${G} N=${N} K=${K}, one row per group`);
  }, 120_000);

  it('grouped_matmul: more groups than a grid has rows (70000, grid-stride), rows outside the groups untouched', async () => {
    arena.reset();
    const G = 70_000, N = 5, K = 3;
    const w = randBf16(N * K, 50);
    const pw = await arena.put(w);
    const rows = Array.from({ length: G }, (_, g) => (g % 9973 === 1 ? 2 : 0));
    const offsets = offsetsOf(rows);
    for (let g = 0; g <= G; g++) offsets[g]! += 1; // row 0 is in no group
    const M = offsets[G]! + 1; // nor is the last row
    const x = randF32(M * K, 51);
    const out0 = randF32(M * N, 52, 5, 6);
    const out = await arena.put(out0);
    mk.groupedMatmul(s, {
      out, x: await arena.put(x), weights: await putAddresses(new Array<DevicePointer>(G).fill(pw)), rowOffsets: await arena.put(offsets), G, M, N, K,
    });
    const want = out0.slice();
    ref.groupedMatmul({ out: want, x, weights: new Array<Uint16Array>(G).fill(w), rowOffsets: offsets, G, M, N, K });
    const got = await arena.get(out, want);
    expectClose(got, want, 'grouped_matmul G=70000');
    expectSame(got.subarray(0, N), out0.subarray(0, N), 'row before the groups');
    expectSame(got.subarray((M - 1) * N), out0.subarray((M - 1) * N), 'row after the groups');
  }, 120_000);

  it.each([
    [1, 8, 128, 768, 2048], // Qwen3-30B-A3B gate/up at batch-1 decode: 8 of 128 experts, one row each
    [1, 8, 128, 2048, 768], // its down projection
    [16, 8, 128, 768, 2048], // a decode batch: up to 128 rows over many experts, some with several
    [5, 4, 60, 37, 45], // K odd: scalar loads
  ])('grouped_matmul with an active list: T=%i K=%i over G=%i, N=%i K=%i: bit-identical to the launch without it', async (T, topK, G, N, K) => {
    arena.reset();
    // Rows as the device-routed FFN has them: the routing reference's offsets and active list, one
    // device computing every expert; groups without rows have address 0 (never read).
    const { ids } = routing(T, topK, G, 1, 900 + T + N);
    const M = T * topK;
    const offsets = new Int32Array(G + 1), active = new Int32Array(G + 1).fill(-1);
    ref.routeRows({ rowOffsets: offsets, rows: new Int32Array(M), perm: new Int32Array(M), active, ids, route: new Int32Array(G), device: 0, T, K: topK, E: G });
    const A = active[0]!;
    expect(A).toBeGreaterThan(0);
    expect(A).toBeLessThanOrEqual(Math.min(G, M));
    const ws: Uint16Array[] = new Array<Uint16Array>(G).fill(new Uint16Array(0));
    const ptrs: Array<DevicePointer | undefined> = new Array<DevicePointer | undefined>(G).fill(undefined);
    for (const g of active.subarray(1, 1 + A)) {
      ws[g] = bf16Weights(N * K, 2000 + g, 0.05);
      ptrs[g] = await arena.put(ws[g]!);
    }
    const table = await arena.put(new Int32Array(BigUint64Array.from(ptrs, (p) => p?.address ?? 0n).buffer));
    const x = randF32(M * K, 910 + N);
    const px = await arena.put(x), po = await arena.put(offsets), pa = await arena.put(active);
    const base = { x: px, weights: table, rowOffsets: po, G, M, N, K };
    const out0 = randF32(M * N, 920);
    const without = await arena.put(out0);
    mk.groupedMatmul(s, { ...base, out: without });
    const all = await arena.get(without, out0);
    const want = out0.slice();
    ref.groupedMatmul({ out: want, x, weights: ws, rowOffsets: offsets, G, M, N, K });
    expectClose(all, want, `grouped_matmul G=${G} M=${M} N=${N} K=${K}, no list`);
    // With the list, the grid sized for min(G, M) groups, for fewer than A (grid-stride over the
    // list), and for all G: the same bits.
    for (const maxActive of [Math.min(G, M), Math.max(1, A - 3), 1, G]) {
      const out = await arena.put(out0);
      mk.groupedMatmul(s, { ...base, out, active: pa, maxActive });
      const got = await arena.get(out, out0);
      expectSame(got, all, `grouped_matmul G=${G} M=${M} N=${N} K=${K}, active list of ${A}, maxActive ${maxActive}`);
      expectClose(got, want, `grouped_matmul G=${G} M=${M} N=${N} K=${K}, active list of ${A}, maxActive ${maxActive}`);
    }
    // Part of the list (every other group, descending), and none: only the listed groups' rows are written.
    const listed = Array.from(active.subarray(1, 1 + A)).filter((_, i) => i % 2 === 0).reverse();
    for (const groups of [listed, []]) {
      const out = await arena.put(out0);
      mk.groupedMatmul(s, { ...base, out, active: await arena.put(Int32Array.from([groups.length, ...groups])), maxActive: Math.max(1, groups.length) });
      const got = await arena.get(out, out0);
      const wantPart = out0.slice();
      for (const g of groups) wantPart.set(all.subarray(offsets[g]! * N, offsets[g + 1]! * N), offsets[g]! * N);
      expectSame(got, wantPart, `grouped_matmul G=${G} N=${N} K=${K}, ${groups.length} of ${A} groups listed`);
    }
  }, 120_000);

  it('add_bias, combine_topk, silu_mul, sigmoid_scale_rows', async () => {
    arena.reset();
    const M = 33, N = 4096;
    const x = randF32(M * N, 7);
    const b = randBf16(N, 8);
    const px = await arena.put(x);
    mk.addBias(s, { x: px, b: await arena.put(b), M, N });
    const wantB = x.slice();
    ref.addBias({ x: wantB, b, M, N });
    expectSame(await arena.get(px, wantB), wantB, 'add_bias');

    const T = 40, K = 8, H = 2048;
    const out0 = randF32(T * H, 22);
    const slots = randF32(T * K * H, 23);
    const weights = randF32(T * K, 24, 0, 1);
    const pout = await arena.put(out0);
    mk.combineTopk(s, { out: pout, slots: await arena.put(slots), weights: await arena.put(weights), T, K, H });
    const wantC = out0.slice();
    ref.combineTopk({ out: wantC, slots, weights, T, K, H });
    expectSame(await arena.get(pout, wantC), wantC, 'combine_topk');

    const n = 300_001;
    const gate = randF32(n, 15, -20, 20);
    gate[0] = -100; gate[1] = 100;
    const up = randF32(n, 16, -3, 3);
    const so = arena.alloc(n * 4);
    mk.siluMul(s, { out: so, gate: await arena.put(gate), up: await arena.put(up), n });
    const wantS = new Float32Array(n);
    ref.siluMul({ out: wantS, gate, up, n });
    expectClose(await arena.get(so, wantS), wantS, 'silu_mul');

    const y = randF32(T * H, 17);
    const g = randF32(T, 18, -10, 10);
    const py = await arena.put(y);
    mk.sigmoidScaleRows(s, { y: py, g: await arena.put(g), T, H });
    const wantY = y.slice();
    ref.sigmoidScaleRows({ y: wantY, g, T, H });
    expectClose(await arena.get(py, wantY), wantY, 'sigmoid_scale_rows');
  }, 60_000);

  it('rope (Qwen3: D=128, theta=1e6) over many tokens and positions', async () => {
    arena.reset();
    const T = 300, heads = 32, D = 128, theta = 1e6;
    const x = randF32(T * heads * D, 9);
    const pos = Int32Array.from({ length: T }, (_, i) => (i < 200 ? i : i * 97));
    const px = await arena.put(x);
    mk.rope(s, { x: px, pos: await arena.put(pos), T, heads, D, theta });
    const want = x.slice();
    ref.rope({ x: want, pos, T, heads, D, theta });
    expectClose(await arena.get(px, want), want, 'rope');
  }, 60_000);

  it.each([
    [1, 32, 4, 128], // Qwen3-30B-A3B at batch-1 decode
    [300, 32, 4, 128], // a prefill
    [5, 6, 2, 64],
    [3, 2, 1, 300], // D above 256: 256 threads, more than one element each
    [2, 3, 3, 34], // D not a multiple of 32, D/2 odd
  ])('qk_norm_rope T=%i NH=%i KVH=%i D=%i (theta 1e6): vs the reference, and bit for bit vs rmsnorm q, rmsnorm k, rope q, rope k', async (T, NH, KVH, D) => {
    arena.reset();
    const eps = 1e-6, theta = 1e6;
    const q = randF32(T * NH * D, 110 + D, -3, 3), k = randF32(T * KVH * D, 111 + D, -3, 3);
    const qw = randBf16(D, 112, 2), kw = randBf16(D, 113, 2);
    const pos = Int32Array.from({ length: T }, (_, i) => (i < 200 ? i : i * 97) + (T === 1 ? 4095 : 0));
    const pqw = await arena.put(qw), pkw = await arena.put(kw), ppos = await arena.put(pos);
    for (const norm of [true, false]) {
      const what = `qk_norm_rope T=${T} NH=${NH} KVH=${KVH} D=${D}${norm ? '' : ', rope only'}`;
      const fq = await arena.put(q), fk = await arena.put(k);
      mk.qkNormRope(s, { q: fq, k: fk, ...(norm ? { qNorm: pqw, kNorm: pkw } : {}), pos: ppos, T, NH, KVH, D, eps, theta });
      const wantQ = q.slice(), wantK = k.slice();
      ref.qkNormRope({ q: wantQ, k: wantK, ...(norm ? { qw, kw } : {}), pos, T, NH, KVH, D, eps, theta });
      const gotQ = await arena.get(fq, wantQ), gotK = await arena.get(fk, wantK);
      expectClose(gotQ, wantQ, `${what}: q`);
      expectClose(gotK, wantK, `${what}: k`);
      const uq = await arena.put(q), uk = await arena.put(k);
      if (norm) {
        mk.rmsnorm(s, { out: uq, x: uq, w: pqw, R: T * NH, N: D, eps });
        mk.rmsnorm(s, { out: uk, x: uk, w: pkw, R: T * KVH, N: D, eps });
      }
      mk.rope(s, { x: uq, pos: ppos, T, heads: NH, D, theta });
      mk.rope(s, { x: uk, pos: ppos, T, heads: KVH, D, theta });
      expectUnfused(gotQ, await arena.get(uq, q), `${what}: q`);
      expectUnfused(gotK, await arena.get(uk, k), `${what}: k`);
    }
  }, 60_000);

  it.each([
    [1, 4096, 512, 2048], // Qwen3-30B-A3B q/k/v at batch-1 decode
    [16, 4096, 512, 2048], // the largest M of the one launch
    [3, 50, 13, 45], // K odd: scalar loads
    [17, 130, 65, 264], // above QKV_FUSED_MAX_ROWS: three matmul launches (tiled)
  ])('matmul_qkv M=%i Nq=%i Nkv=%i K=%i: vs the reference, and bit for bit vs three matmuls', async (M, Nq, Nkv, K) => {
    arena.reset();
    const x = randF32(M * K, 120 + M);
    const wq = bf16Weights(Nq * K, 121, 0.05), wk = bf16Weights(Nkv * K, 122, 0.05), wv = bf16Weights(Nkv * K, 123, 0.05);
    const px = await arena.put(x), pwq = await arena.put(wq), pwk = await arena.put(wk), pwv = await arena.put(wv);
    // x at a 4-byte offset too: the scalar load path of both kernels.
    const xs = arena.alloc(M * K * 4 + 16).add(4);
    await rt.write(xs, new Uint8Array(x.buffer, x.byteOffset, x.byteLength), s);
    const want = { q: new Float32Array(M * Nq), k: new Float32Array(M * Nkv), v: new Float32Array(M * Nkv) };
    ref.matmulQkv({ ...want, x, wq, wk, wv, M, Nq, Nkv, K });
    for (const [where, xp] of [['aligned', px], ['x misaligned', xs]] as const) {
      const q = arena.alloc(M * Nq * 4), k = arena.alloc(M * Nkv * 4), v = arena.alloc(M * Nkv * 4);
      mk.matmulQkv(s, { q, k, v, x: xp, wq: pwq, wk: pwk, wv: pwv, M, Nq, Nkv, K });
      const got = { q: await arena.get(q, want.q), k: await arena.get(k, want.k), v: await arena.get(v, want.v) };
      for (const [name, w, N] of [['q', pwq, Nq], ['k', pwk, Nkv], ['v', pwv, Nkv]] as const) {
        const what = `matmul_qkv ${M}x(${Nq}+2x${Nkv})x${K} ${name}, ${where}`;
        expectClose(got[name], want[name], what);
        const o = arena.alloc(M * N * 4);
        mk.matmul(s, { out: o, x: xp, w, M, N, K });
        expectUnfused(got[name], await arena.get(o, got[name]), what);
      }
    }
  }, 120_000);

  it.each([[1, 2048], [300, 2048], [70_000, 64], [3, 5]])('add_rmsnorm R=%i N=%i: vs the reference, and bit for bit vs add then rmsnorm', async (R, N) => {
    arena.reset();
    const eps = 1e-6;
    const x = randF32(R * N, 130, -3, 3), y = randF32(R * N, 131, -3, 3);
    const w = randBf16(N, 132, 2);
    const pw = await arena.put(w), py = await arena.put(y);
    const px = await arena.put(x), xn = arena.alloc(R * N * 4);
    mk.addRmsnorm(s, { x: px, xn, y: py, w: pw, R, N, eps });
    const wantX = x.slice(), wantXn = new Float32Array(R * N);
    ref.addRmsnorm({ x: wantX, xn: wantXn, y, w, R, N, eps });
    const gotX = await arena.get(px, wantX), gotXn = await arena.get(xn, wantXn);
    expectSame(gotX, wantX, `add_rmsnorm ${R}x${N}: x (one rounded add)`);
    expectClose(gotXn, wantXn, `add_rmsnorm ${R}x${N}: xn`);
    const ux = await arena.put(x), uxn = arena.alloc(R * N * 4);
    mk.add(s, { out: ux, a: ux, b: py, n: R * N });
    mk.rmsnorm(s, { out: uxn, x: ux, w: pw, R, N, eps });
    expectUnfused(gotX, await arena.get(ux, x), `add_rmsnorm ${R}x${N}: x`);
    expectUnfused(gotXn, await arena.get(uxn, x), `add_rmsnorm ${R}x${N}: xn`);
  }, 60_000);

  // emoe_kv_store / emoe_attention (bf16 cache) and emoe_kv_store_f32 / emoe_attention_f32 (f32 cache): one
  // templated body each, so the same shapes and tolerances; the reference takes the dtype from the pool's array type.
  it.each(['bf16', 'f32'] as const)('kv_store then attention, %s cache: two prefills, decodes and padding (GQA 32/4, D=128)', async (dtype) => {
    arena.reset();
    const L = 3, layer = 2, BS = 16, KVH = 4, D = 128, NH = 32, MB = 24, blocks = 40;
    const geo = { L, BS, KVH, D };
    const lens = [300, 45, 1];
    // physical blocks in a scrambled order
    const perm = Array.from({ length: blocks }, (_, i) => (i * 17 + 5) % blocks);
    const table = new Int32Array(lens.length * MB).fill(-1);
    let nextBlock = 0;
    lens.forEach((n, sq) => { for (let b = 0; b < Math.ceil(n / BS); b++) table[sq * MB + b] = perm[nextBlock++]!; });
    const seqOf: number[] = [], posOf: number[] = [];
    lens.forEach((n, sq) => { for (let p = 0; p < n; p++) { seqOf.push(sq); posOf.push(p); } });
    const Tk = seqOf.length + 1; // + one padding token
    const slots = new Int32Array(Tk).fill(-1);
    for (let t = 0; t < Tk - 1; t++) slots[t] = table[seqOf[t]! * MB + Math.floor(posOf[t]! / BS)]! * BS + (posOf[t]! % BS);
    const k = randF32(Tk * KVH * D, 10, -2, 2);
    const v = randF32(Tk * KVH * D, 11, -2, 2);
    const pool0 = dtype === 'bf16' ? randBf16(blocks * ref.kvBlockElements(geo), 12) : randF32(blocks * ref.kvBlockElements(geo), 12);
    const pool = await arena.put(pool0);
    mk.kvStore(s, { pool, k: await arena.put(k), v: await arena.put(v), slots: await arena.put(slots), T: Tk, KVH, D, layer, L, BS, blocks, dtype });
    const poolRef = pool0.slice();
    ref.kvStore({ pool: poolRef, k, v, slots, T: Tk, KVH, D, layer, L, BS });
    expectSame(await arena.get(pool, poolRef), poolRef, 'kv_store pool');

    // queries: the prefill of sequence 1 (45 tokens), the last 20 of sequence 0, decode of 0 and 2, padding
    const tokSeq: number[] = [], tokPos: number[] = [];
    for (let p = 0; p < 45; p++) { tokSeq.push(1); tokPos.push(p); }
    for (let p = 280; p < 300; p++) { tokSeq.push(0); tokPos.push(p); }
    tokSeq.push(0, 2, 1); tokPos.push(299, 0, -1);
    const T = tokSeq.length;
    const q = randF32(T * NH * D, 13, -2, 2);
    const scale = 1 / Math.sqrt(D);
    const out = arena.alloc(T * NH * D * 4);
    const args = {
      T, NH, KVH, D, layer, L, BS, MB, scale, blocks, S: lens.length, dtype,
      tokSeq: await arena.put(Int32Array.from(tokSeq)), tokPos: await arena.put(Int32Array.from(tokPos)),
    };
    mk.attention(s, { out, q: await arena.put(q), pool, blockTable: await arena.put(table), ...args });
    const want = new Float32Array(T * NH * D);
    ref.attention({ out: want, q, pool: poolRef, blockTable: table, tokSeq: Int32Array.from(tokSeq), tokPos: Int32Array.from(tokPos),
      T, NH, KVH, D, layer, L, BS, MB, scale });
    expectClose(await arena.get(out, want), want, `attention (${dtype} cache)`);
  }, 120_000);

  it.each(['bf16', 'f32'] as const)('attention, %s cache, over more than 65535 (token, head) pairs: many short sequences (grid-stride)', async (dtype) => {
    arena.reset();
    const L = 1, layer = 0, BS = 4, KVH = 4, D = 64, NH = 32, MB = 1;
    const S = 2100, T = S;
    const geo = { L, BS, KVH, D };
    const table = Int32Array.from({ length: S }, (_, i) => S - 1 - i);
    // each sequence holds positions 0..3; token t queries sequence t at position t % 4
    const Tk = S * 4;
    const slots = Int32Array.from({ length: Tk }, (_, i) => table[Math.floor(i / 4)]! * BS + (i % 4));
    const k = randF32(Tk * KVH * D, 30, -2, 2);
    const v = randF32(Tk * KVH * D, 31, -2, 2);
    const pool = arena.alloc(S * ref.kvBlockElements(geo) * (dtype === 'f32' ? 4 : 2));
    mk.kvStore(s, { pool, k: await arena.put(k), v: await arena.put(v), slots: await arena.put(slots), T: Tk, KVH, D, layer, L, BS, blocks: S, dtype });
    const poolRef = dtype === 'f32' ? new Float32Array(S * ref.kvBlockElements(geo)) : new Uint16Array(S * ref.kvBlockElements(geo));
    ref.kvStore({ pool: poolRef, k, v, slots, T: Tk, KVH, D, layer, L, BS });
    expectSame(await arena.get(pool, poolRef), poolRef, 'kv_store pool');
    const tokSeq = Int32Array.from({ length: T }, (_, i) => i);
    const tokPos = Int32Array.from({ length: T }, (_, i) => i % 4);
    const q = randF32(T * NH * D, 32, -2, 2);
    const out = arena.alloc(T * NH * D * 4);
    mk.attention(s, {
      out, q: await arena.put(q), pool, blockTable: await arena.put(table), tokSeq: await arena.put(tokSeq),
      tokPos: await arena.put(tokPos), T, NH, KVH, D, layer, L, BS, MB, scale: 0.125, blocks: S, S, dtype,
    });
    const want = new Float32Array(T * NH * D);
    ref.attention({ out: want, q, pool: poolRef, blockTable: table, tokSeq, tokPos, T, NH, KVH, D, layer, L, BS, MB, scale: 0.125 });
    expectClose(await arena.get(out, want), want, `attention, many sequences (${dtype} cache)`);
  }, 120_000);

  it.each([[300, 128, 8, true], [70, 60, 4, false], [5, 8, 2, true]])('router_topk T=%i E=%i K=%i renorm=%s', async (T, E, K, renorm) => {
    arena.reset();
    const logits = randF32(T * E, 14 + E, -4, 4);
    logits.fill(0.25, 0, E); // a row of ties: experts 0..K-1
    const ids = arena.alloc(T * K * 4), weights = arena.alloc(T * K * 4);
    mk.routerTopk(s, { ids, weights, logits: await arena.put(logits), T, E, K, renorm });
    const wantIds = new Int32Array(T * K), wantW = new Float32Array(T * K);
    ref.routerTopk({ ids: wantIds, weights: wantW, logits, T, E, K, renorm });
    expectSame(await arena.get(ids, wantIds), wantIds, 'router ids');
    expectClose(await arena.get(weights, wantW), wantW, 'router weights');
  });

  /** Top-k ids [T, K], distinct per token and skewed toward low experts, and a route table over `devices`. */
  function routing(T: number, K: number, E: number, devices: number, seed: number): { ids: Int32Array; route: Int32Array } {
    const r = rng(seed);
    const ids = new Int32Array(T * K);
    for (let t = 0; t < T; t++) {
      const chosen = new Set<number>();
      for (let k = 0; k < K; k++) {
        let x = Math.floor(E * r() ** 2);
        while (chosen.has(x)) x = (x + 1) % E;
        chosen.add(x);
        ids[t * K + k] = x;
      }
    }
    return { ids, route: Int32Array.from({ length: E }, () => Math.floor(r() * devices)) };
  }

  it.each([
    [1, 8, 128, 4], // one decode token of Qwen3-30B-A3B
    [128, 8, 128, 4], // a decode batch
    [512, 8, 128, 2], // T*K = 4096, the largest
    [70, 4, 60, 3], // E and T*K not multiples of 32
    [33, 2, 8, 1], // mixtral-like, one device computes everything
    [200, 8, 2048, 8], // the largest expert count
  ])('route_rows T=%i K=%i E=%i over %i devices: the reference\'s lists, bit for bit', async (T, K, E, devices) => {
    arena.reset();
    const TK = T * K;
    const { ids, route } = routing(T, K, E, devices, 300 + T + E);
    const pids = await arena.put(ids), proute = await arena.put(route);
    for (let d = 0; d < devices; d++) await checkRoute(T, K, E, pids, ids, proute, route, d, `device ${d}`);
  }, 60_000);

  /** route_rows on the GPU against the reference, every output bit for bit (active included; -7: not written). */
  async function checkRoute(T: number, K: number, E: number, pids: DevicePointer, ids: Int32Array, proute: DevicePointer, route: Int32Array,
    device: number, what: string): Promise<Int32Array> {
    const TK = T * K;
    const offsets = arena.alloc((E + 1) * 4);
    const rows = await arena.put(new Int32Array(TK).fill(-7)), perm = await arena.put(new Int32Array(TK).fill(-7));
    const active = await arena.put(new Int32Array(E + 1).fill(-7));
    mk.routeRows(s, { rowOffsets: offsets, rows, perm, active, ids: pids, route: proute, device, T, K, E });
    const want = {
      rowOffsets: new Int32Array(E + 1), rows: new Int32Array(TK).fill(-7), perm: new Int32Array(TK).fill(-7), active: new Int32Array(E + 1).fill(-7),
    };
    ref.routeRows({ ...want, ids, route, device, T, K, E });
    expectSame(await arena.get(offsets, want.rowOffsets), want.rowOffsets, `route_rows offsets, ${what}`);
    expectSame(await arena.get(rows, want.rows), want.rows, `route_rows rows, ${what}`);
    expectSame(await arena.get(perm, want.perm), want.perm, `route_rows perm, ${what}`);
    expectSame(await arena.get(active, want.active), want.active, `route_rows active, ${what}`);
    return want.active;
  }

  it('route_rows: the active list when no expert has rows on the device, and when every expert has (E up to 2048)', async () => {
    arena.reset();
    const { ids } = routing(7, 8, 128, 1, 321);
    const pids = await arena.put(ids);
    // Nothing routed to device 1, or device 1 computing only experts nobody chose: A = 0.
    const zeros = new Int32Array(128);
    expect((await checkRoute(7, 8, 128, pids, ids, await arena.put(zeros), zeros, 1, 'no rows (route elsewhere)'))[0]).toBe(0);
    const unchosen = Int32Array.from({ length: 128 }, (_, x) => (ids.includes(x) ? 0 : 1));
    expect((await checkRoute(7, 8, 128, pids, ids, await arena.put(unchosen), unchosen, 1, 'no rows (unchosen experts)'))[0]).toBe(0);
    // Every expert with rows: T*K = E (each once), and E = 2048 over 64 passes of the ballot.
    for (const [T, K, E] of [[1, 8, 8], [16, 8, 128], [512, 8, 2048], [9, 4, 33]] as const) {
      arena.reset();
      const all = Int32Array.from({ length: T * K }, (_, i) => (Math.floor(i / K) + (i % K) * Math.ceil(E / K)) % E); // distinct per token
      const pall = await arena.put(all);
      const one = new Int32Array(E);
      const got = await checkRoute(T, K, E, pall, all, await arena.put(one), one, 0, `all active T=${T} K=${K} E=${E}`);
      expect(Array.from(got)).toEqual([E, ...Array.from({ length: E }, (_, x) => x)]);
      const half = Int32Array.from({ length: E }, (_, x) => x % 2);
      await checkRoute(T, K, E, pall, all, await arena.put(half), half, 1, `odd experts T=${T} E=${E}`);
    }
  }, 60_000);

  it('gather_rows_count, scatter_rows_count, silu_mul_count over the first *count of M rows', async () => {
    arena.reset();
    const R = 300, H = 2048, M = 512, I = 768;
    const x = randF32(R * H, 60);
    const rows = randInt(M, 61, R);
    const perm = Int32Array.from({ length: M }, (_, i) => (i * 13 + 5) % M);
    const px = await arena.put(x), prow = await arena.put(rows), pperm = await arena.put(perm);
    for (const n of [0, 1, 77, M]) {
      const count = await arena.put(Int32Array.from([n]));
      const cnt = Int32Array.from([n]);
      const g0 = randF32(M * H, 62 + n);
      const g = await arena.put(g0);
      mk.gatherRowsCount(s, { out: g, x: px, rows: prow, count, M, H, R });
      const wantG = g0.slice();
      ref.gatherRowsCount({ out: wantG, x, rows, count: cnt, M, H });
      expectSame(await arena.get(g, wantG), wantG, `gather_rows_count ${n}`);

      const t0 = randF32(M * H, 63 + n);
      const target = await arena.put(t0);
      mk.scatterRowsCount(s, { out: target, x: g, rows: pperm, count, M, H, R: M });
      const wantS = t0.slice();
      ref.scatterRowsCount({ out: wantS, x: wantG, rows: perm, count: cnt, M, H });
      expectSame(await arena.get(target, wantS), wantS, `scatter_rows_count ${n}`);

      const gate = randF32(M * I, 64 + n, -20, 20), up = randF32(M * I, 65 + n, -3, 3);
      const o0 = randF32(M * I, 66 + n);
      const o = await arena.put(o0);
      mk.siluMulCount(s, { out: o, gate: await arena.put(gate), up: await arena.put(up), count, M, N: I });
      const wantU = o0.slice();
      ref.siluMulCount({ out: wantU, gate, up, count: cnt, M, N: I });
      const gotU = await arena.get(o, wantU);
      expectClose(gotU, wantU, `silu_mul_count ${n}`);
      expectSame(gotU.subarray(n * I), o0.subarray(n * I), `silu_mul_count ${n}: rows past the count untouched`);
    }
  }, 120_000);

  it('the device-routed expert FFN: route, gather, grouped gate/up over the active experts of E (address 0 for other devices\' experts), silu, down, scatter', async () => {
    arena.reset();
    const T = 64, K = 8, E = 32, H = 256, I = 96, devices = 3, device = 1;
    const TK = T * K;
    const { ids, route } = routing(T, K, E, devices, 500);
    const xs = randF32(T * H, 501);
    const mats = [0, 1, 2].map((j) => Array.from({ length: E }, (_, x) => (route[x] === device ? randBf16((j === 2 ? H * I : I * H), 600 + 3 * x + j, 0.1) : undefined)));
    const addrs = new BigUint64Array(3 * E);
    for (let j = 0; j < 3; j++) {
      for (let x = 0; x < E; x++) if (mats[j]![x]) addrs[j * E + x] = (await arena.put(mats[j]![x]!)).address;
    }
    const table = await arena.put(new Int32Array(addrs.buffer));
    const pids = await arena.put(ids), proute = await arena.put(route), px = await arena.put(xs);
    const offsets = arena.alloc((E + 1) * 4), rows = arena.alloc(TK * 4), perm = arena.alloc(TK * 4), active = arena.alloc((E + 1) * 4);
    const recv = arena.alloc(TK * H * 4), gate = arena.alloc(TK * I * 4), up = arena.alloc(TK * I * 4);
    const slots0 = randF32(TK * H, 502);
    const slots = await arena.put(slots0);
    const count = offsets.add(E * 4);
    mk.routeRows(s, { rowOffsets: offsets, rows, perm, active, ids: pids, route: proute, device, T, K, E });
    mk.gatherRowsCount(s, { out: recv, x: px, rows, count, M: TK, H, R: T });
    // As the forward pass launches them: the active list, a block row for each of min(E, T*K) groups.
    const list = { rowOffsets: offsets, active, maxActive: Math.min(E, TK), G: E, M: TK };
    mk.groupedMatmul(s, { ...list, out: gate, x: recv, weights: table, N: I, K: H });
    mk.groupedMatmul(s, { ...list, out: up, x: recv, weights: table.add(E * 8), N: I, K: H });
    mk.siluMulCount(s, { out: gate, gate, up, count, M: TK, N: I });
    mk.groupedMatmul(s, { ...list, out: recv, x: gate, weights: table.add(2 * E * 8), N: H, K: I });
    mk.scatterRowsCount(s, { out: slots, x: recv, rows: perm, count, M: TK, H, R: TK });
    const got = await arena.get(slots, slots0);
    // Reference: each of this device's (t, k) slots = down(silu(gate x_t) * up x_t) of expert ids[t*K + k].
    const want = slots0.slice();
    const g = new Float32Array(I), u = new Float32Array(I), o = new Float32Array(H);
    let mine = 0;
    ids.forEach((x, i) => {
      if (route[x] !== device) return;
      mine++;
      const xt = xs.subarray(Math.floor(i / K) * H, (Math.floor(i / K) + 1) * H);
      ref.matmul({ out: g, x: xt, w: mats[0]![x]!, M: 1, N: I, K: H });
      ref.matmul({ out: u, x: xt, w: mats[1]![x]!, M: 1, N: I, K: H });
      ref.siluMul({ out: g, gate: g, up: u, n: I });
      ref.matmul({ out: o, x: g, w: mats[2]![x]!, M: 1, N: H, K: I });
      want.set(o, i * H);
    });
    expect(mine).toBeGreaterThan(0);
    expect(mine).toBeLessThan(TK);
    expectClose(got, want, 'device-routed expert FFN');
    ids.forEach((x, i) => {
      if (route[x] !== device) expectSame(got.subarray(i * H, (i + 1) * H), slots0.subarray(i * H, (i + 1) * H), `slot ${i} of another device`);
    });
  }, 120_000);

  it('argmax over a Qwen3 vocabulary row, first maximum on ties', async () => {
    arena.reset();
    const R = 5, N = 151_936;
    const x = randF32(R * N, 25, -10, 10);
    x[0 * N + 100] = 50; x[0 * N + 90_000] = 50;
    x[1 * N + N - 1] = 50;
    x.fill(3, 2 * N, 3 * N);
    const out = arena.alloc(R * 4);
    mk.argmax(s, { out, x: await arena.put(x), R, N });
    const want = new Int32Array(R);
    ref.argmax({ out: want, x, R, N });
    expectSame(await arena.get(out, want), want, 'argmax');
    expect(Array.from(want.subarray(0, 3))).toEqual([100, N - 1, 0]);
  });

  it('gather_rows, scatter_rows, copy and add (beyond 65535 blocks: grid-stride)', async () => {
    arena.reset();
    const R = 500, H = 2048, M = 300;
    const x = randF32(R * H, 19);
    const rows = randInt(M, 40, R);
    const px = await arena.put(x);
    const pr = await arena.put(rows);
    const gathered = arena.alloc(M * H * 4);
    mk.gatherRows(s, { out: gathered, x: px, rows: pr, M, H, R });
    const wantG = new Float32Array(M * H);
    ref.gatherRows({ out: wantG, x, rows, M, H });
    expectSame(await arena.get(gathered, wantG), wantG, 'gather_rows');

    const distinct = Int32Array.from({ length: M }, (_, i) => (i * 7 + 3) % R);
    const target0 = randF32(R * H, 20);
    const target = await arena.put(target0);
    mk.scatterRows(s, { out: target, x: gathered, rows: await arena.put(distinct), M, H, R });
    const wantS = target0.slice();
    ref.scatterRows({ out: wantS, x: wantG, rows: distinct, M, H });
    expectSame(await arena.get(target, wantS), wantS, 'scatter_rows');

    const n = 17_000_001; // > 65535 * 256
    const a = randF32(n, 26), b = randF32(n, 27);
    const pa = await arena.put(a), pb = await arena.put(b);
    const c = arena.alloc(n * 4);
    mk.copy(s, { out: c, x: pa, n });
    expectSame(await arena.get(c, a), a, 'copy');
    mk.add(s, { out: pa, a: pa, b: pb, n });
    const sum = new Float32Array(n);
    ref.addF32({ out: sum, a, b, n });
    expectSame(await arena.get(pa, sum), sum, 'add in place');
  }, 120_000);
});
