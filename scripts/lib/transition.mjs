// Serving during a transition, measured from the engine's step timeline: how much of the
// serving work the steps before the command did per unit of time got done in the
// transition window. Each step in the window counts as the time a step like it took
// before, scaled by the part of it inside the window. "Like it" means the same token
// count when at least 3 steps before had it, else the step time a least-squares line
// through the steps before (ms against tokens) gives its token count (at least the
// fastest step before), when they had two token counts or more; else the same kind
// (decode-only or mixed), else any step. The sum is divided by the window's length.
// 1.0: the window's steps ran as fast as before and left no gap. 0.8: a fifth of the
// window's serving was lost: slower steps, or time with no step running. Above 1: the
// steps ran faster than before (the new layout's steps after a scale-up can). Unlike a
// median over the window, this works for windows of a few steps. Unlike tokens per
// second, it does not depend on where the window falls in a wave of prefills.

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? undefined : s[s.length >> 1];
};

/** Least-squares line ms = a + b * tokens through `steps`, or undefined when they have a single token count. */
function fitLine(steps) {
  const n = steps.length;
  const mx = steps.reduce((a, s) => a + s.tokens, 0) / n;
  const my = steps.reduce((a, s) => a + s.ms, 0) / n;
  let sxx = 0;
  let sxy = 0;
  for (const s of steps) {
    sxx += (s.tokens - mx) ** 2;
    sxy += (s.tokens - mx) * (s.ms - my);
  }
  if (!(sxx > 0)) return undefined;
  const b = sxy / sxx;
  return { a: my - b * mx, b };
}

/**
 * steps: [{ t, ms, tokens, decode }] (t: when the step ended, ms: its duration; one instance).
 * `ref` ({ from, to }): the steps ending in (from, to] are the reference instead of the
 * `beforeMs` before tCmd (the steady steps after a window, when the layout changed before it).
 * Returns { ratio, windowMs, workMs, steps } or undefined when no reference step ran.
 */
export function workDuring(steps, tCmd, tEnd, beforeMs = 3000, ref = undefined) {
  const from = ref ? ref.from : tCmd - beforeMs;
  const to = ref ? ref.to : tCmd;
  const before = steps.filter((s) => s.t > from && s.t <= to);
  if (before.length === 0 || !(tEnd > tCmd)) return undefined;
  const kind = (s) => (s.tokens === s.decode ? 'decode' : 'mixed');
  const byTokens = new Map();
  const byKind = new Map();
  for (const s of before) {
    byTokens.set(s.tokens, [...(byTokens.get(s.tokens) ?? []), s.ms]);
    byKind.set(kind(s), [...(byKind.get(kind(s)) ?? []), s.ms]);
  }
  const any = median(before.map((s) => s.ms));
  const line = fitLine(before);
  const fastest = Math.min(...before.map((s) => s.ms));
  const like = (s) => {
    const same = byTokens.get(s.tokens);
    if (same && same.length >= 3) return median(same);
    if (line) return Math.max(fastest, line.a + line.b * s.tokens);
    return median(byKind.get(kind(s)) ?? []) ?? any;
  };
  let workMs = 0;
  let counted = 0;
  for (const s of steps) {
    const start = s.t - s.ms;
    const overlap = Math.min(s.t, tEnd) - Math.max(start, tCmd);
    if (overlap <= 0 || s.ms <= 0) continue;
    workMs += like(s) * (overlap / s.ms);
    counted++;
  }
  return { ratio: workMs / (tEnd - tCmd), windowMs: tEnd - tCmd, workMs, steps: counted };
}

/**
 * Serving work in a window from the command to tEnd that runs past the switch-over (the first steps
 * on the new layout, the release and the work ahead of the next scale fall in it): the old layout's
 * steps count as like steps took in the `beforeMs` before the command, the new layout's as like steps
 * of the new layout took in its steady serving `refNew` ({ from, to }). Returns { ratio, windowMs,
 * workMs, steps }, or undefined when either layout has no reference step.
 */
export function workAcross(oldSteps, newSteps, tCmd, tEnd, beforeMs, refNew) {
  const a = workDuring(oldSteps, tCmd, tEnd, beforeMs);
  const b = workDuring(newSteps, tCmd, tEnd, 0, refNew);
  if (!a || !b) return undefined;
  return { ratio: (a.workMs + b.workMs) / (tEnd - tCmd), windowMs: tEnd - tCmd, workMs: a.workMs + b.workMs, steps: a.steps + b.steps };
}

/**
 * The pauses between consecutive steps (one instance) that start in (a, b]: the time from a
 * step's end to the next one's start, when the host did not keep the GPUs busy. Returns
 * { maxMs, sumMs, count }. Used for the second after a scale's first new step, where the
 * release and the new layout's first captures run: unlike a rate, it does not depend on
 * the mix of prompt and decode steps that falls in the window.
 */
export function pauses(steps, a, b) {
  let maxMs = 0;
  let sumMs = 0;
  let count = 0;
  for (let i = 1; i < steps.length; i++) {
    const start = steps[i].t - steps[i].ms;
    if (start <= a || start > b) continue;
    const gap = Math.max(0, start - steps[i - 1].t);
    maxMs = Math.max(maxMs, gap);
    sumMs += gap;
    count++;
  }
  return { maxMs, sumMs, count };
}
