#!/usr/bin/env node
// Child of bench-hmm.mjs: a fresh process that attaches to the HMM daemon and
// maps every chunk zero-copy. Prints one JSON line with its timings and the
// on-device checksum of one tensor, computed here through its own mapping.
//   node scripts/bench-hmm-attach.mjs SOCKET TENSOR
import { BASIC_KERNELS_SOURCE, Runtime, arg } from '../dist/index.js';
import { HmmClient } from '../dist/hmm/client.js';

const [socket, tensor] = process.argv.slice(2);
const t0 = performance.now();
const rt = Runtime.open({});
rt.devices(); // contexts exist before the clock for the attach starts, as in a pre-started standby executor
const t1 = performance.now();
const client = await HmmClient.connect(socket, rt, { name: 'bench-attach' });
const t2 = performance.now();
const set = await client.attach();
const t3 = performance.now();
const bytes = set.entries.reduce((a, e) => a + e.size, 0);
const entry = set.entries.find((e) => e.tensors.some((t) => t.name === tensor));
const loc = entry.tensors.find((t) => t.name === tensor);
const mod = await rt.loadModule(entry.device, { format: 'cuda', data: BASIC_KERNELS_SOURCE });
const g = rt.granularity(entry.device);
const out = rt.createChunk(entry.device, g);
const range = rt.reserve(g);
range.map(0, out);
range.setAccess(0, g, [entry.device]);
const s = rt.createStream(entry.device);
s.memset(range.at(0), 0, 8);
s.launch(mod.kernel('emoe_checksum_u32'), { grid: 1024, block: 256 }, [range.at(0), set.tensor(tensor, entry.device), arg.u64(Math.floor(loc.bytes / 4))]);
const raw = await rt.read(range.at(0), 8, s);
const checksum = new DataView(raw.buffer).getBigUint64(0, true).toString();
const t4 = performance.now();
const chunks = set.entries.length;
const timings = { ...set.timings };
set.dispose();
await client.close();
process.stdout.write(`${JSON.stringify({ openMs: t1 - t0, connectMs: t2 - t1, attachMs: t3 - t2, checksumMs: t4 - t3, chunks, bytes, checksum, ...timings })}\n`);
