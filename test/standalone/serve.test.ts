// The HTTP server (src/serve) on the mock backend: real servers on 127.0.0.1
// port 0, driven with fetch. Two in-process stacks of the tiny synthetic qwen3_moe
// (scripts/configs/tiny-qwen3-moe.json) on devices 0,1: one without a tokenizer
// (token ids only) and one with the test tokenizer fixture (its vocabulary of 116
// ids, ChatML template). Then the orchestrator's Deployment behind the admin
// scale route, and `elasticmoe serve` (compiled dist) as a child process for
// the SIGTERM drain.
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { createTokenizer } from '../../src/model/tokenizer.js';
import { parseConfig } from '../../src/model/config.js';
import type { Runtime } from '../../src/runtime/runtime.js';
import { Deployment } from '../../src/scaling/orchestrator.js';
import { type EngineDeployment, type ServingDeployment, localDeployment, scalableDeployment } from '../../src/serve/deployment.js';
import { type LocalStack, loadModelFiles, startLocalStack } from '../../src/serve/local.js';
import { type ServerHandle, createServer } from '../../src/serve/server.js';
import { MIB, openMock } from '../helpers/mock.js';

const ROOT = path.resolve(__dirname, '../..');
const TINY = path.join(ROOT, 'scripts/configs/tiny-qwen3-moe.json');
const TOKENIZER = path.join(ROOT, 'test/fixtures/tokenizer');
const KV_BLOCKS = 160;

const tmp = mkdtempSync(path.join(os.tmpdir(), 'emoe-serve-'));
const cleanups: Array<() => Promise<void> | void> = [];
afterAll(async () => {
  for (const c of cleanups.reverse()) await c();
  rmSync(tmp, { recursive: true, force: true });
});

interface Served {
  stack: LocalStack;
  dep: EngineDeployment;
  server: ServerHandle;
  url: string;
}

let rt: Runtime;
/** Token ids only (the tiny model, vocabulary 512). */
let ids: Served;
/** With the fixture tokenizer (the tiny model's shape with its vocabulary of 116). */
let text: Served;

async function serve(files: Awaited<ReturnType<typeof loadModelFiles>>, id: string): Promise<Served> {
  const stack = await startLocalStack(rt, files, { devices: [0, 1], kvBlocks: KV_BLOCKS, maxTokensPerStep: 256 });
  const dep = localDeployment(stack, { id });
  const server = createServer(dep, { port: 0, maxDevices: 4, deviceCount: rt.deviceCount, processMetrics: false });
  const { url } = await server.listen();
  cleanups.push(async () => {
    await server.close();
    await stack.close();
  });
  return { stack, dep, server, url };
}

beforeAll(async () => {
  rt = openMock({ mockCapacity: 512 * MIB });
  cleanups.push(() => rt.dispose());
  ids = await serve(await loadModelFiles({ synthetic: TINY }), 'tiny');
  const withVocab = path.join(tmp, 'tiny-116.json');
  writeFileSync(withVocab, JSON.stringify({ ...JSON.parse(readFileSync(TINY, 'utf8')), vocab_size: 116 }));
  text = await serve(await loadModelFiles({ synthetic: withVocab, tokenizer: TOKENIZER }), 'tiny-chat');
});

// ---- helpers

const post = (url: string, body: unknown, init: RequestInit = {}) =>
  fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: typeof body === 'string' ? body : JSON.stringify(body), ...init });

/** A response's JSON body (any: the tests check its shape). */
const json = async (res: Response | Promise<Response>): Promise<any> => (await res).json();

type SseEvent = Record<string, any> | '[DONE]';

/** Reads a server-sent event stream to its end; `onEvent` may return true to stop reading early. */
async function readSse(res: Response, onEvent?: (e: SseEvent) => boolean | void): Promise<SseEvent[]> {
  expect(res.headers.get('content-type')).toMatch(/^text\/event-stream/);
  const reader = res.body!.getReader();
  const decoder = new TextDecoder();
  const events: SseEvent[] = [];
  let buffer = '';
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut: number;
    while ((cut = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split('\n')) {
        if (!line.startsWith('data: ')) continue;
        const data = line.slice(6);
        const e: SseEvent = data === '[DONE]' ? '[DONE]' : JSON.parse(data);
        events.push(e);
        if (onEvent?.(e)) {
          await reader.cancel().catch(() => undefined);
          return events;
        }
      }
    }
  }
  return events;
}

const chunks = (events: SseEvent[]) => events.filter((e): e is Record<string, any> => e !== '[DONE]');
const streamedIds = (events: SseEvent[], index = 0) =>
  chunks(events).flatMap((e) => (e.choices ?? []).filter((c: any) => c.index === index).flatMap((c: any) => c.token_ids ?? []));

async function waitFor(check: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The value of one sample of a metric in Prometheus text ("name{labels} value"). */
function sample(metricsText: string, name: string, labels = ''): number {
  const prefix = `${name}${labels ? `{${labels}}` : ''} `;
  const line = metricsText.split('\n').find((l) => l.startsWith(prefix));
  return line === undefined ? NaN : Number(line.split(' ').pop());
}

const PROMPT = [1, 2, 3, 4, 5];

// ---- tests

describe('POST /v1/completions', () => {
  it('answers with the tokens the engine gives for the same request, with usage', async () => {
    const direct = await ids.dep.submit({ prompt: PROMPT, maxTokens: 12, ignoreEos: true });
    const res = await post(`${ids.url}/v1/completions`, { model: 'tiny', prompt: PROMPT, max_tokens: 12, ignore_eos: true, temperature: 0 });
    expect(res.status).toBe(200);
    const body = await json(res);
    expect(body).toMatchObject({ object: 'text_completion', model: 'tiny', usage: { prompt_tokens: 5, completion_tokens: 12, total_tokens: 17 } });
    expect(body.id).toMatch(/^cmpl-/);
    expect(body.choices).toHaveLength(1);
    expect(body.choices[0]).toMatchObject({ index: 0, finish_reason: 'length', logprobs: null, text: '' });
    expect(body.choices[0].token_ids).toEqual(direct.outputTokens);

    // A list of prompts: one choice each, in order.
    const other = [9, 8, 7];
    const both = await json(post(`${ids.url}/v1/completions`, { prompt: [PROMPT, other], max_tokens: 6, ignore_eos: true }));
    expect(both.choices.map((c: any) => c.index)).toEqual([0, 1]);
    expect(both.choices[0].token_ids).toEqual(direct.outputTokens.slice(0, 6));
    expect(both.choices[1].token_ids).toEqual((await ids.dep.submit({ prompt: other, maxTokens: 6, ignoreEos: true })).outputTokens);
    expect(both.usage).toEqual({ prompt_tokens: 8, completion_tokens: 12, total_tokens: 20 });
  });

  it('streams chunks that concatenate to the non-streaming result, then [DONE]', async () => {
    const req = { prompt: PROMPT, max_tokens: 12, ignore_eos: true };
    const whole = await json(post(`${ids.url}/v1/completions`, req));
    const res = await post(`${ids.url}/v1/completions`, { ...req, stream: true, stream_options: { include_usage: true } });
    expect(res.status).toBe(200);
    const events = await readSse(res);
    expect(events.at(-1)).toBe('[DONE]');
    expect(streamedIds(events)).toEqual(whole.choices[0].token_ids);
    const data = chunks(events);
    expect(data.every((e) => e.object === 'text_completion' && e.id === data[0]!.id)).toBe(true);
    const finish = data.flatMap((e) => e.choices).filter((c: any) => c.finish_reason !== null);
    expect(finish).toEqual([{ index: 0, text: '', logprobs: null, finish_reason: 'length', token_ids: [] }]);
    expect(data.at(-1)).toMatchObject({ choices: [], usage: whole.usage });
  });
});

describe('with a tokenizer', () => {
  const messages = [{ role: 'system', content: 'be brief' }, { role: 'user', content: [{ type: 'text', text: 'hello world' }] }];

  it('chat: the template applied, text and tokens, streamed deltas concatenate to the same content', async () => {
    const tok = text.stack.tokenizer!;
    const prompt = tok.encodeChat([{ role: 'system', content: 'be brief' }, { role: 'user', content: 'hello world' }]);
    const direct = await text.dep.submit({ prompt, maxTokens: 10, ignoreEos: true });

    const res = await post(`${text.url}/v1/chat/completions`, { model: 'tiny-chat', messages, max_tokens: 10, ignore_eos: true });
    expect(res.status).toBe(200);
    const body = await json(res);
    expect(body).toMatchObject({ object: 'chat.completion', model: 'tiny-chat', usage: { prompt_tokens: prompt.length, completion_tokens: 10 } });
    expect(body.id).toMatch(/^chatcmpl-/);
    const choice = body.choices[0];
    expect(choice).toMatchObject({ index: 0, finish_reason: 'length', message: { role: 'assistant' } });
    expect(choice.token_ids).toEqual(direct.outputTokens);
    expect(choice.message.content).toBe(direct.text);
    expect(choice.message.content).toBe(tok.decode(direct.outputTokens));

    const events = await readSse(await post(`${text.url}/v1/chat/completions`, { messages, max_completion_tokens: 10, ignore_eos: true, stream: true }));
    expect(events.at(-1)).toBe('[DONE]');
    const data = chunks(events);
    expect(data[0]).toMatchObject({ object: 'chat.completion.chunk', choices: [{ index: 0, delta: { role: 'assistant', content: '' } }] });
    expect(data.map((e) => e.choices[0]?.delta?.content ?? '').join('')).toBe(choice.message.content);
    expect(streamedIds(events)).toEqual(choice.token_ids);
    expect(data.at(-1)!.choices[0]).toMatchObject({ delta: {}, finish_reason: 'length' });
  });

  it('completions take text prompts and stop strings', async () => {
    const tok = text.stack.tokenizer!;
    const res = await json(post(`${text.url}/v1/completions`, { prompt: 'hello world', max_tokens: 24, ignore_eos: true }));
    const direct = await text.dep.submit({ prompt: tok.encode('hello world'), maxTokens: 24, ignoreEos: true });
    expect(res.choices[0].token_ids).toEqual(direct.outputTokens);
    expect(res.choices[0].text).toBe(direct.text);
    // Cut before a stop string taken from the middle of that text.
    const full: string = res.choices[0].text;
    const stop = [...full].slice(3, 5).join('');
    expect(stop.length).toBeGreaterThan(0);
    const cut = await json(post(`${text.url}/v1/completions`, { prompt: 'hello world', max_tokens: 24, ignore_eos: true, stop }));
    expect(cut.choices[0].finish_reason).toBe('stop');
    expect(cut.choices[0].text).toBe(full.slice(0, full.indexOf(stop)));
  });

  it('chat without a tokenizer, or without a chat template, is a 400 that says why', async () => {
    const none = await post(`${ids.url}/v1/chat/completions`, { messages });
    expect(none.status).toBe(400);
    expect((await json(none)).error).toMatchObject({ code: 'tokenizer_required', param: 'messages', message: expect.stringMatching(/no tokenizer.*\/v1\/completions/) });

    const tokenizerJson = JSON.parse(readFileSync(path.join(TOKENIZER, 'tokenizer.json'), 'utf8'));
    const plain = createTokenizer(tokenizerJson, {});
    const noTemplate: ServingDeployment = Object.create(text.dep, { model: { value: { ...text.dep.model, tokenizer: plain } } });
    const server = createServer(noTemplate, { port: 0, processMetrics: false });
    const { url } = await server.listen();
    try {
      const r = await post(`${url}/v1/chat/completions`, { messages });
      expect(r.status).toBe(400);
      expect((await json(r)).error).toMatchObject({ code: 'chat_template_required', message: expect.stringMatching(/chat template/) });
    } finally {
      await server.close();
    }
  });
});

describe('GET routes', () => {
  it('/v1/models, /health, /admin/layout', async () => {
    const models = await json(fetch(`${ids.url}/v1/models`));
    expect(models).toMatchObject({ object: 'list', data: [{ id: 'tiny', object: 'model', owned_by: 'elasticmoe', max_model_len: 2048 }] });
    const health = await fetch(`${ids.url}/health`);
    expect(health.status).toBe(200);
    expect(await json(health)).toMatchObject({ status: 'ok', model: 'tiny', devices: [0, 1] });
    const layout = await json(fetch(`${ids.url}/admin/layout`));
    expect(layout).toMatchObject({ devices: [0, 1], tp: 1, dp: 2, ep: 2, maxDevices: 4, canScale: false, scaling: false, expertsPerDevice: { 0: 32, 1: 32 } });
    expect(layout.kvPools).toEqual([0, 1].map((device) => ({ device, blocks: KV_BLOCKS, freeBlocks: KV_BLOCKS, blockBytes: expect.any(Number) })));
    expect(layout.placement).toBeUndefined();
    const full = await json(fetch(`${ids.url}/admin/layout?placement=true`));
    expect(full.placement).toHaveLength(4);
    expect(full.placement[0][5]).toEqual([1]);
  });

  it('/metrics: the expected names, with values that moved after requests', async () => {
    const before = await (await fetch(`${ids.url}/metrics`)).text();
    for (const name of [
      'elasticmoe_time_to_first_token_seconds', 'elasticmoe_time_per_output_token_seconds', 'elasticmoe_request_duration_seconds',
      'elasticmoe_queue_depth', 'elasticmoe_running_sequences', 'elasticmoe_generation_tokens_per_second', 'elasticmoe_generation_tokens_total',
      'elasticmoe_prompt_tokens_total', 'elasticmoe_devices', 'elasticmoe_max_devices', 'elasticmoe_device_memory_bytes', 'elasticmoe_kv_blocks',
      'elasticmoe_requests_total', 'elasticmoe_batch_size', 'elasticmoe_scale_events_total', 'elasticmoe_scale_duration_seconds', 'elasticmoe_http_errors_total',
      'elasticmoe_executor_recoveries',
    ]) {
      expect(before, name).toContain(`# TYPE ${name} `);
    }
    const count = (t: string, n: string) => sample(t, `${n}_count`);
    const tokens0 = sample(before, 'elasticmoe_generation_tokens_total');
    const length0 = sample(before, 'elasticmoe_requests_total', 'endpoint="completions",finish_reason="length"') || 0;
    const ttft0 = count(before, 'elasticmoe_time_to_first_token_seconds');
    const steps0 = count(before, 'elasticmoe_batch_size');
    await Promise.all([0, 1, 2].map((k) => post(`${ids.url}/v1/completions`, { prompt: [k + 1, 7], max_tokens: 8, ignore_eos: true }).then(json)));
    const after = await (await fetch(`${ids.url}/metrics`)).text();
    expect(sample(after, 'elasticmoe_generation_tokens_total')).toBe(tokens0 + 24);
    expect(sample(after, 'elasticmoe_requests_total', 'endpoint="completions",finish_reason="length"')).toBe(length0 + 3);
    expect(count(after, 'elasticmoe_time_to_first_token_seconds')).toBe(ttft0 + 3);
    expect(count(after, 'elasticmoe_batch_size')).toBeGreaterThan(steps0);
    expect(sample(after, 'elasticmoe_generation_tokens_per_second')).toBeGreaterThan(0);
    expect(sample(after, 'elasticmoe_devices')).toBe(2);
    expect(sample(after, 'elasticmoe_max_devices')).toBe(4);
    expect(sample(after, 'elasticmoe_queue_depth')).toBe(0);
    expect(sample(after, 'elasticmoe_running_sequences')).toBe(0);
    expect(sample(after, 'elasticmoe_device_memory_bytes', 'device="0",kind="weight"')).toBeGreaterThan(0);
    expect(sample(after, 'elasticmoe_device_memory_bytes', 'device="1",kind="kv"')).toBeGreaterThan(0);
    expect(sample(after, 'elasticmoe_kv_blocks', 'device="0",state="free"')).toBe(KV_BLOCKS);
  });
});

describe('bad requests', () => {
  const big = JSON.stringify({ prompt: [1], user: 'x'.repeat(1024 * 1024) });
  const cases: Array<[string, string, string | object, number, Record<string, unknown>, RequestInit?]> = [
    ['malformed JSON', '/v1/completions', '{"prompt": [1, 2', 400, { code: 'invalid_json' }],
    ['a body that is not an object', '/v1/completions', '[1, 2, 3]', 400, { code: 'invalid_body' }],
    ['an empty JSON body', '/v1/completions', '', 400, { code: 'invalid_json' }],
    ['an unknown field', '/v1/completions', { prompt: [1], max_tokens: 2, top_k: 5 }, 400, { code: 'unknown_parameter', param: 'top_k', message: 'Unrecognized request argument supplied: top_k' }],
    ['an unknown field in a message', '/v1/chat/completions', { messages: [{ role: 'user', content: 'hi', mood: 'x' }] }, 400, { param: 'messages[0].mood' }],
    ['a missing prompt', '/v1/completions', { max_tokens: 2 }, 400, { code: 'missing_required_parameter', param: 'prompt' }],
    ['missing messages', '/v1/chat/completions', {}, 400, { code: 'missing_required_parameter', param: 'messages' }],
    ['a bad role', '/v1/chat/completions', { messages: [{ role: 'robot', content: 'hi' }] }, 400, { param: 'messages[0].role' }],
    ['max_tokens 0', '/v1/completions', { prompt: [1], max_tokens: 0 }, 400, { param: 'max_tokens' }],
    ['max_tokens as a string', '/v1/completions', { prompt: [1], max_tokens: '5' }, 400, { param: 'max_tokens', code: 'invalid_type' }],
    ['max_tokens past the context', '/v1/completions', { prompt: [1, 2], max_tokens: 2047 }, 400, { code: 'context_length_exceeded', message: expect.stringMatching(/maximum context length is 2048 tokens.*2049 tokens/) }],
    ['a prompt over the context length', '/v1/completions', { prompt: Array.from({ length: 2048 }, () => 3), max_tokens: 1 }, 400, { code: 'context_length_exceeded' }],
    ['temperature above 0', '/v1/completions', { prompt: [1], temperature: 0.7 }, 400, { param: 'temperature', message: expect.stringMatching(/0 or absent: only greedy/) }],
    ['top_p below 1', '/v1/completions', { prompt: [1], top_p: 0.9 }, 400, { param: 'top_p' }],
    ['n above 1', '/v1/completions', { prompt: [1], n: 2 }, 400, { param: 'n' }],
    ['logprobs', '/v1/completions', { prompt: [1], logprobs: 2 }, 400, { param: 'logprobs' }],
    ['a token id outside the vocabulary', '/v1/completions', { prompt: [1, 512] }, 400, { param: 'prompt[1]', message: expect.stringMatching(/0\.\.511/) }],
    ['a negative token id', '/v1/completions', { prompt: [[1], [-1]] }, 400, { param: 'prompt[1][0]' }],
    ['an empty prompt', '/v1/completions', { prompt: [] }, 400, { param: 'prompt' }],
    ['a text prompt without a tokenizer', '/v1/completions', { prompt: 'hello' }, 400, { code: 'tokenizer_required' }],
    ['stop strings without a tokenizer', '/v1/completions', { prompt: [1], stop: 'x' }, 400, { code: 'tokenizer_required', param: 'stop' }],
    ['stream_options without stream', '/v1/completions', { prompt: [1], stream_options: { include_usage: true } }, 400, { param: 'stream_options' }],
    ['an unknown model', '/v1/completions', { model: 'gpt-4', prompt: [1] }, 404, { code: 'model_not_found', type: 'not_found_error' }],
    ['a body over 1 MiB', '/v1/completions', big, 413, { code: 'request_too_large' }],
    ['a wrong content type', '/v1/completions', '{"prompt": [1]}', 415, { code: 'unsupported_media_type' }, { headers: { 'content-type': 'text/plain' } }],
    ['an unknown route', '/v1/embeddings', { input: 'x' }, 404, { code: 'route_not_found' }],
    ['scale with a bad body', '/admin/scale', { devices: 'all' }, 400, { param: 'devices' }],
  ];

  it.each(cases)('%s → its 4xx with an OpenAI error body', async (_name, route, body, status, error, init) => {
    const res = await post(`${ids.url}${route}`, body, init);
    expect(res.status).toBe(status);
    const { error: e } = await json(res);
    expect(Object.keys(e).sort()).toEqual(['code', 'message', 'param', 'type']);
    expect(e).toMatchObject({ type: status === 404 ? 'not_found_error' : 'invalid_request_error', ...error });
  });

  it('keeps serving after all of them, and counts them', async () => {
    const res = await post(`${ids.url}/v1/completions`, { prompt: PROMPT, max_tokens: 3, ignore_eos: true });
    expect(res.status).toBe(200);
    expect((await json(res)).choices[0].token_ids).toHaveLength(3);
    const metrics = await (await fetch(`${ids.url}/metrics`)).text();
    expect(sample(metrics, 'elasticmoe_http_errors_total', 'status="400",code="invalid_json"')).toBeGreaterThanOrEqual(2);
    expect(sample(metrics, 'elasticmoe_http_errors_total', 'status="413",code="request_too_large"')).toBe(1);
  });
});

describe('clients', () => {
  it('a client that aborts mid-stream cancels its request and frees its KV blocks', async () => {
    const cancelled0 = ids.dep.stats().requestsCancelled;
    const abort = new AbortController();
    const res = await post(`${ids.url}/v1/completions`, { prompt: PROMPT, max_tokens: 1500, ignore_eos: true, stream: true }, { signal: abort.signal });
    let seen = 0;
    await readSse(res, (e) => e !== '[DONE]' && ++seen >= 20).catch(() => undefined);
    // Running, holding blocks on one device.
    expect(ids.dep.stats().running).toBe(1);
    expect(ids.dep.kvPools().some((p) => p.freeBlocks < p.blocks)).toBe(true);
    abort.abort();
    await waitFor(() => ids.dep.stats().requestsCancelled === cancelled0 + 1);
    expect(ids.dep.stats().running).toBe(0);
    expect(ids.dep.kvPools().map((p) => p.freeBlocks)).toEqual([KV_BLOCKS, KV_BLOCKS]);
    expect(ids.stack.hmm.kv.requests()).toEqual([]);
    expect(ids.server.inFlight).toBe(0);
    const metrics = await (await fetch(`${ids.url}/metrics`)).text();
    expect(sample(metrics, 'elasticmoe_requests_total', 'endpoint="completions",finish_reason="cancelled"')).toBe(1);
  });

  it('a non-streaming client that goes away cancels its request too', async () => {
    const cancelled0 = ids.dep.stats().requestsCancelled;
    const abort = new AbortController();
    const res = post(`${ids.url}/v1/completions`, { prompt: PROMPT, max_tokens: 1500, ignore_eos: true }, { signal: abort.signal });
    await waitFor(() => ids.dep.stats().running === 1);
    abort.abort();
    await expect(res).rejects.toThrow();
    await waitFor(() => ids.dep.stats().requestsCancelled === cancelled0 + 1);
    expect(ids.dep.kvPools().map((p) => p.freeBlocks)).toEqual([KV_BLOCKS, KV_BLOCKS]);
  });

  it('close() drains: a request still running at the drain timeout is cancelled, and its client told so', async () => {
    const server = createServer(ids.dep, { port: 0, drainTimeoutMs: 150, processMetrics: false });
    const { url } = await server.listen();
    let closed: Promise<void> | undefined;
    const events = await readSse(await post(`${url}/v1/completions`, { prompt: PROMPT, max_tokens: 1500, ignore_eos: true, stream: true }), () => {
      closed ??= server.close();
    });
    await closed;
    expect(server.draining).toBe(true);
    expect(events.at(-1)).toBe('[DONE]');
    expect(events.at(-2)).toMatchObject({ error: { code: 'cancelled', type: 'server_error' } });
    expect(streamedIds(events).length).toBeLessThan(1500);
    expect(ids.dep.stats().running).toBe(0);
    expect(ids.dep.kvPools().map((p) => p.freeBlocks)).toEqual([KV_BLOCKS, KV_BLOCKS]);
  });

  it('20 concurrent streaming clients all complete, each with its own tokens', async () => {
    const prompts = Array.from({ length: 20 }, (_, k) => Array.from({ length: 2 + (k % 7) }, (_, i) => (k * 37 + i * 11 + 1) % 512));
    const want = await Promise.all(prompts.map((prompt) => ids.dep.submit({ prompt, maxTokens: 16, ignoreEos: true })));
    const results = await Promise.all(prompts.map(async (prompt) => readSse(await post(`${ids.url}/v1/completions`, { prompt, max_tokens: 16, ignore_eos: true, stream: true }))));
    results.forEach((events, k) => {
      expect(events.at(-1), `client ${k}`).toBe('[DONE]');
      expect(streamedIds(events), `client ${k}`).toEqual(want[k]!.outputTokens);
    });
    expect(ids.dep.kvPools().map((p) => p.freeBlocks)).toEqual([KV_BLOCKS, KV_BLOCKS]);
  });
});

/** A server over the orchestrator's Deployment (tiny model, mock, starting on device 0). */
async function startScalable() {
  const config = parseConfig(JSON.parse(readFileSync(TINY, 'utf8')));
  const srt = openMock({ mockCapacity: 512 * MIB });
  const dep = await Deployment.start({ rt: srt, config, devices: [0], kvBlocksPerDevice: 128, maxTokensPerStep: 64 });
  const server = createServer(scalableDeployment(dep, { id: 'tiny' }), { port: 0, maxDevices: 3, deviceCount: srt.deviceCount, processMetrics: false });
  const { url } = await server.listen();
  return {
    dep,
    url,
    close: async () => {
      await server.close();
      await dep.close();
      srt.dispose();
    },
  };
}

describe('POST /admin/scale', () => {
  it('answers 501 when the deployment cannot scale', async () => {
    const res = await post(`${ids.url}/admin/scale`, { devices: [0, 1, 2] });
    expect(res.status).toBe(501);
    expect((await json(res)).error).toMatchObject({ type: 'not_implemented_error', code: 'scaling_unavailable', message: expect.stringMatching(/not available/) });
  });

  it('scales the orchestrator\'s Deployment while a client streams: the stream completes with the same tokens', async () => {
    const { dep, url, close } = await startScalable();
    try {
      const want = await dep.submit({ prompt: PROMPT, maxTokens: 120, ignoreEos: true });
      let scaled: Promise<Response> | undefined;
      const events = await readSse(await post(`${url}/v1/completions`, { prompt: PROMPT, max_tokens: 120, ignore_eos: true, stream: true }), (e) => {
        if (e !== '[DONE]' && !scaled) scaled = post(`${url}/admin/scale`, { devices: [0, 2] });
      });
      const res = await scaled!;
      expect(res.status).toBe(200);
      const report = await json(res);
      expect(report).toMatchObject({ from: [0], to: [0, 2], layout: { devices: [0, 2], dp: 2 } });
      // The stream was in flight at the switch-over.
      expect(report.switchover.kept + report.switchover.moved + report.switchover.requeued).toBe(1);
      expect(events.at(-1)).toBe('[DONE]');
      expect(streamedIds(events)).toEqual(want.outputTokens);
      const layout = await json(fetch(`${url}/admin/layout`));
      expect(layout).toMatchObject({ devices: [0, 2], canScale: true, scaling: false });
      expect(layout.kvPools.map((p: any) => p.device)).toEqual([0, 2]);
      // Too many devices, a repeated one, one absent from the node: 400, and nothing changed.
      for (const devices of [[0, 1, 2, 3], [0, 0], [0, 9]]) expect((await post(`${url}/admin/scale`, { devices })).status).toBe(400);
      const metrics = await (await fetch(`${url}/metrics`)).text();
      expect(sample(metrics, 'elasticmoe_scale_events_total', 'result="ok"')).toBe(1);
      expect(sample(metrics, 'elasticmoe_scale_duration_seconds_count')).toBe(1);
      expect(sample(metrics, 'elasticmoe_devices')).toBe(2);
    } finally {
      await close();
    }
  });

  it('scales up and then down through the admin route while several clients stream: every stream completes with its tokens', async () => {
    const { dep, url, close } = await startScalable();
    try {
      const want = await dep.submit({ prompt: PROMPT, maxTokens: 160, ignoreEos: true });
      let scales: Promise<any[]> | undefined;
      const streams = Array.from({ length: 4 }, (_, i) =>
        post(`${url}/v1/completions`, { prompt: PROMPT, max_tokens: 160, ignore_eos: true, stream: true }).then((r) =>
          readSse(r, (e) => {
            // Once the first stream is under way: up to two devices, then down to the other device only.
            if (i === 0 && e !== '[DONE]' && !scales) {
              scales = (async () => {
                const up = await json(await post(`${url}/admin/scale`, { devices: [0, 1] }));
                const down = await json(await post(`${url}/admin/scale`, { devices: [1] }));
                return [up, down];
              })();
            }
          })));
      const results = await Promise.all(streams);
      const [up, down] = await scales!;
      expect(up).toMatchObject({ from: [0], to: [0, 1] });
      expect(down).toMatchObject({ from: [0, 1], to: [1] });
      // Sequences on device 0 at the scale-down moved with their KV (or were recomputed), none dropped.
      expect(down.switchover.kept + down.switchover.moved + down.switchover.requeued + down.switchover.waiting).toBeGreaterThan(0);
      for (const events of results) {
        expect(events.at(-1)).toBe('[DONE]');
        expect(streamedIds(events)).toEqual(want.outputTokens);
      }
      expect((await json(fetch(`${url}/admin/layout`))).devices).toEqual([1]);
    } finally {
      await close();
    }
  });
});

describe('elasticmoe serve (child process)', () => {
  const cli = path.join(ROOT, 'dist/cli/main.js');
  let child: ChildProcess | undefined;
  afterAll(() => {
    if (child && child.exitCode === null) child.kill('SIGKILL');
  });

  it('on SIGTERM stops taking connections, finishes the request in flight, and exits 0', async () => {
    expect(existsSync(cli), 'build dist first: npx tsc -p .').toBe(true);
    child = spawn(process.execPath, [cli, 'serve', '--backend', 'mock', '--mock-capacity', '512MiB', '--devices', '0,1', '--port', '0'], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ELASTICMOE_NO_WARN_MOCK: '1' },
    });
    const logs: Array<Record<string, any>> = [];
    let stderr = '';
    let pending = '';
    child.stdout!.on('data', (d: Buffer) => {
      pending += d.toString();
      const lines = pending.split('\n');
      pending = lines.pop()!;
      for (const l of lines) if (l.trim()) logs.push(JSON.parse(l));
    });
    child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
    const exited = new Promise<number | null>((resolve) => child!.once('exit', (code) => resolve(code)));
    await waitFor(() => logs.some((l) => l.msg === 'serving') || child!.exitCode !== null, 10_000);
    const serving = logs.find((l) => l.msg === 'serving');
    expect(serving, stderr).toBeDefined();
    expect(serving).toMatchObject({ backend: 'mock', devices: [0, 1], model: 'tiny-qwen3-moe', tokenizer: false });
    expect(stderr).toMatch(/elasticmoe serve: http:\/\/127\.0\.0\.1:\d+ \(mock, devices 0,1, model tiny-qwen3-moe, no tokenizer/);
    const url: string = serving!.url;

    let signalled = false;
    const events = await readSse(await post(`${url}/v1/completions`, { prompt: PROMPT, max_tokens: 400, ignore_eos: true, stream: true }), (e) => {
      if (e !== '[DONE]' && !signalled) {
        signalled = true;
        child!.kill('SIGTERM');
      }
    });
    // The request in flight finished in full after the signal.
    expect(events.at(-1)).toBe('[DONE]');
    expect(streamedIds(events)).toHaveLength(400);
    expect(chunks(events).flatMap((e) => e.choices).find((c: any) => c.finish_reason)?.finish_reason).toBe('length');
    expect(await exited).toBe(0);
    expect(logs.map((l) => l.msg)).toEqual(expect.arrayContaining(['serving', 'draining', 'generation', 'stopped']));
    expect(logs.find((l) => l.msg === 'draining')).toMatchObject({ signal: 'SIGTERM', running: 1 });
    // Nothing listens any more.
    await expect(fetch(`${url}/health`)).rejects.toThrow();
  });
});
