"""Tool calls (tools.py): checking tools / tool_choice, the prompt with tools and a tool-call history (our sandbox
against plain jinja2 as transformers renders it), the grammar that forces calls (random walks on the fixture
tokenizer with Qwen2.5's <tool_call> tags; the real tokenization of calls on the real tokenizer when
QWEN_NATIVE_TEST_MODEL is set), parse_tool_calls, and ToolCallStream against an independent parser over random
splits."""

from __future__ import annotations

import json
import os
import re
from typing import Any, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grammar_walk import VOCAB, allowed_ids, eos_ids, fixture_tokenizer, valid, walk
from tokenizer_fixture import QWEN25_CHAT_TEMPLATE
from qwen_native.tools import (ToolCallStream, check_tool_choice, check_tools, parse_tool_calls,
                               tool_call_grammar)

MODEL = os.environ.get("QWEN_NATIVE_TEST_MODEL")


def props(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city (°C or °F) — \"quoted\" % # <tags>",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -99, "maximum": 99}, "b": {"$ref": "#/$defs/Small"}},
        "required": ["a", "b"], "additionalProperties": False,
        "$defs": {"Small": {"type": "integer", "minimum": 0, "maximum": 9}}}}}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters: arguments {}
TOOLS = [WEATHER, ADD, NOW]


# ---------------------------------------------------------------------------------------------------------------
# Checking tools and tool_choice


def test_check_tools_returns_plain_copies():
    out = check_tools(TOOLS)
    assert out == TOOLS and out[0] is not WEATHER and out[0]["function"]["parameters"] is not \
        WEATHER["function"]["parameters"]
    assert check_tools(None) == [] and check_tools([]) == []
    assert check_tools([{"type": "function", "function": {"name": "f", "description": None}}]) == \
        [{"type": "function", "function": {"name": "f"}}]


@pytest.mark.parametrize("tools, error, match", [
    ("get_weather", TypeError, r"^tools must be a list"),
    ([WEATHER, "add"], TypeError, r"^tools\[1\] must be a dict"),
    ([{"type": "retrieval", "function": {"name": "f"}}], ValueError, r"^tools\[0\]\['type'\] must be 'function'"),
    ([{"type": "function"}], TypeError, r"^tools\[0\]\['function'\] must be a dict"),
    ([{"type": "function", "function": {"name": "f"}, "extra": 1}], ValueError,
     r"^tools\[0\] has an unknown key 'extra'"),
    ([{"type": "function", "function": {"name": "f", "parameter": {}}}], ValueError,
     r"^tools\[0\]\['function'\] has an unknown key 'parameter'"),
    ([{"type": "function", "function": {}}], ValueError, r"^tools\[0\]\['function'\]\['name'\] must be a name"),
    ([{"type": "function", "function": {"name": "get weather"}}], ValueError, r"\['name'\] must be a name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], ValueError, r"\['name'\] must be a name"),
    ([NOW, ADD, NOW], ValueError, r"^tools\[2\]\['function'\]\['name'\] 'now' is also the name of tools\[0\]"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], TypeError, r"\['description'\]"),
    ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], TypeError, r"\['strict'\]"),
    ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], TypeError,
     r"^tools\[0\]\['function'\]\['parameters'\] must be a JSON schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], ValueError,
     r"\['parameters'\] must describe a JSON object"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"enum": {1, 2}}}}], TypeError,
     r"^tools\[0\]\['function'\] must hold only JSON values"),
])
def test_bad_tools(tools, error, match):
    with pytest.raises(error, match=match):
        check_tools(tools)


def test_check_tool_choice():
    assert check_tool_choice(None, TOOLS) == "auto" and check_tool_choice(None, None) == "none"
    for mode in ("auto", "none", "required"):
        assert check_tool_choice(mode, TOOLS) == mode
    assert check_tool_choice("none", []) == "none" and check_tool_choice("auto", None) == "auto"
    named = {"type": "function", "function": {"name": "add"}}
    assert check_tool_choice(named, TOOLS) == named


@pytest.mark.parametrize("choice, tools, error, match", [
    ("any", TOOLS, ValueError, r"^tool_choice must be 'auto', 'none', 'required'"),
    ("required", None, ValueError, r"^tool_choice 'required' needs tools"),
    (3, TOOLS, TypeError, r"^tool_choice must be a string or a dict"),
    ({"type": "tool", "function": {"name": "add"}}, TOOLS, ValueError, r"^tool_choice\['type'\]"),
    ({"type": "function"}, TOOLS, TypeError, r"^tool_choice\['function'\] must be a dict"),
    ({"type": "function", "function": {"name": "sub"}}, TOOLS, ValueError,
     r"^tool_choice\['function'\]\['name'\] 'sub' is not among the tools' names \('get_weather', 'add', 'now'\)"),
    ({"type": "function", "function": {"name": "add"}}, [], ValueError, r"no tools were given"),
    ({"type": "function", "function": {"name": "add", "x": 1}}, TOOLS, ValueError, r"unknown key 'x'"),
    ("auto", [{"type": "function"}], TypeError, r"^tools\[0\]"),
])
def test_bad_tool_choice(choice, tools, error, match):
    with pytest.raises(error, match=match):
        check_tool_choice(choice, tools)


def test_parallel_tool_calls_must_be_bool():
    with pytest.raises(TypeError, match="parallel_tool_calls must be true or false"):
        tool_call_grammar(TOOLS, "required", 1)


# ---------------------------------------------------------------------------------------------------------------
# The prompt: tools and a tool-call history


def _reference_render(messages: List[dict], tools: List[dict]) -> str:
    """Plain jinja2 the way transformers renders a chat template (no sandbox; tojson keeps non-ASCII)."""
    import jinja2
    import jinja2.ext

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return env.from_string(QWEN25_CHAT_TEMPLATE).render(messages=messages, tools=tools, add_generation_prompt=True)


HISTORY_OPENAI = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and 2+3? 你好"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "c"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 °C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "5"},
    {"role": "assistant", "content": "18 °C and sunny; 2+3 = 5."},
    {"role": "user", "content": "Thanks. And now?"},
]


def _history_with_objects() -> List[dict]:
    """HISTORY_OPENAI as transformers users write it: arguments as objects, no None content."""
    out = []
    for m in HISTORY_OPENAI:
        m = {k: v for k, v in m.items() if v is not None}
        if "tool_calls" in m:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def test_prompt_with_tools_and_history_matches_plain_jinja():
    tok = fixture_tokenizer()
    tools = check_tools(TOOLS)
    text = tok.apply_chat_template(HISTORY_OPENAI, tools=tools)
    assert text == _reference_render(_history_with_objects(), tools)
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n" in text
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>') in text
    assert "<|im_start|>user\n<tool_response>\n18 °C, sunny\n</tool_response>\n<tool_response>\n5\n" in text
    assert tok.prompt_ids(HISTORY_OPENAI, tools=tools) == tok.encode(text)
    # no tools: the plain system prompt
    assert "<tools>" not in tok.apply_chat_template(HISTORY_OPENAI) and \
        tok.prompt_ids(HISTORY_OPENAI, tools=[]) == tok.prompt_ids(HISTORY_OPENAI)
    with pytest.raises(ValueError, match="tools= needs the chat template"):
        tok.prompt_ids("hi", chat_template=False, tools=tools)


def test_history_arguments_that_are_not_a_json_object_stay_strings():
    tok = fixture_tokenizer()
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "not json"}},
        {"type": "function", "function": {"name": "g", "arguments": "[1]"}}]}]
    text = tok.apply_chat_template(msgs, tools=check_tools([NOW]))
    assert '{"name": "f", "arguments": "not json"}' in text and '{"name": "g", "arguments": "[1]"}' in text
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == "not json"  # the caller's messages are untouched


# ---------------------------------------------------------------------------------------------------------------
# The grammar that forces calls


@pytest.fixture(scope="module")
def tagged():
    """The fixture tokenizer with Qwen2.5's <tool_call> tags as added tokens, and its compiler."""
    pytest.importorskip("llguidance")
    from qwen_native.grammar import GrammarCompiler

    tok = fixture_tokenizer(tool_tags=True)
    return tok, GrammarCompiler(tok, VOCAB, eos_ids())


def _schemas() -> dict:
    return {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}


def test_no_grammar_for_auto_and_none():
    assert tool_call_grammar(TOOLS, "auto") is None and tool_call_grammar(TOOLS, "none") is None
    assert tool_call_grammar(TOOLS, None) is None and tool_call_grammar(None, None) is None


@props(30)
@given(seed=st.integers(0, 2 ** 32 - 1), parallel=st.booleans(),
       choice=st.sampled_from(["required", "get_weather", "add", "now"]), bias=st.sampled_from([4.0, 40.0]))
def test_random_walks_through_forced_calls(tagged, seed, parallel, choice, bias):
    tok, compiler = tagged
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    c = compiler.compile(tool_call_grammar(TOOLS, tool_choice, parallel), argument="tools")
    ids, ended = walk(c, tok, np.random.default_rng(seed), bias=bias)
    text = tok.decode(ids)
    assert ended, text
    assert tok.token_to_id("<tool_call>") in ids  # the tag is the added token, as the model writes it
    content, calls = parse_tool_calls(text)
    assert content is None and calls and (parallel or len(calls) == 1), text
    for call in calls:
        assert choice == "required" or call["function"]["name"] == choice
        assert valid(json.loads(call["function"]["arguments"]), _schemas()[call["function"]["name"]]), text
    assert text.count("<tool_call>\n{") == len(calls) and text.endswith("}\n</tool_call>")


def test_forced_call_accepts_the_tokenization_of_a_call(tagged):
    tok, compiler = tagged
    one = '<tool_call>\n{"name": "add", "arguments": {"a": -12, "b": 7}}\n</tool_call>'
    two = one + '\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    eos = eos_ids()[0]
    for parallel, text, accepted in [(True, two, len(tok.encode(two))), (False, one, len(tok.encode(one))),
                                     (False, two, len(tok.encode(one)))]:
        c = compiler.compile(tool_call_grammar(TOOLS, "required", parallel))
        ids = tok.encode(text)
        assert c.valid_prefix(ids + [eos]) == accepted + (accepted == len(ids))
    # a named tool refuses the others
    c = compiler.compile(tool_call_grammar(TOOLS, {"type": "function", "function": {"name": "now"}}))
    assert c.valid_prefix(tok.encode(one)) < len(tok.encode(one))
    # bad arguments are refused: b above its maximum
    c = compiler.compile(tool_call_grammar(TOOLS, "required"))
    bad = tok.encode(one.replace('"b": 7', '"b": 70'))
    assert c.valid_prefix(bad) < len(bad)


def test_tags_as_text_for_tokenizers_without_them():
    pytest.importorskip("llguidance")
    from qwen_native.grammar import GrammarCompiler

    tok = fixture_tokenizer()  # no <tool_call> token
    compiler = GrammarCompiler(tok, VOCAB, eos_ids())
    with pytest.raises(ValueError, match=r'(?s)^tools: the grammar cannot be compiled: .*unknown special token: '
                                         r'"<tool_call>"'):
        compiler.compile(tool_call_grammar(TOOLS, "required"), argument="tools")
    c = compiler.compile(tool_call_grammar(TOOLS, "required", tag_tokens=False), argument="tools")
    ids, ended = walk(c, tok, np.random.default_rng(0))
    content, calls = parse_tool_calls(tok.decode(ids))
    assert ended and content is None and calls


# ---------------------------------------------------------------------------------------------------------------
# Reading calls back


def _call(name: str, args: Any, raw: Optional[str] = None) -> str:
    body = raw if raw is not None else json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def test_parse_no_calls():
    assert parse_tool_calls("Hello there.") == ("Hello there.", [])
    assert parse_tool_calls("  \n ") == (None, [])
    assert parse_tool_calls("") == (None, [])
    assert parse_tool_calls("a </tool_call> b") == ("a </tool_call> b", [])


def test_parse_one_and_two_calls():
    content, calls = parse_tool_calls(_call("get_weather", {"city": "Paris", "unit": "c"}))
    assert content is None and len(calls) == 1
    call = calls[0]
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"]) and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}
    text = "Let me check.\n" + _call("get_weather", {"city": "東京"}) + "\n" + _call("now", {}) + "\n"
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "東京"}, {}]
    assert calls[0]["id"] != calls[1]["id"]
    # arguments left out: {}
    assert parse_tool_calls(_call("", None, raw='{"name": "now"}'))[1][0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize("body", ['{"name": "f", "arguments": {"a": 1}', "not json", '{"arguments": {}}',
                                  '{"name": "", "arguments": {}}', '{"name": 3, "arguments": {}}',
                                  '{"name": "f", "arguments": "{}"}', '{"name": "f", "arguments": {"x": NaN}}',
                                  '["f", {}]'])
def test_malformed_blocks_stay_text(body):
    good = _call("add", {"a": 1, "b": 2})
    text = "Before " + _call("", None, raw=body) + " after\n" + good
    content, calls = parse_tool_calls(text)
    assert content == "Before " + _call("", None, raw=body) + " after"
    assert [c["function"]["name"] for c in calls] == ["add"]


def test_unclosed_last_block_is_text():
    cut = '<tool_call>\n{"name": "add", "arguments": {"a": 1'
    assert parse_tool_calls(cut) == (cut, [])
    content, calls = parse_tool_calls(_call("now", {}) + "\n" + cut)
    assert content == cut and len(calls) == 1


# Streaming against an independent parser, over random texts and random splits.


def _reference_parse(text: str) -> Tuple[Optional[str], List[Tuple[str, Any]]]:
    """Content and (name, arguments) by regular expression: a block runs from <tool_call> to the first
    </tool_call> after it; it is a call when its body is a JSON object with a non-empty string name and an
    object (or no) arguments."""
    content, calls, pos = [], [], 0
    for m in re.finditer(r"<tool_call>(.*?)</tool_call>", text, re.S):
        try:
            obj = json.loads(m.group(1), parse_constant=lambda c: 1 / 0)
        except (ValueError, ZeroDivisionError):
            obj = None
        ok = (isinstance(obj, dict) and isinstance(obj.get("name"), str) and obj["name"]
              and isinstance(obj.get("arguments", {}), dict))
        if ok:
            content.append(text[pos:m.start()])
            calls.append((obj["name"], obj.get("arguments", {})))
            pos = m.end()
    content.append(text[pos:])
    joined = "".join(content).strip()
    return joined or None, calls


_ARGS = st.dictionaries(st.sampled_from(["a", "city", "x y", "ü"]),
                        st.integers(-5, 5) | st.text("ab <>/\n\"\\{}", max_size=6) | st.booleans(), max_size=3)
_SEGMENT = st.one_of(
    st.text("ab <>/_tolc\n", max_size=12),  # text full of tag fragments
    st.sampled_from(["<tool_call", "<tool_", "</tool_call>", "<", "<tool_call>x</tool_call>", " \n "]),
    st.builds(lambda n, a: _call(n, a), st.sampled_from(["add", "get_weather", "x-y_z"]), _ARGS),
    st.builds(lambda n, a: f'<tool_call>{{"name":"{n}","arguments":{json.dumps(a)}}}</tool_call>',
              st.sampled_from(["f", "g"]), _ARGS),  # compact, no newlines
    st.sampled_from(['<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',  # malformed
                     "<tool_call>\nnot json\n</tool_call>", '<tool_call>{"arguments": {}}</tool_call>']),
)
TEXTS = st.lists(_SEGMENT, max_size=6).map("".join) | st.builds(
    lambda t, tail: t + tail, st.lists(_SEGMENT, max_size=3).map("".join),
    st.sampled_from(['<tool_call>\n{"name": "add", "argu', "<tool_call>", "<tool_c"]))  # cut by max_tokens


def _split(text: str, cuts: List[int]) -> List[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0] + points, points + [len(text)])]


@props(60)
@given(text=TEXTS, cuts=st.lists(st.integers(0, 10 ** 6), max_size=12))
def test_stream_adds_up_to_parse(text, cuts):
    stream = ToolCallStream()
    deltas = []
    for piece in _split(text, cuts):
        deltas += stream.push(piece)
    deltas += stream.finish()
    assert stream.finish() == []
    content = "".join(d for kind, d in deltas if kind == "content")
    calls: List[dict] = []
    for kind, d in deltas:
        if kind == "content":
            assert isinstance(d, str) and d
            continue
        assert kind == "tool_call"
        if "id" in d:  # a call's first delta: index, id, type and name, empty arguments
            assert d["index"] == len(calls) and d["type"] == "function" and d["function"]["arguments"] == ""
            assert re.fullmatch(r"call_[0-9a-f]{24}", d["id"])
            calls.append({"name": d["function"]["name"], "arguments": ""})
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
            assert d["index"] == len(calls) - 1
            calls[-1]["arguments"] += d["function"]["arguments"]
    expected_content, expected_calls = _reference_parse(text)
    assert (content or None) == expected_content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == expected_calls
    whole_content, whole_calls = parse_tool_calls(text)
    assert whole_content == expected_content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole_calls] == expected_calls


def test_stream_holds_back_a_possible_tag_only():
    s = ToolCallStream()
    assert s.push("Hello <tool") == [("content", "Hello")]  # the space waits for what follows
    assert s.push("box> done") == [("content", " <toolbox> done")]
    assert s.push("\n<tool_call>\n{\"name\": \"now\", ") == []
    deltas = s.push('"arguments": {}}\n</tool_call>')
    assert [k for k, _ in deltas] == ["tool_call", "tool_call"]
    assert deltas[0][1]["function"] == {"name": "now", "arguments": ""} and deltas[1][1] == {
        "index": 0, "function": {"arguments": "{}"}}
    assert s.finish() == []
    with pytest.raises(RuntimeError, match="after finish"):
        s.push("x")


# ---------------------------------------------------------------------------------------------------------------
# The real tokenizer


@pytest.fixture(scope="module")
def real():
    if not MODEL:
        pytest.skip("set QWEN_NATIVE_TEST_MODEL to a Qwen2.5 model directory")
    pytest.importorskip("llguidance")
    from qwen_native.chat import ChatTokenizer
    from qwen_native.grammar import GrammarCompiler

    tok = ChatTokenizer.from_files(os.path.join(MODEL, "tokenizer.json"),
                                   os.path.join(MODEL, "tokenizer_config.json"))
    with open(os.path.join(MODEL, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    return tok, GrammarCompiler(tok, vocab, [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")])


def test_real_tokenizer_accepts_calls_as_the_model_writes_them(real):
    tok, compiler = real
    assert tok.token_to_id("<tool_call>") is not None and tok.token_to_id("</tool_call>") is not None
    # the text a model writes: as the template renders history calls
    text = tok.apply_chat_template(
        [{"role": "user", "content": "x"}, HISTORY_OPENAI[2]], add_generation_prompt=False, tools=TOOLS)
    body = text.split("<|im_start|>assistant\n")[1].removesuffix("<|im_end|>\n")
    ids = tok.encode(body)
    assert ids[0] == tok.token_to_id("<tool_call>") and ids[-1] == tok.token_to_id("</tool_call>")
    assert tok.decode(ids) == body  # the tags survive decoding (they are not "special" to tokenizers)
    eos = tok.token_to_id("<|im_end|>")
    c = compiler.compile(tool_call_grammar(TOOLS, "required"), argument="tools")
    assert c.valid_prefix(ids + [eos]) == len(ids) + 1
    for t in ids:
        c.consume(t)
    assert set(allowed_ids(c.fill_mask(), compiler.vocab_size).tolist()) == set(compiler.eos_token_ids) | {
        tok.encode("\n")[0]}  # another call, or the end
    c = compiler.compile(tool_call_grammar(TOOLS, "required", parallel_tool_calls=False), argument="tools")
    first = tok.encode(body.split("\n<tool_call>")[0])
    assert c.valid_prefix(first + [eos]) == len(first) + 1
    content, calls = parse_tool_calls(body)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "add"]
