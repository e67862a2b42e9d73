#!/usr/bin/env python3
"""Baseline for scripts/bench-decode.mjs: transformers' generate() decode
throughput on the same Qwen3-30B-A3B config (random bf16 weights) and GPU, in the
same job. One JSON line per batch size on stdout.
usage: python3 scripts/hf_decode_baseline.py CONFIG.json [--batches 1,8,32] [--context 64] [--new 32] [--layers N]
"""
import argparse
import json
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument('config')
ap.add_argument('--batches', default='1,8,32')
ap.add_argument('--context', type=int, default=64)
ap.add_argument('--new', type=int, default=32)
ap.add_argument('--layers', type=int, default=0)
a = ap.parse_args()

cfg = AutoConfig.from_pretrained(a.config)
if a.layers:
    cfg.num_hidden_layers = a.layers
torch.manual_seed(0)
t = time.time()
with torch.device('cuda'):
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).eval()
print(json.dumps({'bench': 'hf_setup', 'transformers': transformers.__version__, 'torch': torch.__version__,
                  'gpu': torch.cuda.get_device_name(0), 'layers': cfg.num_hidden_layers, 'initSeconds': time.time() - t}), flush=True)
for b in [int(x) for x in a.batches.split(',')]:
    ids = torch.randint(0, cfg.vocab_size, (b, a.context), device='cuda')
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        torch.cuda.synchronize()
        t0 = time.time()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)  # prefill + 1 token
        torch.cuda.synchronize()
        t1 = time.time()
        model.generate(ids, max_new_tokens=a.new + 1, min_new_tokens=a.new + 1, **kw)
        torch.cuda.synchronize()
        t2 = time.time()
    decode = (t2 - t1) - (t1 - t0)  # remove the prefill and first token
    print(json.dumps({'bench': 'hf_decode', 'batch': b, 'context': a.context, 'newTokens': a.new,
                      'tokensPerSecond': b * a.new / decode, 'msPerStep': decode / a.new * 1e3}), flush=True)
