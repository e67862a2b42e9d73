// OpenAI-style error bodies: `{ error: { message, type, param, code } }` with a
// 4xx status for anything the client got wrong and 5xx for the server's own
// failures. Every error a route throws, and every error Fastify raises before a
// route runs (bad JSON, body too large, wrong content type), ends up here.
import type { ZodError, ZodIssue } from 'zod';

import { EngineClosedError } from '../executor/engine.js';
import { InvalidArgumentError } from '../runtime/errors.js';

export type ErrorType = 'invalid_request_error' | 'not_found_error' | 'server_error' | 'not_implemented_error' | 'conflict_error';

export interface ErrorBody {
  error: { message: string; type: ErrorType; param: string | null; code: string | null };
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type: ErrorType = status >= 500 ? 'server_error' : 'invalid_request_error',
    readonly param: string | null = null,
    readonly code: string | null = null,
  ) {
    super(message);
    this.name = 'ApiError';
  }

  body(): ErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

export const badRequest = (message: string, param: string | null = null, code: string | null = null) =>
  new ApiError(400, message, 'invalid_request_error', param, code);

/** "messages[0].content" from a zod path. */
export function paramPath(path: ReadonlyArray<string | number>): string {
  let out = '';
  for (const p of path) out += typeof p === 'number' ? `[${p}]` : out ? `.${p}` : p;
  return out;
}

/** Words for the fields whose zod union errors would otherwise read "Invalid input". */
const EXPECTED: Record<string, string> = {
  stop: 'a string or an array of strings',
  content: 'a string or an array of text parts ({"type": "text", "text": "..."})',
};

function issueError(issue: ZodIssue): ApiError {
  const param = paramPath(issue.path) || null;
  const last = issue.path[issue.path.length - 1];
  switch (issue.code) {
    case 'unrecognized_keys': {
      const keys = issue.keys.map((k) => (param ? `${param}.${k}` : k));
      return badRequest(`Unrecognized request argument supplied: ${keys.join(', ')}`, keys[0]!, 'unknown_parameter');
    }
    case 'invalid_type':
      if (param === null) return badRequest(`The request body must be a JSON object (got ${issue.received})`, null, 'invalid_body');
      if (issue.received === 'undefined') return badRequest(`Missing required parameter: '${param}'`, param, 'missing_required_parameter');
      return badRequest(`Invalid type for '${param}': expected ${issue.expected}, got ${issue.received}`, param, 'invalid_type');
    case 'invalid_union':
      return badRequest(`Invalid value for '${param}': expected ${EXPECTED[String(last)] ?? 'another type'}`, param, 'invalid_type');
    case 'invalid_enum_value':
      return badRequest(`Invalid value for '${param}': expected one of ${issue.options.map((o) => `'${String(o)}'`).join(', ')}, got '${String(issue.received)}'`, param, 'invalid_value');
    case 'invalid_literal':
      return badRequest(`Invalid value for '${param}': expected ${JSON.stringify(issue.expected)}`, param, 'invalid_value');
    default:
      return badRequest(`Invalid value for '${param ?? 'body'}': ${issue.message}`, param, 'invalid_value');
  }
}

/** The first issue of a zod error as an ApiError (unknown fields first: they usually explain the rest). */
export function fromZod(error: ZodError): ApiError {
  const issues = error.issues;
  return issueError(issues.find((i) => i.code === 'unrecognized_keys') ?? issues[0]!);
}

/** Fastify's own errors (raised before a route runs) by code. */
const FASTIFY: Record<string, (e: Error) => ApiError> = {
  FST_ERR_CTP_BODY_TOO_LARGE: () => new ApiError(413, 'Request body too large', 'invalid_request_error', null, 'request_too_large'),
  FST_ERR_CTP_INVALID_MEDIA_TYPE: (e) => new ApiError(415, `Unsupported content type: send JSON with 'Content-Type: application/json' (${e.message})`, 'invalid_request_error', null, 'unsupported_media_type'),
  FST_ERR_CTP_EMPTY_JSON_BODY: () => badRequest("The request body is empty but 'Content-Type' is 'application/json'", null, 'invalid_json'),
  FST_ERR_CTP_INVALID_JSON_BODY: (e) => badRequest(`The request body is not valid JSON: ${e.message}`, null, 'invalid_json'),
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: () => badRequest('The request body length does not match Content-Length', null, 'invalid_body'),
};

/** Any error as an ApiError: the status and body the client gets. */
export function toApiError(e: unknown, bodyLimit?: number): ApiError {
  if (e instanceof ApiError) return e;
  if (e instanceof EngineClosedError) return new ApiError(503, 'The server is shutting down', 'server_error', null, 'shutting_down');
  if (e instanceof InvalidArgumentError) return badRequest(e.message, null, 'invalid_value');
  const err = e instanceof Error ? e : new Error(String(e));
  const code = (err as { code?: unknown }).code;
  if (code === 'FST_ERR_CTP_BODY_TOO_LARGE' && bodyLimit !== undefined) {
    return new ApiError(413, `Request body too large: the limit is ${bodyLimit} bytes`, 'invalid_request_error', null, 'request_too_large');
  }
  if (typeof code === 'string' && FASTIFY[code]) return FASTIFY[code]!(err);
  const status = (err as { statusCode?: unknown }).statusCode;
  if (typeof status === 'number' && status >= 400 && status < 500) {
    // A JSON syntax error from the body parser, or another client error Fastify detected.
    const message = err instanceof SyntaxError ? `The request body is not valid JSON: ${err.message}` : err.message;
    return new ApiError(status, message, 'invalid_request_error', null, err instanceof SyntaxError ? 'invalid_json' : null);
  }
  return new ApiError(500, `Internal server error: ${err.message}`, 'server_error', null, 'internal_error');
}
