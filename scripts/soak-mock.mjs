#!/usr/bin/env node
// A soak of the scale orchestrator on the mock backend: random scales between random device sets
// of 4 mock devices while requests stream in, some of them with a fault injected into an
// allocation, map, access grant, copy, stream or module load (the scale must roll back with the old
// layout serving), for SOAK_SECONDS (default 60). Checked throughout: every request completes
// exactly once with the tokens of a fixed layout; a failed scale leaves the devices unchanged; after
// each scale the deployment serves; at the end, with the deployment closed, every device's memory
// is free. SOAK_TABLES=1 turns the virtual expert tables on; SOAK_EXECUTOR=process runs every
// executor as a process (then some scales also kill the standby process mid-attach, and now and
// then the serving process is killed, between scales or during one: it must be replaced and every
// request go on);
// SOAK_SEED seeds the random choices; SOAK_OPTIONS (JSON) adds Deployment options, e.g.
// '{"observeLoad":{"every":2},"balanceOnScale":true}', and SOAK_PROCESS_OPTIONS the executor processes'
// (e.g. '{"initAhead":false,"preattach":false}'). Now and then the standby chunks are turned
// off and on again (setStandbyChunks) between scales. SOAK_DEBUG=1 prints the expert tables and the
// refused frees left just before close.
// Not part of the test suite (it runs for as long as asked); exits 1 at the first violation.
//   npx tsc -p tsconfig.json && SOAK_SECONDS=300 node scripts/soak-mock.mjs
import { fileURLToPath } from 'node:url';

import { parseConfig } from '../dist/model/config.js';
import { retryRefusedFrees } from '../dist/runtime/memory.js';
import { Runtime } from '../dist/runtime/runtime.js';
import { Deployment } from '../dist/scaling/orchestrator.js';

const seconds = Number(process.env.SOAK_SECONDS ?? 60);
const tables = process.env.SOAK_TABLES === '1';
let seed = Number(process.env.SOAK_SEED ?? 12345) >>> 0;
const random = () => {
  // xorshift32: the same choices for the same seed.
  seed ^= seed << 13; seed >>>= 0;
  seed ^= seed >>> 17;
  seed ^= seed << 5; seed >>>= 0;
  return seed / 2 ** 32;
};
const pick = (xs) => xs[Math.floor(random() * xs.length)];
/** SIGKILL, quietly for a process already gone. */
const kill9 = (pid) => {
  try {
    if (pid) process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
};

const MIB = 2 ** 20;
const CAPACITY = 128 * MIB;
const config = parseConfig({
  model_type: 'qwen3_moe', hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16,
  vocab_size: 97, num_experts: 8, moe_intermediate_size: 32, norm_topk_prob: true, num_experts_per_tok: 2, max_position_embeddings: 2048,
});
const scaleFor = (t) => (t.shape.length === 1 ? 1.0 : t.name.includes('embed_tokens') || t.name.includes('lm_head') ? 1.0 : 0.25);
const processes = process.env.SOAK_EXECUTOR === 'process';
const executor = processes
  ? { process: { script: fileURLToPath(new URL('../dist/executor/main.js', import.meta.url)), env: {
    ELASTICMOE_BACKEND: 'mock', ELASTICMOE_MOCK_DEVICES: '4', ELASTICMOE_MOCK_CAPACITY: String(128 * 2 ** 20), ELASTICMOE_NO_WARN_MOCK: '1',
  }, ...JSON.parse(process.env.SOAK_PROCESS_OPTIONS ?? '{}') } }
  : 'in-process';
const extra = JSON.parse(process.env.SOAK_OPTIONS ?? '{}');
const options = { config, seed: 20251002n, scaleFor, kvBlocksPerDevice: 512, maxTokensPerStep: 64, expertTables: tables, ...extra };
const PROMPTS = Array.from({ length: 8 }, (_, k) => Array.from({ length: 3 + ((k * 5) % 17) }, (_, i) => (i * 13 + k * 29 + 1) % 97));
const MAX = 200;
// Calls of a scale's making (not of serving steps: a failed step fails its requests with an error, by design).
const FAULT_OPS = ['CreateChunk', 'Map', 'SetAccess', 'ReserveRange', 'CopyDeviceToDevice', 'CreateStream', 'LoadModule', 'HostAlloc', 'ExportChunk',
  // SOAK_RELEASE_FAULTS=1: the calls that free too (a release after the switch-over is best effort).
  ...(process.env.SOAK_RELEASE_FAULTS === '1' ? ['Unmap', 'ReleaseChunk', 'FreeRange', 'DestroyStream', 'HostFree'] : [])];
const DEVICE_SETS = [[0], [1], [2], [3], [0, 1], [0, 2], [1, 3], [2, 3], [0, 1, 2], [1, 2, 3], [0, 2, 3], [0, 1, 2, 3]];

/** What happened, in order (printed with a violation: the scales during the request concerned). */
const events = [];
const fail = (msg, from = 0) => {
  console.error(`soak: VIOLATION: ${msg}`);
  for (const e of events.slice(from)) console.error(`  ${JSON.stringify(e)}`);
  process.exit(1);
};

// The reference: each prompt's greedy tokens on a fixed one-device layout.
const refRt = Runtime.open({ backend: 'mock', mockDevices: 4, mockCapacity: CAPACITY });
const fixed = await Deployment.start({ ...options, rt: refRt, devices: [0] });
const reference = (await Promise.all(PROMPTS.map((prompt) => fixed.submit({ prompt, maxTokens: MAX, ignoreEos: true })))).map((c) => c.outputTokens);
await fixed.close();
refRt.dispose();

const rt = Runtime.open({ backend: 'mock', mockDevices: 4, mockCapacity: CAPACITY });
const dep = await Deployment.start({ ...options, rt, devices: [0], executor });
const tally = { scales: 0, ok: 0, rolledBack: 0, faultsMissed: 0, stepFaults: 0, releaseErrors: 0, cancelled: 0 };
let submitted = 0;
let completed = 0;
const seen = new Set();
let stopping = false;
// A steady stream: 6 requests in flight, each replaced as it completes; every completion is checked.
const stream = async (slot) => {
  while (!stopping) {
    const k = (slot + submitted) % PROMPTS.length;
    const id = `s${submitted++}`;
    const from = events.length;
    // One request in ten is cancelled after a while (mid-generation, or during a scale): it ends
    // 'cancelled' with a prefix of the fixed layout's tokens, its KV blocks freed.
    const abort = random() < 0.1 ? new AbortController() : undefined;
    if (abort) setTimeout(() => abort.abort(), 1 + Math.floor(random() * 200)).unref();
    const c = await dep.submit({ id, prompt: PROMPTS[k], maxTokens: MAX, ignoreEos: true }, abort ? { signal: abort.signal } : {});
    if (c.finishReason === 'cancelled') tally.cancelled++;
    if (seen.has(id)) fail(`request ${id} completed twice`);
    seen.add(id);
    completed++;
    // A serving step that met an injected fault (the ops are shared: a step copies rows between
    // devices) fails its requests with an error, by design: the tokens before it must still be right.
    const stepFault = c.finishReason === 'error' && /injected fault/.test(String(c.error));
    if (stepFault) tally.stepFaults++;
    if (c.finishReason === 'cancelled' && !abort) fail(`request ${id} was cancelled though nobody cancelled it`, from);
    const want = stepFault || c.finishReason === 'cancelled' ? reference[k].slice(0, c.outputTokens.length) : reference[k];
    if (c.outputTokens.join(',') !== want.join(',')) {
      const at = c.outputTokens.findIndex((t, i) => t !== reference[k][i]);
      fail(`request ${id} (prompt ${k}) got other tokens than the fixed layout's from token ${at} of ${c.outputTokens.length} ` +
        `(finish ${c.finishReason}${c.error ? `: ${c.error}` : ''}); the scales meanwhile:`, from);
    }
  }
};
const streams = Array.from({ length: 6 }, (_, s) => stream(s).catch((e) => fail(`a request failed: ${e.stack ?? e}`)));

const t0 = performance.now();
while (performance.now() - t0 < seconds * 1000) {
  const to = pick(DEVICE_SETS);
  const before = dep.devices;
  const fault = random() < 0.5 ? { op: pick(FAULT_OPS), nth: 1 + Math.floor(random() * 40) } : undefined;
  // Executor processes: now and then the standby process is killed as the scale's attach phase starts,
  // or the serving process before the scale or during its prepare phase (recovered: invariant 6).
  const kill = processes && !fault && random() < 0.15;
  const killServing = processes && !kill && random() < 0.1 ? pick(['before', 'prepare', 'attach', 'switch', 'release']) : undefined;
  if (killServing === 'before') {
    events.push({ killServing: dep.executorPid });
    kill9(dep.executorPid);
  }
  if (random() < 0.5) await dep.settled(); // sometimes with the work ahead done, sometimes mid-way
  if (random() < 0.04) {
    const on = random() < 0.5;
    events.push({ standbyChunks: on });
    await dep.setStandbyChunks(on);
  }
  if (fault) rt.injectFault(fault.op, fault.nth);
  tally.scales++;
  const event = { scale: tally.scales, from: before, to, ...(fault ? { fault } : {}), ...(kill ? { kill: true } : {}), ...(killServing ? { killServing } : {}) };
  events.push(event);
  try {
    let killed = false;
    const r = await dep.scale({ devices: to }, kill || (killServing && killServing !== 'before') ? { onProgress: (p) => {
      if (kill && p.phase === 'attach') {
        kill9(dep.readyExecutorPid ?? dep.prestartedPid);
      }
      if (killServing && p.phase === killServing && !killed) {
        killed = true;
        kill9(dep.executorPid);
      }
    } } : {});
    if (r.releaseErrors) tally.releaseErrors++;
    event.ok = { ...(r.releaseErrors ? { releaseErrors: r.releaseErrors.length } : {}), copied: r.chunksCopied, prefilled: r.chunksPrefilled, fromStandby: r.chunksFromStandby, madeAhead: r.standbyMadeAhead !== undefined, switchover: r.switchover };
    tally.ok++;
    if (fault || kill) tally.faultsMissed++;
    if (dep.devices.join(',') !== to.join(',')) fail(`scaled to ${to} but serves on ${dep.devices}`);
  } catch (e) {
    if (!fault && !kill) fail(`a scale with no fault failed: ${e.stack ?? e}`);
    tally.rolledBack++;
    event.error = `${e.name}: ${e.message}`.slice(0, 200);
    if (dep.devices.join(',') !== before.join(',')) fail(`a failed scale left ${dep.devices} instead of ${before}`);
  } finally {
    rt.clearFaults();
    if (dep.standby.error) event.aheadError = `${dep.standby.error.name}: ${dep.standby.error.message}`.slice(0, 200);
  }
  // No device may have seen an illegal address (the mock poisons it, as CUDA's sticky error does).
  for (let d = 0; d < rt.deviceCount; d++) {
    try {
      rt.createChunk(d, rt.granularity(d)).dispose();
    } catch (e) {
      fail(`device ${d} unusable after scale ${tally.scales - 1}: ${e.message.slice(0, 160)}`, Math.max(0, events.length - 4));
    }
  }
  if (tally.scales % 20 === 0) {
    console.log(`soak: ${tally.scales} scales (${tally.ok} done, ${tally.rolledBack} rolled back, ${tally.faultsMissed} faults not hit), ` +
      `${completed} requests checked, ${((performance.now() - t0) / 1000).toFixed(0)} s`);
  }
}
stopping = true;
await Promise.all(streams);
if (process.env.SOAK_DEBUG) console.log("before close:", JSON.stringify(dep.expertTables?.devices.map((d) => [d.device, d.mapped, d.ahead]) ?? null), "refused frees left", retryRefusedFrees());
await dep.close();
const free = rt.devices().map((d) => d.freeBytes);
if (free.some((b) => b !== CAPACITY)) fail(`memory not all free after close: ${free.map((b) => (CAPACITY - b) / MIB).join(', ')} MiB held`);
rt.dispose();
if (processes) console.log(`soak: ${dep.executorRecoveries} serving processes replaced after they were killed`);
if (tally.releaseErrors > 0) console.log(`soak: ${tally.releaseErrors} scales were done with release errors (reported, freed later)`);
console.log(`soak: OK (tables ${tables ? 'on' : 'off'}, ${processes ? 'executor processes' : 'in process'}${process.env.SOAK_OPTIONS ? `, ${process.env.SOAK_OPTIONS}` : ''}): ${tally.scales} scales, ${tally.ok} done, ${tally.rolledBack} rolled back; ${completed} requests, each once with the fixed layout's tokens ` +
  `(${tally.stepFaults} ended early by a fault injected into a serving step and ${tally.cancelled} cancelled, right up to it); memory all free after close`);
