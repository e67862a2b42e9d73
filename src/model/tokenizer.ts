// Text ↔ token ids for a Hugging Face model folder: tokenizer.json through
// @huggingface/tokenizers (a pure JS implementation of the Rust crate's
// pipeline), the chat template through @huggingface/jinja. Reads
// tokenizer_config.json (special tokens, chat_template), chat_template.jinja
// (newer models keep the template there) and generation_config.json (the EOS
// ids generation stops on) when present. A folder without tokenizer.json has
// no tokenizer: loadTokenizer returns undefined and callers work on ids only.
import { readFile } from 'node:fs/promises';
import path from 'node:path';

import { Template } from '@huggingface/jinja';
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';

import { InvalidArgumentError, NotFoundError } from '../runtime/errors.js';

export interface ChatMessage {
  role: string;
  content: string;
  [key: string]: unknown;
}

export interface ChatTemplateOptions {
  /** Append the assistant turn's opening (default true). */
  addGenerationPrompt?: boolean;
  /** More variables for the template (tools, documents, enable_thinking, ...). */
  extra?: Record<string, unknown>;
}

export interface TextTokenizer {
  /** Token ids of `text`; special tokens the post-processor adds (BOS, ...) are added unless addSpecialTokens is false. */
  encode(text: string, options?: { addSpecialTokens?: boolean }): number[];
  /** Text of `ids`; special tokens are skipped unless skipSpecialTokens is false. */
  decode(ids: readonly number[], options?: { skipSpecialTokens?: boolean }): string;
  /** The prompt text the chat template makes of `messages`; throws when the folder has no template. */
  applyChatTemplate(messages: readonly ChatMessage[], options?: ChatTemplateOptions): string;
  /** applyChatTemplate then encode, without adding special tokens again (the template has them). */
  encodeChat(messages: readonly ChatMessage[], options?: ChatTemplateOptions): number[];
  readonly hasChatTemplate: boolean;
  /** Ids that end generation: tokenizer_config's eos_token and generation_config's eos_token_id. */
  readonly eosTokenIds: number[];
  readonly bosTokenId: number | undefined;
  /** One more than the largest id (added tokens included). */
  readonly vocabSize: number;
}

export const TOKENIZER_FILE = 'tokenizer.json';

async function readJson(file: string, required: boolean): Promise<Record<string, unknown> | undefined> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    if (!required && (e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new InvalidArgumentError(path.basename(file), `a readable file (${file}: ${(e as Error).message})`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new InvalidArgumentError(path.basename(file), `valid JSON (${file}: ${(e as Error).message})`);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new InvalidArgumentError(path.basename(file), `a JSON object (${file})`);
  }
  return json as Record<string, unknown>;
}

/** A special token in tokenizer_config.json: a string or an AddedToken object `{ content }`. */
function tokenText(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (typeof v === 'object' && v !== null && typeof (v as { content?: unknown }).content === 'string') return (v as { content: string }).content;
  return undefined;
}

/** chat_template: a string, or a list of `{ name, template }` (the one named "default", else the first). */
function pickTemplate(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (Array.isArray(v)) {
    const named = v.filter((t): t is { name?: string; template: string } => typeof t?.template === 'string');
    return (named.find((t) => t.name === 'default') ?? named[0])?.template;
  }
  if (typeof v === 'object' && v !== null) {
    const o = v as Record<string, unknown>;
    return typeof o.default === 'string' ? o.default : undefined;
  }
  return undefined;
}

const ids = (v: unknown): number[] => (typeof v === 'number' ? [v] : Array.isArray(v) ? v.filter((x): x is number => Number.isInteger(x)) : []);

/** Loads DIR's tokenizer, or returns undefined when DIR has no tokenizer.json. */
export async function loadTokenizer(dir: string): Promise<TextTokenizer | undefined> {
  const tokenizerFile = path.join(dir, TOKENIZER_FILE);
  const json = await readJson(tokenizerFile, false);
  if (!json) return undefined;
  const config = (await readJson(path.join(dir, 'tokenizer_config.json'), false)) ?? {};
  const generation = (await readJson(path.join(dir, 'generation_config.json'), false)) ?? {};
  let jinja: string | undefined;
  try {
    jinja = await readFile(path.join(dir, 'chat_template.jinja'), 'utf8');
  } catch {
    jinja = undefined;
  }
  const chatJson = jinja === undefined ? await readJson(path.join(dir, 'chat_template.json'), false) : undefined;
  const templateText = jinja ?? pickTemplate(chatJson?.chat_template) ?? pickTemplate(config.chat_template);
  return createTokenizer(json, config, { generation, chatTemplate: templateText, source: tokenizerFile });
}

/** A tokenizer from already parsed tokenizer.json and tokenizer_config.json objects. */
export function createTokenizer(tokenizerJson: Record<string, unknown>, tokenizerConfig: Record<string, unknown> = {},
  more: { generation?: Record<string, unknown>; chatTemplate?: string; source?: string } = {}): TextTokenizer {
  const source = more.source ?? TOKENIZER_FILE;
  if (typeof tokenizerJson.model !== 'object' || tokenizerJson.model === null) {
    throw new InvalidArgumentError(source, 'a tokenizer.json with a "model" object');
  }
  let tok: HfTokenizer;
  try {
    tok = new HfTokenizer(tokenizerJson, tokenizerConfig);
  } catch (e) {
    throw new InvalidArgumentError(source, `a tokenizer @huggingface/tokenizers can load (${(e as Error).message})`);
  }
  const special: Record<string, string> = {};
  for (const k of ['bos_token', 'eos_token', 'pad_token', 'unk_token', 'sep_token', 'cls_token', 'mask_token']) {
    const t = tokenText(tokenizerConfig[k]);
    if (t !== undefined) special[k] = t;
  }
  const idOf = (t: string | undefined) => (t === undefined ? undefined : tok.token_to_id(t));
  const eos = new Set<number>(ids(more.generation?.eos_token_id));
  const eosFromConfig = idOf(special.eos_token);
  if (eosFromConfig !== undefined) eos.add(eosFromConfig);
  const bosTokenId = idOf(special.bos_token) ?? ids(more.generation?.bos_token_id)[0];

  let template: Template | undefined;
  if (more.chatTemplate !== undefined) {
    try {
      template = new Template(more.chatTemplate);
    } catch (e) {
      throw new InvalidArgumentError('chat_template', `a template @huggingface/jinja can parse (${(e as Error).message})`);
    }
  }
  let vocabSize: number | undefined;

  const self: TextTokenizer = {
    encode(text, options = {}) {
      return tok.encode(text, { add_special_tokens: options.addSpecialTokens ?? true }).ids;
    },
    decode(list, options = {}) {
      if (list.length === 0) return '';
      return tok.decode([...list], { skip_special_tokens: options.skipSpecialTokens ?? true });
    },
    applyChatTemplate(messages, options = {}) {
      if (!template) throw new NotFoundError('NOT_FOUND', `${source}: the model folder has no chat template (tokenizer_config.json chat_template or chat_template.jinja)`);
      // (raise_exception is built into @huggingface/jinja: a template's own refusal throws an Error with its message.)
      return template.render({
        ...special,
        ...options.extra,
        messages,
        add_generation_prompt: options.addGenerationPrompt ?? true,
      });
    },
    encodeChat(messages, options) {
      return self.encode(self.applyChatTemplate(messages, options), { addSpecialTokens: false });
    },
    hasChatTemplate: template !== undefined,
    eosTokenIds: [...eos],
    bosTokenId,
    get vocabSize() {
      if (vocabSize === undefined) {
        let max = -1;
        for (const id of tok.get_vocab(true).values()) if (id > max) max = id;
        vocabSize = max + 1;
      }
      return vocabSize;
    },
  };
  return self;
}
