// The OpenAI request bodies the server accepts (zod, strict: an unknown field is
// a 400) and what they become: a GenerationPlan of token-id prompts, an output
// budget and stop conditions. Only greedy decoding is implemented, so sampling
// parameters are accepted only at the values that mean greedy (temperature 0,
// top_p 1, n 1, no penalties, no logit bias), and refused otherwise with a
// message that says so. Extensions (as vLLM spells them): `ignore_eos`,
// `stop_token_ids`, `chat_template_kwargs`, `add_generation_prompt`; responses
// carry each choice's `token_ids`.
import { z } from 'zod';

import type { ServedModel } from './deployment.js';
import { ApiError, badRequest, fromZod } from './errors.js';

const int = z.number().int();

const common = {
  model: z.string().nullish(),
  max_tokens: int.nullish(),
  temperature: z.number().nullish(),
  top_p: z.number().nullish(),
  n: int.nullish(),
  stream: z.boolean().nullish(),
  stream_options: z.object({ include_usage: z.boolean().nullish() }).strict().nullish(),
  stop: z.union([z.string(), z.array(z.string())]).nullish(),
  stop_token_ids: z.array(int).nullish(),
  ignore_eos: z.boolean().nullish(),
  seed: int.nullish(),
  user: z.string().nullish(),
  presence_penalty: z.number().nullish(),
  frequency_penalty: z.number().nullish(),
  logit_bias: z.record(z.number()).nullish(),
};

export const CompletionBody = z.object({
  ...common,
  prompt: z.unknown(),
  logprobs: int.nullish(),
  echo: z.boolean().nullish(),
  best_of: int.nullish(),
  suffix: z.string().nullish(),
}).strict();

const TextPart = z.object({ type: z.literal('text'), text: z.string() }).strict();

const Message = z.object({
  role: z.enum(['system', 'developer', 'user', 'assistant', 'tool']),
  content: z.union([z.string(), z.array(TextPart)]).nullish(),
  name: z.string().nullish(),
}).strict();

export const ChatBody = z.object({
  ...common,
  messages: z.array(Message),
  max_completion_tokens: int.nullish(),
  logprobs: z.boolean().nullish(),
  top_logprobs: int.nullish(),
  add_generation_prompt: z.boolean().nullish(),
  chat_template_kwargs: z.record(z.unknown()).nullish(),
}).strict();

export const ScaleBody = z.object({ devices: z.array(int) }).strict();

export type CompletionBodyT = z.infer<typeof CompletionBody>;
export type ChatBodyT = z.infer<typeof ChatBody>;

export interface GenerationPlan {
  kind: 'completion' | 'chat';
  /** One prompt per choice (completions take a list of prompts; chat has one). */
  prompts: number[][];
  maxTokens: number;
  stream: boolean;
  /** Stream a last chunk with `usage` (stream_options.include_usage). */
  includeUsage: boolean;
  stop: { strings?: string[]; tokenIds?: number[] };
  ignoreEos: boolean;
}

export interface PlanLimits {
  /** max_tokens of /v1/completions when absent (OpenAI's default is 16). */
  completionMaxTokens: number;
  /** max_tokens of /v1/chat/completions when absent: this, or what the context leaves if less. */
  chatMaxTokens: number;
  /** Most prompts in one /v1/completions request. */
  maxPrompts: number;
}

export function parseBody<T extends z.ZodTypeAny>(schema: T, body: unknown): z.infer<T> {
  const r = schema.safeParse(body);
  if (!r.success) throw fromZod(r.error);
  return r.data;
}

const greedyOnly = (param: string, want: number, got: number, what = 'only greedy decoding is implemented') =>
  badRequest(`${param} must be ${want} or absent: ${what} (got ${got})`, param, 'unsupported_value');

/** The checks both endpoints share: model name, sampling parameters, stop conditions. */
function checkCommon(b: CompletionBodyT | ChatBodyT, model: ServedModel): Pick<GenerationPlan, 'stop' | 'stream' | 'includeUsage' | 'ignoreEos'> {
  if (b.model != null && b.model !== model.id) {
    throw new ApiError(404, `The model '${b.model}' does not exist: this server serves '${model.id}' (see GET /v1/models)`, 'not_found_error', 'model', 'model_not_found');
  }
  if (b.temperature != null && b.temperature !== 0) throw greedyOnly('temperature', 0, b.temperature);
  if (b.top_p != null && b.top_p !== 1) throw greedyOnly('top_p', 1, b.top_p);
  if (b.n != null && b.n !== 1) throw greedyOnly('n', 1, b.n, 'greedy decoding gives one completion per prompt');
  if (b.presence_penalty != null && b.presence_penalty !== 0) throw greedyOnly('presence_penalty', 0, b.presence_penalty, 'penalties are not implemented');
  if (b.frequency_penalty != null && b.frequency_penalty !== 0) throw greedyOnly('frequency_penalty', 0, b.frequency_penalty, 'penalties are not implemented');
  if (b.logit_bias != null && Object.keys(b.logit_bias).length > 0) throw badRequest('logit_bias is not implemented: leave it out or empty', 'logit_bias', 'unsupported_value');
  if (b.stream_options != null && b.stream !== true) throw badRequest('stream_options is only allowed when stream is true', 'stream_options', 'invalid_value');
  if (b.max_tokens != null && b.max_tokens < 1) throw badRequest(`max_tokens must be at least 1 (got ${b.max_tokens})`, 'max_tokens', 'invalid_value');

  const stop: GenerationPlan['stop'] = {};
  if (b.stop != null) {
    const strings = typeof b.stop === 'string' ? [b.stop] : b.stop;
    if (strings.length > 4) throw badRequest(`stop takes at most 4 strings (got ${strings.length})`, 'stop', 'invalid_value');
    if (strings.some((s) => s.length === 0)) throw badRequest('stop strings must not be empty', 'stop', 'invalid_value');
    if (strings.length > 0 && !model.tokenizer) {
      throw badRequest('stop strings need a tokenizer, and this model has none (synthetic weights): use stop_token_ids', 'stop', 'tokenizer_required');
    }
    if (strings.length > 0) stop.strings = strings;
  }
  if (b.stop_token_ids != null) {
    const bad = b.stop_token_ids.findIndex((t) => t < 0 || t >= model.vocabSize);
    if (bad >= 0) throw badRequest(`stop_token_ids[${bad}] must be a token id in 0..${model.vocabSize - 1} (got ${b.stop_token_ids[bad]})`, `stop_token_ids[${bad}]`, 'invalid_value');
    if (b.stop_token_ids.length > 0) stop.tokenIds = b.stop_token_ids;
  }
  return { stop, stream: b.stream === true, includeUsage: b.stream_options?.include_usage === true, ignoreEos: b.ignore_eos === true };
}

function checkIds(ids: number[], model: ServedModel, param: string): void {
  if (ids.length === 0) throw badRequest(`${param} must not be empty`, param, 'invalid_value');
  const bad = ids.findIndex((t) => !Number.isSafeInteger(t) || t < 0 || t >= model.vocabSize);
  if (bad >= 0) throw badRequest(`${param}[${bad}] must be a token id in 0..${model.vocabSize - 1} (got ${JSON.stringify(ids[bad])})`, `${param}[${bad}]`, 'invalid_value');
}

function contextError(model: ServedModel, prompt: number, completion: number, param: string): ApiError {
  return badRequest(`This model's maximum context length is ${model.maxPositions} tokens. However, you requested ${prompt + completion} tokens `
    + `(${prompt} in the ${param === 'messages' ? 'messages' : 'prompt'}, ${completion} for the completion). Please reduce the length of the ${param === 'messages' ? 'messages' : 'prompt'} or the completion.`,
  param, 'context_length_exceeded');
}

const isIdList = (v: unknown): v is number[] => Array.isArray(v) && v.every((x) => typeof x === 'number');

/** The prompts of a /v1/completions body: a string, strings, token ids, or lists of token ids. */
function completionPrompts(prompt: unknown, model: ServedModel, maxPrompts: number): number[][] {
  const tok = model.tokenizer;
  const encode = (text: string, param: string): number[] => {
    if (!tok) {
      throw badRequest(`This model has no tokenizer (synthetic weights): give ${param} as an array of token ids below ${model.vocabSize}, e.g. [1, 2, 3]`, param, 'tokenizer_required');
    }
    const ids = tok.encode(text);
    if (ids.length === 0) throw badRequest(`${param} must encode to at least one token`, param, 'invalid_value');
    return ids;
  };
  const shape = 'a string, an array of strings, an array of token ids, or an array of arrays of token ids';
  if (prompt === undefined) throw badRequest("Missing required parameter: 'prompt'", 'prompt', 'missing_required_parameter');
  let prompts: number[][];
  if (typeof prompt === 'string') {
    prompts = [encode(prompt, 'prompt')];
  } else if (Array.isArray(prompt)) {
    if (prompt.length === 0) throw badRequest('prompt must not be empty', 'prompt', 'invalid_value');
    if (isIdList(prompt)) {
      prompts = [prompt];
    } else if (prompt.every((p) => typeof p === 'string')) {
      prompts = (prompt as string[]).map((p, i) => encode(p, `prompt[${i}]`));
    } else if (prompt.every(isIdList)) {
      prompts = prompt as number[][];
    } else {
      throw badRequest(`Invalid type for 'prompt': expected ${shape}`, 'prompt', 'invalid_type');
    }
  } else {
    throw badRequest(`Invalid type for 'prompt': expected ${shape}`, 'prompt', 'invalid_type');
  }
  if (prompts.length > maxPrompts) throw badRequest(`prompt takes at most ${maxPrompts} prompts (got ${prompts.length})`, 'prompt', 'invalid_value');
  const single = prompts.length === 1 && !(Array.isArray(prompt) && prompt.length > 0 && typeof prompt[0] !== 'number');
  prompts.forEach((p, i) => checkIds(p, model, single ? 'prompt' : `prompt[${i}]`));
  return prompts;
}

export function planCompletion(body: unknown, model: ServedModel, limits: PlanLimits): GenerationPlan {
  const b = parseBody(CompletionBody, body);
  const common = checkCommon(b, model);
  if (b.logprobs != null) throw badRequest('logprobs are not implemented: leave logprobs out', 'logprobs', 'unsupported_value');
  if (b.echo === true) throw badRequest('echo is not implemented', 'echo', 'unsupported_value');
  if (b.best_of != null && b.best_of !== 1) throw greedyOnly('best_of', 1, b.best_of, 'greedy decoding gives one completion per prompt');
  if (b.suffix != null && b.suffix.length > 0) throw badRequest('suffix is not implemented', 'suffix', 'unsupported_value');
  const prompts = completionPrompts(b.prompt, model, limits.maxPrompts);
  const maxTokens = b.max_tokens ?? limits.completionMaxTokens;
  for (const p of prompts) if (p.length + maxTokens > model.maxPositions) throw contextError(model, p.length, maxTokens, 'prompt');
  return { kind: 'completion', prompts, maxTokens, ...common };
}

export function planChat(body: unknown, model: ServedModel, limits: PlanLimits): GenerationPlan {
  const b = parseBody(ChatBody, body);
  const common = checkCommon(b, model);
  if (b.logprobs === true) throw badRequest('logprobs are not implemented: leave logprobs out or false', 'logprobs', 'unsupported_value');
  if (b.top_logprobs != null) throw badRequest('top_logprobs is not implemented', 'top_logprobs', 'unsupported_value');
  if (b.max_completion_tokens != null && b.max_completion_tokens < 1) {
    throw badRequest(`max_completion_tokens must be at least 1 (got ${b.max_completion_tokens})`, 'max_completion_tokens', 'invalid_value');
  }
  if (b.messages.length === 0) throw badRequest('messages must contain at least one message', 'messages', 'invalid_value');
  const tok = model.tokenizer;
  if (!tok) {
    throw badRequest(`Chat needs a tokenizer with a chat template, and the model '${model.id}' has no tokenizer (synthetic weights): use /v1/completions with token ids`, 'messages', 'tokenizer_required');
  }
  if (!tok.hasChatTemplate) {
    throw badRequest(`Chat needs a chat template, and the tokenizer of '${model.id}' has none (tokenizer_config.json chat_template or chat_template.jinja): use /v1/completions`, 'messages', 'chat_template_required');
  }
  const messages = b.messages.map((m) => {
    const content = m.content == null ? '' : typeof m.content === 'string' ? m.content : m.content.map((p) => p.text).join('');
    return m.name != null ? { role: m.role, content, name: m.name } : { role: m.role, content };
  });
  let prompt: number[];
  try {
    prompt = tok.encodeChat(messages, { addGenerationPrompt: b.add_generation_prompt ?? true, ...(b.chat_template_kwargs ? { extra: b.chat_template_kwargs } : {}) });
  } catch (e) {
    throw badRequest(`The chat template could not render these messages: ${(e as Error).message}`, 'messages', 'invalid_value');
  }
  checkIds(prompt, model, 'messages');
  const asked = b.max_completion_tokens ?? b.max_tokens;
  const param = b.max_completion_tokens != null ? 'max_completion_tokens' : 'max_tokens';
  const maxTokens = asked ?? Math.min(limits.chatMaxTokens, model.maxPositions - prompt.length);
  if (maxTokens < 1 || prompt.length + maxTokens > model.maxPositions) {
    const e = contextError(model, prompt.length, Math.max(maxTokens, 1), 'messages');
    throw asked != null ? new ApiError(400, e.message, e.type, param, e.code) : e;
  }
  return { kind: 'chat', prompts: [prompt], maxTokens, ...common };
}
