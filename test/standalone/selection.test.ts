import { describe, expect, it } from 'vitest';

import { BackendUnavailableError, Runtime, loadBinding, resolveRuntimeOptions, selectBackend } from '../../src/index.js';

const absent = { cudaLibrary: '/nonexistent/libcuda.so.1', aclLibrary: '/nonexistent/libascendcl.so' };

describe('backend selection', () => {
  it('lists the backends compiled in', () => {
    expect(loadBinding().compiledBackends().sort()).toEqual(['acl', 'cuda', 'mock']);
  });

  it('auto says why each accelerator is unavailable before choosing the mock', () => {
    const sel = selectBackend(resolveRuntimeOptions({ backend: 'auto', ...absent }, {}));
    expect(sel.backend).toBe('mock');
    expect(sel.mockFallback).toBe(true);
    expect(sel.probes.cuda?.available).toBe(false);
    expect(sel.probes.cuda?.reason).toMatch(/nonexistent\/libcuda\.so\.1/);
    expect(sel.probes.acl?.reason).toMatch(/nonexistent\/libascendcl\.so/);
    expect(sel.reason).toMatch(/no accelerator: cuda unavailable .*acl unavailable/);
  });

  it('auto with allowMock false refuses instead of falling back', () => {
    expect(() => Runtime.open({ backend: 'auto', allowMock: false, ...absent })).toThrow(BackendUnavailableError);
  });

  it('an explicit backend that is unavailable is an error naming the reason', () => {
    expect(() => Runtime.open({ backend: 'cuda', cudaLibrary: absent.cudaLibrary })).toThrow(
      /backend cuda is unavailable: .*nonexistent\/libcuda/);
    expect(() => Runtime.open({ backend: 'acl', aclLibrary: absent.aclLibrary })).toThrow(BackendUnavailableError);
  });
});
