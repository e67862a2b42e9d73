// Cross-process sharing by fd, as the HMM daemon will hand chunks to executors.
import { spawn } from 'node:child_process';
import { closeSync, fstatSync, mkdtempSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { UnixChannel, UnixListener, checksumU32 } from '../../src/index.js';
import { GRAN, MIB, mappedChunk, openMock, pattern } from '../helpers/mock.js';

const child = path.resolve(__dirname, '../fixtures/import-child.mjs');

describe('fd passing', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'emoe-ipc-'));
  });
  afterAll(() => {});

  it('carries large messages with descriptors over a socket pair', async () => {
    const [a, b] = UnixChannel.pair();
    const rt = openMock();
    const chunk = rt.createChunk(0, GRAN, { exportable: true });
    const h = chunk.export();
    if (h.kind !== 'fd') throw new Error('mock exports fds');
    const big = pattern(100 * 1024, 5);
    a.send(big, [h.fd, h.fd]);
    const m = await b.receive();
    expect(Buffer.compare(m.data, Buffer.from(big))).toBe(0);
    expect(m.fds).toHaveLength(2);
    expect(m.fds[0]).not.toBe(h.fd); // new descriptors in the receiver
    expect(fstatSync(m.fds[0]!).size).toBe(GRAN);
    for (const fd of [...m.fds, h.fd]) closeSync(fd);
    a.close();
    await expect(b.closed).resolves.toBeUndefined();
    await expect(b.receive()).rejects.toThrow(/closed/);
  });

  it('waits for room on the event loop when the peer does not read, and gives up after its timeout', async () => {
    const [a, b] = UnixChannel.pair();
    // The peer: a process that never reads its end.
    const sleeper = spawn('sleep', ['30'], { stdio: ['ignore', 'ignore', 'ignore', b.fd] });
    b.close();
    try {
      const msg = pattern(16 * 1024, 3);
      let sent = 0;
      const t0 = performance.now();
      while (a.native.send(msg, [], 0) === msg.byteLength) sent++;
      // Full: the send that found no room came back at once, having sent nothing.
      expect(sent).toBeGreaterThan(0);
      expect(performance.now() - t0).toBeLessThan(5000);
      let turns = 0;
      const timer = setInterval(() => turns++, 5);
      await expect(a.sendWhenRoom(msg, [], 150)).rejects.toThrow(/read nothing for 150 ms/);
      clearInterval(timer);
      expect(turns).toBeGreaterThan(3); // the loop went on while it waited
    } finally {
      sleeper.kill('SIGKILL');
      a.close();
    }
  });

  it('sends a message far larger than the socket holds to a reader in its own thread, record by record as room appears', async () => {
    // send() would wait on this thread for a reader that can only read on this thread (it times out);
    // sendWhenRoom leaves the thread to the reader between records.
    const [a, b] = UnixChannel.pair();
    try {
      const big = pattern(6 * 1024 * 1024 + 123, 9);
      const rt = openMock();
      const chunk = rt.createChunk(0, GRAN, { exportable: true });
      const h = chunk.export();
      if (h.kind !== 'fd') throw new Error('mock exports fds');
      const received = b.receive();
      await a.sendWhenRoom(big, [h.fd]);
      const m = await received;
      expect(Buffer.compare(m.data, Buffer.from(big))).toBe(0);
      expect(m.fds).toHaveLength(1);
      expect(fstatSync(m.fds[0]!).size).toBe(GRAN);
      for (const fd of [...m.fds, h.fd]) closeSync(fd);
      // A bad offset (not where a record starts) is refused.
      expect(() => a.native.send(big, [], 5)).toThrow(/offset/);
    } finally {
      a.close();
      b.close();
    }
  });

  it('listens on an owner-only socket and reports the peer credentials', async () => {
    const sock = path.join(dir, 'l.sock');
    const accepted: UnixChannel[] = [];
    const listener = UnixListener.listen(sock, (ch) => accepted.push(ch));
    expect(statSync(sock).mode & 0o777).toBe(0o600);
    const client = UnixChannel.connect(sock);
    client.send('hello');
    await expect.poll(() => accepted.length).toBe(1);
    const server = accepted[0]!;
    expect((await server.receive()).data.toString()).toBe('hello');
    expect(server.peerCredentials()).toMatchObject({ pid: process.pid, uid: process.getuid!() });
    client.close();
    server.close();
    listener.close();
    expect(() => statSync(sock)).toThrow();
    expect(() => UnixChannel.connect(path.join(dir, 'missing.sock'))).toThrow(/missing\.sock/);
  });
});

describe('message size cap', () => {
  it('closes a connection whose peer sends a message over the cap, without buffering it whole', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'emoe-cap-'));
    const sock = path.join(dir, 'cap.sock');
    const accepted: UnixChannel[] = [];
    const listener = UnixListener.listen(sock, (ch) => accepted.push(ch), { maxMessageBytes: 64 * 1024 });
    const client = UnixChannel.connect(sock);
    client.send(pattern(1000));
    client.send(pattern(100 * 1024));
    await expect.poll(() => accepted.length).toBe(1);
    const server = accepted[0]!;
    expect((await server.receive()).data.length).toBe(1000);
    const err = await server.closed;
    expect(err?.message).toMatch(/over 65536 bytes/);
    client.close();
    listener.close();
  });
});

describe('cross-process import', () => {
  it('a child process imports a chunk and reads the bytes the parent wrote, and the parent sees its writes', async () => {
    const rt = openMock({ mockCapacity: 64 * MIB });
    const { chunk, ptr } = mappedChunk(rt, 2, 2 * GRAN, [2], true);
    const s = rt.createStream(2);
    const data = pattern(2 * GRAN, 21);
    await rt.write(ptr, data, s);
    const [mine, theirs] = UnixChannel.pair();
    const proc = spawn(process.execPath, [child], {
      stdio: ['ignore', 'inherit', 'inherit', theirs.fd],
      env: { ...process.env, ELASTICMOE_BACKEND: 'mock' },
    });
    theirs.close();
    const h = chunk.export();
    if (h.kind !== 'fd') throw new Error('mock exports fds');
    mine.send(JSON.stringify({ device: 2, size: 2 * GRAN, write: [1, 2, 3, 4] }), [h.fd]);
    closeSync(h.fd);
    const reply = JSON.parse((await mine.receive()).data.toString());
    expect(reply.checksum).toBe(checksumU32(data).toString());
    expect(reply.head).toEqual(Array.from(data.subarray(0, 8)));
    expect(reply.parentPid).toBe(process.pid);
    const code = await new Promise((r) => proc.on('exit', r));
    expect(code).toBe(0);
    // The child wrote through its own mapping of the same memory.
    expect(Array.from(await rt.read(ptr, 4, s))).toEqual([1, 2, 3, 4]);
    mine.close();
  }, 30_000);

  it('refuses an import with the wrong size or device', () => {
    const rt = openMock();
    const chunk = rt.createChunk(1, GRAN, { exportable: true });
    const h = chunk.export();
    expect(() => rt.importChunk(h, 1, 2 * GRAN)).toThrow(/size/);
    expect(() => rt.importChunk(h, 0, GRAN)).toThrow(/device/);
    const ok = rt.importChunk(h, 1, GRAN);
    ok.dispose();
    if (h.kind === 'fd') closeSync(h.fd);
    const plain = rt.createChunk(1, GRAN);
    expect(() => plain.export()).toThrow(/export/i);
  });
});
