#!/usr/bin/env python3
"""Tiny random Llama-family checkpoints and Hugging Face's answers for them.

Run where PyTorch and transformers are installed (the GPU machine has both;
CPU is enough):

    python3 scripts/make_llama_fixtures.py fixtures/llama

For each case it builds a model of that `model_type` with Hugging Face's own
classes from a config.json written the way published checkpoints write it
(`rope_scaling`, `rope_theta`, `torch_dtype`), gives every weight (norms,
biases and Qwen3's q/k norms included) random values, stores it in the
case's dtype as safetensors, and then reloads the directory with
`from_pretrained` in float32 (the stored values, computed in float32) to
record, for a few prompts: the last position's logits of the first step,
16 greedy tokens for each prompt alone, and 16 greedy tokens for all
prompts in one left-padded batch (positions counted from each sequence's
first real token). It also records the greedy tokens and first-step logits
of the model computing in its own dtype on the GPU where there is one (the
run the GPU engine is compared with: how far transformers' own 16-bit run
lies from its float32 one sets the tolerance). expected.json in each
directory holds them; transformers' and torch's versions are recorded
beside.

    python3 scripts/make_llama_fixtures.py --add-native fixtures/llama

only adds the native run's logits (`native_last_logits`, `native_device`)
to existing fixtures, leaving their checkpoints and float32 answers as
they are.
"""

import copy
import json
import os
import shutil
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 512
NEW_TOKENS = 16


def base(model_type, **kw):
    c = {
        "architectures": [],
        "model_type": model_type,
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.1,
    }
    c.update(kw)
    return c


CASES = {
    # Llama 3.1's layout: grouped-query attention, llama3 rope scaling, bf16.
    "tiny-llama3-gqa-bf16": (
        base(
            "llama",
            architectures=["LlamaForCausalLM"],
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            attention_bias=False,
            mlp_bias=False,
            eos_token_id=[2, 3],
        ),
        torch.bfloat16,
    ),
    # Multi-query attention, tied embeddings, linear rope scaling, f16.
    "tiny-llama-mqa-tied-f16": (
        base(
            "llama",
            architectures=["LlamaForCausalLM"],
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            attention_bias=False,
            mlp_bias=False,
        ),
        torch.float16,
    ),
    # Mistral with a sliding window longer than any prompt here.
    "tiny-mistral-bf16": (
        base("mistral", architectures=["MistralForCausalLM"], sliding_window=128, head_dim=16),
        torch.bfloat16,
    ),
    # Qwen2: q/k/v biases, tied embeddings, eps 1e-6.
    "tiny-qwen2-bias-bf16": (
        base(
            "qwen2",
            architectures=["Qwen2ForCausalLM"],
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=2,
        ),
        torch.bfloat16,
    ),
    # Qwen3: per-head q/k RMSNorm, head_dim set apart from hidden/heads.
    "tiny-qwen3-qknorm-bf16": (
        base(
            "qwen3",
            architectures=["Qwen3ForCausalLM"],
            head_dim=32,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=2,
        ),
        torch.bfloat16,
    ),
}

PROMPTS = [[1, 17, 300, 42, 99, 7, 250], [1, 5, 480], [1, 11, 12, 13, 14, 15, 16, 200, 201, 202, 203]]


def load(make, *args, dtype):
    """`make(*args, dtype=...)`: transformers 5 names the argument `dtype`,
    older versions `torch_dtype`."""
    try:
        return make(*args, dtype=dtype)
    except TypeError:
        return make(*args, torch_dtype=dtype)


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                if "norm" in name:
                    # Norm weights around 1, each different.
                    p.copy_(1.0 + 0.5 * (torch.rand(p.shape, generator=g) - 0.5))
                else:
                    p.copy_(0.2 * (torch.rand(p.shape, generator=g) - 0.5))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def greedy(model, prompts, device):
    """Greedy tokens for prompts in one left-padded batch."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, longest:].tolist()


def native_logits(d, dtype, prompts, device):
    """Each prompt's first-step last-position logits with the model
    computing in its stored dtype."""
    native = load(AutoModelForCausalLM.from_pretrained, d, dtype=dtype).to(device).eval()
    with torch.no_grad():
        return [
            [round(v, 6) for v in native(torch.tensor([p], device=device)).logits[0, -1].float().cpu().tolist()]
            for p in prompts
        ]


def add_native(root, device):
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "expected.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            expected = json.load(f)
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[expected["dtype"]]
        got = native_logits(os.path.join(root, name), dtype, [c["input_ids"] for c in expected["cases"]], device)
        worst = 0.0
        for case, logits in zip(expected["cases"], got):
            case["native_last_logits"] = logits
            worst = max(worst, max(abs(a - b) for a, b in zip(logits, case["last_logits"])))
        expected["native_device"] = device
        with open(path, "w") as f:
            json.dump(expected, f, indent=1)
        print(f"{name}: transformers' {expected['dtype']} logits within {worst:.3e} of its float32 ones ({device})")


def main():
    args = sys.argv[1:]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args[:1] == ["--add-native"]:
        add_native(args[1] if len(args) > 1 else "fixtures/llama", device)
        return
    root = args[0] if args else "fixtures/llama"
    os.makedirs(root, exist_ok=True)
    for k, (name, (cfg, dtype)) in enumerate(CASES.items()):
        d = os.path.join(root, name)
        shutil.rmtree(d, ignore_errors=True)
        torch.manual_seed(k)
        # transformers may rewrite the dicts it is given (rope parameters):
        # it gets a copy, and config.json keeps the published form.
        config = AutoConfig.for_model(**copy.deepcopy(cfg))
        model = load(AutoModelForCausalLM.from_config, config, dtype=torch.float32)
        randomize(model, 1000 + k)
        model = model.to(dtype)
        model.save_pretrained(d, safe_serialization=True)
        # config.json as published checkpoints write it.
        published = dict(cfg)
        published["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(published, f, indent=2, sort_keys=True)
        eos = cfg["eos_token_id"]
        with open(os.path.join(d, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": eos, "do_sample": False}, f, indent=2)

        # The stored values, computed in float32.
        ref = load(AutoModelForCausalLM.from_pretrained, d, dtype=torch.float32).to(device).eval()
        native = load(AutoModelForCausalLM.from_pretrained, d, dtype=dtype).to(device).eval()
        for m in (ref, native):
            m.generation_config.eos_token_id = None
        cases = []
        with torch.no_grad():
            for i, p in enumerate(PROMPTS):
                logits = ref(torch.tensor([p], device=device)).logits[0, -1].float().cpu()
                cases.append(
                    {
                        "name": f"prompt{i}",
                        "input_ids": p,
                        "last_logits": [round(v, 6) for v in logits.tolist()],
                        "greedy_f32": greedy(ref, [p], device)[0],
                        "greedy_native": greedy(native, [p], device)[0],
                        "native_last_logits": native_logits(d, dtype, [p], device)[0],
                    }
                )
            batch = {"input_ids": PROMPTS, "greedy_f32": greedy(ref, PROMPTS, device)}
        expected = {
            "model_type": cfg["model_type"],
            "dtype": published["torch_dtype"],
            "new_tokens": NEW_TOKENS,
            "cases": cases,
            "batch": batch,
            "native_device": device,
            "made_with": {"transformers": transformers.__version__, "torch": torch.__version__, "device": device},
        }
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump(expected, f, indent=1)
        size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
        print(f"{name}: {size / 1024:.0f} KiB, {sorted(os.listdir(d))}")


if __name__ == "__main__":
    main()
