#!/usr/bin/env node
// The `elasticmoe` command. Sets Node's thread-pool size before anything uses the pool
// (an ES module entry is too late: loading it already started the pool with 4 threads), then
// runs the CLI (main.ts). Each rank of a forward step waits for its GPU on a pool thread,
// so with 4 threads on a 4-GPU node every other pool job (a scale's graph instantiation,
// its copies' waits, file reads) queued behind the steps. An explicit UV_THREADPOOL_SIZE wins.
process.env.UV_THREADPOOL_SIZE ??= '16';
void import('./main.js');
