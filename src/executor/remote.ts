// A Stepper whose forward pass runs in an executor process (process.ts): the
// serving side keeps its request state, the executor keeps nothing that matters.
// When the executor dies every pending and later step rejects with
// ExecutorCrashedError; the weights and KV blocks stay in the HMM, so a new
// RemoteStepper (a new process) can take over the same sequences.
import { type ChildProcess, spawn } from 'node:child_process';

import type { ModelConfig } from '../model/config.js';
import { InvalidArgumentError } from '../runtime/errors.js';
import { UnixChannel } from '../runtime/channel.js';
import type { Stepper } from './engine.js';
import type { ForwardEngineOptions, GraphShape } from './forward.js';
import { type FromExecutor, type InitMessage, type ToExecutor, decodeStepResult, placementTable } from './process.js';
import type { Layout, StepBatch, StepResult } from './types.js';

export class ExecutorCrashedError extends Error {
  readonly code = 'EXECUTOR_CRASHED';
  constructor(message: string) {
    super(message);
    this.name = 'ExecutorCrashedError';
  }
}

/** A step the executor refused or failed (it is still running). */
export class ExecutorStepError extends Error {
  constructor(readonly remoteName: string, message: string) {
    super(message);
    this.name = 'ExecutorStepError';
  }
}

export interface RemoteStepperInit {
  config: ModelConfig;
  layout: Layout;
  options?: ForwardEngineOptions;
  /** Graph shapes the executor captures before it answers ready (InitMessage.precapture). */
  precapture?: GraphShape[];
  /** The executor maps its layout's expert chunks into virtual expert tables and reads them there (InitMessage.expertTables). */
  expertTables?: boolean;
}

export interface SpawnExecutorOptions extends RemoteStepperInit {
  /** Script run with node that calls runExecutorProcess with channelFd 3. */
  script: string;
  /** Arguments after the script (e.g. the HMM socket). */
  args?: string[];
  env?: NodeJS.ProcessEnv;
  /** How long to wait for `ready` (default 60 s). */
  readyTimeoutMs?: number;
  /** stdout/stderr of the child (default inherit). */
  stdio?: 'inherit' | 'ignore';
}

interface Pending {
  resolve: (r: StepResult) => void;
  reject: (e: Error) => void;
}

export class RemoteStepper implements Stepper {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private failure: Error | undefined;
  private closing = false;
  /** Resolves when the process exits (immediately undefined when none was given). */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null } | undefined>;
  private exitInfo: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  private readyWaiter: { resolve: () => void; reject: (e: Error) => void } | undefined;
  private precaptureWaiter: { resolve: (r: { graphs: number; ms: number; error?: string }) => void; reject: (e: Error) => void } | undefined;
  private stepped = false;
  /** The executor's HMM session, once ready. */
  session = '';
  /** Chunks it attached ahead (a preattach before init) and kept, and those init dropped; once ready. */
  preattached: { kept: number; dropped: number } | undefined;
  /** Graphs it captured from init's precapture list; once ready. */
  precaptured: { graphs: number; ms: number; error?: string } | undefined;
  /** With expert tables: the expert chunks its init mapped into its tables, per device, and the host time; once ready. */
  expertTables: { mapped: Array<[number, number]>; ms: number; read: number } | undefined;
  /** The executor engine's most recently used graph shapes, as its results last told them. */
  graphShapes: GraphShape[] = [];

  private constructor(
    private readonly channel: UnixChannel,
    readonly proc: ChildProcess | undefined,
  ) {
    this.exited = proc
      ? new Promise((resolve) => {
          if (proc.exitCode !== null || proc.signalCode !== null) {
            this.exitInfo = { code: proc.exitCode, signal: proc.signalCode };
            return resolve(this.exitInfo);
          }
          proc.once('exit', (code, signal) => {
            this.exitInfo = { code, signal };
            resolve(this.exitInfo);
            this.crashed();
          });
        })
      : Promise.resolve(undefined);
    channel.onMessage((m) => this.onMessage(m.data));
    void channel.closed.then(() => {
      // The exit status usually follows the hang-up at once: wait a little for it, for the message.
      const grace = new Promise((r) => setTimeout(r, 200).unref());
      void Promise.race([this.exited, grace]).then(() => this.crashed());
    });
  }

  get pid(): number | undefined {
    return this.proc?.pid;
  }

  /** Spawns `node script ...args` with a channel as fd 3, sends init and waits for ready. */
  static async spawn(o: SpawnExecutorOptions): Promise<RemoteStepper> {
    const [mine, theirs] = UnixChannel.pair();
    let proc: ChildProcess;
    try {
      proc = spawn(process.execPath, [o.script, ...(o.args ?? [])], {
        stdio: ['ignore', o.stdio ?? 'inherit', o.stdio ?? 'inherit', theirs.fd],
        env: o.env ?? process.env,
      });
    } catch (e) {
      mine.close();
      throw e;
    } finally {
      theirs.close();
    }
    return RemoteStepper.start(mine, proc, o, o.readyTimeoutMs);
  }

  /** Takes an executor already connected to `channel` (and its process, when there is one), sends init, waits for ready. */
  static async start(channel: UnixChannel, proc: ChildProcess | undefined, init: RemoteStepperInit,
    readyTimeoutMs = 60_000): Promise<RemoteStepper> {
    const s = new RemoteStepper(channel, proc);
    try {
      await s.init(init, readyTimeoutMs);
    } catch (e) {
      s.kill();
      throw e;
    }
    return s;
  }

  /**
   * Initialises the executor again, for another layout, before its first step (one initialised
   * ahead for a planned scale and given another: process.ts keeps what it attached). On failure
   * the process is killed before this rejects.
   */
  async reinit(init: RemoteStepperInit, readyTimeoutMs = 60_000): Promise<void> {
    if (this.stepped) throw new InvalidArgumentError('reinit', 'called before the executor\'s first step');
    try {
      await this.init(init, readyTimeoutMs);
    } catch (e) {
      this.kill();
      throw e;
    }
  }

  private async init(init: RemoteStepperInit, readyTimeoutMs: number): Promise<void> {
    const msg: InitMessage = { type: 'init', config: init.config, devices: [...init.layout.devices], placement: placementTable(init.config, init.layout) };
    if (init.options) msg.options = init.options;
    if (init.precapture && init.precapture.length > 0) msg.precapture = init.precapture;
    if (init.expertTables) msg.expertTables = true;
    let timer: NodeJS.Timeout | undefined;
    try {
      await new Promise<void>((resolve, reject) => {
        if (this.failure) return reject(this.failure);
        this.readyWaiter = { resolve, reject };
        timer = setTimeout(() => reject(new Error(`the executor sent no 'ready' within ${readyTimeoutMs} ms`)), readyTimeoutMs);
        // Without holding this thread: a process started ahead may still be starting (node, its runtime, its
        // kernels: ~1 s) and read nothing yet, and an init larger than the socket holds would wait for it
        // (an init carrying ~9,000 chunk ids held the deployment's thread ~560 ms so, 2 x H100). Nothing else is sent meanwhile:
        // steps wait for ready.
        this.channel.sendWhenRoom(JSON.stringify(msg)).catch((e: unknown) => {
          // Its end of the channel is closed: the process is gone (or going).
          reject(this.failure ?? new ExecutorCrashedError(`could not send init to the executor process: ${(e as Error).message}`));
        });
      });
    } finally {
      clearTimeout(timer);
      this.readyWaiter = undefined;
    }
  }

  /**
   * Captures these graph shapes in the executor, after ready and before its first step (a process
   * initialised ahead following the serving shapes); one call at a time. Resolves with what it
   * captured (graphs, ms, and the error that stopped it early, if one did: capturing is best effort).
   */
  precapture(shapes: GraphShape[]): Promise<{ graphs: number; ms: number; error?: string }> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.stepped) return Promise.reject(new InvalidArgumentError('precapture', 'called before the executor\'s first step'));
    if (this.precaptureWaiter || this.readyWaiter) return Promise.reject(new InvalidArgumentError('precapture', 'called once the last init or precapture has been answered'));
    return new Promise((resolve, reject) => {
      this.precaptureWaiter = { resolve, reject };
      try {
        this.send({ type: 'precapture', shapes });
      } catch (e) {
        this.precaptureWaiter = undefined;
        reject(this.failure ?? new ExecutorCrashedError(`could not send precapture to the executor: ${(e as Error).message}`));
      }
    });
  }

  step(batch: StepBatch, options: { returnLogits?: boolean } = {}): Promise<StepResult> {
    if (this.failure) return Promise.reject(this.failure);
    this.stepped = true;
    const id = this.nextId++;
    return new Promise<StepResult>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      try {
        this.send({ type: 'step', id, batch, returnLogits: options.returnLogits === true });
      } catch (e) {
        this.pending.delete(id);
        reject(this.failure ?? new ExecutorCrashedError(`could not send the step to the executor: ${(e as Error).message}`));
      }
    });
  }

  /** Asks the executor to shut down and waits for it to exit (kills it after `timeoutMs`). */
  async close(timeoutMs = 10_000): Promise<void> {
    if (this.closing) {
      await this.exited;
      return;
    }
    this.closing = true;
    this.fail(new ExecutorCrashedError('the executor was closed'));
    try {
      this.send({ type: 'shutdown' });
    } catch {
      // already gone
    }
    if (this.proc) {
      const timer = setTimeout(() => this.proc!.kill('SIGKILL'), timeoutMs);
      await this.exited;
      clearTimeout(timer);
    }
    this.channel.close();
  }

  /** SIGKILLs the executor (when there is a process) and closes the channel. */
  kill(): void {
    this.closing = true;
    this.fail(new ExecutorCrashedError('the executor was killed'));
    this.proc?.kill('SIGKILL');
    this.channel.close();
  }

  private send(m: ToExecutor): void {
    this.channel.send(JSON.stringify(m));
  }

  private onMessage(data: Buffer): void {
    let m: FromExecutor;
    try {
      m = JSON.parse(data.toString('utf8')) as FromExecutor;
    } catch (e) {
      this.fail(new ExecutorCrashedError(`unreadable message from the executor: ${(e as Error).message}`));
      this.proc?.kill('SIGKILL');
      this.channel.close();
      return;
    }
    if (m.type === 'ready') {
      this.session = m.session;
      this.preattached = m.preattached;
      this.precaptured = m.precaptured;
      this.expertTables = m.expertTables;
      this.readyWaiter?.resolve();
      return;
    }
    if (m.type === 'precaptured') {
      const w = this.precaptureWaiter;
      this.precaptureWaiter = undefined;
      w?.resolve({ graphs: m.graphs, ms: m.ms, ...(m.error !== undefined ? { error: m.error } : {}) });
      return;
    }
    if (m.type === 'error' && m.id === undefined) {
      const e = new ExecutorStepError(m.name, `the executor failed to start: ${m.message}`);
      if (this.readyWaiter) this.readyWaiter.reject(e);
      else this.fail(e);
      return;
    }
    const id = m.id!;
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    if (m.type === 'result') {
      if (m.graphShapes) this.graphShapes = m.graphShapes;
      p.resolve(decodeStepResult(m.result));
    }
    else p.reject(new ExecutorStepError(m.name, m.message));
  }

  /** The channel closed or the process exited. */
  private crashed(): void {
    if (this.failure) return;
    const how = this.exitInfo
      ? this.exitInfo.signal ? `was killed by ${this.exitInfo.signal}` : `exited with code ${this.exitInfo.code}`
      : 'closed its channel';
    const pid = this.proc?.pid !== undefined ? ` (pid ${this.proc.pid})` : '';
    this.fail(new ExecutorCrashedError(`the executor process${pid} ${how}; its steps are lost, the HMM keeps the weights and KV blocks`));
  }

  private fail(e: Error): void {
    this.failure ??= e;
    this.readyWaiter?.reject(this.failure);
    this.precaptureWaiter?.reject(this.failure);
    this.precaptureWaiter = undefined;
    for (const [id, p] of [...this.pending]) {
      this.pending.delete(id);
      p.reject(this.failure);
    }
  }
}
