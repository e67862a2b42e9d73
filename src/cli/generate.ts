// `elasticmoe generate`: one prompt through the whole stack in one process —
// runtime, in-process HMM (weights from a checkpoint or a seeded synthetic fill,
// KV pools), the forward pass over a DP+EP layout with round-robin experts, and
// the request engine. Streams the completion to stdout and prints a timing line
// (load time, TTFT, tokens/s) to stderr.
import path from 'node:path';

import type { RuntimeOptionsInput } from '../runtime/config.js';
import { checkKvDtype } from '../model/kernels/index.js';
import { InvalidArgumentError } from '../runtime/errors.js';
import { Runtime } from '../runtime/runtime.js';
import { type LocalStack, loadModelFiles, startLocalStack } from '../serve/local.js';
import { parseDeviceList } from './hmm.js';
import { integerFlag, seedFlag } from './flags.js';
import { createProgressBar } from './progress.js';

export { kvBlocksFromMemory } from '../serve/local.js';

export interface GenerateCommandOptions {
  /** A Hugging Face model folder: config.json, *.safetensors, tokenizer.json (optional). */
  model?: string;
  /** A config.json: seeded synthetic weights of that shape instead of a checkpoint. */
  synthetic?: string;
  /** Folder of tokenizer.json (default: --model). */
  tokenizer?: string;
  /** "0,1": one DP rank per device, experts round robin over them (default "0"). */
  devices?: string;
  prompt?: string;
  /** "1,2,3" */
  promptIds?: string;
  /** Wrap --prompt as a user message through the chat template. */
  chat?: boolean;
  maxTokens?: string;
  seed?: string;
  /** KV blocks per device (default: sized from free device memory). */
  kvBlocks?: string;
  /** Token budget of one step per rank (default 512). */
  maxTokensPerStep?: string;
  /** KV cache element type: "bf16" (default) or "f32". */
  kvDtype?: string;
  ignoreEos?: boolean;
  json?: boolean;
  runtime: RuntimeOptionsInput;
}

function parseIds(text: string, vocab: number): number[] {
  const parts = text.split(',').map((s) => s.trim()).filter((s) => s.length > 0);
  const ids = parts.map(Number);
  const bad = parts.findIndex((s, i) => !/^\d+$/.test(s) || ids[i]! >= vocab);
  if (parts.length === 0 || bad >= 0) {
    throw new InvalidArgumentError('--prompt-ids', `comma-separated token ids below the vocabulary size ${vocab} (got '${bad >= 0 ? parts[bad] : text}')`);
  }
  return ids;
}

interface Streams {
  out: NodeJS.WritableStream;
  err: NodeJS.WritableStream;
}

export async function runGenerate(o: GenerateCommandOptions, { out, err }: Streams = { out: process.stdout, err: process.stderr }): Promise<number> {
  if ((o.prompt === undefined) === (o.promptIds === undefined)) throw new InvalidArgumentError('--prompt / --prompt-ids', 'exactly one of them');
  if (o.chat && o.prompt === undefined) throw new InvalidArgumentError('--chat', 'given with --prompt (it wraps the text as a user message)');
  const maxTokens = integerFlag('--max-tokens', o.maxTokens, 64, 1);
  const maxTokensPerStep = integerFlag('--max-tokens-per-step', o.maxTokensPerStep, 512, 1);
  const kvDtype = checkKvDtype('--kv-dtype', o.kvDtype ?? 'bf16');
  const seed = seedFlag('--seed', o.seed);

  const model = await loadModelFiles(o);
  const { config, tokenizer, tokenizerDir: tokDir } = model;
  let prompt: number[];
  if (o.prompt !== undefined) {
    if (!tokenizer) {
      throw new InvalidArgumentError('--prompt', `used with a tokenizer: ${tokDir === undefined ? 'synthetic weights have none (pass --tokenizer DIR)' : `${path.resolve(tokDir)} has no tokenizer.json`}; give token ids with --prompt-ids 1,2,3`);
    }
    prompt = o.chat ? tokenizer.encodeChat([{ role: 'user', content: o.prompt }]) : tokenizer.encode(o.prompt);
    if (prompt.length === 0) throw new InvalidArgumentError('--prompt', 'a text that encodes to at least one token');
    const bad = prompt.find((t) => t >= config.vocabSize);
    if (bad !== undefined) throw new InvalidArgumentError('--tokenizer', `a tokenizer of the model's vocabulary (token ${bad} >= vocab_size ${config.vocabSize})`);
  } else {
    prompt = parseIds(o.promptIds!, config.vocabSize);
  }
  if (prompt.length + maxTokens > config.maxPositions) {
    throw new InvalidArgumentError('--max-tokens', `at most ${Math.max(0, config.maxPositions - prompt.length)} (the prompt has ${prompt.length} tokens, max_position_embeddings is ${config.maxPositions})`);
  }

  const rt = Runtime.open(o.runtime);
  let stack: LocalStack | undefined;
  const abort = new AbortController();
  const onSigint = () => abort.abort();
  process.once('SIGINT', onSigint);
  try {
    const devices = parseDeviceList(o.devices ?? '0', rt.deviceCount);
    stack = await startLocalStack(rt, model, {
      devices,
      seed,
      maxTokensPerStep,
      kvDtype,
      ...(o.kvBlocks === undefined ? {} : { kvBlocks: integerFlag('--kv-blocks', o.kvBlocks, 1, 1) }),
      progress: (label) => createProgressBar(label, err),
      signal: abort.signal,
    });
    const { hmm, engine, loadMs } = stack;
    const streaming = !o.json;
    let first = true;
    const completion = await engine.submit({ prompt, maxTokens, ignoreEos: o.ignoreEos === true }, {
      signal: abort.signal,
      onToken: (token, text) => {
        if (!streaming) return;
        out.write(text ?? `${first ? '' : ' '}${token}`);
        first = false;
      },
    });
    const n = completion.outputTokens.length;
    const t = completion.timings;
    const decodeSeconds = t.tpotMs === null ? 0 : (t.tpotMs * (n - 1)) / 1000;
    if (o.json) {
      out.write(`${JSON.stringify({
        ...completion,
        backend: rt.backend,
        devices,
        kvBlocks: devices.map((d) => hmm.kv.info(d).blocks),
        kvDtype,
        loadMs,
        tokensPerSecond: n / (t.totalMs / 1000),
      }, null, 2)}\n`);
    } else {
      out.write('\n');
    }
    const ttft = t.ttftMs === null ? '-' : `${t.ttftMs.toFixed(1)} ms`;
    const decodeRate = decodeSeconds > 0 ? `, decode ${((n - 1) / decodeSeconds).toFixed(1)} tokens/s` : '';
    err.write(`generate: ${rt.backend}, devices ${devices.join(',')}: prompt ${prompt.length} tokens, ${n} generated (${completion.finishReason}`
      + `${completion.error ? `: ${completion.error}` : ''}); weights ${(loadMs / 1000).toFixed(2)} s; TTFT ${ttft}; `
      + `${(n / (t.totalMs / 1000)).toFixed(1)} tokens/s${decodeRate}\n`);
    return completion.finishReason === 'error' ? 1 : 0;
  } finally {
    process.off('SIGINT', onSigint);
    await stack?.close();
    rt.dispose();
  }
}
