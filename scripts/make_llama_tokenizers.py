#!/usr/bin/env python3
"""Tiny tokenizers for the Llama-family fixtures, and Hugging Face's answers.

Needs the `tokenizers` and `transformers` packages (no PyTorch):

    python3 -m venv /tmp/tokvenv && /tmp/tokvenv/bin/pip install tokenizers transformers
    /tmp/tokvenv/bin/python scripts/make_llama_tokenizers.py fixtures/llama

For three of the checkpoints made by make_llama_fixtures.py it trains a
byte-level BPE of exactly the checkpoints' vocabulary size (512) on a
fixed text, with the special tokens of that family first (so their ids are
the config's bos/eos ids), and writes `tokenizer.json` and
`tokenizer_config.json` (or `chat_template.jinja`) in the published style:

- tiny-llama3-gqa-bf16: Llama 3's special tokens, a post-processor that
  puts `<|begin_of_text|>` in front, and a Llama-3.1-style chat template
  (a default system message with the dates, `raise_exception`, `strip`);
- tiny-qwen2-bias-bf16: Qwen's ChatML tokens, no beginning-of-sequence
  token, and a Qwen2.5-style template (a default system message, tools
  written with `tojson`);
- tiny-mistral-bf16: `<s>`/`</s>` as AddedToken objects, `add_bos_token:
  true` and a post-processor that puts `<s>` in front, as Mistral's files
  have them, and an `[INST]` template (which writes `<s>` itself) in
  `chat_template.jinja`;
- tiny-qwen3-qknorm-bf16: Qwen's tokenizer again, with no chat template.

Then it loads each directory with transformers' `AutoTokenizer` and
records in `tokenizer_expected.json`, for a few texts: `tokenizer(text)
.input_ids`, the text `apply_chat_template` renders for the text as one
user message with `add_generation_prompt=True`, and the ids it tokenizes
that to. The versions it ran with are recorded beside. (transformers 5
takes the special tokens `tokenizer(text)` adds from tokenizer.json's
post-processor alone: it drops `add_bos_token` / `add_eos_token` when there
is a tokenizer.json.)
"""

import json
import os
import sys

import tokenizers
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

VOCAB = 512

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "Language models predict the next token from the ones before it.",
    "Weights, the cache and activations are spread over GPU, host memory and disk.",
    "Once upon a time there was a tiny model that knew only a few words.",
    "You are a helpful assistant. Answer the question briefly.",
    "What is the capital of France? Paris is the capital of France.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14",
    "Tokens, bytes and merges: a byte-level BPE covers every string.",
]

WORDS = ["model", "token", "memory", "layer", "cache", "weight", "prompt", "answer", "batch", "stream",
         "simple", "quickly", "between", "through", "without", "question", "capital", "France", "world", "hello"]
# Enough text for the merges to fill the vocabulary.
CORPUS += [f"{a} {b}, {c}." for a in WORDS for b in WORDS[::3] for c in WORDS[::7]]

TEXTS = [
    "Hello, world!",
    "The quick brown fox",
    "What is the capital of France?",
    "  spaces and\nnew lines\tand tabs ",
    "ünïcödé ☃ 𝄞",
]

LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    '    {%- set date_string = "26 Jul 2024" %}\n'
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{{- system_message }}\n{{- "<|eot_id|>" }}\n'
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ['user', 'assistant'] %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'].strip() "
    "+ '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

QWEN_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if message.role == "user" or (message.role == "system" and not loop.first) '
    'or message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)


def added(content):
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def train(specials, bos=None):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write(dir, tok, config, jinja=None):
    tok.save(os.path.join(dir, "tokenizer.json"))
    config = dict(config, tokenizer_class="PreTrainedTokenizerFast", model_max_length=256)
    with open(os.path.join(dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    if jinja is not None:
        with open(os.path.join(dir, "chat_template.jinja"), "w") as f:
            f.write(jinja)


def record(dir, chat):
    hf = AutoTokenizer.from_pretrained(dir)
    cases = []
    for text in TEXTS:
        case = {"text": text, "input_ids": hf(text).input_ids}
        if chat:
            messages = [{"role": "user", "content": text}]
            case["chat_text"] = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            case["chat_ids"] = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        cases.append(case)
    out = {
        "made_with": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "cases": cases,
    }
    with open(os.path.join(dir, "tokenizer_expected.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "fixtures/llama"
    llama3 = ["<|reserved_special_token_0|>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
              "<|start_header_id|>", "<|end_header_id|>"]
    d = os.path.join(root, "tiny-llama3-gqa-bf16")
    write(d, train(llama3, bos="<|begin_of_text|>"), {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
        "clean_up_tokenization_spaces": True,
    })
    record(d, chat=True)

    qwen = ["<|reserved|>", "<|endoftext|>", "<|im_end|>", "<|im_start|>"]
    d = os.path.join(root, "tiny-qwen2-bias-bf16")
    write(d, train(qwen), {
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "errors": "replace",
        "chat_template": [{"name": "default", "template": QWEN_TEMPLATE},
                          {"name": "tool_use", "template": QWEN_TEMPLATE}],
        "clean_up_tokenization_spaces": False, "split_special_tokens": False,
    })
    record(d, chat=True)

    d = os.path.join(root, "tiny-qwen3-qknorm-bf16")
    write(d, train(qwen), {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                           "clean_up_tokenization_spaces": False})
    record(d, chat=False)

    d = os.path.join(root, "tiny-mistral-bf16")
    write(d, train(["<unk>", "<s>", "</s>"], bos="<s>"), {
        "add_bos_token": True, "add_eos_token": False, "bos_token": added("<s>"), "eos_token": added("</s>"),
        "unk_token": added("<unk>"), "pad_token": None, "clean_up_tokenization_spaces": False,
    }, jinja=MISTRAL_TEMPLATE)
    record(d, chat=True)


if __name__ == "__main__":
    main()
