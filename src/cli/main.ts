#!/usr/bin/env node
// The elasticmoe command line.
import { parseArgs } from 'node:util';

import { ElasticMoeError } from '../runtime/index.js';
import { devicesReport, renderDevices } from './devices.js';
import { runHmm } from './hmm.js';

const USAGE = `usage: elasticmoe <command> [options]

commands:
  devices     the backend in use, each device with its memory, the peer matrix,
              and why each backend was or was not chosen
  hmm         run the HMM memory daemon in the foreground (until SIGINT/SIGTERM)
                --socket PATH            where to listen (required)
                --synthetic CONFIG.json  fill seeded synthetic weights first:
                                         { "tensors": [TensorSpec...], "kvPools"?: [...] }
                --devices 0,1            physical devices for the file's device indexes
                --seed N                 synthetic seed (default 0)
  generate    run one prompt through the model on the devices (in-process HMM,
              forward pass, request engine) and print the completion
                --model DIR              Hugging Face folder (config.json, *.safetensors,
                                         tokenizer.json when present), or
                --synthetic CONFIG.json  seeded synthetic weights of that config's shape
                --prompt TEXT            (needs a tokenizer) or --prompt-ids 1,2,3
                --chat                   wrap --prompt in the chat template
                --devices 0,1            one DP rank per device, experts round robin (default 0)
                --max-tokens N           (default 64)
                --kv-blocks N            KV blocks per device (default: from free memory)
                --max-tokens-per-step N  token budget of a step per rank (default 512)
                --kv-dtype bf16|f32      KV cache element type (default bf16; f32 doubles the
                                         KV memory per token and keeps K and V unrounded)
                --tokenizer DIR          tokenizer.json folder (default: --model)
                --ignore-eos             generate exactly --max-tokens
                --seed N                 synthetic seed (default 0)

  serve       serve the model over HTTP (OpenAI-compatible API, /metrics, /admin)
              until SIGTERM or Ctrl-C, which drain running requests and exit;
              with neither --model nor --synthetic: the tiny built-in synthetic
              model (scripts/configs/tiny-qwen3-moe.json, prompts as token ids)
                --model DIR | --synthetic CONFIG.json | --tokenizer DIR  as for generate
                --devices 0,1            one DP rank per device (default 0)
                --max-devices N          most devices a scale may use (default: all)
                --autoscale CONFIG.json  run the SLO-aware autoscaler:
                                         { "ttftMs", "tpotMs", "attainmentTarget"?, "minDevices"?,
                                           "maxDevices"?, "devicePool"?, "window"?, ... }
                --slo-ttft-ms MS, --slo-tpot-ms MS  the autoscaler's SLOs (enable it without a file,
                                         or override the file's)
                --min-devices N          the autoscaler's lower bound (default 1); its upper
                                         bound is --max-devices
                --host ADDR              (default 127.0.0.1)
                --port N                 (default 8000; 0 picks a free port)
                --kv-blocks N            KV blocks per device, every layout's devices (default 1024)
                --max-tokens-per-step N, --kv-dtype bf16|f32, --seed N  as for generate
                --log-level LEVEL        pino level: info (default), debug, warn, silent, ...
                --executor process       run every executor as its own process, attached through
                                         the HMM daemon (default in-process)
                --standby-chunks on|off  keep, on the idle devices, the chunks a scale-up onto them
                                         would allocate, made ahead (default on; off leaves idle
                                         devices untouched until a scale uses them)
                --prefill-standby on|off fill those standby chunks, in the background, with the bytes
                                         a scale-up onto their device copies, so it copies nothing
                                         (default on)
                --standby-engines on|off make the standby engine of each planned scale-up onto an
                                         idle device in the background, so that scale-up only adopts
                                         and switches over (default on; needs the two above; with
                                         --executor process: the process started ahead initialised
                                         for the scale-up onto the lowest idle device)
                --precapture-graphs N    step graphs per staying device a scale's standby captures
                                         before the switch-over (default 3; 0: none)
                --expert-tables on|off   virtual expert tables: every device maps its experts into
                                         one range with a slot per expert of the model, the engines
                                         read them there (default off; not yet run on a GPU)

  scale       ask a running \`elasticmoe serve\` to move to a new
              device set while it keeps serving, and print what moved
                --devices 0,1,2          the new device set (required)
                --url URL                the server (default http://127.0.0.1:8000)

common options:
  --backend auto|cuda|acl|mock   (default: ELASTICMOE_BACKEND, else auto)
  --mock-devices N               simulated devices for the mock backend (default 4)
  --mock-capacity SIZE           bytes per mock device, e.g. 8GiB
  --json                         machine-readable output
  -h, --help`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '-h' || command === '--help' || command === 'help') {
    process.stdout.write(`${USAGE}\n`);
    return command ? 0 : 2;
  }
  const { values } = parseArgs({
    args: rest,
    options: {
      backend: { type: 'string' },
      'mock-devices': { type: 'string' },
      'mock-capacity': { type: 'string' },
      json: { type: 'boolean', default: false },
      socket: { type: 'string' },
      synthetic: { type: 'string' },
      devices: { type: 'string' },
      seed: { type: 'string' },
      model: { type: 'string' },
      tokenizer: { type: 'string' },
      prompt: { type: 'string' },
      'prompt-ids': { type: 'string' },
      chat: { type: 'boolean', default: false },
      'max-tokens': { type: 'string' },
      'kv-blocks': { type: 'string' },
      'max-tokens-per-step': { type: 'string' },
      'kv-dtype': { type: 'string' },
      'ignore-eos': { type: 'boolean', default: false },
      'max-devices': { type: 'string' },
      'min-devices': { type: 'string' },
      autoscale: { type: 'string' },
      'slo-ttft-ms': { type: 'string' },
      'slo-tpot-ms': { type: 'string' },
      host: { type: 'string' },
      port: { type: 'string' },
      url: { type: 'string' },
      executor: { type: 'string' },
      'standby-chunks': { type: 'string' },
      'expert-tables': { type: 'string' },
      'prefill-standby': { type: 'string' },
      'standby-engines': { type: 'string' },
      'precapture-graphs': { type: 'string' },
      'log-level': { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const options: Record<string, unknown> = {};
  if (values.backend !== undefined) options.backend = values.backend;
  if (values['mock-devices'] !== undefined) options.mockDevices = Number(values['mock-devices']);
  if (values['mock-capacity'] !== undefined) options.mockCapacity = values['mock-capacity'];
  switch (command) {
    case 'devices': {
      const report = devicesReport(options);
      process.stdout.write(values.json ? `${JSON.stringify(report, null, 2)}\n` : `${renderDevices(report)}\n`);
      return 0;
    }
    case 'hmm': {
      if (!values.socket) {
        process.stderr.write(`elasticmoe hmm: --socket PATH is required\n${USAGE}\n`);
        return 2;
      }
      return runHmm({ socket: values.socket, synthetic: values.synthetic, devices: values.devices, seed: values.seed, runtime: options });
    }
    case 'generate': {
      // Loaded on use: the executor (kernels, forward pass) is not needed by the other commands.
      const { runGenerate } = await import('./generate.js');
      return runGenerate({
        model: values.model,
        synthetic: values.synthetic,
        tokenizer: values.tokenizer,
        devices: values.devices,
        prompt: values.prompt,
        promptIds: values['prompt-ids'],
        chat: values.chat,
        maxTokens: values['max-tokens'],
        seed: values.seed,
        kvBlocks: values['kv-blocks'],
        maxTokensPerStep: values['max-tokens-per-step'],
        kvDtype: values['kv-dtype'],
        ignoreEos: values['ignore-eos'],
        json: values.json,
        runtime: options,
      });
    }
    case 'scale': {
      const { runScale } = await import('./scale.js');
      return runScale({ devices: values.devices, url: values.url, json: values.json });
    }
    case 'serve': {
      const { runServe } = await import('./serve.js');
      return runServe({
        model: values.model,
        synthetic: values.synthetic,
        tokenizer: values.tokenizer,
        devices: values.devices,
        maxDevices: values['max-devices'],
        minDevices: values['min-devices'],
        autoscale: values.autoscale,
        sloTtftMs: values['slo-ttft-ms'],
        sloTpotMs: values['slo-tpot-ms'],
        host: values.host,
        port: values.port,
        seed: values.seed,
        kvBlocks: values['kv-blocks'],
        maxTokensPerStep: values['max-tokens-per-step'],
        kvDtype: values['kv-dtype'],
        logLevel: values['log-level'],
        executor: values.executor,
        standbyChunks: values['standby-chunks'],
        prefillStandby: values['prefill-standby'],
        standbyEngines: values['standby-engines'],
        expertTables: values['expert-tables'],
        precaptureGraphs: values['precapture-graphs'],
        runtime: options,
      });
    }
    default:
      process.stderr.write(`elasticmoe: unknown command '${command}'\n${USAGE}\n`);
      return 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    if (err instanceof ElasticMoeError || (err instanceof Error && 'code' in err && String((err as { code: unknown }).code).startsWith('ERR_PARSE_ARGS'))) {
      process.stderr.write(`elasticmoe: ${err.message}\n`);
    } else {
      process.stderr.write(`elasticmoe: ${err instanceof Error ? err.stack : String(err)}\n`);
    }
    process.exitCode = 1;
  },
);
