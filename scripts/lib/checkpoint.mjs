// Shared by the benchmarks: a sharded bf16 safetensors checkpoint of the given
// tensor shapes, written by streaming a byte pattern (the values do not matter
// for timing), and a best-effort page-cache drop so the next read hits the disk.
import { spawnSync } from 'node:child_process';
import { closeSync, mkdirSync, openSync, writeFileSync, writeSync } from 'node:fs';
import path from 'node:path';

/** Writes `tensors` ([{ name, shape }]) as `files` safetensors shards plus model.safetensors.index.json. */
export function writePatternCheckpoint(dir, tensors, files = 8) {
  mkdirSync(dir, { recursive: true });
  const perFile = Math.ceil(tensors.length / files);
  const weightMap = {};
  const block = Buffer.alloc(64 * 1024 * 1024, 0x3c);
  for (let f = 0; f * perFile < tensors.length; f++) {
    const file = `model-${String(f + 1).padStart(5, '0')}.safetensors`;
    const header = {};
    let off = 0;
    for (const t of tensors.slice(f * perFile, (f + 1) * perFile)) {
      const bytes = t.shape.reduce((a, b) => a * b, 2);
      header[t.name] = { dtype: 'BF16', shape: t.shape, data_offsets: [off, off + bytes] };
      off += bytes;
      weightMap[t.name] = file;
    }
    let json = JSON.stringify(header);
    json += ' '.repeat((8 - (Buffer.byteLength(json) % 8)) % 8); // 8-aligned data, as the reference writer does
    const fd = openSync(path.join(dir, file), 'w');
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
    writeSync(fd, len);
    writeSync(fd, json);
    for (let left = off; left > 0; left -= block.length) writeSync(fd, block, 0, Math.min(block.length, left));
    closeSync(fd);
  }
  writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ weight_map: weightMap }));
}

/** Syncs and drops the page cache when allowed (root); returns whether it was dropped. */
export function dropPageCache() {
  spawnSync('sync');
  try {
    writeFileSync('/proc/sys/vm/drop_caches', '3');
    return true;
  } catch {
    return false;
  }
}
