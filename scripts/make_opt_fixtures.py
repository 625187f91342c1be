#!/usr/bin/env python3
"""Build tiny random OPT checkpoints and Hugging Face transformers' outputs on
them, the reference the Rust CPU engine (crates/engine-opt) is tested against.

    python3 scripts/make_opt_fixtures.py --out fixtures/opt

Needs torch, transformers, safetensors, tokenizers and numpy. Everything is
seeded: the same library versions give the same files. See
fixtures/opt/README.md for what each fixture covers.

The models are built with transformers' own OPTConfig / OPTForCausalLM, their
weights randomised (biases and layer norms too, so those paths matter) and
rounded to values exactly representable in f16 (and bf16 for the bf16
fixture), so that the Rust engine, which holds f16 weights, sees the very
weights the fp32 reference ran with; the only difference left is the order
of f32 accumulation.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import ByteLevelBPETokenizer
from transformers import OPTConfig, OPTForCausalLM

SEED = 1234
VOCAB = 512
MAX_POS = 128
NEW_TOKENS = 20
MIN_NEW_TOKENS = 16
WEIGHT_STD = 0.1  # large enough that greedy continuations vary
MIN_TOP2_GAP = 1e-4  # greedy picks closer than this could flip with accumulation order
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in OPT
BOS, PAD, EOS = 2, 1, 2

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Hello again, dear world.",
    "Language models predict the next token from the tokens before it.",
    "Weights, caches and activations move between the GPU, host memory and disk.",
    "Paris is the capital city of France; Berlin is the capital of Germany.",
    "A café in Zürich serves naïve crème brûlée — très bien!",
    "Numbers like 12345 and 3.14159 appear in text, as do dates like 2026-11-22.",
    "def forward(self, x):\n    return self.fc2(relu(self.fc1(x)))\n",
    "Once upon a time, in a land far away, there lived a small tokenizer.",
    "OPT models were released in sizes from 125 million to 175 billion parameters.",
] * 4

PROMPTS = [
    "Hello",
    "The capital city of France is",
    "Once upon a time, in a café far away,",
    "Weights move between",
]

# name -> (config overrides, stored dtype, tokenizer kind, sharded twin)
FIXTURES = {
    # Pre-layer-norm like every OPT but 350m; f32 on disk; tokenizer.json.
    # Trained briefly on TRAIN_TEXT, so that it continues those sentences:
    # readable output for the README's example, and peaked distributions.
    "tiny-opt": dict(
        config=dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=256),
        dtype=torch.float32,
        tokenizer="json",
        train_steps=300,
    ),
    # Another shape, f16 on disk, sharded with an index; the same weights are
    # also saved single-file as tiny-opt-sharded-single. No tokenizer: it is
    # driven with input_ids.
    "tiny-opt-sharded": dict(
        config=dict(hidden_size=96, num_attention_heads=6, num_hidden_layers=3, ffn_dim=192),
        dtype=torch.float16,
        tokenizer=None,
        sharded=True,
    ),
    # opt-350m's layout: post-layer-norm, no final layer norm,
    # word_embed_proj_dim != hidden (project_in / project_out); bf16 on disk;
    # tensor names without the "model." prefix plus an explicit (tied)
    # lm_head.weight; vocab.json + merges.txt.
    "tiny-opt-350m-style": dict(
        config=dict(
            hidden_size=64,
            num_attention_heads=2,
            num_hidden_layers=2,
            ffn_dim=128,
            do_layer_norm_before=False,
            word_embed_proj_dim=32,
        ),
        dtype=torch.bfloat16,
        tokenizer="vocab-merges",
        strip_prefix=True,
    ),
}


def train_tokenizer():
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(
        TRAIN_TEXT, vocab_size=VOCAB, min_frequency=1, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() <= VOCAB
    return tok


def encode(tok, text):
    """OPT's tokenizer: </s> in front of the byte-level BPE ids."""
    return [BOS] + tok.encode(text, add_special_tokens=False).ids


def randomize_(model, gen, storage_dtype):
    """Random weights everywhere (biases and layer norms included), rounded
    to values the storage type (and f16) holds exactly."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif "layer_norm" in name:
                v = 0.05 * torch.randn(p.shape, generator=gen)
            elif name.endswith("bias"):
                v = 0.02 * torch.randn(p.shape, generator=gen)
            else:
                v = WEIGHT_STD * torch.randn(p.shape, generator=gen)
            if storage_dtype == torch.bfloat16:
                v = v.to(torch.bfloat16)
            v = v.to(torch.float16).to(torch.float32)
            p.copy_(v)


def train_(model, tok, steps):
    """A few hundred AdamW steps on TRAIN_TEXT (one thread, seeded)."""
    # Each sentence followed by the next (no </s>), so the model learns to
    # go on rather than to stop: the fixtures need 16 tokens and more.
    texts = list(dict.fromkeys(TRAIN_TEXT))
    seqs = [encode(tok, a + " " + b) for a, b in zip(texts, texts[1:] + texts[:1])]
    n = max(len(s) for s in seqs)
    assert n <= MAX_POS
    ids = torch.tensor([s + [PAD] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


def round_(model, storage_dtype):
    """Round every weight to a value the storage type (and f16) holds exactly."""
    with torch.no_grad():
        for p in model.parameters():
            v = p.detach()
            if storage_dtype == torch.bfloat16:
                v = v.to(torch.bfloat16)
            p.copy_(v.to(torch.float16).to(torch.float32))


def left_pad(seqs):
    n = max(len(s) for s in seqs)
    ids = [[PAD] * (n - len(s)) + s for s in seqs]
    mask = [[0] * (n - len(s)) + [1] * len(s) for s in seqs]
    return torch.tensor(ids), torch.tensor(mask)


def run_case(model, name, seqs):
    ids, mask = left_pad(seqs)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1, :].float()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=PAD,
            eos_token_id=EOS,
            bos_token_id=BOS,
            return_dict_in_generate=True,
            output_scores=True,
        )
    # How close the greedy choice came to a tie, over every step that counts.
    sequences = out.sequences[:, ids.shape[1] :].tolist()
    gap = float("inf")
    for step, scores in enumerate(out.scores):
        top2 = torch.topk(scores.float(), 2, dim=-1).values
        for b, row in enumerate(sequences):
            if EOS not in row[:step]:
                gap = min(gap, float(top2[b, 0] - top2[b, 1]))
    if gap < MIN_TOP2_GAP:
        sys.exit(f"{name}: a greedy step was a near tie (gap {gap:.2e}); change SEED")
    new_tokens = []
    for row in sequences:
        if EOS in row:  # keep the EOS, drop the padding after it
            row = row[: row.index(EOS) + 1]
        new_tokens.append(row)
    for i, row in enumerate(new_tokens):
        if len(row) < MIN_NEW_TOKENS:
            sys.exit(f"{name}: sequence {i} ended after {len(row)} tokens; change SEED")
    return {
        "name": name,
        "input_ids": seqs,
        "last_logits": logits.tolist(),
        "greedy_new_tokens": new_tokens,
        "max_new_tokens": NEW_TOKENS,
        "min_top2_gap": gap,
    }


def save_checkpoint(model, out_dir, spec, max_shard_size=None):
    os.makedirs(out_dir, exist_ok=True)
    stored = model.to(spec["dtype"])
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {"max_shard_size": "1GB"}
    stored.save_pretrained(out_dir, **kwargs)
    model.to(torch.float32)
    if spec.get("strip_prefix"):
        path = os.path.join(out_dir, "model.safetensors")
        tensors = load_file(path)
        renamed = {k.removeprefix("model."): v.contiguous() for k, v in tensors.items()}
        renamed["lm_head.weight"] = renamed["decoder.embed_tokens.weight"].clone()
        save_file(renamed, path, metadata={"format": "pt"})
    # Not needed by tierlm, and it changes between transformers versions.
    gen_cfg = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="fixtures/opt", help="output directory (default: fixtures/opt)")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(1)  # fixed reduction order

    tok = train_tokenizer()
    os.makedirs(args.out, exist_ok=True)
    for i, (name, spec) in enumerate(FIXTURES.items()):
        config = OPTConfig(
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POS,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            **spec["config"],
        )
        model = OPTForCausalLM._from_config(config, attn_implementation="eager", torch_dtype=torch.float32)
        model.eval()
        gen = torch.Generator().manual_seed(SEED + i)
        randomize_(model, gen, spec["dtype"])
        if spec.get("train_steps"):
            loss = train_(model, tok, spec["train_steps"])
            round_(model, spec["dtype"])
            print(f"{name}: trained {spec['train_steps']} steps, final loss {loss:.3f}")

        out_dir = os.path.join(args.out, name)
        shutil.rmtree(out_dir, ignore_errors=True)
        if spec.get("sharded"):
            save_checkpoint(model, out_dir, spec, max_shard_size="200KB")
            twin = out_dir + "-single"
            shutil.rmtree(twin, ignore_errors=True)
            save_checkpoint(model, twin, spec)
            assert os.path.exists(os.path.join(out_dir, "model.safetensors.index.json")), "not sharded"
        else:
            save_checkpoint(model, out_dir, spec)

        if spec["tokenizer"] == "json":
            tok.save(os.path.join(out_dir, "tokenizer.json"))
        elif spec["tokenizer"] == "vocab-merges":
            tok.save_model(out_dir)

        cases = []
        if spec["tokenizer"]:
            batch = [encode(tok, p) for p in PROMPTS]
            cases.append(run_case(model, "text-batch", batch))
            cases[-1]["prompts"] = PROMPTS
            cases.append(run_case(model, "text-single", [batch[1]]))
            cases[-1]["prompts"] = [PROMPTS[1]]
        rng = np.random.default_rng(SEED + i)
        ids_batch = [[BOS] + rng.integers(4, VOCAB, size=n).tolist() for n in (5, 17, 1, 30)]
        cases.append(run_case(model, "ids-batch", ids_batch))

        expected = {
            "model": name,
            "made_by": "scripts/make_opt_fixtures.py",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cases": cases,
        }
        with open(os.path.join(out_dir, "expected.json"), "w") as f:
            json.dump(expected, f)
            f.write("\n")
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, {len(cases)} cases")
        if spec["tokenizer"]:
            print("    ", repr(PROMPTS[0] + tok.decode(cases[0]["greedy_new_tokens"][0])))
        for c in cases:
            print("   ", c["name"], f"gap {c['min_top2_gap']:.3g}", c["greedy_new_tokens"][0][:10])


if __name__ == "__main__":
    main()
