#!/usr/bin/env python3
"""How sensitive are the reference models to a bf16 KV cache? Runs the saved
transformers models (from hf_reference.py) in float32 twice -- as is, and with
the K and V projections' outputs rounded to bf16 (what elasticmoe's bf16 KV cache
does to attention inputs) -- and prints, per prompt, the first step where greedy
tokens differ and the largest logit difference before it.
usage: python3 scripts/hf_kv_sensitivity.py REF_DIR
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM


def run(model, prompt, steps):
    ids = torch.tensor([prompt], device='cuda')
    g = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None,
                       pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return g.sequences[0, len(prompt):].tolist(), torch.stack([x[0].float() for x in g.logits])


@torch.no_grad()
def main(root):
    for arch in ['qwen3_moe', 'mixtral']:
        folder = os.path.join(root, arch)
        ref = json.load(open(os.path.join(folder, 'reference.json')))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
        hooks = []
        for i, p in enumerate(ref['prompts']):
            for h in hooks:
                h.remove()
            hooks = []
            clean_tokens, clean_logits = run(model, p, ref['steps'])
            for layer in model.model.layers:
                for mod in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    hooks.append(mod.register_forward_hook(lambda m, inp, out: out.to(torch.bfloat16).to(torch.float32)))
            t, l = run(model, p, ref['steps'])
            d = next((k for k in range(len(t)) if t[k] != clean_tokens[k]), -1)
            upto = len(t) if d < 0 else d + 1
            print(json.dumps({'arch': arch, 'prompt': i, 'firstDiffStep': d,
                              'maxAbsLogitDiff': (l[:upto] - clean_logits[:upto]).abs().max().item(),
                              'step0MaxAbs': (l[0] - clean_logits[0]).abs().max().item(),
                              'cleanMatchesSaved': clean_tokens == ref['f32'][i]['tokens']}), flush=True)
        for h in hooks:
            h.remove()


main(sys.argv[1])
