#!/usr/bin/env python3
"""Self time per function of a V8 .cpuprofile (node --cpu-prof), largest first."""
import collections
import json
import sys

for path in sys.argv[1:]:
    p = json.load(open(path))
    nodes = {n['id']: n for n in p['nodes']}
    self_us = collections.Counter()
    for sample, dt in zip(p['samples'], p['timeDeltas']):
        cf = nodes[sample]['callFrame']
        self_us[f"{cf['functionName'] or '(anonymous)'} {cf['url'].split('/')[-1]}:{cf['lineNumber'] + 1}"] += dt
    total = sum(self_us.values())
    print(f"{path}: {total / 1000:.0f} ms sampled")
    for k, v in self_us.most_common(40):
        print(f"{v / 1000:9.1f} ms {100 * v / total:5.1f}%  {k}")
