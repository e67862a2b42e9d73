// The hand-written chunk batch check (the attach reply's hot path) against the zod
// schemas that state the same rules, on a valid batch and on one mutation per rule.
import { describe, expect, it } from 'vitest';
import { z } from 'zod';

import { ChunkBatchSchema, ManifestEntrySchema, WireHandleSchema, checkChunkBatch } from '../../src/hmm/protocol.js';

const zodBatch = z.object({ entries: z.array(ManifestEntrySchema), handles: z.array(WireHandleSchema) })
  .refine((b) => b.entries.length === b.handles.length);

function batch(): { entries: Array<Record<string, unknown>>; handles: Array<Record<string, unknown>> } {
  const tensor = (i: number) => ({ name: `t${i}`, dtype: 'bf16', shape: [4, 8], bytes: 64, offset: i * 256 });
  return {
    entries: [
      { id: 'L0.E0@0', group: 'L0.E0', device: 0, kind: 'weight', size: 2097152, tensors: [tensor(0), tensor(1)] },
      { id: 'kv@1#0', group: 'kv', device: 1, kind: 'kv', size: 4194304, tensors: [] },
    ],
    handles: [{ kind: 'fd', index: 0 }, { kind: 'acl', handle: '18446744073709551615' }],
  };
}

type Mutation = [string, (b: ReturnType<typeof batch>) => void, RegExp];
const mutations: Mutation[] = [
  ['not an object', (b) => Object.assign(b, { entries: 'x' }), /^entries: /],
  ['handle count', (b) => b.handles.pop(), /one handle per entry/],
  ['id', (b) => (b.entries[0]!.id = 7), /entries\[0\]\.id/],
  ['group', (b) => delete b.entries[1]!.group, /entries\[1\]\.group/],
  ['device', (b) => (b.entries[0]!.device = -1), /entries\[0\]\.device/],
  ['device fraction', (b) => (b.entries[0]!.device = 0.5), /entries\[0\]\.device/],
  ['kind', (b) => (b.entries[0]!.kind = 'dense'), /entries\[0\]\.kind/],
  ['size zero', (b) => (b.entries[1]!.size = 0), /entries\[1\]\.size/],
  ['tensors', (b) => (b.entries[0]!.tensors = {}), /entries\[0\]\.tensors/],
  ['tensor name', (b) => ((b.entries[0]!.tensors as Array<Record<string, unknown>>)[1]!.name = null), /tensors\[1\]\.name/],
  ['tensor dtype', (b) => ((b.entries[0]!.tensors as Array<Record<string, unknown>>)[0]!.dtype = 'bf17'), /tensors\[0\]\.dtype/],
  ['tensor shape', (b) => ((b.entries[0]!.tensors as Array<Record<string, unknown>>)[0]!.shape = [4, -8]), /tensors\[0\]\.shape/],
  ['tensor bytes', (b) => ((b.entries[0]!.tensors as Array<Record<string, unknown>>)[0]!.bytes = '64'), /tensors\[0\]\.bytes/],
  ['tensor offset', (b) => ((b.entries[0]!.tensors as Array<Record<string, unknown>>)[1]!.offset = -256), /tensors\[1\]\.offset/],
  ['fd index', (b) => (b.handles[0]!.index = 64), /handles\[0\]\.index/],
  ['acl handle', (b) => (b.handles[1]!.handle = '12x'), /handles\[1\]\.handle/],
  ['acl handle too long', (b) => (b.handles[1]!.handle = '1'.repeat(21)), /handles\[1\]\.handle/],
  ['handle kind', (b) => (b.handles[0]!.kind = 'pidfd'), /handles\[0\]\.kind/],
];

describe('the chunk batch check', () => {
  it('accepts what zod accepts and returns the value it checked (in place, unknown fields kept)', () => {
    const b = batch();
    (b.entries[0] as Record<string, unknown>).extra = 1;
    expect(zodBatch.safeParse(b).success).toBe(true);
    const ours = checkChunkBatch(b);
    expect(ours).toBe(b);
    expect(ChunkBatchSchema.parse(b)).toBe(b);
  });

  it.each(mutations)('refuses a bad %s as zod does, naming the field', (_, mutate, field) => {
    const b = batch();
    mutate(b);
    expect(zodBatch.safeParse(b).success).toBe(false);
    const ours = checkChunkBatch(b);
    expect(typeof ours).toBe('string');
    expect(ours).toMatch(field);
    expect(ChunkBatchSchema.safeParse(b).success).toBe(false);
  });
});
