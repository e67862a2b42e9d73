// `elasticmoe serve`: the in-process stack (runtime, HMM, forward pass, engine)
// behind the HTTP server, until SIGTERM or SIGINT; then it drains (no new
// requests, running ones finish) and exits 0. With neither --model nor
// --synthetic it serves the tiny built-in synthetic model
// (scripts/configs/tiny-qwen3-moe.json, token ids only), so one command runs the
// whole system on the mock backend.
import { fileURLToPath } from 'node:url';

import { pino } from 'pino';

import type { RuntimeOptionsInput } from '../runtime/config.js';
import { InvalidArgumentError } from '../runtime/errors.js';
import { Runtime } from '../runtime/runtime.js';
import type { StepFigures } from '../executor/engine.js';
import { Deployment } from '../scaling/orchestrator.js';
import { type ServingDeployment, localDeployment, scalableDeployment } from '../serve/deployment.js';
import { type LocalStack, loadModelFiles, startLocalStack } from '../serve/local.js';
import { type ServerHandle, createServer } from '../serve/server.js';
import { parseDeviceList } from './hmm.js';
import { createProgressBar } from './progress.js';

/** The model served when neither --model nor --synthetic is given. */
export const DEFAULT_SYNTHETIC = fileURLToPath(new URL('../../scripts/configs/tiny-qwen3-moe.json', import.meta.url));

export interface ServeCommandOptions {
  model?: string;
  synthetic?: string;
  tokenizer?: string;
  /** "0,1" (default "0"). */
  devices?: string;
  /** Most devices a scale may use (default: every device of the node). */
  maxDevices?: string;
  host?: string;
  port?: string;
  seed?: string;
  kvBlocks?: string;
  maxTokensPerStep?: string;
  /** pino level: fatal, error, warn, info, debug, trace, silent (default info). */
  logLevel?: string;
  runtime: RuntimeOptionsInput;
}

const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

function integer(flag: string, text: string | undefined, fallback: number, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(n) || n < min || n > max) {
    throw new InvalidArgumentError(flag, `an integer in ${min}..${max === Number.MAX_SAFE_INTEGER ? 'N' : max} (got '${text}')`);
  }
  return n;
}

export async function runServe(o: ServeCommandOptions, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  const level = o.logLevel ?? 'info';
  if (!LEVELS.includes(level)) throw new InvalidArgumentError('--log-level', `one of ${LEVELS.join(', ')} (got '${level}')`);
  const port = integer('--port', o.port, 8000, 0, 65535);
  const maxTokensPerStep = integer('--max-tokens-per-step', o.maxTokensPerStep, 512, 1);
  const kvBlocks = o.kvBlocks === undefined ? undefined : integer('--kv-blocks', o.kvBlocks, 1, 1);
  let seed: bigint;
  try {
    seed = BigInt(o.seed ?? '0');
  } catch {
    throw new InvalidArgumentError('--seed', `an integer (got '${o.seed}')`);
  }
  const synthetic = o.model === undefined && o.synthetic === undefined ? DEFAULT_SYNTHETIC : o.synthetic;
  const files = await loadModelFiles({ model: o.model, synthetic, tokenizer: o.tokenizer });
  const log = pino({ level, base: { service: 'elasticmoe' } });

  const rt = Runtime.open(o.runtime);
  let stack: LocalStack | undefined;
  let scalable: Deployment | undefined;
  let server: ServerHandle | undefined;
  const onSignalEarly = () => process.exit(130); // before serving there is nothing to drain
  process.once('SIGINT', onSignalEarly);
  process.once('SIGTERM', onSignalEarly);
  try {
    const devices = parseDeviceList(o.devices ?? '0', rt.deviceCount);
    const maxDevices = integer('--max-devices', o.maxDevices, rt.deviceCount, devices.length, rt.deviceCount);
    let deployment: ServingDeployment;
    if (o.model === undefined) {
      // Synthetic weights: the scalable deployment, so POST /admin/scale (and `elasticmoe scale`) work.
      const listeners = new Set<(f: StepFigures) => void>();
      const dep = await Deployment.start({
        rt, config: files.config, devices, seed, maxTokensPerStep, kvBlocksPerDevice: kvBlocks ?? 1024,
        onStep: (f) => listeners.forEach((l) => l(f)),
      });
      scalable = dep;
      const model: { id: string; tokenizer?: NonNullable<typeof files.tokenizer> } = { id: files.name };
      if (files.tokenizer) model.tokenizer = files.tokenizer;
      deployment = scalableDeployment(dep, model, (l) => {
        listeners.add(l);
        return () => listeners.delete(l);
      });
    } else {
      // A checkpoint: a fixed layout for now (the orchestrator loads synthetic weights only).
      stack = await startLocalStack(rt, files, {
        devices, seed, maxTokensPerStep,
        ...(kvBlocks !== undefined ? { kvBlocks } : {}),
        progress: (label) => createProgressBar(label, err),
      });
      deployment = localDeployment(stack, { id: files.name });
    }
    server = createServer(deployment, { host: o.host ?? '127.0.0.1', port, logger: log, maxDevices, deviceCount: rt.deviceCount });
    const { url } = await server.listen();
    process.off('SIGINT', onSignalEarly);
    process.off('SIGTERM', onSignalEarly);
    log.info({
      url, backend: rt.backend, devices, maxDevices, model: files.name, maxPositions: files.config.maxPositions,
      tokenizer: files.tokenizer !== undefined, scalable: scalable !== undefined,
      ...(stack ? { kvBlocks: stack.hmm.kv.poolDevices().map((d) => stack!.hmm.kv.info(d).blocks), loadMs: Math.round(stack.loadMs) } : {}),
    }, 'serving');
    err.write(`elasticmoe serve: ${url} (${rt.backend}, devices ${devices.join(',')}, model ${files.name}`
      + `${files.tokenizer ? '' : ', no tokenizer: prompts are token ids'}); SIGTERM or Ctrl-C drains and stops\n`);

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
    await server?.close();
    await stack?.close();
    await scalable?.close();
    rt.dispose();
  }
}
