// The tokenizer over a tiny hand-written byte-level BPE (test/fixtures/tokenizer):
// printable ASCII, Ġ (space), Ċ (newline), the two bytes of "é", a few merges
// ("hello", "Ġworld", "Ġthe", "café"), and ChatML special tokens.
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { Engine, type KvAllocator, type Stepper } from '../../src/executor/engine.js';
import { loadTokenizer } from '../../src/model/tokenizer.js';

const FIXTURE = path.resolve(__dirname, '../fixtures/tokenizer');
const vocab = JSON.parse(readFileSync(path.join(FIXTURE, 'tokenizer.json'), 'utf8')).model.vocab as Record<string, number>;
const tmp = mkdtempSync(path.join(os.tmpdir(), 'emoe-tok-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function folder(name: string, files: Record<string, string>): string {
  const dir = path.join(tmp, name);
  mkdirSync(dir, { recursive: true });
  for (const [f, text] of Object.entries(files)) writeFileSync(path.join(dir, f), text);
  return dir;
}

describe('tokenizer', () => {
  it('encodes with the BPE merges and decodes back to the same text', async () => {
    const t = (await loadTokenizer(FIXTURE))!;
    expect(t.encode('hello world')).toEqual([vocab.hello, vocab['Ġworld']]);
    expect(t.encode('the café')).toEqual([vocab.t, vocab.he, vocab['Ġ'], vocab['cafÃ©']]);
    for (const text of ['hello world', 'hello world!\nthe café, the world?', "it's 42 {x: [1, 2]}", '  spaced  out  ', 'é']) {
      const ids = t.encode(text);
      expect(ids.every((i) => Number.isInteger(i) && i >= 0 && i < t.vocabSize)).toBe(true);
      expect(t.decode(ids)).toBe(text);
    }
    expect(t.vocabSize).toBe(Object.keys(vocab).length + 3);
    // Half of a two-byte character decodes to U+FFFD.
    expect(t.decode([vocab['Ã']!])).toBe('\uFFFD');
    expect(t.decode([vocab['Ã']!, vocab['©']!])).toBe('é');
  });

  it('renders the chat template and encodes its special tokens', async () => {
    const t = (await loadTokenizer(FIXTURE))!;
    expect(t.hasChatTemplate).toBe(true);
    const messages = [{ role: 'system', content: 'be brief' }, { role: 'user', content: 'hello world' }];
    expect(t.applyChatTemplate(messages)).toBe('<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n');
    expect(t.applyChatTemplate(messages.slice(1), { addGenerationPrompt: false })).toBe('<|im_start|>user\nhello world<|im_end|>\n');
    const ids = t.encodeChat(messages.slice(1));
    const imStart = Object.keys(vocab).length + 1;
    const imEnd = imStart + 1;
    expect(ids[0]).toBe(imStart);
    expect(ids.filter((i) => i === imStart)).toHaveLength(2);
    expect(ids.filter((i) => i === imEnd)).toHaveLength(1);
    expect(ids.slice(ids.indexOf(vocab.hello!), ids.indexOf(imEnd))).toEqual([vocab.hello, vocab['Ġworld']]);
    expect(t.decode(ids)).toBe('user\nhello world\nassistant\n');
    expect(t.decode(ids, { skipSpecialTokens: false })).toBe('<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n');
    // EOS from tokenizer_config (<|im_end|>) and generation_config (<|im_end|>, <|endoftext|>).
    expect(new Set(t.eosTokenIds)).toEqual(new Set([imEnd, imStart - 1]));
  });

  it('prefers chat_template.jinja, takes the "default" of a template list, and says when there is none', async () => {
    const tokJson = readFileSync(path.join(FIXTURE, 'tokenizer.json'), 'utf8');
    const jinja = folder('jinja', {
      'tokenizer.json': tokJson,
      'tokenizer_config.json': JSON.stringify({ eos_token: { content: '<|endoftext|>' }, chat_template: 'IGNORED' }),
      'chat_template.jinja': '{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}',
    });
    const a = (await loadTokenizer(jinja))!;
    expect(a.applyChatTemplate([{ role: 'user', content: 'hi' }])).toBe('[user] hi>');
    expect(a.eosTokenIds).toEqual([Object.keys(vocab).length]);

    const list = folder('list', {
      'tokenizer.json': tokJson,
      'tokenizer_config.json': JSON.stringify({ chat_template: [{ name: 'tool_use', template: 'T' }, { name: 'default', template: 'D{{ messages | length }}' }] }),
    });
    expect((await loadTokenizer(list))!.applyChatTemplate([{ role: 'user', content: 'x' }])).toBe('D1');

    const none = folder('none', { 'tokenizer.json': tokJson });
    const n = (await loadTokenizer(none))!;
    expect(n.hasChatTemplate).toBe(false);
    expect(n.eosTokenIds).toEqual([]);
    expect(() => n.applyChatTemplate([{ role: 'user', content: 'x' }])).toThrow(/no chat template/);
  });

  it('returns undefined without tokenizer.json and fails clearly on a broken one', async () => {
    expect(await loadTokenizer(folder('empty', { 'config.json': '{}' }))).toBeUndefined();
    await expect(loadTokenizer(folder('bad', { 'tokenizer.json': '{ not json' }))).rejects.toThrow(/tokenizer\.json.*valid JSON/);
    await expect(loadTokenizer(folder('nomodel', { 'tokenizer.json': '{"version": "1.0"}' }))).rejects.toThrow(/"model" object/);
  });

  it('streams split UTF-8 through the engine: no half characters, the text adds up', async () => {
    const t = (await loadTokenizer(FIXTURE))!;
    // "hello", " world", the two bytes of "é", "!"
    const script = [vocab.hello!, vocab['Ġworld']!, vocab['Ã']!, vocab['©']!, vocab['!']!];
    const prompt = t.encode('the');
    const stepper: Stepper = {
      async step(batch) {
        const next = new Map<string, number>();
        for (const s of batch.ranks[0]!) if (s.sample) next.set(s.seqId, script[s.startPos + s.tokens.length - prompt.length]!);
        return { next, ms: 0, tokens: 0 };
      },
    };
    const kv: KvAllocator = { allocate: (_id, _d, n) => Array.from({ length: n }, (_, i) => i), free: () => undefined };
    const engine = new Engine({ stepper, kv, devices: [0], blockTokens: 16, decode: (ids) => t.decode(ids), eosTokenIds: t.eosTokenIds });
    const pieces: string[] = [];
    const c = await engine.submit({ prompt, maxTokens: 5 }, { onToken: (_tok, text) => pieces.push(text!) });
    expect(c.text).toBe('hello worldé!');
    expect(pieces).toEqual(['hello', ' world', '', 'é', '!']);
    const stopped = await engine.submit({ prompt, maxTokens: 5, stop: { strings: ['d\u00e9'] } });
    expect(stopped.text).toBe('hello worl');
    expect(stopped.outputTokens).toEqual(script.slice(0, 2));
  });
});
