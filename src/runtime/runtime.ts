// The runtime: one opened backend and typed access to its devices, memory,
// streams and kernels. Backend selection lives here: `auto` probes cuda, then
// acl, in native code, and uses the mock only with a warning that says why.
import { resolveRuntimeOptions, type RuntimeOptions, type RuntimeOptionsInput } from './config.js';
import { BackendUnavailableError, InvalidArgumentError } from './errors.js';
import { Module, type ModuleSpec } from './kernel.js';
import { loadBinding } from './loader.js';
import { Chunk, type DevicePointer, HostBuffer, type SharedHandle, VirtualRange, checkSize } from './memory.js';
import type { BackendName, NativeBackend, NativeBackendOptions, NativeProbe } from './native-types.js';
import { Event, Stream } from './stream.js';

export interface BackendSelection {
  /** The backend in use. */
  backend: BackendName;
  /** What was asked for. */
  requested: RuntimeOptions['backend'];
  /** Probe result for every backend that was probed, in probe order. */
  probes: Partial<Record<BackendName, NativeProbe>>;
  /** One line: why this backend was chosen. */
  reason: string;
  /** True when `auto` found no accelerator and chose the mock. */
  mockFallback: boolean;
}

export interface DeviceInfo {
  ordinal: number;
  name: string;
  totalBytes: number;
  freeBytes: number;
  /** "9.0" on an H100; "" where the notion does not apply. */
  computeCapability: string;
  multiprocessors: number;
  pciBusId: string;
}

function nativeOptions(o: RuntimeOptions): NativeBackendOptions {
  const n: NativeBackendOptions = { mockDevices: o.mockDevices, mockCapacity: o.mockCapacity };
  if (o.cudaLibrary) n.cudaLibrary = o.cudaLibrary;
  if (o.nvrtcLibrary) n.nvrtcLibrary = o.nvrtcLibrary;
  if (o.aclLibrary) n.aclLibrary = o.aclLibrary;
  return n;
}

let warnedFallback = false;

/** Decides which backend to open, probing in native code. Never silently picks the mock. */
export function selectBackend(options: RuntimeOptions): BackendSelection {
  const binding = loadBinding();
  const native = nativeOptions(options);
  const probes: Partial<Record<BackendName, NativeProbe>> = {};
  if (options.backend !== 'auto') {
    const probe = binding.probe(options.backend, native);
    probes[options.backend] = probe;
    if (!probe.available) {
      throw new BackendUnavailableError('BACKEND_UNAVAILABLE',
        `backend ${options.backend} is unavailable: ${probe.reason}. ` +
        'Run `elasticmoe devices --backend auto` to see every backend, or choose another with ELASTICMOE_BACKEND.');
    }
    return { backend: options.backend, requested: options.backend, probes, reason: `${options.backend} was requested`, mockFallback: false };
  }
  for (const name of ['cuda', 'acl'] as const) {
    const probe = binding.probe(name, native);
    probes[name] = probe;
    if (probe.available) {
      return { backend: name, requested: 'auto', probes, reason: `${name}: ${probe.deviceCount} device(s) found`, mockFallback: false };
    }
  }
  const why = (['cuda', 'acl'] as const).map((n) => `${n} unavailable (${probes[n]?.reason})`).join('; ');
  if (!options.allowMock) {
    throw new BackendUnavailableError('BACKEND_UNAVAILABLE', `no accelerator backend is available: ${why}. ` +
      'Set ELASTICMOE_BACKEND=mock to run on the mock backend deliberately.');
  }
  probes.mock = binding.probe('mock', native);
  const reason = `no accelerator: ${why}; using the mock backend`;
  if (!warnedFallback && !process.env.ELASTICMOE_NO_WARN_MOCK) {
    warnedFallback = true;
    process.emitWarning(reason, { code: 'ELASTICMOE_MOCK_FALLBACK' });
  }
  return { backend: 'mock', requested: 'auto', probes, reason, mockFallback: true };
}

export class Runtime implements Disposable {
  private disposed = false;

  private constructor(readonly native: NativeBackend, readonly selection: BackendSelection, readonly options: RuntimeOptions) {}

  /** Opens a backend: options first, then ELASTICMOE_* environment variables, then defaults. */
  static open(input: RuntimeOptionsInput = {}): Runtime {
    const options = resolveRuntimeOptions(input);
    const selection = selectBackend(options);
    const native = loadBinding().openBackend(selection.backend, nativeOptions(options));
    return new Runtime(native, selection, options);
  }

  get backend(): BackendName {
    return this.native.name;
  }
  /** Devices of the backend (fixed once it is open: read once, every device argument is checked against it). */
  get deviceCount(): number {
    return (this.count ??= this.native.deviceCount());
  }
  private count: number | undefined;

  private device(d: number): number {
    if (!Number.isInteger(d) || d < 0 || d >= this.deviceCount) {
      throw new InvalidArgumentError('device', `an ordinal in 0..${this.deviceCount - 1}`);
    }
    return d;
  }

  deviceInfo(device: number): DeviceInfo {
    const i = this.native.deviceInfo(this.device(device));
    return {
      ordinal: i.ordinal,
      name: i.name,
      totalBytes: i.totalBytes,
      freeBytes: i.freeBytes,
      computeCapability: i.ccMajor || i.ccMinor ? `${i.ccMajor}.${i.ccMinor}` : '',
      multiprocessors: i.multiprocessors,
      pciBusId: i.pciBusId,
    };
  }
  devices(): DeviceInfo[] {
    return Array.from({ length: this.deviceCount }, (_, d) => this.deviceInfo(d));
  }
  canAccessPeer(device: number, peer: number): boolean {
    return this.native.canAccessPeer(this.device(device), this.device(peer));
  }
  /** matrix[i][j]: device i can reach device j peer-to-peer (false on the diagonal). */
  peerMatrix(): boolean[][] {
    const n = this.deviceCount;
    return Array.from({ length: n }, (_, i) => Array.from({ length: n }, (_, j) => i !== j && this.canAccessPeer(i, j)));
  }
  granularity(device = 0): number {
    return this.native.granularity(this.device(device));
  }
  /** Rounds bytes up to the device's allocation granularity. */
  roundUp(bytes: number, device = 0): number {
    const g = this.granularity(device);
    return Math.ceil(checkSize('bytes', bytes) / g) * g;
  }

  reserve(size: number, alignment = 0): VirtualRange {
    return new VirtualRange(this.native.reserveRange(checkSize('size', size, { positive: true }), alignment));
  }
  /**
   * `count` ranges of `size` bytes (a multiple of the granularity) cut from one reservation: one
   * driver call instead of `count` (with a few thousand ranges in the process, one reservation
   * cost 40-170 µs on H100). Each behaves as a range of its own; the reservation is freed with
   * the last of them.
   */
  reserveMany(count: number, size: number): VirtualRange[] {
    if (!Number.isSafeInteger(count) || count < 1) throw new InvalidArgumentError('count', `a positive integer (got ${String(count)})`);
    return this.native.reserveRanges(count, checkSize('size', size, { positive: true })).map((n) => new VirtualRange(n));
  }
  createChunk(device: number, size: number, { exportable = false } = {}): Chunk {
    return new Chunk(this.native.createChunk(this.device(device), checkSize('size', size, { positive: true }), exportable));
  }
  /**
   * A new chunk of `device` mapped over each of `ranges` (each exactly `size` bytes, nothing mapped
   * in it) with read/write for `access`, made off the main thread: the driver's create, map and
   * set-access (0.1-0.2 ms a chunk on H100/H200) leave the event loop free. All or nothing: on
   * failure nothing is left mapped. Until it settles the ranges refuse map, unmap, setAccess and
   * dispose. `exportNow` (exportable chunks): each is exported there too, and its first export()
   * hands that handle out at once (an HMM daemon's attach then exports nothing on its thread).
   */
  async createMappedChunks(device: number, size: number, ranges: readonly VirtualRange[], access: readonly number[],
    { exportable = false, exportNow = false } = {}): Promise<Chunk[]> {
    checkSize('size', size, { positive: true });
    const natives = await this.native.createMappedChunks(this.device(device), size, exportable, ranges.map((r) => r.native),
      access.map((d) => this.device(d)), exportNow);
    return natives.map((n) => new Chunk(n));
  }
  /** Imports a chunk exported by another process. For an fd the caller still owns it and closes it afterwards. */
  importChunk(handle: SharedHandle, device: number, size: number): Chunk {
    const shareable = handle.kind === 'fd' ? handle.fd : handle.handle;
    return new Chunk(this.native.importChunk(shareable, this.device(device), checkSize('size', size, { positive: true })));
  }
  /** ACL only: whitelists the importing processes (their importPid()) for an exported handle. */
  allowImport(handle: SharedHandle, pids: number[]): void {
    this.native.allowImport(handle.kind === 'fd' ? handle.fd : handle.handle, pids);
  }
  /** The pid an exporter must whitelist for this process. */
  importPid(): number {
    return this.native.importPid();
  }
  hostBuffer(size: number): HostBuffer {
    return new HostBuffer(this.native.hostAlloc(checkSize('size', size, { positive: true })));
  }
  createStream(device: number): Stream {
    return new Stream(this.native.createStream(this.device(device)));
  }
  createEvent(device: number, { timing = false } = {}): Event {
    return new Event(this.native.createEvent(this.device(device), timing));
  }
  async loadModule(device: number, spec: ModuleSpec): Promise<Module> {
    const native = await this.native.loadModule(this.device(device), spec.format, spec.data, spec.name ?? 'module.cu',
      spec.options ?? []);
    return new Module(native, device);
  }
  /** Copies bytes to the device through a temporary pinned buffer and waits. */
  async write(dst: DevicePointer, data: Uint8Array, stream: Stream): Promise<void> {
    const host = this.hostBuffer(Math.max(1, data.byteLength));
    try {
      host.bytes(0, data.byteLength).set(data);
      stream.upload(dst, host, data.byteLength);
      await stream.synchronize();
    } finally {
      host.dispose();
    }
  }
  /** Reads bytes from the device through a temporary pinned buffer. */
  async read(src: DevicePointer, bytes: number, stream: Stream): Promise<Uint8Array> {
    const host = this.hostBuffer(Math.max(1, checkSize('bytes', bytes)));
    try {
      stream.download(host, src, bytes);
      await stream.synchronize();
      return host.bytes(0, bytes).slice();
    } finally {
      host.dispose();
    }
  }
  /** Clears a sticky illegal-address state (cuda: resets the context; every resource of the device is lost). */
  resetDevice(device: number): void {
    this.native.resetDevice(this.device(device));
  }
  /** Mock only: the nth call (1-based, from now) of `op` fails with an error of `kind`. */
  injectFault(op: string, nth = 1, kind = 'FAULT_INJECTED'): void {
    this.native.injectFault(op, nth, kind);
  }
  clearFaults(): void {
    this.native.clearFaults();
  }

  /**
   * Drops this wrapper. Native objects hold the backend alive until their own
   * dispose or finalizer, so nothing already created breaks.
   */
  dispose(): void {
    this.disposed = true;
  }
  get isDisposed(): boolean {
    return this.disposed;
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}
