// Unix-socket channels that carry messages together with file descriptors
// (SCM_RIGHTS): how chunk fds travel from the memory daemon to executors.
// The socket work is native (SOCK_SEQPACKET polled on the event loop); this file
// gives it a small promise/event API.
import { loadBinding } from './loader.js';
import type { NativeChannel, NativeListener, NativePeerCredentials } from './native-types.js';

/** How long a send waits for room in the socket (the native send()'s limit too). */
const SEND_TIMEOUT_MS = 10_000;

export interface ChannelMessage {
  data: Buffer;
  /** Received descriptors; the receiver owns them and must close them. */
  fds: number[];
}

export class UnixChannel implements Disposable {
  private readonly queue: ChannelMessage[] = [];
  private readonly waiters: Array<{ resolve: (m: ChannelMessage) => void; reject: (e: Error) => void }> = [];
  private closeError: Error | undefined;
  private isClosed = false;
  private handler: ((m: ChannelMessage) => void) | undefined;
  /** Resolves when the peer hangs up or the channel is closed. */
  readonly closed: Promise<Error | undefined>;

  /** @internal */
  constructor(readonly native: NativeChannel, maxMessageBytes?: number) {
    let done!: (e: Error | undefined) => void;
    this.closed = new Promise((r) => (done = r));
    native.start(
      (data, fds) => this.deliver({ data, fds }),
      (error) => {
        this.isClosed = true;
        this.closeError = error;
        for (const w of this.waiters.splice(0)) w.reject(error ?? new Error('channel closed by peer'));
        done(error);
      },
      maxMessageBytes,
    );
  }

  static connect(path: string): UnixChannel {
    return new UnixChannel(loadBinding().connectUnix(path));
  }
  /** Two connected ends, e.g. one kept and one handed to a child process as an fd. */
  static pair(): [UnixChannel, UnixChannel] {
    const [a, b] = loadBinding().socketPair();
    return [new UnixChannel(a), new UnixChannel(b)];
  }
  /** Wraps an inherited, connected SOCK_SEQPACKET descriptor (takes ownership). */
  static fromFd(fd: number): UnixChannel {
    return new UnixChannel(loadBinding().channelFromFd(fd));
  }

  get fd(): number {
    return this.native.fd;
  }

  private deliver(m: ChannelMessage): void {
    if (this.handler) return this.handler(m);
    const w = this.waiters.shift();
    if (w) w.resolve(m);
    else this.queue.push(m);
  }

  /**
   * Sends one message; the descriptors are duplicated into the peer (the sender keeps its own).
   * Blocks this thread while the socket is full (a peer that reads slowly), up to 10 s.
   */
  send(data: Uint8Array | string, fds: number[] = []): void {
    this.native.send(typeof data === 'string' ? Buffer.from(data) : data, fds);
  }

  /**
   * Sends one message like send(), but while the socket is full it waits on the event loop instead of
   * blocking this thread (retrying every millisecond), so a peer that reads slowly — an executor
   * importing each batch of chunk handles before it reads the next — does not stall this process.
   * A large message goes out a record at a time as room appears. Rejects once the peer has read
   * nothing for `timeoutMs` (default 10 s, send()'s limit); the channel is then closed if part of the
   * message had gone (the peer sees the end of the stream, never a corrupt message). Nothing else may
   * be sent on this channel until it settles: await each message before the next.
   */
  async sendWhenRoom(data: Uint8Array | string, fds: number[] = [], timeoutMs = SEND_TIMEOUT_MS): Promise<void> {
    const bytes = typeof data === 'string' ? Buffer.from(data) : data;
    let offset = 0;
    let progress = performance.now();
    for (;;) {
      const at = this.native.send(bytes, fds, offset);
      if (at === bytes.byteLength) return;
      if (at > offset) {
        offset = at;
        progress = performance.now();
      } else if (performance.now() - progress >= timeoutMs) {
        if (offset > 0) this.close();
        throw new Error(`sending on the channel failed: the peer read nothing for ${timeoutMs} ms`);
      }
      await new Promise<void>((r) => setTimeout(r, 1));
      if (this.isClosed) throw this.closeError ?? new Error('channel closed');
    }
  }

  /** Next message, in order. Rejects once the channel is closed. */
  receive(): Promise<ChannelMessage> {
    const m = this.queue.shift();
    if (m) return Promise.resolve(m);
    if (this.isClosed) return Promise.reject(this.closeError ?? new Error('channel closed'));
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }
  /** Delivers every message to `handler` instead of queueing them. */
  onMessage(handler: (m: ChannelMessage) => void): void {
    this.handler = handler;
    for (const m of this.queue.splice(0)) handler(m);
  }
  peerCredentials(): NativePeerCredentials {
    return this.native.peerCredentials();
  }
  /** Lets the process exit while the channel is open. */
  unref(): this {
    this.native.unref();
    return this;
  }
  ref(): this {
    this.native.ref();
    return this;
  }
  close(): void {
    this.native.close();
  }
  [Symbol.dispose](): void {
    this.close();
  }
}

export class UnixListener implements Disposable {
  private constructor(readonly native: NativeListener) {}

  /**
   * Listens on a socket file created with `mode` (default 0600, owner only).
   * `maxMessageBytes` closes a connection whose peer sends a larger message.
   */
  static listen(path: string, onConnection: (channel: UnixChannel) => void,
    { mode = 0o600, maxMessageBytes }: { mode?: number; maxMessageBytes?: number } = {}): UnixListener {
    return new UnixListener(loadBinding().listenUnix(path, mode, (ch) => onConnection(new UnixChannel(ch, maxMessageBytes))));
  }
  get path(): string {
    return this.native.path;
  }
  unref(): this {
    this.native.unref();
    return this;
  }
  ref(): this {
    this.native.ref();
    return this;
  }
  /** Stops listening and removes the socket file. */
  close(): void {
    this.native.close();
  }
  [Symbol.dispose](): void {
    this.close();
  }
}
