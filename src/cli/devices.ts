// `elasticmoe devices`: the backend in use, each device with its memory, the
// peer-to-peer matrix, and (for --backend auto) why each backend was or was not chosen.
import { Runtime, type RuntimeOptionsInput } from '../runtime/index.js';
import { formatBytes, table } from './format.js';

export interface DevicesReport {
  backend: string;
  selection: { requested: string; reason: string; mockFallback: boolean; probes: Record<string, unknown> };
  devices: Array<{ ordinal: number; name: string; totalBytes: number; freeBytes: number; computeCapability: string; granularity: number }>;
  peers: boolean[][];
}

export function devicesReport(options: RuntimeOptionsInput): DevicesReport {
  const rt = Runtime.open(options);
  return {
    backend: rt.backend,
    selection: {
      requested: rt.selection.requested,
      reason: rt.selection.reason,
      mockFallback: rt.selection.mockFallback,
      probes: rt.selection.probes,
    },
    devices: rt.devices().map((d) => ({
      ordinal: d.ordinal,
      name: d.name,
      totalBytes: d.totalBytes,
      freeBytes: d.freeBytes,
      computeCapability: d.computeCapability,
      granularity: rt.granularity(d.ordinal),
    })),
    peers: rt.peerMatrix(),
  };
}

export function renderDevices(r: DevicesReport): string {
  const out: string[] = [];
  out.push(`backend: ${r.backend}${r.selection.mockFallback ? ' (fallback: no accelerator found)' : ''}`);
  if (r.selection.requested === 'auto') {
    out.push('backend selection (auto):');
    for (const [name, p] of Object.entries(r.selection.probes)) {
      const probe = p as { available: boolean; deviceCount: number; reason: string; version: string };
      out.push(probe.available
        ? `  ${name}: available, ${probe.deviceCount} device(s)${probe.version ? `, ${probe.version}` : ''}${name === r.backend ? ' <- chosen' : ''}`
        : `  ${name}: unavailable: ${probe.reason}`);
    }
  }
  out.push('');
  out.push(table([
    ['device', 'name', 'total', 'free', 'cc', 'granularity'],
    ...r.devices.map((d) => [String(d.ordinal), d.name, formatBytes(d.totalBytes), formatBytes(d.freeBytes),
      d.computeCapability || '-', formatBytes(d.granularity)]),
  ]));
  if (r.devices.length > 1) {
    out.push('');
    out.push('peer access (row can reach column):');
    out.push(table([
      ['', ...r.devices.map((d) => String(d.ordinal))],
      ...r.peers.map((row, i) => [String(i), ...row.map((ok, j) => (i === j ? '-' : ok ? 'yes' : 'no'))]),
    ]));
  }
  return out.join('\n');
}
