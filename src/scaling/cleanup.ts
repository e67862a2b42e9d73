// Freeing several things where one failing must not keep the others: each step runs whatever the
// steps before it did, and the first error is rethrown once all have run (a KV pool left behind
// because an unmap before it failed would refuse the next scale onto its device).

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
