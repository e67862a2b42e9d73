// An opt-in event trace across the deployment's processes, for finding where time goes (which
// process did what while a serving step stalled). When ELASTICMOE_TRACE names a file, trace()
// appends one JSON line per event, { t: epoch ms (sub-ms), pid, ev, ...detail }, every process to
// the same file (one appending write per line); otherwise it does nothing. Diagnostics only: the
// write is synchronous, so leave it off when measuring anything but where time goes.
import { appendFileSync } from 'node:fs';

const file = process.env.ELASTICMOE_TRACE ?? '';

/** Whether ELASTICMOE_TRACE is set in this process. */
export const tracing = file !== '';

let failed = false;

/** Appends `ev` to the trace file (a no-op unless tracing). A file that cannot be written turns tracing off, said once on stderr. */
export function trace(ev: string, detail?: Record<string, unknown>): void {
  if (!tracing || failed) return;
  try {
    appendFileSync(file, `${JSON.stringify({ t: performance.timeOrigin + performance.now(), pid: process.pid, ev, ...detail })}\n`);
  } catch (e) {
    // Tracing never fails the traced work.
    failed = true;
    process.stderr.write(`elasticmoe: ELASTICMOE_TRACE=${file} cannot be written (${(e as Error).message}); tracing is off in process ${process.pid}\n`);
  }
}
