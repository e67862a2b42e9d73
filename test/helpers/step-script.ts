// Runs a script of forward steps: per step, per rank, the names of the sequences in it. A name
// seen for the first time starts with `first(name)` (its prompt) at position 0; after that it
// feeds back its last token. Shared by the forward-pass suites on the mock and on GPUs.
import type { ForwardEngine } from '../../src/executor/forward.js';
import type { SeqStep } from '../../src/executor/types.js';
import type { Hmm } from '../../src/hmm/hmm.js';

export interface StepScriptOptions {
  /** KV blocks each sequence gets (on its rank's device, under `${tag}:${name}`). */
  blocks: number;
  /** The first tokens of a sequence. */
  first: (name: string) => number[];
  /** Called after each step. */
  after?: () => void;
}

/** Each step's sampled tokens by sequence name; the sequences' KV blocks are freed at the end. */
export async function runStepScript(e: ForwardEngine, kv: Hmm['kv'], tag: string, script: string[][][],
  o: StepScriptOptions): Promise<Array<Record<string, number>>> {
  const seqs = new Map<string, { blocks: number[]; pos: number; next: number[] }>();
  const out: Array<Record<string, number>> = [];
  try {
    for (const step of script) {
      const ranks = step.map((names, r) => names.map((name): SeqStep => {
        let s = seqs.get(name);
        if (!s) {
          s = { blocks: kv.allocate(`${tag}:${name}`, e.layout.devices[r]!, o.blocks), pos: 0, next: o.first(name) };
          seqs.set(name, s);
        }
        return { seqId: name, tokens: s.next, startPos: s.pos, blockTable: s.blocks, sample: true };
      }));
      const res = await e.step({ ranks });
      const got: Record<string, number> = {};
      for (const [name, tok] of res.next) {
        got[name] = tok;
        const s = seqs.get(name)!;
        s.pos += s.next.length;
        s.next = [tok];
      }
      out.push(got);
      o.after?.();
    }
  } finally {
    for (const name of seqs.keys()) kv.free(`${tag}:${name}`);
  }
  return out;
}
