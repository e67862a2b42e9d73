// Element types the HMM stores, with their sizes and safetensors names.
export const DTYPES = {
  bf16: { bytes: 2, safetensors: 'BF16' },
  f16: { bytes: 2, safetensors: 'F16' },
  f32: { bytes: 4, safetensors: 'F32' },
  f64: { bytes: 8, safetensors: 'F64' },
  f8_e4m3: { bytes: 1, safetensors: 'F8_E4M3' },
  f8_e5m2: { bytes: 1, safetensors: 'F8_E5M2' },
  i8: { bytes: 1, safetensors: 'I8' },
  u8: { bytes: 1, safetensors: 'U8' },
  i16: { bytes: 2, safetensors: 'I16' },
  i32: { bytes: 4, safetensors: 'I32' },
  i64: { bytes: 8, safetensors: 'I64' },
  bool: { bytes: 1, safetensors: 'BOOL' },
} as const;

export type DType = keyof typeof DTYPES;

export function isDType(x: string): x is DType {
  return Object.prototype.hasOwnProperty.call(DTYPES, x);
}

export function dtypeBytes(d: DType): number {
  return DTYPES[d].bytes;
}

/** Our dtype for a safetensors dtype string, or undefined if we do not store it. */
export function fromSafetensors(name: string): DType | undefined {
  for (const [k, v] of Object.entries(DTYPES)) if (v.safetensors === name) return k as DType;
  return undefined;
}

export function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

export function tensorBytes(dtype: DType, shape: readonly number[]): number {
  return numel(shape) * dtypeBytes(dtype);
}
