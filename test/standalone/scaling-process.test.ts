// Deployment with executor processes (DeploymentOptions.executor = { process }) on
// the mock backend: every layout's forward pass runs in a process of its own that
// attaches through the deployment's HMM daemon. (1) greedy tokens across a 1→2→1
// scale mid-generation equal a fixed in-process run; (2) a standby process dying
// during attach rolls the scale back: the old process keeps serving, device memory
// and chunks are exactly as before, and no standby process is left; (3) with an f32 KV
// cache (forward.kvDtype) the processes give the in-process f32 tokens, before and after a scale.
// The children run the compiled dist (`npx tsc -p .` first).
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import type { Completion } from '../../src/executor/engine.js';
import type { Runtime } from '../../src/runtime/runtime.js';
import { FaultInjectedError } from '../../src/runtime/errors.js';
import { Deployment, type DeploymentOptions, type ScaleProgress } from '../../src/scaling/orchestrator.js';
import { MIB } from '../helpers/mock.js';
import { closeAll, deploymentsOf, greedyTokens, tinyMoe } from '../helpers/tiny-moe.js';

const CHILD = path.resolve(__dirname, '../fixtures/executor-child.mjs');
const config = tinyMoe(1024);
const SEED = 20251002n;
const MAX = 800; // long enough to be mid-generation after a standby process has started (the steps go on meanwhile)
const PROMPTS = Array.from({ length: 6 }, (_, k) => Array.from({ length: 3 + ((k * 5) % 17) }, (_, i) => (i * 13 + k * 29 + 1) % 97));

let dir: string;
let dieFile: string;
// The child opens 4 mock devices of 256 MiB (executor-child.mjs): the same here.
const { opened, start } = deploymentsOf({ config, seed: SEED, capacity: 256 * MIB, kvBlocksPerDevice: 512 });
// initAhead off unless asked: these tests follow the process started ahead through the scale's attach phase.
const processMode = (prestart = true, preattach = true, initAhead = false): Partial<DeploymentOptions> => ({
  executor: { process: { script: CHILD, env: { ELASTICMOE_BACKEND: 'mock', ELASTICMOE_NO_WARN_MOCK: '1', EMOE_TEST_DIE_FILE: dieFile }, prestart, preattach, initAhead } },
});
const freeBytes = (rt: Runtime) => rt.devices().map((d) => d.freeBytes);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

const reference: number[][] = [];
beforeAll(async () => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'emoe-scaleproc-'));
  dieFile = path.join(dir, 'die');
  reference.push(...await greedyTokens((await start([0])).dep, PROMPTS, MAX));
});

afterAll(async () => {
  await closeAll(opened);
  rmSync(dir, { recursive: true, force: true });
});

describe('Deployment with executor processes', () => {
  it('gives the fixed layout\'s greedy tokens across a 1→2→1 scale mid-generation', async () => {
    const { dep } = await start([0], processMode());
    // The work ahead (standby chunks filled with the planned scale-up's bytes, the process started
    // ahead and its attach) runs in the background after start; the assertions on it below need it
    // finished before the scale (on a loaded 2-CPU runner it may not be by the fifth token).
    await dep.settled();
    expect(dep.standby.error).toBeUndefined();
    expect(dep.standby.devices.find((d) => d.device === 1)!.filled).toBeGreaterThan(0);
    const first = dep.executorPid!;
    expect(first).toBeGreaterThan(0);
    expect(first).not.toBe(process.pid);
    const streamed = new Map<string, number[]>();
    const done: Array<Promise<Completion>> = PROMPTS.map((prompt, k) => {
      streamed.set(`r${k}`, []);
      return dep.submit({ id: `r${k}`, prompt, maxTokens: MAX, ignoreEos: true }, { onToken: (t) => streamed.get(`r${k}`)!.push(t) });
    });
    const waitTokens = async (n: number) => {
      const deadline = performance.now() + 10_000;
      while ([...streamed.values()].some((s) => s.length < n)) {
        if (performance.now() > deadline) throw new Error(`requests did not reach ${n} tokens`);
        await sleep(1);
      }
    };
    await waitTokens(5);
    const up = await dep.scale({ devices: [0, 1] });
    expect(dep.devices).toEqual([0, 1]);
    // The standby started ahead had attached layout [0]'s chunks; it kept those [0, 1] uses and
    // dropped the expert chunks that moved to device 1 (their device-0 copies are released).
    expect(up.prestartedExecutor).toBe(true);
    expect(up.preattachedChunks!.kept).toBeGreaterThan(0);
    expect(up.preattachedChunks!.dropped).toBeGreaterThan(0);
    // The serving process sent its graph shapes with its results: the standby captured device 0's
    // (its prompt's and its decode's, and a third when the steps so far had one; up to 3 per device
    // by default) before it answered ready.
    expect(up.precapture!.graphs).toBeGreaterThanOrEqual(2);
    expect(up.precapture!.graphs).toBeLessThanOrEqual(3);
    // The chunks copied onto device 1 were filled ahead in its standby chunks (prefillStandby) and imported as they were.
    expect(up.chunksPrefilled).toBe(up.chunksCopied);
    const second = dep.executorPid!;
    expect(second).not.toBe(first);
    await expect.poll(() => alive(first)).toBe(false);
    expect(up.switchover).toBeDefined();
    expect([...streamed.values()].some((s) => s.length < MAX)).toBe(true); // still mid-generation
    await waitTokens(Math.min(MAX - 20, Math.max(...[...streamed.values()].map((s) => s.length)) + 5));
    const down = await dep.scale({ devices: [0] });
    expect(down.chunksKeptAsStandby).toBeGreaterThan(0); // device 1's chunks, kept as its standby chunks
    expect(down.preattachedChunks!.kept).toBeGreaterThan(0);
    expect(dep.devices).toEqual([0]);
    await expect.poll(() => alive(second)).toBe(false);
    const got = await Promise.all(done);
    for (const [k, c] of got.entries()) {
      expect(c.outputTokens, `tokens of r${k}`).toEqual(reference[k]);
      expect(streamed.get(`r${k}`)).toEqual(reference[k]);
    }
    // Open sessions: the serving executor's and (once it attached ahead) the next standby's; both
    // hold only layout [0]'s chunks, the only ones left.
    const sessions = dep.hmm.sessionIds();
    expect(sessions.length).toBeGreaterThanOrEqual(1);
    expect(sessions.length).toBeLessThanOrEqual(2);
    for (const id of sessions) for (const c of dep.hmm.session(id).attached) expect(dep.hmm.store.get(c).plan.device).toBe(0);
    expect(dep.hmm.store.all().every((c) => c.plan.device === 0)).toBe(true);
  }, 20_000);

  it('returns to the same memory, chunks and open descriptors after each of 8 process-mode 1→2→1 cycles (initAhead, attach while made)', async () => {
    const { rt, dep } = await start([0], processMode(true, true, true));
    const fds = () => readdirSync('/proc/self/fd').length;
    const state = async () => {
      await dep.settled();
      // The deployment's executor processes: the serving one and the one initialised or started ahead.
      await expect.poll(() => dep.hmm.sessionIds().length).toBe(2);
      return { free: freeBytes(rt), chunks: dep.hmm.store.ids().sort(), fds: fds(), accounting: dep.hmm.accounting() };
    };
    // The first cycle makes what every later one reuses (standby chunks, pinned buffers); from the second on, nothing may grow.
    await dep.scale({ devices: [0, 1] });
    await dep.scale({ devices: [0] });
    const steady = await state();
    for (let i = 0; i < 8; i++) {
      const up = await dep.scale({ devices: [0, 1] });
      expect(up.standbyMadeAhead, `cycle ${i}`).toBeDefined();
      const down = await dep.scale({ devices: [0] });
      expect(down.attachBeforeTargets, `cycle ${i}`).toBe(true);
      expect(await state(), `after cycle ${i}`).toEqual(steady);
    }
    const c = await dep.submit({ prompt: PROMPTS[4]!, maxTokens: 30, ignoreEos: true });
    expect(c.outputTokens).toEqual(reference[4]!.slice(0, 30));
    await dep.close();
  }, 60_000);

  it('rolls back when the standby process dies during attach: the old process keeps serving, memory exactly as before', async () => {
    // Not started ahead: the process the attach phase spawns reads the die file as it starts.
    const { rt, dep } = await start([0], processMode(false));
    const pid = dep.executorPid!;
    const want = (await dep.submit({ prompt: PROMPTS[0]!, maxTokens: 30, ignoreEos: true })).outputTokens;
    expect(want).toEqual(reference[0]!.slice(0, 30));
    await dep.settled(); // standby chunks made
    const memory = freeBytes(rt);
    const chunks = dep.hmm.store.all().map((c) => c.plan.id).sort();
    const layoutChunks = dep.chunkIds();
    const accounting = dep.hmm.accounting();
    const sessions = dep.hmm.sessionIds();
    const kvPools = dep.hmm.kv.poolDevices();

    writeFileSync(dieFile, ''); // the next executor process exits before `ready`
    const phases: ScaleProgress['phase'][] = [];
    try {
      // A request in flight across the failed attempt.
      const during = dep.submit({ prompt: PROMPTS[1]!, maxTokens: 60, ignoreEos: true });
      await expect(dep.scale({ devices: [0, 1] }, { onProgress: (p) => phases.push(p.phase) })).rejects.toThrow(/executor/);
      expect((await during).outputTokens).toEqual(reference[1]!.slice(0, 60));
    } finally {
      rmSync(dieFile, { force: true });
    }
    expect(phases).toContain('attach');
    expect(phases.at(-1)).toBe('rollback');
    const standbyPid = Number(readFileSync(`${dieFile}.pid`, 'utf8'));
    expect(standbyPid).not.toBe(pid);
    expect(alive(standbyPid)).toBe(false);

    // The old layout and its process are untouched.
    expect(dep.devices).toEqual([0]);
    expect(dep.epoch).toBe(0);
    expect(dep.executorPid).toBe(pid);
    expect(alive(pid)).toBe(true);
    await dep.settled(); // the standby chunks the attempt took, made again
    expect(freeBytes(rt)).toEqual(memory);
    expect(dep.hmm.store.all().map((c) => c.plan.id).sort()).toEqual(chunks);
    expect(dep.chunkIds()).toEqual(layoutChunks);
    expect(dep.hmm.accounting()).toEqual(accounting);
    expect(dep.hmm.sessionIds()).toEqual(sessions);
    expect(dep.hmm.kv.poolDevices()).toEqual(kvPools);
    // It still serves, with the right tokens, and a later scale succeeds.
    expect((await dep.submit({ prompt: PROMPTS[2]!, maxTokens: 30, ignoreEos: true })).outputTokens).toEqual(reference[2]!.slice(0, 30));
    expect(existsSync(dieFile)).toBe(false);
    await dep.scale({ devices: [0, 1] });
    expect(dep.devices).toEqual([0, 1]);
    await expect.poll(() => alive(pid)).toBe(false);
    expect((await dep.submit({ prompt: PROMPTS[3]!, maxTokens: 30, ignoreEos: true })).outputTokens).toEqual(reference[3]!.slice(0, 30));
  }, 20_000);

  it('attaches a scale-down\'s targets while the worker thread makes them; a chunk it fails to make rolls back with memory exactly as before', async () => {
    const { rt, dep } = await start([0, 1], processMode(true, true));
    await dep.settled();
    const pid = dep.executorPid!;
    const memory = freeBytes(rt);
    const chunks = dep.hmm.store.all().map((c) => c.plan.id).sort();
    const accounting = dep.hmm.accounting();
    const sessions = dep.hmm.sessionIds();
    // The third chunk the scale makes fails: the standby process is attaching the first ones by then,
    // waiting at the daemon for the rest (it must learn they are not coming, not wait forever).
    rt.injectFault('CreateChunk', 3);
    const during = dep.submit({ prompt: PROMPTS[1]!, maxTokens: 60, ignoreEos: true });
    await expect(dep.scale({ devices: [0] })).rejects.toBeInstanceOf(FaultInjectedError);
    rt.clearFaults();
    expect((await during).outputTokens).toEqual(reference[1]!.slice(0, 60));
    expect(dep.devices).toEqual([0, 1]);
    expect(dep.executorPid).toBe(pid);
    await dep.settled();
    expect(freeBytes(rt)).toEqual(memory);
    expect(dep.hmm.store.all().map((c) => c.plan.id).sort()).toEqual(chunks);
    expect(dep.hmm.store.pendingCount).toBe(0);
    expect(dep.hmm.accounting()).toEqual(accounting);
    expect(dep.hmm.sessionIds().length).toBe(sessions.length); // the serving process's and a new one started ahead
    // Without the fault: the process attached the targets as they were made.
    const running = dep.submit({ prompt: PROMPTS[2]!, maxTokens: 60, ignoreEos: true });
    const down = await dep.scale({ devices: [0] });
    expect(down.attachBeforeTargets).toBe(true);
    expect(down.chunksCopied).toBeGreaterThan(3);
    expect((await running).outputTokens).toEqual(reference[2]!.slice(0, 60));
    await dep.close();
  }, 20_000);

  it('attaches the standby process started ahead; replaces one that died; one killed during attach rolls back', async () => {
    // Blank standby chunks (no prefill), so that the scale copies and the process imports while they run.
    const { dep } = await start([0], { ...processMode(), prefillStandby: false });
    await dep.settled();
    const ahead = dep.prestartedPid!;
    expect(ahead).toBeGreaterThan(0);
    expect(ahead).not.toBe(dep.executorPid);
    const running = dep.submit({ prompt: PROMPTS[4]!, maxTokens: 120, ignoreEos: true });
    // The scale attaches that very process; a new one is started ahead after it.
    const up = await dep.scale({ devices: [0, 1] });
    expect(up.prestartedExecutor).toBe(true);
    expect(up.attachDuringCopies).toBe(true); // the process imported the targets while they were being copied
    expect(up.chunksFromStandby).toBe(up.chunksCopied);
    expect(dep.executorPid).toBe(ahead);
    await dep.settled();
    const next = dep.prestartedPid!;
    expect(next).not.toBe(ahead);
    // One that died while waiting is replaced by a process spawned at attach.
    process.kill(next, 'SIGKILL');
    await expect.poll(() => alive(next)).toBe(false);
    const down = await dep.scale({ devices: [0] });
    expect(down.prestartedExecutor).toBe(false);
    expect(dep.executorPid).not.toBe(next);
    // Killed as the attach phase begins: rolled back, the old process serving.
    await dep.settled();
    const victim = dep.prestartedPid!;
    const serving = dep.executorPid;
    const phases: string[] = [];
    await expect(dep.scale({ devices: [0, 1] }, {
      onProgress: (p) => {
        phases.push(p.phase);
        if (p.phase === 'attach') process.kill(victim, 'SIGKILL');
      },
    })).rejects.toThrow(/executor/);
    expect(phases.at(-1)).toBe('rollback');
    expect(dep.devices).toEqual([0]);
    expect(dep.executorPid).toBe(serving);
    expect((await running).outputTokens).toEqual(reference[4]!.slice(0, 120));
    await dep.settled();
    expect(dep.hmm.sessionIds().length).toBe(1);
    // Closing ends the process started ahead too.
    const last = dep.prestartedPid!;
    await dep.close();
    expect(alive(last)).toBe(false);
  }, 20_000);

  it('with filled standby chunks: the process imports the adopted chunks; killed during attach, the scale rolls back and the fills are made again', async () => {
    const { dep } = await start([0], processMode());
    await dep.settled();
    const filled = dep.hmm.store.filledSpares(1);
    expect(filled).toBeGreaterThan(0);
    const running = dep.submit({ prompt: PROMPTS[5]!, maxTokens: 120, ignoreEos: true });
    const victim = dep.prestartedPid!;
    const serving = dep.executorPid;
    await expect(dep.scale({ devices: [0, 1] }, { onProgress: (p) => void (p.phase === 'attach' && process.kill(victim, 'SIGKILL')) }))
      .rejects.toThrow(/executor/);
    expect(dep.devices).toEqual([0]);
    expect(dep.executorPid).toBe(serving);
    await dep.settled();
    expect(dep.standby.error).toBeUndefined();
    expect(dep.hmm.store.filledSpares(1)).toBe(filled); // what the rollback freed is filled again
    const up = await dep.scale({ devices: [0, 1] });
    expect(up.chunksPrefilled).toBe(up.chunksCopied);
    expect(up.prepare.stats?.chunks ?? 0).toBe(0); // nothing copied at scale time
    expect((await running).outputTokens).toEqual(reference[5]!.slice(0, 120));
    await dep.settled();
    expect(dep.hmm.sessionIds().length).toBe(1);
  }, 20_000);

  it('with every device serving, the process started ahead preattaches the layout less its highest device: that scale-down drops nothing', async () => {
    const { dep } = await start([0, 1, 2, 3], processMode(true, true));
    await dep.settled();
    const running = PROMPTS.slice(0, 2).map((prompt) => dep.submit({ prompt, maxTokens: 60, ignoreEos: true }));
    await sleep(20);
    const down = await dep.scale({ devices: [0, 1, 2] });
    expect(down.prestartedExecutor).toBe(true);
    expect(down.preattachedChunks?.kept).toBeGreaterThan(0);
    expect(down.preattachedChunks?.dropped).toBe(0);
    // Another scale-down (device 3 idle now: the serving layout was preattached) drops device 2's chunks.
    await dep.settled();
    const again = await dep.scale({ devices: [0, 1] });
    expect(again.preattachedChunks?.dropped).toBeGreaterThan(0);
    for (const [k, c] of (await Promise.all(running)).entries()) expect(c.outputTokens).toEqual(reference[k]!.slice(0, 60));
    await dep.close();
  }, 20_000);

  it('with preattach off the standby started ahead attaches its whole layout at the scale: the same tokens', async () => {
    const { dep } = await start([0], processMode(true, false));
    const running = PROMPTS.slice(0, 2).map((prompt) => dep.submit({ prompt, maxTokens: 40, ignoreEos: true }));
    await sleep(20);
    const up = await dep.scale({ devices: [0, 1] });
    expect(up.prestartedExecutor).toBe(true);
    expect(up.preattachedChunks).toBeUndefined();
    for (const [k, c] of (await Promise.all(running)).entries()) expect(c.outputTokens).toEqual(reference[k]!.slice(0, 40));
  });

  it('initialises the process started ahead for the planned scale-up (initAhead): the scale-up only switches over; a scale it was not made for initialises it again', async () => {
    const { rt, dep } = await start([0], processMode(true, true, true));
    await dep.settled();
    // Made for [0] -> [0, 1]: device 1's filled standby chunks adopted ahead as that scale's targets, its pool made.
    expect(dep.standby.process).toMatchObject({ device: 1 });
    const ready = dep.readyExecutorPid!;
    expect(ready).toBeGreaterThan(0);
    expect(dep.prestartedPid).toBeUndefined(); // it was the process started ahead
    expect(dep.hmm.store.filledSpares(1)).toBe(0);
    expect(dep.hmm.kv.poolDevices()).toEqual([0, 1]);
    const running = PROMPTS.slice(0, 3).map((prompt) => dep.submit({ prompt, maxTokens: 120, ignoreEos: true }));
    await sleep(20);
    const up = await dep.scale({ devices: [0, 1] });
    expect(dep.executorPid).toBe(ready);
    expect(up.prestartedExecutor).toBe(true);
    expect(up.standbyMadeAhead).toBeDefined();
    expect(up.chunksCopied).toBeGreaterThan(0);
    expect(up.chunksPrefilled).toBe(up.chunksCopied); // every target adopted ahead: nothing copied or imported at scale time
    expect(up.prepare.stats?.chunks ?? 0).toBe(0);
    for (const [k, c] of (await Promise.all(running)).entries()) expect(c.outputTokens).toEqual(reference[k]!.slice(0, 120));
    // No chunk is held ahead for it any more: the layout holds them.
    expect(dep.hmm.store.all().filter((c) => c.plan.device === 1).every((c) => c.holders.size >= 2)).toBe(true);

    // The next one is made for [0, 1] -> [0, 1, 2]; a scale-down initialises it again for [0].
    await dep.settled();
    expect(dep.standby.process).toMatchObject({ device: 2 });
    const second = dep.readyExecutorPid!;
    const filled2 = dep.standby.devices.find((d) => d.device === 2)?.filled ?? 0;
    const during = dep.submit({ prompt: PROMPTS[3]!, maxTokens: 120, ignoreEos: true });
    const down = await dep.scale({ devices: [0] });
    expect(dep.executorPid).toBe(second);
    expect(down.prestartedExecutor).toBe(true);
    expect(down.standbyMadeAhead).toBeUndefined();
    // Device 2's chunks adopted ahead are its filled standby chunks again, its pool made ahead is freed.
    expect(dep.hmm.kv.poolDevices()).toEqual([0]);
    expect(dep.hmm.store.filledSpares(2)).toBeGreaterThan(filled2);
    expect((await during).outputTokens).toEqual(reference[3]!.slice(0, 120));
    await dep.settled();
    expect(dep.hmm.sessionIds().length).toBe(2); // the serving process's and the one initialised ahead
    expect(rt.devices().every((d) => d.freeBytes > 0)).toBe(true);
    await dep.close();
    expect(alive(second)).toBe(false);
  }, 20_000);

  it('with initAhead, the process initialised ahead follows the serving process\'s new shapes: the scale-up finds them captured', async () => {
    const { dep } = await start([0], processMode(true, true, true));
    await dep.settled();
    // Initialised before any step: the serving process had no shapes to give.
    const atInit = dep.standby.process!.precaptured;
    const running = PROMPTS.slice(0, 4).map((prompt) => dep.submit({ prompt, maxTokens: 60, ignoreEos: true }));
    // Its follower sends the shapes the planned scale-up would capture now, as the serving steps make them.
    await expect.poll(() => dep.standby.process!.precaptured, { timeout: 10_000 }).toBeGreaterThan(atInit);
    const followed = dep.standby.process!.precaptured;
    const up = await dep.scale({ devices: [0, 1] });
    expect(up.standbyMadeAhead?.precaptured).toBeGreaterThanOrEqual(followed);
    for (const [k, c] of (await Promise.all(running)).entries()) expect(c.outputTokens).toEqual(reference[k]!.slice(0, 60));
    await dep.close();
  }, 20_000);

  it('with initAhead, a scale onto the device the process was made for, by another plan, reuses what it adopted there: its pool and chunks', async () => {
    const { rt, dep } = await start([0], processMode(true, true, true));
    await dep.settled();
    const adopted = dep.hmm.store.all().filter((c) => c.plan.device === 1 && c.plan.kind === 'weight').map((c) => c.plan.id);
    expect(adopted.length).toBeGreaterThan(0);
    const running = dep.submit({ prompt: PROMPTS[2]!, maxTokens: 80, ignoreEos: true });
    // [0] -> [1]: every expert onto device 1; those adopted ahead for [0] -> [0, 1] are taken as they are.
    const move = await dep.scale({ devices: [1] });
    expect(move.prestartedExecutor).toBe(true);
    expect(move.standbyMadeAhead).toBeUndefined(); // initialised again for [1]
    expect(move.chunksPrefilled).toBeGreaterThanOrEqual(adopted.length);
    for (const id of adopted) expect(dep.hmm.store.get(id).holders.has('ahead:layout-1:1')).toBe(false);
    expect((await running).outputTokens).toEqual(reference[2]!.slice(0, 80));
    expect(dep.hmm.kv.poolDevices()).toContain(1);
    await dep.settled();
    expect(dep.hmm.sessionIds().length).toBe(2); // the serving process's and the next one initialised ahead
    expect(rt.devices()[1]!.freeBytes).toBeGreaterThan(0);
  }, 20_000);

  it('with initAhead, a process that died while waiting is replaced at the scale; one killed as it is initialised again rolls back, its chunks given back', async () => {
    const { rt, dep } = await start([0], processMode(true, true, true));
    await dep.settled();
    const memory = freeBytes(rt);
    // Killed while waiting: the scale ends it, gives its chunks back and starts another process.
    const dead = dep.readyExecutorPid!;
    process.kill(dead, 'SIGKILL');
    await expect.poll(() => alive(dead)).toBe(false);
    const up = await dep.scale({ devices: [0, 1] });
    expect(up.prestartedExecutor).toBe(false);
    expect(up.standbyMadeAhead).toBeUndefined();
    expect((await dep.submit({ prompt: PROMPTS[4]!, maxTokens: 40, ignoreEos: true })).outputTokens).toEqual(reference[4]!.slice(0, 40));
    await dep.scale({ devices: [0] });
    await dep.settled();
    expect(dep.hmm.store.filledSpares(1)).toBe(0); // adopted ahead again, for the next [0] -> [0, 1]
    // A scale the process was not made for (onto device 2) initialises it again; killed then, the scale rolls back.
    const victim = dep.readyExecutorPid!;
    const serving = dep.executorPid;
    await expect(dep.scale({ devices: [0, 2] }, { onProgress: (p) => void (p.phase === 'attach' && process.kill(victim, 'SIGKILL')) }))
      .rejects.toThrow(/executor/);
    expect(dep.devices).toEqual([0]);
    expect(dep.executorPid).toBe(serving);
    expect(dep.hmm.kv.poolDevices()).toEqual([0]);
    expect(dep.hmm.store.filledSpares(1)).toBe(up.chunksCopied); // device 1's adopted chunks are standby chunks again
    expect((await dep.submit({ prompt: PROMPTS[5]!, maxTokens: 40, ignoreEos: true })).outputTokens).toEqual(reference[5]!.slice(0, 40));
    await dep.settled();
    expect(dep.hmm.sessionIds().length).toBe(2);
    expect(freeBytes(rt)).toEqual(memory);
  }, 20_000);

  it('with expertTables, each executor process maps its layout\'s expert chunks into tables of its own: the fixed layout\'s tokens across 1→2→1, memory as before', async () => {
    const { rt, dep } = await start([0], { ...processMode(true, true, true), expertTables: true });
    await dep.settled();
    expect(dep.expertTables).toBeUndefined(); // the coordinator runs no engine: no tables of its own
    const before = freeBytes(rt);
    const running = PROMPTS.slice(0, 3).map((prompt) => dep.submit({ prompt, maxTokens: 120, ignoreEos: true }));
    await sleep(20);
    // Every expert is on one device of either layout: the new process mapped all of them at its init.
    const up = await dep.scale({ devices: [0, 1] });
    // Its engine reads each rank's routed experts there: with the uniform plan every expert on one rank, all of them.
    expect(up.expertTables).toMatchObject({ mapped: config.layers * config.experts, taken: 0, unmapped: 0, read: config.layers * config.experts });
    const down = await dep.scale({ devices: [0] });
    expect(down.expertTables).toMatchObject({ mapped: config.layers * config.experts, taken: 0, read: config.layers * config.experts });
    for (const [k, c] of (await Promise.all(running)).entries()) expect(c.outputTokens, `tokens of request ${k}`).toEqual(reference[k]!.slice(0, 120));
    await dep.settled();
    expect(freeBytes(rt)).toEqual(before);
    // A scale the process initialised ahead was not made for ([0] -> [1], not [0, 1]): initialised
    // again, its tables made again for the new layout.
    await dep.settled();
    const ready = dep.readyExecutorPid;
    expect(ready).toBeDefined();
    const move = await dep.scale({ devices: [1] });
    expect(dep.executorPid).toBe(ready);
    expect(move.standbyMadeAhead).toBeUndefined();
    expect(move.expertTables).toMatchObject({ mapped: config.layers * config.experts, read: config.layers * config.experts });
    expect((await dep.submit({ prompt: PROMPTS[1]!, maxTokens: 40, ignoreEos: true })).outputTokens).toEqual(reference[1]!.slice(0, 40));
    await dep.close();
  }, 20_000);

  it('invariant 6: a serving process SIGKILLed mid-generation is replaced and every request continues with the fixed layout\'s tokens; scaling goes on', async () => {
    const { rt, dep } = await start([0, 1], processMode());
    await dep.settled();
    const before = freeBytes(rt);
    const streamed = PROMPTS.map(() => [] as number[]);
    const done = PROMPTS.map((prompt, k) => dep.submit({ prompt, maxTokens: 200, ignoreEos: true }, { onToken: (t) => streamed[k]!.push(t) }));
    const waitTokens = async (n: number) => {
      const deadline = performance.now() + 10_000;
      while (streamed.some((x) => x.length < n)) {
        if (performance.now() > deadline) throw new Error(`requests did not reach ${n} tokens`);
        await sleep(1);
      }
    };
    for (let kill = 1; kill <= 2; kill++) {
      await waitTokens(20 * kill);
      const victim = dep.executorPid!;
      process.kill(victim, 'SIGKILL');
      await expect.poll(() => dep.executorRecoveries, { timeout: 10_000 }).toBe(kill);
      expect(dep.executorPid).not.toBe(victim);
      expect(alive(victim)).toBe(false);
    }
    expect(streamed.some((x) => x.length < 200)).toBe(true); // still mid-generation
    // A scale after the recoveries, and back.
    await dep.scale({ devices: [0] });
    await dep.scale({ devices: [0, 1] });
    const got = await Promise.all(done);
    for (const [k, c] of got.entries()) {
      expect(c.finishReason, `request ${k}`).toBe('length');
      expect(c.outputTokens, `tokens of request ${k}`).toEqual(reference[k]!.slice(0, 200));
    }
    expect(dep.engine.stats()).toMatchObject({ requestsFailed: 0, recoveries: 2 });
    await dep.settled();
    expect(freeBytes(rt)).toEqual(before);
    // Only this deployment's processes hold daemon sessions: the serving one and the one started ahead.
    expect(dep.hmm.sessionIds().length).toBeLessThanOrEqual(2);
  }, 30_000);

  it('runs an f32 KV cache (forward.kvDtype) in the executor processes too: the in-process f32 tokens, before and after a scale', async () => {
    const prompts = PROMPTS.slice(0, 2);
    const run = (dep: Deployment) => Promise.all(prompts.map((prompt) => dep.submit({ prompt, maxTokens: 60, ignoreEos: true })))
      .then((cs) => cs.map((c) => c.outputTokens));
    const { dep: local } = await start([0], { forward: { kvDtype: 'f32' } });
    const want = await run(local);
    // The pools are made for f32 (Deployment.geometry): an executor process given no kvDtype would refuse them
    // (blockTokens is always given to it, so a pool of the other dtype is recognised by its size).
    const { dep } = await start([0], { ...processMode(), forward: { kvDtype: 'f32' } });
    expect(dep.executorPid).toBeDefined();
    expect(await run(dep)).toEqual(want);
    await dep.scale({ devices: [0, 1] });
    expect(await run(dep)).toEqual(want);
  }, 20_000);
});
