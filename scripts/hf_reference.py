#!/usr/bin/env python3
"""Independent reference for the executor: builds small random-weight qwen3_moe
and mixtral models with Hugging Face transformers, saves them (config.json +
safetensors, bf16), and records transformers' greedy tokens and per-step logits
for a fixed set of prompts. scripts/check-vs-transformers.mjs then runs
elasticmoe on the saved folders and compares.

Three references per model, all from the same bf16 weights:
  - "f32": the model upcast to float32 (weights exactly the bf16 values, math in
    f32) -- elasticmoe computes activations in f32 too, so greedy tokens should
    agree closely, but elasticmoe keeps its KV cache in bf16;
  - "f32kv16": the same with K and V rounded to bf16 inside attention, which is
    what elasticmoe's KV cache does: the strict reference for greedy tokens;
  - "bf16": the model run in bfloat16, as transformers usually serves it -- logits
    are compared within bf16 tolerance.

usage: python3 scripts/hf_reference.py OUT_DIR [--steps 64]
Runs on the GPU machine (PyTorch + transformers are installed there).
"""
import argparse
import json
import os
import sys

import torch
import transformers
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

PROMPT_LENGTHS = [5, 17, 33, 60]


def build(arch):
    common = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                  vocab_size=1000, max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  initializer_range=0.1, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if arch == 'qwen3_moe':
        cfg = Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=128, head_dim=32, num_experts=16,
                             num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                             **common)
        cls = Qwen3MoeForCausalLM
    else:
        cfg = MixtralConfig(intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, **common)
        cls = MixtralForCausalLM
    torch.manual_seed(1234)
    model = cls(cfg).to(torch.bfloat16).eval()
    return model


@torch.no_grad()
def run(model, prompts, steps, dtype, device):
    m = model.to(device=device, dtype=dtype)
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        g = m.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None,
                       pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        tokens = g.sequences[0, len(p):].tolist()
        logits = torch.stack([x[0].float() for x in g.logits]).cpu()  # [steps, vocab]
        out.append({'tokens': tokens, 'logits': logits.tolist()})
    return out


def register_bf16_kv_attention():
    """An attention function that rounds K and V to bf16 before attending -- what
    elasticmoe's bf16 KV cache does -- so the "f32kv16" reference differs from
    elasticmoe only by summation order. Returns False when this transformers
    version lacks the attention registry."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        return False

    def bf16_kv_attention(module, query, key, value, attention_mask, **kwargs):
        key = key.to(torch.bfloat16).to(query.dtype)
        value = value.to(torch.bfloat16).to(query.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register('emoe_bf16_kv', bf16_kv_attention)
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('out')
    ap.add_argument('--steps', type=int, default=64)
    a = ap.parse_args()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    g = torch.Generator().manual_seed(99)
    for arch in ['qwen3_moe', 'mixtral']:
        model = build(arch)
        folder = os.path.join(a.out, arch)
        model.save_pretrained(folder, safe_serialization=True)
        prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
        ref = {'arch': arch, 'transformers': transformers.__version__, 'torch': torch.__version__,
               'device': torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu', 'steps': a.steps,
               'prompts': prompts,
               'f32': run(model, prompts, a.steps, torch.float32, device)}
        if register_bf16_kv_attention():
            model = build(arch)
            model.set_attn_implementation('emoe_bf16_kv')
            ref['f32kv16'] = run(model, prompts, a.steps, torch.float32, device)
        model = build(arch)  # fresh bf16 copy (the f32 runs upcast theirs in place)
        ref['bf16'] = run(model, prompts, a.steps, torch.bfloat16, device)
        with open(os.path.join(folder, 'reference.json'), 'w') as f:
            json.dump(ref, f)
        print(f'{arch}: saved to {folder}', file=sys.stderr)


if __name__ == '__main__':
    main()
