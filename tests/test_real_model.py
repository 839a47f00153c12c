"""A real checkpoint, when QWEN_NATIVE_TEST_MODEL names one (a local directory or a cached Hub repo id), e.g.

    QWEN_NATIVE_TEST_MODEL=/path/to/qwen2.5-coder-0.5b-instruct python -m pytest -s tests/test_real_model.py

Skipped otherwise. Prints what the model wrote (-s shows it)."""

from __future__ import annotations

import os
import unicodedata

import pytest

import qwen_native

MODEL = os.environ.get("QWEN_NATIVE_TEST_MODEL")
pytestmark = pytest.mark.skipif(not MODEL, reason="set QWEN_NATIVE_TEST_MODEL to a Qwen2.5 Instruct checkpoint")


@pytest.fixture(scope="module")
def model():
    m = qwen_native.load(MODEL)
    yield m
    m.close()


def show(title, r):
    print(f"\n--- {title} ---\n{r.text}\n--- {len(r.token_ids)} tokens, {r.finish_reason}; prefill "
          f"{r.prefill_tok_s:.1f} tok/s, decode {r.decode_tok_s:.1f} tok/s, ttft {r.ttft_s:.2f} s ---")


def test_generation_config_defaults(model):
    g = model.generation_config
    assert 151645 in model.eos_token_ids and 151643 in model.eos_token_ids
    assert g.do_sample and 0 < g.temperature < 1.5


def test_chat_prompt_gives_coherent_text(model):
    r = model.generate("What is the capital of France? Answer with one word.", max_new_tokens=16,
                       do_sample=False)
    show("capital of France", r)
    assert "paris" in r.text.lower()
    assert r.finish_reason == "stop" and r.token_ids[-1] in model.eos_token_ids


def test_code_prompt_streams(model):
    s = model.generate("Write a Python function `add(a, b)` that returns the sum. Only the code.",
                       max_new_tokens=60, do_sample=False, stream=True)
    pieces = list(s)
    r = s.result
    show("add(a, b)", r)
    assert "".join(pieces) == r.text
    assert "def add" in r.text and "return" in r.text


def test_sampling_with_the_model_defaults(model):
    a = model.generate("Name three colors.", max_new_tokens=24, seed=1)
    b = model.generate("Name three colors.", max_new_tokens=24, seed=1)
    show("three colors (sampled, seed 1)", a)
    assert a.token_ids == b.token_ids and a.text.strip()


def test_chinese_and_emoji_stream_cleanly(model):
    s = model.generate("用中文打个招呼，并加一个表情符号。", max_new_tokens=30, do_sample=False, stream=True)
    pieces = list(s)
    show("Chinese greeting", s.result)
    text = "".join(pieces)
    assert "\ufffd" not in text
    assert any(unicodedata.name(c, "").startswith("CJK") for c in text)


def test_multi_turn_reuses_the_cache(model):
    conv = [{"role": "user", "content": "My name is Ada."}]
    r1 = model.generate(conv, max_new_tokens=24, do_sample=False)
    conv += [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "What is my name?"}]
    r2 = model.generate(conv, max_new_tokens=16, do_sample=False)
    show("multi-turn", r2)
    assert r2.cached_tokens >= r1.prompt_tokens - 1
    assert "ada" in r2.text.lower()
    # the same tokens from an empty cache
    model.core.reset()  # every slot empty (the scheduler notices at its next request)
    fresh = model.generate(conv, max_new_tokens=16, do_sample=False)
    assert fresh.cached_tokens < r1.prompt_tokens and fresh.token_ids == r2.token_ids


def test_named_tool_call_and_schema_answer(model):
    """Qwen2.5's own tool format: a named tool's call parses, its arguments fit the schema; a schema-constrained
    answer parses and validates."""
    import json

    pytest.importorskip("llguidance")
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}}
    r = model.generate([{"role": "user", "content": "What's the weather in Paris, in celsius?"}], tools=[weather],
                       tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_new_tokens=60,
                       do_sample=False, parallel_tool_calls=False)
    show("named tool call", r)
    print(r.tool_calls)
    assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1 and r.text == ""
    args = json.loads(r.tool_calls[0]["function"]["arguments"])
    assert r.tool_calls[0]["function"]["name"] == "get_weather" and args["unit"] == "celsius"
    assert "paris" in args["city"].lower()
    schema = {"type": "object", "properties": {"capital": {"type": "string"}, "population_millions": {
        "type": "number", "minimum": 0}}, "required": ["capital", "population_millions"], "additionalProperties": False}
    r = model.generate("Give the capital of France and its population as JSON.", max_new_tokens=60, do_sample=False,
                       response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    show("schema answer", r)
    value = json.loads(r.text)
    assert set(value) == {"capital", "population_millions"} and "paris" in value["capital"].lower()


def test_int4_batch_gives_each_prompt_its_tokens_alone():
    """int4 end to end: five prompts through one batch (their decode steps share passes, on the kernels for several
    inputs) get, token for token, the greedy replies each gets alone (the one-row kernels), and those read well."""
    m = qwen_native.load(MODEL, dtype="int4", max_batch=8, max_context=512)
    try:
        prompts = ["What is the capital of France? Answer with one word.", "Count from 1 to 5.",
                   "Write a Python function `add(a, b)` that returns the sum. Only the code.",
                   "Name a primary color.", "What is 12 times 12?"]
        together = m.generate_batch(prompts, max_new_tokens=24, do_sample=False)
        for p, r in zip(prompts, together):
            alone = m.generate(p, max_new_tokens=24, do_sample=False)
            assert r.token_ids == alone.token_ids, p
        show("int4, capital of France (in a batch of 5)", together[0])
        assert "paris" in together[0].text.lower()
        assert "def add" in together[2].text and "144" in together[4].text
    finally:
        m.close()
