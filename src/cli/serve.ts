// `elasticmoe serve`: a scalable deployment (runtime, HMM, forward pass, engine;
// src/scaling/orchestrator.ts) behind the HTTP server, until SIGTERM or SIGINT; then
// it drains (no new requests, running ones finish) and exits 0. The weights come from
// a checkpoint (--model) or are synthetic; either way POST /admin/scale moves the
// deployment to other devices while it serves. With neither --model nor --synthetic it
// serves the tiny built-in synthetic model (scripts/configs/tiny-qwen3-moe.json, token
// ids only), so one command runs the whole system on the mock backend. --autoscale
// CONFIG.json (or --slo-ttft-ms and --slo-tpot-ms) runs the SLO-aware autoscaler
// (src/serve/autoscale.ts).
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import { pino } from 'pino';

import type { RuntimeOptionsInput } from '../runtime/config.js';
import { checkKvDtype } from '../model/kernels/index.js';
import { ElasticMoeError, InvalidArgumentError } from '../runtime/errors.js';
import { Runtime } from '../runtime/runtime.js';
import type { StepFigures } from '../executor/engine.js';
import { Deployment } from '../scaling/orchestrator.js';
import { DEFAULT_PRECAPTURE_GRAPHS } from '../scaling/precapture.js';
import { type AutoscaleConfig, AutoscaleConfigError, Autoscaler, parseAutoscaleConfig } from '../serve/autoscale.js';
import { type ServingDeployment, scalableDeployment } from '../serve/deployment.js';
import { loadModelFiles } from '../serve/local.js';
import { type ServerHandle, createServer } from '../serve/server.js';
import { parseDeviceList } from './hmm.js';
import { integerFlag, seedFlag } from './flags.js';
import { createProgressBar } from './progress.js';

/** The model served when neither --model nor --synthetic is given. */
/** The executor process entry (compiled). */
const EXECUTOR_SCRIPT = fileURLToPath(new URL('../executor/main.js', import.meta.url));

export const DEFAULT_SYNTHETIC = fileURLToPath(new URL('../../scripts/configs/tiny-qwen3-moe.json', import.meta.url));

export interface ServeCommandOptions {
  model?: string;
  synthetic?: string;
  tokenizer?: string;
  /** "0,1" (default "0"). */
  devices?: string;
  /** Most devices a scale may use (default: every device of the node); the autoscaler's maxDevices too. */
  maxDevices?: string;
  /** An autoscaler config file (JSON, src/serve/autoscale.ts's AutoscaleConfigSchema). */
  autoscale?: string;
  /** Autoscaler SLOs and lower bound (override the file's ttftMs, tpotMs, minDevices). */
  sloTtftMs?: string;
  sloTpotMs?: string;
  minDevices?: string;
  host?: string;
  port?: string;
  seed?: string;
  kvBlocks?: string;
  maxTokensPerStep?: string;
  /** KV cache element type: "bf16" (default) or "f32". */
  kvDtype?: string;
  /** pino level: fatal, error, warn, info, debug, trace, silent (default info). */
  logLevel?: string;
  /** "in-process" (default) or "process": executors as separate processes attached through the HMM daemon. */
  executor?: string;
  /** "on" (default) or "off": standby chunks on the idle devices (DeploymentOptions.standbyChunks). */
  standbyChunks?: string;
  /** "on" (default) or "off": the standby chunks filled ahead with a scale-up's bytes (DeploymentOptions.prefillStandby). */
  prefillStandby?: string;
  /** "on" (default) or "off": the standby engines of the planned scale-ups made ahead (DeploymentOptions.standbyEngines). */
  standbyEngines?: string;
  /** "on" or "off" (default): virtual expert tables (DeploymentOptions.expertTables). */
  expertTables?: string;
  /** Graph shapes per staying device a scale's standby captures ahead (DeploymentOptions.precaptureGraphs; default DEFAULT_PRECAPTURE_GRAPHS, 3). */
  precaptureGraphs?: string;
  runtime: RuntimeOptionsInput;
}

const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

function positive(flag: string, text: string): number {
  const n = Number(text);
  if (text.trim() === '' || !Number.isFinite(n) || n <= 0) throw new InvalidArgumentError(flag, `a number above 0 (got '${text}')`);
  return n;
}

/** The autoscaler's config input from --autoscale FILE and the flags that override it; undefined when not asked for. */
function autoscaleInput(o: ServeCommandOptions): Record<string, unknown> | undefined {
  const wanted = o.autoscale !== undefined || o.sloTtftMs !== undefined || o.sloTpotMs !== undefined;
  if (!wanted) {
    if (o.minDevices !== undefined) {
      throw new ElasticMoeError('INVALID_ARGUMENT', '--min-devices is a bound of the autoscaler: give --autoscale CONFIG.json or --slo-ttft-ms and --slo-tpot-ms too');
    }
    return undefined;
  }
  let input: Record<string, unknown> = {};
  if (o.autoscale !== undefined) {
    let text: string;
    try {
      text = readFileSync(o.autoscale, 'utf8');
    } catch (e) {
      throw new ElasticMoeError('INVALID_ARGUMENT', `--autoscale ${o.autoscale}: cannot read it (${e instanceof Error ? e.message : String(e)})`);
    }
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (e) {
      throw new ElasticMoeError('INVALID_ARGUMENT', `--autoscale ${o.autoscale}: not valid JSON (${e instanceof Error ? e.message : String(e)})`);
    }
    if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new ElasticMoeError('INVALID_ARGUMENT', `--autoscale ${o.autoscale}: must hold a JSON object`);
    input = { ...(json as Record<string, unknown>) };
  }
  if (o.sloTtftMs !== undefined) input.ttftMs = positive('--slo-ttft-ms', o.sloTtftMs);
  if (o.sloTpotMs !== undefined) input.tpotMs = positive('--slo-tpot-ms', o.sloTpotMs);
  if (o.minDevices !== undefined) input.minDevices = integerFlag('--min-devices', o.minDevices, 1, 1);
  return input;
}

export async function runServe(o: ServeCommandOptions, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  const level = o.logLevel ?? 'info';
  if (!LEVELS.includes(level)) throw new InvalidArgumentError('--log-level', `one of ${LEVELS.join(', ')} (got '${level}')`);
  const port = integerFlag('--port', o.port, 8000, 0, 65535);
  const maxTokensPerStep = integerFlag('--max-tokens-per-step', o.maxTokensPerStep, 512, 1);
  const kvBlocks = o.kvBlocks === undefined ? undefined : integerFlag('--kv-blocks', o.kvBlocks, 1, 1);
  const kvDtype = checkKvDtype('--kv-dtype', o.kvDtype ?? 'bf16');
  const seed = seedFlag('--seed', o.seed);
  const autoscaleAsked = autoscaleInput(o);
  const synthetic = o.model === undefined && o.synthetic === undefined ? DEFAULT_SYNTHETIC : o.synthetic;
  const files = await loadModelFiles({ model: o.model, synthetic, tokenizer: o.tokenizer });
  const log = pino({ level, base: { service: 'elasticmoe' } });

  if (o.executor !== undefined && o.executor !== 'in-process' && o.executor !== 'process') {
    throw new InvalidArgumentError('--executor', `in-process or process (got '${o.executor}')`);
  }
  for (const [flag, v] of [['--standby-chunks', o.standbyChunks], ['--prefill-standby', o.prefillStandby], ['--standby-engines', o.standbyEngines],
    ['--expert-tables', o.expertTables]] as const) {
    if (v !== undefined && v !== 'on' && v !== 'off') throw new InvalidArgumentError(flag, `on or off (got '${v}')`);
  }
  const precaptureGraphs = o.precaptureGraphs === undefined ? DEFAULT_PRECAPTURE_GRAPHS : Number(o.precaptureGraphs);
  if (!Number.isSafeInteger(precaptureGraphs) || precaptureGraphs < 0 || (o.precaptureGraphs !== undefined && !/^\d+$/.test(o.precaptureGraphs))) {
    throw new InvalidArgumentError('--precapture-graphs', `a non-negative integer (got '${o.precaptureGraphs}')`);
  }
  const rt = Runtime.open(o.runtime);
  let scalable: Deployment | undefined;
  let server: ServerHandle | undefined;
  let autoscaler: Autoscaler | undefined;
  const onSignalEarly = () => process.exit(130); // before serving there is nothing to drain
  process.once('SIGINT', onSignalEarly);
  process.once('SIGTERM', onSignalEarly);
  try {
    const devices = parseDeviceList(o.devices ?? '0', rt.deviceCount);
    const maxDevices = integerFlag('--max-devices', o.maxDevices, rt.deviceCount, devices.length, rt.deviceCount);
    let autoscaleConfig: AutoscaleConfig | undefined;
    if (autoscaleAsked) {
      // Checked before the weights load. Pool by default: the serving devices, then the node's others.
      const input = { ...autoscaleAsked, ...(o.maxDevices !== undefined ? { maxDevices } : {}) };
      const pool = [...devices, ...Array.from({ length: rt.deviceCount }, (_, d) => d).filter((d) => !devices.includes(d))];
      try {
        autoscaleConfig = parseAutoscaleConfig(input, { devicePool: pool, deviceCount: rt.deviceCount });
      } catch (e) {
        // A missing SLO: name the flag that gives it.
        const flags: Record<string, string> = { ttftMs: '--slo-ttft-ms', tpotMs: '--slo-tpot-ms' };
        if (e instanceof AutoscaleConfigError && flags[e.field] && !(e.field in input)) {
          throw new AutoscaleConfigError(e.field, `is required: give ${flags[e.field]} MS${o.autoscale ? ` or "${e.field}" in ${o.autoscale}` : ''}`);
        }
        throw e;
      }
      if (autoscaleConfig.maxDevices > maxDevices) {
        throw new ElasticMoeError('INVALID_ARGUMENT', `autoscale config: maxDevices: ${autoscaleConfig.maxDevices} is above --max-devices ${maxDevices}`);
      }
      if (devices.length < autoscaleConfig.minDevices || devices.length > autoscaleConfig.maxDevices) {
        throw new ElasticMoeError('INVALID_ARGUMENT', `--devices names ${devices.length} devices, outside the autoscaler's bounds `
          + `${autoscaleConfig.minDevices}..${autoscaleConfig.maxDevices} (minDevices..maxDevices)`);
      }
    }
    // The scalable deployment, for synthetic weights and checkpoints alike, so POST /admin/scale
    // (and `elasticmoe scale`) work: a checkpoint loads through the HMM once, and a scale copies
    // its chunks between devices.
    const listeners = new Set<(f: StepFigures) => void>();
    // --executor process: every executor (serving and standby) is its own process attached through the
    // HMM daemon; it opens the same backend with the same mock settings as this process.
    const executor = o.executor === 'process'
      ? { process: { script: EXECUTOR_SCRIPT, env: {
        ELASTICMOE_BACKEND: rt.backend,
        ELASTICMOE_MOCK_DEVICES: String(rt.options.mockDevices),
        ELASTICMOE_MOCK_CAPACITY: String(rt.options.mockCapacity),
      } } }
      : 'in-process' as const;
    const bar = createProgressBar(files.weights.kind === 'checkpoint' ? 'loading weights' : 'synthetic weights', err);
    let dep: Deployment;
    try {
      dep = await Deployment.start({
        rt, config: files.config, devices, seed, maxTokensPerStep, kvBlocksPerDevice: kvBlocks ?? 1024, executor,
        ...(files.weights.kind === 'checkpoint' ? { checkpoint: files.weights.dir } : {}),
        ...(files.tokenizer ? { extraEosTokenIds: files.tokenizer.eosTokenIds } : {}),
        onLoadProgress: (p) => bar.update(p.bytesDone, p.bytesTotal),
        standbyChunks: o.standbyChunks !== 'off',
        prefillStandby: o.prefillStandby !== 'off',
        standbyEngines: o.standbyEngines !== 'off',
        expertTables: o.expertTables === 'on',
        precaptureGraphs,
        forward: { kvDtype },
        onStep: (f) => listeners.forEach((l) => l(f)),
      });
    } finally {
      bar.finish();
    }
    scalable = dep;
    const model: { id: string; tokenizer?: NonNullable<typeof files.tokenizer> } = { id: files.name };
    if (files.tokenizer) model.tokenizer = files.tokenizer;
    const deployment: ServingDeployment = scalableDeployment(dep, model, (l) => {
      listeners.add(l);
      return () => listeners.delete(l);
    });
    if (autoscaleConfig) autoscaler = new Autoscaler(deployment, autoscaleConfig, { log: log.child({ component: 'autoscaler' }), deviceCount: rt.deviceCount });
    server = createServer(deployment, {
      host: o.host ?? '127.0.0.1', port, logger: log, maxDevices, deviceCount: rt.deviceCount, ...(autoscaler ? { autoscaler } : {}),
    });
    const { url } = await server.listen();
    autoscaler?.start();
    process.off('SIGINT', onSignalEarly);
    process.off('SIGTERM', onSignalEarly);
    log.info({
      url, backend: rt.backend, devices, maxDevices, model: files.name, maxPositions: files.config.maxPositions, kvDtype,
      tokenizer: files.tokenizer !== undefined, scalable: scalable !== undefined, autoscale: autoscaler !== undefined,
      kvBlocks: scalable.hmm.kv.poolDevices().map((d) => scalable!.hmm.kv.info(d).blocks),
    }, 'serving');
    err.write(`elasticmoe serve: ${url} (${rt.backend}, devices ${devices.join(',')}, model ${files.name}`
      + `${files.tokenizer ? '' : ', no tokenizer: prompts are token ids'}`
      + `${autoscaleConfig ? `, autoscaling ${autoscaleConfig.minDevices}..${autoscaleConfig.maxDevices} devices for TTFT ${autoscaleConfig.ttftMs} ms / TPOT ${autoscaleConfig.tpotMs} ms` : ''}); SIGTERM or Ctrl-C drains and stops\n`);

    // Serve until a signal; the second one stops at once.
    const signal = await new Promise<NodeJS.Signals>((resolve) => {
      const on = (s: NodeJS.Signals) => {
        process.off('SIGTERM', on);
        process.off('SIGINT', on);
        resolve(s);
      };
      process.on('SIGTERM', on);
      process.on('SIGINT', on);
    });
    const force = () => {
      log.warn('second signal: exiting without draining');
      process.exit(1);
    };
    process.once('SIGTERM', force);
    process.once('SIGINT', force);
    log.info({ signal, running: server.inFlight }, 'draining');
    await server.close();
    log.info('stopped');
    process.off('SIGTERM', force);
    process.off('SIGINT', force);
    return 0;
  } finally {
    process.off('SIGINT', onSignalEarly);
    process.off('SIGTERM', onSignalEarly);
    autoscaler?.stop();
    await server?.close();
    await autoscaler?.settled();
    await scalable?.close();
    rt.dispose();
  }
}
