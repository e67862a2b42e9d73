// A progress bar for long commands (loading weights). On a terminal it redraws
// one line in place; elsewhere (CI logs, files, pipes) carriage returns would
// pile up into one unreadable line, so it prints a plain line every 10% instead.

export interface ProgressBar {
  /** Reports `done` of `total` bytes. */
  update(done: number, total: number): void;
  /** Prints the final state and ends the line. Idempotent. */
  finish(): void;
}

export interface ProgressStream {
  write(text: string): unknown;
  isTTY?: boolean;
  columns?: number;
}

const GIB = 1024 ** 3;
const REDRAW_MS = 100;

const gib = (n: number) => (n / GIB).toFixed(2);

/** "label  42.0%  1.23/2.93 GiB  1.52 GiB/s" */
export function progressLine(label: string, done: number, total: number, seconds: number): string {
  const pct = total > 0 ? (100 * done) / total : 100;
  const rate = seconds > 0 ? `${gib(done / seconds)} GiB/s` : '-- GiB/s';
  return `${label}  ${pct.toFixed(1).padStart(5)}%  ${gib(done)}/${gib(total)} GiB  ${rate}`;
}

export function createProgressBar(label: string, stream: ProgressStream = process.stderr,
  now: () => number = () => performance.now()): ProgressBar {
  const start = now();
  const tty = stream.isTTY === true;
  let done = 0;
  let total = 0;
  let lastDraw = -Infinity;
  let lastDecile = -1;
  let finished = false;
  const line = () => progressLine(label, done, total, (now() - start) / 1000);

  // \r then "erase line", so a shorter line leaves no tail of the longer one behind it.
  const redraw = () => {
    const text = line();
    const width = stream.columns && stream.columns > 1 ? stream.columns - 1 : text.length;
    stream.write(`\r\x1b[2K${text.slice(0, width)}`);
    lastDraw = now();
  };

  return {
    update(d: number, t: number) {
      if (finished) return;
      done = d;
      total = t;
      if (tty) {
        if (now() - lastDraw >= REDRAW_MS) redraw();
        return;
      }
      const decile = total > 0 ? Math.floor((10 * done) / total) : 10;
      if (decile > lastDecile) {
        lastDecile = decile;
        stream.write(`${line()}\n`);
      }
    },
    finish() {
      if (finished) return;
      finished = true;
      if (tty) {
        redraw();
        stream.write('\n');
      } else if (lastDecile < 10 || done < total) {
        stream.write(`${line()}\n`);
      }
    },
  };
}
