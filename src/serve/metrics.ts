// Prometheus metrics (prom-client) of one server, in a registry of its own (two
// servers in one process do not share counters). Latencies come from each
// finished request's engine timings; queue depth, running sequences, devices,
// memory and KV blocks are read from the deployment at scrape time; tokens/s is
// the rate of generated tokens over the last 10 seconds.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

import type { Completion, StepFigures } from '../executor/engine.js';
import type { ServingDeployment } from './deployment.js';

const PREFIX = 'elasticmoe_';
const RATE_WINDOW_MS = 10_000;
const RATE_BUCKET_MS = 100;

/** Generated tokens per second over a sliding window (100 ms buckets). */
class RateWindow {
  private readonly buckets = new Map<number, number>();
  private readonly start = performance.now();

  add(n = 1): void {
    const b = Math.floor(performance.now() / RATE_BUCKET_MS);
    this.buckets.set(b, (this.buckets.get(b) ?? 0) + n);
    if (this.buckets.size > (2 * RATE_WINDOW_MS) / RATE_BUCKET_MS) this.prune();
  }

  private prune(): void {
    const oldest = Math.floor((performance.now() - RATE_WINDOW_MS) / RATE_BUCKET_MS);
    for (const b of this.buckets.keys()) if (b < oldest) this.buckets.delete(b);
  }

  perSecond(): number {
    this.prune();
    const now = performance.now();
    const window = Math.min(RATE_WINDOW_MS, Math.max(now - this.start, 1));
    let sum = 0;
    for (const n of this.buckets.values()) sum += n;
    return sum / (window / 1000);
  }
}

/** A gauge whose series are read at scrape time: `rows()` gives each series' labels and value (series not given are dropped). */
function seriesGauge<L extends string>(registers: Registry[], name: string, help: string, labelNames: readonly L[],
  rows: () => ReadonlyArray<readonly [Partial<Record<L, string>>, number]>): void {
  new Gauge({
    name: `${PREFIX}${name}`, help, labelNames, registers,
    collect() {
      this.reset();
      for (const [labels, value] of rows()) this.set(labels, value);
    },
  });
}

export interface ServeMetricsOptions {
  /** Node.js process metrics (CPU, heap, event loop lag) too (default true). */
  defaultMetrics?: boolean;
  maxDevices?: number;
}

export class ServeMetrics {
  readonly registry = new Registry();
  private readonly rate = new RateWindow();
  readonly ttft: Histogram;
  readonly tpot: Histogram;
  readonly e2e: Histogram;
  readonly requests: Counter<'endpoint' | 'finish_reason'>;
  readonly promptTokens: Counter;
  readonly generationTokens: Counter;
  readonly preemptions: Counter;
  readonly batchSize: Histogram;
  readonly stepTokens: Histogram;
  readonly httpErrors: Counter<'status' | 'code'>;
  readonly scaleEvents: Counter<'result'>;
  readonly scaleDuration: Histogram;
  private unsubscribe: (() => void) | undefined;

  constructor(private readonly deployment: ServingDeployment, options: ServeMetricsOptions = {}) {
    const registers = [this.registry];
    if (options.defaultMetrics !== false) collectDefaultMetrics({ register: this.registry });
    const d = deployment;
    this.ttft = new Histogram({
      name: `${PREFIX}time_to_first_token_seconds`, help: 'Time from submission to the first output token', registers,
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80],
    });
    this.tpot = new Histogram({
      name: `${PREFIX}time_per_output_token_seconds`, help: 'Mean time per output token after the first, per request', registers,
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5],
    });
    this.e2e = new Histogram({
      name: `${PREFIX}request_duration_seconds`, help: 'Time from submission to the end of generation', registers,
      buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320],
    });
    this.requests = new Counter({
      name: `${PREFIX}requests_total`, help: 'Generation requests that finished, by endpoint and finish reason (stop, length, cancelled, error)',
      labelNames: ['endpoint', 'finish_reason'] as const, registers,
    });
    this.promptTokens = new Counter({ name: `${PREFIX}prompt_tokens_total`, help: 'Prompt tokens of finished requests', registers });
    this.generationTokens = new Counter({ name: `${PREFIX}generation_tokens_total`, help: 'Output tokens generated', registers });
    this.preemptions = new Counter({ name: `${PREFIX}preemptions_total`, help: 'Times finished requests lost their KV blocks and were recomputed', registers });
    this.batchSize = new Histogram({
      name: `${PREFIX}batch_size`, help: 'Sequences in one engine step (all DP ranks)', registers,
      buckets: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
    });
    this.stepTokens = new Histogram({
      name: `${PREFIX}step_tokens`, help: 'Tokens in one engine step (prefill and decode, all DP ranks)', registers,
      buckets: [1, 4, 16, 64, 256, 1024, 4096, 16384],
    });
    this.httpErrors = new Counter({
      name: `${PREFIX}http_errors_total`, help: 'Error responses, by status and error code', labelNames: ['status', 'code'] as const, registers,
    });
    this.scaleEvents = new Counter({
      name: `${PREFIX}scale_events_total`, help: 'Scale operations through POST /admin/scale, by result (ok, failed)', labelNames: ['result'] as const, registers,
    });
    this.scaleDuration = new Histogram({
      name: `${PREFIX}scale_duration_seconds`, help: 'Duration of successful scale operations', registers,
      buckets: [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
    });
    new Gauge({
      name: `${PREFIX}queue_depth`, help: 'Requests waiting for admission', registers,
      collect() {
        this.set(d.stats().waiting);
      },
    });
    new Gauge({
      name: `${PREFIX}running_sequences`, help: 'Sequences admitted and generating', registers,
      collect() {
        this.set(d.stats().running);
      },
    });
    new Gauge({
      name: `${PREFIX}executor_recoveries`, help: 'Engine steps run again on a new executor process after the serving one died (executor processes)', registers,
      collect() {
        this.set(d.stats().recoveries ?? 0);
      },
    });
    const rate = this.rate;
    new Gauge({
      name: `${PREFIX}generation_tokens_per_second`, help: `Output tokens per second over the last ${RATE_WINDOW_MS / 1000} s`, registers,
      collect() {
        this.set(rate.perSecond());
      },
    });
    new Gauge({
      name: `${PREFIX}devices`, help: 'Devices of the current layout', registers,
      collect() {
        this.set(d.layout().devices.length);
      },
    });
    if (options.maxDevices !== undefined) {
      const max = options.maxDevices;
      new Gauge({
        name: `${PREFIX}max_devices`, help: 'Most devices the deployment may scale to', registers,
        collect() {
          this.set(max);
        },
      });
    }
    new Gauge({
      name: `${PREFIX}scaling`, help: '1 while a scale operation is in progress', registers,
      collect() {
        this.set(d.isScaling ? 1 : 0);
      },
    });
    if (d.memory) {
      const memory = d.memory.bind(d);
      const kinds = [['weight', 'weightBytes'], ['kv', 'kvBytes'], ['workspace', 'workspaceBytes'], ['spare', 'spareBytes'],
        ['spare_filled', 'filledSpareBytes'], ['free', 'freeBytes'], ['total', 'totalBytes']] as const;
      seriesGauge(registers, 'device_memory_bytes',
        'Device memory by kind: weight, kv, workspace, spare, spare_filled (the spares already holding a planned scale-up\'s bytes; HMM accounting), free and total (device)',
        ['device', 'kind'], () => memory().flatMap((a) => kinds.map(([kind, field]) => [{ device: String(a.device), kind }, a[field]] as const)));
    }
    if (d.standbyEngines) {
      const engines = d.standbyEngines.bind(d);
      seriesGauge(registers, 'standby_engine_graphs',
        'Graphs captured by the standby engine made ahead for a scale-up onto the device (a series per idle device that has one; standbyEngines)',
        ['device'], () => engines().map((e) => [{ device: String(e.device) }, e.precaptured] as const));
    }
    if (d.graphStats) {
      const stats = d.graphStats.bind(d);
      seriesGauge(registers, 'layout_graphs',
        'The serving engine\'s rank graphs since its layout began, by kind: captures (each holds its step), replays, covered (replays of a larger shape\'s graph, padded), deferred (steps run without graphs); none with executor processes',
        ['kind'], () => {
          const g = stats();
          return g ? (['captures', 'replays', 'covered', 'deferred'] as const).map((kind) => [{ kind }, g[kind]] as const) : [];
        });
    }
    if (d.kvPools) {
      const pools = d.kvPools.bind(d);
      seriesGauge(registers, 'kv_blocks', 'KV cache blocks of the serving devices, by state (free, used)', ['device', 'state'],
        () => pools().flatMap((p) => [[{ device: String(p.device), state: 'free' }, p.freeBlocks], [{ device: String(p.device), state: 'used' }, p.blocks - p.freeBlocks]] as const));
    }
    if (d.onStep) this.unsubscribe = d.onStep((f) => this.step(f));
  }

  /** One generated token (tokens/s and the token counter). */
  token(): void {
    this.rate.add(1);
    this.generationTokens.inc();
  }

  step(f: StepFigures): void {
    this.batchSize.observe(f.batchSeqs);
    this.stepTokens.observe(f.tokens);
  }

  /** A finished request. */
  completion(endpoint: string, c: Completion): void {
    this.requests.inc({ endpoint, finish_reason: c.finishReason });
    this.promptTokens.inc(c.promptTokens.length);
    if (c.preemptions > 0) this.preemptions.inc(c.preemptions);
    if (c.finishReason === 'error') return;
    if (c.timings.ttftMs !== null) this.ttft.observe(c.timings.ttftMs / 1000);
    if (c.timings.tpotMs !== null) this.tpot.observe(c.timings.tpotMs / 1000);
    if (c.finishReason !== 'cancelled') this.e2e.observe(c.timings.totalMs / 1000);
  }

  httpError(status: number, code: string | null): void {
    this.httpErrors.inc({ status: String(status), code: code ?? 'none' });
  }

  dispose(): void {
    this.unsubscribe?.();
    this.unsubscribe = undefined;
  }
}
