// Parsing of command-line flag values shared by the commands: a clear InvalidArgumentError
// naming the flag, never a silent default for a bad value.
import { InvalidArgumentError } from '../runtime/errors.js';

/** An integer flag in min..max (default: no upper bound); `fallback` when absent. */
export function integerFlag(flag: string, text: string | undefined, fallback: number, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(n) || n < min || n > max) {
    throw new InvalidArgumentError(flag, `an integer in ${min}..${max === Number.MAX_SAFE_INTEGER ? 'N' : max} (got '${text}')`);
  }
  return n;
}

/** A seed flag: any integer, as a bigint (default 0). */
export function seedFlag(flag: string, text: string | undefined): bigint {
  try {
    return BigInt(text ?? '0');
  } catch {
    throw new InvalidArgumentError(flag, `an integer (got '${text}')`);
  }
}
