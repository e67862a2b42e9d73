// The HMM daemon, its protocol and its client, across real processes on the mock
// backend (memfd chunks: the sharing between processes is real).
import { type ChildProcess, type SpawnOptions, spawn, spawnSync } from 'node:child_process';
import { chmodSync, closeSync, existsSync, fstatSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';

import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import { HmmClient } from '../../src/hmm/client.js';
import { HmmDaemon, type HmmDaemonEvent } from '../../src/hmm/daemon.js';
import { Hmm } from '../../src/hmm/hmm.js';
import { KvExhaustedError } from '../../src/hmm/kv-pool.js';
import type { TensorSpec } from '../../src/hmm/placement.js';
import { HmmProtocolError, MAX_MESSAGE_BYTES } from '../../src/hmm/protocol.js';
import { tensorSeed } from '../../src/hmm/synthetic.js';
import { InvalidArgumentError, NotFoundError, type Runtime, UnixChannel, checksumU32, uniformBf16 } from '../../src/index.js';
import { MIB, openMock, pattern } from '../helpers/mock.js';

const CHILD = path.resolve(__dirname, '../fixtures/hmm-client-child.mjs');
const RAW_CHILD = path.resolve(__dirname, '../fixtures/hmm-raw-child.mjs');
const CLI = path.resolve(__dirname, '../../dist/cli/main.js');
const SEED = 11n;
const CHILD_ENV = { ...process.env, ELASTICMOE_BACKEND: 'mock', ELASTICMOE_NO_WARN_MOCK: '1' };

/** Two layers of 48 tiny experts over 4 devices: 97 chunks, so an attach takes two batches. */
function specs(experts = 48): TensorSpec[] {
  const out: TensorSpec[] = [];
  for (let l = 0; l < 2; l++) {
    out.push({ name: `l${l}.norm`, dtype: 'bf16', shape: [100], device: 0, group: 'dense', packing: 'packed' });
    out.push({ name: `l${l}.attn`, dtype: 'bf16', shape: [32, 64], device: 0, group: 'dense', packing: 'packed' });
    for (let e = 0; e < experts; e++) {
      for (const p of ['gate', 'up', 'down']) {
        out.push({ name: `l${l}.e${e}.${p}`, dtype: 'bf16', shape: [16, 64], device: e % 4, group: `L${l}.E${e}` });
      }
    }
  }
  return out;
}

/** Open descriptors of this process that refer to `file` ("dev:ino"). */
function fdsOf(file: string): number {
  return readdirSync('/proc/self/fd').filter((f) => {
    try {
      const st = statSync(`/proc/self/fd/${f}`);
      return `${st.dev}:${st.ino}` === file;
    } catch {
      return false;
    }
  }).length;
}
const fileOf = (fd: number) => {
  const st = fstatSync(fd);
  return `${st.dev}:${st.ino}`;
};

/** Open descriptors of this process that are memfds (the mock's chunks). */
const memfdsHere = () => readdirSync('/proc/self/fd').filter((f) => {
  try {
    return readlinkSync(`/proc/self/fd/${f}`).startsWith('/memfd:');
  } catch {
    return false;
  }
}).length;

/** A child process running hmm-client-child.mjs, driven by JSON lines. */
class Child {
  private readonly waiters: Array<{ resolve: (v: Record<string, unknown>) => void; reject: (e: Error) => void }> = [];
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr = '';

  constructor(readonly proc: ChildProcess) {
    createInterface({ input: proc.stdout! }).on('line', (line) => this.waiters.shift()?.resolve(JSON.parse(line)));
    proc.stderr!.on('data', (d) => (this.stderr += d));
    this.exited = new Promise((resolve) => proc.on('exit', (code, signal) => {
      for (const w of this.waiters.splice(0)) w.reject(new Error(`child exited (${code ?? signal}): ${this.stderr}`));
      resolve({ code, signal });
    }));
  }

  static spawn(sock: string, args: string[] = [], uid?: number, script = CHILD): Child {
    const opts: SpawnOptions = { env: CHILD_ENV, stdio: 'pipe', ...(uid === undefined ? {} : { uid, gid: uid }) };
    return new Child(spawn(process.execPath, [script, sock, ...args], opts));
  }

  next(): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  async call(cmd: string, args: Record<string, unknown> = {}): Promise<Record<string, any>> {
    const reply = this.next();
    this.proc.stdin!.write(`${JSON.stringify({ cmd, ...args })}\n`);
    const r = await reply;
    if (!r.ok) throw new Error(`child ${cmd} failed: ${r.code} ${r.message}`);
    return r;
  }
}

interface Setup {
  rt: Runtime;
  hmm: Hmm;
  daemon: HmmDaemon;
  sock: string;
  events: HmmDaemonEvent[];
  /** freeBytes of every device before anything was loaded. */
  startFree: number[];
}

let dir: string;
const cleanups: Array<() => unknown> = [];
beforeEach(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'emoe-hmmd-'));
});
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
  rmSync(dir, { recursive: true, force: true });
});

async function setup({ load = true, allowedUids, preExport }: { load?: boolean; allowedUids?: number[]; preExport?: boolean } = {}): Promise<Setup> {
  const rt = openMock({ mockCapacity: 256 * MIB });
  const startFree = rt.devices().map((d) => d.freeBytes);
  const hmm = new Hmm(rt);
  if (load) await hmm.loadSynthetic(specs(), { seed: SEED });
  const sock = path.join(dir, 'hmm.sock');
  const events: HmmDaemonEvent[] = [];
  const daemon = await HmmDaemon.listen(hmm, sock, {
    log: (e) => events.push(e), ...(allowedUids ? { allowedUids } : {}), ...(preExport === undefined ? {} : { preExport }),
  });
  cleanups.push(() => hmm.dispose(), () => daemon.close());
  return { rt, hmm, daemon, sock, events, startFree };
}

function child(sock: string, args: string[] = [], uid?: number, script = CHILD): Child {
  const c = Child.spawn(sock, args, uid, script);
  cleanups.push(() => {
    c.proc.kill('SIGKILL');
    return c.exited;
  });
  return c;
}

const freeBytes = (rt: Runtime) => rt.devices().map((d) => d.freeBytes);

describe('HMM daemon: sharing with executor processes', () => {
  it('a child attaches everything and reads exactly the bytes the daemon loaded', async () => {
    const { hmm, sock } = await setup();
    const memfdsBefore = memfdsHere();
    const c = child(sock);
    const attached = await c.call('attach');
    const ids = hmm.store.all().map((x) => x.plan.id);
    expect(ids).toHaveLength(97); // two attach batches (64 + 33)
    expect([...attached.ids].sort()).toEqual([...ids].sort());
    // Every received descriptor was closed after import: the mock keeps one per imported chunk.
    expect(attached.memfds).toBe(97);
    // The daemon closed every descriptor it exported once sent.
    expect(memfdsHere()).toBe(memfdsBefore);

    const { tensors, chunks } = await c.call('checksums');
    for (const name of hmm.store.tensorNames()) expect(tensors[name], name).toBe((await hmm.store.checksumTensor(name)).toString());
    for (const id of ids) expect(chunks[id], id).toBe((await hmm.store.checksumChunk(id)).toString());
    expect(new Set(Object.values(tensors)).size).toBeGreaterThan(190); // distinct contents, not all zero

    // One small tensor against the host reference of the synthetic fill.
    const ref = uniformBf16(100, tensorSeed(SEED, 'l0.norm'), 1.0);
    const { hex } = await c.call('read', { tensor: 'l0.norm', bytes: 200 });
    expect(hex).toBe(Buffer.from(ref.buffer, ref.byteOffset, 200).toString('hex'));
    // The daemon's checksum op answers the same figure as its store.
    const viaWire = await c.call('daemonChecksum', { tensor: 'l1.e7.down' });
    expect(viaWire.checksum).toBe((await hmm.store.checksumTensor('l1.e7.down')).toString());
  });

  it('two processes attached at once see the same memory', async () => {
    const { rt, hmm, sock } = await setup();
    const a = child(sock);
    const b = child(sock);
    await Promise.all([a.call('attach'), b.call('attach', { ids: ['L1.E5@1', 'dense@0#0'] })]);
    const data = Buffer.from(pattern(2048, 9));
    await a.call('write', { tensor: 'l1.e5.up', hex: data.toString('hex') });
    const seen = await b.call('read', { tensor: 'l1.e5.up', bytes: 2048 });
    expect(seen.hex).toBe(data.toString('hex'));
    // And it is the daemon's memory too.
    const t = hmm.store.tensor('l1.e5.up');
    expect(Buffer.from(await rt.read(t.ptr, 2048, hmm.store.stream(1))).equals(data)).toBe(true);
  });

  it('a killed process frees only what it alone held', async () => {
    const { rt, hmm, daemon, sock, events } = await setup();
    const a = child(sock);
    const b = child(sock);
    await a.call('attach');
    await b.call('attach', { ids: ['L0.E1@1'] });
    const ws = await a.call('workspace', { device: 1, size: 3 * MIB });
    expect(ws.size).toBe(4 * MIB);
    // Weights no layout holds any more: E1 is still attached by both children, E2 by `a` only.
    expect(hmm.releaseResident(['L0.E1@1', 'L0.E2@2'])).toEqual([]);
    const before = freeBytes(rt);
    const sums = new Map<string, bigint>();
    for (const c of hmm.store.all()) if (c.plan.kind === 'weight') sums.set(c.plan.id, await hmm.store.checksumChunk(c.plan.id));
    expect(hmm.accounting()[1]!.workspaceBytes).toBe(4 * MIB);

    a.proc.kill('SIGKILL');
    await a.exited;
    await expect.poll(() => daemon.sessionCount).toBe(1);

    expect(hmm.store.has(ws.id)).toBe(false);
    expect(hmm.store.has('L0.E2@2')).toBe(false);
    expect(hmm.store.has('L0.E1@1')).toBe(true);
    const after = freeBytes(rt);
    expect(after[1]! - before[1]!).toBe(4 * MIB); // the workspace
    expect(after[2]! - before[2]!).toBe(2 * MIB); // E2's chunk
    expect(after[0]).toBe(before[0]);
    expect(after[3]).toBe(before[3]);
    for (const [id, sum] of sums) if (id !== 'L0.E2@2') expect(await hmm.store.checksumChunk(id), id).toBe(sum);
    const gone = events.find((e) => e.type === 'disconnected');
    expect(gone && gone.type === 'disconnected' && [...gone.freed].sort()).toEqual(['L0.E2@2', ws.id].sort());
    // The survivor still reads the right bytes through its own mapping.
    const { tensors } = await b.call('checksums');
    expect(tensors['l0.e1.gate']).toBe((await hmm.store.checksumTensor('l0.e1.gate')).toString());
  });

  it('device accounting returns to its starting figure once every client is gone and weights are released', async () => {
    const { rt, hmm, daemon, sock, startFree } = await setup();
    hmm.kv.createPool({ device: 3, blockBytes: 64 * 1024, blocks: 40 });
    const loaded = freeBytes(rt);
    expect(loaded.every((f, d) => f < startFree[d]!)).toBe(true);
    const a = child(sock);
    const b = child(sock);
    await a.call('attach');
    await b.call('attach');
    await a.call('workspace', { device: 0, size: 2 * MIB });
    expect(freeBytes(rt)[0]).toBe(loaded[0]! - 2 * MIB);

    // `a` leaves politely; its workspace goes, the weights stay.
    expect((await a.call('detach')).freed).toHaveLength(1);
    await a.call('exit');
    await a.exited;
    await expect.poll(() => daemon.sessionCount).toBe(1);
    expect(freeBytes(rt)).toEqual(loaded);

    // The HMM lets go of everything while `b` still holds it: nothing may be freed yet.
    hmm.releaseResident(hmm.store.all().filter((c) => c.plan.kind === 'weight').map((c) => c.plan.id));
    hmm.kv.destroyPool(3);
    expect(hmm.store.size).toBe(98);
    expect(freeBytes(rt)).toEqual(loaded);

    b.proc.kill('SIGKILL');
    await expect.poll(() => daemon.sessionCount).toBe(0);
    expect(hmm.store.size).toBe(0);
    expect(freeBytes(rt)).toEqual(startFree);
  });
});

describe('HMM daemon: the attach stream', () => {
  it('sends handles in batches of at most 64, each batch with its own descriptors, and answers in request order', async () => {
    const { hmm, sock } = await setup();
    const raw = UnixChannel.connect(sock);
    cleanups.push(() => raw.close());
    raw.send(JSON.stringify({ id: 1, op: 'hello', pid: process.pid }));
    expect(JSON.parse((await raw.receive()).data.toString())).toMatchObject({ id: 1, ok: true, result: { backend: 'mock', deviceCount: 4 } });
    raw.send(JSON.stringify({ id: 2, op: 'attach' }));
    const first = await raw.receive();
    const last = await raw.receive();
    const batch = JSON.parse(first.data.toString());
    const final = JSON.parse(last.data.toString());
    for (const fd of [...first.fds, ...last.fds]) closeSync(fd);
    expect(batch).toMatchObject({ id: 2, ok: true, partial: true });
    expect(batch.entries).toHaveLength(64);
    expect(first.fds).toHaveLength(64);
    expect(batch.handles).toEqual(Array.from({ length: 64 }, (_, index) => ({ kind: 'fd', index })));
    expect(final).toMatchObject({ id: 2, ok: true });
    expect(final.result.entries).toHaveLength(33);
    expect(last.fds).toHaveLength(33);
    const ids = [...batch.entries, ...final.result.entries].map((e: { id: string }) => e.id);
    expect(ids.sort()).toEqual(hmm.store.ids().sort());

    // One at a time, in order: a slow checksum is answered before the ping sent after it.
    raw.send(JSON.stringify({ id: 3, op: 'checksum', chunk: 'dense@0#0' }));
    raw.send(JSON.stringify({ id: 4, op: 'ping' }));
    const replies = [JSON.parse((await raw.receive()).data.toString()), JSON.parse((await raw.receive()).data.toString())];
    expect(replies.map((r) => r.id)).toEqual([3, 4]);
    expect(replies[0].result.checksum).toBe((await hmm.store.checksumChunk('dense@0#0')).toString());
  });

  it('waits for a slow reader on the event loop: a client in the daemon\'s own process attaches more handles than the socket holds', async () => {
    // 1,202 chunks: far more descriptors than one socket holds unread. A daemon that blocked its
    // thread until the peer read (as it once did) never lets this process's client read: the send
    // times out and the connection ends. Its event loop must turn between batches instead (the
    // deployment's serving steps run on that loop while an executor imports).
    const rt = openMock({ mockCapacity: 1024 * MIB });
    const hmm = new Hmm(rt);
    cleanups.push(() => hmm.dispose());
    await hmm.loadSynthetic(specs(600), { seed: SEED });
    const daemon = await HmmDaemon.listen(hmm, path.join(dir, 'big.sock'));
    cleanups.push(() => daemon.close());
    const client = await HmmClient.connect(path.join(dir, 'big.sock'), rt);
    cleanups.push(() => client.close());
    let turns = 0;
    const timer = setInterval(() => turns++, 0);
    const set = await client.attach();
    clearInterval(timer);
    cleanups.push(() => set.dispose());
    expect(set.size).toBe(hmm.store.size);
    expect(hmm.store.size).toBeGreaterThan(1200);
    expect(turns).toBeGreaterThan(0);
    // The last batch's memory reads here as the daemon loaded it.
    const name = 'l1.e599.down';
    const stream = hmm.store.stream(hmm.store.tensor(name).chunk.plan.device);
    const here = Buffer.from(await rt.read(set.tensor(name), 2048, stream));
    expect(here.equals(Buffer.from(await rt.read(hmm.store.tensor(name).ptr, 2048, stream)))).toBe(true);
    expect(here.some((x) => x !== 0)).toBe(true);
  });

  it('chunks the store makes off its thread once the daemon listens are exported as they are made: their attach exports nothing', async () => {
    const { rt, hmm, sock } = await setup();
    expect(hmm.store.exportOnCreate).toBe(true);
    const plans = [0, 1, 2].map((i) => ({ id: `extra${i}@1`, group: `X${i}`, device: 1, kind: 'weight' as const, size: 2 * MIB, tensors: [] }));
    const made = hmm.store.allocateOffThread(plans, 'test', () => [1]);
    await made.until(plans.length);
    rt.injectFault('ExportChunk', 1); // any export from here on fails
    const client = await HmmClient.connect(sock, rt);
    cleanups.push(() => client.close());
    const set = await client.attach(plans.map((p) => p.id));
    cleanups.push(() => set.dispose());
    expect(set.size).toBe(3);
    rt.clearFaults();
  });

  it('a brief manifest (tensors: false) names the same chunks and pools without their tensor lists', async () => {
    const { rt, sock } = await setup();
    const client = await HmmClient.connect(sock, rt);
    cleanups.push(() => client.close());
    const full = await client.manifest();
    const brief = await client.manifest({ tensors: false });
    expect(brief.chunks.map((c) => c.id)).toEqual(full.chunks.map((c) => c.id));
    expect(brief.chunks.map(({ tensors: _, ...rest }) => rest)).toEqual(full.chunks.map(({ tensors: _, ...rest }) => rest));
    expect(brief.kvPools).toEqual(full.kvPools);
    expect(full.chunks.filter((c) => c.tensors.length > 0).length).toBe(97);
    expect(brief.chunks.every((c) => c.tensors.length === 0)).toBe(true);
    // What an attach returns still carries the tensors.
    const set = await client.attach(['L0.E0@0']);
    cleanups.push(() => set.dispose());
    expect(set.entries[0]!.tensors.map((t) => t.name)).toEqual(['l0.e0.gate', 'l0.e0.up', 'l0.e0.down']);
  });

  it('exports each chunk once, before listening: attaches export nothing, and a freed chunk closes its handle', async () => {
    const { rt, hmm, sock } = await setup();
    rt.injectFault('ExportChunk', 1); // any export from here on fails
    const first = await HmmClient.connect(sock, rt);
    cleanups.push(() => first.close());
    const a = await first.attach();
    const second = await HmmClient.connect(sock, rt);
    cleanups.push(() => second.close());
    const b = await second.attach();
    expect(a.size).toBe(hmm.store.size);
    expect(b.size).toBe(hmm.store.size);
    a.dispose();
    b.dispose();
    await first.detach();
    await second.detach();
    rt.clearFaults();
    // The store holds one descriptor per exported chunk and closes it with the chunk.
    const before = memfdsHere();
    const id = 'L0.E0@0';
    hmm.store.release(id, 'hmm');
    expect(hmm.store.has(id)).toBe(false);
    expect(memfdsHere()).toBe(before - 2); // the chunk's own memfd (the mock's memory) and its exported handle
  });

  it('merges two attached sets and drops chunks from one: tensors resolve where they are still held', async () => {
    const { rt, hmm, sock } = await setup({ preExport: false });
    const client = await HmmClient.connect(sock, rt);
    cleanups.push(() => client.close());
    // Three weight chunks whose tensors are theirs alone.
    const [x, y, z] = hmm.store.all().filter((c) => c.plan.kind === 'weight' && c.plan.tensors.length > 0 && /^L0\.E\d+$/.test(c.plan.group)).map((c) => c.plan.id);
    const a = await client.attach([x!, y!]);
    const b = await client.attach([z!]);
    cleanups.push(() => a.dispose(), () => b.dispose());
    const tensorOf = (set: typeof a, id: string) => set.chunk(id).entry.tensors[0]!.name;
    const e1 = tensorOf(a, y!);
    const e2 = tensorOf(b, z!);
    const e2At = b.tensor(e2).address;
    expect(() => a.absorb(a)).toThrow(/both/); // a chunk cannot be in a set twice
    a.absorb(b);
    expect(b.size).toBe(0);
    expect(a.size).toBe(3);
    expect(a.tensor(e2).address).toBe(e2At); // moved, still mapped where it was
    a.drop([y!, 'not-held']);
    expect(a.size).toBe(2);
    expect(() => a.tensor(e1)).toThrow(NotFoundError);
    expect(() => a.chunk(y!)).toThrow(NotFoundError);
    expect(a.tensor(e2).address).toBe(e2At);
    expect(a.entries.map((e) => e.id).sort()).toEqual([x!, z!].sort());
  });

  it('an attach that fails midway holds nothing for the session and leaves nothing mapped', async () => {
    const { rt, hmm, sock } = await setup({ preExport: false });
    const client = await HmmClient.connect(sock, rt);
    cleanups.push(() => client.close());
    const held = () => hmm.store.all().filter((c) => c.holders.has(client.session)).length;
    const before = await client.attach(['L0.E0@0']); // held before: must stay held
    cleanups.push(() => before.dispose()); // (kept referenced: a finalizer would close its memfd mid-test)
    // The store keeps the handles it exports (one memfd each, in this process: the daemon runs here).
    const exported = () => hmm.store.all().filter((c) => c.exported).length;
    const memfds = memfdsHere() - exported();
    rt.injectFault('ExportChunk', 70); // after the first batch of 64 went out
    const err = await client.attach().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(HmmProtocolError);
    expect((err as HmmProtocolError).code).toBe('INTERNAL');
    expect((err as Error).message).toMatch(/ExportChunk/);
    expect(held()).toBe(1);
    // The client dropped the first batch it had imported, and closed every descriptor it got.
    expect(memfdsHere() - exported()).toBe(memfds);
    // The connection still works, and a retry succeeds.
    const set = await client.attach();
    expect(set.size).toBe(97);
    expect(held()).toBe(97);
    set.dispose();
  });
});

describe('HMM daemon: who may connect', () => {
  it('refuses a uid that is not allowed, naming it', async () => {
    const uid = process.getuid!();
    const { rt, daemon, sock, events } = await setup({ load: false, allowedUids: [uid + 1] });
    const err = await HmmClient.connect(sock, rt, { timeoutMs: 5000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(HmmProtocolError);
    expect((err as HmmProtocolError).code).toBe('FORBIDDEN');
    expect((err as Error).message).toContain(`uid ${uid} `);
    expect(events).toContainEqual({ type: 'refused', pid: process.pid, uid });
    expect(daemon.sessionCount).toBe(0);
  });

  it.runIf(process.getuid?.() === 0)('refuses a process of another user (socket mode first, then the uid check)', async () => {
    const { sock, daemon, events } = await setup({ load: false });
    chmodSync(dir, 0o755);
    expect(statSync(sock).mode & 0o777).toBe(0o600);
    const byMode = child(sock, ['probe'], 65534);
    const r1 = await byMode.next();
    expect(r1.ok).toBe(false);
    expect(String(r1.message)).toMatch(/EACCES|permission denied/i);
    // With the file opened up, the daemon's own check stops it.
    chmodSync(sock, 0o666);
    const byUid = child(sock, ['probe'], 65534);
    const r2 = await byUid.next();
    expect(r2).toMatchObject({ ok: false, code: 'FORBIDDEN' });
    expect(String(r2.message)).toContain('uid 65534 ');
    expect(events).toContainEqual(expect.objectContaining({ type: 'refused', uid: 65534 }));
    expect(daemon.sessionCount).toBe(0);
  });
});

describe('HMM daemon: bad input', () => {
  it('answers malformed, invalid, unknown and oversized requests with errors and keeps serving', async () => {
    const { rt, hmm, sock } = await setup();
    const raw = UnixChannel.connect(sock);
    cleanups.push(() => raw.close());
    const ask = async (data: string | Buffer, fds: number[] = []) => {
      raw.send(data, fds);
      return JSON.parse((await raw.receive()).data.toString());
    };
    const bad = await ask('{"id": 3, "op": "ping"');
    expect(bad).toMatchObject({ id: 3, ok: false, error: { code: 'BAD_REQUEST' } });
    expect(bad.error.message).toMatch(/JSON/);
    expect(await ask('[1,2]')).toMatchObject({ id: 0, ok: false, error: { code: 'BAD_REQUEST' } });

    const schema = await ask(JSON.stringify({ id: 5, op: 'workspace', device: 'one', size: 1 }));
    expect(schema).toMatchObject({ id: 5, ok: false, error: { code: 'BAD_REQUEST' } });
    expect(schema.error.message).toMatch(/workspace: device: /);
    const nested = await ask(JSON.stringify({ id: 6, op: 'attach', ids: ['a', 7] }));
    expect(nested.error.message).toMatch(/ids\[1\]/);
    const extra = await ask(JSON.stringify({ id: 7, op: 'ping', shout: true }));
    expect(extra).toMatchObject({ id: 7, ok: false, error: { code: 'BAD_REQUEST' } });
    expect(extra.error.message).toMatch(/shout/);

    const unknown = await ask(JSON.stringify({ id: 8, op: 'frobnicate' }));
    expect(unknown).toMatchObject({ id: 8, ok: false, error: { code: 'BAD_REQUEST' } });
    expect(unknown.error.message).toMatch(/unknown op 'frobnicate'/);

    // Oversized (sent by another process: one event loop cannot both send and read 1 MiB),
    // carrying a descriptor: refused unread, the daemon's copy of the descriptor closed.
    const sender = child(sock, [], undefined, RAW_CHILD);
    const huge = await sender.call('send', { data: '{"id":9,"op":"ping","pad":"PAD"}', pad: MAX_MESSAGE_BYTES, withFd: true });
    expect(huge.reply).toMatchObject({ id: 9, ok: false, error: { code: 'TOO_LARGE' } });
    expect(fdsOf(huge.file)).toBe(0);
    const justUnder = '{"id":10,"op":"ping","pad":"PAD"}';
    const under = await sender.call('send', { data: justUnder, pad: MAX_MESSAGE_BYTES - justUnder.length + 3 });
    expect(under.reply).toMatchObject({ id: 10, ok: false, error: { code: 'BAD_REQUEST' } }); // read and parsed: pad is no ping argument
    expect(under.reply.error.message).toMatch(/pad/);

    const chunk = rt.createChunk(0, 2 * MIB, { exportable: true });
    const h = chunk.export();
    if (h.kind !== 'fd') throw new Error('the mock exports fds');
    cleanups.push(() => {
      closeSync(h.fd);
      chunk.dispose();
    });

    // Session ops need a hello first.
    expect(await ask(JSON.stringify({ id: 10, op: 'attach' }))).toMatchObject({ id: 10, ok: false, error: { code: 'BAD_REQUEST' } });
    // A valid request carrying an unexpected descriptor: served, the descriptor closed.
    const file = fileOf(h.fd);
    expect(fdsOf(file)).toBe(2); // ours and the mock chunk's own
    expect(await ask(JSON.stringify({ id: 11, op: 'ping' }), [h.fd])).toEqual({ id: 11, ok: true, result: {} });
    expect(fdsOf(file)).toBe(2); // the daemon's copy is closed

    // Handler errors come back typed through the client; other connections are served throughout.
    const client = await HmmClient.connect(sock, rt);
    cleanups.push(() => client.close());
    await client.ping();
    await expect(client.attach(['no-such-chunk'])).rejects.toBeInstanceOf(NotFoundError);
    const dev = await client.workspace(9, MIB).catch((e: unknown) => e);
    expect(dev).toBeInstanceOf(InvalidArgumentError);
    expect((dev as InvalidArgumentError).argument).toBe('device');
    await expect(client.checksum({ tensor: 'nope' })).rejects.toThrow(/nope/);
    await expect(client.kvAllocate('r', 0, 1)).rejects.toBeInstanceOf(NotFoundError); // no KV pool
    expect((await client.stats()).chunks).toBe(hmm.store.size);
    expect(await ask(JSON.stringify({ id: 12, op: 'ping' }))).toEqual({ id: 12, ok: true, result: {} });
  });

  it('times a request out when the daemon does not answer', async () => {
    const sock = path.join(dir, 'silent.sock');
    const { UnixListener } = await import('../../src/index.js');
    const held: UnixChannel[] = [];
    const listener = UnixListener.listen(sock, (ch) => held.push(ch)); // accepts, never replies
    cleanups.push(() => {
      for (const ch of held) ch.close();
      listener.close();
    });
    const rt = openMock();
    const err = await HmmClient.connect(sock, rt, { timeoutMs: 200 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(HmmProtocolError);
    expect((err as HmmProtocolError).code).toBe('TIMEOUT');
    expect((err as Error).message).toMatch(/no reply to 'hello'.*200 ms/);
  });
});

describe('HMM daemon: KV block tables', () => {
  it('live in the daemon: a new client reads what a disconnected one allocated', async () => {
    const { rt, hmm, daemon, sock } = await setup({ load: false });
    hmm.kv.createPool({ device: 2, blockBytes: 256 * 1024, blocks: 16 });
    const first = await HmmClient.connect(sock, rt, { name: 'first' });
    expect(await first.kvAllocate('req-A', 2, 3)).toEqual([0, 1, 2]);
    expect(await first.kvAllocate('req-B', 2, 2)).toEqual([3, 4]);
    first.close();
    await expect.poll(() => daemon.sessionCount).toBe(0);

    const second = await HmmClient.connect(sock, rt, { name: 'second' });
    cleanups.push(() => second.close());
    expect(await second.kvTable('req-A')).toEqual({ device: 2, blocks: [0, 1, 2] });
    expect(await second.kvAllocate('req-A', 2, 1)).toEqual([5]);
    expect(await second.kvTable('req-A')).toEqual({ device: 2, blocks: [0, 1, 2, 5] });
    await second.kvFree('req-B');
    expect(await second.kvTable('req-B')).toBeNull();
    const pool = (await second.manifest()).kvPools.find((p) => p.device === 2);
    expect(pool?.freeBlocks).toBe(12);
    await expect(second.kvAllocate('req-C', 2, 13)).rejects.toBeInstanceOf(KvExhaustedError);
    expect((await second.stats()).kvRequests).toBe(1);
  });
});

describe('ELASTICMOE_TRACE', () => {
  it('a trace file that cannot be written turns tracing off in that process, said once on stderr, and fails nothing', () => {
    const trace = path.resolve(__dirname, '../../dist/runtime/trace.js');
    const bad = path.join(dir, 'no-such-dir', 'trace.jsonl');
    const r = spawnSync(process.execPath, ['-e', `import(${JSON.stringify(trace)}).then((m) => { m.trace('a'); m.trace('b', { x: 1 }); console.log('done'); })`],
      { encoding: 'utf8', env: { ...process.env, ELASTICMOE_TRACE: bad } });
    expect(r.status).toBe(0);
    expect(r.stdout.trim()).toBe('done');
    expect(r.stderr.trim().split('\n')).toEqual([expect.stringMatching(/^elasticmoe: ELASTICMOE_TRACE=.*no-such-dir.* cannot be written .*tracing is off in process \d+$/)]);
    // Unset: nothing written, nothing said.
    const off = spawnSync(process.execPath, ['-e', `import(${JSON.stringify(trace)}).then((m) => { m.trace('a'); console.log(m.tracing); })`],
      { encoding: 'utf8', env: { ...process.env, ELASTICMOE_TRACE: '' } });
    expect(off.stdout.trim()).toBe('false');
    expect(off.stderr).toBe('');
  });
});

describe('elasticmoe hmm', () => {
  it('starts, prints its ready line, serves an attach and exits cleanly on SIGTERM', async () => {
    const config = path.join(dir, 'model.json');
    writeFileSync(config, JSON.stringify({ tensors: specs(4).map((s) => ({ ...s, device: s.device % 2 })) }));
    const sock = path.join(dir, 'cli.sock');
    const traceFile = path.join(dir, 'trace.jsonl');
    const proc = spawn(process.execPath, [CLI, 'hmm', '--socket', sock, '--synthetic', config, '--devices', '1,2', '--seed', '7',
      '--backend', 'mock', '--mock-devices', '4', '--mock-capacity', '64MiB'], { env: { ...CHILD_ENV, ELASTICMOE_TRACE: traceFile } });
    cleanups.push(() => proc.kill('SIGKILL'));
    const exited = new Promise<number | null>((resolve) => proc.on('exit', resolve));
    let stdout = '';
    let stderr = '';
    proc.stderr.on('data', (d) => (stderr += d));
    const ready = await new Promise<string>((resolve, reject) => {
      proc.stdout.on('data', (d) => {
        stdout += d;
        if (stdout.includes('\n')) resolve(stdout.split('\n')[0]!);
      });
      exited.then((code) => reject(new Error(`exited ${code}: ${stderr}`)));
    });
    expect(ready).toBe(`hmm: listening on ${sock} (mock, 9 chunks, 0.02 GiB)`);
    expect(statSync(sock).mode & 0o777).toBe(0o600);

    const rt = openMock();
    const client = await HmmClient.connect(sock, rt);
    const set = await client.attach();
    expect(new Set(set.entries.map((e) => e.device))).toEqual(new Set([1, 2])); // logical 0,1 → --devices 1,2
    const { ptr, entry } = set.tensorInfo('l1.norm');
    const bytes = await rt.read(ptr, 200, rt.createStream(entry.device));
    const ref = uniformBf16(100, tensorSeed(7n, 'l1.norm'), 1.0);
    expect(Buffer.from(bytes).equals(Buffer.from(ref.buffer, ref.byteOffset, 200))).toBe(true);
    expect(await client.checksum({ tensor: 'l1.norm' })).toBe(checksumU32(bytes));
    set.dispose();
    client.close();
    // ELASTICMOE_TRACE: the daemon's process appended its attach, one JSON line per event, in order.
    const events = readFileSync(traceFile, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { t: number; pid: number; ev: string; chunks?: number });
    const attach = events.filter((e) => e.ev.startsWith('daemon.attach'));
    expect(attach.map((e) => [e.ev, e.pid])).toEqual([['daemon.attach', proc.pid], ['daemon.attach-exported', proc.pid]]);
    expect(attach[0]!.chunks).toBe(9);
    expect(attach[1]!.t).toBeGreaterThanOrEqual(attach[0]!.t);
    expect(Math.abs(attach[0]!.t - Date.now())).toBeLessThan(60_000); // epoch milliseconds: one clock across processes

    proc.kill('SIGTERM');
    expect(await exited).toBe(0);
    expect(existsSync(sock)).toBe(false);
    expect(stderr).toBe('');
    expect(stdout.trim().split('\n')).toHaveLength(1);

    const missing = spawnSync(process.execPath, [CLI, 'hmm'], { encoding: 'utf8', env: CHILD_ENV });
    expect(missing.status).toBe(2);
    expect(missing.stderr).toMatch(/--socket PATH is required/);
  });
});
