// Kernel modules and typed kernel arguments. The same kernel names resolve on
// cuda (compiled CUDA C / PTX) and on the mock (CPU twins registered natively).
import { InvalidArgumentError } from './errors.js';
import { DevicePointer } from './memory.js';
import type { NativeFunction, NativeModule, NativeRange } from './native-types.js';

export type KernelArg =
  | DevicePointer
  | { type: 'i32' | 'u32' | 'f32' | 'f64'; value: number }
  | { type: 'i64' | 'u64'; value: bigint | number };

/** Typed scalar arguments: `launch(k, dims, [ptr, arg.u32(7), arg.u64(n)])`. */
export const arg = {
  i32: (value: number): KernelArg => ({ type: 'i32', value }),
  u32: (value: number): KernelArg => ({ type: 'u32', value }),
  f32: (value: number): KernelArg => ({ type: 'f32', value }),
  f64: (value: number): KernelArg => ({ type: 'f64', value }),
  i64: (value: bigint | number): KernelArg => ({ type: 'i64', value }),
  u64: (value: bigint | number): KernelArg => ({ type: 'u64', value }),
};

/**
 * Launch words: the configuration and arguments of one launch in the layout
 * NativeStream.launchPacked reads (see native/napi/stream_wrap.cc), reused by every launch
 * (one JS thread; the addon reads them before it returns). Reading one typed array costs a
 * fraction of reading an object per argument, and a step queues thousands of launches.
 */
const TYPE_CODE = { i32: 1, u32: 2, i64: 3, u64: 4, f32: 5, f64: 6 } as const;
const TWO_32 = 2 ** 32;
const f32 = new Float32Array(1);
const f32Bits = new Uint32Array(f32.buffer);
const f64 = new Float64Array(1);
const f64Bits = new Uint32Array(f64.buffer);
/** The largest argument count the addon accepts. */
export const MAX_KERNEL_ARGS = 4096;

export interface PackedLaunch {
  /** [grid x3, block x3, sharedBytes, n, then 4 words per argument]. */
  words: Uint32Array;
  /** The ranges the pointer arguments index (each once). */
  ranges: NativeRange[];
}
const packed: PackedLaunch = { words: new Uint32Array(8 + 4 * 32), ranges: [] };

function splitU64(w: Uint32Array, at: number, v: bigint): void {
  w[at] = Number(v & 0xffffffffn);
  w[at + 1] = Number((v >> 32n) & 0xffffffffn);
}

function integer(name: string, v: unknown, min: number, max: number, what: string): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw new InvalidArgumentError(name, what);
  return v;
}

/**
 * Packs a launch's grid, block, shared bytes and arguments into the shared launch words.
 * Every value is checked here (InvalidArgumentError naming it): integers in their type's
 * range, i64/u64 as a bigint or a safe integer, pointers as DevicePointers.
 */
export function packLaunch(grid: readonly [number, number, number], block: readonly [number, number, number],
  sharedBytes: number, args: readonly KernelArg[]): PackedLaunch {
  if (args.length > MAX_KERNEL_ARGS) throw new InvalidArgumentError('args', `at most ${MAX_KERNEL_ARGS} kernel arguments`);
  if (packed.words.length < 8 + 4 * args.length) packed.words = new Uint32Array(8 + 4 * Math.max(args.length, 2 * (packed.words.length - 8) / 4));
  const w = packed.words;
  const ranges = packed.ranges;
  ranges.length = 0;
  w[0] = grid[0];
  w[1] = grid[1];
  w[2] = grid[2];
  w[3] = block[0];
  w[4] = block[1];
  w[5] = block[2];
  w[6] = integer('sharedBytes', sharedBytes, 0, TWO_32 - 1, 'an integer in [0, 2^32)');
  w[7] = args.length;
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    const at = 8 + 4 * i;
    if (a instanceof DevicePointer) {
      const native = a.range.native;
      let index = ranges.indexOf(native);
      if (index < 0) index = ranges.push(native) - 1;
      w[at] = 0;
      w[at + 1] = index;
      w[at + 2] = a.offset % TWO_32;
      w[at + 3] = Math.floor(a.offset / TWO_32);
      continue;
    }
    const code = a && typeof a === 'object' && 'type' in a ? TYPE_CODE[a.type as keyof typeof TYPE_CODE] : undefined;
    if (code === undefined) throw new InvalidArgumentError(`args[${i}]`, 'a DevicePointer or a typed scalar from arg.*()');
    const name = `args[${i}].value`;
    const v: unknown = a.value;
    w[at] = code;
    w[at + 1] = 0;
    w[at + 3] = 0;
    switch (a.type) {
      case 'i32':
        w[at + 2] = integer(name, v, -(2 ** 31), 2 ** 31 - 1, 'an integer in [-2^31, 2^31)') >>> 0;
        break;
      case 'u32':
        w[at + 2] = integer(name, v, 0, TWO_32 - 1, 'an integer in [0, 2^32)');
        break;
      case 'i64':
      case 'u64': {
        const signed = a.type === 'i64';
        let big: bigint;
        if (typeof v === 'bigint') {
          big = v;
          if (signed ? big < -(2n ** 63n) || big >= 2n ** 63n : big < 0n || big >= 2n ** 64n) {
            throw new InvalidArgumentError(name, signed ? 'a bigint in [-2^63, 2^63)' : 'a bigint in [0, 2^64)');
          }
        } else {
          const what = signed ? 'a bigint or a safe integer' : 'a bigint or a non-negative safe integer';
          big = BigInt(integer(name, v, signed ? -Number.MAX_SAFE_INTEGER : 0, Number.MAX_SAFE_INTEGER, what));
        }
        splitU64(w, at + 2, BigInt.asUintN(64, big));
        break;
      }
      case 'f32':
      case 'f64':
        if (typeof v !== 'number') throw new InvalidArgumentError(name, 'a number');
        if (a.type === 'f32') {
          f32[0] = v;
          w[at + 2] = f32Bits[0]!;
        } else {
          f64[0] = v;
          w[at + 2] = f64Bits[0]!;
          w[at + 3] = f64Bits[1]!;
        }
        break;
    }
  }
  return packed;
}

export type ModuleFormat = 'cuda' | 'ptx' | 'cubin' | 'ascend';

export interface ModuleSpec {
  /** 'cuda': CUDA C++ source compiled with NVRTC; 'ptx'; 'cubin'; 'ascend': path of an Ascend C binary. */
  format: ModuleFormat;
  /** Source text, PTX text, cubin bytes, or a file path for 'ascend'. */
  data: string | Uint8Array;
  /** Program name shown in compile logs. */
  name?: string;
  /** NVRTC options. */
  options?: string[];
}

export class Kernel {
  /** @internal */
  constructor(readonly native: NativeFunction) {}
  get name(): string {
    return this.native.name;
  }
}

export class Module implements Disposable {
  private readonly kernels = new Map<string, Kernel>();
  /** @internal */
  constructor(readonly native: NativeModule, readonly device: number) {}

  /** Compiler log (NVRTC), empty elsewhere. */
  get log(): string {
    return this.native.log;
  }
  kernel(name: string): Kernel {
    let k = this.kernels.get(name);
    if (!k) {
      k = new Kernel(this.native.getFunction(name));
      this.kernels.set(name, k);
    }
    return k;
  }
  dispose(): void {
    this.kernels.clear();
    this.native.unload();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}
