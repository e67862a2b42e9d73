// An opt-in event trace across the deployment's processes, for finding where time goes (which
// process did what while a serving step stalled). When ELASTICMOE_TRACE names a file, trace()
// appends one JSON line per event, { t: epoch ms (sub-ms), pid, ev, ...detail }, every process to
// the same file (one appending write per line); otherwise it does nothing. Diagnostics only: the
// write is synchronous, so leave it off when measuring anything but where time goes.
import { appendFileSync } from 'node:fs';

const file = process.env.ELASTICMOE_TRACE ?? '';

/** Whether ELASTICMOE_TRACE is set in this process. */
export const tracing = file !== '';

/** Appends `ev` to the trace file (best effort; a no-op unless tracing). */
export function trace(ev: string, detail?: Record<string, unknown>): void {
  if (!tracing) return;
  try {
    appendFileSync(file, `${JSON.stringify({ t: performance.timeOrigin + performance.now(), pid: process.pid, ev, ...detail })}\n`);
  } catch {
    // Tracing never fails the traced work.
  }
}
