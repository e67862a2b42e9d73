// Loads the native addon. Tries each place in turn, and when none works throws
// one AddonLoadError listing every attempt and the possible solutions chosen
// from the error text (sharp-style). Tests may inject a binding object instead.
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { AddonLoadError, errorFromStatus } from './errors.js';
import type { NativeBinding } from './native-types.js';

const require = createRequire(import.meta.url);

/** Package root: this file is src/runtime/loader.ts or dist/runtime/loader.js. */
export const packageRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface LoadAttempt {
  source: string;
  error: string;
}

let cached: NativeBinding | undefined;
let injected: NativeBinding | undefined;

/** Replaces the addon for tests that drive error paths without rebuilding. Pass undefined to restore. */
export function injectBinding(binding: NativeBinding | undefined): void {
  injected = binding;
  if (binding) binding.setErrorFactory(errorFromStatus);
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message.split('\n')[0] ?? String(err) : String(err);
}

/** Chooses "possible solutions" from what the failures said. */
export function possibleSolutions(attempts: LoadAttempt[]): string[] {
  const text = attempts.map((a) => a.error).join('\n');
  const out: string[] = [];
  if (/No native build was found|Cannot find module|ENOENT/i.test(text)) {
    out.push('Build the addon from source: `npm run build:native` (needs python3, make and g++; CUDA and CANN are not needed to build).');
  }
  if (/GLIBC_|GLIBCXX_|CXXABI_/.test(text)) {
    out.push('The prebuilt binary needs a newer C library than this system has: build from source with `npm run build:native`.');
  }
  if (/invalid ELF header|wrong ELF class|cannot open shared object|exec format/i.test(text)) {
    out.push(`The binary was built for another platform; this is ${process.platform}-${process.arch}: rebuild with \`npm run build:native\`.`);
  }
  if (/undefined symbol/i.test(text)) {
    out.push('The build is stale or from another version: `npm run build:native` rebuilds it.');
  }
  if (process.platform !== 'linux') out.push('elasticmoe supports Linux only (memfd, SCM_RIGHTS, CUDA VMM, CANN).');
  if (out.length === 0) out.push('Reinstall with `npm install --foreground-scripts` and read the build output.');
  return out;
}

export function loadBinding(): NativeBinding {
  if (injected) return injected;
  if (cached) return cached;
  const attempts: LoadAttempt[] = [];
  const candidates: Array<{ source: string; load: () => unknown }> = [];
  const explicit = process.env.ELASTICMOE_ADDON;
  if (explicit) candidates.push({ source: `ELASTICMOE_ADDON=${explicit}`, load: () => require(path.resolve(explicit)) });
  candidates.push({
    source: `node-gyp-build (${packageRoot}: prebuilds/, build/Release, build/Debug)`,
    load: () => (require('node-gyp-build') as (dir: string) => unknown)(packageRoot),
  });
  for (const c of candidates) {
    try {
      const binding = c.load() as NativeBinding;
      if (typeof binding?.openBackend !== 'function') throw new Error('loaded module is not the elasticmoe addon');
      binding.setErrorFactory(errorFromStatus);
      cached = binding;
      return binding;
    } catch (err) {
      attempts.push({ source: c.source, error: describe(err) });
    }
  }
  const lines = [
    'Could not load the elasticmoe native addon.',
    'Attempts:',
    ...attempts.map((a) => `- ${a.source}: ${a.error}`),
    'Possible solutions:',
    ...possibleSolutions(attempts).map((s) => `- ${s}`),
  ];
  throw new AddonLoadError('ADDON_LOAD', lines.join('\n'));
}
