"""Helpers for the structured-output tests: the fixture tokenizer as a ChatTokenizer (optionally with Qwen2.5's
<tool_call> tags), a random walk through a grammar (choosing at random among the ids its mask allows) and a
small JSON-schema validator for the subset the tests generate."""

from __future__ import annotations

import math
from typing import Any, List, Tuple

import numpy as np

from tokenizer_fixture import load_tokenizer, special_ids, tokenizer_config

VOCAB = 512  # the fixture model's embedding rows (the tokenizer uses ~405 of them)


def fixture_tokenizer(tool_tags: bool = False) -> Any:
    """The byte-level fixture tokenizer; `tool_tags` adds <tool_call> and </tool_call> as non-special added tokens,
    as Qwen2.5's tokenizer has them."""
    from tokenizers import AddedToken

    from qwen_native.chat import ChatTokenizer

    tok = load_tokenizer()
    if tool_tags:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<tool_call>", "</tool_call>")])
    return ChatTokenizer(tok, tokenizer_config())


def eos_ids() -> List[int]:
    sp = special_ids()
    return [sp["<|im_end|>"], sp["<|endoftext|>"]]


def allowed_ids(mask: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab])


def walk(constraint: Any, tok: Any, rng: np.random.Generator, max_steps: int = 300,
         bias: float = 40.0) -> Tuple[List[int], bool]:
    """Consume random allowed ids until the grammar allows only EOS (or an allowed EOS is drawn); returns the ids
    and whether it ended. Ids whose text holds a closing character are `bias` times as likely, so strings and
    containers end."""
    eos = set(constraint.eos_token_ids)
    weights = 1.0 + (bias - 1.0) * closing_ids(tok, constraint.vocab_size)
    ids: List[int] = []
    for _ in range(max_steps):
        allowed = allowed_ids(constraint.fill_mask(), constraint.vocab_size)
        assert allowed.size, "the mask allows nothing"
        if constraint.is_stopped:
            assert set(allowed.tolist()) <= eos, "a complete grammar must allow only EOS"
            return ids, True
        w = weights[allowed]
        t = int(rng.choice(allowed, p=w / w.sum()))
        if t in eos:
            assert constraint.is_accepting
            return ids, True
        constraint.consume(t)
        ids.append(t)
    return ids, False


_CLOSING: dict = {}


def closing_ids(tok: Any, vocab: int) -> np.ndarray:
    """1.0 for the ids whose text holds one of '"}]>' (EOS and the tool tags too), else 0.0."""
    key = (id(tok), vocab)
    if key not in _CLOSING:
        w = np.zeros(vocab)
        for i in range(vocab):
            text = tok.decode([i], skip_special_tokens=False) if tok.id_to_token(i) is not None else ""
            w[i] = any(c in text for c in '"}]>')
        _CLOSING[key] = w
    return _CLOSING[key]


def valid(value: Any, schema: dict) -> bool:
    """`value` fits `schema` (types, enum, const, bounds, lengths, properties, required, additionalProperties,
    items, $ref to #/$defs)."""
    return _valid(value, schema, schema)


def _valid(v: Any, s: dict, root: dict) -> bool:
    if "$ref" in s:
        name = s["$ref"].split("/")[-1]
        return _valid(v, root["$defs"][name], root)
    if "enum" in s and not any(_same(v, e) for e in s["enum"]):
        return False
    if "const" in s and not _same(v, s["const"]):
        return False
    t = s.get("type")
    if t == "object":
        if not isinstance(v, dict) or not set(s.get("required", [])) <= set(v):
            return False
        props = s.get("properties", {})
        if s.get("additionalProperties") is False and not set(v) <= set(props):
            return False
        return all(_valid(x, props[k], root) for k, x in v.items() if k in props)
    if t == "array":
        return (isinstance(v, list) and s.get("minItems", 0) <= len(v) <= s.get("maxItems", math.inf)
                and all(_valid(x, s.get("items", {}), root) for x in v))
    if t == "string":
        return isinstance(v, str) and s.get("minLength", 0) <= len(v) <= s.get("maxLength", math.inf)
    if t in ("integer", "number"):
        ok = isinstance(v, int) if t == "integer" else isinstance(v, (int, float))
        return (ok and not isinstance(v, bool) and s.get("minimum", -math.inf) <= v <= s.get("maximum", math.inf))
    if t == "boolean":
        return isinstance(v, bool)
    if t == "null":
        return v is None
    return t is None


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b
