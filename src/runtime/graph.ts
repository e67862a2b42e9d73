// Captured graphs: a stream's work recorded once (Stream.beginCapture ..
// Stream.endCapture) and replayed with one launch, to cut the host cost of
// launching many small kernels one by one.
import type { NativeGraph } from './native-types.js';
import type { Stream } from './stream.js';

/**
 * An instantiated graph. A launch replays every recorded copy, fill and kernel,
 * each on the device of the stream that captured it, in the captured dependency
 * order. Pointers and kernel arguments are the values captured; host buffers
 * are read (uploads) and written (downloads) when the graph runs, so refill an
 * input buffer between launches rather than capturing again. Keep every range
 * and host buffer the graph touches alive while the graph exists.
 */
export class Graph implements Disposable {
  /** @internal */
  constructor(readonly native: NativeGraph) {}

  get disposed(): boolean {
    return this.native.destroyed;
  }
  /** Queues one replay on `stream`: after the work already queued there, before the work queued later. */
  launch(stream: Stream): this {
    this.native.launch(stream.native);
    return this;
  }
  /** Idempotent. Launches already queued still run. */
  dispose(): void {
    this.native.destroy();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}
