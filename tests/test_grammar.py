"""Structured output (grammar.py on llguidance): response_format → grammar, the compiler's checks, and Constraint
driven by random walks over its masks (the text must parse and fit the schema), EOS once complete, proposals,
rollback, and the logits mask against a bit-by-bit reference. Real-tokenizer checks run when
QWEN_NATIVE_TEST_MODEL names a Qwen2.5 model directory."""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("llguidance")

from grammar_walk import VOCAB, allowed_ids, eos_ids, fixture_tokenizer, valid, walk  # noqa: E402
from qwen_native.grammar import Constraint, GrammarCompiler, apply_mask, constraint_grammar  # noqa: E402

MODEL = os.environ.get("QWEN_NATIVE_TEST_MODEL")


def props(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None)


@pytest.fixture(scope="module")
def tok():
    return fixture_tokenizer()


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok, VOCAB, eos_ids())


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


# ---------------------------------------------------------------------------------------------------------------
# response_format


def test_response_formats(compiler):
    assert constraint_grammar({"type": "text"}) is None
    for rf in ({"type": "json_object"}, schema_format({"type": "object"}),
               {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "description": "d"}},
               {"type": "regex", "regex": "[a-z]+"}, {"type": "grammar", "grammar": 'start: "a" | "b"'}):
        assert isinstance(compiler.compile(constraint_grammar(rf)), Constraint)


@pytest.mark.parametrize("rf, error, match", [
    ("json", TypeError, r"^response_format must be a dict"),
    ({}, ValueError, r"response_format\['type'\] must be one of"),
    ({"type": "json"}, ValueError, r"response_format\['type'\]"),
    ({"type": "text", "schema": {}}, ValueError, r"response_format has an unknown key 'schema'"),
    ({"type": "json_schema"}, TypeError, r"response_format\['json_schema'\] must be a dict"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, ValueError, r"\['json_schema'\]\['name'\]"),
    ({"type": "json_schema", "json_schema": {"name": "a b"}}, ValueError, r"\['name'\] must be a name"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": []}}, TypeError, r"\['schema'\] must be"),
    ({"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}}, TypeError, r"\['strict'\]"),
    ({"type": "json_schema", "json_schema": {"name": "a", "shema": {}}}, ValueError, r"unknown key 'shema'"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"x": {1, 2}}}}, TypeError,
     r"\['schema'\] must hold only JSON"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"maximum": float("nan")}}}, ValueError,
     r"\['schema'\] must hold only JSON"),
    ({"type": "regex"}, TypeError, r"response_format\['regex'\] must be a string"),
    ({"type": "grammar", "grammar": ""}, ValueError, r"response_format\['grammar'\] is empty"),
    ({"type": "regex", "regex": "a", "grammar": "b"}, ValueError, r"unknown key 'grammar'"),
])
def test_bad_response_formats(rf, error, match):
    with pytest.raises(error, match=match):
        constraint_grammar(rf)


@pytest.mark.parametrize("rf, match", [
    ({"type": "regex", "regex": "a(b"}, "unclosed group"),
    ({"type": "grammar", "grammar": "start: foo"}, "unknown name"),
    (schema_format({"type": "strin"}), "strin"),
    (schema_format({"type": "string", "format": "weird"}), "weird"),
    ({"type": "grammar", "grammar": "start: <tool_call>"}, "unknown special token"),
])
def test_grammars_that_do_not_compile(compiler, rf, match):
    with pytest.raises(ValueError, match=r"(?s)^response_format: the grammar cannot be compiled: .*" + match):
        compiler.compile(constraint_grammar(rf))
    with pytest.raises(ValueError, match=r"^tools: the grammar cannot be compiled"):
        compiler.compile(constraint_grammar(rf), argument="tools")


def test_compiler_arguments(tok):
    with pytest.raises(ValueError, match="vocab_size must be .* at least the tokenizer's"):
        GrammarCompiler(tok, 100, eos_ids())
    with pytest.raises(ValueError, match="vocab_size"):
        GrammarCompiler(tok, "512", eos_ids())
    with pytest.raises(TypeError, match="eos_token_ids must be a non-empty list"):
        GrammarCompiler(tok, VOCAB, [])
    with pytest.raises(ValueError, match="eos_token_ids holds 512"):
        GrammarCompiler(tok, VOCAB, [512])
    with pytest.raises(TypeError, match="tokenizer must be a qwen_native ChatTokenizer"):
        GrammarCompiler(object(), VOCAB, eos_ids())
    with pytest.raises(TypeError, match="grammar must be a string"):
        GrammarCompiler(tok, VOCAB, eos_ids()).compile({"type": "json_object"})


def test_missing_llguidance_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # makes `import llguidance` fail
    with pytest.raises(ImportError, match=r'pip install "qwen-native\[structured\]"'):
        constraint_grammar({"type": "json_object"})
    assert constraint_grammar({"type": "text"}) is None  # plain text needs nothing


# ---------------------------------------------------------------------------------------------------------------
# Random walks: whatever the model picks among the allowed ids, the output fits


_WORDS = ["red", "green", "blue", "hello world", "naïve", "你好"]
_KEYS = ["name", "age", "tags", "x", "nested", "ok"]
_STRING = st.builds(lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
                    st.integers(0, 2), st.integers(0, 5))
_INTEGER = st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
                     st.integers(-1000, 1000), st.integers(0, 5000))
_NUMBER = st.builds(lambda lo, span: {"type": "number", "minimum": lo, "maximum": lo + span},
                    st.integers(-50, 50), st.integers(1, 100))
_LEAF = (_STRING | _INTEGER | _NUMBER | st.just({"type": "boolean"}) | st.just({"type": "null"})
         | st.lists(st.sampled_from(_WORDS), min_size=1, max_size=4, unique=True).map(lambda e: {"enum": e}))


def _object(children: st.SearchStrategy) -> st.SearchStrategy:
    def make(properties: dict, required_mask: list, closed: bool) -> dict:
        s: dict = {"type": "object", "properties": properties,
                   "required": [k for k, r in zip(properties, required_mask) if r]}
        if closed:
            s["additionalProperties"] = False
        return s
    return st.builds(make, st.dictionaries(st.sampled_from(_KEYS), children, min_size=1, max_size=3),
                     st.lists(st.booleans(), min_size=3, max_size=3), st.booleans())


VALUES = st.recursive(_LEAF, lambda c: _object(c) | st.builds(
    lambda items, lo, extra: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + extra},
    c, st.integers(0, 2), st.integers(0, 2)), max_leaves=6)
# Structured output is mostly an object at the top; open ones (extra keys of any JSON) only below it.
SCHEMAS = _object(VALUES).map(lambda s: {**s, "additionalProperties": False}) | VALUES


@props(50)
@given(schema=SCHEMAS, seed=st.integers(0, 2 ** 32 - 1), bias=st.sampled_from([2.0, 8.0, 40.0]))
def test_random_walks_fit_the_schema(compiler, tok, schema, seed, bias):
    constraint = compiler.compile(constraint_grammar(schema_format(schema)))
    ids, ended = walk(constraint, tok, np.random.default_rng(seed), bias=bias)
    text = tok.decode(ids)
    if not ended:  # only free keys (and their values) can run past the walk's 300 ids
        assert _has_open_object(schema), f"no end after {len(ids)} ids: {text!r}"
        return
    value = json.loads(text)
    assert valid(value, schema), (text, schema)
    assert "\n" not in text  # compact


def _has_open_object(schema: dict) -> bool:
    if schema.get("type") == "object" and schema.get("additionalProperties") is not False:
        return True
    return any(_has_open_object(c) for c in [*schema.get("properties", {}).values(), schema.get("items", {})])


@props(15)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_random_walks_any_json_object(compiler, tok, seed):
    ids, ended = walk(compiler.compile(constraint_grammar({"type": "json_object"})), tok, np.random.default_rng(seed))
    if ended:  # an open object may nest for longer than the walk
        assert isinstance(json.loads(tok.decode(ids)), dict)


@props(20)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_random_walks_regex_and_lark(compiler, tok, seed):
    rng = np.random.default_rng(seed)
    regex = r"(ab|[xyz]{2,4})-[0-9]{1,3}( ok)?"
    ids, ended = walk(compiler.compile(constraint_grammar({"type": "regex", "regex": regex})), tok, rng)
    assert ended and re.fullmatch(regex, tok.decode(ids)), tok.decode(ids)
    lark = 'start: greeting " " NAME "!"\ngreeting: "hello" | "hi"\nNAME: /[a-z]{1,8}/\n'
    ids, ended = walk(compiler.compile(constraint_grammar({"type": "grammar", "grammar": lark})), tok, rng)
    assert ended and re.fullmatch(r"(hello|hi) [a-z]{1,8}!", tok.decode(ids)), tok.decode(ids)


# ---------------------------------------------------------------------------------------------------------------
# Constraint: consume, EOS, proposals, rollback


def test_complete_grammar_allows_only_eos(compiler, tok):
    c = compiler.compile(constraint_grammar(schema_format(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
         "additionalProperties": False})))
    ids = tok.encode('{"a": 12}')
    assert not c.is_stopped and not c.is_accepting
    assert c.valid_prefix(ids + [eos_ids()[0]]) == len(ids) + 1  # EOS may end it right after
    for t in ids:
        c.consume(t)
    assert c.is_stopped and c.is_accepting
    assert allowed_ids(c.fill_mask(), VOCAB).tolist() == sorted(eos_ids())
    assert c.valid_prefix([eos_ids()[1], 5]) == 1 and c.valid_prefix([5]) == 0
    c.consume(eos_ids()[0])  # accepted (llguidance records no step for it)
    c.rollback(2)  # the EOS and the last id
    assert not c.is_stopped
    c.consume(ids[-1])
    assert c.is_stopped


def test_consume_refusal_changes_nothing(compiler, tok):
    c = compiler.compile(constraint_grammar({"type": "regex", "regex": "abc"}))
    before = c.fill_mask().copy()
    x = tok.encode("x")[0]
    with pytest.raises(ValueError, match=rf"^token_id: the grammar does not allow id {x} "):
        c.consume(x)
    assert np.array_equal(c.fill_mask(), before)
    padding, special = VOCAB - 1, tok.token_to_id("<|im_start|>")  # ids with no text at all
    for t in (padding, special):
        with pytest.raises(ValueError, match="does not allow"):
            c.consume(t)
    with pytest.raises(ValueError, match=f"token_id must be an id below vocab_size {VOCAB}"):
        c.consume(VOCAB)
    assert c.valid_prefix([padding]) == c.valid_prefix([-1]) == c.valid_prefix([VOCAB]) == 0
    assert np.array_equal(c.fill_mask(), before)
    for t in tok.encode("abc"):
        c.consume(t)
    assert c.is_stopped


def test_valid_prefix_and_rollback(compiler, tok):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["name", "n"], "additionalProperties": False}
    c = compiler.compile(constraint_grammar(schema_format(schema)))
    good = tok.encode('{"name": "hello world", "n": 42}')
    bad = tok.encode('{"name": "hello world", "m": 42}')
    first_bad = next(i for i, (a, b) in enumerate(zip(good, bad)) if a != b)
    start = c.fill_mask().copy()
    assert c.valid_prefix(good) == len(good)
    assert c.valid_prefix(bad) == first_bad
    assert c.valid_prefix([]) == 0
    assert np.array_equal(c.fill_mask(), start)  # checking proposals consumed nothing
    for t in good[:5]:
        c.consume(t)
    assert c.valid_prefix(good[5:]) == len(good) - 5
    c.rollback(5)
    assert np.array_equal(c.fill_mask(), start)
    c.rollback(0)
    with pytest.raises(ValueError, match="n: cannot roll back 1 ids"):
        c.rollback(1)
    with pytest.raises(ValueError, match="n must be"):
        c.rollback(-1)


def test_mask_buffer_is_owned_and_reused(compiler):
    c = compiler.compile(constraint_grammar({"type": "json_object"}))
    m = c.fill_mask()
    assert m.dtype == np.int32 and m.shape == ((VOCAB + 31) // 32,) and c.fill_mask() is m


# ---------------------------------------------------------------------------------------------------------------
# Applying a mask to logits


def _reference_apply(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = logits.copy()
    for i in range(len(out)):
        if not (int(mask[i // 32]) >> (i % 32)) & 1:
            out[i] = -np.inf
    return out


@pytest.mark.parametrize("vocab", [1, 31, 32, 37, 512, 1000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_mask_matches_reference(vocab, dtype):
    rng = np.random.default_rng(vocab)
    n = (vocab + 31) // 32
    for mask in (rng.integers(-2 ** 31, 2 ** 31, n).astype(np.int32), np.zeros(n, np.int32),
                 np.full(n, -1, np.int32), np.where(rng.random(n) < 0.5, 0, -1).astype(np.int32)):
        logits = rng.standard_normal(vocab).astype(dtype) * 10
        logits[0] = -np.inf
        expected = _reference_apply(logits, mask)
        apply_mask(logits, mask)
        assert np.array_equal(logits, expected)


def test_apply_checks_shapes(compiler):
    c = compiler.compile(constraint_grammar({"type": "regex", "regex": "a"}))
    mask = c.fill_mask()
    logits = np.zeros(VOCAB, np.float32)
    c.apply(logits)
    assert np.isfinite(logits).sum() == mask.view(np.uint8).size * 8 - np.unpackbits(
        np.invert(mask).view(np.uint8)).sum()
    with pytest.raises(ValueError, match=f"logits must be one row of {VOCAB} logits"):
        c.apply(np.zeros(VOCAB + 1, np.float32), mask)
    with pytest.raises(ValueError, match="mask must be the int32 array"):
        c.apply(np.zeros(VOCAB, np.float32), mask.astype(np.int64))


# ---------------------------------------------------------------------------------------------------------------
# The real tokenizer


@pytest.fixture(scope="module")
def real():
    if not MODEL:
        pytest.skip("set QWEN_NATIVE_TEST_MODEL to a Qwen2.5 model directory")
    from qwen_native.chat import ChatTokenizer

    tok = ChatTokenizer.from_files(os.path.join(MODEL, "tokenizer.json"),
                                   os.path.join(MODEL, "tokenizer_config.json"))
    with open(os.path.join(MODEL, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    return tok, GrammarCompiler(tok, vocab, eos)


def test_real_tokenizer_json_schema(real):
    tok, compiler = real
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}}},
        "required": ["name", "age", "tags", "address"], "additionalProperties": False}
    value = {"name": "Ada Lovelace", "age": 36, "tags": ["mathematician", "writer"],
             "address": {"city": "London", "zip": "SW1Y 4JH"}}
    ids = tok.encode(json.dumps(value, ensure_ascii=False))  # the form a Qwen model writes
    c = compiler.compile(constraint_grammar(schema_format(schema)))
    assert c.valid_prefix(ids) == len(ids)
    logits = np.zeros(compiler.vocab_size, np.float32)
    for t in ids:
        row = logits.copy()
        c.apply(row, c.fill_mask())
        assert np.isfinite(row[t])
        c.consume(t)
    assert c.is_stopped
    assert set(allowed_ids(c.fill_mask(), compiler.vocab_size).tolist()) == set(compiler.eos_token_ids)
