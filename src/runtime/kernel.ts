// Kernel modules and typed kernel arguments. The same kernel names resolve on
// cuda (compiled CUDA C / PTX) and on the mock (CPU twins registered natively).
import { InvalidArgumentError } from './errors.js';
import { DevicePointer } from './memory.js';
import type { NativeFunction, NativeKernelArg, NativeModule } from './native-types.js';

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

export function toNativeArgs(args: readonly KernelArg[]): NativeKernelArg[] {
  return args.map((a, i) => {
    if (a instanceof DevicePointer) return { type: 'ptr', range: a.range.native, offset: a.offset };
    if (a && typeof a === 'object' && 'type' in a) return a as NativeKernelArg;
    throw new InvalidArgumentError(`args[${i}]`, 'a DevicePointer or a typed scalar from arg.*()');
  });
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
