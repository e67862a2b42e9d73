// The contract between the N-API addon (native/napi) and the TypeScript runtime.
// Nothing outside src/runtime imports this file: everything else uses the typed
// wrappers. Sizes and offsets are JS numbers (validated safe, non-negative
// integers); device addresses appear only as bigint, for logging.

export type BackendName = 'cuda' | 'acl' | 'mock';

/** What every native failure carries. Thrown through the factory set by setErrorFactory. */
export interface NativeStatus {
  /** INVALID_ARGUMENT | OUT_OF_MEMORY | BACKEND_UNAVAILABLE | INVALID_HANDLE | ILLEGAL_ADDRESS |
   *  NOT_SUPPORTED | PEER_ACCESS | NOT_FOUND | COMPILE | FAULT_INJECTED | INTERNAL */
  kind: string;
  backend: string;
  api: string;
  code: number;
  codeName: string;
  message: string;
  /** For INVALID_ARGUMENT: the argument's name. Empty otherwise. */
  argument: string;
}

export interface NativeBackendOptions {
  mockDevices?: number;
  /** Bytes per mock device. */
  mockCapacity?: number;
  cudaLibrary?: string;
  nvrtcLibrary?: string;
  aclLibrary?: string;
}

export interface NativeProbe {
  available: boolean;
  deviceCount: number;
  reason: string;
  library: string;
  version: string;
}

export interface NativeDeviceInfo {
  ordinal: number;
  name: string;
  totalBytes: number;
  freeBytes: number;
  ccMajor: number;
  ccMinor: number;
  multiprocessors: number;
  pciBusId: string;
}

export interface NativeChunk {
  readonly device: number;
  readonly size: number;
  /** cuda/mock: a new POSIX fd the caller owns; acl: the shareable handle as bigint. */
  export(): number | bigint;
  /** Idempotent. */
  release(): void;
  readonly released: boolean;
}

export interface NativeRange {
  readonly base: bigint;
  readonly size: number;
  /** Maps the whole chunk at offset. `size` defaults to the chunk size; any other value is rejected by the backend. */
  map(offset: number, chunk: NativeChunk, size?: number): void;
  unmap(offset: number, size: number): void;
  setAccess(offset: number, size: number, devices: number[]): void;
  /** Unmaps whatever is still mapped, then frees the reservation. Idempotent. */
  free(): void;
  readonly freed: boolean;
}

export interface NativeHostBuffer {
  /** External ArrayBuffer over pinned host memory; detached after free(). */
  readonly buffer: ArrayBuffer;
  readonly size: number;
  free(): void;
}

export interface NativeStream {
  readonly device: number;
  copy(dst: NativeRange, dstOffset: number, src: NativeRange, srcOffset: number, bytes: number): void;
  copyHostToDevice(dst: NativeRange, dstOffset: number, src: NativeHostBuffer, srcOffset: number, bytes: number): void;
  copyDeviceToHost(dst: NativeHostBuffer, dstOffset: number, src: NativeRange, srcOffset: number, bytes: number): void;
  memset(dst: NativeRange, dstOffset: number, value: number, bytes: number): void;
  /** A launch packed by packLaunch (kernel.ts): the words' layout is documented there and in stream_wrap.cc. */
  launchPacked(fn: NativeFunction, words: Uint32Array, ranges: NativeRange[]): void;
  waitEvent(event: NativeEvent): void;
  /** Work queued from now on is recorded into a graph instead of running. */
  beginCapture(): void;
  /** Ends the capture begun on this stream (also when it throws) and instantiates the graph. */
  endCapture(): NativeGraph;
  /** Ends the capture now; instantiates on the thread pool. */
  endCaptureAsync(): Promise<NativeGraph>;
  /** Resolves when all queued work is done; rejects with the async error (e.g. ILLEGAL_ADDRESS). */
  synchronize(): Promise<void>;
  synchronizeSync(): void;
  destroy(): void;
  readonly destroyed: boolean;
}

export interface NativeEvent {
  readonly device: number;
  record(stream: NativeStream): void;
  synchronize(): Promise<void>;
  synchronizeSync(): void;
  /** Milliseconds from `start` to this event (both recorded with timing on). */
  elapsedSince(start: NativeEvent): number;
  destroy(): void;
  readonly destroyed: boolean;
}

export interface NativeGraph {
  /** Queues one replay of the whole graph on `stream`. */
  launch(stream: NativeStream): void;
  /** Idempotent; launches already queued still run. */
  destroy(): void;
  readonly destroyed: boolean;
}

export interface NativeFunction {
  readonly name: string;
}

export interface NativeModule {
  readonly log: string;
  getFunction(name: string): NativeFunction;
  unload(): void;
}

export interface NativeBackend {
  readonly name: BackendName;
  deviceCount(): number;
  deviceInfo(device: number): NativeDeviceInfo;
  canAccessPeer(device: number, peer: number): boolean;
  granularity(device: number): number;
  reserveRange(size: number, alignment: number): NativeRange;
  /** `count` ranges of `size` bytes cut from one reservation, freed with the last of them. */
  reserveRanges(count: number, size: number): NativeRange[];
  createChunk(device: number, size: number, exportable: boolean): NativeChunk;
  /** One new chunk mapped over each range (exactly `size` bytes, empty) with access for `access`, on a worker thread; all or nothing. */
  createMappedChunks(device: number, size: number, exportable: boolean, ranges: NativeRange[], access: number[], exportNow?: boolean): Promise<NativeChunk[]>;
  /** cuda/mock: `shareable` is an fd (the caller still owns it); acl: bigint handle. */
  importChunk(shareable: number | bigint, device: number, size: number): NativeChunk;
  allowImport(shareable: number | bigint, pids: number[]): void;
  importPid(): number;
  hostAlloc(size: number): NativeHostBuffer;
  createStream(device: number): NativeStream;
  createEvent(device: number, timing: boolean): NativeEvent;
  /** format: 'ptx' | 'cubin' | 'cuda' (NVRTC source) | 'ascend' (binary path). Compiles off the main thread. */
  loadModule(device: number, format: string, data: string | Uint8Array, name: string,
             options: string[]): Promise<NativeModule>;
  resetDevice(device: number): void;
  injectFault(op: string, nth: number, kind: string): void;
  clearFaults(): void;
}

export interface NativePeerCredentials { pid: number; uid: number; gid: number }

/** A connected AF_UNIX SOCK_SEQPACKET socket that carries messages with file descriptors. */
export interface NativeChannel {
  readonly fd: number;
  /**
   * Sends one message; fds are duplicated into the peer (SCM_RIGHTS). Messages of any size (fragmented natively).
   * Waits on this thread while the socket is full (10 s at most).
   */
  send(data: Uint8Array, fds: number[]): undefined;
  /**
   * Sends the message's records from byte `offset` on (0 first, then what the last call returned; fds ride on
   * the first record) as far as the socket has room now, never waiting: the offset reached (the length once
   * sent whole), or -1 when there was room for none.
   */
  send(data: Uint8Array, fds: number[], offset: number): number;
  /** Starts delivering messages on the event loop (uv_poll). Received fds belong to the callee. */
  start(onMessage: (data: Buffer, fds: number[]) => void, onClose: (error?: Error) => void, maxMessageBytes?: number): void;
  peerCredentials(): NativePeerCredentials;
  ref(): void;
  unref(): void;
  close(): void;
}

export interface NativeListener {
  readonly path: string;
  close(): void;
  ref(): void;
  unref(): void;
}

export interface NativeBinding {
  readonly napiVersion: number;
  setErrorFactory(factory: (status: NativeStatus) => Error): void;
  compiledBackends(): BackendName[];
  probe(name: BackendName, options: NativeBackendOptions): NativeProbe;
  openBackend(name: BackendName, options: NativeBackendOptions): NativeBackend;
  /** Creates the socket file with `mode` (e.g. 0o600), listening for SOCK_SEQPACKET connections. */
  listenUnix(path: string, mode: number, onConnection: (channel: NativeChannel) => void): NativeListener;
  connectUnix(path: string): NativeChannel;
  /** Wraps an inherited, already connected SOCK_SEQPACKET fd (takes ownership). */
  channelFromFd(fd: number): NativeChannel;
  socketPair(): [NativeChannel, NativeChannel];
}
