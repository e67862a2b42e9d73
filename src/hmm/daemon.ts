// The HMM daemon: puts one in-process Hmm behind a Unix socket. Each connection
// is one HmmSession; its requests run one at a time, in order; when the
// connection closes (EOF, error, the client crashed) the session ends and what
// only it held is freed. The daemon never crashes on input: every malformed,
// oversized or failing request gets an error response and the connection stays.
import { closeSync } from 'node:fs';

import { type ChannelMessage, type UnixChannel, UnixListener } from '../runtime/channel.js';
import { ElasticMoeError, InvalidArgumentError } from '../runtime/errors.js';
import type { SharedHandle } from '../runtime/memory.js';
import { trace, tracing } from '../runtime/trace.js';
import type { Hmm, HmmSession } from './hmm.js';
import {
  CONNECTION_ID,
  type ChunkBatch,
  encode,
  HmmProtocolError,
  MAX_FDS_PER_MESSAGE,
  MAX_MESSAGE_BYTES,
  type Op,
  parseRequest,
  type Request,
  type Result,
  type WireError,
  type WireHandle,
} from './protocol.js';

export type HmmDaemonEvent =
  | { type: 'listening'; path: string }
  | { type: 'refused'; pid: number; uid: number }
  | { type: 'session'; session: string; pid: number; uid: number; name?: string }
  | { type: 'request-error'; session?: string; pid: number; op?: string; code: string; message: string }
  | { type: 'disconnected'; session?: string; pid: number; freed: string[]; error?: string }
  | { type: 'closed'; path: string };

export interface HmmDaemonOptions {
  /** Peer uids allowed to connect (default: only the daemon's own uid). */
  allowedUids?: number[];
  log?: (event: HmmDaemonEvent) => void;
  /**
   * Export every chunk already stored before listening (default true), so that attaches
   * pay no export (the driver's cost grows with the chunk size); chunks the store makes off
   * its thread later are exported there as they are made (ChunkStore.exportOnCreate). Other
   * chunks stored later are exported at their first attach and kept.
   */
  preExport?: boolean;
}

/** How long a refused peer may keep the connection open to read its FORBIDDEN reply. */
const REFUSED_GRACE_MS = 1000;

function closeFds(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      closeSync(fd);
    } catch {
      // already closed: nothing to release
    }
  }
}

const PASSTHROUGH_CODES = new Set<string>(['INVALID_ARGUMENT', 'OUT_OF_MEMORY', 'NOT_FOUND', 'NOT_SUPPORTED']);

/** A handler's failure as a wire error: runtime error codes pass through, anything else is INTERNAL. */
export function toWireError(e: unknown): WireError {
  if (e instanceof HmmProtocolError) return { code: e.code, message: e.message };
  if (e instanceof ElasticMoeError) {
    const out: WireError = { code: PASSTHROUGH_CODES.has(e.code) ? e.code : 'INTERNAL', message: e.message, name: e.name };
    if (e instanceof InvalidArgumentError) out.argument = e.argument;
    if (e.codeName) out.codeName = e.codeName;
    return out;
  }
  return { code: 'INTERNAL', message: `internal error: ${e instanceof Error ? e.message : String(e)}` };
}

/** A reply; its fds are the store's exported handles (sent, never closed here). */
type Reply<O extends Op> = { result: Result<O>; fds?: number[] };

/** One client connection and its session (opened by hello). */
class Connection {
  session: HmmSession | undefined;
  /** The pid the client's runtime imports as (hello.pid): what ACL exports whitelist. */
  importPid = 0;
  private queue: Promise<void> = Promise.resolve();
  private closed = false;

  constructor(
    private readonly daemon: HmmDaemon,
    readonly channel: UnixChannel,
    readonly peer: { pid: number; uid: number },
  ) {}

  start(): void {
    this.channel.onMessage((m) => this.enqueue(m));
    this.channel.closed.then((error) => this.shutdown(error?.message));
  }

  private enqueue(m: ChannelMessage): void {
    // The chain never rejects: handle() turns every failure into a response.
    this.queue = this.queue.then(() => this.handle(m));
  }

  private async handle({ data, fds }: ChannelMessage): Promise<void> {
    // No request carries descriptors: whatever a client sends is closed at once.
    closeFds(fds);
    if (this.closed) return;
    const parsed = parseRequest(data);
    if (!parsed.ok) return this.fail(parsed.id, parsed.error);
    const req = parsed.request;
    try {
      const reply = await this.daemon.dispatch(this, req);
      await this.send({ id: req.id, ok: true, result: reply.result }, reply.fds ?? []);
    } catch (e) {
      await this.fail(req.id, toWireError(e), req.op);
    }
  }

  private async fail(id: number, error: WireError, op?: string): Promise<void> {
    const event: HmmDaemonEvent = { type: 'request-error', pid: this.peer.pid, code: error.code, message: error.message };
    if (this.session) event.session = this.session.id;
    if (op) event.op = op;
    this.daemon.emit(event);
    await this.send({ id, ok: false, error });
  }

  /** Whether the connection has ended (shutdown). */
  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Sends one message with descriptors the chunk store owns (its exported handles):
   * the kernel duplicates them into the peer; they stay open here. While the peer's socket is
   * full (an executor importing the last batch before it reads the next) this waits on the event
   * loop, not on the thread: the deployment's serving steps go on meanwhile. The request in
   * progress awaits it, so the descriptors stay open (its session holds their chunks) until sent.
   */
  async send(message: object, fds: number[] = []): Promise<void> {
    if (this.closed) return;
    // Encoded first: a reply that cannot be encoded is the handler's error (INTERNAL), not the connection's.
    const data = encode(message);
    try {
      await this.channel.sendWhenRoom(data, fds);
    } catch (e) {
      // The peer went away or stopped reading: end the connection and with it the session.
      void this.shutdown(`send failed: ${(e as Error).message}`);
    }
  }

  /** Ends the connection: waits for the request in progress, then ends the session. Idempotent. */
  shutdown(error?: string): Promise<void> {
    if (this.closed) return this.queue;
    this.closed = true;
    this.channel.close();
    this.queue = this.queue.then(() => {
      const freed = this.session?.end() ?? [];
      const event: HmmDaemonEvent = { type: 'disconnected', pid: this.peer.pid, freed };
      if (this.session) event.session = this.session.id;
      if (error) event.error = error;
      this.daemon.forget(this);
      this.daemon.emit(event);
    });
    return this.queue;
  }
}

export class HmmDaemon {
  private readonly connections = new Set<Connection>();
  /** Refused peers still being told why (closed by close() too). */
  private readonly refused = new Set<UnixChannel>();
  private readonly allowedUids: ReadonlySet<number>;
  private readonly log: (event: HmmDaemonEvent) => void;
  private listener: UnixListener | undefined;

  private constructor(readonly hmm: Hmm, readonly socketPath: string, options: HmmDaemonOptions) {
    const own = process.getuid?.();
    this.allowedUids = new Set(options.allowedUids ?? (own === undefined ? [] : [own]));
    this.log = options.log ?? (() => undefined);
  }

  /** Listens on `socketPath` (created with mode 0600; a stale socket file is replaced). */
  static async listen(hmm: Hmm, socketPath: string, options: HmmDaemonOptions = {}): Promise<HmmDaemon> {
    const daemon = new HmmDaemon(hmm, socketPath, options);
    if (options.preExport ?? true) {
      hmm.store.exportAll();
      hmm.store.exportOnCreate = true;
    }
    // Requests over MAX_MESSAGE_BYTES get a TOO_LARGE answer; far larger ones (4x) close the connection
    // before they are buffered whole.
    daemon.listener = UnixListener.listen(socketPath, (ch) => daemon.accept(ch), { mode: 0o600, maxMessageBytes: 4 * MAX_MESSAGE_BYTES });
    daemon.emit({ type: 'listening', path: socketPath });
    return daemon;
  }

  /** Connections with an open session. */
  get sessionCount(): number {
    let n = 0;
    for (const c of this.connections) if (c.session && !c.session.isEnded) n++;
    return n;
  }

  /** Stops listening (the socket file is removed) and ends every session. The Hmm stays the caller's. */
  async close(): Promise<void> {
    if (!this.listener) return;
    this.listener.close();
    this.listener = undefined;
    for (const ch of this.refused) ch.close();
    this.refused.clear();
    await Promise.all([...this.connections].map((c) => c.shutdown('daemon closing')));
    this.emit({ type: 'closed', path: this.socketPath });
  }

  /** @internal */
  emit(event: HmmDaemonEvent): void {
    try {
      this.log(event);
    } catch {
      // a failing logger must not take the daemon down
    }
  }

  /** @internal */
  forget(c: Connection): void {
    this.connections.delete(c);
  }

  private accept(channel: UnixChannel): void {
    let peer: { pid: number; uid: number };
    try {
      peer = channel.peerCredentials();
    } catch {
      channel.close(); // the peer left before we looked
      return;
    }
    if (!this.allowedUids.has(peer.uid)) return this.refuse(channel, peer);
    const c = new Connection(this, channel, peer);
    this.connections.add(c);
    c.start();
  }

  /**
   * Tells a peer of a foreign uid why, then closes. Its messages are drained
   * (fds closed) until it hangs up or the grace period ends, because closing with
   * unread messages would reset the connection and the peer would never read why.
   */
  private refuse(channel: UnixChannel, peer: { pid: number; uid: number }): void {
    this.emit({ type: 'refused', pid: peer.pid, uid: peer.uid });
    channel.onMessage((m) => closeFds(m.fds));
    try {
      const error: WireError = { code: 'FORBIDDEN', message: `uid ${peer.uid} is not allowed to use the HMM daemon at ${this.socketPath}` };
      channel.send(encode({ id: CONNECTION_ID, ok: false, error }));
    } catch {
      // the peer is already gone
    }
    this.refused.add(channel);
    const done = () => {
      clearTimeout(timer);
      this.refused.delete(channel);
      channel.close();
    };
    const timer = setTimeout(done, REFUSED_GRACE_MS);
    timer.unref();
    channel.closed.then(done);
  }

  // ---- requests ----

  /** @internal Runs one validated request for a connection. */
  async dispatch(c: Connection, req: Request): Promise<Reply<Op>> {
    if (req.op === 'ping') return { result: {} };
    if (req.op === 'hello') return { result: this.hello(c, req) };
    const session = c.session;
    if (!session) throw new HmmProtocolError('BAD_REQUEST', `bad request: ${req.op}: send hello first`);
    switch (req.op) {
      case 'manifest':
        return { result: this.hmm.manifest(req.tensors === false ? { tensors: false } : {}) };
      case 'attach':
        return this.attach(c, session, req.id, req.ids);
      case 'detach':
        return { result: { freed: session.detach(req.ids) } };
      case 'workspace':
        return this.workspace(c, session, req.device, req.size);
      case 'kv.allocate':
        return { result: { blocks: this.hmm.kv.allocate(req.request, req.device, req.count) } };
      case 'kv.free':
        this.hmm.kv.free(req.request);
        return { result: {} };
      case 'kv.table':
        return { result: { table: this.hmm.kv.table(req.request) ?? null } };
      case 'checksum':
        return { result: { checksum: (await this.checksum(req.tensor, req.chunk)).toString() } };
      case 'stats':
        return { result: this.stats() };
    }
  }

  private hello(c: Connection, req: Extract<Request, { op: 'hello' }>): Result<'hello'> {
    if (c.session) throw new HmmProtocolError('BAD_REQUEST', `bad request: hello: this connection is already session ${c.session.id}`);
    c.session = this.hmm.openSession();
    c.importPid = req.pid;
    const event: HmmDaemonEvent = { type: 'session', session: c.session.id, pid: c.peer.pid, uid: c.peer.uid };
    if (req.name) event.name = req.name;
    this.emit(event);
    const rt = this.hmm.rt;
    return { session: c.session.id, backend: rt.backend, deviceCount: rt.deviceCount, granularity: rt.granularity(0), pid: process.pid };
  }

  /** Ids to attach: all weights and KV chunks by default; never another session's workspace. */
  private attachIds(session: HmmSession, ids: string[] | undefined): string[] {
    if (!ids) return this.hmm.store.all().filter((c) => c.plan.kind !== 'workspace').map((c) => c.plan.id);
    const unique = [...new Set(ids)];
    for (const id of unique) {
      if (this.hmm.store.isPending(id)) continue; // being made: attach waits for it
      const c = this.hmm.store.get(id); // NOT_FOUND for an unknown id, before anything is held
      if (c.plan.kind === 'workspace' && !session.attached.has(id)) {
        throw new InvalidArgumentError('ids', `chunks of the HMM ('${id}' is another session's workspace)`);
      }
    }
    return unique;
  }

  /**
   * Holds the chunks for the session and streams their handles in batches of at
   * most MAX_FDS_PER_MESSAGE; the last batch is the reply. A chunk still being made
   * (ChunkStore.allocateOffThread) is waited for when its batch comes: a scale's standby
   * executor imports the first targets while the driver makes the rest. All or nothing
   * on the daemon side: if an export fails, or a chunk waited for is not made, what this
   * request newly attached is dropped.
   */
  private async attach(c: Connection, session: HmmSession, id: number, ids: string[] | undefined): Promise<Reply<'attach'>> {
    const wanted = this.attachIds(session, ids);
    const added = wanted.filter((x) => !session.attached.has(x));
    const store = this.hmm.store;
    if (tracing) trace('daemon.attach', { chunks: wanted.length, pending: wanted.filter((x) => store.isPending(x)).length });
    try {
      // Held at once, those stored already: nothing frees them while the batches go out.
      session.attach(wanted.filter((x) => store.has(x)));
      for (let at = 0; ; at += MAX_FDS_PER_MESSAGE) {
        const slice = wanted.slice(at, at + MAX_FDS_PER_MESSAGE);
        const making = slice.filter((x) => !store.has(x));
        if (making.length > 0) {
          await Promise.all(making.map((x) => store.whenStored(x)));
          if (c.isClosed) throw new HmmProtocolError('DISCONNECTED', 'the client left during its attach');
        }
        const batch = this.exportBatch(c, session, session.attach(slice)); // the pending ones held from here
        if (at + MAX_FDS_PER_MESSAGE >= wanted.length) {
          trace('daemon.attach-exported');
          return { result: batch.batch, fds: batch.fds };
        }
        await c.send({ id, ok: true, partial: true, ...batch.batch }, batch.fds);
        if (c.isClosed) throw new HmmProtocolError('DISCONNECTED', 'the client left during its attach');
        // A turn of the event loop between batches (exports of chunks made since the last attach cost
        // ~60-100 us each on CUDA): thousands of chunks never hold this process's thread at once.
        await new Promise<void>((r) => setImmediate(r));
      }
    } catch (e) {
      session.detach(added);
      throw e;
    }
  }

  private exportBatch(c: Connection, session: HmmSession, entries: ChunkBatch['entries']): { batch: ChunkBatch; fds: number[] } {
    const fds: number[] = [];
    const handles: WireHandle[] = [];
    for (const e of entries) handles.push(this.wireHandle(c, session.exportChunk(e.id), fds));
    return { batch: { entries, handles }, fds };
  }

  /** An exported handle as it travels: fds ride along with the message; ACL handles are whitelisted for the client first. */
  private wireHandle(c: Connection, h: SharedHandle, fds: number[]): WireHandle {
    if (h.kind === 'fd') {
      fds.push(h.fd);
      return { kind: 'fd', index: fds.length - 1 };
    }
    this.hmm.rt.allowImport(h, [c.importPid]);
    return { kind: 'acl', handle: h.handle.toString() };
  }

  private workspace(c: Connection, session: HmmSession, device: number, size: number): Reply<'workspace'> {
    const entry = session.allocateWorkspace(device, size);
    try {
      const fds: number[] = [];
      const handle = this.wireHandle(c, session.exportChunk(entry.id), fds);
      return { result: { entry, handle }, fds };
    } catch (e) {
      session.detach([entry.id]);
      throw e;
    }
  }

  /**
   * On-device checksum. The chunk is held for the duration, so a detach or
   * release by another connection meanwhile cannot free memory a kernel reads.
   */
  private async checksum(tensor: string | undefined, chunk: string | undefined): Promise<bigint> {
    const store = this.hmm.store;
    const id = tensor !== undefined ? store.tensor(tensor).chunk.plan.id : chunk!; // lowest-device replica of a tensor
    const holder = `checksum:${this.hmm.nextId()}`;
    store.retain(id, holder);
    try {
      return await (tensor !== undefined ? store.checksumTensor(tensor) : store.checksumChunk(id));
    } finally {
      store.release(id, holder);
    }
  }

  private stats(): Result<'stats'> {
    return {
      devices: this.hmm.accounting(),
      sessions: this.sessionCount,
      chunks: this.hmm.store.size,
      kvRequests: this.hmm.kv.requests().length,
    };
  }
}
