#!/usr/bin/env python3
"""Hugging Face transformers' `generate` on the GPU machine, for the Llama
family's benchmark cases (docs/benchmarks.md): a preset's published shapes
with random weights in bf16, `prompts` prompts of `prompt_len` random ids,
`gen_len` greedy new tokens, throughput by FlexGen's definitions (prefill =
prompts x prompt_len / prefill time; decode = prompts x (gen_len - 1) /
decode time; total = prompts x gen_len / (prefill + decode)).

Prefill time is a `generate` of one new token; decode time is a full run's
time less it. One untimed warm-up run first. Prints one JSON object.

With --gpu-weights-gib G (case F: a model larger than the GPU), the model
is made on the meta device, accelerate's `infer_auto_device_map` with
`max_memory` {GPU: G GiB, CPU: the rest} places whole decoder layers, each
weight is materialised with random values where it was placed, and
`dispatch_model` runs it: the layers in host memory are moved to the GPU
for every forward, as `device_map="auto"` with `max_memory` does for a
checkpoint. Leave room under the GPU's memory for the KV cache and the
prefill's activations.

Usage: python3 scripts/hf_llama_bench.py [--preset llama-3.1-8b]
           [--prompts 64] [--prompt-len 512] [--gen-len 32]
           [--gpu-weights-gib G]
"""

import argparse
import json
import math
import time

import torch
import transformers

# The published config.json values of the presets tierlm knows
# (crates/engine-llama/src/config.rs), the fields LlamaConfig reads.
# Llama 3.1's fields shared by its sizes.
LLAMA_31 = dict(
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_theta=500000.0, head_dim=128, tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
PRESETS = {
    "llama-3.1-8b": dict(LLAMA_31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32),
    "llama-3.1-70b": dict(LLAMA_31, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64),
}


def offloaded(config, gpu_gib):
    """The model placed by accelerate over the GPU (`gpu_gib` GiB of
    weights) and host memory, random weights materialised in place."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import set_module_tensor_to_device

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    device_map = infer_auto_device_map(
        model, max_memory={0: f"{gpu_gib}GiB", "cpu": "1000GiB"},
        no_split_module_classes=["LlamaDecoderLayer"], dtype=torch.bfloat16)

    def placed(name):
        best = None
        for k in device_map:
            if (k == "" or name == k or name.startswith(k + ".")) and (best is None or len(k) > len(best)):
                best = k
        d = device_map[best]
        return f"cuda:{d}" if isinstance(d, int) else d

    # Host-placed matrices are copied from one random bank per scale (CPU
    # random generation of ~85 GB would take minutes; a copy does not).
    banks = {}
    host_numel = max((p.numel() for n, p in model.named_parameters() if placed(n) == "cpu"), default=0)
    for name, p in list(model.named_parameters()):
        dev = placed(name)
        v = torch.empty(p.shape, dtype=torch.bfloat16, device=dev)
        if v.dim() == 2:
            bound = 1.0 / math.sqrt(p.shape[1])
            if dev == "cpu":
                if bound not in banks:
                    banks[bound] = torch.empty(host_numel, dtype=torch.bfloat16).uniform_(-bound, bound)
                v.view(-1).copy_(banks[bound][: v.numel()])
            else:
                v.uniform_(-bound, bound)
        else:
            v.fill_(1.0)
        set_module_tensor_to_device(model, name, dev, value=v)
    banks.clear()
    # The rotary embedding's frequencies are a buffer computed at init:
    # made again, for real, on the GPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config, device="cuda:0")
    on_cpu = sum(p.numel() * 2 for n, p in model.named_parameters() if placed(n) == "cpu")
    model = dispatch_model(model, device_map=device_map, main_device=0)
    return model, on_cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--gpu-weights-gib", type=float, default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**PRESETS[args.preset])
    t = time.perf_counter()
    host_weight_bytes = 0
    if args.gpu_weights_gib is None:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    else:
        model, host_weight_bytes = offloaded(config, args.gpu_weights_gib)
    model.eval()
    load_s = time.perf_counter() - t
    ids = torch.randint(0, config.vocab_size, (args.prompts, args.prompt_len), device="cuda")
    mask = torch.ones_like(ids)

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape[1] == args.prompt_len + n
        return time.perf_counter() - t

    run(2)
    prefill = run(1)
    total = run(args.gen_len)
    decode = total - prefill
    n = args.prompts
    print(json.dumps({
        "engine": "transformers " + transformers.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "preset": args.preset, "dtype": "bf16",
        "prompts": n, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
        "load_s": load_s, "prefill_s": prefill, "decode_s": decode, "total_s": total,
        "prefill_tokens_per_s": n * args.prompt_len / prefill,
        "decode_tokens_per_s": n * (args.gen_len - 1) / decode,
        "total_tokens_per_s": n * args.gen_len / total,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
        "host_weight_bytes": host_weight_bytes,
        "placement": "all on the GPU" if args.gpu_weights_gib is None else
                     f"accelerate dispatch_model, max_memory GPU {args.gpu_weights_gib} GiB, the rest in host memory",
    }))


if __name__ == "__main__":
    main()
