// `elasticmoe hmm`: runs the HMM daemon in the foreground until SIGINT/SIGTERM.
// With --synthetic, the devices are first filled with seeded synthetic weights
// from a JSON file of tensor specs (the model layer will generate these from a
// HF config; this simple format serves until then).
import { readFileSync } from 'node:fs';

import { z } from 'zod';

import { HmmDaemon, type HmmDaemonEvent } from '../hmm/daemon.js';
import { type DType, DTYPES } from '../hmm/dtype.js';
import { Hmm } from '../hmm/hmm.js';
import type { TensorSpec } from '../hmm/placement.js';
import { InvalidArgumentError } from '../runtime/errors.js';
import { Runtime } from '../runtime/runtime.js';
import type { RuntimeOptionsInput } from '../runtime/config.js';
import { seedFlag } from './flags.js';

export interface HmmCommandOptions {
  socket: string;
  /** Path of a JSON file `{ "tensors": [TensorSpec...], "kvPools"?: [KvPoolSpec...] }`. */
  synthetic?: string;
  /** "0,1": physical devices; a spec's `device` is an index into this list (default: the spec's device as is). */
  devices?: string;
  seed?: string;
  runtime: RuntimeOptionsInput;
}

const SyntheticFileSchema = z.object({
  tensors: z.array(z.object({
    name: z.string().min(1),
    dtype: z.enum(Object.keys(DTYPES) as [DType, ...DType[]]),
    shape: z.array(z.number().int().min(0)),
    device: z.number().int().min(0),
    group: z.string().min(1),
    packing: z.enum(['single', 'packed']).optional(),
  }).strict()),
  kvPools: z.array(z.object({
    device: z.number().int().min(0),
    blockBytes: z.number().int().positive(),
    blocks: z.number().int().positive(),
    maxChunkBytes: z.number().int().positive().optional(),
  }).strict()).optional(),
});
type SyntheticFile = z.infer<typeof SyntheticFileSchema>;

function readSyntheticFile(path: string): SyntheticFile {
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(path, 'utf8'));
  } catch (e) {
    throw new InvalidArgumentError('--synthetic', `a readable JSON file (${path}: ${(e as Error).message})`);
  }
  const parsed = SyntheticFileSchema.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    throw new InvalidArgumentError(`--synthetic ${path}: ${issue.path.join('.') || 'file'}`, `valid (${issue.message})`);
  }
  return parsed.data;
}

/** "0,1" → [0, 1], checked against the runtime's devices. */
export function parseDeviceList(text: string, deviceCount: number): number[] {
  const list = text.split(',').map((s) => s.trim());
  const devices = list.map(Number);
  if (list.some((s) => !/^\d+$/.test(s)) || devices.some((d) => d >= deviceCount) || new Set(devices).size !== devices.length) {
    throw new InvalidArgumentError('--devices', `distinct device ordinals below ${deviceCount}, comma-separated (got '${text}')`);
  }
  return devices;
}

/** Maps each logical device of the file onto `devices` (identity when none is given). */
function physical(devices: number[] | undefined, logical: number, what: string): number {
  if (!devices) return logical;
  const d = devices[logical];
  if (d === undefined) throw new InvalidArgumentError(what, `a device index below ${devices.length} (the --devices list has ${devices.length})`);
  return d;
}

async function loadSynthetic(hmm: Hmm, options: HmmCommandOptions): Promise<void> {
  const file = readSyntheticFile(options.synthetic!);
  const devices = options.devices === undefined ? undefined : parseDeviceList(options.devices, hmm.rt.deviceCount);
  const specs: TensorSpec[] = file.tensors.map((t) => ({ ...t, device: physical(devices, t.device, `${t.name}.device`) }));
  const seed = seedFlag('--seed', options.seed);
  await hmm.loadSynthetic(specs, { seed });
  for (const p of file.kvPools ?? []) hmm.kv.createPool({ ...p, device: physical(devices, p.device, 'kvPools.device') });
}

function logLine(e: HmmDaemonEvent): string | undefined {
  switch (e.type) {
    case 'refused':
      return `hmm: refused pid ${e.pid} (uid ${e.uid})`;
    case 'request-error':
      return e.code === 'INTERNAL' ? `hmm: ${e.op ?? 'request'} from pid ${e.pid} failed: ${e.message}` : undefined;
    default:
      return undefined;
  }
}

/** Resolves on the first SIGINT/SIGTERM; a second one exits at once. */
function waitForSignal(): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    let seen = false;
    const onSignal = (signal: NodeJS.Signals) => {
      if (seen) process.exit(130);
      seen = true;
      resolve(signal);
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  });
}

export async function runHmm(options: HmmCommandOptions, out: NodeJS.WritableStream = process.stdout, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  if (options.devices !== undefined && options.synthetic === undefined) {
    throw new InvalidArgumentError('--devices', 'given with --synthetic (it maps the file\'s devices)');
  }
  const rt = Runtime.open(options.runtime);
  const hmm = new Hmm(rt);
  try {
    if (options.synthetic !== undefined) await loadSynthetic(hmm, options);
    const stopped = waitForSignal();
    const daemon = await HmmDaemon.listen(hmm, options.socket, {
      log: (e) => {
        const line = logLine(e);
        if (line) err.write(`${line}\n`);
      },
    });
    const bytes = hmm.store.all().reduce((a, c) => a + c.plan.size, 0);
    out.write(`hmm: listening on ${options.socket} (${rt.backend}, ${hmm.store.size} chunks, ${(bytes / 1024 ** 3).toFixed(2)} GiB)\n`);
    await stopped;
    await daemon.close();
    return 0;
  } finally {
    hmm.dispose();
    rt.dispose();
  }
}
