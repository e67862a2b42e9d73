import { spawnSync } from 'node:child_process';
import path from 'node:path';

import { describe, expect, it } from 'vitest';

const cli = path.resolve(__dirname, '../../dist/cli/main.js');
const run = (args: string[], env: Record<string, string> = {}) =>
  spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', env: { ...process.env, ...env } });

describe('elasticmoe devices', () => {
  it('prints each mock device with memory and the peer matrix', () => {
    const r = run(['devices', '--backend', 'mock', '--mock-devices', '3', '--mock-capacity', '1GiB']);
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^backend: mock/);
    expect(r.stdout).toMatch(/2\s+Mock Device 2\s+1\.00 GiB\s+1\.00 GiB/);
    expect(r.stdout).toMatch(/peer access/);
    expect(r.stdout.split('\n').filter((l) => /^[0-2]\s+(-|yes)/.test(l))).toHaveLength(3);
  });

  it('explains the auto choice', () => {
    const r = run(['devices', '--backend', 'auto', '--json'], {
      ELASTICMOE_CUDA_LIBRARY: '/nonexistent/libcuda.so.1',
      ELASTICMOE_ACL_LIBRARY: '/nonexistent/libascendcl.so',
    });
    expect(r.status).toBe(0);
    const report = JSON.parse(r.stdout);
    expect(report.backend).toBe('mock');
    expect(report.selection.mockFallback).toBe(true);
    expect(report.selection.probes.cuda.reason).toMatch(/libcuda/);
    const text = run(['devices'], { ELASTICMOE_CUDA_LIBRARY: '/nonexistent/libcuda.so.1', ELASTICMOE_ACL_LIBRARY: '/x/libascendcl.so' });
    expect(text.stdout).toMatch(/cuda: unavailable: .*nonexistent/);
    expect(text.stdout).toMatch(/mock: available, 4 device\(s\).*<- chosen/);
  });

  it('runs the same through the package\'s bin (dist/cli/bin.cjs, which sizes the thread pool first), exit codes included', () => {
    const bin = path.resolve(__dirname, '../../dist/cli/bin.cjs');
    const viaBin = spawnSync(process.execPath, [bin, 'devices', '--backend', 'mock', '--json'], { encoding: 'utf8' });
    expect(viaBin.status).toBe(0);
    expect(JSON.parse(viaBin.stdout)).toEqual(JSON.parse(run(['devices', '--backend', 'mock', '--json']).stdout));
    expect(spawnSync(process.execPath, [bin, 'frobnicate'], { encoding: 'utf8' }).status).toBe(2);
  });

  it('fails clearly on bad input', () => {
    const bad = run(['devices', '--backend', 'rocm']);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/must be one of auto, cuda, acl, mock/);
    const unknown = run(['frobnicate']);
    expect(unknown.status).toBe(2);
    expect(unknown.stderr).toMatch(/unknown command/);
    const flag = run(['devices', '--nope']);
    expect(flag.status).toBe(1);
    expect(flag.stderr).toMatch(/nope/);
    for (const args of [['generate', '--prompt-ids', '1'], ['serve']]) {
      const dtype = run([...args, '--backend', 'mock', '--kv-dtype', 'f16']);
      expect(dtype.status).toBe(1);
      expect(dtype.stderr).toMatch(/--kv-dtype must be 'bf16' or 'f32'/);
    }
  });
});
