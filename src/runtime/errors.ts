// Typed errors for everything the runtime reports. Native failures arrive as a
// NativeStatus and are turned into one of these classes by errorFromStatus,
// which the loader hands to the addon (better-sqlite3 style), so native code
// throws the library's own error types.
import type { NativeStatus } from './native-types.js';

export type ErrorCode =
  | 'INVALID_ARGUMENT'
  | 'OUT_OF_MEMORY'
  | 'BACKEND_UNAVAILABLE'
  | 'INVALID_HANDLE'
  | 'ILLEGAL_ADDRESS'
  | 'NOT_SUPPORTED'
  | 'PEER_ACCESS'
  | 'NOT_FOUND'
  | 'COMPILE'
  | 'FAULT_INJECTED'
  | 'INTERNAL'
  | 'ADDON_LOAD';

export class ElasticMoeError extends Error {
  readonly code: ErrorCode;
  /** The native status when the error came from a backend call. */
  readonly status: NativeStatus | undefined;

  constructor(code: ErrorCode, message: string, status?: NativeStatus) {
    super(message);
    this.name = new.target.name;
    this.code = code;
    this.status = status;
  }

  /** Backend API that failed, e.g. "cuMemMap", when known. */
  get api(): string | undefined {
    return this.status?.api;
  }

  /** Backend code name, e.g. "CUDA_ERROR_OUT_OF_MEMORY", when known. */
  get codeName(): string | undefined {
    return this.status?.codeName;
  }
}

export class InvalidArgumentError extends ElasticMoeError {
  readonly argument: string;
  constructor(argument: string, expectation: string, status?: NativeStatus) {
    super('INVALID_ARGUMENT', status?.message || `Invalid argument: ${argument} must be ${expectation}`, status);
    this.argument = argument;
  }
}
export class OutOfMemoryError extends ElasticMoeError {}
export class BackendUnavailableError extends ElasticMoeError {}
export class InvalidHandleError extends ElasticMoeError {}
export class IllegalAddressError extends ElasticMoeError {}
export class NotSupportedError extends ElasticMoeError {}
export class PeerAccessError extends ElasticMoeError {}
export class NotFoundError extends ElasticMoeError {}
export class CompileError extends ElasticMoeError {}
export class FaultInjectedError extends ElasticMoeError {}
export class NativeBackendError extends ElasticMoeError {}
export class AddonLoadError extends ElasticMoeError {}

const HINTS: Partial<Record<ErrorCode, string>> = {
  OUT_OF_MEMORY: 'Free chunks you no longer need, or ask for less (fewer KV blocks, fewer experts per device).',
  ILLEGAL_ADDRESS:
    'The device stays unusable until it is reset (runtime.resetDevice); check that every range touched is mapped and that setAccess granted the device running the copy or kernel.',
  PEER_ACCESS: 'Use devices that can reach each other peer-to-peer (see `elasticmoe devices`).',
  BACKEND_UNAVAILABLE: 'Run `elasticmoe devices --backend auto` to see why each backend is unavailable.',
};

function formatStatus(s: NativeStatus): string {
  const head = `${s.backend}: ${s.api} failed${s.codeName ? ` (${s.codeName}${s.code ? ` ${s.code}` : ''})` : ''}`;
  return s.message ? `${head}: ${s.message}` : head;
}

/** Converts a native status into the matching typed error. */
export function errorFromStatus(s: NativeStatus): ElasticMoeError {
  const kind = s.kind as ErrorCode;
  if (kind === 'INVALID_ARGUMENT') return new InvalidArgumentError(s.argument || 'argument', 'valid', s);
  const hint = HINTS[kind];
  const message = hint ? `${formatStatus(s)}. ${hint}` : formatStatus(s);
  switch (kind) {
    case 'OUT_OF_MEMORY': return new OutOfMemoryError(kind, message, s);
    case 'BACKEND_UNAVAILABLE': return new BackendUnavailableError(kind, message, s);
    case 'INVALID_HANDLE': return new InvalidHandleError(kind, message, s);
    case 'ILLEGAL_ADDRESS': return new IllegalAddressError(kind, message, s);
    case 'NOT_SUPPORTED': return new NotSupportedError(kind, message, s);
    case 'PEER_ACCESS': return new PeerAccessError(kind, message, s);
    case 'NOT_FOUND': return new NotFoundError(kind, message, s);
    case 'COMPILE': return new CompileError(kind, message, s);
    case 'FAULT_INJECTED': return new FaultInjectedError(kind, message, s);
    default: return new NativeBackendError('INTERNAL', message, s);
  }
}
