import { describe, expect, it } from 'vitest';

import {
  CompileError, ElasticMoeError, FaultInjectedError, IllegalAddressError, InvalidArgumentError, NativeBackendError,
  OutOfMemoryError, errorFromStatus, possibleSolutions,
} from '../../src/index.js';

const base = { backend: 'cuda', api: 'cuMemCreate', code: 2, codeName: 'CUDA_ERROR_OUT_OF_MEMORY', message: 'out of memory', argument: '' };

describe('native status to typed errors', () => {
  it('maps each kind to its class and keeps the status', () => {
    const oom = errorFromStatus({ ...base, kind: 'OUT_OF_MEMORY' });
    expect(oom).toBeInstanceOf(OutOfMemoryError);
    expect(oom).toBeInstanceOf(ElasticMoeError);
    expect(oom.code).toBe('OUT_OF_MEMORY');
    expect(oom.api).toBe('cuMemCreate');
    expect(oom.codeName).toBe('CUDA_ERROR_OUT_OF_MEMORY');
    expect(oom.message).toMatch(/^cuda: cuMemCreate failed \(CUDA_ERROR_OUT_OF_MEMORY 2\): out of memory\. Free chunks/);
    expect(errorFromStatus({ ...base, kind: 'ILLEGAL_ADDRESS' })).toBeInstanceOf(IllegalAddressError);
    expect(errorFromStatus({ ...base, kind: 'COMPILE' })).toBeInstanceOf(CompileError);
    expect(errorFromStatus({ ...base, kind: 'FAULT_INJECTED' })).toBeInstanceOf(FaultInjectedError);
    expect(errorFromStatus({ ...base, kind: 'SOMETHING_NEW' })).toBeInstanceOf(NativeBackendError);
  });

  it('keeps the argument name of an invalid argument', () => {
    const e = errorFromStatus({ ...base, kind: 'INVALID_ARGUMENT', argument: 'size', message: 'Invalid argument: size must be a multiple of 2 MiB' });
    expect(e).toBeInstanceOf(InvalidArgumentError);
    expect((e as InvalidArgumentError).argument).toBe('size');
    expect(e.message).toBe('Invalid argument: size must be a multiple of 2 MiB');
  });
});

describe('addon load failures', () => {
  it('suggests building from source when no binary exists', () => {
    const s = possibleSolutions([{ source: 'node-gyp-build', error: 'No native build was found for platform=linux' }]);
    expect(s.join('\n')).toMatch(/npm run build:native/);
  });
  it('recognises a C library that is too old', () => {
    const s = possibleSolutions([{ source: 'prebuild', error: "/lib/libc.so.6: version `GLIBC_2.38' not found" }]);
    expect(s.join('\n')).toMatch(/newer C library/);
  });
});
