// The wire protocol between the HMM daemon and its clients (executors, the
// coordinator, tools). One JSON object per UnixChannel message:
//   request   { id, op, ...args }                     id: a positive integer chosen by the client
//   response  { id, ok: true, result }                 the reply to request `id`
//             { id, ok: false, error: { code, message, ... } }
//             { id, ok: true, partial: true, entries, handles }   (attach only: a batch before the final reply)
// A response with id 0 is about the connection, not a request (e.g. FORBIDDEN
// right after connecting, or an unreadable message whose id could not be read).
// Chunk handles travel as SCM_RIGHTS descriptors attached to the message that
// names them (cuda, mock) or as decimal strings of the ACL shareable handle.
import { z } from 'zod';

import { type DType, DTYPES } from './dtype.js';
import type { ChunkManifestEntry, HmmManifest } from './hmm.js';
import type { TensorLocation } from './placement.js';

/** Requests larger than this are refused with TOO_LARGE (responses may be larger: a manifest can be). */
export const MAX_MESSAGE_BYTES = 1024 * 1024;
/** Descriptors per attach message: keeps both processes far from their fd limits. */
export const MAX_FDS_PER_MESSAGE = 64;
/** The id of responses that belong to no request. */
export const CONNECTION_ID = 0;

/** Codes a daemon puts on the wire. */
export const WIRE_ERROR_CODES = [
  'BAD_REQUEST',
  'TOO_LARGE',
  'NOT_FOUND',
  'INVALID_ARGUMENT',
  'OUT_OF_MEMORY',
  'NOT_SUPPORTED',
  'FORBIDDEN',
  'INTERNAL',
] as const;
export type WireErrorCode = (typeof WIRE_ERROR_CODES)[number];
/** Codes a client reports without a daemon reply: no reply in time, a dropped connection, a reply it cannot read. */
export type ClientErrorCode = 'TIMEOUT' | 'DISCONNECTED' | 'BAD_RESPONSE';

/** An error the daemon or the client reports by protocol code (where no runtime error class fits). */
export class HmmProtocolError extends Error {
  constructor(readonly code: WireErrorCode | ClientErrorCode | (string & {}), message: string) {
    super(message);
    this.name = 'HmmProtocolError';
  }
}

// ---- values shared by requests and results ----

const positiveInt = z.number().int().positive().max(Number.MAX_SAFE_INTEGER);
const requestId = positiveInt;
const device = z.number().int().min(0).max(4095);
const chunkId = z.string().min(1).max(1024);
const kvRequest = z.string().min(1).max(1024);
const dtype = z.enum(Object.keys(DTYPES) as [DType, ...DType[]]);

const TensorLocationSchema = z.object({
  name: z.string(),
  dtype,
  shape: z.array(z.number().int().min(0)),
  bytes: z.number().int().min(0),
  offset: z.number().int().min(0),
});

export const ManifestEntrySchema: z.ZodType<ChunkManifestEntry> = z.object({
  id: z.string(),
  group: z.string(),
  device: z.number().int().min(0),
  kind: z.enum(['weight', 'kv', 'workspace']),
  size: positiveInt,
  tensors: z.array(TensorLocationSchema),
});

/** How one chunk's handle travels: an index into the message's descriptors, or an ACL handle in decimal. */
export const WireHandleSchema = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('fd'), index: z.number().int().min(0).max(MAX_FDS_PER_MESSAGE - 1) }),
  z.object({ kind: z.literal('acl'), handle: z.string().regex(/^\d{1,20}$/) }),
]);
export type WireHandle = z.infer<typeof WireHandleSchema>;

/** Chunk entries with their handles, aligned by index. */
export interface ChunkBatch {
  entries: ChunkManifestEntry[];
  handles: WireHandle[];
}

const DTYPE_NAMES = new Set<string>(Object.keys(DTYPES));
const KINDS = new Set<string>(['weight', 'kv', 'workspace']);
const isIndex = (v: unknown, min = 0, max = Number.MAX_SAFE_INTEGER): v is number =>
  typeof v === 'number' && Number.isInteger(v) && v >= min && v <= max;
const isRecord = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/**
 * Checks a chunk batch (the attach reply and its partial batches) by hand, with the
 * rules the zod schemas above state for its parts (ManifestEntrySchema,
 * WireHandleSchema), and returns it. An attach carries one entry per tensor of the model (tens of thousands); zod's
 * per-object cost in a fresh process was most of a slab attach (~130 ms of 148 ms,
 * H200), this loop is a small fraction of it. Returns a message naming the first bad
 * field instead when the batch is malformed. Unlike zod, it keeps unknown fields (the
 * value is checked in place, not copied).
 */
export function checkChunkBatch(v: unknown): ChunkBatch | string {
  if (!isRecord(v)) return 'expected an object';
  const { entries, handles } = v;
  if (!Array.isArray(entries)) return 'entries: expected an array';
  if (!Array.isArray(handles)) return 'handles: expected an array';
  if (entries.length !== handles.length) return 'handles: one handle per entry';
  for (let i = 0; i < entries.length; i++) {
    const e: unknown = entries[i];
    const at = `entries[${i}]`;
    if (!isRecord(e)) return `${at}: expected an object`;
    if (typeof e.id !== 'string') return `${at}.id: expected a string`;
    if (typeof e.group !== 'string') return `${at}.group: expected a string`;
    if (!isIndex(e.device)) return `${at}.device: expected a non-negative integer`;
    if (typeof e.kind !== 'string' || !KINDS.has(e.kind)) return `${at}.kind: expected 'weight', 'kv' or 'workspace'`;
    if (!isIndex(e.size, 1)) return `${at}.size: expected a positive integer`;
    if (!Array.isArray(e.tensors)) return `${at}.tensors: expected an array`;
    const tensors: unknown[] = e.tensors;
    for (let j = 0; j < tensors.length; j++) {
      const t = tensors[j];
      const tat = `${at}.tensors[${j}]`;
      if (!isRecord(t)) return `${tat}: expected an object`;
      if (typeof t.name !== 'string') return `${tat}.name: expected a string`;
      if (typeof t.dtype !== 'string' || !DTYPE_NAMES.has(t.dtype)) return `${tat}.dtype: expected one of ${[...DTYPE_NAMES].join(', ')}`;
      const shape = t.shape;
      if (!Array.isArray(shape)) return `${tat}.shape: expected an array of non-negative integers`;
      for (let k = 0; k < shape.length; k++) if (!isIndex(shape[k])) return `${tat}.shape: expected an array of non-negative integers`;
      if (!isIndex(t.bytes)) return `${tat}.bytes: expected a non-negative integer`;
      if (!isIndex(t.offset)) return `${tat}.offset: expected a non-negative integer`;
    }
  }
  for (let i = 0; i < handles.length; i++) {
    const h: unknown = handles[i];
    const at = `handles[${i}]`;
    if (!isRecord(h)) return `${at}: expected an object`;
    if (h.kind === 'fd') {
      if (!isIndex(h.index, 0, MAX_FDS_PER_MESSAGE - 1)) return `${at}.index: expected an integer in 0..${MAX_FDS_PER_MESSAGE - 1}`;
    } else if (h.kind === 'acl') {
      if (typeof h.handle !== 'string' || !/^\d{1,20}$/.test(h.handle)) return `${at}.handle: expected up to 20 decimal digits`;
    } else {
      return `${at}.kind: expected 'fd' or 'acl'`;
    }
  }
  // Checked in place: the parsed JSON is the batch (copying ~19,000 entries cost more than checking them).
  return v as unknown as ChunkBatch;
}

/** A chunk batch as a zod schema, checked by checkChunkBatch. */
export const ChunkBatchSchema = z.unknown().transform((v, ctx): ChunkBatch => {
  const r = checkChunkBatch(v);
  if (typeof r !== 'string') return r;
  ctx.addIssue({ code: z.ZodIssueCode.custom, message: r });
  return z.NEVER;
});

const KvPoolInfoSchema = z.object({
  device: z.number().int(),
  blockBytes: z.number().int(),
  blocks: z.number().int(),
  blocksPerChunk: z.number().int(),
  chunkIds: z.array(z.string()),
  freeBlocks: z.number().int(),
});

export const ManifestSchema: z.ZodType<HmmManifest> = z.object({
  backend: z.string(),
  deviceCount: z.number().int(),
  granularity: z.number().int(),
  chunks: z.array(ManifestEntrySchema),
  kvPools: z.array(KvPoolInfoSchema),
});

const BlockTableSchema = z.object({ device: z.number().int(), blocks: z.array(z.number().int()) });

const DeviceAccountingSchema = z.object({
  device: z.number().int(),
  weightBytes: z.number(),
  kvBytes: z.number(),
  workspaceBytes: z.number(),
  spareBytes: z.number(),
  freeBytes: z.number(),
  totalBytes: z.number(),
});

// ---- requests: the arguments of each op (the envelope adds id and op) ----

export const REQUEST_SCHEMAS = {
  hello: z.object({ pid: positiveInt, name: z.string().max(256).optional() }).strict(),
  /** tensors: false leaves each chunk's tensor list out (empty): a fraction of the bytes, for a client that attaches by id. */
  manifest: z.object({ tensors: z.boolean().optional() }).strict(),
  attach: z.object({ ids: z.array(chunkId).optional() }).strict(),
  detach: z.object({ ids: z.array(chunkId).optional() }).strict(),
  workspace: z.object({ device, size: positiveInt }).strict(),
  'kv.allocate': z.object({ request: kvRequest, device, count: z.number().int().min(0).max(1 << 24) }).strict(),
  'kv.free': z.object({ request: kvRequest }).strict(),
  'kv.table': z.object({ request: kvRequest }).strict(),
  checksum: z
    .object({ tensor: z.string().min(1).max(1024).optional(), chunk: chunkId.optional() })
    .strict()
    .refine((a) => (a.tensor === undefined) !== (a.chunk === undefined), { message: 'give exactly one of tensor or chunk', path: ['tensor'] }),
  stats: z.object({}).strict(),
  ping: z.object({}).strict(),
} as const;

export type Op = keyof typeof REQUEST_SCHEMAS;
export const OPS = Object.keys(REQUEST_SCHEMAS) as Op[];
export type RequestArgs<O extends Op> = z.input<(typeof REQUEST_SCHEMAS)[O]>;
export type Request = { [O in Op]: { id: number; op: O } & z.output<(typeof REQUEST_SCHEMAS)[O]> }[Op];

// ---- results of each op ----

export const HelloResultSchema = z.object({
  session: z.string(),
  backend: z.string(),
  deviceCount: z.number().int(),
  granularity: z.number().int(),
  /** The daemon's pid. */
  pid: z.number().int(),
});
export type HelloResult = z.infer<typeof HelloResultSchema>;

export const StatsSchema = z.object({
  devices: z.array(DeviceAccountingSchema),
  sessions: z.number().int(),
  chunks: z.number().int(),
  kvRequests: z.number().int(),
});
export type HmmStats = z.infer<typeof StatsSchema>;

export const RESULT_SCHEMAS = {
  hello: HelloResultSchema,
  manifest: ManifestSchema,
  /** The last batch; earlier ones came as partial messages. */
  attach: ChunkBatchSchema,
  detach: z.object({ freed: z.array(z.string()) }),
  workspace: z.object({ entry: ManifestEntrySchema, handle: WireHandleSchema }),
  'kv.allocate': z.object({ blocks: z.array(z.number().int()) }),
  'kv.free': z.object({}),
  'kv.table': z.object({ table: BlockTableSchema.nullable() }),
  checksum: z.object({ checksum: z.string().regex(/^\d+$/) }),
  stats: StatsSchema,
  ping: z.object({}),
} as const satisfies Record<Op, z.ZodTypeAny>;
export type Result<O extends Op> = z.output<(typeof RESULT_SCHEMAS)[O]>;

// ---- responses ----

export const WireErrorSchema = z.object({
  code: z.string(),
  message: z.string(),
  /** INVALID_ARGUMENT: the argument's name. */
  argument: z.string().optional(),
  /** The daemon-side error class, e.g. KvExhaustedError. */
  name: z.string().optional(),
  /** The backend's code name when a backend call failed, e.g. CUDA_ERROR_OUT_OF_MEMORY. */
  codeName: z.string().optional(),
});
export type WireError = z.infer<typeof WireErrorSchema>;

const responseId = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);
export const PartialResponseSchema = z.object({
  id: responseId,
  ok: z.literal(true),
  partial: z.literal(true),
  entries: z.unknown(),
  handles: z.unknown(),
}).transform((m, ctx) => {
  const batch = checkChunkBatch({ entries: m.entries, handles: m.handles });
  if (typeof batch !== 'string') return { id: m.id, ok: m.ok, partial: m.partial, ...batch };
  ctx.addIssue({ code: z.ZodIssueCode.custom, message: batch });
  return z.NEVER;
});
export const ResponseSchema = z.union([
  PartialResponseSchema,
  z.object({ id: responseId, ok: z.literal(true), result: z.unknown() }),
  z.object({ id: responseId, ok: z.literal(false), error: WireErrorSchema }),
]);
export type WireResponse = z.infer<typeof ResponseSchema>;
export type PartialResponse = z.infer<typeof PartialResponseSchema>;

// ---- encoding and parsing ----

export function encode(message: object): Buffer {
  return Buffer.from(JSON.stringify(message), 'utf8');
}

/** "ids[3]" from a zod issue path; "request" for the whole message. */
export function fieldName(path: ReadonlyArray<string | number>): string {
  let out = '';
  for (const p of path) out += typeof p === 'number' ? `[${p}]` : out ? `.${p}` : p;
  return out || 'request';
}

/**
 * The id of a request whose body could not be read (too large, bad JSON), when
 * it starts the object as clients write it (`{"id":7,...`); 0 otherwise. Only
 * the first bytes are looked at, so an oversized message is never parsed.
 */
export function peekRequestId(data: Uint8Array): number {
  const head = Buffer.from(data.buffer, data.byteOffset, Math.min(64, data.byteLength)).toString('latin1');
  const m = /^\s*\{\s*"id"\s*:\s*(\d{1,15})\s*[,}]/.exec(head);
  return m ? Number(m[1]) : CONNECTION_ID;
}

export type ParsedRequest = { ok: true; request: Request } | { ok: false; id: number; error: WireError };

function badRequest(id: number, message: string): ParsedRequest {
  return { ok: false, id, error: { code: 'BAD_REQUEST', message } };
}

/** Validates one request message: size, JSON, envelope, op, then the op's arguments. */
export function parseRequest(data: Uint8Array): ParsedRequest {
  if (data.byteLength > MAX_MESSAGE_BYTES) {
    return {
      ok: false,
      id: peekRequestId(data),
      error: { code: 'TOO_LARGE', message: `request of ${data.byteLength} bytes exceeds the limit of ${MAX_MESSAGE_BYTES} bytes` },
    };
  }
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString('utf8'));
  } catch (e) {
    return badRequest(peekRequestId(data), `request is not valid JSON: ${(e as Error).message}`);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) return badRequest(CONNECTION_ID, 'request must be a JSON object');
  const { id: rawId, op, ...args } = json as Record<string, unknown>;
  const idCheck = requestId.safeParse(rawId);
  if (!idCheck.success) return badRequest(CONNECTION_ID, `bad request: id: ${idCheck.error.issues[0]?.message ?? 'invalid'} (a positive integer)`);
  const id = idCheck.data;
  if (typeof op !== 'string') return badRequest(id, 'bad request: op: expected a string');
  if (!Object.prototype.hasOwnProperty.call(REQUEST_SCHEMAS, op)) {
    return badRequest(id, `bad request: op: unknown op '${op.slice(0, 64)}' (known: ${OPS.join(', ')})`);
  }
  const parsed = REQUEST_SCHEMAS[op as Op].safeParse(args);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const field = issue.code === 'unrecognized_keys' ? issue.keys.join(', ') : fieldName(issue.path);
    return badRequest(id, `bad request: ${op}: ${field}: ${issue.message}`);
  }
  return { ok: true, request: { id, op, ...parsed.data } as Request };
}
