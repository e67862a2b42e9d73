// Assertions on thrown errors, shared by the test files.
import { expect } from 'vitest';

import { InvalidArgumentError } from '../../src/runtime/errors.js';

/** The error `fn` throws; the test fails when it returns. */
export function thrown(fn: () => unknown): unknown {
  try {
    fn();
  } catch (e) {
    return e;
  }
  return expect.unreachable(`expected ${fn.toString().slice(0, 80)} to throw`);
}

/** `fn` throws an InvalidArgumentError naming `argument` (equal, or matching a pattern). */
export function expectArgumentError(fn: () => unknown, argument: string | RegExp): void {
  const e = thrown(fn);
  expect(e).toBeInstanceOf(InvalidArgumentError);
  if (typeof argument === 'string') expect((e as InvalidArgumentError).argument).toBe(argument);
  else expect((e as InvalidArgumentError).argument).toMatch(argument);
}
