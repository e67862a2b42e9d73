// Streams (ordered queues of copies and launches on one device) and events.
import { InvalidArgumentError } from './errors.js';
import { type Kernel, type KernelArg, toNativeArgs } from './kernel.js';
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

export interface LaunchDims {
  grid: Dim3;
  block: Dim3;
  sharedBytes?: number;
}

export class Event implements Disposable {
  /** @internal */
  constructor(readonly native: NativeEvent) {}
  get device(): number {
    return this.native.device;
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
  /** @internal */
  constructor(readonly native: NativeStream) {}

  get device(): number {
    return this.native.device;
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
    this.native.launch(kernel.native, dim3('grid', dims.grid), dim3('block', dims.block), dims.sharedBytes ?? 0,
      toNativeArgs(args));
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
  dispose(): void {
    this.native.destroy();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}
