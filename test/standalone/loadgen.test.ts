// The trace replay load generator (scripts/loadgen.mjs), its plot
// (scripts/plot-load.mjs) and the comparison harness's pure parts
// (scripts/compare-scaling.mjs): seeded traces whose arrival counts follow the
// requested shape, traces read back from CSV and JSON lines, and a replay of a
// short time-compressed bursty trace against a real `elasticmoe serve` on the
// mock (compiled dist, a child process on loopback).
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const ROOT = path.resolve(__dirname, '../..');
const LOADGEN = path.join(ROOT, 'scripts/loadgen.mjs');
const PLOT = path.join(ROOT, 'scripts/plot-load.mjs');
const COMPARE = path.join(ROOT, 'scripts/compare-scaling.mjs');
const CLI = path.join(ROOT, 'dist/cli/main.js');

interface Arrival { t: number; promptTokens: number; outputTokens: number; prompt?: number[] }
type Rec = Record<string, any>;

// The scripts are plain ESM without types: loaded at run time.
let lg: any;
let plot: any;
let compare: any;
const tmp = mkdtempSync(path.join(os.tmpdir(), 'emoe-loadgen-'));
beforeAll(async () => {
  lg = await import(pathToFileURL(LOADGEN).href);
  plot = await import(pathToFileURL(PLOT).href);
  compare = await import(pathToFileURL(COMPARE).href);
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const count = (arrivals: Arrival[], from: number, to: number) => arrivals.filter((a) => a.t >= from && a.t < to).length;

/** Poisson tolerance: within 4.5 standard deviations of the expected count. */
function expectPoisson(got: number, expected: number, what: string) {
  expect(Math.abs(got - expected), `${what}: ${got} arrivals, expected about ${expected}`).toBeLessThanOrEqual(4.5 * Math.sqrt(expected) + 1);
}

describe('synthesize', () => {
  it('is seeded: the same options give the same trace, another seed another one', () => {
    const o = { kind: 'bursts', durationS: 120, rate: 1, peakRate: 5, periodS: 30, burstS: 10, seed: 7 };
    const a = lg.synthesize(o) as Arrival[];
    expect(lg.synthesize(o)).toEqual(a);
    expect(lg.synthesize({ ...o, seed: 8 })).not.toEqual(a);
    expect(a.length).toBeGreaterThan(50);
    expect(a.every((x, i) => x.t >= 0 && x.t < 120 && (i === 0 || x.t >= a[i - 1]!.t))).toBe(true);
    // The paper's lengths by default: 2000-token prompts, 500 to 750 output tokens.
    expect(new Set(a.map((x) => x.promptTokens))).toEqual(new Set([2000]));
    expect(a.every((x) => Number.isInteger(x.outputTokens) && x.outputTokens >= 500 && x.outputTokens <= 750)).toBe(true);
    expect(Math.max(...a.map((x) => x.outputTokens)) - Math.min(...a.map((x) => x.outputTokens))).toBeGreaterThan(150);
    // Other lengths keep the arrival times (separate random streams).
    const b = lg.synthesize({ ...o, promptTokens: { mean: 300, min: 100, max: 600 }, outputTokens: { min: 5, max: 9 } }) as Arrival[];
    expect(b.map((x) => x.t)).toEqual(a.map((x) => x.t));
    expect(b.every((x) => x.promptTokens >= 100 && x.promptTokens <= 600 && x.outputTokens >= 5 && x.outputTokens <= 9)).toBe(true);
    const mean = b.reduce((s, x) => s + x.promptTokens, 0) / b.length;
    expect(Math.abs(mean - 300)).toBeLessThan(60);
    // With a vocabulary, each arrival carries its seeded prompt ids.
    const ids = lg.synthesize({ ...o, durationS: 20, promptTokens: { mean: 16 }, vocab: 100 }) as Arrival[];
    expect(ids.every((x) => x.prompt!.length === 16 && x.prompt!.every((t) => Number.isInteger(t) && t >= 0 && t < 100))).toBe(true);
    expect(lg.promptIds(3, 16, { seed: 7, vocab: 100 })).toEqual(ids[3]!.prompt);
  });

  it('steady: Poisson arrivals at the rate (count and exponential gaps)', () => {
    const a = lg.synthesize({ kind: 'steady', durationS: 2000, rate: 2, seed: 1 }) as Arrival[];
    expectPoisson(a.length, 4000, 'steady');
    for (let w = 0; w < 2000; w += 250) expectPoisson(count(a, w, w + 250), 500, `steady [${w}, ${w + 250})`);
    const gaps = a.slice(1).map((x, i) => x.t - a[i]!.t);
    const mean = gaps.reduce((s, g) => s + g, 0) / gaps.length;
    const sd = Math.sqrt(gaps.reduce((s, g) => s + (g - mean) ** 2, 0) / gaps.length);
    expect(mean).toBeCloseTo(0.5, 1);
    expect(sd / mean).toBeGreaterThan(0.9); // exponential: coefficient of variation 1
    expect(sd / mean).toBeLessThan(1.1);
  });

  it('step: the peak rate in the middle third, the base rate around it', () => {
    const a = lg.synthesize({ kind: 'step', durationS: 3000, rate: 1, peakRate: 5, seed: 2 }) as Arrival[];
    expectPoisson(count(a, 0, 1000), 1000, 'before the step');
    expectPoisson(count(a, 1000, 2000), 5000, 'during the step');
    expectPoisson(count(a, 2000, 3000), 1000, 'after the step');
    const s = lg.traceSpec({ kind: 'step', durationS: 300, rate: 1, peakRate: 5, stepAtS: 50, stepEndS: 300 });
    expect([0, 49.9, 50, 299].map((t) => lg.rateAt(s, t))).toEqual([1, 1, 5, 5]);
  });

  it('bursts: every period, its last burst seconds at the peak rate', () => {
    const o = { kind: 'bursts', durationS: 2000, rate: 1, peakRate: 6, periodS: 100, burstS: 25, seed: 3 };
    const a = lg.synthesize(o) as Arrival[];
    expect([0, 74.9, 75, 99.9, 100, 175].map((t) => lg.rateAt(lg.traceSpec(o), t))).toEqual([1, 1, 6, 6, 1, 6]);
    let base = 0;
    let burst = 0;
    for (let p = 0; p < 2000; p += 100) {
      const b = count(a, p, p + 75);
      const k = count(a, p + 75, p + 100);
      expectPoisson(b, 75, `base phase of period ${p}`);
      expectPoisson(k, 150, `burst of period ${p}`);
      base += b;
      burst += k;
    }
    expectPoisson(base, 1500, 'all base phases');
    expectPoisson(burst, 3000, 'all bursts');
    expect(base + burst).toBe(a.length);
  });

  it('refuses shapes that make no sense', () => {
    expect(() => lg.synthesize({ kind: 'sine' })).toThrow(/steady, step, bursts/);
    expect(() => lg.synthesize({ durationS: 0 })).toThrow(/durationS/);
    expect(() => lg.synthesize({ kind: 'bursts', periodS: 10, burstS: 20 })).toThrow(/burstS <= periodS/);
    expect(() => lg.synthesize({ promptTokens: { mean: 10, min: 20, max: 30 } })).toThrow(/promptTokens/);
  });
});

describe('readTrace', () => {
  const trace = [{ t: 0.25, promptTokens: 12, outputTokens: 5 }, { t: 1.5, promptTokens: 30, outputTokens: 7 }, { t: 3, promptTokens: 1, outputTokens: 1 }];
  const file = (name: string, text: string) => {
    const f = path.join(tmp, name);
    writeFileSync(f, text);
    return f;
  };

  it('reads back what writeTrace wrote, as CSV and as JSON lines', () => {
    for (const name of ['t.csv', 't.jsonl']) {
      const f = path.join(tmp, name);
      lg.writeTrace(f, trace);
      expect(lg.readTrace(f)).toEqual(trace);
    }
    expect(readFileSync(path.join(tmp, 't.csv'), 'utf8').split('\n')[0]).toBe('t,prompt_tokens,output_tokens');
    const synthetic = lg.synthesize({ kind: 'step', durationS: 60, rate: 2, seed: 5, promptTokens: { mean: 100, min: 10, max: 300 } });
    lg.writeTrace(path.join(tmp, 's.csv'), synthetic);
    expect(lg.readTrace(path.join(tmp, 's.csv'))).toEqual(synthetic);
  });

  it('takes other spellings: no header, snake_case keys, reordered columns, date-times, loadgen output', () => {
    expect(lg.readTrace(file('nohead.csv', '1.5,30,7\n0.25,12,5\n\n3,1,1\n'))).toEqual(trace);
    expect(lg.readTrace(file('snake.jsonl', '{"t":1.5,"prompt_tokens":30,"output_tokens":7}\n{"t":0.25,"prompt_tokens":12,"output_tokens":5}\n{"t":3,"prompt_tokens":1,"output_tokens":1}\n'))).toEqual(trace);
    expect(lg.readTrace(file('order.csv', 'output_tokens,t,prompt_tokens\n5,0.25,12\n7,1.5,30\n1,3,1\n'))).toEqual(trace);
    const azure = lg.readTrace(file('azure.csv', 'TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n'));
    expect(azure).toHaveLength(2);
    expect(azure[0]).toEqual({ t: 0, promptTokens: 374, outputTokens: 44 });
    expect(azure[1].t).toBeCloseTo(4.3146, 3);
    const run = [
      { kind: 'config', url: 'x' },
      { kind: 'request', id: 1, t: 0.75, traceT: 1.5, promptTokens: 20, requestedPromptTokens: 30, outputTokens: 7 },
      { kind: 'sample', t: 1 },
      { kind: 'request', id: 0, t: 0.125, traceT: 0.25, promptTokens: 12, requestedPromptTokens: 12, outputTokens: 5 },
      { kind: 'summary' },
    ];
    expect(lg.readTrace(file('run.jsonl', run.map((r) => JSON.stringify(r)).join('\n')))).toEqual(trace.slice(0, 2));
  });

  it('says which line is wrong', () => {
    expect(() => lg.readTrace(file('bad1.csv', 't,prompt_tokens,output_tokens\n0,10,5\n1,ten,5\n'))).toThrow(/bad1\.csv:3: prompt tokens/);
    expect(() => lg.readTrace(file('bad2.jsonl', '{"t":0,"promptTokens":1,"outputTokens":1}\n{oops\n'))).toThrow(/bad2\.jsonl:2: not JSON/);
    expect(() => lg.readTrace(file('bad3.csv', 'when,prompt,out\n0,1,1\n'))).toThrow(/header must name/);
    expect(() => lg.readTrace(file('empty.csv', '\n'))).toThrow(/empty/);
  });
});

describe('statistics', () => {
  it('percentiles, SLO attainment, device-hours', () => {
    expect(lg.percentile([4, 1, 3, 2], 0.5)).toBe(2.5);
    expect(lg.percentile([5], 0.99)).toBe(5);
    expect(lg.percentile([], 0.5)).toBeNull();
    const slo = { sloTtftMs: 100, sloTpotMs: 10 };
    const requests = [
      { id: 0, t: 0, end: 1, ttftMs: 50, tpotMs: 5, tokens: 10, error: null },
      { id: 1, t: 1, end: 2, ttftMs: 150, tpotMs: 5, tokens: 10, error: null },
      { id: 2, t: 2, end: 3, ttftMs: 50, tpotMs: 20, tokens: 10, error: null },
      { id: 3, t: 3, end: 3.5, ttftMs: null, tpotMs: null, tokens: 0, error: { type: 'http', status: 503 } },
    ].map((r) => ({ ...r, meetsSlo: lg.meetsSlo(r, slo) }));
    expect(requests.map((r) => r.meetsSlo)).toEqual([true, false, false, false]);
    // 2 devices for 1800 s, then 4 for 1800 s: 3 device-hours.
    const samples = [{ t: 0, devices: 2 }, { t: 1800, devices: 4 }, { t: 2700 }];
    const s = lg.summarize(requests, samples, { ...slo, end: 3600 });
    expect(s).toMatchObject({
      kind: 'summary', requests: 4, completed: 3, errors: 1, errorsByType: { 'http 503': 1 }, good: 1, attainment: 0.25,
      ttftAttainment: 0.5, tpotAttainment: 0.5, deviceHours: 3, meanDevices: 3, maxDevices: 4, deviceChanges: 1,
      attainmentPerDeviceHour: 0.083, goodPerDeviceHour: 0.3, tokens: 30,
    });
    expect(s.ttftMs).toEqual({ p50: 50, p90: 130, p99: 148, mean: 83.3 });
    const w = lg.windowedAttainment(requests, { windowS: 2, stepS: 1, end: 4 });
    expect(w.map((x: Rec) => x.attainment)).toEqual([1, 0.5, 0, 0, 0]);
  });
});

describe('compare-scaling', () => {
  it('grows the cold-restart layout from small to large', () => {
    expect(compare.deviceLadder([0], [0, 1, 2, 3])).toEqual([[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]);
    expect(compare.deviceLadder([2, 3], [0, 1, 2, 3, 4], 2)).toEqual([[2, 3], [2, 3, 0, 1], [2, 3, 0, 1, 4]]);
  });
});

// ---- against a real server

/** Balanced tags, one root <svg>, no NaN: enough to know a browser will parse it. */
function expectWellFormedSvg(svg: string) {
  expect(svg.startsWith('<svg xmlns="http://www.w3.org/2000/svg"')).toBe(true);
  expect(svg.trimEnd().endsWith('</svg>')).toBe(true);
  expect(svg).not.toMatch(/NaN|undefined|Infinity/);
  const stack: string[] = [];
  let roots = 0;
  for (const m of svg.matchAll(/<(\/?)([a-zA-Z][\w-]*)([^>]*?)(\/?)>/g)) {
    const [, close, name, attrs, self] = m;
    expect(attrs!.match(/"/g)?.length ?? 0, `quotes in <${name}${attrs}>`).toSatisfy((n: number) => n % 2 === 0);
    if (close) expect(stack.pop(), `</${name}>`).toBe(name);
    else if (!self) {
      if (stack.length === 0) roots++;
      stack.push(name!);
    } else if (stack.length === 0) roots++;
  }
  expect(stack).toEqual([]);
  expect(roots).toBe(1);
  // Text content has no raw markup characters.
  for (const m of svg.matchAll(/>([^<]*)</g)) expect(m[1]).not.toMatch(/[<>]|&(?!amp;|lt;|gt;|quot;)/);
}

const readRecords = (f: string): Rec[] => readFileSync(f, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const { port } = srv.address() as { port: number };
  await new Promise((r) => srv.close(r));
  return port;
}

describe('replay against elasticmoe serve on the mock', () => {
  let server: ChildProcess | undefined;
  let url = '';
  beforeAll(async () => {
    expect(existsSync(CLI), 'build dist first: npx tsc -p .').toBe(true);
    server = spawn(process.execPath, [CLI, 'serve', '--backend', 'mock', '--mock-capacity', '512MiB', '--devices', '0,1', '--port', '0', '--log-level', 'silent'], {
      stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ELASTICMOE_NO_WARN_MOCK: '1' },
    });
    let err = '';
    url = await new Promise<string>((resolve, reject) => {
      server!.stderr!.on('data', (d) => {
        err += d;
        const m = /elasticmoe serve: (http:\/\/\S+)/.exec(err);
        if (m) resolve(m[1]!);
      });
      server!.once('exit', (code) => reject(new Error(`elasticmoe serve exited ${code}: ${err}`)));
    });
  });
  afterAll(() => {
    if (server && server.exitCode === null) server.kill('SIGKILL');
  });

  const out = path.join(tmp, 'run.jsonl');
  const shape = ['--shape', 'bursts', '--duration', '24', '--rate', '2', '--peak-rate', '12', '--period', '12', '--burst', '4', '--seed', '11',
    '--prompt-mean', '24', '--prompt-min', '8', '--prompt-max', '48', '--output-min', '6', '--output-max', '16'];

  it('a time-compressed bursty trace: every request completes, with TTFT and TPOT, and the summary adds up', () => {
    const r = spawnSync(process.execPath, [LOADGEN, 'run', '--url', url, ...shape, '--time-scale', '6', '--slo-ttft-ms', '20000', '--slo-tpot-ms', '5000',
      '--sample-interval-ms', '250', '--out', out, '--quiet'], { encoding: 'utf8', timeout: 30_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/loadgen: \d+ requests, 0 errors; TTFT p50/);
    const trace = lg.synthesize({ kind: 'bursts', durationS: 24, rate: 2, peakRate: 12, periodS: 12, burstS: 4, seed: 11,
      promptTokens: { mean: 24, min: 8, max: 48 }, outputTokens: { min: 6, max: 16 } }) as Arrival[];
    expect(trace.length).toBeGreaterThan(60);

    const records = readRecords(out);
    expect(records[0]).toMatchObject({ kind: 'config', url, model: 'tiny-qwen3-moe', maxModelLen: 2048, arrivals: trace.length, timeScale: 6 });
    const summary = records.at(-1)!;
    expect(summary.kind).toBe('summary');
    const requests = records.filter((x) => x.kind === 'request').sort((a, b) => a.id - b.id);
    expect(requests.map((x) => x.id)).toEqual(trace.map((_, i) => i));
    requests.forEach((q, i) => {
      const a = trace[i]!;
      expect(q.error, `request ${i}: ${JSON.stringify(q.error)}`).toBeNull();
      expect(q).toMatchObject({ traceT: a.t, promptTokens: a.promptTokens, outputTokens: a.outputTokens, tokens: a.outputTokens, finishReason: 'length', status: 200, meetsSlo: true });
      expect(q.t).toBeCloseTo(a.t / 6, 3);
      expect(q.start).toBeGreaterThanOrEqual(q.t - 0.01);
      expect(q.ttftMs).toBeGreaterThan(0);
      expect(q.tpotMs).toBeGreaterThan(0);
      expect(q.e2eMs).toBeGreaterThanOrEqual(q.ttftMs);
      expect(q.end).toBeGreaterThanOrEqual(q.start);
      expect(q.usage).toEqual({ prompt_tokens: a.promptTokens, completion_tokens: a.outputTokens, total_tokens: a.promptTokens + a.outputTokens });
    });
    // The bursts are in the replay: the arrivals of the burst phases come 6x compressed.
    const burst = requests.filter((q) => q.traceT % 12 >= 8).length;
    expect(burst).toBeGreaterThan(requests.length / 2);

    expect(summary).toMatchObject({ requests: trace.length, completed: trace.length, errors: 0, errorsByType: {}, clamped: 0, good: trace.length, attainment: 1 });
    expect(summary.completed + summary.errors).toBe(summary.requests);
    expect(summary.tokens).toBe(trace.reduce((s, a) => s + a.outputTokens, 0));
    for (const k of ['p50', 'p90', 'p99']) expect(summary.ttftMs[k]).toBeGreaterThan(0);
    for (const k of ['p50', 'p90']) expect(summary.tpotMs[k]).toBeGreaterThan(0);
    expect(summary.ttftMs.p50).toBeLessThanOrEqual(summary.ttftMs.p99);

    const samples = records.filter((x) => x.kind === 'sample');
    expect(samples.length).toBeGreaterThanOrEqual(4);
    expect(samples.every((s) => s.devices === 2 && s.queueDepth >= 0 && s.running >= 0)).toBe(true);
    expect(summary.meanDevices).toBe(2);
    expect(summary.deviceHours).toBeCloseTo((2 * summary.durationS) / 3600, 4);
    expect(summary.attainmentPerDeviceHour).toBeCloseTo(1 / summary.deviceHours, -1);
  });

  it('plot-load writes a well-formed SVG of the run', () => {
    const svgFile = path.join(tmp, 'run.svg');
    const r = spawnSync(process.execPath, [PLOT, out, '--label', 'bursty <mock> & co', '--out', svgFile], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const svg = readFileSync(svgFile, 'utf8');
    expectWellFormedSvg(svg);
    expect(svg).toContain('arrivals per second');
    expect(svg).toContain('devices');
    expect(svg).toContain('SLO attainment of the requests');
    expect(svg).toContain('bursty &lt;mock&gt; &amp; co — SLO attainment 100.0%');
    expect(svg.match(/<polyline /g)!.length).toBeGreaterThanOrEqual(2);
    // Two runs overlaid, with restart shading.
    const records = readRecords(out);
    const other = [...records.slice(0, -1), { kind: 'event', action: 'restart', t: 1, from: [0], to: [0, 1] }, { kind: 'event', action: 'ready', t: 2, devices: [0, 1], downS: 1 }, records.at(-1)];
    const two = plot.plotLoad([{ label: 'a', records }, { label: 'b', records: other }], { title: 'two runs' });
    expectWellFormedSvg(two);
    expect(two.match(/fill-opacity="0.12"/g)).toHaveLength(3);
  });

  it('bounds the requests in flight, clamps prompts, and records HTTP and network errors', async () => {
    const arrivals = Array.from({ length: 6 }, (_, i) => ({ t: 0, promptTokens: 100, outputTokens: 8 + i }));
    const seen: Rec[] = [];
    const res = await lg.replay(arrivals, { url, concurrency: 2, maxPromptTokens: 10, sampleIntervalMs: 0, onRecord: (x: Rec) => seen.push(x) });
    expect(res.summary).toMatchObject({ requests: 6, completed: 6, errors: 0, clamped: 6 });
    expect(res.requests.every((q: Rec) => q.promptTokens === 10 && q.requestedPromptTokens === 100 && q.clamped && q.tokens === q.outputTokens)).toBe(true);
    // At no time more than two requests between their start and end.
    for (const q of res.requests) expect(res.requests.filter((o: Rec) => o.start < q.start && o.end > q.start + 1e-3).length).toBeLessThan(2);
    expect(res.requests.filter((q: Rec) => q.clientWaitMs > 5).length).toBeGreaterThanOrEqual(3);
    expect(seen.map((x) => x.kind)).toEqual(['config', ...arrivals.map(() => 'request'), 'summary']);

    // Past the context (fitting turned off): the server's 400, with its code; ids clamped to the vocabulary.
    const bad = await lg.replay([{ t: 0, promptTokens: 4, outputTokens: 3 }, { t: 0.01, promptTokens: 2100, outputTokens: 3 }],
      { url, fitContext: false, sampleIntervalMs: 0, sloTtftMs: 5000 });
    expect(bad.requests[0].error).toBeNull();
    expect(bad.requests[1].error).toMatchObject({ type: 'http', status: 400, code: 'context_length_exceeded' });
    expect(bad.summary).toMatchObject({ requests: 2, completed: 1, errors: 1, errorsByType: { 'http 400': 1 }, attainment: 0.5 });
    // Fitted to the server's context by default; a trace's own prompt ids are clamped to the vocabulary.
    const fit = await lg.replay([{ t: 0, promptTokens: 2100, outputTokens: 3 }, { t: 0, promptTokens: 3, outputTokens: 2, prompt: [5000, 7, 600] }],
      { url, sampleIntervalMs: 0 });
    expect(fit.requests[0]).toMatchObject({ error: null, promptTokens: 2045, clamped: true, tokens: 3 });
    expect(fit.requests[1]).toMatchObject({ error: null, promptTokens: 3, tokens: 2, usage: { prompt_tokens: 3 } });
    // Ids outside the server's vocabulary (a wrong --vocab) are the server's 400, recorded as such.
    const vocab = await lg.replay([{ t: 0, promptTokens: 50, outputTokens: 3 }], { url, sampleIntervalMs: 0, vocab: 100000 });
    expect(vocab.requests[0].error).toMatchObject({ type: 'http', status: 400, code: 'invalid_value', body: expect.stringMatching(/token id in 0\.\.511/) });

    // Nothing listening: network errors, and samples that say the server did not answer.
    const closed = `http://127.0.0.1:${await freePort()}`;
    const none = await lg.replay([{ t: 0, promptTokens: 4, outputTokens: 3 }, { t: 0.05, promptTokens: 4, outputTokens: 3 }],
      { url: closed, sampleIntervalMs: 50, devicesHint: () => 3 });
    expect(none.summary).toMatchObject({ requests: 2, completed: 0, errors: 2, errorsByType: { network: 2 }, attainment: 0 });
    expect(none.requests[0].error.message).toMatch(/ECONNREFUSED/);
    expect(none.samples[0]).toMatchObject({ devices: 3, error: expect.any(String) });
  });
});
