// A deployment's executor processes (ExecutorMode { process }): the HMM daemon they attach
// through, each process spawned with a channel and initialised for a layout, then dismissed,
// closed or killed; after one ends, its daemon session is waited for so what it held is freed.
// The Deployment (orchestrator.ts) decides which process serves, waits or is started ahead.
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import type { ForwardEngine, GraphShape } from '../executor/forward.js';
import { RemoteStepper } from '../executor/remote.js';
import { HmmDaemon } from '../hmm/daemon.js';
import type { Hmm } from '../hmm/hmm.js';
import { UnixChannel } from '../runtime/channel.js';
import { trace } from '../runtime/trace.js';
import type { DeploymentOptions, ExecutorMode } from './deployment-options.js';
import { type LayoutSpec, toExpertPlacement } from './layout.js';

/** The forward pass of a layout: in process, or an executor process. */
export type Executor = ForwardEngine | RemoteStepper;

/** An executor process spawned, its channel open, not initialised yet. */
export interface Spawned {
  proc: ChildProcess;
  channel: UnixChannel;
}

/** The HMM daemon of a deployment with executor processes, on a socket in a temporary folder, and how its processes start. */
export interface DaemonState {
  daemon: HmmDaemon;
  dir: string;
  socket: string;
  script: string;
  env: Record<string, string>;
  prestart: boolean;
  preattach: boolean;
  initAhead: boolean;
}

/** A layout as the forward pass takes it (devices and an expert placement function). */
export const forwardLayout = (l: LayoutSpec) => ({ devices: [...l.devices], placement: toExpertPlacement(l) });

const exitOf = (proc: ChildProcess) => new Promise<void>((resolve) => {
  if (proc.exitCode !== null || proc.signalCode !== null) return resolve();
  proc.once('exit', () => resolve());
});

/** Starts the HMM daemon for `mode`'s processes on a new temporary socket (removed again if it fails). */
export async function openDaemon(hmm: Hmm, mode: Exclude<ExecutorMode, 'in-process'>): Promise<DaemonState> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'emoe-deploy-'));
  const socket = path.join(dir, 'hmm.sock');
  try {
    return {
      daemon: await HmmDaemon.listen(hmm, socket), dir, socket, script: mode.process.script, env: { ...mode.process.env },
      prestart: mode.process.prestart !== false, preattach: mode.process.preattach !== false,
      initAhead: mode.process.initAhead !== false,
    };
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

/** Stops the daemon (best effort) and removes its socket's folder. */
export async function closeDaemon(d: DaemonState): Promise<void> {
  await d.daemon.close().catch(() => undefined);
  rmSync(d.dir, { recursive: true, force: true });
}

/** `node script SOCKET` with a channel as fd 3, not initialised yet (it warms up meanwhile: process.ts). */
export function spawnProcess(d: DaemonState): Spawned {
  const [mine, theirs] = UnixChannel.pair();
  try {
    const proc = spawn(process.execPath, [d.script, d.socket], {
      stdio: ['ignore', 'inherit', 'inherit', theirs.fd],
      env: { ...process.env, ...d.env },
    });
    trace('coord.spawn', { child: proc.pid });
    return { proc, channel: mine };
  } catch (e) {
    mine.close();
    throw e;
  } finally {
    theirs.close();
  }
}

/** A process started but not initialised: its channel closed, it exits (after its warm-up; killed after 10 s). */
export async function dismiss(x: Spawned): Promise<void> {
  x.channel.close();
  const exited = exitOf(x.proc);
  const timer = setTimeout(() => x.proc.kill('SIGKILL'), 10_000);
  await exited;
  clearTimeout(timer);
}

/** What an executor process is initialised with for `layout`. */
export function executorInit(options: DeploymentOptions, layout: LayoutSpec, precapture: GraphShape[]) {
  return {
    config: options.config,
    layout: forwardLayout(layout),
    precapture,
    // The KV dtype too: the pools were made for it (the deployment's KV geometry).
    options: { maxTokensPerStep: options.maxTokensPerStep ?? 64, blockTokens: options.blockTokens ?? 16, kvDtype: options.forward?.kvDtype ?? 'bf16' },
    ...(options.expertTables === true ? { expertTables: true } : {}),
  };
}

/** Sends init for `layout` and waits for ready; on failure the process is dead before this rejects. */
export async function initExecutor(options: DeploymentOptions, { proc, channel }: Spawned, layout: LayoutSpec,
  precapture: GraphShape[] = []): Promise<RemoteStepper> {
  try {
    return await RemoteStepper.start(channel, proc, executorInit(options, layout, precapture));
  } catch (e) {
    proc.kill('SIGKILL');
    await exitOf(proc);
    throw e;
  }
}

/** Frees a forward pass: an in-process engine disposed, a process closed (or killed) and waited for. */
export async function disposeExecutor(x: Executor | undefined, kill: boolean): Promise<void> {
  if (x instanceof RemoteStepper) {
    if (kill) x.kill();
    else await x.close();
    await x.exited;
  } else x?.dispose();
}

/**
 * Waits (after the executor processes concerned are gone) until the daemon has ended every
 * session but `keep`'s executor's (an in-process engine or none: every session), so what they
 * held is released; ends any left after `timeoutMs`.
 */
export async function settleSessions(hmm: Hmm, keep: Executor | undefined, timeoutMs = 5000): Promise<void> {
  const kept = keep instanceof RemoteStepper ? keep.session : undefined;
  const extra = () => hmm.sessionIds().filter((s) => s !== kept);
  const deadline = performance.now() + timeoutMs;
  while (extra().length > 0 && performance.now() < deadline) await new Promise((r) => setTimeout(r, 5));
  for (const id of extra()) {
    try {
      hmm.session(id).end();
    } catch {
      // ended meanwhile
    }
  }
}
