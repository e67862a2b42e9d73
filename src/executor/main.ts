#!/usr/bin/env node
// An executor process: `node dist/executor/main.js SOCKET`, started by the
// orchestrator with its control channel as fd 3 (see process.ts). The backend and
// mock settings come from the ELASTICMOE_* environment the parent passes on.
import { runExecutorProcess } from './process.js';

const socket = process.argv[2];
if (!socket) {
  process.stderr.write('usage: node dist/executor/main.js HMM_SOCKET   (control channel on fd 3)\n');
  process.exit(2);
}
runExecutorProcess({ socket, channelFd: 3 }).then(
  () => process.exit(0),
  (e: unknown) => {
    process.stderr.write(`elasticmoe executor: ${e instanceof Error ? e.stack : String(e)}\n`);
    process.exit(1);
  },
);
