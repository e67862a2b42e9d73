// `elasticmoe serve` (synthetic weights: scalable) and `elasticmoe scale` as a user runs them.
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import path from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

const cli = path.resolve(__dirname, '../../dist/cli/main.js');

async function startServer(): Promise<{ proc: ChildProcess; url: string }> {
  const proc = spawn(process.execPath, [cli, 'serve', '--backend', 'mock', '--port', '0', '--log-level', 'silent'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  const url = await new Promise<string>((resolve, reject) => {
    proc.stderr!.on('data', (d) => {
      err += d;
      const m = /elasticmoe serve: (http:\/\/[^ ]+) /.exec(err);
      if (m) resolve(m[1]!);
    });
    proc.on('exit', (code) => reject(new Error(`serve exited ${code}: ${err}`)));
  });
  return { proc, url };
}

const complete = async (url: string) => {
  const r = await fetch(`${url}/v1/completions`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'tiny-qwen3-moe', prompt: [5, 6, 7], max_tokens: 6 }),
  });
  return ((await r.json()) as { choices: Array<{ token_ids: number[] }> }).choices[0]!.token_ids;
};

describe('elasticmoe scale against elasticmoe serve', () => {
  let server: { proc: ChildProcess; url: string } | undefined;
  afterAll(() => server?.proc.kill('SIGKILL'));

  it('moves the running server to new devices, reports what moved, and keeps the same answers', async () => {
    server = await startServer();
    const before = await complete(server.url);
    const up = spawnSync(process.execPath, [cli, 'scale', '--devices', '0,1,2', '--url', server.url], { encoding: 'utf8' });
    expect(up.status, up.stderr).toBe(0);
    expect(up.stdout).toMatch(/^scaled 0 -> 0,1,2 in \d+ ms/);
    const json = spawnSync(process.execPath, [cli, 'scale', '--devices', '3', '--url', server.url, '--json'], { encoding: 'utf8' });
    expect(json.status, json.stderr).toBe(0);
    const report = JSON.parse(json.stdout);
    expect(report.to).toEqual([3]);
    expect(report.bytesCopied).toBe(report.lowerBoundBytes);
    expect(report.layout.devices).toEqual([3]);
    expect(await complete(server.url)).toEqual(before);
    const bad = spawnSync(process.execPath, [cli, 'scale', '--devices', '0,0', '--url', server.url], { encoding: 'utf8' });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/400: devices\[1\]/);
    server.proc.kill('SIGTERM');
    expect(await new Promise((r) => server!.proc.on('exit', r))).toBe(0);
    server = undefined;
  }, 30_000);

  it('says clearly when no server answers', () => {
    const r = spawnSync(process.execPath, [cli, 'scale', '--devices', '1', '--url', 'http://127.0.0.1:9'], { encoding: 'utf8' });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/--url must be the address of a running `elasticmoe serve`/);
  });
});
