// `elasticmoe scale --devices 0,1,2 [--url http://127.0.0.1:8000]`: asks a running
// `elasticmoe serve` to move to a new device set (POST /admin/scale) and prints
// what moved. The server keeps serving throughout; a failed scale is rolled back.
import { InvalidArgumentError } from '../runtime/errors.js';
import { formatBytes, table } from './format.js';

export interface ScaleCommandOptions {
  devices?: string;
  url?: string;
  json?: boolean;
  /** For tests: where the report goes. */
  out?: NodeJS.WritableStream;
}

interface ScaleReportBody {
  from: number[];
  to: number[];
  ms: number;
  bytesCopied: number;
  lowerBoundBytes: number;
  chunksCopied: number;
  chunksReused: number;
  chunksReleased: number;
  chunksKeptAsStandby?: number;
  expertTables?: { mapped: number; taken?: number; unmapped: number; mapMs: number; unmapMs: number };
  releaseErrors?: string[];
  phases: Record<string, number>;
  switchover?: { kept: number; moved: number; requeued: number; waiting: number };
  chunksFromStandby?: number;
  plannedAhead?: boolean;
  attachDuringCopies?: boolean;
  attachBeforeTargets?: boolean;
  prepare?: { stats?: { chunks: number; makeMs?: number; makeCalls?: number } };
  prestartedExecutor?: boolean;
  preattachedChunks?: { kept: number; dropped: number };
  standbyMadeAhead?: { ms: number; precaptured: number };
  precapture?: { graphs: number; ms: number };
}

export async function runScale(o: ScaleCommandOptions): Promise<number> {
  const out = o.out ?? process.stdout;
  if (!o.devices) throw new InvalidArgumentError('--devices', 'a comma-separated device list, e.g. 0,1,2');
  const devices = o.devices.split(',').map((d) => Number(d.trim()));
  if (devices.some((d) => !Number.isInteger(d) || d < 0)) throw new InvalidArgumentError('--devices', `device ordinals (got '${o.devices}')`);
  const base = (o.url ?? 'http://127.0.0.1:8000').replace(/\/+$/, '');
  process.stderr.write(`elasticmoe scale: asking ${base} to serve on devices ${devices.join(',')} ...\n`);
  let res: Response;
  try {
    res = await fetch(`${base}/admin/scale`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ devices }) });
  } catch (e) {
    throw new InvalidArgumentError('--url', `the address of a running \`elasticmoe serve\` (${base}: ${(e as Error).cause ?? (e as Error).message})`);
  }
  const body = (await res.json()) as ScaleReportBody & { error?: { message: string } };
  if (!res.ok) {
    process.stderr.write(`elasticmoe scale: ${res.status}: ${body.error?.message ?? JSON.stringify(body)}\n`);
    return 1;
  }
  if (o.json) {
    out.write(`${JSON.stringify(body, null, 2)}\n`);
    return 0;
  }
  const p = body.phases;
  out.write(`scaled ${body.from.join(',')} -> ${body.to.join(',')} in ${body.ms.toFixed(0)} ms `
    + `(plan ${p.planMs?.toFixed(0)}, prepare ${p.prepareMs?.toFixed(0)}, attach ${p.attachMs?.toFixed(0)}, `
    + `${p.copyWaitMs ? `copy wait ${p.copyWaitMs.toFixed(0)}, ` : ''}switch ${p.switchMs?.toFixed(0)}, `
    + `first step ${p.firstStepMs?.toFixed(0)}, release ${p.releaseMs?.toFixed(0)} ms)\n`);
  // What the deployment had done ahead of this scale (docs/scaling.md "Work done ahead of the next scale").
  const ahead = [
    body.plannedAhead ? 'plan' : undefined,
    body.chunksFromStandby ? `${body.chunksFromStandby} of ${body.chunksCopied} target chunks` : undefined,
    body.prestartedExecutor ? `the standby executor process${body.standbyMadeAhead ? ', initialised for this layout' : ''}` : undefined,
    body.standbyMadeAhead && body.prestartedExecutor === undefined ? 'the standby engine' : undefined,
    body.preattachedChunks?.kept ? `${body.preattachedChunks.kept} chunks attached by it` : undefined,
    body.precapture?.graphs ? `${body.precapture.graphs} step graphs (captured in ${body.precapture.ms.toFixed(0)} ms before the switch)` : undefined,
  ].filter((x): x is string => x !== undefined);
  if (ahead.length > 0) out.write(`ready ahead: ${ahead.join(', ')}${body.attachDuringCopies ? '; the standby made while the copies ran' : ''}\n`);
  const made = body.prepare?.stats;
  if (made?.makeCalls) {
    out.write(`target chunks made on a worker thread: ${made.chunks - (body.chunksFromStandby ?? 0)} in ${made.makeCalls} calls, `
      + `${(made.makeMs ?? 0).toFixed(0)} ms${!body.attachBeforeTargets ? ''
        : body.prestartedExecutor === undefined ? ' (the standby engine made meanwhile, against their addresses)'
          : ' (the standby executor process attached them as they were made)'}\n`);
  }
  out.write(`${table([
    ['copied', 'reused in place', 'released', 'bytes copied', 'lower bound'],
    [String(body.chunksCopied), String(body.chunksReused), String(body.chunksReleased), formatBytes(body.bytesCopied), formatBytes(body.lowerBoundBytes)],
  ])}\n`);
  if (body.chunksKeptAsStandby) out.write(`kept as standby chunks on the leaving devices: ${body.chunksKeptAsStandby} (a scale-up onto them copies none of these back)\n`);
  if (body.expertTables) {
    const x = body.expertTables;
    out.write(`expert tables: ${x.mapped} expert chunks mapped into their slots before the switch (${x.mapMs.toFixed(0)} ms), ` +
      (x.taken ? `${x.taken} mapped ahead, ` : '') +
      `${x.unmapped} unmapped after it (${x.unmapMs.toFixed(0)} ms)\n`);
  }
  if (body.releaseErrors && body.releaseErrors.length > 0) {
    out.write(`warning: the release after the switch-over could not free ${body.releaseErrors.length} thing(s) ` +
      `(the scale is done; what was refused is tried again): ${body.releaseErrors[0]}\n`);
  }
  if (body.switchover) {
    const s = body.switchover;
    out.write(`requests in flight: ${s.kept} kept their KV in place, ${s.moved} moved with it, ${s.requeued} recomputed, ${s.waiting} waiting\n`);
  }
  return 0;
}
