#!/usr/bin/env python3
"""Independent reference for the executor: builds small random-weight qwen3_moe
and mixtral models with Hugging Face transformers, saves them (config.json +
safetensors, bf16), and records transformers' greedy tokens and per-step logits
for a fixed set of prompts. scripts/check-vs-transformers.mjs then runs
elasticmoe on the saved folders and compares.

Four references per model, all from the same bf16 weights:
  - "f64": the model upcast to float64 (weights exactly the bf16 values) and run on
    the CPU (no TF32, no choice of GPU kernels); transformers still takes a few steps
    in f32 whatever the model's dtype (RMSNorm, the router softmax, the rotary
    cos/sin). elasticmoe with an f32 KV cache (kvDtype 'f32') computes everything in
    f32 from the same weights, so its greedy tokens are compared with these: the
    STRICT criterion (all steps equal);
  - "f32": the model upcast to float32 on the machine's device -- elasticmoe
    computes activations in f32 too, but by default keeps its KV cache in bf16;
  - "f32kv16": the same with K and V rounded to bf16 inside attention, which is
    what elasticmoe's default bf16 KV cache does: the reference for its tokens;
  - "bf16": the model run in bfloat16, as transformers usually serves it -- logits
    are compared within bf16 tolerance.
Logits are stored as float64 (exact for the f32 and bf16 runs).

usage: python3 scripts/hf_reference.py OUT_DIR [--steps 64]
Runs on the GPU machine (PyTorch + transformers are installed there); the f64
reference always runs on its CPU, the others on the GPU when there is one.
"""
import argparse
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

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


def load(folder, dtype):
    """The saved checkpoint as transformers serves it, in `dtype`. Every reference is
    loaded this way, not taken from the model that build() made and saved: that
    model's .to(bfloat16) also rounded the rotary inverse frequencies (a buffer, not
    saved) to bf16 (0.421875 for 0.4216965: relative errors up to 2^-9), a phase error
    that grows with the position -- it moved the prefill logits of the 60-token prompt
    by 2e-2."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


@torch.no_grad()
def run(model, prompts, steps, device):
    m = model.to(device=device)
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        g = m.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None,
                       pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        tokens = g.sequences[0, len(p):].tolist()
        logits = torch.stack([x[0].double() for x in g.logits]).cpu()  # [steps, vocab], float64: the f64 run keeps its precision
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
        folder = os.path.join(a.out, arch)
        build(arch).save_pretrained(folder, safe_serialization=True)
        prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
        ref = {'arch': arch, 'transformers': transformers.__version__, 'torch': torch.__version__,
               'device': torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu', 'steps': a.steps,
               'prompts': prompts,
               'f32': run(load(folder, torch.float32), prompts, a.steps, device)}
        if register_bf16_kv_attention():
            model = load(folder, torch.float32)
            model.set_attn_implementation('emoe_bf16_kv')
            ref['f32kv16'] = run(model, prompts, a.steps, device)
        # float64 on the CPU, attention through SDPA, which stays in float64 (transformers' eager attention takes its
        # softmax in f32); experts through the eager loop (the grouped matmul of transformers 5 refuses float64).
        model = load(folder, torch.float64)
        model.set_attn_implementation('sdpa')
        if hasattr(model, 'set_experts_implementation'):
            model.set_experts_implementation('eager')
        ref['f64'] = run(model, prompts, a.steps, 'cpu')
        ref['f64_device'] = 'cpu'
        ref['bf16'] = run(load(folder, torch.bfloat16), prompts, a.steps, device)
        with open(os.path.join(folder, 'reference.json'), 'w') as f:
            json.dump(ref, f)
        print(f'{arch}: saved to {folder}', file=sys.stderr)


if __name__ == '__main__':
    main()
