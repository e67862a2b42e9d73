// Safetensors checkpoints: parse the header of each file (never the data), check
// it against the format's rules, and gather a model folder — sharded with
// `model.safetensors.index.json`, a single `model.safetensors`, or every
// `*.safetensors` — into one map of tensor name → where its bytes lie. The weight
// loader then reads exactly those byte ranges. Every error names the file and,
// where there is one, the tensor, because a checkpoint with thousands of tensors
// in dozens of shards is otherwise hopeless to debug.
//
// File layout: u64 little-endian header length N, N bytes of UTF-8 JSON
// { name: { dtype, shape, data_offsets: [begin, end] }, __metadata__?: {..} },
// then the data section; offsets are relative to the start of the data section.
import type { FileHandle } from 'node:fs/promises';
import { open, readFile, readdir, stat } from 'node:fs/promises';
import path from 'node:path';

import { ElasticMoeError, type ErrorCode } from '../runtime/errors.js';
import { type DType, DTYPES, dtypeBytes, fromSafetensors, isDType, numel } from './dtype.js';

/** The reference implementation refuses headers above 100 MB: a larger one is garbage, not a model. */
export const MAX_HEADER_BYTES = 100_000_000;
export const INDEX_FILE = 'model.safetensors.index.json';
export const SINGLE_FILE = 'model.safetensors';

/** A checkpoint that cannot be used as it is: names the file and, when known, the tensor. */
export class CheckpointError extends ElasticMoeError {
  constructor(code: Extract<ErrorCode, 'INVALID_ARGUMENT' | 'NOT_FOUND'>, message: string,
    readonly file: string, readonly tensor?: string) {
    super(code, message);
  }
}

function invalid(file: string, message: string, tensor?: string): CheckpointError {
  const where = tensor === undefined ? file : `${file}, tensor '${tensor}'`;
  return new CheckpointError('INVALID_ARGUMENT', `${where}: ${message}`, file, tensor);
}

export interface CheckpointTensor {
  name: string;
  /** Absolute path of the file holding the tensor. */
  file: string;
  dtype: DType;
  shape: number[];
  /** Absolute byte offset of the tensor's first byte in `file`. */
  dataStart: number;
  bytes: number;
}

export interface SafetensorsFile {
  path: string;
  /** File size in bytes, as seen when the header was read. */
  size: number;
  /** N, the JSON header's length. */
  headerBytes: number;
  /** Absolute offset of the data section (8 + N). */
  dataStart: number;
  metadata: Record<string, string>;
  /** In file order (by offset). */
  tensors: Map<string, CheckpointTensor>;
}

export interface Checkpoint {
  dir: string;
  /** Absolute paths of the files, sorted. */
  files: string[];
  tensors: Map<string, CheckpointTensor>;
  /** `__metadata__` per file. */
  metadata: Map<string, Record<string, string>>;
}

// ---- one file

async function readExactly(fh: FileHandle, bytes: number, position: number): Promise<Uint8Array> {
  const buf = new Uint8Array(bytes);
  let done = 0;
  while (done < bytes) {
    const { bytesRead } = await fh.read(buf, done, bytes - done, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return done === bytes ? buf : buf.subarray(0, done);
}

const isObject = (x: unknown): x is Record<string, unknown> => typeof x === 'object' && x !== null && !Array.isArray(x);
const isCount = (x: unknown): x is number => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;

/** Reads and validates the header of one safetensors file. Reads 8 + N bytes, whatever the file's size. */
export async function readSafetensorsHeader(file: string): Promise<SafetensorsFile> {
  const abs = path.resolve(file);
  let fh: FileHandle;
  try {
    fh = await open(abs, 'r');
  } catch (e) {
    throw new CheckpointError('NOT_FOUND', `${abs}: cannot open: ${(e as Error).message}`, abs);
  }
  try {
    const size = (await fh.stat()).size;
    if (size < 8) throw invalid(abs, `${size} bytes is too small for a safetensors file (8-byte header length missing)`);
    const lenBytes = await readExactly(fh, 8, 0);
    const n = new DataView(lenBytes.buffer, lenBytes.byteOffset, 8).getBigUint64(0, true);
    if (n > BigInt(MAX_HEADER_BYTES)) {
      throw invalid(abs, `header length ${n} exceeds the ${MAX_HEADER_BYTES}-byte limit (not a safetensors file, or corrupt)`);
    }
    const headerBytes = Number(n);
    if (8 + headerBytes > size) {
      throw invalid(abs, `header length ${headerBytes} runs past the end of the ${size}-byte file (truncated or corrupt)`);
    }
    const raw = await readExactly(fh, headerBytes, 8);
    if (raw.byteLength !== headerBytes) throw invalid(abs, `short read of the header (${raw.byteLength} of ${headerBytes} bytes)`);
    return parseHeader(abs, size, headerBytes, raw);
  } finally {
    await fh.close();
  }
}

function parseHeader(file: string, size: number, headerBytes: number, raw: Uint8Array): SafetensorsFile {
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(raw));
  } catch (e) {
    throw invalid(file, `header is not valid UTF-8 JSON: ${(e as Error).message}`);
  }
  if (!isObject(json)) throw invalid(file, 'header must be a JSON object');
  const dataStart = 8 + headerBytes;
  const dataBytes = size - dataStart;
  const metadata = parseMetadata(file, json.__metadata__);
  const entries: CheckpointTensor[] = [];
  for (const [name, entry] of Object.entries(json)) {
    if (name === '__metadata__') continue;
    entries.push(parseEntry(file, name, entry, dataStart, dataBytes));
  }
  // Overlap check on the sorted ranges; empty tensors take no bytes and overlap nothing.
  entries.sort((a, b) => a.dataStart - b.dataStart || a.bytes - b.bytes);
  let prev: CheckpointTensor | undefined;
  for (const t of entries) {
    if (t.bytes === 0) continue;
    if (prev && t.dataStart < prev.dataStart + prev.bytes) {
      throw invalid(file, `data_offsets overlap those of '${prev.name}'`, t.name);
    }
    prev = t;
  }
  return { path: file, size, headerBytes, dataStart, metadata, tensors: new Map(entries.map((t) => [t.name, t])) };
}

function parseMetadata(file: string, m: unknown): Record<string, string> {
  if (m === undefined) return {};
  if (!isObject(m) || Object.values(m).some((v) => typeof v !== 'string')) {
    throw invalid(file, '__metadata__ must be an object of string values');
  }
  return m as Record<string, string>;
}

function parseEntry(file: string, name: string, entry: unknown, dataStart: number, dataBytes: number): CheckpointTensor {
  if (!isObject(entry)) throw invalid(file, 'entry must be an object with dtype, shape and data_offsets', name);
  const { dtype: st, shape, data_offsets: offsets } = entry;
  if (typeof st !== 'string') throw invalid(file, 'dtype must be a string', name);
  const dtype = fromSafetensors(st);
  if (!dtype) {
    const known = Object.values(DTYPES).map((d) => d.safetensors).join(', ');
    throw invalid(file, `unknown or unsupported dtype '${st}' (supported: ${known})`, name);
  }
  if (!Array.isArray(shape) || !shape.every(isCount)) {
    throw invalid(file, `shape must be an array of non-negative integers (got ${JSON.stringify(shape)})`, name);
  }
  const dims = shape as number[];
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isCount)) {
    throw invalid(file, `data_offsets must be [begin, end] non-negative integers (got ${JSON.stringify(offsets)})`, name);
  }
  const [begin, end] = offsets as [number, number];
  if (end < begin) throw invalid(file, `data_offsets [${begin}, ${end}] end before they begin`, name);
  const expected = numel(dims) * dtypeBytes(dtype);
  if (!Number.isSafeInteger(expected)) throw invalid(file, `shape [${dims}] is too large`, name);
  if (end - begin !== expected) {
    throw invalid(file, `data_offsets [${begin}, ${end}] span ${end - begin} bytes, but ${st} [${dims}] needs ${expected}`, name);
  }
  if (end > dataBytes) {
    throw invalid(file, `data_offsets end ${end} lies past the ${dataBytes}-byte data section (file truncated?)`, name);
  }
  return { name, file, dtype, shape: [...dims], dataStart: dataStart + begin, bytes: expected };
}

// ---- a model folder

/** Runs `fn` over `items` with at most `limit` in flight (header reads: cheap, but one fd each). */
async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (x: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

const exists = (p: string) => stat(p).then((s) => s.isFile(), () => false);

/** The weight_map of an index file: tensor → shard file name (relative to the folder). */
async function readIndex(indexPath: string): Promise<Map<string, string>> {
  let json: unknown;
  try {
    json = JSON.parse(await readFile(indexPath, 'utf8'));
  } catch (e) {
    throw invalid(indexPath, `cannot read the index: ${(e as Error).message}`);
  }
  const map = isObject(json) ? json.weight_map : undefined;
  if (!isObject(map)) throw invalid(indexPath, 'index must have a "weight_map" object');
  const out = new Map<string, string>();
  for (const [tensor, file] of Object.entries(map)) {
    // Shards live in the folder: a path that climbs out of it is a mistake or an attack.
    if (typeof file !== 'string' || !file || path.isAbsolute(file) || file.split(/[\\/]/).includes('..')) {
      throw invalid(indexPath, `weight_map entry must be a file name inside the folder (got ${JSON.stringify(file)})`, tensor);
    }
    out.set(tensor, file);
  }
  return out;
}

/** Which files make up the checkpoint, and the index's weight_map if there is one. */
async function checkpointFiles(dir: string): Promise<{ files: string[]; weightMap?: Map<string, string>; index?: string }> {
  const index = path.join(dir, INDEX_FILE);
  if (await exists(index)) {
    const weightMap = await readIndex(index);
    const files = [...new Set(weightMap.values())].map((f) => path.join(dir, f));
    for (const f of files) {
      if (!(await exists(f))) {
        const tensors = [...weightMap].filter(([, v]) => path.join(dir, v) === f).map(([k]) => k);
        const more = tensors.length > 1 ? ` and ${tensors.length - 1} more` : '';
        throw new CheckpointError('NOT_FOUND',
          `${index}: weight_map sends tensor '${tensors[0]}'${more} to ${f}, which does not exist`, f, tensors[0]);
      }
    }
    return { files: files.sort(), weightMap, index };
  }
  const single = path.join(dir, SINGLE_FILE);
  if (await exists(single)) return { files: [single] };
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (e) {
    throw new CheckpointError('NOT_FOUND', `${dir}: cannot read the checkpoint folder: ${(e as Error).message}`, dir);
  }
  const files = names.filter((n) => n.endsWith('.safetensors')).sort().map((n) => path.join(dir, n));
  if (files.length === 0) {
    throw new CheckpointError('NOT_FOUND', `${dir}: no ${INDEX_FILE}, ${SINGLE_FILE} or *.safetensors file`, dir);
  }
  return { files };
}

/**
 * Opens a checkpoint: a folder (index, single file, or every *.safetensors) or
 * one .safetensors file. Reads headers only. A tensor in two files, or a
 * weight_map entry the named file does not hold, is an error.
 */
export async function openCheckpoint(dirOrFile: string): Promise<Checkpoint> {
  const target = path.resolve(dirOrFile);
  const isFile = await exists(target);
  const dir = isFile ? path.dirname(target) : target;
  const { files, weightMap, index } = isFile ? { files: [target] } : await checkpointFiles(dir);
  const headers = await mapLimit(files, 16, readSafetensorsHeader);
  const tensors = new Map<string, CheckpointTensor>();
  for (const h of headers) {
    for (const t of h.tensors.values()) {
      const other = tensors.get(t.name);
      if (other) throw invalid(t.file, `also present in ${other.file} (a tensor must live in one file)`, t.name);
      tensors.set(t.name, t);
    }
  }
  if (weightMap && index) {
    for (const [name, f] of weightMap) {
      const want = path.join(dir, f);
      const found = tensors.get(name);
      if (found?.file !== want) {
        const where = found ? `it is in ${found.file}` : 'no file holds it';
        throw new CheckpointError('NOT_FOUND', `${index}: weight_map puts tensor '${name}' in ${want}, but ${where}`, want, name);
      }
    }
  }
  return { dir, files, tensors, metadata: new Map(headers.map((h) => [h.path, h.metadata])) };
}

// ---- writing (tests, benchmarks)

export interface TensorData {
  name: string;
  dtype: DType;
  shape: number[];
  data: Uint8Array;
}

/** Builds a safetensors header; padded with spaces to a multiple of 8, as the reference writer does. */
export function encodeHeader(tensors: readonly Omit<TensorData, 'data'>[], sizes: readonly number[],
  metadata?: Record<string, string>): Uint8Array {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  let offset = 0;
  tensors.forEach((t, i) => {
    const bytes = sizes[i]!;
    header[t.name] = { dtype: DTYPES[t.dtype].safetensors, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  });
  const json = JSON.stringify(header);
  const padded = json + ' '.repeat((8 - (Buffer.byteLength(json) % 8)) % 8);
  return new TextEncoder().encode(padded);
}

async function writeAll(fh: FileHandle, data: Uint8Array): Promise<void> {
  for (let done = 0; done < data.byteLength;) {
    done += (await fh.write(data, done, data.byteLength - done)).bytesWritten;
  }
}

/** Writes a safetensors file with the tensors' data back to back in the given order. */
export async function writeSafetensors(file: string, tensors: readonly TensorData[], metadata?: Record<string, string>): Promise<void> {
  const seen = new Set<string>();
  for (const t of tensors) {
    if (seen.has(t.name)) throw invalid(file, 'appears twice', t.name);
    seen.add(t.name);
    if (!isDType(t.dtype)) throw invalid(file, `unknown dtype '${String(t.dtype)}'`, t.name);
    const expected = numel(t.shape) * dtypeBytes(t.dtype);
    if (t.data.byteLength !== expected) {
      throw invalid(file, `data has ${t.data.byteLength} bytes, but ${t.dtype} [${t.shape}] needs ${expected}`, t.name);
    }
  }
  const header = encodeHeader(tensors, tensors.map((t) => t.data.byteLength), metadata);
  const len = new Uint8Array(8);
  new DataView(len.buffer).setBigUint64(0, BigInt(header.byteLength), true);
  const fh = await open(file, 'w');
  try {
    for (const part of [len, header, ...tensors.map((t) => t.data)]) await writeAll(fh, part);
  } finally {
    await fh.close();
  }
}
