// The model kernels' CPU twins (mock backend) against the TypeScript references in
// src/model/kernels/reference.ts. Twins and references perform the same float
// operations in the same order (Math.fround at each step; transcendental functions in
// double, rounded once), so every comparison here is bit for bit. A few independent
// checks (dense double-precision attention, rope from the formula, a sort-based top-k)
// make sure the shared semantics are the intended ones.
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';

import {
  type DevicePointer, IllegalAddressError, arg, InvalidArgumentError, type Runtime, type Stream,
} from '../../src/index.js';
import {
  type KernelTiming, MAX_ROUTE_EXPERTS, MAX_ROUTE_ROWS, MODEL_KERNEL_NAMES, ModelKernels, QKV_FUSED_MAX_ROWS,
  groupedMatmulKernel,
} from '../../src/model/kernels/index.js';
import * as ref from '../../src/model/kernels/reference.js';
import { Arena, type Typed, expectSame, randBf16, randF32, randInt, rng } from '../helpers/arrays.js';
import { expectArgumentError } from '../helpers/errors.js';
import { mappedChunk, openMock } from '../helpers/mock.js';



describe('model kernels on the mock (CPU twins vs TypeScript references, bit for bit)', () => {
  let rt: Runtime;
  let s: Stream;
  let mk: ModelKernels;
  let arena: Arena;

  beforeAll(async () => {
    rt = openMock();
    s = rt.createStream(0);
    mk = await ModelKernels.load(rt, 0);
    arena = new Arena(rt, s, 16 * 1024 * 1024);
  });
  afterAll(() => {
    arena.dispose();
    mk.dispose();
  });

  it('resolves a CPU twin for every kernel name', () => {
    expect(MODEL_KERNEL_NAMES.length).toBe(28);
    for (const name of MODEL_KERNEL_NAMES) expect(mk.module.kernel(name).name).toBe(name);
  });

  it('bf16 conversion rounds to nearest even and keeps NaN', () => {
    expect(ref.f32ToBf16(1)).toBe(0x3f80);
    expect(ref.f32ToBf16(Math.fround(1 + 2 ** -8))).toBe(0x3f80); // halfway, even stays
    expect(ref.f32ToBf16(Math.fround(1 + 3 * 2 ** -8))).toBe(0x3f82); // halfway, odd rounds up
    expect(ref.f32ToBf16(-Infinity)).toBe(0xff80);
    expect(Number.isNaN(ref.bf16ToF32(ref.f32ToBf16(NaN)))).toBe(true);
    expect(ref.bf16ToF32(0xc040)).toBe(-3);
  });

  it('embed', async () => {
    arena.reset();
    const V = 50, H = 33, T = 17;
    const table = randBf16(V * H, 1);
    const tokens = randInt(T, 2, V);
    tokens[0] = V - 1;
    const out = arena.alloc(T * H * 4);
    mk.embed(s, { out, table: await arena.put(table), tokens: await arena.put(tokens), T, H, V });
    const want = new Float32Array(T * H);
    ref.embed({ out: want, table, tokens, T, H });
    expectSame(await arena.get(out, want), want, 'embed');
  });

  it('rmsnorm, separate and in place', async () => {
    arena.reset();
    const R = 5, N = 77, eps = 1e-6;
    const x = randF32(R * N, 3, -3, 3);
    const w = randBf16(N, 4, 2);
    const px = await arena.put(x);
    const pw = await arena.put(w);
    const out = arena.alloc(R * N * 4);
    mk.rmsnorm(s, { out, x: px, w: pw, R, N, eps });
    const want = new Float32Array(R * N);
    ref.rmsnorm({ out: want, x, w, R, N, eps });
    expectSame(await arena.get(out, want), want, 'rmsnorm');
    mk.rmsnorm(s, { out: px, x: px, w: pw, R, N, eps });
    expectSame(await arena.get(px, want), want, 'rmsnorm in place');
    // the formula, in double
    for (let r = 0; r < R; r++) {
      let ss = 0;
      for (let j = 0; j < N; j++) ss += x[r * N + j]! ** 2;
      const inv = 1 / Math.sqrt(ss / N + eps);
      for (let j = 0; j < N; j++) {
        expect(want[r * N + j]).toBeCloseTo(x[r * N + j]! * inv * ref.bf16ToF32(w[j]!), 5);
      }
    }
  });

  it.each([[1, 37, 45], [3, 37, 45], [20, 70, 33]])('matmul M=%i N=%i K=%i', async (M, N, K) => {
    arena.reset();
    const x = randF32(M * K, 5 + M);
    const w = randBf16(N * K, 6 + N);
    const out = arena.alloc(M * N * 4);
    mk.matmul(s, { out, x: await arena.put(x), w: await arena.put(w), M, N, K });
    const want = new Float32Array(M * N);
    ref.matmul({ out: want, x, w, M, N, K });
    expectSame(await arena.get(out, want), want, 'matmul');
    let dot = 0;
    for (let k = 0; k < K; k++) dot += x[(M - 1) * K + k]! * ref.bf16ToF32(w[(N - 1) * K + k]!);
    expect(want[M * N - 1]).toBeCloseTo(dot, 4);
  });

  /** Uploads group matrices and their address array; returns the pointers. */
  async function putGroups(ws: Uint16Array[]): Promise<{ ptrs: DevicePointer[]; table: DevicePointer }> {
    const ptrs: DevicePointer[] = [];
    for (const w of ws) ptrs.push(await arena.put(w));
    const addrs = BigUint64Array.from(ptrs, (p) => p.address);
    return { ptrs, table: await arena.put(new Int32Array(addrs.buffer)) };
  }

  it('grouped_matmul: groups of 0, 1, 3 and 17 rows, G = 1..20, odd N and K; rows independent of their group', async () => {
    const sizes = [0, 1, 3, 17];
    const r = rng(99);
    for (let G = 1; G <= 20; G++) {
      arena.reset();
      const N = 13 + 2 * (G % 4), K = 45 + 2 * (G % 3); // odd
      const rows = Array.from({ length: G }, (_, g) => (g < 4 ? sizes[(g + G) % 4]! : sizes[Math.floor(r() * 4)]!));
      // two rows before the first group and one after the last: not written
      const offsets = new Int32Array(G + 1);
      offsets[0] = 2;
      rows.forEach((m, g) => (offsets[g + 1] = offsets[g]! + m));
      const M = offsets[G]! + 1;
      const x = randF32(M * K, 100 + G);
      const ws = Array.from({ length: G }, (_, g) => randBf16(N * K, 200 + 31 * G + g));
      const { ptrs, table } = await putGroups(ws);
      const px = await arena.put(x);
      const out0 = randF32(M * N, 300 + G, 5, 6);
      const out = await arena.put(out0);
      mk.groupedMatmul(s, { out, x: px, weights: table, rowOffsets: await arena.put(offsets), G, M, N, K });
      const want = out0.slice();
      ref.groupedMatmul({ out: want, x, weights: ws, rowOffsets: offsets, G, M, N, K });
      const got = await arena.get(out, want);
      expectSame(got, want, `grouped_matmul G=${G}`);
      expectSame(want.subarray(0, 2 * N), out0.subarray(0, 2 * N), 'rows before the groups');
      expectSame(want.subarray((M - 1) * N), out0.subarray((M - 1) * N), 'rows after the groups');
      // Each group equals matmul over its rows (so grouped and per-expert launches mix freely).
      for (let g = 0; g < G; g++) {
        const m = rows[g]!;
        if (m === 0) continue;
        const o = arena.alloc(m * N * 4);
        mk.matmul(s, { out: o, x: px.add(offsets[g]! * K * 4), w: ptrs[g]!, M: m, N, K });
        expectSame(await arena.get(o, new Float32Array(m * N)), got.subarray(offsets[g]! * N, offsets[g + 1]! * N), `group ${g} as a matmul`);
      }
      // The same rows regrouped, one row per group (empty groups in between): the same results.
      const single: number[] = [0];
      const singleWs: Uint16Array[] = [];
      rows.forEach((m, g) => {
        for (let i = 0; i < m; i++) {
          singleWs.push(ws[g]!, ws[g]!);
          single.push(single[single.length - 1]! + 1, single[single.length - 1]! + 1);
        }
      });
      const Gs = singleWs.length;
      const rx = x.subarray(2 * K, (M - 1) * K);
      const { table: t2 } = await putGroups(singleWs);
      const o2 = arena.alloc((M - 3) * N * 4);
      mk.groupedMatmul(s, {
        out: o2, x: await arena.put(rx), weights: t2, rowOffsets: await arena.put(Int32Array.from(single)), G: Gs, M: M - 3, N, K,
      });
      expectSame(await arena.get(o2, new Float32Array((M - 3) * N)), got.subarray(2 * N, (M - 1) * N), `G=${G} regrouped by row`);
    }
    // against the formula, in double
    const N = 3, K = 5;
    const x = randF32(2 * K, 7);
    const w = randBf16(N * K, 8);
    const want = new Float32Array(2 * N);
    ref.groupedMatmul({ out: want, x, weights: [w], rowOffsets: Int32Array.from([0, 2]), G: 1, M: 2, N, K });
    for (let m = 0; m < 2; m++) {
      for (let n = 0; n < N; n++) {
        let dot = 0;
        for (let k = 0; k < K; k++) dot += x[m * K + k]! * ref.bf16ToF32(w[n * K + k]!);
        expect(want[m * N + n]).toBeCloseTo(dot, 5);
      }
    }
  });

  it('grouped_matmul: sizes, pointers and row offsets are checked', async () => {
    arena.reset();
    const N = 4, K = 8, M = 3;
    const w = randBf16(N * K, 1);
    const { table } = await putGroups([w, w]);
    const x = await arena.put(randF32(M * K, 2));
    const out0 = randF32(M * N, 3);
    const out = await arena.put(out0);
    const offs = await arena.put(Int32Array.from([0, 1, 3]));
    const args = { out, x, weights: table, rowOffsets: offs, G: 2, M, N, K };
    const bad = (patch: Partial<typeof args>, field: string) => expectArgumentError(() => mk.groupedMatmul(s, { ...args, ...patch }), field);
    bad({ G: 0 }, 'G');
    bad({ N: 0 }, 'N');
    bad({ M: -1 }, 'M');
    bad({ weights: table.add(4) }, 'weights');
    const end = table.range.at(table.range.size - 8);
    bad({ weights: end }, 'weights'); // 2 addresses need 16 bytes
    bad({ rowOffsets: end }, 'rowOffsets'); // 3 offsets need 12 bytes
    bad({ x: out.add(4) }, 'out');
    mk.groupedMatmul(s, { ...args, M: 0 }); // nothing to do
    await s.synchronize();

    // Bad offsets, or an unmapped or misaligned matrix of a group with rows, are illegal
    // addresses, found before anything is written.
    const badRun = async (offsets: number[], addrs: bigint[]) => {
      const t = await arena.put(new Int32Array(BigUint64Array.from(addrs).buffer));
      mk.groupedMatmul(s, { ...args, weights: t, rowOffsets: await arena.put(Int32Array.from(offsets)) });
      await expect(s.synchronize()).rejects.toBeInstanceOf(IllegalAddressError);
      rt.resetDevice(0);
      expectSame(await arena.get(out, out0), out0, 'out untouched');
    };
    const good = (await putGroups([w])).ptrs[0]!.address;
    await badRun([0, 2, 1], [good, good]); // decreasing
    await badRun([0, 1, 4], [good, good]); // past M
    await badRun([-1, 1, 3], [good, good]);
    await badRun([0, 1, 3], [good, 1n << 40n]); // the second group's matrix is not mapped
    await badRun([0, 1, 3], [good, good + 1n]); // misaligned
    // A group without rows never reads its address.
    const t = await arena.put(new Int32Array(BigUint64Array.from([good, 0n]).buffer));
    mk.groupedMatmul(s, { ...args, weights: t, rowOffsets: await arena.put(Int32Array.from([0, 3, 3])) });
    await s.synchronize();
  });

  it('grouped_matmul with an active list: the listed groups only, their rows bit-identical to the launch without it', async () => {
    const r = rng(4242);
    for (const [G, N, K] of [[20, 13, 45], [1, 7, 16], [64, 9, 40]] as const) {
      arena.reset();
      const rows = Array.from({ length: G }, (_, g) => (g % 3 === 1 ? 0 : 1 + Math.floor(r() * 9))); // 0..9 rows, some empty
      const offsets = new Int32Array(G + 1);
      offsets[0] = 1; // row 0 is in no group
      rows.forEach((m, g) => (offsets[g + 1] = offsets[g]! + m));
      const M = offsets[G]! + 1; // nor is the last row
      const x = randF32(M * K, 500 + G);
      const ws = Array.from({ length: G }, (_, g) => randBf16(N * K, 600 + G + g));
      const { table } = await putGroups(ws);
      const px = await arena.put(x), po = await arena.put(offsets);
      const out0 = randF32(M * N, 700 + G, 5, 6);
      const base = { x: px, weights: table, rowOffsets: po, G, M, N, K };
      const full = await arena.put(out0);
      mk.groupedMatmul(s, { ...base, out: full });
      const all = await arena.get(full, out0);
      const wantAll = out0.slice();
      ref.groupedMatmul({ out: wantAll, x, weights: ws, rowOffsets: offsets, G, M, N, K });
      expectSame(all, wantAll, `grouped_matmul G=${G}, no list`);

      const withRows = rows.flatMap((m, g) => (m > 0 ? [g] : []));
      const shuffled = withRows.filter((_, i) => i % 2 === 0).reverse();
      const lists: Array<[string, number[]]> = [
        ['the groups with rows, ascending (as route_rows writes it)', withRows],
        ['every group', Array.from({ length: G }, (_, g) => g)],
        ['every other group with rows, descending, plus empty ones', [...shuffled, ...rows.flatMap((m, g) => (m === 0 ? [g] : []))]],
        ['no group', []],
      ];
      for (const [what, groups] of lists) {
        for (const maxActive of [undefined, 1, 3, G + 5]) {
          const buf = new Int32Array(G + 1).fill(-9); // past the count: never read
          buf[0] = groups.length;
          buf.set(groups, 1);
          const pa = await arena.put(buf);
          const out = await arena.put(out0);
          const launch = vi.spyOn(s, 'launch');
          try {
            mk.groupedMatmul(s, { ...base, out, active: pa, ...(maxActive === undefined ? {} : { maxActive }) });
            expect(launch.mock.calls.length).toBe(1);
            // Tensor cores (the mock's choice): 128 columns per block of 256 threads, a block row per
            // group slot, no dynamic shared memory.
            expect(launch.mock.calls[0]![1]).toMatchObject({ grid: [Math.ceil(N / 128), Math.min(G, maxActive ?? G)], block: 256 });
            expect(launch.mock.calls[0]![1].sharedBytes ?? 0).toBe(0);
          } finally {
            launch.mockRestore();
          }
          const got = await arena.get(out, out0);
          const want = out0.slice();
          ref.groupedMatmul({ out: want, x, weights: ws, rowOffsets: offsets, active: buf, G, M, N, K });
          expectSame(got, want, `G=${G}, ${what}, maxActive ${String(maxActive)}: twin vs reference`);
          // Listed groups' rows: the bits of the launch without the list; every other row untouched.
          const listed = new Set(groups);
          for (let m = 0; m < M; m++) {
            const g = rows.findIndex((_, i) => offsets[i]! <= m && m < offsets[i + 1]!);
            const from = g >= 0 && listed.has(g) ? all : out0;
            expectSame(got.subarray(m * N, (m + 1) * N), from.subarray(m * N, (m + 1) * N), `G=${G}, ${what}: row ${m} (group ${g})`);
          }
        }
      }
      // An unlisted group's matrix is never read, even when the group has rows.
      const g1 = withRows[withRows.length - 1]!;
      const addrs = BigUint64Array.from((await putGroups(ws)).ptrs, (p) => p.address);
      addrs[g1] = 1n << 40n; // unmapped
      const t = await arena.put(new Int32Array(addrs.buffer));
      const others = withRows.filter((g) => g !== g1);
      const out = await arena.put(out0);
      mk.groupedMatmul(s, { ...base, weights: t, out, active: await arena.put(Int32Array.from([others.length, ...others])), maxActive: G });
      const got = await arena.get(out, out0);
      expectSame(got.subarray(offsets[g1]! * N, offsets[g1 + 1]! * N), out0.subarray(offsets[g1]! * N, offsets[g1 + 1]! * N), 'unlisted group untouched');
    }
  });

  it('grouped_matmul with an active list: the list and maxActive are checked', async () => {
    arena.reset();
    const N = 4, K = 8, M = 3, G = 2;
    const w = randBf16(N * K, 1);
    const { table } = await putGroups([w, w]);
    const x = await arena.put(randF32(M * K, 2));
    const out0 = randF32(M * N, 3);
    const out = await arena.put(out0);
    const offs = await arena.put(Int32Array.from([0, 1, 3]));
    const active = await arena.put(Int32Array.from([2, 0, 1]));
    const args = { out, x, weights: table, rowOffsets: offs, active, maxActive: 2, G, M, N, K };
    const bad = (patch: Partial<typeof args>, field: string) => expectArgumentError(() => mk.groupedMatmul(s, { ...args, ...patch }), field);
    bad({ active: active.add(2) }, 'active'); // misaligned
    bad({ active: active.range.at(active.range.size - 8) }, 'active'); // G + 1 = 3 entries need 12 bytes
    bad({ active: out.add(4) }, 'out'); // overlaps out
    bad({ maxActive: 0 }, 'maxActive');
    bad({ maxActive: 1.5 }, 'maxActive');
    bad({ active: undefined }, 'maxActive'); // a bound without a list
    mk.groupedMatmul(s, { ...args, maxActive: 1 }); // any positive bound is fine
    mk.groupedMatmul(s, { ...args, M: 0 }); // nothing to do
    await s.synchronize();
    const done = await arena.get(out, out0);
    const wantDone = out0.slice();
    ref.groupedMatmul({ out: wantDone, x: await arena.get(x, new Float32Array(M * K)), weights: [w, w], rowOffsets: Int32Array.from([0, 1, 3]), G, M, N, K });
    expectSame(done, wantDone, 'both groups listed, maxActive 1');

    // A count outside 0..G or a group outside 0..G-1 is an illegal address (the kernel traps), found
    // before anything is written; so is a bad row offset of a group the list leaves out (the twin
    // checks every offset).
    const badRun = async (list: number[], offsets = [0, 1, 3]) => {
      mk.groupedMatmul(s, { ...args, active: await arena.put(Int32Array.from(list)), rowOffsets: await arena.put(Int32Array.from(offsets)) });
      await expect(s.synchronize()).rejects.toBeInstanceOf(IllegalAddressError);
      rt.resetDevice(0);
      expectSame(await arena.get(out, done), done, 'out untouched');
    };
    await badRun([3, 0, 1]);
    await badRun([-1, 0, 1]);
    await badRun([2, 0, 2]);
    await badRun([1, -1, 0]);
    await badRun([1, 0, 0], [0, 1, 4]);
    expect(() => ref.groupedMatmul({ out: new Float32Array(M * N), x: new Float32Array(M * K), weights: [w, w], rowOffsets: Int32Array.from([0, 1, 3]),
      active: Int32Array.from([1, 2, 0]), G, M, N, K })).toThrow(RangeError);
  });

  it('add_bias', async () => {
    arena.reset();
    const M = 4, N = 29;
    const x = randF32(M * N, 7);
    const b = randBf16(N, 8);
    const px = await arena.put(x);
    mk.addBias(s, { x: px, b: await arena.put(b), M, N });
    const want = x.slice();
    ref.addBias({ x: want, b, M, N });
    expectSame(await arena.get(px, want), want, 'add_bias');
  });

  it('rope (rotate_half), against the formula too', async () => {
    arena.reset();
    const T = 6, heads = 3, D = 16, theta = 1e6;
    const x = randF32(T * heads * D, 9);
    const pos = Int32Array.from([0, 1, 2, 17, 99, 30000]);
    const px = await arena.put(x);
    mk.rope(s, { x: px, pos: await arena.put(pos), T, heads, D, theta });
    const want = x.slice();
    ref.rope({ x: want, pos, T, heads, D, theta });
    expectSame(await arena.get(px, want), want, 'rope');
    for (let t = 0; t < 5; t++) { // small positions: the f32 angle is accurate
      for (let h = 0; h < heads; h++) {
        for (let i = 0; i < D / 2; i++) {
          const a = pos[t]! / theta ** ((2 * i) / D);
          const b = (t * heads + h) * D;
          const x1 = x[b + i]!, x2 = x[b + i + D / 2]!;
          expect(want[b + i]).toBeCloseTo(x1 * Math.cos(a) - x2 * Math.sin(a), 5);
          expect(want[b + i + D / 2]).toBeCloseTo(x2 * Math.cos(a) + x1 * Math.sin(a), 5);
        }
      }
    }
    expectSame(want.subarray(0, heads * D), x.subarray(0, heads * D), 'position 0 is the identity');
  });

  /** Runs `fn` with the stream's launches recorded; returns the launched kernels' names. */
  function launchesOf(fn: () => void): string[] {
    const launch = vi.spyOn(s, 'launch');
    try {
      fn();
      return launch.mock.calls.map(([k]) => k.name);
    } finally {
      launch.mockRestore();
    }
  }

  it.each([
    [1, 4, 2, 16, 1e4], // one decode token, GQA
    [7, 6, 3, 34, 1e6], // D/2 odd
    [3, 2, 2, 2, 10], // the smallest head
    [2, 1, 1, 300, 1e6], // D above 256: more than one element per thread
  ])('qk_norm_rope T=%i NH=%i KVH=%i D=%i: twin vs reference, and bit-identical to rmsnorm q, rmsnorm k, rope q, rope k', async (T, NH, KVH, D, theta) => {
    arena.reset();
    const eps = 1e-6;
    const q = randF32(T * NH * D, 31 + D, -3, 3), k = randF32(T * KVH * D, 32 + D, -3, 3);
    const qw = randBf16(D, 33, 2), kw = randBf16(D, 34, 2);
    const pos = Int32Array.from({ length: T }, (_, t) => [0, 1, 17, 300, 30000, 5, 99][t % 7]!);
    const pqw = await arena.put(qw), pkw = await arena.put(kw), ppos = await arena.put(pos);
    for (const norm of [true, false]) {
      const what = `T=${T} NH=${NH} KVH=${KVH} D=${D}${norm ? '' : ', rope only'}`;
      const fq = await arena.put(q), fk = await arena.put(k);
      const weights = norm ? { qNorm: pqw, kNorm: pkw } : {};
      const names = launchesOf(() => mk.qkNormRope(s, { q: fq, k: fk, ...weights, pos: ppos, T, NH, KVH, D, eps, theta }));
      expect(names).toEqual(['emoe_qk_norm_rope']);
      const wantQ = q.slice(), wantK = k.slice();
      ref.qkNormRope({ q: wantQ, k: wantK, ...(norm ? { qw, kw } : {}), pos, T, NH, KVH, D, eps, theta });
      const gotQ = await arena.get(fq, wantQ), gotK = await arena.get(fk, wantK);
      expectSame(gotQ, wantQ, `qk_norm_rope q, ${what}: twin vs reference`);
      expectSame(gotK, wantK, `qk_norm_rope k, ${what}: twin vs reference`);
      // The unfused sequence on the mock: the same bits.
      const uq = await arena.put(q), uk = await arena.put(k);
      const unfused = launchesOf(() => {
        if (norm) {
          mk.rmsnorm(s, { out: uq, x: uq, w: pqw, R: T * NH, N: D, eps });
          mk.rmsnorm(s, { out: uk, x: uk, w: pkw, R: T * KVH, N: D, eps });
        }
        mk.rope(s, { x: uq, pos: ppos, T, heads: NH, D, theta });
        mk.rope(s, { x: uk, pos: ppos, T, heads: KVH, D, theta });
      });
      expect(unfused.length).toBe(norm ? 4 : 2);
      expectSame(gotQ, await arena.get(uq, q), `qk_norm_rope q, ${what}: fused vs unfused`);
      expectSame(gotK, await arena.get(uk, k), `qk_norm_rope k, ${what}: fused vs unfused`);
    }
    // Position 0 is the identity rotation: the normed rows of the first token (rope only: the input).
    if (pos[0] === 0) {
      const wantQ = new Float32Array(NH * D);
      ref.rmsnorm({ out: wantQ, x: q.subarray(0, NH * D), w: qw, R: NH, N: D, eps });
      const fq = await arena.put(q), fk = await arena.put(k);
      mk.qkNormRope(s, { q: fq, k: fk, qNorm: pqw, kNorm: pkw, pos: ppos, T, NH, KVH, D, eps, theta });
      expectSame((await arena.get(fq, q)).subarray(0, NH * D), wantQ, 'position 0: the normed row');
    }
  });

  it.each([
    [1, 37, 13, 45], // K odd
    [5, 32, 16, 64],
    [QKV_FUSED_MAX_ROWS, 20, 7, 24], // the largest M of the one launch
    [QKV_FUSED_MAX_ROWS + 1, 20, 7, 24], // three matmul launches
    [40, 9, 3, 33],
  ])('matmul_qkv M=%i Nq=%i Nkv=%i K=%i: twin vs reference, bit-identical to three matmuls; one launch up to QKV_FUSED_MAX_ROWS rows', async (M, Nq, Nkv, K) => {
    arena.reset();
    const x = randF32(M * K, 40 + M);
    const wq = randBf16(Nq * K, 41), wk = randBf16(Nkv * K, 42), wv = randBf16(Nkv * K, 43);
    const px = await arena.put(x), pwq = await arena.put(wq), pwk = await arena.put(wk), pwv = await arena.put(wv);
    const q = arena.alloc(M * Nq * 4), k = arena.alloc(M * Nkv * 4), v = arena.alloc(M * Nkv * 4);
    const names = launchesOf(() => mk.matmulQkv(s, { q, k, v, x: px, wq: pwq, wk: pwk, wv: pwv, M, Nq, Nkv, K }));
    expect(names).toEqual(M <= QKV_FUSED_MAX_ROWS ? ['emoe_matmul_qkv_bf16'] : new Array(3).fill('emoe_matmul_bf16'));
    const want = { q: new Float32Array(M * Nq), k: new Float32Array(M * Nkv), v: new Float32Array(M * Nkv) };
    ref.matmulQkv({ ...want, x, wq, wk, wv, M, Nq, Nkv, K });
    const got = { q: await arena.get(q, want.q), k: await arena.get(k, want.k), v: await arena.get(v, want.v) };
    for (const [name, w] of [['q', wq], ['k', wk], ['v', wv]] as const) {
      expectSame(got[name], want[name], `matmul_qkv ${name}: twin vs reference`);
      const o = arena.alloc(got[name].byteLength);
      mk.matmul(s, { out: o, x: px, w: await arena.put(w), M, N: name === 'q' ? Nq : Nkv, K });
      expectSame(got[name], await arena.get(o, got[name]), `matmul_qkv ${name}: fused vs matmul`);
    }
  });

  it.each([[5, 77], [1, 2048], [3, 1]])('add_rmsnorm R=%i N=%i: twin vs reference, bit-identical to add then rmsnorm', async (R, N) => {
    arena.reset();
    const eps = 1e-6;
    const x = randF32(R * N, 50 + N, -3, 3), y = randF32(R * N, 51 + N, -3, 3);
    const w = randBf16(N, 52, 2);
    const pw = await arena.put(w), py = await arena.put(y);
    const px = await arena.put(x), xn = arena.alloc(R * N * 4);
    expect(launchesOf(() => mk.addRmsnorm(s, { x: px, xn, y: py, w: pw, R, N, eps }))).toEqual(['emoe_add_rmsnorm']);
    const wantX = x.slice(), wantXn = new Float32Array(R * N);
    ref.addRmsnorm({ x: wantX, xn: wantXn, y, w, R, N, eps });
    const gotX = await arena.get(px, wantX), gotXn = await arena.get(xn, wantXn);
    expectSame(gotX, wantX, 'add_rmsnorm x: twin vs reference');
    expectSame(gotXn, wantXn, 'add_rmsnorm xn: twin vs reference');
    const ux = await arena.put(x), uxn = arena.alloc(R * N * 4);
    mk.add(s, { out: ux, a: ux, b: py, n: R * N });
    mk.rmsnorm(s, { out: uxn, x: ux, w: pw, R, N, eps });
    expectSame(gotX, await arena.get(ux, x), 'add_rmsnorm x: fused vs add');
    expectSame(gotXn, await arena.get(uxn, x), 'add_rmsnorm xn: fused vs add then rmsnorm');
  });

  it('fused launchers validate sizes and pointers, naming the field', async () => {
    arena.reset();
    const p = arena.alloc(64 * 1024);
    const qk = { q: p, k: p.add(4096), qNorm: p.add(8192), kNorm: p.add(8448), pos: p.add(8704), T: 2, NH: 4, KVH: 2, D: 16, eps: 1e-6, theta: 1e4 };
    expectArgumentError(() => mk.qkNormRope(s, { ...qk, D: 7 }), 'D');
    expectArgumentError(() => mk.qkNormRope(s, { ...qk, D: 0 }), 'D');
    expectArgumentError(() => mk.qkNormRope(s, { ...qk, NH: 0 }), 'NH');
    expectArgumentError(() => mk.qkNormRope(s, { ...qk, KVH: 1.5 }), 'KVH');
    expectArgumentError(() => mk.qkNormRope(s, { ...qk, theta: -1 }), 'theta');
    expectArgumentError(() => mk.qkNormRope(s, { ...qk, kNorm: undefined }), 'kNorm');
    expectArgumentError(() => mk.qkNormRope(s, { ...qk, qNorm: undefined }), 'qNorm');
    expectArgumentError(() => mk.qkNormRope(s, { ...qk, eps: undefined }), 'eps');
    expectArgumentError(() => mk.qkNormRope(s, { ...qk, eps: -1 }), 'eps');
    expectArgumentError(() => mk.qkNormRope(s, { ...qk, qNorm: p.add(8193) }), 'qNorm');
    expectArgumentError(() => mk.qkNormRope(s, { ...qk, pos: p.range.at(p.range.size - 4) }), 'pos');
    expectArgumentError(() => mk.qkNormRope(s, { ...qk, k: p.add(64) }), 'k'); // overlaps q
    expectArgumentError(() => mk.qkNormRope(s, { ...qk, q: p.range.at(p.range.size - 4) }), 'q');
    const mm = { q: p, k: p.add(4096), v: p.add(8192), x: p.add(12288), wq: p.add(16384), wk: p.add(20480), wv: p.add(24576), M: 2, Nq: 8, Nkv: 4, K: 16 };
    expectArgumentError(() => mk.matmulQkv(s, { ...mm, Nq: 0 }), 'Nq');
    expectArgumentError(() => mk.matmulQkv(s, { ...mm, Nkv: 0 }), 'Nkv');
    expectArgumentError(() => mk.matmulQkv(s, { ...mm, K: 0 }), 'K');
    expectArgumentError(() => mk.matmulQkv(s, { ...mm, M: -1 }), 'M');
    expectArgumentError(() => mk.matmulQkv(s, { ...mm, wk: p.add(20481) }), 'wk');
    expectArgumentError(() => mk.matmulQkv(s, { ...mm, wv: p.range.at(p.range.size - 2) }), 'wv');
    expectArgumentError(() => mk.matmulQkv(s, { ...mm, x: p.add(4096 + 16) }), 'k'); // overlaps k
    expectArgumentError(() => mk.matmulQkv(s, { ...mm, v: p.add(4) }), 'q'); // overlaps q
    const an = { x: p, xn: p.add(4096), y: p.add(8192), w: p.add(12288), R: 2, N: 16, eps: 1e-6 };
    expectArgumentError(() => mk.addRmsnorm(s, { ...an, N: 0 }), 'N');
    expectArgumentError(() => mk.addRmsnorm(s, { ...an, eps: Number.NaN }), 'eps');
    expectArgumentError(() => mk.addRmsnorm(s, { ...an, xn: p.add(64) }), 'xn'); // overlaps x
    expectArgumentError(() => mk.addRmsnorm(s, { ...an, y: p.add(4096 + 8) }), 'xn'); // overlaps xn
    expectArgumentError(() => mk.addRmsnorm(s, { ...an, y: p }), 'y'); // is x
    expectArgumentError(() => mk.addRmsnorm(s, { ...an, w: p.add(12289) }), 'w');
    // nothing to do: nothing queued
    expect(launchesOf(() => {
      mk.qkNormRope(s, { ...qk, T: 0 });
      mk.matmulQkv(s, { ...mm, M: 0 });
      mk.addRmsnorm(s, { ...an, R: 0 });
    })).toEqual([]);
    await s.synchronize();
  });

  it.each(['bf16', 'f32'] as const)('kv_store and attention, %s cache, over a paged cache (prefill, decode, padding), against dense attention too', async (dtype) => {
    arena.reset();
    const L = 2, layer = 1, BS = 4, KVH = 2, D = 8, NH = 4, MB = 3, blocks = 8;
    const lens = [9, 5, 1];
    // block tables: shuffled physical blocks; unused entries -1
    const table = Int32Array.from([6, 1, 3, 0, 5, -1, 7, -1, -1]);
    const geo = { L, BS, KVH, D };
    // every position of every sequence, plus a padding token (slot -1)
    const seqOf: number[] = [], posOf: number[] = [];
    lens.forEach((n, sq) => { for (let p = 0; p < n; p++) { seqOf.push(sq); posOf.push(p); } });
    const Tk = seqOf.length + 1;
    const slots = new Int32Array(Tk).fill(-1);
    for (let t = 0; t < seqOf.length; t++) slots[t] = table[seqOf[t]! * MB + Math.floor(posOf[t]! / BS)]! * BS + (posOf[t]! % BS);
    const k = randF32(Tk * KVH * D, 10, -2, 2);
    const v = randF32(Tk * KVH * D, 11, -2, 2);
    // The reference takes the dtype from the pool's array type.
    const pool0 = dtype === 'bf16' ? randBf16(blocks * ref.kvBlockElements(geo), 12) : randF32(blocks * ref.kvBlockElements(geo), 12);
    const pool = await arena.put(pool0);
    mk.kvStore(s, { pool, k: await arena.put(k), v: await arena.put(v), slots: await arena.put(slots), T: Tk, KVH, D, layer, L, BS, blocks, dtype });
    const poolRef = pool0.slice();
    ref.kvStore({ pool: poolRef, k, v, slots, T: Tk, KVH, D, layer, L, BS });
    expectSame(await arena.get(pool, poolRef), poolRef, 'kv_store pool');
    expect(poolRef.subarray(0, ref.kvOffset(geo, 0, 1, 0, 0))).toEqual(pool0.subarray(0, ref.kvOffset(geo, 0, 1, 0, 0))); // layer 0 untouched
    // Token 0's K row as stored: rounded to bf16, or exactly k for an f32 cache.
    const k0 = ref.kvOffset(geo, Math.floor(slots[0]! / BS), layer, 0, slots[0]! % BS);
    const storedK0 = Array.from(poolRef.subarray(k0, k0 + KVH * D));
    expect(storedK0).toEqual(Array.from(dtype === 'bf16' ? ref.toBf16(k.subarray(0, KVH * D)) : k.subarray(0, KVH * D)));

    // queries: all of sequence 0 (prefill), sequence 1 at its last position, sequence 2 at 0, padding
    const tokSeq = Int32Array.from([...Array.from({ length: 9 }, () => 0), 1, 2, 0]);
    const tokPos = Int32Array.from([...Array.from({ length: 9 }, (_, i) => i), 4, 0, -1]);
    const T = tokSeq.length;
    const q = randF32(T * NH * D, 13, -2, 2);
    const scale = 1 / Math.sqrt(D);
    const out = arena.alloc(T * NH * D * 4);
    mk.attention(s, {
      out, q: await arena.put(q), pool, blockTable: await arena.put(table), tokSeq: await arena.put(tokSeq),
      tokPos: await arena.put(tokPos), T, NH, KVH, D, layer, L, BS, MB, scale, blocks, S: 3, dtype,
    });
    const want = new Float32Array(T * NH * D).fill(7);
    ref.attention({ out: want, q, pool: poolRef, blockTable: table, tokSeq, tokPos, T, NH, KVH, D, layer, L, BS, MB, scale });
    expectSame(await arena.get(out, want), want, 'attention');
    expect(Array.from(want.subarray((T - 1) * NH * D))).toEqual(new Array(NH * D).fill(0));

    // dense double-precision attention from the K/V of each sequence as the cache holds them (bf16-rounded
    // or not): with an f32 cache, a kernel that rounded K or V to bf16 would miss this by ~1e-3
    const kb = dtype === 'bf16' ? ref.fromBf16(ref.toBf16(k)) : k, vb = dtype === 'bf16' ? ref.fromBf16(ref.toBf16(v)) : v;
    const tokenIndex = (sq: number, p: number) => seqOf.findIndex((x, i) => x === sq && posOf[i] === p);
    for (let t = 0; t < T - 1; t++) {
      for (let h = 0; h < NH; h++) {
        const g = Math.floor(h / (NH / KVH));
        const sc: number[] = [];
        for (let j = 0; j <= tokPos[t]!; j++) {
          const src = tokenIndex(tokSeq[t]!, j);
          let d0 = 0;
          for (let d = 0; d < D; d++) d0 += q[(t * NH + h) * D + d]! * kb[(src * KVH + g) * D + d]!;
          sc.push(d0 * scale);
        }
        const m = Math.max(...sc);
        const e = sc.map((x) => Math.exp(x - m));
        const z = e.reduce((a, b) => a + b, 0);
        for (let d = 0; d < D; d++) {
          let o = 0;
          for (let j = 0; j <= tokPos[t]!; j++) o += e[j]! * vb[(tokenIndex(tokSeq[t]!, j) * KVH + g) * D + d]!;
          expect(Math.abs(want[(t * NH + h) * D + d]! - o / z)).toBeLessThan(1e-5);
        }
      }
    }
  });

  it('router_topk: softmax, top-k in order, ties to the lower index, renorm', async () => {
    arena.reset();
    const T = 9, E = 12, K = 3;
    const logits = randF32(T * E, 14, -4, 4);
    logits.fill(0.5, 8 * E, 9 * E); // a row of ties
    logits[8 * E + 7] = 2;
    const pl = await arena.put(logits);
    for (const renorm of [false, true]) {
      const ids = arena.alloc(T * K * 4), weights = arena.alloc(T * K * 4);
      mk.routerTopk(s, { ids, weights, logits: pl, T, E, K, renorm });
      const wantIds = new Int32Array(T * K), wantW = new Float32Array(T * K);
      ref.routerTopk({ ids: wantIds, weights: wantW, logits, T, E, K, renorm });
      expectSame(await arena.get(ids, wantIds), wantIds, 'router ids');
      expectSame(await arena.get(weights, wantW), wantW, 'router weights');
      expect(Array.from(wantIds.subarray(8 * K))).toEqual([7, 0, 1]);
      for (let t = 0; t < T; t++) {
        const row = Array.from(logits.subarray(t * E, (t + 1) * E));
        const order = row.map((x, e) => [x, e] as const).sort((a, b) => b[0] - a[0] || a[1] - b[1]).map((p) => p[1]);
        expect(Array.from(wantIds.subarray(t * K, (t + 1) * K))).toEqual(order.slice(0, K));
        const z = row.reduce((a, x) => a + Math.exp(x - Math.max(...row)), 0);
        const probs = order.slice(0, K).map((e) => Math.exp(row[e]! - Math.max(...row)) / z);
        const sum = probs.reduce((a, b) => a + b, 0);
        probs.forEach((p, i) => expect(wantW[t * K + i]).toBeCloseTo(renorm ? p / sum : p, 6));
      }
    }
  });

  it('silu_mul and sigmoid_scale_rows, including saturated inputs', async () => {
    arena.reset();
    const n = 1000;
    const gate = randF32(n, 15, -20, 20);
    gate[0] = -100; gate[1] = 100; gate[2] = 0; gate[3] = -0;
    const up = randF32(n, 16, -3, 3);
    const out = arena.alloc(n * 4);
    mk.siluMul(s, { out, gate: await arena.put(gate), up: await arena.put(up), n });
    const want = new Float32Array(n);
    ref.siluMul({ out: want, gate, up, n });
    expectSame(await arena.get(out, want), want, 'silu_mul');
    expect(want[5]).toBeCloseTo((gate[5]! / (1 + Math.exp(-gate[5]!))) * up[5]!, 5);

    const T = 7, H = 19;
    const y = randF32(T * H, 17);
    const g = randF32(T, 18, -10, 10);
    g[0] = -200;
    const py = await arena.put(y);
    mk.sigmoidScaleRows(s, { y: py, g: await arena.put(g), T, H });
    const wantY = y.slice();
    ref.sigmoidScaleRows({ y: wantY, g, T, H });
    expectSame(await arena.get(py, wantY), wantY, 'sigmoid_scale_rows');
  });

  it('gather_rows, scatter_rows, combine_topk', async () => {
    arena.reset();
    const R = 10, H = 13, M = 6, T = 3, K = 2;
    const x = randF32(R * H, 19);
    const rows = Int32Array.from([9, 0, 4, 4, 2, 7]);
    const px = await arena.put(x);
    const gathered = arena.alloc(M * H * 4);
    mk.gatherRows(s, { out: gathered, x: px, rows: await arena.put(rows), M, H, R });
    const wantG = new Float32Array(M * H);
    ref.gatherRows({ out: wantG, x, rows, M, H });
    expectSame(await arena.get(gathered, wantG), wantG, 'gather_rows');

    const distinct = Int32Array.from([3, 8, 0, 5, 1, 9]);
    const target0 = randF32(R * H, 20);
    const target = await arena.put(target0);
    const src = randF32(M * H, 21);
    mk.scatterRows(s, { out: target, x: await arena.put(src), rows: await arena.put(distinct), M, H, R });
    const wantS = target0.slice();
    ref.scatterRows({ out: wantS, x: src, rows: distinct, M, H });
    expectSame(await arena.get(target, wantS), wantS, 'scatter_rows');

    const out0 = randF32(T * H, 22);
    const slots = randF32(T * K * H, 23);
    const weights = randF32(T * K, 24, 0, 1);
    const pout = await arena.put(out0);
    mk.combineTopk(s, { out: pout, slots: await arena.put(slots), weights: await arena.put(weights), T, K, H });
    const wantC = out0.slice();
    ref.combineTopk({ out: wantC, slots, weights, T, K, H });
    expectSame(await arena.get(pout, wantC), wantC, 'combine_topk');
  });

  /** Random top-k ids [T, K] (distinct within a token) and a route table of `devices` devices. */
  function routing(T: number, K: number, E: number, devices: number, seed: number): { ids: Int32Array; route: Int32Array } {
    const r = rng(seed);
    const ids = new Int32Array(T * K);
    for (let t = 0; t < T; t++) {
      const chosen = new Set<number>();
      for (let k = 0; k < K; k++) {
        let x = Math.floor(r() * E);
        while (chosen.has(x)) x = (x + 1) % E;
        chosen.add(x);
        ids[t * K + k] = x;
      }
    }
    const route = Int32Array.from({ length: E }, () => Math.floor(r() * devices));
    return { ids, route };
  }

  /**
   * Routes (ids, route) for `device` on the twin and in the reference, compares every output bit for
   * bit, checks them against a sort by (expert, t, k) too, and returns the device's pairs [expert, slot].
   */
  async function checkRoute(T: number, K: number, E: number, ids: Int32Array, route: Int32Array, device: number, what: string) {
    const TK = T * K;
    const offsets = arena.alloc((E + 1) * 4), rows = await arena.put(new Int32Array(TK).fill(-7)), perm = await arena.put(new Int32Array(TK).fill(-7));
    const active = await arena.put(new Int32Array(E + 1).fill(-7));
    mk.routeRows(s, { rowOffsets: offsets, rows, perm, active, ids: await arena.put(ids), route: await arena.put(route), device, T, K, E });
    const want = {
      rowOffsets: new Int32Array(E + 1), rows: new Int32Array(TK).fill(-7), perm: new Int32Array(TK).fill(-7), active: new Int32Array(E + 1).fill(-7),
    };
    ref.routeRows({ ...want, ids, route, device, T, K, E });
    expectSame(await arena.get(offsets, want.rowOffsets), want.rowOffsets, `route_rows offsets ${what}`);
    expectSame(await arena.get(rows, want.rows), want.rows, `route_rows rows ${what}`);
    expectSame(await arena.get(perm, want.perm), want.perm, `route_rows perm ${what}`);
    expectSame(await arena.get(active, want.active), want.active, `route_rows active ${what}`);
    // Independently: a sort by (expert, t, k) of this device's pairs.
    const mine = Array.from(ids, (x, i) => [x, i] as const).filter(([x]) => route[x] === device).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    const total = want.rowOffsets[E]!;
    expect(total).toBe(mine.length);
    expect(Array.from(want.perm.subarray(0, total))).toEqual(mine.map(([, i]) => i));
    expect(Array.from(want.rows.subarray(0, total))).toEqual(mine.map(([, i]) => Math.floor(i / K)));
    expect(Array.from(want.rows.subarray(total))).toEqual(new Array(TK - total).fill(-7)); // past the total: untouched
    for (let x = 0; x < E; x++) {
      const n = want.rowOffsets[x + 1]! - want.rowOffsets[x]!;
      expect(n).toBe(route[x] === device ? mine.filter(([y]) => y === x).length : 0);
    }
    // The active list: the experts with rows here, ascending, behind their count; past it untouched.
    const experts = [...new Set(mine.map(([x]) => x))];
    expect(want.active[0]).toBe(experts.length);
    expect(experts.length).toBeLessThanOrEqual(Math.min(E, TK));
    expect(Array.from(want.active.subarray(1, 1 + experts.length))).toEqual(experts);
    expect(Array.from(want.active.subarray(1 + experts.length))).toEqual(new Array(E - experts.length).fill(-7));
    return mine;
  }

  it('route_rows: every device\'s lists against the reference, a partition of the slots, stable within an expert', async () => {
    for (const [T, K, E, devices] of [[1, 1, 1, 1], [5, 2, 8, 4], [37, 3, 16, 3], [200, 8, 128, 4], [512, 8, 128, 2], [33, 4, 40, 1], [1, 8, 128, 4], [3, 8, 2048, 2]] as const) {
      arena.reset();
      const TK = T * K;
      const { ids, route } = routing(T, K, E, devices, 1000 + T + E);
      const seen = new Int32Array(TK);
      for (let d = 0; d < devices; d++) {
        for (const [, i] of await checkRoute(T, K, E, ids, route, d, `T=${T} E=${E} device ${d}`)) seen[i]!++;
      }
      expect(Array.from(seen)).toEqual(new Array(TK).fill(1)); // every slot computed exactly once
    }
  });

  it('route_rows: the active list when no expert has rows here, and when every expert has', async () => {
    arena.reset();
    // No rows at all: device 1 computes nothing of this rank, or computes experts nobody chose.
    const { ids } = routing(5, 2, 8, 1, 77);
    const none = await checkRoute(5, 2, 8, ids, new Int32Array(8), 1, 'no rows (route elsewhere)');
    expect(none.length).toBe(0);
    const unchosen = Int32Array.from({ length: 8 }, (_, x) => (ids.includes(x) ? 0 : 1));
    expect(unchosen.includes(1)).toBe(true);
    expect((await checkRoute(5, 2, 8, ids, unchosen, 1, 'no rows (unchosen experts)')).length).toBe(0);
    // Every expert active: T*K = E with each expert once, and every expert of many in several rows.
    for (const [T, K, E] of [[1, 8, 8], [40, 4, 16], [512, 8, 2048], [9, 4, 33]] as const) {
      arena.reset();
      const all = Int32Array.from({ length: T * K }, (_, i) => (Math.floor(i / K) + (i % K) * Math.ceil(E / K)) % E); // distinct per token
      const cover = new Set(all);
      expect(cover.size).toBe(E);
      const mine = await checkRoute(T, K, E, all, new Int32Array(E), 0, `all active T=${T} K=${K} E=${E}`);
      expect(mine.length).toBe(T * K);
      // Two devices: each gets its experts, all of them active.
      const half = Int32Array.from({ length: E }, (_, x) => x % 2);
      await checkRoute(T, K, E, all, half, 1, `odd experts T=${T} E=${E}`);
    }
  });

  it('gather_rows_count, scatter_rows_count, silu_mul_count: the first *count rows only', async () => {
    arena.reset();
    const R = 10, H = 13, M = 6;
    const x = randF32(R * H, 40);
    const rows = Int32Array.from([9, 0, 4, 4, -5, 1 << 20]); // past the count: never read
    const px = await arena.put(x);
    const prow = await arena.put(rows);
    for (const n of [0, 1, 4]) {
      const count = await arena.put(Int32Array.from([n]));
      const out0 = randF32(M * H, 41 + n);
      const out = await arena.put(out0);
      mk.gatherRowsCount(s, { out, x: px, rows: prow, count, M, H, R });
      const want = out0.slice();
      ref.gatherRowsCount({ out: want, x, rows, count: Int32Array.from([n]), M, H });
      expectSame(await arena.get(out, want), want, `gather_rows_count ${n}`);
      expectSame(want.subarray(n * H), out0.subarray(n * H), 'rows past the count');

      const distinct = Int32Array.from([3, 8, 0, 5, -1, -1]);
      const target0 = randF32(R * H, 50 + n);
      const target = await arena.put(target0);
      const src = randF32(M * H, 60 + n);
      mk.scatterRowsCount(s, { out: target, x: await arena.put(src), rows: await arena.put(distinct), count, M, H, R });
      const wantS = target0.slice();
      ref.scatterRowsCount({ out: wantS, x: src, rows: distinct, count: Int32Array.from([n]), M, H });
      expectSame(await arena.get(target, wantS), wantS, `scatter_rows_count ${n}`);

      const N = 7;
      const gate = randF32(M * N, 70 + n, -20, 20), up = randF32(M * N, 80 + n, -3, 3);
      const so0 = randF32(M * N, 90 + n);
      const so = await arena.put(so0);
      mk.siluMulCount(s, { out: so, gate: await arena.put(gate), up: await arena.put(up), count, M, N });
      const wantU = so0.slice();
      ref.siluMulCount({ out: wantU, gate, up, count: Int32Array.from([n]), M, N });
      expectSame(await arena.get(so, wantU), wantU, `silu_mul_count ${n}`);
      const full = new Float32Array(n * N);
      ref.siluMul({ out: full, gate, up, n: n * N });
      expectSame(wantU.subarray(0, n * N), full, 'silu_mul_count = silu_mul over the count');
    }
    // A count outside 0..M, or an expert id outside 0..E-1, is an illegal address, as the CUDA kernels trap.
    const illegal = async (launch: () => void) => {
      launch();
      await expect(s.synchronize()).rejects.toBeInstanceOf(IllegalAddressError);
      rt.resetDevice(0);
    };
    const out = arena.alloc(M * H * 4);
    for (const bad of [M + 1, -1]) {
      const count = await arena.put(Int32Array.from([bad]));
      await illegal(() => mk.gatherRowsCount(s, { out, x: px, rows: prow, count, M, H, R }));
      await illegal(() => mk.scatterRowsCount(s, { out: px, x: out, rows: prow, count, M, H, R }));
      await illegal(() => mk.siluMulCount(s, { out, gate: out, up: out, count, M, N: H }));
    }
    const offsets = arena.alloc(9 * 4), l1 = arena.alloc(8), l2 = arena.alloc(8), act = arena.alloc(9 * 4);
    await illegal(() => mk.routeRows(s, {
      rowOffsets: offsets, rows: l1, perm: l2, active: act, ids: px.range.at(0), route: arena.alloc(32), device: 0, T: 1, K: 1, E: 8,
    })); // x's first element is no expert id
  });

  it('routing kernels read and write another device\'s memory through peer access (and only with it)', async () => {
    // Rank 0's ids, normed x and slots on device 0, mapped with access for devices 0 and 1; device 1
    // routes, gathers, computes nothing here (rows as they are) and scatters back, as in the forward pass.
    const T = 6, K = 2, E = 4, H = 5, TK = T * K;
    const { ids, route } = routing(T, K, E, 2, 7);
    const peer = mappedChunk(rt, 0, 2 * 1024 * 1024, [0, 1]);
    const own = mappedChunk(rt, 0, 2 * 1024 * 1024, [0]); // device 1 has no access
    const s1 = rt.createStream(1);
    const mk1 = await ModelKernels.load(rt, 1);
    const local = mappedChunk(rt, 1, 2 * 1024 * 1024, [1]);
    try {
      const x = randF32(T * H, 8);
      const put = async (at: DevicePointer, data: Typed) => {
        await rt.write(at, new Uint8Array(data.buffer, data.byteOffset, data.byteLength), s);
        return at;
      };
      const pids = await put(peer.ptr, ids);
      const px = await put(peer.ptr.add(4096), x);
      const slots0 = randF32(TK * H, 9);
      const pslots = await put(peer.ptr.add(8192), slots0);
      const offsets = local.ptr, rows = local.ptr.add(256), perm = local.ptr.add(512), recv = local.ptr.add(1024);
      const active = local.ptr.add(768);
      const proute = local.ptr.add(4096);
      await rt.write(proute, new Uint8Array(route.buffer), s1);
      mk1.routeRows(s1, { rowOffsets: offsets, rows, perm, active, ids: pids, route: proute, device: 1, T, K, E });
      const count = offsets.add(E * 4);
      mk1.gatherRowsCount(s1, { out: recv, x: px, rows, count, M: TK, H, R: T });
      mk1.scatterRowsCount(s1, { out: pslots, x: recv, rows: perm, count, M: TK, H, R: TK });
      await s1.synchronize();
      // Slot t*K + k holds x[t] where device 1 computes expert ids[t*K + k]; the other slots are untouched.
      const got = new Float32Array((await rt.read(pslots, TK * H * 4, s)).buffer.slice(0));
      const want = slots0.slice();
      ids.forEach((e, i) => { if (route[e] === 1) want.set(x.subarray(Math.floor(i / K) * H, (Math.floor(i / K) + 1) * H), i * H); });
      expectSame(got, want, 'peer scatter of peer-gathered rows');
      expect(ids.some((e) => route[e] === 1) && ids.some((e) => route[e] === 0)).toBe(true);
      // The same ids in memory device 1 may not touch: an illegal address on device 1.
      const oids = await put(own.ptr, ids);
      mk1.routeRows(s1, { rowOffsets: offsets, rows, perm, active, ids: oids, route: proute, device: 1, T, K, E });
      await expect(s1.synchronize()).rejects.toBeInstanceOf(IllegalAddressError);
      rt.resetDevice(1);
    } finally {
      mk1.dispose();
      s1.dispose();
      for (const m of [peer, own, local]) {
        m.range.dispose();
        m.chunk.dispose();
      }
    }
  });

  it('routing launchers validate sizes and pointers, naming the field', () => {
    arena.reset();
    const p = arena.alloc(64 * 1024);
    const route = {
      rowOffsets: p, rows: p.add(1024), perm: p.add(2048), active: p.add(5120), ids: p.add(3072), route: p.add(4096), device: 0, T: 4, K: 2, E: 8,
    };
    expectArgumentError(() => mk.routeRows(s, { ...route, K: 0 }), 'K');
    expectArgumentError(() => mk.routeRows(s, { ...route, E: 0 }), 'E');
    expectArgumentError(() => mk.routeRows(s, { ...route, E: MAX_ROUTE_EXPERTS + 1 }), 'E');
    expectArgumentError(() => mk.routeRows(s, { ...route, T: MAX_ROUTE_ROWS / 2 + 1 }), 'T');
    expectArgumentError(() => mk.routeRows(s, { ...route, device: -1 }), 'device');
    expectArgumentError(() => mk.routeRows(s, { ...route, rows: p.add(2) }), 'rows');
    expectArgumentError(() => mk.routeRows(s, { ...route, perm: p.add(1028) }), 'rows'); // overlaps rows
    expectArgumentError(() => mk.routeRows(s, { ...route, ids: p.add(4) }), 'rowOffsets'); // overlaps the offsets
    expectArgumentError(() => mk.routeRows(s, { ...route, route: p.range.at(p.range.size - 4) }), 'route');
    expectArgumentError(() => mk.routeRows(s, { ...route, active: p.add(5122) }), 'active'); // misaligned
    expectArgumentError(() => mk.routeRows(s, { ...route, active: p.range.at(p.range.size - 32) }), 'active'); // E + 1 = 9 entries need 36 bytes
    expectArgumentError(() => mk.routeRows(s, { ...route, active: p.add(3072) }), 'active'); // overlaps ids
    expectArgumentError(() => mk.routeRows(s, { ...route, active: p.add(1024 + 16) }), 'rows'); // overlaps rows
    const g = { out: p, x: p.add(8192), rows: p.add(16384), count: p.add(20000), M: 4, H: 8, R: 4 };
    expectArgumentError(() => mk.gatherRowsCount(s, { ...g, count: p.add(20002) }), 'count');
    expectArgumentError(() => mk.gatherRowsCount(s, { ...g, x: p.add(64) }), 'out');
    expectArgumentError(() => mk.scatterRowsCount(s, { ...g, count: p.range.at(p.range.size) }), 'count');
    expectArgumentError(() => mk.siluMulCount(s, { out: p, gate: p, up: p, count: p, M: 2, N: 0 }), 'N');
    // nothing to do: nothing queued
    mk.routeRows(s, { ...route, T: 0 });
    mk.gatherRowsCount(s, { ...g, M: 0 });
  });

  it('argmax takes the first maximum; copy and add (in place)', async () => {
    arena.reset();
    const R = 4, N = 50;
    const x = randF32(R * N, 25);
    x[1 * N + 10] = 5; x[1 * N + 30] = 5; // tie: 10
    x.fill(-Infinity, 2 * N, 3 * N); // all equal: 0
    x[3 * N + 49] = 9;
    const out = arena.alloc(R * 4);
    mk.argmax(s, { out, x: await arena.put(x), R, N });
    const want = new Int32Array(R);
    ref.argmax({ out: want, x, R, N });
    expectSame(await arena.get(out, want), want, 'argmax');
    expect(Array.from(want.subarray(1))).toEqual([10, 0, 49]);

    const n = 333;
    const a = randF32(n, 26), b = randF32(n, 27);
    const pa = await arena.put(a), pb = await arena.put(b);
    const c = arena.alloc(n * 4);
    mk.copy(s, { out: c, x: pa, n });
    expectSame(await arena.get(c, a), a, 'copy');
    mk.add(s, { out: pa, a: pa, b: pb, n });
    const sum = new Float32Array(n);
    ref.addF32({ out: sum, a, b, n });
    expectSame(await arena.get(pa, sum), sum, 'add in place');
  });

  it('validates sizes and pointers, naming the field', async () => {
    arena.reset();
    const p = arena.alloc(4096);
    expectArgumentError(() => mk.routerTopk(s, { ids: p, weights: p, logits: p, T: 1, E: 4, K: 5, renorm: true }), 'K');
    expectArgumentError(() => mk.rope(s, { x: p, pos: p, T: 1, heads: 1, D: 7, theta: 1e4 }), 'D');
    expectArgumentError(() => mk.rope(s, { x: p, pos: p, T: 1, heads: 1, D: 8, theta: 0 }), 'theta');
    expectArgumentError(() => mk.matmul(s, { out: p, x: p.add(16), w: p, M: 2, N: 4, K: 4 }), 'out');
    expectArgumentError(() => mk.matmul(s, { out: p, x: p, w: p, M: 1.5, N: 4, K: 4 }), 'M');
    expectArgumentError(() => mk.embed(s, { out: p, table: p, tokens: p.add(2), T: 1, H: 4 }), 'tokens');
    expectArgumentError(() => mk.copy(s, { out: arena.alloc(4), x: p, n: 2 ** 30 }), 'out');
    expectArgumentError(() => mk.attention(s, {
      out: p, q: p, pool: p, blockTable: p, tokSeq: p, tokPos: p, T: 0, NH: 6, KVH: 4, D: 8, layer: 0, L: 1, BS: 4, MB: 1, scale: 1,
    }), 'KVH');
    expectArgumentError(() => mk.kvStore(s, { pool: p, k: p, v: p, slots: p, T: 0, KVH: 1, D: 8, layer: 2, L: 2, BS: 4 }), 'layer');
    for (const dtype of ['f16', 'F32', 4]) {
      expectArgumentError(() => mk.kvStore(s, { pool: p, k: p, v: p, slots: p, T: 1, KVH: 1, D: 8, layer: 0, L: 1, BS: 4, dtype: dtype as never }), 'dtype');
      expectArgumentError(() => mk.attention(s, {
        out: p, q: p.add(256), pool: p, blockTable: p, tokSeq: p, tokPos: p, T: 1, NH: 1, KVH: 1, D: 8, layer: 0, L: 1, BS: 4, MB: 1, scale: 1,
        dtype: dtype as never,
      }), 'dtype');
    }
    // An f32 pool is 4-byte elements: a pool of 4 blocks that fits bf16 elements does not fit f32 ones.
    const geo = { KVH: 1, D: 8, layer: 0, L: 1, BS: 4, blocks: 4 };
    const bf16Pool = p.range.at(p.range.size - 4 * 2 * 4 * 8 * 2); // exactly 4 bf16 blocks left in the range
    mk.kvStore(s, { pool: bf16Pool, k: p, v: p, slots: p, T: 0, ...geo });
    expectArgumentError(() => mk.kvStore(s, { pool: bf16Pool, k: p, v: p, slots: p, T: 0, ...geo, dtype: 'f32' }), 'pool');
    expectArgumentError(() => mk.attention(s, {
      out: p, q: p, pool: p, blockTable: p, tokSeq: p, tokPos: p, T: 0, NH: 4, KVH: 4, D: 512, layer: 0, L: 1, BS: 4, MB: 1, scale: 1,
    }), 'D');
    const other = rt.createStream(1);
    expectArgumentError(() => mk.copy(other, { out: p, x: p, n: 1 }), 'stream');
    other.dispose();
    // nothing to do: nothing queued, no error
    mk.matmul(s, { out: p, x: p, w: p, M: 0, N: 4, K: 4 });
    await s.synchronize();
  });

  it('a token id outside the mapped table is an illegal address, as on a GPU', async () => {
    arena.reset();
    const tokens = await arena.put(Int32Array.from([0, -3]));
    const out = arena.alloc(64);
    mk.embed(s, { out, table: arena.alloc(64), tokens, T: 2, H: 4 });
    await expect(s.synchronize()).rejects.toBeInstanceOf(IllegalAddressError);
    rt.resetDevice(0);
    const far = await arena.put(Int32Array.from([1 << 30]));
    mk.embed(s, { out, table: arena.alloc(64), tokens: far, T: 1, H: 4 });
    await expect(s.synchronize()).rejects.toBeInstanceOf(IllegalAddressError);
    rt.resetDevice(0);
  });
});

describe('grouped matmul kernel choice (tensor cores or CUDA cores)', () => {
  it('takes tensor cores when every device has compute capability 8.0 or later, or on the mock; forcing is checked', () => {
    expect(groupedMatmulKernel('cuda', ['9.0', '9.0'])).toBe('tensor-cores');
    expect(groupedMatmulKernel('cuda', ['8.0'])).toBe('tensor-cores');
    expect(groupedMatmulKernel('cuda', ['9.0', '7.5'])).toBe('cuda-cores'); // one device without: all on CUDA cores
    expect(groupedMatmulKernel('cuda', [''])).toBe('cuda-cores');
    expect(groupedMatmulKernel('mock', [''])).toBe('tensor-cores');
    expect(groupedMatmulKernel('cuda', ['9.0'], 'cuda-cores')).toBe('cuda-cores');
    expect(groupedMatmulKernel('mock', [''], 'tensor-cores')).toBe('tensor-cores');
    expect(() => groupedMatmulKernel('cuda', ['9.0', '7.0'], 'tensor-cores')).toThrow(/compute capability 8.0 or later \(cuda devices have 9.0, 7.0\)/);
  });

  it('launches the chosen kernel on the mock, with the same bits either way; the tensor-core twins take only 256 threads', async () => {
    // M = 7 rows over 3 groups: few rows per group (the tensor cores' few-rows tiling); 'many'
    // runs the same rows as M = 70 (63 more rows, 21 per group on average: the other tiling).
    const G = 3, N = 24, K = 40;
    const results: Float32Array[] = [];
    for (const [choice, many] of [['auto', false], ['cuda-cores', false], ['tensor-cores', false], ['tensor-cores', true]] as const) {
      const M = many ? 70 : 7;
      const rt = openMock({ groupedMatmul: choice });
      const s = rt.createStream(0);
      const mk = await ModelKernels.load(rt, 0);
      const arena = new Arena(rt, s, 4 * 1024 * 1024);
      try {
        expect(mk.groupedKernel).toBe(choice === 'cuda-cores' ? 'cuda-cores' : 'tensor-cores');
        const ws = [0, 1, 2].map((g) => randBf16(N * K, 10 + g));
        const ptrs: DevicePointer[] = [];
        for (const w of ws) ptrs.push(await arena.put(w));
        const table = await arena.put(new Int32Array(BigUint64Array.from(ptrs, (p) => p.address).buffer));
        const offsets = Int32Array.from([0, 2, 2, M]);
        const x = randF32(M * K, 20);
        const out = arena.alloc(M * N * 4);
        const sink: KernelTiming[] = [];
        const px = await arena.put(x), po = await arena.put(offsets);
        ModelKernels.profile(sink);
        const spy = vi.spyOn(s, 'launch');
        try {
          mk.groupedMatmul(s, { out, x: px, weights: table, rowOffsets: po, G, M, N, K });
          // CUDA cores: 16 columns per block and 8 staged x rows of K floats; tensor cores: 128 columns, none.
          expect(spy.mock.calls[0]![1]).toMatchObject(choice === 'cuda-cores'
            ? { grid: [Math.ceil(N / 16), G], block: 256, sharedBytes: 8 * K * 4 } : { grid: [1, G], block: 256 });
        } finally {
          spy.mockRestore();
          ModelKernels.profile(undefined);
        }
        await s.synchronize();
        expect(sink.map((t) => t.name)).toEqual([choice === 'cuda-cores' ? 'emoe_grouped_matmul_bf16'
          : many ? 'emoe_grouped_matmul_bf16_mma' : 'emoe_grouped_matmul_bf16_mma_fewrows']);
        for (const t of sink) { t.start.dispose(); t.end.dispose(); }
        const want = new Float32Array(M * N);
        ref.groupedMatmul({ out: want, x, weights: ws, rowOffsets: offsets, G, M, N, K });
        const got = await arena.get(out, want);
        expectSame(got, want, `grouped matmul, ${choice}`);
        results.push(got.slice(0, 7 * N));
        if (choice === 'tensor-cores' && !many) {
          const kernel = mk.module.kernel('emoe_grouped_matmul_bf16_mma_fewrows');
          const launch = (block: number) => s.launch(kernel, { grid: [1, G], block }, [out, arena.alloc(M * K * 4), table,
            po, arg.u64(0), arg.u32(G), arg.u32(M), arg.u32(N), arg.u32(K)]);
          launch(128);
          await expect(s.synchronize()).rejects.toThrow(/256 x 1 x 1/);
          rt.resetDevice(0);
          launch(256);
          await s.synchronize();
        }
      } finally {
        arena.dispose();
        mk.dispose();
      }
    }
    expectSame(results[1]!, results[0]!, 'cuda-cores vs auto (the mock twin serves both)');
    expectSame(results[3]!.subarray(0, 2 * N), results[2]!.subarray(0, 2 * N), 'group 0 rows: the same bits in both tilings');
  });
});
