#!/usr/bin/env node
// SVG (no dependencies) of one or more loadgen runs (scripts/loadgen.mjs output):
// three panels over the replay's time — arrivals per second, the device count
// (sampled from /admin/layout), and the windowed SLO attainment (the share of
// requests that arrived in the last window that met the SLO). Several runs of
// the same trace (compare-scaling.mjs) are overlaid, one colour each; the
// arrivals are the first run's. Server restarts (compare-scaling's cold-restart
// events) are shaded.
//   node scripts/plot-load.mjs run.jsonl > run.svg
//   node scripts/plot-load.mjs a.jsonl b.jsonl --label small --label elastic --window-s 20 --title 'bursts' --out cmp.svg
import { readFileSync, writeFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

import { maxOf, windowedAttainment } from './loadgen.mjs';

const COLORS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#17becf'];

/** The records of a loadgen output (JSON lines). */
export function readRecords(file) {
  return readFileSync(file, 'utf8').split('\n').filter((l) => l.trim() !== '').map((l, i) => {
    try {
      return JSON.parse(l);
    } catch (e) {
      throw new Error(`${file}:${i + 1}: not JSON: ${e.message}`);
    }
  });
}

const esc = (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
const fx = (v) => (Number.isFinite(v) ? v.toFixed(1) : '0');

function niceStep(span, most) {
  for (let e = -3; e <= 6; e++) {
    for (const m of [1, 2, 5]) {
      const s = m * 10 ** e;
      if (span / s <= most) return s;
    }
  }
  return span;
}

function timeStep(span) {
  for (const s of [0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200]) if (span / s <= 10) return s;
  return 3600 * Math.ceil(span / 36000);
}

/** Lines of at most about `width` characters, broken between words. */
function wrap(text, width) {
  const lines = [];
  let line = '';
  for (const word of String(text).split(/\s+/)) {
    if (line && line.length + 1 + word.length > width) {
      lines.push(line);
      line = word;
    } else {
      line = line ? `${line} ${word}` : word;
    }
  }
  if (line) lines.push(line);
  return lines.length ? lines : [''];
}

const timeLabel = (s) => (s >= 120 && s % 60 === 0 ? `${s / 60} min` : `${Number(s.toFixed(1))} s`);

/**
 * The SVG of runs `[{ label, records }]`. Options: title; windowS (attainment window,
 * default: the run's length / 15 within 1..60 s); binS (arrival bins, default: about 150 bins).
 */
export function plotLoad(runs, options = {}) {
  if (runs.length === 0) throw new Error('plotLoad: no runs');
  const data = runs.map((run, k) => {
    const requests = run.records.filter((r) => r.kind === 'request');
    const samples = run.records.filter((r) => r.kind === 'sample').sort((a, b) => a.t - b.t);
    const events = run.records.filter((r) => r.kind === 'event');
    const summary = run.records.find((r) => r.kind === 'summary');
    const end = Math.max(maxOf(requests.map((r) => r.end ?? r.t), 0), maxOf(samples.map((s) => s.t), 0), summary?.durationS ?? 0);
    return { label: run.label ?? `run ${k + 1}`, color: COLORS[k % COLORS.length], requests, samples, events, summary, end };
  });
  const end = Math.max(1e-3, ...data.map((d) => d.end));
  const binS = options.binS ?? Math.max(end / 150, end > 30 ? 1 : end / 60);
  const windowS = options.windowS ?? Math.min(60, Math.max(1, Math.round(end / 15)));

  const W = 960;
  const L = 64;
  const R = 24;
  const PH = 150;
  const GAP = 44;
  const titleLines = wrap(options.title ?? 'load, devices and SLO attainment', 112);
  const top = 62 + 18 * (titleLines.length - 1) + 18 * data.length;
  const panelTop = (i) => top + i * (PH + GAP);
  const H = panelTop(3) - GAP + 40;
  const x = (t) => L + ((W - L - R) * t) / end;
  const out = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    ...titleLines.map((line, i) => `<text x="${L}" y="${22 + 18 * i}" font-size="15">${esc(line)}</text>`),
  ];
  data.forEach((d, k) => {
    const lx = L;
    const ly = 42 + 18 * (titleLines.length - 1) + k * 18;
    const s = d.summary;
    const extra = s ? ` — SLO attainment ${s.attainment == null ? '-' : (100 * s.attainment).toFixed(1)}%, ${s.errors} of ${s.requests} failed, `
      + `${s.deviceHours == null ? '-' : Number(s.deviceHours.toPrecision(3))} device-hours (mean ${s.meanDevices ?? '-'} devices)` : '';
    out.push(`<line x1="${lx}" y1="${ly - 4}" x2="${lx + 18}" y2="${ly - 4}" stroke="${d.color}" stroke-width="3"/>`,
      `<text x="${lx + 24}" y="${ly}">${esc(d.label + extra)}</text>`);
  });

  // Axes, grid and time ticks of a panel; returns its y mapping.
  const panel = (i, title, max, ticks, fmt) => {
    const y0 = panelTop(i);
    const y = (v) => y0 + PH - (PH * v) / max;
    out.push(`<text x="${L}" y="${y0 - 8}" font-weight="bold">${esc(title)}</text>`);
    for (const v of ticks) {
      out.push(`<line x1="${L}" y1="${fx(y(v))}" x2="${W - R}" y2="${fx(y(v))}" stroke="#e4e4e4"/>`,
        `<text x="${L - 6}" y="${fx(y(v) + 4)}" text-anchor="end">${esc(fmt(v))}</text>`);
    }
    const ts = timeStep(end);
    for (let t = 0; t <= end + 1e-9; t += ts) {
      out.push(`<line x1="${fx(x(t))}" y1="${y0 + PH}" x2="${fx(x(t))}" y2="${y0 + PH + 4}" stroke="black"/>`,
        `<text x="${fx(x(t))}" y="${y0 + PH + 17}" text-anchor="middle">${esc(timeLabel(t))}</text>`);
    }
    out.push(`<line x1="${L}" y1="${y0 + PH}" x2="${W - R}" y2="${y0 + PH}" stroke="black"/>`,
      `<line x1="${L}" y1="${y0}" x2="${L}" y2="${y0 + PH}" stroke="black"/>`);
    // Restarts: shaded from the decision to the new server answering.
    data.forEach((d) => {
      const restarts = d.events.filter((e) => e.action === 'restart');
      for (const r of restarts) {
        const ready = d.events.find((e) => e.action === 'ready' && e.t >= r.t);
        const t1 = ready?.t ?? d.end;
        out.push(`<rect x="${fx(x(r.t))}" y="${y0}" width="${fx(Math.max(1, x(t1) - x(r.t)))}" height="${PH}" fill="${d.color}" fill-opacity="0.12"/>`);
      }
    });
    return y;
  };

  // 1. Arrivals per second (the first run's requests, by their scheduled time).
  const nb = Math.max(1, Math.ceil(end / binS));
  const bins = new Array(nb).fill(0);
  for (const r of data[0].requests) bins[Math.min(nb - 1, Math.max(0, Math.floor(r.t / binS)))] += 1;
  const rates = bins.map((n) => n / binS);
  const maxRate = maxOf(rates, 1e-9);
  const rStep = niceStep(maxRate, 4);
  const rMax = Math.ceil(maxRate / rStep) * rStep;
  const yr = panel(0, `arrivals per second (${Number(binS.toPrecision(3))} s bins)`, rMax, Array.from({ length: Math.round(rMax / rStep) + 1 }, (_, i) => i * rStep),
    (v) => String(Number(v.toPrecision(3))));
  const area = [`${fx(x(0))},${fx(yr(0))}`];
  rates.forEach((v, i) => area.push(`${fx(x(i * binS))},${fx(yr(v))}`, `${fx(x(Math.min(end, (i + 1) * binS)))},${fx(yr(v))}`));
  area.push(`${fx(x(Math.min(end, nb * binS)))},${fx(yr(0))}`);
  out.push(`<polygon points="${area.join(' ')}" fill="#9aa7b4" stroke="#5b6b7b" stroke-width="1"/>`);

  // 2. Devices (step lines; each run's samples, the last count held to its end).
  const maxDev = maxOf(data.flatMap((d) => d.samples.map((s) => s.devices ?? 0)), 1);
  const yd = panel(1, 'devices', maxDev + 1, Array.from({ length: maxDev + 2 }, (_, i) => i).filter((i) => maxDev < 12 || i % 2 === 0), String);
  data.forEach((d, k) => {
    const s = d.samples.filter((p) => p.devices != null);
    if (s.length === 0) return;
    const off = (k - (data.length - 1) / 2) * 1.5; // overlapping runs stay visible
    const pts = [];
    s.forEach((p, i) => {
      if (i > 0 && p.devices === s[i - 1].devices) return; // one horizontal segment per count
      let j = i + 1;
      while (j < s.length && s[j].devices === p.devices) j++;
      const t1 = j < s.length ? s[j].t : d.end;
      pts.push(`${fx(x(p.t))},${fx(yd(p.devices) + off)}`, `${fx(x(t1))},${fx(yd(p.devices) + off)}`);
    });
    out.push(`<polyline points="${pts.join(' ')}" fill="none" stroke="${d.color}" stroke-width="2"/>`);
  });

  // 3. Windowed SLO attainment.
  const ya = panel(2, `SLO attainment of the requests that arrived in the last ${Number(windowS.toPrecision(3))} s`, 1, [0, 0.25, 0.5, 0.75, 1], (v) => `${v * 100}%`);
  data.forEach((d) => {
    const w = windowedAttainment(d.requests, { windowS, stepS: binS, end: d.end });
    let seg = [];
    const flush = () => {
      if (seg.length > 1) out.push(`<polyline points="${seg.join(' ')}" fill="none" stroke="${d.color}" stroke-width="1.8"/>`);
      else if (seg.length === 1) out.push(`<circle cx="${seg[0].split(',')[0]}" cy="${seg[0].split(',')[1]}" r="2" fill="${d.color}"/>`);
      seg = [];
    };
    for (const p of w) {
      if (p.attainment == null) flush();
      else seg.push(`${fx(x(Math.min(p.t, end)))},${fx(ya(p.attainment))}`);
    }
    flush();
  });
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}

async function cli(argv) {
  const { values: v, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      label: { type: 'string', multiple: true }, title: { type: 'string' }, 'window-s': { type: 'string' }, 'bin-s': { type: 'string' },
      out: { type: 'string' }, help: { type: 'boolean', short: 'h' },
    },
  });
  if (v.help || positionals.length === 0) {
    process.stderr.write('usage: node scripts/plot-load.mjs RUN.jsonl [RUN2.jsonl ...] [--label NAME ...] [--title T] [--window-s S] [--bin-s S] [--out FILE.svg]\n');
    return v.help ? 0 : 2;
  }
  const runs = positionals.map((file, k) => ({ label: v.label?.[k] ?? file.replace(/^.*\//, '').replace(/\.jsonl?$/, ''), records: readRecords(file) }));
  const svg = plotLoad(runs, {
    ...(v.title ? { title: v.title } : {}),
    ...(v['window-s'] ? { windowS: Number(v['window-s']) } : {}),
    ...(v['bin-s'] ? { binS: Number(v['bin-s']) } : {}),
  });
  if (v.out) writeFileSync(v.out, svg);
  else process.stdout.write(svg);
  return 0;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  cli(process.argv.slice(2)).then((code) => { process.exitCode = code; }, (e) => {
    process.stderr.write(`plot-load: ${e.message}\n`);
    process.exitCode = 1;
  });
}
