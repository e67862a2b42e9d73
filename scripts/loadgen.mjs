#!/usr/bin/env node
// Trace replay load generator for `elasticmoe serve` (or any OpenAI-compatible
// server that takes token-id prompts). Plain Node ESM, no dependencies.
//
// A trace is a list of arrivals `{ t, promptTokens, outputTokens }` (t in
// seconds from the start). It is synthesized (seeded Poisson arrivals whose
// rate follows a shape: steady, a step, periodic bursts) or read from a file
// (JSON lines, or CSV `t,prompt_tokens,output_tokens`). Each arrival becomes a
// streaming POST /v1/completions with a prompt of seeded random token ids of
// its length, `max_tokens` = its output length and `ignore_eos: true`, sent at
// its time (open loop: a slow server does not slow the arrivals). Per request
// it records TTFT, TPOT, tokens and errors; every second it samples
// /admin/layout and /metrics (devices, queue depth, running sequences). The
// output is JSON lines: one `config`, then `request` and `sample` records as
// they happen (plus `event` records a harness adds), then one `summary`.
//
// Timing: every time is in seconds (`t`, `start`, `end`) or milliseconds (`*Ms`)
// from the start of the replay, on the client's monotonic clock. `ttftMs` is
// measured from the request's scheduled arrival, so time spent waiting for a
// client slot (--concurrency) counts, as the user would see it; `tpotMs` is the
// mean time between output tokens after the first.
//
//   node scripts/loadgen.mjs run --url http://127.0.0.1:8000 --shape bursts --duration 300 \
//     --rate 1 --peak-rate 4 --period 60 --burst 15 --slo-ttft-ms 2000 --slo-tpot-ms 100 --out run.jsonl
//   node scripts/loadgen.mjs run --url URL --trace trace.csv --time-scale 10 --concurrency 64 --out run.jsonl
//   node scripts/loadgen.mjs synth --shape step --duration 600 --rate 0.5 --peak-rate 3 --out trace.csv
//   node scripts/plot-load.mjs run.jsonl > run.svg
import { createWriteStream, readFileSync, writeFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

// ---------------------------------------------------------------- randomness

/** A 32-bit mix of integers (splitmix-style): independent seeds for independent streams. */
export function mixSeed(...parts) {
  let h = 0x9e3779b9;
  for (const p of parts) {
    let x = (Number(p) | 0) ^ h;
    x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
    x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
    h = (x ^ (x >>> 16)) >>> 0;
    h = (h + 0x9e3779b9) >>> 0;
  }
  return h;
}

/** mulberry32: a seeded uniform generator in [0, 1). */
export function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function normal(rand) {
  const u = Math.max(rand(), 1e-12);
  const v = rand();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
}

// ---------------------------------------------------------------- traces

const SHAPES = ['steady', 'step', 'bursts'];

/** The shape with every default filled in (what `rateAt` and `synthesize` use). */
export function traceSpec(o = {}) {
  const kind = o.kind ?? 'steady';
  if (!SHAPES.includes(kind)) throw new Error(`trace kind must be one of ${SHAPES.join(', ')} (got '${kind}')`);
  const durationS = o.durationS ?? 60;
  const rate = o.rate ?? 1;
  const peakRate = o.peakRate ?? 4 * rate;
  const periodS = o.periodS ?? Math.min(60, durationS / 2);
  const burstS = o.burstS ?? periodS / 4;
  const p = o.promptTokens ?? {};
  const mean = p.mean ?? 2000;
  const promptTokens = { mean, min: p.min ?? mean, max: p.max ?? mean };
  promptTokens.sd = p.sd ?? (promptTokens.max - promptTokens.min) / 4;
  const out = o.outputTokens ?? {};
  const outputTokens = { min: out.min ?? 500, max: out.max ?? 750 };
  const spec = {
    kind, durationS, rate, peakRate, periodS, burstS,
    stepAtS: o.stepAtS ?? durationS / 3,
    stepEndS: o.stepEndS ?? (2 * durationS) / 3,
    seed: o.seed ?? 0, promptTokens, outputTokens,
  };
  if (o.vocab !== undefined) spec.vocab = o.vocab;
  const bad = (what) => { throw new Error(`trace: ${what}`); };
  if (!(durationS > 0)) bad(`durationS must be > 0 (got ${durationS})`);
  if (!(rate >= 0) || !(peakRate >= 0) || rate + peakRate <= 0) bad(`rates must be >= 0 and not both 0 (rate ${rate}, peakRate ${peakRate})`);
  if (kind === 'bursts' && !(periodS > 0 && burstS >= 0 && burstS <= periodS)) bad(`bursts need 0 <= burstS <= periodS, periodS > 0 (got ${burstS}, ${periodS})`);
  if (!(promptTokens.min >= 1 && promptTokens.min <= promptTokens.mean && promptTokens.mean <= promptTokens.max)) {
    bad(`promptTokens must satisfy 1 <= min <= mean <= max (got ${JSON.stringify(promptTokens)})`);
  }
  if (!(outputTokens.min >= 1 && outputTokens.min <= outputTokens.max)) bad(`outputTokens must satisfy 1 <= min <= max (got ${JSON.stringify(outputTokens)})`);
  return spec;
}

/**
 * The arrival rate (requests/s) at trace time t:
 * - steady: `rate`;
 * - step: `peakRate` in [stepAtS, stepEndS) (defaults: the middle third), `rate` elsewhere;
 * - bursts: every `periodS`, the last `burstS` seconds of the period at `peakRate`, the rest at `rate`.
 */
export function rateAt(spec, t) {
  const s = spec.durationS === undefined || spec.stepAtS === undefined ? traceSpec(spec) : spec;
  switch (s.kind) {
    case 'step': return t >= s.stepAtS && t < s.stepEndS ? s.peakRate : s.rate;
    case 'bursts': return t % s.periodS >= s.periodS - s.burstS ? s.peakRate : s.rate;
    default: return s.rate;
  }
}

/**
 * A seeded synthetic trace: Poisson arrivals whose rate follows `rateAt` (by
 * thinning a process at the largest rate), prompt lengths from a normal around
 * `promptTokens.mean` (sd `(max - min) / 4` unless given) clamped to [min, max]
 * (fixed at the mean when min and max are absent), output lengths uniform in
 * [outputTokens.min, outputTokens.max]. Arrival times and lengths come from
 * separate streams, so changing the lengths keeps the arrival times. With
 * `vocab`, each arrival also carries its prompt's token ids.
 */
export function synthesize(options = {}) {
  const s = traceSpec(options);
  const arrive = rng(mixSeed(s.seed, 1));
  const accept = rng(mixSeed(s.seed, 2));
  const lengths = rng(mixSeed(s.seed, 3));
  const top = Math.max(s.rate, s.peakRate);
  const out = [];
  let t = 0;
  for (;;) {
    t += -Math.log(1 - arrive()) / top;
    if (t >= s.durationS) break;
    if (accept() * top >= rateAt(s, t)) continue;
    const p = s.promptTokens;
    const promptTokens = p.min === p.max ? p.min : Math.min(p.max, Math.max(p.min, Math.round(p.mean + p.sd * normal(lengths))));
    const o = s.outputTokens;
    const outputTokens = o.min + Math.floor(lengths() * (o.max - o.min + 1));
    const a = { t: Math.round(t * 1e6) / 1e6, promptTokens, outputTokens };
    if (s.vocab !== undefined) a.prompt = promptIds(out.length, promptTokens, { seed: s.seed, vocab: s.vocab });
    out.push(a);
  }
  return out;
}

/** The prompt of request `index`: `n` seeded random token ids in [0, vocab). */
export function promptIds(index, n, { seed = 0, vocab = 512 } = {}) {
  const r = rng(mixSeed(seed, 7, index));
  const ids = new Array(n);
  for (let i = 0; i < n; i++) ids[i] = Math.floor(r() * vocab);
  return ids;
}

const ALIASES = {
  t: ['t', 'time', 'timestamp', 'arrival', 'arrival_time', 'arrivaltime'],
  promptTokens: ['prompttokens', 'prompt_tokens', 'input_tokens', 'inputtokens', 'contexttokens', 'context_tokens', 'prompt_len'],
  outputTokens: ['outputtokens', 'output_tokens', 'generatedtokens', 'generated_tokens', 'max_tokens', 'output_len'],
};

function field(obj, name) {
  for (const k of Object.keys(obj)) if (ALIASES[name].includes(k.toLowerCase())) return obj[k];
  return undefined;
}

/** Seconds: a number, or a date-time (then relative to the trace's first arrival). */
function timeValue(v, where) {
  if (typeof v === 'number') return { s: v, abs: false };
  const text = String(v ?? '').trim();
  if (text !== '' && Number.isFinite(Number(text))) return { s: Number(text), abs: false };
  const ms = Date.parse(text.includes('T') || !/^\d{4}-\d\d-\d\d \d/.test(text) ? text : text.replace(' ', 'T'));
  if (Number.isNaN(ms)) throw new Error(`${where}: t must be seconds or a date-time (got ${JSON.stringify(v)})`);
  return { s: ms / 1000, abs: true };
}

/**
 * Reads a recorded trace: JSON lines (`{"t":..,"promptTokens"|"prompt_tokens":..,"outputTokens"|"output_tokens":..}`;
 * a loadgen output works too: its `request` records are replayed) or CSV with a header
 * (`t,prompt_tokens,output_tokens`; Azure-style `TIMESTAMP,ContextTokens,GeneratedTokens` too) or
 * without one (those three columns in that order). Date-time stamps become seconds from the first.
 * Sorted by time; the first arrival keeps its offset unless the times are date-times.
 */
export function readTrace(file) {
  const text = readFileSync(file, 'utf8');
  const lines = text.split(/\r?\n/).map((l) => l.trim());
  const first = lines.find((l) => l !== '' && !l.startsWith('#'));
  if (first === undefined) throw new Error(`${file}: the trace is empty`);
  const rows = [];
  if (first.startsWith('{')) {
    lines.forEach((l, i) => {
      if (l === '' || l.startsWith('#')) return;
      let o;
      try {
        o = JSON.parse(l);
      } catch (e) {
        throw new Error(`${file}:${i + 1}: not JSON: ${e.message}`);
      }
      if (o.kind !== undefined && o.kind !== 'request' && o.kind !== 'arrival') return; // loadgen output: its requests only
      const t = o.kind === 'request' ? o.traceT ?? o.t : field(o, 't');
      const prompt = o.kind === 'request' ? o.requestedPromptTokens ?? o.promptTokens : field(o, 'promptTokens');
      const output = o.kind === 'request' ? o.outputTokens : field(o, 'outputTokens');
      rows.push({ where: `${file}:${i + 1}`, t, prompt, output, ids: Array.isArray(o.prompt) ? o.prompt : undefined });
    });
  } else {
    const cells = (l) => l.split(',').map((c) => c.trim().replace(/^"(.*)"$/, '$1'));
    let cols = [0, 1, 2];
    let start = lines.indexOf(first);
    const head = cells(first);
    // A header names its columns; a data row has numbers after its first cell (which may be a date-time).
    if (head.slice(1).some((c) => c === '' || !Number.isFinite(Number(c))) || ALIASES.t.includes(head[0].toLowerCase())) {
      const find = (name) => head.findIndex((h) => ALIASES[name].includes(h.toLowerCase()));
      cols = ['t', 'promptTokens', 'outputTokens'].map(find);
      if (cols.some((c) => c < 0)) throw new Error(`${file}: the CSV header must name t, prompt_tokens and output_tokens (got ${first})`);
      start += 1;
    }
    for (let i = start; i < lines.length; i++) {
      const l = lines[i];
      if (l === '' || l.startsWith('#')) continue;
      const c = cells(l);
      rows.push({ where: `${file}:${i + 1}`, t: c[cols[0]], prompt: c[cols[1]], output: c[cols[2]] });
    }
  }
  const times = rows.map((r) => timeValue(r.t, r.where));
  const absolute = times.length > 0 && times.every((x) => x.abs);
  const origin = absolute ? -maxOf(times.map((x) => -x.s)) : 0;
  const out = rows.map((r, k) => {
    const promptTokens = Number(r.prompt);
    const outputTokens = Number(r.output);
    if (!Number.isInteger(promptTokens) || promptTokens < 1) throw new Error(`${r.where}: prompt tokens must be an integer >= 1 (got ${JSON.stringify(r.prompt)})`);
    if (!Number.isInteger(outputTokens) || outputTokens < 1) throw new Error(`${r.where}: output tokens must be an integer >= 1 (got ${JSON.stringify(r.output)})`);
    if (!(times[k].s - origin >= 0)) throw new Error(`${r.where}: t must be >= 0 (got ${JSON.stringify(r.t)})`);
    const a = { t: times[k].s - origin, promptTokens, outputTokens };
    if (r.ids) a.prompt = r.ids;
    return a;
  });
  return out.sort((a, b) => a.t - b.t);
}

/** Writes a trace as CSV (a `.csv` name) or JSON lines (anything else). */
export function writeTrace(file, arrivals) {
  const text = file.endsWith('.csv')
    ? ['t,prompt_tokens,output_tokens', ...arrivals.map((a) => `${a.t},${a.promptTokens},${a.outputTokens}`)].join('\n') + '\n'
    : arrivals.map((a) => JSON.stringify({ t: a.t, promptTokens: a.promptTokens, outputTokens: a.outputTokens })).join('\n') + '\n';
  writeFileSync(file, text);
}

// ---------------------------------------------------------------- statistics

/** The largest of numbers (no spread: traces may have more arrivals than a call takes arguments). */
export function maxOf(values, start = -Infinity) {
  let m = start;
  for (const v of values) if (v > m) m = v;
  return m;
}

/** The q-quantile (0..1) of numbers, linear between closest ranks; null when empty. */
export function percentile(values, q) {
  const v = values.filter((x) => x != null && Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return null;
  const pos = (v.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

const round = (x, d = 1) => (x == null ? null : Math.round(x * 10 ** d) / 10 ** d);

/** Whether a finished request record met the SLO: no error, TTFT and TPOT within their targets. */
export function meetsSlo(r, { sloTtftMs, sloTpotMs }) {
  if (r.error) return false;
  if (sloTtftMs != null && !(r.ttftMs <= sloTtftMs)) return false;
  if (sloTpotMs != null && r.tpotMs != null && !(r.tpotMs <= sloTpotMs)) return false;
  return true;
}

/**
 * Device-seconds held over [0, end]: the sampled device count integrated over
 * time (a sample without one, e.g. while a server restarts, keeps the last count).
 */
export function deviceSeconds(samples, end) {
  const s = samples.filter((x) => x.devices != null).sort((a, b) => a.t - b.t);
  if (s.length === 0) return null;
  let total = s[0].devices * Math.max(0, s[0].t);
  for (let i = 0; i < s.length; i++) {
    const until = i + 1 < s.length ? s[i + 1].t : Math.max(end, s[i].t);
    total += s[i].devices * Math.max(0, until - s[i].t);
  }
  return total;
}

/**
 * Windowed SLO attainment by arrival time: for each step, the share of the
 * requests that arrived in the last `windowS` seconds that met the SLO
 * (`meetsSlo` on each record). Steps with no arrival in their window are null.
 */
export function windowedAttainment(requests, { windowS = 10, stepS = 1, end } = {}) {
  const rs = [...requests].sort((a, b) => a.t - b.t);
  const last = end ?? (rs.length ? rs[rs.length - 1].t : 0);
  const out = [];
  let lo = 0;
  let hi = 0;
  let good = 0;
  for (let t = stepS; t <= last + stepS; t += stepS) {
    while (hi < rs.length && rs[hi].t < t) good += rs[hi++].meetsSlo ? 1 : 0;
    while (lo < hi && rs[lo].t < t - windowS) good -= rs[lo++].meetsSlo ? 1 : 0;
    const n = hi - lo;
    out.push({ t, n, attainment: n > 0 ? good / n : null });
  }
  return out;
}

/** The `summary` record of a replay. */
export function summarize(requests, samples, { sloTtftMs = null, sloTpotMs = null, end } = {}) {
  const ok = requests.filter((r) => !r.error);
  const errorsByType = {};
  for (const r of requests) {
    if (!r.error) continue;
    const key = r.error.type === 'http' ? `http ${r.error.status}` : r.error.type;
    errorsByType[key] = (errorsByType[key] ?? 0) + 1;
  }
  const runEnd = end ?? Math.max(maxOf(requests.map((r) => r.end ?? 0), 0), maxOf(samples.map((s) => s.t), 0));
  const dist = (xs, qs) => Object.fromEntries([...qs.map((q) => [`p${Math.round(q * 100)}`, round(percentile(xs, q))]),
    ['mean', xs.length ? round(xs.reduce((a, b) => a + b, 0) / xs.length) : null]]);
  const slo = { sloTtftMs, sloTpotMs };
  const good = requests.filter((r) => meetsSlo(r, slo)).length;
  const ttftGood = ok.filter((r) => sloTtftMs == null || r.ttftMs <= sloTtftMs).length;
  const tpotGood = ok.filter((r) => sloTpotMs == null || r.tpotMs == null || r.tpotMs <= sloTpotMs).length;
  const devS = deviceSeconds(samples, runEnd);
  const deviceHours = devS == null ? null : devS / 3600;
  const counts = samples.filter((s) => s.devices != null).sort((a, b) => a.t - b.t).map((s) => s.devices);
  const attainment = requests.length ? good / requests.length : null;
  const tokens = requests.reduce((a, r) => a + (r.tokens ?? 0), 0);
  return {
    kind: 'summary',
    requests: requests.length,
    completed: ok.length,
    errors: requests.length - ok.length,
    errorsByType,
    clamped: requests.filter((r) => r.clamped).length,
    durationS: round(runEnd, 3),
    tokens,
    tokensPerS: runEnd > 0 ? round(tokens / runEnd) : null,
    ttftMs: dist(ok.map((r) => r.ttftMs), [0.5, 0.9, 0.99]),
    tpotMs: dist(ok.map((r) => r.tpotMs), [0.5, 0.9, 0.99]),
    e2eMs: dist(ok.map((r) => r.e2eMs), [0.5, 0.9, 0.99]),
    slo: slo,
    good,
    attainment: round(attainment, 4),
    ttftAttainment: requests.length ? round(ttftGood / requests.length, 4) : null,
    tpotAttainment: requests.length ? round(tpotGood / requests.length, 4) : null,
    deviceSeconds: round(devS, 1),
    deviceHours: round(deviceHours, 6),
    meanDevices: devS == null || runEnd <= 0 ? null : round(devS / runEnd, 3),
    maxDevices: counts.length ? maxOf(counts) : null,
    deviceChanges: counts.reduce((n, c, i) => n + (i > 0 && c !== counts[i - 1] ? 1 : 0), 0),
    // Attainment (a share) per device-hour held: comparable between setups that replayed the same trace.
    attainmentPerDeviceHour: attainment == null || !deviceHours ? null : round(attainment / deviceHours, 3),
    // Requests that met the SLO per device-hour held (goodput per device-hour).
    goodPerDeviceHour: !deviceHours ? null : round(good / deviceHours, 1),
  };
}

// ---------------------------------------------------------------- server

/** The values of some samples of a Prometheus text exposition (no labels). */
export function parseMetrics(text, names) {
  const out = {};
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const sp = line.lastIndexOf(' ');
    if (sp < 0) continue;
    const name = line.slice(0, sp);
    if (names.includes(name)) out[name] = Number(line.slice(sp + 1));
  }
  return out;
}

const METRICS = ['elasticmoe_devices', 'elasticmoe_queue_depth', 'elasticmoe_running_sequences', 'elasticmoe_generation_tokens_per_second'];

async function getJson(url, timeoutMs) {
  const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  return res.json();
}

/** One sample of the server's state: devices (from /admin/layout, else /metrics), queue depth, running sequences. */
export async function sampleServer(url, { timeoutMs = 2000 } = {}) {
  const [layout, metrics] = await Promise.allSettled([
    getJson(`${url}/admin/layout`, timeoutMs),
    fetch(`${url}/metrics`, { signal: AbortSignal.timeout(timeoutMs) }).then(async (r) => {
      if (!r.ok) throw new Error(`${url}/metrics: HTTP ${r.status}`);
      return parseMetrics(await r.text(), METRICS);
    }),
  ]);
  const s = {};
  if (layout.status === 'fulfilled' && Array.isArray(layout.value.devices)) {
    s.devices = layout.value.devices.length;
    s.deviceIds = layout.value.devices;
    if (layout.value.scaling !== undefined) s.scaling = layout.value.scaling;
  }
  if (metrics.status === 'fulfilled') {
    const m = metrics.value;
    if (s.devices === undefined && m.elasticmoe_devices !== undefined) s.devices = m.elasticmoe_devices;
    if (m.elasticmoe_queue_depth !== undefined) s.queueDepth = m.elasticmoe_queue_depth;
    if (m.elasticmoe_running_sequences !== undefined) s.running = m.elasticmoe_running_sequences;
    if (m.elasticmoe_generation_tokens_per_second !== undefined) s.tokensPerS = round(m.elasticmoe_generation_tokens_per_second);
  }
  if (layout.status === 'rejected' && metrics.status === 'rejected') s.error = errorText(layout.reason);
  return s;
}

/** The served model and its context length from GET /v1/models (undefined fields when it does not answer). */
export async function serverModel(url, { timeoutMs = 5000 } = {}) {
  try {
    const body = await getJson(`${url}/v1/models`, timeoutMs);
    const m = body?.data?.[0];
    return { id: m?.id, maxModelLen: m?.max_model_len };
  } catch {
    return {};
  }
}

function errorText(e) {
  const cause = e?.cause;
  const code = cause?.code ?? e?.code;
  const msg = cause?.message ?? e?.message ?? String(e);
  return code && !msg.includes(code) ? `${code}: ${msg}` : msg;
}

// ---------------------------------------------------------------- replay

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Replays arrivals against `opts.url`. Returns `{ config, requests, samples, summary }`;
 * `opts.onRecord(record)` sees every record as it is made (config, request, sample, summary).
 *
 * opts: url (required); model (default: the server's, from /v1/models); timeScale (divide arrival
 * times, default 1); concurrency (most requests in flight, default unbounded: arrivals beyond it
 * wait for a slot, and that wait counts in their TTFT); maxPromptTokens (clamp); fitContext
 * (default true: shorten prompts, then outputs, to fit the server's max_model_len); vocab (token
 * ids are drawn in [0, vocab), default 512, which every model accepts); seed (prompt ids, default
 * 0); sloTtftMs, sloTpotMs; sampleIntervalMs (default 1000; 0: no sampling); requestTimeoutMs;
 * t0 (performance.now() origin of the times, default: now); devicesHint (() => number | undefined:
 * the device count to charge when the server does not answer a sample); live (an object the
 * replay fills as it goes: `inflight`, a Map of id -> { t, firstTokenAt } of the requests in
 * flight; `requests` and `samples`, the records so far); meta (stored in the config record).
 */
export async function replay(arrivals, opts) {
  const url = String(opts.url).replace(/\/+$/, '');
  const timeScale = opts.timeScale ?? 1;
  if (!(timeScale > 0)) throw new Error(`timeScale must be > 0 (got ${timeScale})`);
  const concurrency = opts.concurrency ?? Infinity;
  const vocab = opts.vocab ?? 512;
  const seed = opts.seed ?? 0;
  const slo = { sloTtftMs: opts.sloTtftMs ?? null, sloTpotMs: opts.sloTpotMs ?? null };
  const emit = opts.onRecord ?? (() => {});
  const live = opts.live ?? {};
  live.inflight = new Map();
  live.requests = [];
  const info = await serverModel(url);
  const model = opts.model ?? info.id;
  const maxContext = opts.fitContext === false ? undefined : info.maxModelLen;
  const t0 = opts.t0 ?? performance.now();
  const now = () => (performance.now() - t0) / 1000;

  const config = {
    kind: 'config', url, model: model ?? null, maxModelLen: info.maxModelLen ?? null, arrivals: arrivals.length,
    traceDurationS: arrivals.length ? arrivals[arrivals.length - 1].t : 0, timeScale,
    concurrency: Number.isFinite(concurrency) ? concurrency : null, maxPromptTokens: opts.maxPromptTokens ?? null,
    vocab, seed, ...slo, sampleIntervalMs: opts.sampleIntervalMs ?? 1000, startedAt: new Date().toISOString(),
    ...(opts.meta ? { meta: opts.meta } : {}),
  };
  emit(config);

  // Sampling of the server, every sampleIntervalMs, until the last request ends.
  const samples = [];
  live.samples = samples;
  let sampling = (opts.sampleIntervalMs ?? 1000) > 0;
  const interval = opts.sampleIntervalMs ?? 1000;
  const sampler = (async () => {
    let next = performance.now();
    while (sampling) {
      const t = now();
      const s = await sampleServer(url, { timeoutMs: Math.max(500, Math.min(2000, interval * 2)) });
      if (s.devices === undefined) {
        const hint = opts.devicesHint?.();
        if (hint != null) s.devices = hint;
      }
      const rec = { kind: 'sample', t: round(t, 3), ...s };
      samples.push(rec);
      emit(rec);
      next += interval;
      const wait = next - performance.now();
      if (wait > 0) await sleep(wait);
      else next = performance.now();
    }
  })();

  // Client slots.
  let inUse = 0;
  const waiting = [];
  const acquire = () => (inUse < concurrency ? (inUse++, Promise.resolve()) : new Promise((r) => waiting.push(r)));
  const release = () => {
    const next = waiting.shift();
    if (next) next();
    else inUse--;
  };

  const requests = [];
  const tasks = [];
  for (let i = 0; i < arrivals.length; i++) {
    const a = arrivals[i];
    const dueMs = (a.t * 1000) / timeScale;
    const wait = t0 + dueMs - performance.now();
    if (wait > 1) await sleep(wait);
    tasks.push((async () => {
      const due = dueMs / 1000;
      live.inflight.set(i, { t: due, firstTokenAt: null });
      await acquire();
      let rec;
      try {
        rec = await oneRequest(i, a, due);
      } finally {
        release();
        live.inflight.delete(i);
      }
      rec.meetsSlo = meetsSlo(rec, slo);
      requests.push(rec);
      live.requests.push(rec);
      emit(rec);
    })());
  }
  await Promise.all(tasks);
  sampling = false;
  await sampler;
  const summary = summarize(requests.sort((x, y) => x.id - y.id), samples, { ...slo, end: now() });
  emit(summary);
  return { config, requests, samples, summary };

  async function oneRequest(i, a, due) {
    const start = now();
    let promptTokens = a.prompt ? a.prompt.length : a.promptTokens;
    let outputTokens = a.outputTokens;
    let clamped = false;
    if (opts.maxPromptTokens != null && promptTokens > opts.maxPromptTokens) {
      promptTokens = opts.maxPromptTokens;
      clamped = true;
    }
    if (maxContext != null && promptTokens + outputTokens > maxContext) {
      outputTokens = Math.min(outputTokens, maxContext - 1);
      promptTokens = Math.max(1, Math.min(promptTokens, maxContext - outputTokens));
      clamped = true;
    }
    const prompt = a.prompt
      ? a.prompt.slice(0, promptTokens).map((x) => Math.min(Math.max(0, x | 0), vocab - 1))
      : promptIds(i, promptTokens, { seed, vocab });
    const body = { prompt, max_tokens: outputTokens, ignore_eos: true, stream: true, stream_options: { include_usage: true }, temperature: 0 };
    if (model) body.model = model;
    const rec = {
      kind: 'request', id: i, t: round(due, 4), traceT: a.t, start: round(start, 4), clientWaitMs: round((start - due) * 1000),
      promptTokens, requestedPromptTokens: a.promptTokens, outputTokens, ...(clamped ? { clamped: true } : {}),
      tokens: 0, ttftMs: null, tpotMs: null, e2eMs: null, end: null, finishReason: null, error: null,
    };
    let first = null;
    let last = null;
    let done = false;
    try {
      const signal = opts.requestTimeoutMs ? AbortSignal.timeout(opts.requestTimeoutMs) : undefined;
      const res = await fetch(`${url}/v1/completions`, {
        method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body), ...(signal ? { signal } : {}),
      });
      rec.status = res.status;
      if (!res.ok || !(res.headers.get('content-type') ?? '').startsWith('text/event-stream')) {
        const text = await res.text().catch((e) => `(body unreadable: ${errorText(e)})`);
        let code;
        try {
          code = JSON.parse(text)?.error?.code;
        } catch { /* not JSON */ }
        rec.error = { type: 'http', status: res.status, ...(code ? { code } : {}), body: text.slice(0, 500) };
      } else {
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buf = '';
        for (;;) {
          const { done: eof, value } = await reader.read();
          if (eof) break;
          const at = now();
          buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, '\n');
          let cut;
          while ((cut = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            for (const line of block.split('\n')) {
              if (!line.startsWith('data:')) continue;
              const data = line.slice(5).trim();
              if (data === '[DONE]') {
                done = true;
                continue;
              }
              let e;
              try {
                e = JSON.parse(data);
              } catch {
                rec.error ??= { type: 'stream', message: `not JSON: ${data.slice(0, 200)}` };
                continue;
              }
              if (e.error) {
                rec.error ??= { type: 'stream', code: e.error.code ?? null, message: String(e.error.message ?? '').slice(0, 300) };
                continue;
              }
              for (const c of e.choices ?? []) {
                const n = Array.isArray(c.token_ids) ? c.token_ids.length : c.text ? 1 : 0;
                if (n > 0) {
                  if (first === null) {
                    first = at;
                    const l = live.inflight.get(i);
                    if (l) l.firstTokenAt = at;
                  }
                  last = at;
                  rec.tokens += n;
                }
                if (c.finish_reason) rec.finishReason = c.finish_reason;
              }
              if (e.usage) rec.usage = e.usage;
            }
          }
        }
      }
    } catch (e) {
      rec.error ??= e?.name === 'TimeoutError'
        ? { type: 'timeout', message: `no complete answer in ${opts.requestTimeoutMs} ms` }
        : { type: first === null ? 'network' : 'cut', message: errorText(e) };
    }
    const end = now();
    rec.end = round(end, 4);
    if (first !== null) {
      rec.ttftMs = round((first - due) * 1000, 2);
      if (rec.tokens > 1) rec.tpotMs = round(((last - first) * 1000) / (rec.tokens - 1), 3);
    }
    if (!rec.error && rec.status === 200) {
      if (!done || rec.finishReason === null) {
        rec.error = { type: 'cut', message: `the stream ended after ${rec.tokens} of ${outputTokens} tokens without ${done ? 'a finish_reason' : '[DONE]'}` };
      } else if (rec.tokens < outputTokens) {
        rec.error = { type: 'short', message: `${rec.tokens} of ${outputTokens} tokens (finish_reason ${rec.finishReason}, ignore_eos was set)` };
      }
    }
    if (!rec.error) rec.e2eMs = round((end - due) * 1000, 2);
    return rec;
  }
}

// ---------------------------------------------------------------- CLI

const USAGE = `usage:
  node scripts/loadgen.mjs run --url URL (--trace FILE | SHAPE OPTIONS) [options]   replay against a server
  node scripts/loadgen.mjs synth SHAPE OPTIONS [--out trace.csv|trace.jsonl]        write a synthetic trace

shape (synthetic traces):
  --shape steady|step|bursts   (default bursts)
  --duration S                 trace length in seconds (default 300)
  --rate R                     requests/s (default 1); --peak-rate R (default 4 x rate)
  --period S, --burst S        bursts: every period S, the last burst S seconds at the peak rate (default 60, 15)
  --step-at S, --step-end S    step: the peak rate in [step-at, step-end) (default the middle third)
  --prompt-mean N              prompt tokens (default 2000); --prompt-min N, --prompt-max N (default: the mean)
  --output-min N, --output-max N  output tokens, uniform (default 500, 750)
  --seed N                     arrivals, lengths and prompt ids (default 0)

run:
  --url URL                    the server (default http://127.0.0.1:8000)
  --trace FILE                 replay a recorded trace (JSON lines or CSV t,prompt_tokens,output_tokens)
  --time-scale X               divide arrival times by X (compress the trace; default 1)
  --concurrency N              most requests in flight (default unbounded)
  --max-prompt-tokens N        clamp prompts (prompts are also fitted to the server's max_model_len
                               unless --no-fit-context)
  --vocab N                    token ids drawn in [0, N) (default 512)
  --slo-ttft-ms MS, --slo-tpot-ms MS  SLO targets (default 2000, 100)
  --sample-interval-ms MS      sampling of /admin/layout and /metrics (default 1000)
  --request-timeout-s S        give up on a request after S seconds (default: never)
  --out FILE                   JSON lines (default stdout); a summary goes to stderr
  --write-trace FILE           also write the replayed trace (CSV or JSON lines)
  --quiet                      no progress on stderr`;

export function traceOptionsFromArgs(v) {
  const num = (name, fallback) => {
    if (v[name] === undefined) return fallback;
    const n = Number(v[name]);
    if (!Number.isFinite(n)) throw new Error(`--${name} must be a number (got '${v[name]}')`);
    return n;
  };
  const rate = num('rate', 1);
  const mean = num('prompt-mean', 2000);
  return {
    kind: v.shape ?? 'bursts', durationS: num('duration', 300), rate, peakRate: num('peak-rate', 4 * rate),
    periodS: num('period', 60), burstS: num('burst', 15), stepAtS: num('step-at', undefined), stepEndS: num('step-end', undefined),
    seed: num('seed', 0),
    promptTokens: { mean, min: num('prompt-min', mean), max: num('prompt-max', mean) },
    outputTokens: { min: num('output-min', 500), max: num('output-max', 750) },
  };
}

export const TRACE_ARGS = {
  shape: { type: 'string' }, duration: { type: 'string' }, rate: { type: 'string' }, 'peak-rate': { type: 'string' },
  period: { type: 'string' }, burst: { type: 'string' }, 'step-at': { type: 'string' }, 'step-end': { type: 'string' },
  'prompt-mean': { type: 'string' }, 'prompt-min': { type: 'string' }, 'prompt-max': { type: 'string' },
  'output-min': { type: 'string' }, 'output-max': { type: 'string' }, seed: { type: 'string' },
};

/** A one-line human summary. */
export function describeSummary(s) {
  const f = (x, d = 0) => (x == null ? '-' : Number(x).toFixed(d));
  return `${s.requests} requests, ${s.errors} errors${s.errors ? ` ${JSON.stringify(s.errorsByType)}` : ''}; `
    + `TTFT p50 ${f(s.ttftMs.p50)} p90 ${f(s.ttftMs.p90)} p99 ${f(s.ttftMs.p99)} ms; TPOT p50 ${f(s.tpotMs.p50, 1)} p90 ${f(s.tpotMs.p90, 1)} ms; `
    + `SLO attainment ${s.attainment == null ? '-' : (100 * s.attainment).toFixed(1)}% `
    + `(TTFT <= ${s.slo.sloTtftMs ?? '-'} ms, TPOT <= ${s.slo.sloTpotMs ?? '-'} ms); `
    + `${f(s.deviceHours, 4)} device-hours (mean ${f(s.meanDevices, 2)} devices); attainment/device-hour ${f(s.attainmentPerDeviceHour, 2)}`;
}

async function cli(argv) {
  const [command = 'run', ...rest] = argv[0]?.startsWith('-') ? ['run', ...argv] : argv;
  const { values: v } = parseArgs({
    args: rest,
    options: {
      ...TRACE_ARGS,
      url: { type: 'string' }, trace: { type: 'string' }, 'time-scale': { type: 'string' }, concurrency: { type: 'string' },
      'max-prompt-tokens': { type: 'string' }, 'no-fit-context': { type: 'boolean' }, vocab: { type: 'string' },
      'slo-ttft-ms': { type: 'string' }, 'slo-tpot-ms': { type: 'string' }, 'sample-interval-ms': { type: 'string' },
      'request-timeout-s': { type: 'string' }, out: { type: 'string' }, 'write-trace': { type: 'string' }, quiet: { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
  });
  if (v.help || command === 'help') {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const num = (name, fallback) => {
    if (v[name] === undefined) return fallback;
    const n = Number(v[name]);
    if (!Number.isFinite(n) || n < 0) throw new Error(`--${name} must be a number >= 0 (got '${v[name]}')`);
    return n;
  };
  const arrivals = v.trace ? readTrace(v.trace) : synthesize(traceOptionsFromArgs(v));
  if (command === 'synth') {
    if (v.out) writeTrace(v.out, arrivals);
    else process.stdout.write(arrivals.map((a) => JSON.stringify(a)).join('\n') + '\n');
    process.stderr.write(`loadgen: ${arrivals.length} arrivals over ${arrivals.length ? arrivals[arrivals.length - 1].t.toFixed(1) : 0} s\n`);
    return 0;
  }
  if (command !== 'run') throw new Error(`unknown command '${command}'\n${USAGE}`);
  if (v['write-trace']) writeTrace(v['write-trace'], arrivals);
  const out = v.out ? createWriteStream(v.out) : process.stdout;
  let finished = 0;
  let errors = 0;
  const live = {};
  const progress = v.quiet ? undefined : setInterval(() => {
    process.stderr.write(`loadgen: ${finished}/${arrivals.length} done, ${live.inflight?.size ?? 0} in flight, ${errors} errors\n`);
  }, 10_000);
  const result = await replay(arrivals, {
    url: v.url ?? 'http://127.0.0.1:8000', timeScale: num('time-scale', 1), concurrency: num('concurrency', Infinity) || Infinity,
    maxPromptTokens: num('max-prompt-tokens', undefined), fitContext: !v['no-fit-context'], vocab: num('vocab', 512),
    seed: num('seed', 0), sloTtftMs: num('slo-ttft-ms', 2000), sloTpotMs: num('slo-tpot-ms', 100),
    sampleIntervalMs: num('sample-interval-ms', 1000),
    requestTimeoutMs: v['request-timeout-s'] ? num('request-timeout-s') * 1000 : undefined,
    onRecord: (r) => {
      if (r.kind === 'request') {
        finished++;
        if (r.error) errors++;
      }
      out.write(`${JSON.stringify(r)}\n`);
    },
    live,
  });
  if (progress) clearInterval(progress);
  if (out !== process.stdout) await new Promise((r) => out.end(r));
  if (result.summary.clamped > 0) process.stderr.write(`loadgen: ${result.summary.clamped} requests shortened (--max-prompt-tokens or the server's context of ${result.config.maxModelLen})\n`);
  process.stderr.write(`loadgen: ${describeSummary(result.summary)}\n`);
  return 0;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  cli(process.argv.slice(2)).then((code) => { process.exitCode = code; }, (e) => {
    process.stderr.write(`loadgen: ${e.message}\n`);
    process.exitCode = 1;
  });
}
