// Streams (ordered queues of copies and launches on one device) and events.
import { InvalidArgumentError } from './errors.js';
import { Graph } from './graph.js';
import { type Kernel, type KernelArg, packLaunch } from './kernel.js';
import { DevicePointer, HostBuffer, checkSize } from './memory.js';
import type { NativeEvent, NativeStream } from './native-types.js';

export type Dim3 = number | [number, number?, number?];

function dim3(name: string, d: Dim3): [number, number, number] {
  const v = typeof d === 'number' ? [d] : d;
  const out: [number, number, number] = [v[0] ?? 1, v[1] ?? 1, v[2] ?? 1];
  for (const x of out) {
    if (!Number.isInteger(x) || x < 1 || x > 0x7fffffff) throw new InvalidArgumentError(name, 'positive integers');
  }
  return out;
}

function isThenable(value: unknown): value is PromiseLike<unknown> {
  return typeof value === 'object' && value !== null && typeof (value as { then?: unknown }).then === 'function';
}

export interface LaunchDims {
  grid: Dim3;
  block: Dim3;
  sharedBytes?: number;
}

export class Event implements Disposable {
  /** Its device (fixed: read from the addon once). */
  readonly device: number;
  /** @internal */
  constructor(readonly native: NativeEvent) {
    this.device = native.device;
  }
  record(stream: Stream): this {
    this.native.record(stream.native);
    return this;
  }
  synchronize(): Promise<void> {
    return this.native.synchronize();
  }
  /** Milliseconds from `start` to this event; both need timing. */
  elapsedSince(start: Event): number {
    return this.native.elapsedSince(start.native);
  }
  dispose(): void {
    this.native.destroy();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}

export class Stream implements Disposable {
  /** Its device (fixed: read from the addon once; steps ask for it on every launch). */
  readonly device: number;
  /** @internal */
  constructor(readonly native: NativeStream) {
    this.device = native.device;
  }

  /** Device to device, within one device or across devices (the stream's device needs access to both). */
  copy(dst: DevicePointer, src: DevicePointer, bytes: number): this {
    this.native.copy(dst.range.native, dst.offset, src.range.native, src.offset, checkSize('bytes', bytes));
    return this;
  }
  upload(dst: DevicePointer, src: HostBuffer, bytes = src.size, srcOffset = 0): this {
    this.native.copyHostToDevice(dst.range.native, dst.offset, src.native, srcOffset, checkSize('bytes', bytes));
    return this;
  }
  download(dst: HostBuffer, src: DevicePointer, bytes = dst.size, dstOffset = 0): this {
    this.native.copyDeviceToHost(dst.native, dstOffset, src.range.native, src.offset, checkSize('bytes', bytes));
    return this;
  }
  memset(dst: DevicePointer, value: number, bytes: number): this {
    if (!Number.isInteger(value) || value < 0 || value > 255) throw new InvalidArgumentError('value', 'a byte (0..255)');
    this.native.memset(dst.range.native, dst.offset, value, checkSize('bytes', bytes));
    return this;
  }
  launch(kernel: Kernel, dims: LaunchDims, args: readonly KernelArg[]): this {
    const { words, ranges } = packLaunch(dim3('grid', dims.grid), dim3('block', dims.block), dims.sharedBytes ?? 0, args);
    this.native.launchPacked(kernel.native, words, ranges);
    return this;
  }
  /** Later work on this stream waits for the event's latest record. */
  wait(event: Event): this {
    this.native.waitEvent(event.native);
    return this;
  }
  /** Resolves when everything queued has run; rejects with the first asynchronous error. */
  synchronize(): Promise<void> {
    return this.native.synchronize();
  }

  /**
   * Starts recording: copies, fills, launches, event records and waits queued on
   * this stream are captured into a graph instead of running. A stream that
   * waits on an event recorded here during the capture joins it (a fork); make
   * this stream wait on an event recorded on that stream after its last
   * captured work (a join) before endCapture. While capturing, synchronize()
   * rejects and invalidates the capture (NotSupportedError), as does waiting on
   * an event recorded outside the capture: wait for outside work before
   * beginCapture.
   */
  beginCapture(): this {
    this.native.beginCapture();
    return this;
  }
  /**
   * Ends the capture begun on this stream and returns the instantiated graph.
   * The capture ends even when this throws: NotSupportedError if an illegal
   * call invalidated it, InvalidArgumentError if a joined stream was not
   * joined back or this stream did not begin the capture.
   */
  endCapture(): Graph {
    return new Graph(this.native.endCapture());
  }
  /**
   * endCapture with the instantiation (host work, milliseconds for a thousand-node graph) on
   * the thread pool: the capture ends now, with endCapture's errors as rejections, and the
   * graph resolves once instantiated, while this thread keeps queueing other work (an engine
   * serving in the same process steps meanwhile).
   */
  endCaptureAsync(): Promise<Graph> {
    return this.native.endCaptureAsync().then((g) => new Graph(g));
  }
  /**
   * Captures what `body` queues (synchronously) into a graph. If `body` throws,
   * the capture is ended and discarded and the error is rethrown. A body that
   * returns a promise is refused: a capture left open across an await records
   * whatever else the process queues on this stream meanwhile.
   */
  capture(body: (stream: this) => void): Graph {
    this.beginCapture();
    let result: unknown;
    try {
      result = body(this);
    } catch (error) {
      this.discardCapture();
      throw error;
    }
    if (isThenable(result)) {
      this.discardCapture();
      result.then(undefined, () => {}); // its outcome no longer matters; keep it from going unhandled
      throw new InvalidArgumentError('body', 'a synchronous function (it returned a promise)');
    }
    return this.endCapture();
  }
  private discardCapture(): void {
    try {
      this.native.endCapture().destroy();
    } catch {
      // The capture has ended either way; the body's error is the one to report.
    }
  }

  dispose(): void {
    this.native.destroy();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}
