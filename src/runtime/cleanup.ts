// Freeing several things where one failing must not keep the others: each step runs whatever the
// steps before it did, and the first error is rethrown once all have run (an engine's buffers on
// three devices, say, all freed though the first one's unmap was refused; what the backend refused
// stays to be freed again: memory.ts).

/** Runs every step in order, each whatever the ones before did; rethrows the first error after the last. */
export function runEach(steps: ReadonlyArray<() => void>): void {
  let failed: { error: unknown } | undefined;
  for (const step of steps) {
    try {
      step();
    } catch (e) {
      failed ??= { error: e };
    }
  }
  if (failed) throw failed.error;
}

/** As runEach, with steps that may be asynchronous (each awaited before the next). */
export async function runEachAsync(steps: ReadonlyArray<() => unknown>): Promise<void> {
  let failed: { error: unknown } | undefined;
  for (const step of steps) {
    try {
      await step();
    } catch (e) {
      failed ??= { error: e };
    }
  }
  if (failed) throw failed.error;
}
