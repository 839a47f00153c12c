"""A real byte-level BPE tokenizer for tests, built with the `tokenizers` library the way Qwen2's is laid out
(NFC normalizer, Qwen2's split regex + ByteLevel pre-tokenizer, ByteLevel decoder), trained on a small mixed
corpus (English, code, CJK, emoji, accents), with the special tokens ``<|endoftext|>``, ``<|im_start|>`` and
``<|im_end|>`` appended after the trained vocabulary as in Qwen2; plus a tokenizer_config.json carrying Qwen2.5's
real ChatML chat template."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Dict, Optional

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen2's pre-tokenizer split pattern (from its tokenizer.json).
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                       r"\s*[\r\n]+|\s+(?!\S)|\s+")

_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog. How are you today? I am fine, thank you.",
    "Once upon a time there was a little model that wanted to write poems about the sea and the stars.",
    "The answer is 42. Numbers like 1, 2, 3, 10, 100 and 2024 appear in text; so do dates: 2024-05-17.",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "for i in range(10):\n    print(i)\nif x == None or y != 0:\n    raise ValueError('bad value')\n",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n# a comment about the code\n",
    "你好，世界！今天天气很好。我们一起去公园散步吧。中文文本也需要被正确地切分和解码。",
    "日本語のテキストも少し入れておきます。こんにちは、元気ですか？",
    "Emoji time: 😀 🎉 👍🏽 🚀 ❤️ 👨‍👩‍👧 and flags 🇫🇷 🇯🇵 in the middle of a sentence.",
    "Accents: café, naïve, résumé, über, São Paulo, Ångström, jalapeño, façade, coöperate.",
    "Combining: e\u0301 a\u0308 o\u0302 n\u0303 (decomposed letters) next to é ä ô ñ (precomposed).",
    "Punctuation: \"quotes\", 'single', (parens), [brackets], {braces}, <angles>, a/b, a\\b, #, $, %, &.",
    "system user assistant You are a helpful assistant. Please answer the question briefly and clearly.",
]


def corpus() -> list:
    return [line for line in _CORPUS for _ in range(8)]


@lru_cache(maxsize=8)
def tokenizer_json(trained_vocab: int = 400) -> str:
    """tokenizer.json text: `trained_vocab` (at most) learned tokens, then the three special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=trained_vocab, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok.to_str()


def load_tokenizer(trained_vocab: int = 400):
    """The fixture tokenizer as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json(trained_vocab))


def special_ids(trained_vocab: int = 400) -> Dict[str, int]:
    tok = load_tokenizer(trained_vocab)
    return {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}


def tokenizer_config(chat_template: Optional[str] = None) -> dict:
    """A Qwen2.5-style tokenizer_config.json (chat_template None: the real Qwen2.5 template)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE if chat_template is None else chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(directory: str, vocab_size: int = 512, chat_template=None) -> Dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json into `directory` for a model with `vocab_size` embedding
    rows (the tokenizer uses at most vocab_size of them, like Qwen2's padded vocabulary). `chat_template`: None =
    Qwen2.5's template, a string = that template, False = no chat_template key at all. Returns the special ids."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError("the byte-level fixture tokenizer needs vocab_size >= 259")
    trained = min(400, vocab_size - len(SPECIAL_TOKENS))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tokenizer_json(trained))
    cfg = tokenizer_config(chat_template if isinstance(chat_template, str) else None)
    if chat_template is False:
        del cfg["chat_template"]
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    ids = special_ids(trained)
    assert max(ids.values()) < vocab_size
    return ids


# Qwen2.5-Instruct's chat template, exactly as in its tokenizer_config.json.
QWEN25_CHAT_TEMPLATE = (
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    '    {%- else %}\n'
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    '    {%- endif %}\n'
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    '    {%- else %}\n'
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- for message in messages %}\n'
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    '        {%- if message.content %}\n'
    "            {{- '\\n' + message.content }}\n"
    '        {%- endif %}\n'
    '        {%- for tool_call in message.tool_calls %}\n'
    '            {%- if tool_call.function is defined %}\n'
    '                {%- set tool_call = tool_call.function %}\n'
    '            {%- endif %}\n'
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    '            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n"
    '        {%- endfor %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {{- message.content }}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '{%- endif %}\n'
)
