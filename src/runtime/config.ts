// Runtime options: backend choice and backend settings, from an options object
// and the environment, validated with zod so a typo is a clear error.
import { z } from 'zod';

import { InvalidArgumentError } from './errors.js';

export const BACKEND_CHOICES = ['auto', 'cuda', 'acl', 'mock'] as const;
export type BackendChoice = (typeof BACKEND_CHOICES)[number];

const MIB = 1024 * 1024;

/** Parses "8GiB", "512MiB", "1073741824". */
export function parseBytes(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB)?\s*$/i.exec(text);
  if (!m) throw new Error(`"${text}" is not a size (examples: 8GiB, 512MiB, 1073741824)`);
  const unit = (m[2] ?? 'B').toLowerCase();
  const scale = { b: 1, kib: 1024, mib: MIB, gib: 1024 * MIB, tib: 1024 * 1024 * MIB }[unit] ?? 1;
  return Math.round(Number(m[1]) * scale);
}

const bytes = z.union([z.number(), z.string().transform((s, ctx) => {
  try {
    return parseBytes(s);
  } catch (e) {
    ctx.addIssue({ code: z.ZodIssueCode.custom, message: (e as Error).message });
    return z.NEVER;
  }
})]);

export const RuntimeOptionsSchema = z
  .object({
    backend: z.enum(BACKEND_CHOICES).default('auto'),
    /** When auto finds no accelerator it uses the mock and warns; false makes that an error instead. */
    allowMock: z.boolean().default(true),
    mockDevices: z.number().int().min(1).max(64).default(4),
    mockCapacity: bytes
      .pipe(z.number().int().positive().refine((n) => n % (2 * MIB) === 0, 'must be a multiple of 2 MiB'))
      .default(8 * 1024 * MIB),
    cudaLibrary: z.string().min(1).optional(),
    nvrtcLibrary: z.string().min(1).optional(),
    aclLibrary: z.string().min(1).optional(),
    /**
     * The grouped expert matmul (ModelKernels.groupedMatmul): auto = tensor cores where every device
     * has them for bf16 (CUDA compute capability 8.0 and later; the mock), else CUDA cores. The two
     * differ by rounding, so one runtime's devices all use the same one. Forcing one is for A/B runs.
     */
    groupedMatmul: z.enum(['auto', 'tensor-cores', 'cuda-cores']).default('auto'),
  })
  .strict();

export type RuntimeOptionsInput = z.input<typeof RuntimeOptionsSchema>;
export type RuntimeOptions = z.output<typeof RuntimeOptionsSchema>;

const ENV: Record<string, keyof RuntimeOptionsInput> = {
  ELASTICMOE_BACKEND: 'backend',
  ELASTICMOE_MOCK_DEVICES: 'mockDevices',
  ELASTICMOE_MOCK_CAPACITY: 'mockCapacity',
  ELASTICMOE_CUDA_LIBRARY: 'cudaLibrary',
  ELASTICMOE_NVRTC_LIBRARY: 'nvrtcLibrary',
  ELASTICMOE_ACL_LIBRARY: 'aclLibrary',
  ELASTICMOE_GROUPED_MATMUL: 'groupedMatmul',
};

/** Options win over the environment; the environment wins over defaults. */
export function resolveRuntimeOptions(
  options: RuntimeOptionsInput = {},
  env: NodeJS.ProcessEnv = process.env,
): RuntimeOptions {
  const fromEnv: Record<string, unknown> = {};
  for (const [name, key] of Object.entries(ENV)) {
    const value = env[name];
    if (value === undefined || value === '') continue;
    fromEnv[key] = key === 'mockDevices' ? Number(value) : value;
  }
  const parsed = RuntimeOptionsSchema.safeParse({ ...fromEnv, ...options });
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const key = String(issue.path[0] ?? 'options');
    const envName = Object.entries(ENV).find(([, k]) => k === key)?.[0];
    const where = key in options ? `option ${key}` : envName && env[envName] ? `${envName}=${env[envName]}` : key;
    const expected = key === 'backend' ? `one of ${BACKEND_CHOICES.join(', ')}`
      : key === 'groupedMatmul' ? 'one of auto, tensor-cores, cuda-cores' : issue.message;
    throw new InvalidArgumentError(where, expected);
  }
  return parsed.data;
}
