"""Structured output and tool calls through generate(): the grammar's mask applied in the scheduler (sampling on,
batched beside other sequences, with speculative proposals), forced tool calls read back into result.tool_calls,
and the errors for what cannot be compiled. The grammar and tool pieces alone: test_grammar.py, test_tools.py."""

from __future__ import annotations

import json

import pytest

import qwen_native

pytest.importorskip("llguidance")

from grammar_walk import valid  # noqa: E402

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                                      "ok": {"type": "boolean"}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -1, "maximum": 1}, "y": {"type": "number"}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"],
     "additionalProperties": False},
]
SAMPLE = dict(do_sample=True, temperature=1.5, top_k=0, top_p=1.0, chat_template=False)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                               "maximum": 12}},
                                       "required": ["zone"], "additionalProperties": False}}}


def _fmt(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def test_property_random_schemas_through_the_model(tiny_model):
    """Many schemas (objects, arrays, enums, bounded numbers, nested and optional fields, closed objects: the
    generator of test_grammar.py), each answered by the tiny random model with sampling on: every finished answer
    parses and validates."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from test_grammar import SCHEMAS as RANDOM_SCHEMAS
    from test_grammar import _has_open_object

    finished = []

    @settings(max_examples=25, deadline=None, derandomize=True, database=None)
    @given(schema=RANDOM_SCHEMAS, seed=st.integers(0, 2 ** 31 - 1))
    def check(schema, seed):
        r = tiny_model.generate("Hello", max_new_tokens=200, seed=seed, response_format=_fmt(schema), **SAMPLE)
        if r.finish_reason == "length":
            assert _has_open_object(schema) or len(r.token_ids) == 200
            return
        assert valid(json.loads(r.text), schema), (r.text, schema)
        finished.append(schema)

    check()
    assert len(finished) >= 10


@pytest.mark.parametrize("schema", SCHEMAS)
def test_constrained_sampling_always_validates(tiny_model, schema):
    done = 0
    for seed in range(6):
        r = tiny_model.generate("Hello", max_new_tokens=120, seed=seed, response_format=_fmt(schema), **SAMPLE)
        if r.finish_reason == "length":  # cut by max_new_tokens: a prefix of a valid answer, nothing to check
            continue
        assert r.finish_reason == "stop" and valid(json.loads(r.text), schema), r.text
        done += 1
    assert done >= 3


def test_masks_per_sequence_in_one_batch_and_with_speculation(tiny_dir):
    """Constrained and free sequences in the same passes each keep their own grammar (or none); a constrained
    greedy answer is the same with prompt lookup."""
    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1, max_batch=4) as m:
        free = m.generate("Hello", max_new_tokens=30, do_sample=False, chat_template=False)
        alone = [m.generate("Hello", max_new_tokens=120, seed=s, response_format=_fmt(SCHEMAS[0]), **SAMPLE)
                 for s in range(3)]
        requests = [m._submit("Hello", qwen_native.GenerationOptions(
            max_new_tokens=120, seed=s, response_format=_fmt(SCHEMAS[0]), **SAMPLE), stream=False) for s in range(3)]
        requests.append(m._submit("Hello", qwen_native.GenerationOptions(
            max_new_tokens=30, do_sample=False, chat_template=False), stream=False))
        outs = [r.wait() for r in requests]
        assert [o.text for o in outs[:3]] == [r.text for r in alone]  # the same seeds, the same answers
        assert outs[3].text == free.text
        greedy = dict(max_new_tokens=80, do_sample=False, chat_template=False, response_format={"type": "json_object"})
        plain = m.generate("Hello", **greedy)
        spec = m.generate("Hello", prompt_lookup_num_tokens=4, **greedy)
        assert spec.token_ids == plain.token_ids and json.loads(plain.text) is not None
        assert m._scheduler.consistent()


def test_regex_and_grammar_formats(tiny_model):
    r = tiny_model.generate("Hello", max_new_tokens=30, seed=1, response_format={"type": "regex",
                                                                                 "regex": r"[0-9]{3}-[a-c]{2}"},
                            **SAMPLE)
    import re

    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", r.text), r.text
    r = tiny_model.generate("Hello", max_new_tokens=30, seed=1, response_format={
        "type": "grammar", "grammar": 'start: ("yes" | "no") "!"'}, **SAMPLE)
    assert r.text in ("yes!", "no!")


@pytest.mark.parametrize("response_format, match", [
    ({"type": "xml"}, r"response_format\['type'\]"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "properties": {
        "x": {"$ref": "#/$defs/missing"}}}}}, "response_format"),
    ({"type": "regex", "regex": "(unclosed"}, "response_format"),
    ({"type": "grammar", "grammar": "start: nothing_defined"}, "response_format"),
])
def test_bad_formats_name_the_argument(tiny_model, response_format, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.generate("Hello", response_format=response_format, chat_template=False)


@pytest.fixture(scope="module")
def tool_dir(tmp_path_factory):
    """The tiny model with <tool_call> and </tool_call> as added tokens of its tokenizer, as Qwen2.5 has them."""
    from conftest import build_model_dir
    from grammar_walk import fixture_tokenizer

    d = build_model_dir(tmp_path_factory.mktemp("tools") / "model", max_position_embeddings=2048)  # tool prompts
    (d / "tokenizer.json").write_text(fixture_tokenizer(tool_tags=True).backend.to_str(), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tool_model(tool_dir):
    with qwen_native.load(tool_dir, dtype="float32", num_threads=1, max_batch=2) as m:
        yield m


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_come_back_as_tool_calls(tool_model, choice):
    tools = [WEATHER, TIME]
    done = 0
    for seed in range(4):
        r = tool_model.generate([{"role": "user", "content": "What time is it in Paris?"}], tools=tools,
                                tool_choice=choice, max_new_tokens=150, seed=seed, do_sample=True, temperature=1.5,
                                parallel_tool_calls=False)
        if r.finish_reason == "length":
            continue
        assert r.finish_reason == "tool_calls" and r.text == "" and len(r.tool_calls) == 1, r
        call = r.tool_calls[0]
        assert call["type"] == "function" and call["id"].startswith("call_")
        fn = call["function"]
        schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        assert fn["name"] in schema and valid(json.loads(fn["arguments"]), schema[fn["name"]])
        if isinstance(choice, dict):
            assert fn["name"] == "get_time"
        done += 1
    assert done >= 2


def test_tools_in_the_prompt_and_history(tool_model):
    """The tools reach the prompt through the template (not with tool_choice="none"); a history with a call and
    its result renders; free answers have no tool_calls."""
    history = [{"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"}]
    tok = tool_model.tokenizer
    with_tools = tok.decode(tok.prompt_ids(history, tools=[WEATHER]), skip_special_tokens=False)
    assert "<tools>" in with_tools and '"name": "get_weather"' in with_tools
    assert '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}' in with_tools
    assert "<tool_response>\n-3 C, snow\n</tool_response>" in with_tools
    r = tool_model.generate(history, tools=[WEATHER], tool_choice="none", max_new_tokens=5, do_sample=False)
    assert r.tool_calls is None and r.prompt_tokens == len(tok.prompt_ids(history))
    r = tool_model.generate(history, tools=[WEATHER], max_new_tokens=5, do_sample=False)
    assert r.prompt_tokens == len(tok.prompt_ids(history, tools=[WEATHER])) and r.finish_reason != "tool_calls"


@pytest.mark.parametrize("kw, error, match", [
    (dict(tools=[{"type": "function", "function": {"name": "a.b"}}]), ValueError, r"tools\[0\]"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), ValueError,
     "tool_choice"),
    (dict(tool_choice="required"), ValueError, "tool_choice"),
    (dict(tools=[WEATHER], parallel_tool_calls="yes"), TypeError, "parallel_tool_calls"),
])
def test_bad_tool_arguments(tiny_model, kw, error, match):
    with pytest.raises(error, match=match):
        tiny_model.generate("Hello", **kw)


def test_server_structured_output_and_tool_calls(tool_dir):
    """Through the official client against a real server: a json_schema answer, forced tool calls (read back as
    message.tool_calls), their streamed deltas joined (name first, then arguments) equal to the non-streamed call,
    and a schema that cannot be compiled is a 400 naming response_format."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from test_server import start, stop

    p, url = start(tool_dir, "--max-batch", "2")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Weather in Oslo?"}]
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=120, temperature=1.5, seed=3,
                                           response_format=_fmt(SCHEMAS[0]))
        if r.choices[0].finish_reason == "stop":
            assert valid(json.loads(r.choices[0].message.content), SCHEMAS[0])
        kw = dict(model=model, messages=messages, max_tokens=150, temperature=1.5, tools=[WEATHER, TIME],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False)
        for seed in range(3):
            r = client.chat.completions.create(seed=seed, **kw)
            c = r.choices[0]
            if c.finish_reason == "length":
                continue
            assert c.finish_reason == "tool_calls" and c.message.content is None
            call = c.message.tool_calls[0]
            assert call.function.name == "get_weather"
            assert valid(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
            name, args, ids, finish = None, "", set(), None
            for chunk in client.chat.completions.create(seed=seed, stream=True, **kw):
                d = chunk.choices[0].delta
                for tc in d.tool_calls or []:
                    if tc.function.name:
                        assert name is None and args == ""  # the name comes first
                        name, ids = tc.function.name, ids | {tc.id}
                    args += tc.function.arguments or ""
                finish = chunk.choices[0].finish_reason or finish
            assert (name, json.loads(args), finish) == (call.function.name, json.loads(call.function.arguments),
                                                        "tool_calls")
            break
        else:
            pytest.fail("every forced call was cut by max_tokens")
        bad = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "properties": {
            "x": {"$ref": "#/$defs/missing"}}}}}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=messages, response_format=bad)
        assert e.value.status_code == 400 and e.value.body["param"] == "response_format"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], tool_choice="sometimes")
        assert e.value.body["param"] == "tool_choice"
    finally:
        stop(p)
