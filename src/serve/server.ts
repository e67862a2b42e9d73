// The HTTP server (Fastify): the OpenAI-compatible API over a ServingDeployment,
// health, Prometheus metrics and the admin routes.
//
//   POST /v1/completions        prompts as text (with a tokenizer) or token ids
//   POST /v1/chat/completions   needs a tokenizer with a chat template
//   GET  /v1/models             the served model
//   GET  /health                200 while serving, 503 while draining
//   GET  /metrics               Prometheus text format
//   GET  /admin/layout          devices, DP/EP/TP degrees, KV pools (?placement=true: every expert's devices)
//   POST /admin/scale           {"devices": [0, 1, 2]}; 501 when the deployment cannot scale
//   GET  /admin/autoscaler      the autoscaler's config, estimates and last decisions (404 without one)
//
// Streaming (`stream: true`) answers with server-sent events: `data: {chunk}`
// per output token, a last chunk per choice with its finish_reason, a usage
// chunk when asked (stream_options.include_usage), then `data: [DONE]`. The
// status line and headers wait for the first token (at most 250 ms), so a
// request the engine refuses at submission still gets its 4xx JSON error.
//
// A client that goes away (the response closes before it ended) aborts its
// request: the engine drops it and frees its KV blocks. `close()` drains:
// new connections and requests are refused (503), running requests finish
// (cancelled after drainTimeoutMs), then the listener closes.
import { randomUUID } from 'node:crypto';
import { PassThrough } from 'node:stream';

import type { Registry } from 'prom-client';
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest, LogController } from 'fastify';
import { z } from 'zod';

import type { Completion } from '../executor/engine.js';
import type { ServingDeployment } from './deployment.js';
import { ApiError, badRequest, toApiError } from './errors.js';
import { ServeMetrics } from './metrics.js';
import { type GenerationPlan, type PlanLimits, ScaleBody, parseBody, planChat, planCompletion } from './openai.js';

export interface ServerOptions {
  /** Default 127.0.0.1. */
  host?: string;
  /** Default 8000; 0 picks a free port. */
  port?: number;
  /** A pino logger (structured logs); default: none (silent). */
  logger?: FastifyBaseLogger;
  /** Largest request body in bytes (default 1 MiB). */
  bodyLimit?: number;
  /** max_tokens of /v1/completions when absent (default 16, as OpenAI). */
  completionMaxTokens?: number;
  /** max_tokens of chat when absent: this or what the context leaves (default 1024). */
  chatMaxTokens?: number;
  /** Most prompts in one /v1/completions request (default 64). */
  maxPrompts?: number;
  /** Most devices POST /admin/scale may ask for. */
  maxDevices?: number;
  /** Devices on the node (device ordinals must be below it). */
  deviceCount?: number;
  /** How long close() lets running requests finish before cancelling them (default 30 s). */
  drainTimeoutMs?: number;
  /** Node.js process metrics in /metrics too (default true). */
  processMetrics?: boolean;
  /**
   * An autoscaler (src/serve/autoscale.ts): it gets every finished request, its
   * metrics join /metrics, GET /admin/autoscaler shows its report, and close()
   * stops it. The caller starts it.
   */
  autoscaler?: ServerAutoscaler;
}

/** What the server needs from an autoscaler (the Autoscaler class fits). */
export interface ServerAutoscaler {
  record(c: Completion): void;
  registerMetrics(registry: Registry): void;
  report(): unknown;
  stop(): void;
}

export interface ServerHandle {
  app: FastifyInstance;
  metrics: ServeMetrics;
  /** Starts listening; resolves with the bound address (port 0 picks one). */
  listen(): Promise<{ host: string; port: number; url: string }>;
  /** Stops accepting, lets running requests finish (drainTimeoutMs, then cancels them) and closes. Idempotent. */
  close(): Promise<void>;
  readonly draining: boolean;
  /** Requests being generated now. */
  readonly inFlight: number;
}

const STREAM_HEADER_WAIT_MS = 250;
const MiB = 1024 * 1024;

type Endpoint = 'completions' | 'chat';

interface Active {
  abort: AbortController;
  closed: Promise<void>;
}

const finishReason = (c: Completion): 'stop' | 'length' => (c.finishReason === 'length' ? 'length' : 'stop');

function usage(completions: readonly Completion[]) {
  const prompt = completions.reduce((a, c) => a + c.promptTokens.length, 0);
  const completion = completions.reduce((a, c) => a + c.outputTokens.length, 0);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

/** Only seen by a client still connected when its request was cancelled: the drain timed out. */
const cancelledError = () => new ApiError(503, 'The request was cancelled: the server is shutting down', 'server_error', null, 'cancelled');

/** A timer that does not keep the process alive, and can be cancelled. */
function delay(ms: number): { promise: Promise<void>; cancel(): void } {
  let t: NodeJS.Timeout | undefined;
  let done!: () => void;
  const promise = new Promise<void>((resolve) => {
    done = resolve;
    t = setTimeout(resolve, ms);
    t.unref();
  });
  return { promise, cancel: () => { clearTimeout(t); done(); } };
}

const LayoutQuery = z.object({ placement: z.enum(['true', 'false', '1', '0']).optional() }).strict();

export function createServer(deployment: ServingDeployment, options: ServerOptions = {}): ServerHandle {
  const bodyLimit = options.bodyLimit ?? MiB;
  const limits: PlanLimits = {
    completionMaxTokens: options.completionMaxTokens ?? 16,
    chatMaxTokens: options.chatMaxTokens ?? 1024,
    maxPrompts: options.maxPrompts ?? 64,
  };
  const drainTimeoutMs = options.drainTimeoutMs ?? 30_000;
  const model = deployment.model;
  const created = model.created ?? Math.floor(Date.now() / 1000);
  const metrics = new ServeMetrics(deployment, {
    ...(options.processMetrics === false ? { defaultMetrics: false } : {}),
    ...(options.maxDevices !== undefined ? { maxDevices: options.maxDevices } : {}),
  });
  const autoscaler = options.autoscaler;
  autoscaler?.registerMetrics(metrics.registry);
  const app: FastifyInstance = Fastify({
    bodyLimit,
    ...(options.logger ? { loggerInstance: options.logger } : { logger: false }),
    logController: new LogController({ disableRequestLogging: true }), // one line per request, from onResponse below
    return503OnClosing: false, // our onRequest hook answers 503 in OpenAI's shape
    forceCloseConnections: 'idle',
  });
  // JSON only: any other content type is a 415 (Fastify would hand text/plain bodies over as strings).
  app.removeContentTypeParser('text/plain');
  const active = new Set<Active>();
  let draining = false;
  let closing: Promise<void> | undefined;

  app.setErrorHandler((err, req, reply) => {
    const api = toApiError(err, bodyLimit);
    if (api.status >= 500) req.log.error({ err }, 'request failed');
    else req.log.info({ status: api.status, code: api.code, message: api.message }, 'request refused');
    metrics.httpError(api.status, api.code);
    if (draining) reply.header('connection', 'close');
    void reply.code(api.status).send(api.body());
  });
  app.setNotFoundHandler((req, reply) => {
    const api = new ApiError(404, `No route for ${req.method} ${req.url.split('?')[0]}: the routes are POST /v1/completions, POST /v1/chat/completions, `
      + 'GET /v1/models, GET /health, GET /metrics, GET /admin/layout, POST /admin/scale, GET /admin/autoscaler', 'not_found_error', null, 'route_not_found');
    metrics.httpError(404, api.code);
    void reply.code(404).send(api.body());
  });
  app.addHook('onRequest', async (req, reply) => {
    if (!draining) return;
    reply.header('connection', 'close');
    if (req.method === 'POST') throw new ApiError(503, 'The server is shutting down: it takes no new requests', 'server_error', null, 'shutting_down');
  });
  app.addHook('onResponse', async (req, reply) => {
    req.log.info({ method: req.method, url: req.url, status: reply.statusCode, ms: Math.round(reply.elapsedTime * 10) / 10 }, 'request');
  });

  // ---- generation

  async function generate(endpoint: Endpoint, req: FastifyRequest, reply: FastifyReply): Promise<unknown> {
    const plan = endpoint === 'completions' ? planCompletion(req.body, model, limits) : planChat(req.body, model, limits);
    const id = `${endpoint === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID().replaceAll('-', '')}`;
    const abort = new AbortController();
    let markClosed!: () => void;
    const entry: Active = { abort, closed: new Promise<void>((resolve) => { markClosed = resolve; }) };
    active.add(entry);
    const res = reply.raw;
    res.once('close', () => {
      if (!res.writableEnded) abort.abort(); // the client went away: cancel, free its KV blocks
      active.delete(entry);
      markClosed();
    });
    const t0 = performance.now();
    const results: Array<Completion | undefined> = plan.prompts.map(() => undefined);
    const logDone = () => {
      const done = results.filter((c): c is Completion => c !== undefined);
      const ttft = done[0]?.timings.ttftMs;
      req.log.info({
        id, endpoint, choices: plan.prompts.length, stream: plan.stream,
        finish: [...new Set(done.map((c) => c.finishReason))].join(','), ...usage(done),
        ttftMs: ttft == null ? null : Math.round(ttft * 10) / 10,
        ms: Math.round(performance.now() - t0),
      }, 'generation');
    };
    return plan.stream ? stream(endpoint, plan, id, abort, reply, results, logDone) : whole(endpoint, plan, id, abort, results, logDone);
  }

  function submitAll(endpoint: Endpoint, plan: GenerationPlan, id: string, abort: AbortController, results: Array<Completion | undefined>,
    onToken: (choice: number, token: number, text: string) => void, onDone: (choice: number, c: Completion) => void = () => undefined): Promise<Completion[]> {
    const all = plan.prompts.map(async (prompt, i) => {
      const c = await deployment.submit({
        id: plan.prompts.length === 1 ? id : `${id}-${i}`,
        prompt,
        maxTokens: plan.maxTokens,
        stop: plan.stop,
        ignoreEos: plan.ignoreEos,
      }, {
        signal: abort.signal,
        onToken: (token, text) => {
          metrics.token();
          onToken(i, token, text ?? '');
        },
      });
      results[i] = c;
      metrics.completion(endpoint, c);
      autoscaler?.record(c);
      onDone(i, c);
      return c;
    });
    // One refused submission cancels the others of the request.
    return Promise.all(all).catch((e: unknown) => {
      abort.abort();
      throw e;
    });
  }

  async function whole(endpoint: Endpoint, plan: GenerationPlan, id: string, abort: AbortController,
    results: Array<Completion | undefined>, logDone: () => void): Promise<unknown> {
    let completions: Completion[];
    try {
      completions = await submitAll(endpoint, plan, id, abort, results, () => undefined);
    } finally {
      logDone();
    }
    const failed = completions.find((c) => c.finishReason === 'error');
    if (failed) throw new ApiError(500, `Generation failed: ${failed.error ?? 'unknown error'}`, 'server_error', null, 'generation_failed');
    if (completions.some((c) => c.finishReason === 'cancelled')) throw cancelledError();
    const createdAt = Math.floor(Date.now() / 1000);
    if (endpoint === 'completions') {
      return {
        id, object: 'text_completion', created: createdAt, model: model.id,
        choices: completions.map((c, index) => ({ index, text: c.text ?? '', logprobs: null, finish_reason: finishReason(c), token_ids: c.outputTokens })),
        usage: usage(completions),
      };
    }
    return {
      id, object: 'chat.completion', created: createdAt, model: model.id,
      choices: completions.map((c, index) => ({
        index, message: { role: 'assistant', content: c.text ?? '' }, logprobs: null, finish_reason: finishReason(c), token_ids: c.outputTokens,
      })),
      usage: usage(completions),
    };
  }

  async function stream(endpoint: Endpoint, plan: GenerationPlan, id: string, abort: AbortController, reply: FastifyReply,
    results: Array<Completion | undefined>, logDone: () => void): Promise<unknown> {
    const createdAt = Math.floor(Date.now() / 1000);
    const object = endpoint === 'chat' ? 'chat.completion.chunk' : 'text_completion';
    const sse = new PassThrough();
    sse.on('error', () => undefined); // destroyed when the client leaves; writes are guarded below
    const write = (data: string) => {
      if (!sse.destroyed && !sse.writableEnded) sse.write(`data: ${data}\n\n`);
    };
    const chunk = (choices: unknown[], extra: Record<string, unknown> = {}) =>
      write(JSON.stringify({ id, object, created: createdAt, model: model.id, choices, ...(plan.includeUsage ? { usage: null } : {}), ...extra }));
    const piece = (index: number, text: string, tokenIds: number[], finish: string | null) => (endpoint === 'chat'
      ? { index, delta: finish === null ? { content: text } : {}, logprobs: null, finish_reason: finish, token_ids: tokenIds }
      : { index, text, logprobs: null, finish_reason: finish, token_ids: tokenIds });

    let started = false;
    let onStart!: () => void;
    const startedSignal = new Promise<void>((resolve) => { onStart = resolve; });
    const start = () => {
      if (started) return;
      started = true;
      reply.code(200)
        .header('content-type', 'text/event-stream; charset=utf-8')
        .header('cache-control', 'no-cache')
        .header('x-accel-buffering', 'no');
      if (draining) reply.header('connection', 'close');
      void reply.send(sse);
      if (endpoint === 'chat') {
        chunk(plan.prompts.map((_, index) => ({ index, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null })));
      }
      onStart();
    };

    const guarded = (f: () => void) => {
      try {
        f();
      } catch {
        // Never let a write failure reach the engine: the request would end with an error.
      }
    };
    const finished = submitAll(endpoint, plan, id, abort, results, (i, token, text) => guarded(() => {
      start();
      chunk([piece(i, text, [token], null)]);
    }), (i, c) => guarded(() => {
      // Each choice's last chunk as soon as it finishes.
      if (c.finishReason === 'error' || c.finishReason === 'cancelled') return;
      start();
      chunk([piece(i, '', [], finishReason(c))]);
    }));

    const wait = delay(STREAM_HEADER_WAIT_MS);
    const first = await Promise.race([
      startedSignal.then(() => 'started' as const),
      finished.then(() => 'done' as const, (e: unknown) => ({ error: e })),
      wait.promise.then(() => 'waited' as const),
    ]);
    wait.cancel();
    if (typeof first === 'object' && !started) {
      logDone();
      throw first.error; // refused before any output: a plain JSON error with its status
    }
    start();

    void (async () => {
      let completions: Completion[] | undefined;
      let failure: ApiError | undefined;
      try {
        completions = await finished;
      } catch (e) {
        failure = toApiError(e);
        metrics.httpError(failure.status, failure.code);
      }
      logDone();
      const failed = completions?.find((c) => c.finishReason === 'error');
      if (failed) failure ??= new ApiError(500, `Generation failed: ${failed.error ?? 'unknown error'}`, 'server_error', null, 'generation_failed');
      if (completions?.some((c) => c.finishReason === 'cancelled')) failure ??= cancelledError();
      if (failure) write(JSON.stringify(failure.body()));
      if (plan.includeUsage && completions) chunk([], { usage: usage(completions) });
      write('[DONE]');
      sse.end();
    })();
    return reply;
  }

  const route = (endpoint: Endpoint) => (req: FastifyRequest, reply: FastifyReply) => generate(endpoint, req, reply);
  app.post('/v1/completions', route('completions'));
  app.post('/v1/chat/completions', route('chat'));

  app.get('/v1/models', async () => ({
    object: 'list',
    data: [{ id: model.id, object: 'model', created, owned_by: 'elasticmoe', max_model_len: model.maxPositions }],
  }));

  app.get('/health', async (_req, reply) => {
    const s = deployment.stats();
    const body = { status: draining ? 'draining' : 'ok', model: model.id, devices: deployment.layout().devices, waiting: s.waiting, running: s.running };
    return reply.code(draining ? 503 : 200).send(body);
  });

  app.get('/metrics', async (_req, reply) => {
    const text = await metrics.registry.metrics();
    return reply.header('content-type', metrics.registry.contentType).send(text);
  });

  // ---- admin

  app.get('/admin/layout', async (req) => {
    const q = parseBody(LayoutQuery, req.query);
    const layout = deployment.layout();
    const { placement, ...rest } = layout;
    const expertsPerDevice: Record<string, number> = {};
    for (const layer of placement ?? []) for (const holders of layer) for (const d of holders) expertsPerDevice[d] = (expertsPerDevice[d] ?? 0) + 1;
    return {
      model: model.id,
      ...rest,
      maxDevices: options.maxDevices ?? null,
      scaling: deployment.isScaling === true,
      canScale: typeof deployment.scale === 'function',
      expertsPerDevice,
      kvPools: deployment.kvPools?.() ?? [],
      ...(q.placement === 'true' || q.placement === '1' ? { placement: placement ?? null } : {}),
    };
  });

  app.post('/admin/scale', async (req) => {
    const body = parseBody(ScaleBody, req.body);
    if (typeof deployment.scale !== 'function') {
      throw new ApiError(501, 'Scaling is not available in this deployment: it serves one fixed layout (the in-process engine without the scaling orchestrator). '
        + 'Restart with other --devices to change them.', 'not_implemented_error', null, 'scaling_unavailable');
    }
    const devices = body.devices;
    if (devices.length === 0) throw badRequest('devices must name at least one device', 'devices', 'invalid_value');
    const bad = devices.findIndex((d, i) => d < 0 || (options.deviceCount !== undefined && d >= options.deviceCount) || devices.indexOf(d) !== i);
    if (bad >= 0) {
      const range = options.deviceCount !== undefined ? ` in 0..${options.deviceCount - 1}` : '';
      throw badRequest(`devices[${bad}] must be a distinct device ordinal${range} (got ${devices[bad]})`, `devices[${bad}]`, 'invalid_value');
    }
    if (options.maxDevices !== undefined && devices.length > options.maxDevices) {
      throw badRequest(`devices names ${devices.length} devices, more than --max-devices ${options.maxDevices}`, 'devices', 'invalid_value');
    }
    if (deployment.isScaling) throw new ApiError(409, 'A scale is already in progress: retry once it is done (GET /admin/layout shows "scaling")', 'conflict_error', null, 'scale_in_progress');
    const t0 = performance.now();
    let report;
    try {
      report = await deployment.scale(devices);
    } catch (e) {
      metrics.scaleEvents.inc({ result: 'failed' });
      const api = toApiError(e);
      if (api.status >= 500) throw new ApiError(500, `Scale failed and was rolled back (the old layout still serves): ${e instanceof Error ? e.message : String(e)}`, 'server_error', null, 'scale_failed');
      throw api;
    }
    const seconds = (performance.now() - t0) / 1000;
    metrics.scaleEvents.inc({ result: 'ok' });
    metrics.scaleDuration.observe(seconds);
    req.log.info({ from: report.from, to: report.to, ms: Math.round(report.ms) }, 'scaled');
    return { ...report, layout: deployment.layout() };
  });

  app.get('/admin/autoscaler', async () => {
    if (!autoscaler) {
      throw new ApiError(404, 'No autoscaler runs in this server: start it with --autoscale CONFIG.json (or --slo-ttft-ms and --slo-tpot-ms)',
        'not_found_error', null, 'autoscaler_disabled');
    }
    return autoscaler.report();
  });

  // ---- lifecycle

  return {
    app,
    metrics,
    async listen() {
      const url = await app.listen({ host: options.host ?? '127.0.0.1', port: options.port ?? 8000 });
      const address = app.server.address();
      const port = typeof address === 'object' && address ? address.port : options.port ?? 8000;
      const host = typeof address === 'object' && address ? address.address : options.host ?? '127.0.0.1';
      return { host, port, url };
    },
    close() {
      closing ??= (async () => {
        draining = true;
        autoscaler?.stop(); // no scale starts while draining
        const appClosed = app.close();
        const pending = () => Promise.all([...active].map((a) => a.closed));
        const wait = delay(drainTimeoutMs);
        const timedOut = await Promise.race([pending().then(() => false), wait.promise.then(() => true)]);
        wait.cancel();
        if (timedOut) {
          app.log.warn({ requests: active.size, drainTimeoutMs }, 'drain timed out: cancelling the requests still running');
          for (const a of active) a.abort.abort();
          await pending();
        }
        // Keep-alive connections left idle by the responses that just ended.
        app.server.closeAllConnections();
        await appClosed;
        metrics.dispose();
      })();
      return closing;
    },
    get draining() {
      return draining;
    },
    get inFlight() {
      return active.size;
    },
  };
}
