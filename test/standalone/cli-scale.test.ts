// `elasticmoe serve` (synthetic weights or a checkpoint: both scale) and `elasticmoe scale` as a user runs them.
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { writeSafetensors } from '../../src/hmm/safetensors.js';
import { parseConfig } from '../../src/model/config.js';
import { weightShapes } from '../../src/model/weights.js';

const cli = path.resolve(__dirname, '../../dist/cli/main.js');

async function startServer(extra: string[] = []): Promise<{ proc: ChildProcess; url: string }> {
  const proc = spawn(process.execPath, [cli, 'serve', '--backend', 'mock', '--port', '0', '--log-level', 'silent', ...extra], { stdio: ['ignore', 'ignore', 'pipe'] });
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

/** Command lines of the live child processes of `pid` (from /proc). */
function children(pid: number): string[] {
  const out: string[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === pid) out.push(readFileSync(`/proc/${d}/cmdline`, 'utf8').replace(/\0/g, ' '));
    } catch {
      // the process went away meanwhile
    }
  }
  return out;
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
    expect(up.stdout).toMatch(/^scaled 0 -> 0,1,2 in \d+ ms \(plan \d+, .*first step \d+/);
    // The completion above left device 0's two shapes cached (its prompt's and its decode's): the
    // standby captured both ahead (up to 3 per device by default).
    expect(up.stdout).toMatch(/ready ahead: .*2 step graphs \(captured in \d+ ms before the switch\)/);
    // Device 3's standby chunks hold only what a scale-up onto it copies: the rest of its targets
    // are made on a worker thread while the standby engine is made against their addresses.
    const move = spawnSync(process.execPath, [cli, 'scale', '--devices', '3', '--url', server.url], { encoding: 'utf8' });
    expect(move.status, move.stderr).toBe(0);
    expect(move.stdout).toMatch(/target chunks made on a worker thread: \d+ in \d+ calls, \d+ ms \(the standby engine made meanwhile/);
    expect(await complete(server.url)).toEqual(before);
    const json = spawnSync(process.execPath, [cli, 'scale', '--devices', '0,1', '--url', server.url, '--json'], { encoding: 'utf8' });
    expect(json.status, json.stderr).toBe(0);
    const report = JSON.parse(json.stdout);
    expect(report.to).toEqual([0, 1]);
    expect(report.bytesCopied).toBe(report.lowerBoundBytes);
    expect(report.layout.devices).toEqual([0, 1]);
    expect(await complete(server.url)).toEqual(before);
    const bad = spawnSync(process.execPath, [cli, 'scale', '--devices', '0,0', '--url', server.url], { encoding: 'utf8' });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/400: devices\[1\]/);
    server.proc.kill('SIGTERM');
    expect(await new Promise((r) => server!.proc.on('exit', r))).toBe(0);
    server = undefined;
  }, 30_000);

  it('scales a server that loaded a checkpoint (--model, a text prompt): the same tokens before and after, on executor processes too', async () => {
    // A tiny qwen3_moe folder: config, bf16 safetensors, the fixture tokenizer.
    const model = mkdtempSync(path.join(os.tmpdir(), 'emoe-model-'));
    try {
      const raw = {
        model_type: 'qwen3_moe', hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16,
        vocab_size: 116, num_experts: 8, moe_intermediate_size: 32, norm_topk_prob: true, num_experts_per_tok: 2, max_position_embeddings: 128,
        eos_token_id: 115,
      };
      writeFileSync(path.join(model, 'config.json'), JSON.stringify(raw));
      for (const f of ['tokenizer.json', 'tokenizer_config.json']) copyFileSync(path.resolve(__dirname, '../fixtures/tokenizer', f), path.join(model, f));
      let x = 777;
      const tensors = weightShapes(parseConfig(raw)).map((w) => {
        const n = w.shape.reduce((a, b) => a * b, 1);
        const scale = /embed|lm_head/.test(w.name) ? 1 : 0.25;
        const f = new Float32Array(n);
        for (let i = 0; i < n; i++) {
          x = (x * 1103515245 + 12345) % 2 ** 31;
          f[i] = w.shape.length === 1 ? 1 : ((x / 2 ** 31) * 2 - 1) * scale;
        }
        return { name: w.name, dtype: 'bf16' as const, shape: w.shape, data: new Uint8Array(Uint16Array.from(new Uint32Array(f.buffer), (u) => u >>> 16).buffer) };
      });
      await writeSafetensors(path.join(model, 'model.safetensors'), tensors);
      const ask = async (url: string) => {
        const r = await fetch(`${url}/v1/completions`, {
          method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'hello world', max_tokens: 6, ignore_eos: true }),
        });
        expect(r.status).toBe(200);
        return ((await r.json()) as { choices: Array<{ token_ids: number[] }> }).choices[0]!.token_ids;
      };
      for (const extra of [[], ['--executor', 'process']]) {
        server = await startServer(['--model', model, '--kv-blocks', '64', ...extra]);
        const before = await ask(server.url);
        expect(before).toHaveLength(6);
        const up = spawnSync(process.execPath, [cli, 'scale', '--devices', '0,1', '--url', server.url, '--json'], { encoding: 'utf8' });
        expect(up.status, up.stderr).toBe(0);
        const report = JSON.parse(up.stdout);
        expect(report.layout.devices).toEqual([0, 1]);
        expect(report.bytesCopied).toBe(report.lowerBoundBytes);
        expect(await ask(server.url)).toEqual(before);
        server.proc.kill('SIGTERM');
        expect(await new Promise((r) => server!.proc.on('exit', r))).toBe(0);
        server = undefined;
      }
    } finally {
      rmSync(model, { recursive: true, force: true });
    }
  }, 60_000);

  it('with --expert-tables on, scales with the experts read in the virtual expert tables: the same answers, what was mapped reported', async () => {
    const plain = await startServer();
    const before = await complete(plain.url);
    plain.proc.kill('SIGKILL');
    server = await startServer(['--expert-tables', 'on']);
    expect(await complete(server.url)).toEqual(before);
    const up = spawnSync(process.execPath, [cli, 'scale', '--devices', '0,1', '--url', server.url], { encoding: 'utf8' });
    expect(up.status, up.stderr).toBe(0);
    expect(up.stdout).toMatch(/expert tables: \d+ expert chunks mapped into their slots before the switch \(\d+ ms\), ([1-9]\d* mapped ahead, )?\d+ unmapped after it/);
    expect(await complete(server.url)).toEqual(before);
    const down = spawnSync(process.execPath, [cli, 'scale', '--devices', '0', '--url', server.url, '--json'], { encoding: 'utf8' });
    expect(down.status, down.stderr).toBe(0);
    const report = JSON.parse(down.stdout);
    expect(report.expertTables.unmapped).toBeGreaterThan(0); // device 1's experts left the tables
    expect(await complete(server.url)).toEqual(before);
    server.proc.kill('SIGKILL');
    server = undefined;
    const bad = spawnSync(process.execPath, [cli, 'serve', '--backend', 'mock', '--expert-tables', 'maybe'], { encoding: 'utf8' });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/--expert-tables.*on or off \(got 'maybe'\)/);
  }, 60_000);

  it('with --executor process, serves and scales through executor processes with the same answers', async () => {
    server = await startServer(['--executor', 'process']);
    const executors = () => children(server!.proc.pid!).filter((c) => c.includes('executor/main.js'));
    // The serving executor and the standby started ahead for the next scale.
    await expect.poll(executors).toHaveLength(2);
    const before = await complete(server.url);
    const up = spawnSync(process.execPath, [cli, 'scale', '--devices', '1,2', '--url', server.url, '--json'], { encoding: 'utf8' });
    expect(up.status, up.stderr).toBe(0);
    const upReport = JSON.parse(up.stdout);
    expect(upReport.layout.devices).toEqual([1, 2]);
    // The standby started ahead had attached layout [0]'s chunks; [1, 2] keeps none of them, unless it was
    // initialised ahead for [0] -> [0, 1] by then (initAhead): device 1's pool, made with it, is [1, 2]'s too.
    expect(upReport.preattachedChunks.dropped).toBeGreaterThan(0);
    expect(upReport.preattachedChunks.kept).toBeLessThan(upReport.preattachedChunks.dropped);
    expect(upReport.prestartedExecutor).toBe(true);
    // The standby took over and the old executor exited; a new standby was started ahead.
    await expect.poll(executors).toHaveLength(2);
    expect(await complete(server.url)).toEqual(before);
    server.proc.kill('SIGTERM');
    expect(await new Promise((r) => server!.proc.on('exit', r))).toBe(0);
    server = undefined;
    const bad = spawnSync(process.execPath, [cli, 'serve', '--backend', 'mock', '--executor', 'threads'], { encoding: 'utf8' });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/--executor must be in-process or process/);
  }, 30_000);

  it('keeps standby chunks on the idle devices by default (the spare memory metric), none with --standby-chunks off', async () => {
    const spare = async (url: string) => {
      const text = await (await fetch(`${url}/metrics`)).text();
      return [...text.matchAll(/device_memory_bytes\{device="(\d+)",kind="spare"\} (\d+)/g)].map((m) => [Number(m[1]), Number(m[2])]);
    };
    server = await startServer();
    // Made in the background after start: devices 1-3 get some, the serving device 0 none.
    await expect.poll(async () => (await spare(server!.url)).filter(([, b]) => b! > 0).map(([d]) => d)).toEqual([1, 2, 3]);
    // Then filled with what a scale-up onto each would copy (--prefill-standby, default on).
    const filled = async (url: string) => {
      const text = await (await fetch(`${url}/metrics`)).text();
      return [...text.matchAll(/device_memory_bytes\{device="(\d+)",kind="spare_filled"\} (\d+)/g)].filter((m) => Number(m[2]) > 0).map((m) => Number(m[1]));
    };
    await expect.poll(() => filled(server!.url)).toEqual([1, 2, 3]);
    // Then the standby engines of the scale-ups onto them (--standby-engines, default on).
    const engines = async (url: string) => {
      const text = await (await fetch(`${url}/metrics`)).text();
      return [...text.matchAll(/standby_engine_graphs\{device="(\d+)"\} (\d+)/g)].map((m) => Number(m[1]));
    };
    await expect.poll(() => engines(server!.url)).toEqual([1, 2, 3]);
    // The serving engine's graphs (elasticmoe_layout_graphs): a request's decode steps capture their shape, then replay it.
    const graphs = async (url: string) => {
      const text = await (await fetch(`${url}/metrics`)).text();
      return Object.fromEntries([...text.matchAll(/layout_graphs\{kind="(\w+)"\} (\d+)/g)].map((m) => [m[1], Number(m[2])]));
    };
    await complete(server.url);
    const g = await graphs(server.url);
    expect(Object.keys(g).sort()).toEqual(['captures', 'covered', 'deferred', 'replays']);
    expect(g.captures).toBeGreaterThan(0);
    expect(g.replays).toBeGreaterThan(0);
    server.proc.kill('SIGTERM');
    expect(await new Promise((r) => server!.proc.on('exit', r))).toBe(0);
    server = await startServer(['--standby-chunks', 'off', '--precapture-graphs', '0', '--standby-engines', 'off']);
    await complete(server.url);
    expect(await spare(server.url)).toEqual([[0, 0], [1, 0], [2, 0], [3, 0]]);
    const up = spawnSync(process.execPath, [cli, 'scale', '--devices', '0,1', '--url', server.url, '--json'], { encoding: 'utf8' });
    expect(up.status, up.stderr).toBe(0);
    expect(JSON.parse(up.stdout).chunksFromStandby).toBe(0);
    expect(JSON.parse(up.stdout).standbyMadeAhead).toBeUndefined(); // made by the scale's attach phase
    expect(await engines(server.url)).toEqual([]);
    // Device 0's decode shape was cached, but no graph was asked for ahead.
    expect(JSON.parse(up.stdout).precapture).toMatchObject({ graphs: 0 });
    server.proc.kill('SIGTERM');
    expect(await new Promise((r) => server!.proc.on('exit', r))).toBe(0);
    server = undefined;
    const bad = spawnSync(process.execPath, [cli, 'serve', '--backend', 'mock', '--standby-chunks', 'maybe'], { encoding: 'utf8' });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/--standby-chunks must be on or off/);
    const badFill = spawnSync(process.execPath, [cli, 'serve', '--backend', 'mock', '--prefill-standby', 'yes'], { encoding: 'utf8' });
    expect(badFill.status).toBe(1);
    expect(badFill.stderr).toMatch(/--prefill-standby must be on or off/);
    const badEngines = spawnSync(process.execPath, [cli, 'serve', '--backend', 'mock', '--standby-engines', '1'], { encoding: 'utf8' });
    expect(badEngines.status).toBe(1);
    expect(badEngines.stderr).toMatch(/--standby-engines must be on or off/);
    for (const n of ['-1', 'x', '1.5']) {
      const r = spawnSync(process.execPath, [cli, 'serve', '--backend', 'mock', `--precapture-graphs=${n}`], { encoding: 'utf8' });
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/--precapture-graphs must be a non-negative integer/);
    }
  }, 30_000);

  it('says clearly when no server answers', () => {
    const r = spawnSync(process.execPath, [cli, 'scale', '--devices', '1', '--url', 'http://127.0.0.1:9'], { encoding: 'utf8' });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/--url must be the address of a running `elasticmoe serve`/);
  });
});

describe('elasticmoe scale report', () => {
  it('warns of what the release could not free, naming the first, while the scale itself succeeded', async () => {
    const { createServer } = await import('node:http');
    const { runScale } = await import('../../src/cli/scale.js');
    const report = {
      from: [0, 1], to: [0], ms: 420, bytesCopied: 0, chunksCopied: 0, chunksReused: 10, chunksReleased: 8, lowerBoundBytes: 0,
      phases: { planMs: 1, prepareMs: 2, attachMs: 3, switchMs: 4, firstStepMs: 5, releaseMs: 6 },
      releaseErrors: ['KV pool of device 1: FaultInjectedError: injected fault: Unmap call #2', 'L0.E1@1: FaultInjectedError: x'],
    };
    const server = createServer((_, res) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(report));
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    try {
      const port = (server.address() as { port: number }).port;
      let text = '';
      const code = await runScale({ devices: '0', url: `http://127.0.0.1:${port}`, out: { write: (s: string) => ((text += s), true) } as unknown as NodeJS.WritableStream });
      expect(code).toBe(0);
      expect(text).toMatch(/^scaled 0,1 -> 0 in 420 ms/);
      expect(text).toMatch(/warning: the release after the switch-over could not free 2 thing\(s\) \(the scale is done; what was refused is tried again\): KV pool of device 1: .*Unmap call #2/);
    } finally {
      server.close();
    }
  });
});
