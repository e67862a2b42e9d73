#!/usr/bin/env node
// The scaling comparison: one trace (synthesized or recorded) replayed by
// scripts/loadgen.mjs against several server setups, each `elasticmoe serve`
// started here as a child process and stopped after its run:
//
//   fixed-small   serve --devices SMALL for the whole trace
//   fixed-large   serve --devices LARGE for the whole trace
//   cold-restart  starts on SMALL; a controller here watches the SLO attainment
//                 of the last window and, when it drops below the threshold,
//                 stops the server (SIGTERM: it drains; or SIGKILL) and starts it
//                 again on the next larger device set, on the same port; when
//                 the server idles it restarts it on fewer devices. Requests that
//                 fail while it is down are counted.
//   elastic       serve --devices SMALL --max-devices |LARGE| --autoscale CONFIG:
//                 elasticmoe's own autoscaler, with the given CONFIG or one the
//                 harness writes (the SLOs, minDevices |SMALL|, devicePool SMALL
//                 then LARGE's others); skipped, saying why, when this build's
//                 `elasticmoe serve` has no --autoscale flag
//
// Output (--out DIR, default bench-out/compare-scaling): SETUP.jsonl (loadgen
// records plus the harness's `event` records), SETUP.server.log (the server's
// stdout and stderr), SETUP.svg, compare.svg (all setups overlaid), summary.md
// (the table: SLO attainment, attainment per device-hour, requests failed) and
// summary.json.
//
//   node scripts/compare-scaling.mjs --shape bursts --duration 600 --rate 0.5 --peak-rate 3 \
//     --small 0 --large 0,1,2,3 --autoscale autoscale.json --slo-ttft-ms 2000 --slo-tpot-ms 100 \
//     -- --synthetic scripts/configs/qwen3-30b-a3b.json
//   node scripts/compare-scaling.mjs --trace trace.csv --time-scale 4 --setups fixed-small,cold-restart -- --backend mock
//
// Everything after `--` (or --serve-args 'A B C', split on spaces) is passed to every `elasticmoe serve`.
import { spawn, spawnSync } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

import { TRACE_ARGS, describeSummary, meetsSlo, readTrace, replay, synthesize, traceOptionsFromArgs, traceSpec, writeTrace } from './loadgen.mjs';
import { plotLoad, readRecords } from './plot-load.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const SETUPS = ['fixed-small', 'fixed-large', 'cold-restart', 'elastic'];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const log = (msg) => process.stderr.write(`compare-scaling: ${msg}\n`);

// ---------------------------------------------------------------- servers

const children = new Set();
function killAll() {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
}
process.on('exit', killAll);

/**
 * Starts `elasticmoe serve` and resolves once it prints its address
 * (`elasticmoe serve: http://HOST:PORT ...` on stderr). Its stdout and stderr go to `logFile`.
 */
export async function startServer({ cli, devices, port = 0, args = [], logFile, timeoutMs = 600_000, env = {} }) {
  const argv = [cli, 'serve', '--devices', devices.join(','), '--port', String(port), ...args];
  if (!args.includes('--log-level')) argv.push('--log-level', 'info');
  const proc = spawn(process.execPath, argv, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ELASTICMOE_NO_WARN_MOCK: '1', ...env } });
  children.add(proc);
  const exited = new Promise((resolve) => proc.once('exit', (code, signal) => {
    children.delete(proc);
    resolve({ code, signal });
  }));
  const sink = logFile ? createWriteStream(logFile, { flags: 'a' }) : undefined;
  sink?.write(`# ${new Date().toISOString()} node ${argv.map((a) => (/\s/.test(a) ? JSON.stringify(a) : a)).join(' ')}\n`);
  proc.stdout.on('data', (d) => sink?.write(d));
  let stderr = '';
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`elasticmoe serve did not start in ${timeoutMs / 1000} s: ${stderr.slice(-2000)}`));
    }, timeoutMs);
    proc.stderr.on('data', (d) => {
      sink?.write(d);
      if (stderr.length < 1e6) stderr += d;
      const m = /elasticmoe serve: (http:\/\/\S+)/.exec(stderr);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    void exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`elasticmoe serve exited (${signal ?? `code ${code}`}) before serving: ${stderr.slice(-2000).trim()}`));
    });
  });
  return {
    proc, url, devices, port: Number(new URL(url).port),
    /** SIGTERM (drain) or SIGKILL; resolves when it has exited (SIGKILL after graceMs). */
    async stop(mode = 'term', graceMs = 60_000) {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill(mode === 'kill' ? 'SIGKILL' : 'SIGTERM');
        const timer = setTimeout(() => proc.kill('SIGKILL'), graceMs);
        await exited;
        clearTimeout(timer);
      }
      await new Promise((r) => (sink ? sink.end(r) : r()));
    },
  };
}

/** A few short requests, not measured: compiles and warms the server before the trace. */
async function warmup(url, n) {
  for (let i = 0; i < n; i++) {
    const res = await fetch(`${url}/v1/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: [1, 2, 3, 4, 5, 6, 7, 8], max_tokens: 8, ignore_eos: true }),
    });
    if (!res.ok) throw new Error(`warm-up request: HTTP ${res.status}: ${(await res.text()).slice(0, 300)}`);
    await res.json();
  }
}

/** Whether this build's `elasticmoe serve` takes --autoscale (its usage text lists it). */
export function serveHasAutoscale(cli) {
  const r = spawnSync(process.execPath, [cli, '--help'], { encoding: 'utf8', timeout: 30_000 });
  return /--autoscale\b/.test(`${r.stdout}${r.stderr}`);
}

/** Device sets from small to large, adding `step` devices of `large` at a time. */
export function deviceLadder(small, large, step = 1) {
  const extra = large.filter((d) => !small.includes(d));
  const ladder = [small];
  for (let k = step; k < extra.length + step; k += step) ladder.push([...small, ...extra.slice(0, Math.min(k, extra.length))]);
  return ladder;
}

// ---------------------------------------------------------------- one setup

/**
 * Replays `arrivals` against one setup. Returns the loadgen summary, augmented with the
 * setup's name, its restarts (cold-restart) and the requests that failed while a server was down.
 */
export async function runSetup(name, arrivals, o) {
  const outFile = path.join(o.outDir, `${name}.jsonl`);
  const logFile = path.join(o.outDir, `${name}.server.log`);
  writeFileSync(logFile, '');
  const out = createWriteStream(outFile);
  const write = (r) => out.write(`${JSON.stringify(r)}\n`);
  const t0Box = { t0: 0 };
  const now = () => (performance.now() - t0Box.t0) / 1000;
  const serveArgs = [...o.serveArgs];
  let devices = name === 'fixed-large' ? o.large : o.small;
  if (name === 'elastic') serveArgs.push('--max-devices', String(o.large.length), '--autoscale', o.autoscaleFile);

  let server = await startServer({ cli: o.cli, devices, port: o.port, args: serveArgs, logFile, timeoutMs: o.startTimeoutMs });
  log(`${name}: serving at ${server.url} on devices ${devices.join(',')}`);
  const events = [];
  const event = (e) => {
    const rec = { kind: 'event', t: Math.round(now() * 1000) / 1000, ...e };
    events.push(rec);
    write(rec);
    log(`${name}: ${e.action}${e.from ? ` ${e.from.join(',')} -> ${e.to.join(',')}` : ''}${e.reason ? ` (${e.reason})` : ''}${e.downS != null ? ` after ${e.downS.toFixed(1)} s down` : ''}`);
  };
  let summary;
  let controller;
  try {
    await warmup(server.url, o.warmup);
    const live = {};
    let chargedDevices = devices.length;
    let stopController = false;
    t0Box.t0 = performance.now();

    if (name === 'cold-restart') {
      const ladder = deviceLadder(o.small, o.large, o.restartStep);
      let level = 0;
      let lastChange = 0;
      const restart = async (to, reason) => {
        const from = server.devices;
        chargedDevices = Math.max(from.length, to.length);
        event({ action: 'restart', from, to, reason });
        const down = now();
        await server.stop(o.restartStop);
        event({ action: 'stopped', devices: from });
        for (let attempt = 1; ; attempt++) {
          try {
            server = await startServer({ cli: o.cli, devices: to, port: server.port, args: serveArgs, logFile, timeoutMs: o.startTimeoutMs });
            break;
          } catch (e) {
            if (attempt >= 3) throw e;
            log(`${name}: restart attempt ${attempt} failed: ${e.message.split('\n')[0]}; trying again`);
            await sleep(1000);
          }
        }
        chargedDevices = to.length;
        event({ action: 'ready', devices: to, downS: now() - down });
        lastChange = now();
      };
      controller = (async () => {
        while (!stopController) {
          await sleep(1000);
          if (stopController || !live.requests) continue;
          const t = now();
          if (t - lastChange < o.restartCooldownS) continue;
          const since = t - o.restartWindowS;
          const done = live.requests.filter((r) => r.end >= since);
          // Requests still waiting for their first token past the TTFT target are misses already.
          const overdue = [...live.inflight.values()].filter((f) => f.firstTokenAt === null && o.sloTtftMs != null && (t - f.t) * 1000 > o.sloTtftMs).length;
          const n = done.length + overdue;
          if (n < o.restartMinRequests) continue;
          const good = done.filter((r) => meetsSlo(r, o)).length;
          const attainment = good / n;
          if (attainment < o.restartThreshold && level + 1 < ladder.length) {
            level += 1;
            await restart(ladder[level], `attainment ${(100 * attainment).toFixed(1)}% of ${n} requests in the last ${o.restartWindowS} s < ${100 * o.restartThreshold}%`);
            continue;
          }
          const window = live.samples.filter((s) => s.t >= since && s.running != null);
          const busy = window.length ? window.reduce((a, s) => a + s.running, 0) / window.length / server.devices.length : Infinity;
          if (o.restartDown && level > 0 && attainment >= o.restartThreshold && t - lastChange >= o.restartDownCooldownS
            && window.length >= 3 && window.every((s) => (s.queueDepth ?? 0) === 0) && busy < o.downRunningPerDevice) {
            level -= 1;
            await restart(ladder[level], `idle: attainment ${(100 * attainment).toFixed(1)}%, no queue, ${busy.toFixed(2)} running per device < ${o.downRunningPerDevice}`);
          }
        }
      })();
      controller.catch((e) => {
        log(`${name}: the restart controller failed: ${e.message}`);
        event({ action: 'controller-failed', message: e.message });
      });
    }

    const result = await replay(arrivals, {
      url: server.url, timeScale: o.timeScale, concurrency: o.concurrency, maxPromptTokens: o.maxPromptTokens, vocab: o.vocab,
      seed: o.seed, sloTtftMs: o.sloTtftMs, sloTpotMs: o.sloTpotMs, sampleIntervalMs: o.sampleIntervalMs,
      requestTimeoutMs: o.requestTimeoutMs, t0: t0Box.t0, live, devicesHint: () => chargedDevices,
      meta: { setup: name, devices, serveArgs },
      onRecord: (r) => {
        if (r.kind === 'summary') summary = r;
        else write(r);
      },
    });
    stopController = true;
    await controller?.catch(() => undefined);

    // Requests that failed while a server was down (from a restart decision to the new server answering).
    const windows = [];
    for (const e of events.filter((x) => x.action === 'restart')) {
      const ready = events.find((x) => x.action === 'ready' && x.t >= e.t);
      windows.push([e.t, ready ? ready.t + 0.5 : Infinity]);
    }
    const failedDuringRestart = result.requests.filter((r) => r.error && windows.some(([a, b]) => r.t <= b && (r.end ?? r.t) >= a)).length;
    summary = {
      ...summary, setup: name, startDevices: devices,
      restarts: windows.length,
      downtimeS: Math.round(events.filter((x) => x.action === 'ready').reduce((a, x) => a + x.downS, 0) * 10) / 10,
      failedDuringRestart,
    };
    write(summary);
    log(`${name}: ${describeSummary(summary)}`);
    return summary;
  } finally {
    await server.stop('term').catch(() => undefined);
    await new Promise((r) => out.end(r));
  }
}

// ---------------------------------------------------------------- report

const pct = (x) => (x == null ? '-' : `${(100 * x).toFixed(1)}%`);
const num = (x, d = 0) => (x == null ? '-' : Number(x).toFixed(d));

export function markdownReport({ results, skipped, header }) {
  const rows = results.map(({ name, summary: s, error }) => {
    if (error) return `| ${name} | failed to run: ${error.replace(/\|/g, '\\|').split('\n')[0].slice(0, 200)} |${' |'.repeat(9)}`;
    const failed = s.restarts ? `${s.errors} (${s.failedDuringRestart} during ${s.restarts} restart${s.restarts === 1 ? '' : 's'}, ${num(s.downtimeS, 1)} s down)` : `${s.errors}`;
    return `| ${name} | ${s.startDevices.length}${s.maxDevices != null && s.maxDevices !== s.startDevices.length ? `→${s.maxDevices} (mean ${num(s.meanDevices, 2)})` : ''} `
      + `| ${s.requests} | ${failed} | ${pct(s.attainment)} | ${num(s.ttftMs.p50)} / ${num(s.ttftMs.p99)} | ${num(s.tpotMs.p50, 1)} / ${num(s.tpotMs.p90, 1)} `
      + `| ${num(s.deviceHours, 4)} | ${num(s.attainmentPerDeviceHour, 2)} | ${num(s.goodPerDeviceHour, 0)} | ${s.deviceChanges} |`;
  });
  return [
    '# Scaling comparison',
    '',
    ...header,
    '',
    '| setup | devices | requests | failed | SLO attainment | TTFT p50 / p99 (ms) | TPOT p50 / p90 (ms) | device-hours | attainment per device-hour | SLO-met requests per device-hour | device changes |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ...rows,
    '',
    ...(skipped.length ? ['Skipped:', '', ...skipped.map(({ name, reason }) => `- **${name}**: ${reason}`), ''] : []),
    'SLO attainment: the share of all requests (failed ones included) that completed with TTFT and TPOT within the targets, '
      + 'TTFT counted from the request\'s scheduled arrival. Device-hours: the device count sampled every second from /admin/layout, '
      + 'integrated over the replay (while a cold-restarted server is down, the larger of its old and new device sets). '
      + 'Attainment per device-hour: SLO attainment divided by device-hours (the same trace for every setup, so comparable between rows). '
      + 'Plots: compare.svg (all setups) and SETUP.svg.',
    '',
  ].join('\n');
}

// ---------------------------------------------------------------- CLI

const USAGE = `usage: node scripts/compare-scaling.mjs [options] [-- SERVE ARGS...]

trace: --trace FILE, or the shape options of scripts/loadgen.mjs (--shape bursts --duration 300 --rate 1
       --peak-rate 4 --period 60 --burst 15 --prompt-mean 2000 --output-min 500 --output-max 750 --seed 0 ...)
  --time-scale X               compress the trace (default 1)
  --setups LIST                of ${SETUPS.join(', ')} (default all)
  --small 0                    devices of the small layout (and where cold-restart and elastic start)
  --large 0,1,2,3              devices of the large layout (and the most the others may use)
  --autoscale CONFIG           passed to \`elasticmoe serve --autoscale\` for the elastic setup (default: one
                               written to OUT/autoscale.json from the SLOs, --small and --large)
  --slo-ttft-ms MS, --slo-tpot-ms MS   SLO targets (default 2000, 100)
  --concurrency N, --max-prompt-tokens N, --vocab N, --sample-interval-ms MS   as loadgen
  --request-timeout-s S        a request not done by then is an error (default 1800; 0: never)
cold restart:
  --restart-window-s S         attainment window (default 20)
  --restart-threshold F        restart on more devices below this attainment (default 0.9)
  --restart-min-requests N     in the window, to decide (default 5)
  --restart-cooldown-s S       between restarts (default 30); --restart-down-cooldown-s S (default 2x)
  --restart-step N             devices added or removed per restart (default 1)
  --restart-stop term|kill     SIGTERM (drain running requests, default) or SIGKILL
  --no-restart-down            never restart on fewer devices (default: when idle: no queue and fewer than
                               --down-running-per-device running sequences per device, default 1)
server:
  --cli PATH                   elasticmoe's CLI (default dist/cli/main.js)
  --serve-args 'A B'           extra \`elasticmoe serve\` arguments (or after --)
  --port N                     (default 0: a free one, kept across cold restarts)
  --warmup N                   unmeasured requests after each start (default 2)
  --start-timeout-s S          (default 600)
  --out DIR                    (default bench-out/compare-scaling)`;

async function cli(argv) {
  const { values: v, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      ...TRACE_ARGS,
      trace: { type: 'string' }, 'time-scale': { type: 'string' }, setups: { type: 'string' }, small: { type: 'string' }, large: { type: 'string' },
      autoscale: { type: 'string' }, 'slo-ttft-ms': { type: 'string' }, 'slo-tpot-ms': { type: 'string' }, concurrency: { type: 'string' },
      'max-prompt-tokens': { type: 'string' }, vocab: { type: 'string' }, 'request-timeout-s': { type: 'string' }, 'sample-interval-ms': { type: 'string' },
      'restart-window-s': { type: 'string' }, 'restart-threshold': { type: 'string' }, 'restart-min-requests': { type: 'string' },
      'restart-cooldown-s': { type: 'string' }, 'restart-down-cooldown-s': { type: 'string' }, 'restart-step': { type: 'string' },
      'restart-stop': { type: 'string' }, 'no-restart-down': { type: 'boolean' }, 'down-running-per-device': { type: 'string' },
      cli: { type: 'string' }, 'serve-args': { type: 'string' }, port: { type: 'string' }, warmup: { type: 'string' },
      'start-timeout-s': { type: 'string' }, out: { type: 'string' }, help: { type: 'boolean', short: 'h' },
    },
  });
  if (v.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const n = (name, fallback) => {
    if (v[name] === undefined) return fallback;
    const x = Number(v[name]);
    if (!Number.isFinite(x) || x < 0) throw new Error(`--${name} must be a number >= 0 (got '${v[name]}')`);
    return x;
  };
  const list = (name, text) => {
    const ids = text.split(',').map((s) => s.trim()).filter(Boolean).map(Number);
    if (ids.length === 0 || ids.some((d) => !Number.isInteger(d) || d < 0)) throw new Error(`--${name} must be device ids like 0,1 (got '${text}')`);
    return ids;
  };
  const setups = (v.setups ?? SETUPS.join(',')).split(',').map((s) => s.trim()).filter(Boolean);
  for (const s of setups) if (!SETUPS.includes(s)) throw new Error(`--setups: unknown setup '${s}' (known: ${SETUPS.join(', ')})`);
  if (v['restart-stop'] !== undefined && !['term', 'kill'].includes(v['restart-stop'])) throw new Error(`--restart-stop must be term or kill (got '${v['restart-stop']}')`);
  const small = list('small', v.small ?? '0');
  const large = list('large', v.large ?? '0,1,2,3');
  if (large.length <= small.length) log(`note: --large (${large.join(',')}) is not larger than --small (${small.join(',')})`);
  const cliPath = path.resolve(v.cli ?? path.join(ROOT, 'dist/cli/main.js'));
  if (!existsSync(cliPath)) throw new Error(`${cliPath} does not exist: build first (npx tsc -p .) or pass --cli`);
  const cooldown = n('restart-cooldown-s', 30);
  const o = {
    cli: cliPath, small, large, autoscale: v.autoscale, outDir: path.resolve(v.out ?? path.join(ROOT, 'bench-out/compare-scaling')),
    serveArgs: [...(v['serve-args'] ? v['serve-args'].split(/\s+/).filter(Boolean) : []), ...positionals],
    port: n('port', 0), warmup: n('warmup', 2), startTimeoutMs: n('start-timeout-s', 600) * 1000,
    timeScale: n('time-scale', 1), concurrency: n('concurrency', 0) || Infinity, maxPromptTokens: n('max-prompt-tokens', undefined),
    vocab: n('vocab', 512), seed: n('seed', 0), sloTtftMs: n('slo-ttft-ms', 2000), sloTpotMs: n('slo-tpot-ms', 100),
    sampleIntervalMs: n('sample-interval-ms', 1000), requestTimeoutMs: n('request-timeout-s', 1800) * 1000 || undefined,
    restartWindowS: n('restart-window-s', 20), restartThreshold: n('restart-threshold', 0.9), restartMinRequests: n('restart-min-requests', 5),
    restartCooldownS: cooldown, restartDownCooldownS: n('restart-down-cooldown-s', 2 * cooldown), restartStep: Math.max(1, n('restart-step', 1)),
    restartStop: v['restart-stop'] ?? 'term', restartDown: !v['no-restart-down'], downRunningPerDevice: n('down-running-per-device', 1),
  };
  mkdirSync(o.outDir, { recursive: true });

  const traceOptions = v.trace ? undefined : traceOptionsFromArgs(v);
  const arrivals = v.trace ? readTrace(v.trace) : synthesize(traceOptions);
  writeTrace(path.join(o.outDir, 'trace.csv'), arrivals);
  const spec = traceOptions ? traceSpec(traceOptions) : undefined;
  const traceText = v.trace
    ? `recorded trace ${v.trace}`
    : `synthetic ${spec.kind} trace (seed ${spec.seed}): ${spec.durationS} s at ${spec.rate} req/s`
      + `${spec.kind === 'steady' ? '' : `, peak ${spec.peakRate} req/s ${spec.kind === 'bursts' ? `for ${spec.burstS} s every ${spec.periodS} s` : `in [${spec.stepAtS}, ${spec.stepEndS}) s`}`}`
      + `; prompts ${spec.promptTokens.min === spec.promptTokens.max ? spec.promptTokens.mean : `${spec.promptTokens.min}–${spec.promptTokens.max} (mean ${spec.promptTokens.mean})`} tokens, `
      + `outputs ${spec.outputTokens.min}–${spec.outputTokens.max} tokens`;
  log(`${arrivals.length} arrivals: ${traceText}${o.timeScale !== 1 ? `, time scale ${o.timeScale}` : ''}`);

  const results = [];
  const skipped = [];
  for (const name of setups) {
    if (name === 'elastic') {
      if (!serveHasAutoscale(o.cli)) {
        const reason = 'this build\'s `elasticmoe serve` has no --autoscale flag yet (the autoscaler is being added): '
          + 'rebuild (npx tsc -p .) once `elasticmoe --help` lists --autoscale';
        skipped.push({ name, reason });
        log(`elastic: skipped: ${reason}`);
        continue;
      }
      if (o.autoscale) {
        o.autoscaleFile = path.resolve(o.autoscale);
      } else {
        // The harness's SLOs and layouts as the autoscaler's config: its targets, bounds and the order devices come in.
        o.autoscaleFile = path.join(o.outDir, 'autoscale.json');
        const config = { ttftMs: o.sloTtftMs, tpotMs: o.sloTpotMs, minDevices: small.length, devicePool: [...small, ...large.filter((d) => !small.includes(d))] };
        writeFileSync(o.autoscaleFile, `${JSON.stringify(config, null, 2)}\n`);
        log(`elastic: no --autoscale CONFIG given: using ${o.autoscaleFile} ${JSON.stringify(config)}`);
      }
    }
    if (name === 'cold-restart' && large.length <= small.length) {
      skipped.push({ name, reason: '--large has no more devices than --small: nothing to restart onto' });
      continue;
    }
    try {
      results.push({ name, summary: await runSetup(name, arrivals, o) });
      writeFileSync(path.join(o.outDir, `${name}.svg`), plotLoad([{ label: name, records: readRecords(path.join(o.outDir, `${name}.jsonl`)) }], { title: `${name}: ${traceText}` }));
    } catch (e) {
      log(`${name}: failed: ${e.stack ?? e.message}`);
      results.push({ name, error: e.message });
    }
  }
  const ran = results.filter((r) => r.summary);
  if (ran.length) {
    writeFileSync(path.join(o.outDir, 'compare.svg'), plotLoad(ran.map((r) => ({ label: r.name, records: readRecords(path.join(o.outDir, `${r.name}.jsonl`)) })), { title: traceText }));
  }
  const header = [
    `Trace: ${traceText} — ${arrivals.length} requests${o.timeScale !== 1 ? `, replayed ${o.timeScale}× faster` : ''}.`,
    `SLO: TTFT ≤ ${o.sloTtftMs} ms, TPOT ≤ ${o.sloTpotMs} ms. Layouts: small ${small.join(',')}, large ${large.join(',')}.`,
    `Server: \`elasticmoe serve ${o.serveArgs.join(' ')}\`${o.autoscaleFile ? `; elastic with \`--max-devices ${large.length} --autoscale ${o.autoscale ?? 'autoscale.json'}\`${o.autoscale ? '' : ' (written by the harness from the SLOs and layouts above)'}` : ''}. `
      + `Cold restart: below ${100 * o.restartThreshold}% attainment over ${o.restartWindowS} s, ${o.restartStop === 'kill' ? 'SIGKILL' : 'SIGTERM (drain)'} and restart with ${o.restartStep} more device(s); cooldown ${o.restartCooldownS} s${o.restartDown ? '; restarts on fewer devices when idle' : ''}.`,
    `Run ${new Date().toISOString()}.`,
  ];
  const md = markdownReport({ results, skipped, header });
  writeFileSync(path.join(o.outDir, 'summary.md'), md);
  writeFileSync(path.join(o.outDir, 'summary.json'), `${JSON.stringify({ trace: traceText, options: { ...o, concurrency: Number.isFinite(o.concurrency) ? o.concurrency : null }, results, skipped }, null, 2)}\n`);
  process.stdout.write(md);
  log(`wrote ${o.outDir}/summary.md, summary.json, compare.svg and each setup's .jsonl, .svg and .server.log`);
  return results.some((r) => r.error) ? 1 : 0;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  for (const s of ['SIGINT', 'SIGTERM']) {
    process.once(s, () => {
      killAll();
      process.exit(130);
    });
  }
  cli(process.argv.slice(2)).then((code) => { process.exitCode = code; }, (e) => {
    process.stderr.write(`compare-scaling: ${e.message}\n`);
    process.exitCode = 1;
  });
}
