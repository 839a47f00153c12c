"""Tokenizer fixture round trips, chat template rendering (as transformers renders it) and the template sandbox."""

from __future__ import annotations

import json
import unicodedata

import pytest

from tokenizer_fixture import QWEN25_CHAT_TEMPLATE, load_tokenizer, special_ids, tokenizer_config
from qwen_native.chat import ChatTokenizer, normalize_messages, render_template
from qwen_native.errors import TemplateError

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 你好 😀?"},
]

EXPECTED_CHATML = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4.<|im_end|>\n"
    "<|im_start|>user\nAnd 你好 😀?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer(load_tokenizer(), tokenizer_config())


def test_chatml_for_system_user_assistant_user(tok):
    assert tok.apply_chat_template(CONVERSATION) == EXPECTED_CHATML


def test_default_system_prompt_and_no_generation_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")


def test_prompt_ids(tok):
    ids = tok.prompt_ids("And 你好 😀?", system="You are terse.")
    assert ids == tok.encode(tok.apply_chat_template(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "And 你好 😀?"}]))
    sp = special_ids()
    assert ids[0] == sp["<|im_start|>"] and ids.count(sp["<|im_end|>"]) == 2
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\nYou are terse.")
    # plain text: no template at all
    assert tok.prompt_ids("abc", chat_template=False) == tok.encode("abc")
    with pytest.raises(ValueError, match="empty"):
        tok.prompt_ids("", chat_template=False)
    with pytest.raises(TypeError, match="chat_template=False"):
        tok.prompt_ids([{"role": "user", "content": "x"}], chat_template=False)
    with pytest.raises(ValueError, match="system"):
        tok.prompt_ids("x", system="s", chat_template=False)
    with pytest.raises(TypeError, match="chat_template"):
        tok.prompt_ids("x", chat_template="yes")  # type: ignore[arg-type]


def test_tools_and_tojson_keep_unicode(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "x"}],
                                   tools=[{"name": "météo", "description": "天气"}])
    assert '{"name": "météo", "description": "天气"}' in text


@pytest.mark.parametrize("text", [
    "Hello world! The quick brown fox.",
    "def add(a, b):\n    return a + b\n",
    "你好，世界！今天天气很好。",
    "Emoji: 😀 🎉 👍🏽 👨‍👩‍👧 🇫🇷",
    "Combining: e\u0301 a\u0308 and precomposed é ä",
    "   leading and trailing spaces   \n\n\ttabs",
    "unseen: Ω≈ç√∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃",
])
def test_tokenizer_round_trips(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)  # Qwen2's normalizer is NFC


def test_special_tokens(tok):
    sp = special_ids()
    assert tok.encode("<|im_start|>user<|im_end|><|endoftext|>")[0] == sp["<|im_start|>"]
    ids = tok.encode("a<|im_end|>b")
    assert sp["<|im_end|>"] in ids
    assert tok.decode(ids) == "ab" and tok.decode(ids, skip_special_tokens=False) == "a<|im_end|>b"
    assert tok.special_ids == frozenset(sp.values())
    assert tok.eos_token_id == sp["<|im_end|>"]
    assert tok.vocab_size == 403


def test_special_tokens_are_template_variables(tok):
    # bos_token is null in Qwen's tokenizer_config.json: left undefined, as transformers does
    src = "{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}"
    assert render_template(src, [{"role": "user", "content": "x"}],
                           special_tokens=tok.special_tokens) == "<|im_end|>|<|endoftext|>|False"


def test_jinja_options_like_transformers():
    # trim_blocks + lstrip_blocks: block tags leave no stray whitespace
    src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert render_template(src, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "[a]\n[b]\n"
    # loopcontrols
    src = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    assert render_template(src, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a"
    # add_generation_prompt is passed; namespace and dict work
    src = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
           "{{ ns.n }}{{ dict(a=1)['a'] }}{{ add_generation_prompt }}")
    assert render_template(src, [{"role": "user", "content": "a"}]) == "11True"
    assert render_template("{{ strftime_now('%Y') | length }}", [{"role": "user", "content": "a"}]) == "4"


def test_none_valued_keys_are_dropped():
    src = "{% for m in messages %}{{ 'tool_calls' in m }}{% endfor %}"
    assert render_template(src, [{"role": "assistant", "content": "x", "tool_calls": None}]) == "False"


def test_raise_exception():
    with pytest.raises(TemplateError, match="roles must alternate"):
        render_template("{{ raise_exception('roles must alternate') }}", [{"role": "user", "content": "a"}])


def test_syntax_error():
    with pytest.raises(TemplateError, match="syntax error at line 2"):
        render_template("ok\n{% if %}", [{"role": "user", "content": "a"}])
    with pytest.raises(TemplateError, match="syntax error"):
        render_template("{% for m in messages %}", [{"role": "user", "content": "a"}])


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ joiner.__init__.__globals__['os'].system('touch {marker}') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ (1).__class__ }}",
    "{{ ''.format.__globals__ }}",
    "{% set ns = namespace(__class__=1) %}",
    "{{ (messages[0].content * 100000000) | length }}",
    "{{ 10 ** 100000 }}",
    "{{ messages.append(1) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
])
def test_sandbox_stops_attacks(attack, tmp_path):
    marker = tmp_path / "pwned"
    src = attack.replace("{marker}", str(marker))
    with pytest.raises(TemplateError):
        render_template(src, [{"role": "user", "content": "abcdefgh"}])
    assert not marker.exists()


def test_messages_are_plain_data():
    class Sneaky(str):
        def evil(self):  # pragma: no cover - must never be reachable
            raise AssertionError("called")

    msgs = normalize_messages([{"role": "user", "content": Sneaky("hi")}])
    assert type(msgs[0]["content"]) is str
    with pytest.raises(TypeError, match="content"):
        normalize_messages([{"role": "user", "content": object()}])
    with pytest.raises(TypeError):
        normalize_messages([{"role": "user", "content": "x", "extra": object()}])


@pytest.mark.parametrize("bad, exc", [
    ("not a list", TypeError),
    (b"bytes", TypeError),
    ([], ValueError),
    (["just a string"], TypeError),
    ([{"content": "no role"}], ValueError),
    ([{"role": "", "content": "x"}], ValueError),
    ([{"role": 1, "content": "x"}], ValueError),
    ([{"role": "user"}], ValueError),
    ([{"role": "user", "content": 5}], TypeError),
])
def test_bad_messages(bad, exc):
    with pytest.raises(exc):
        normalize_messages(bad)


def test_system_argument():
    msgs = normalize_messages([{"role": "user", "content": "x"}], system="be nice")
    assert msgs[0] == {"role": "system", "content": "be nice"}
    with pytest.raises(ValueError, match="system"):
        normalize_messages([{"role": "system", "content": "a"}, {"role": "user", "content": "x"}], system="b")
    with pytest.raises(TypeError, match="system"):
        normalize_messages([{"role": "user", "content": "x"}], system=3)  # type: ignore[arg-type]


def test_missing_template_says_pass_chat_template_false():
    cfg = tokenizer_config()
    del cfg["chat_template"]
    t = ChatTokenizer(load_tokenizer(), cfg)
    assert t.chat_template is None
    with pytest.raises(TemplateError, match="chat_template=False"):
        t.prompt_ids("hello")
    assert t.prompt_ids("hello", chat_template=False) == t.encode("hello")


def test_template_sources(tmp_path):
    (tmp_path / "tokenizer.json").write_text(load_tokenizer().to_str())
    cfg = tokenizer_config()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_text("JINJA {{ messages[0].content }}")
    t = ChatTokenizer.from_files(str(tmp_path / "tokenizer.json"), str(tmp_path / "tokenizer_config.json"),
                                 str(tmp_path / "chat_template.jinja"))
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "JINJA x"  # the .jinja file wins
    t = ChatTokenizer.from_files(str(tmp_path / "tokenizer.json"), str(tmp_path / "tokenizer_config.json"))
    assert t.chat_template == QWEN25_CHAT_TEMPLATE
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert ChatTokenizer(load_tokenizer(), cfg).chat_template == "D"
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}]
    with pytest.raises(TemplateError, match="default"):
        ChatTokenizer(load_tokenizer(), cfg)


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ nope")
    with pytest.raises(TemplateError, match="tokenizer.json"):
        ChatTokenizer.from_files(str(tmp_path / "tokenizer.json"))
    (tmp_path / "good.json").write_text(load_tokenizer().to_str())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TemplateError, match="JSON object"):
        ChatTokenizer.from_files(str(tmp_path / "good.json"), str(tmp_path / "tokenizer_config.json"))
