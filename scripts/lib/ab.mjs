// A/B summaries of bench-scale runs: each run's scales, in the order they ran, with the figures
// compared between arms (command to first new step, release, the work ahead after it, serving
// work from the command to 1 s after the first new step and the time lost there, graph captures
// in the new layout's first second), then per arm and scale position the range and mean.

/** The scales of one run (its parsed JSONL records), in order: { label, figures }. */
export function scalesOf(records) {
  const out = [];
  let scale;
  for (const r of records) {
    if (r.bench === 'scale') scale = r;
    if (r.bench !== 'after' || !scale) continue;
    out.push({
      label: `${scale.from.join(',')}->${scale.to.join(',')}`,
      figures: {
        latencyMs: scale.commandToFirstNewStepMs,
        releaseMs: r.phases?.releaseMs ?? null,
        aheadMs: r.ahead?.ms ?? null,
        toSecondAfter: r.workToSecondAfterFirstStep?.ratio ?? null,
        lostMs: r.workToSecondAfterFirstStep?.lostMs ?? null,
        captures: r.graphsInSecond?.captures ?? null,
      },
    });
    scale = undefined;
  }
  return out;
}

/**
 * arms: { name: [runs] } where a run is its scalesOf list. Returns, per arm, per scale position
 * (runs of one arm must scale alike; a position whose label differs between runs is refused), the
 * label and for each figure { min, max, mean, n } over the runs that have it.
 */
export function summarize(arms) {
  const out = {};
  for (const [name, runs] of Object.entries(arms)) {
    const positions = Math.max(0, ...runs.map((r) => r.length));
    out[name] = [];
    for (let i = 0; i < positions; i++) {
      const here = runs.map((r) => r[i]).filter(Boolean);
      const labels = new Set(here.map((s) => s.label));
      if (labels.size > 1) throw new Error(`arm ${name}: scale ${i + 1} differs between runs (${[...labels].join(' / ')})`);
      const figures = {};
      for (const key of Object.keys(here[0].figures)) {
        const xs = here.map((s) => s.figures[key]).filter((x) => typeof x === 'number');
        figures[key] = xs.length === 0 ? null
          : { min: Math.min(...xs), max: Math.max(...xs), mean: xs.reduce((a, b) => a + b, 0) / xs.length, n: xs.length };
      }
      out[name].push({ label: here[0].label, figures });
    }
  }
  return out;
}
