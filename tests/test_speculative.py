"""Speculative decoding by prompt lookup: the same tokens and text as plain greedy decoding, in every case the
verify step meets (several K, stop strings and EOS inside an accepted run, max_new_tokens and the end of the
context), in fewer passes when proposals are right; the proposer's lookup and adaptation."""

from __future__ import annotations

import pytest

import qwen_native
from qwen_native.speculative import PromptLookup, lookup

GREEDY = dict(do_sample=False, repetition_penalty=1.0, chat_template=False)
PROMPTS = ["the cat sat on the mat and the cat sat on the", "Tell me a story"]


@pytest.fixture(scope="module")
def repeating_dir(tmp_path_factory):
    """Tied embeddings: a random model's greedy answer repeats itself, so lookups find their proposals."""
    from conftest import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("spec") / "model", tie_word_embeddings=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # int8 / int4 rows: test_core's verify-pass test
def test_prompt_lookup_gives_the_greedy_tokens(repeating_dir, tiny_dir, dtype):
    saved = 0
    for d in (repeating_dir, tiny_dir):
        with qwen_native.load(d, dtype=dtype, num_threads=1, max_batch=2) as m:
            for prompt in PROMPTS:
                plain = m.generate(prompt, max_new_tokens=40, **GREEDY)
                for k in (1, 3, 10):
                    r = m.generate(prompt, max_new_tokens=40, prompt_lookup_num_tokens=k, **GREEDY)
                    assert (r.token_ids, r.text, r.finish_reason) == (plain.token_ids, plain.text,
                                                                     plain.finish_reason), (d, prompt, k)
                    assert r.decode_tokens == plain.decode_tokens and r.decode_passes <= plain.decode_passes
                    saved += plain.decode_passes - r.decode_passes
    assert saved > 0  # the repeating model's proposals were accepted


def test_stop_strings_eos_and_limits_inside_accepted_runs(repeating_dir):
    with qwen_native.load(repeating_dir, dtype="float32", num_threads=1, max_batch=2, max_context=64) as m:
        prompt = PROMPTS[0]
        plain = m.generate(prompt, max_new_tokens=30, **GREEDY)
        stop = plain.text[len(plain.text) // 2:len(plain.text) // 2 + 2]  # somewhere inside the answer
        room = m.max_context - len(m.tokenizer.prompt_ids(prompt, chat_template=False))
        for kw in (dict(stop=[stop]), dict(max_new_tokens=7), dict(max_new_tokens=room)):  # room: to the context end
            want = m.generate(prompt, **{**dict(max_new_tokens=30), **kw}, **GREEDY)
            got = m.generate(prompt, **{**dict(max_new_tokens=30), **kw}, prompt_lookup_num_tokens=8, **GREEDY)
            assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        # an EOS id inside a proposal: make the answer's third token an end of sequence
        m.eos_token_ids = list(m.eos_token_ids) + [plain.token_ids[2]]
        want = m.generate(prompt, max_new_tokens=30, **GREEDY)
        got = m.generate(prompt, max_new_tokens=30, prompt_lookup_num_tokens=8, **GREEDY)
        assert got.token_ids == want.token_ids and len(got.token_ids) <= 3 and got.finish_reason == "stop"


def test_sampling_ignores_prompt_lookup(tiny_model):
    a = tiny_model.generate("abc", max_new_tokens=10, temperature=0.9, seed=3, chat_template=False)
    b = tiny_model.generate("abc", max_new_tokens=10, temperature=0.9, seed=3, chat_template=False,
                            prompt_lookup_num_tokens=5)
    assert a.token_ids == b.token_ids


def test_lookup_and_adaptation():
    assert lookup([1, 2, 3, 4, 5, 1, 2], 3, 2) == [3, 4, 5]  # the bigram (1, 2) matched
    assert lookup([9, 2, 7, 1, 2, 8, 2], 2, 2) == [8, 2]  # no earlier (8, 2): the latest earlier 2
    assert lookup([1, 2, 3], 2, 2) == []
    p = PromptLookup(4)
    toks = [1, 2, 3, 4, 5, 6, 1, 2]
    assert p(toks) == [3, 4, 5, 6]
    assert p(toks + [3, 4, 5, 6, 1]) != [] and p.accepted == 4 and p.k == 4  # all accepted: k stays at most 4
    p = PromptLookup(4, pause=3)
    toks = [1, 2, 3, 4, 1]
    assert p(toks) == [2, 3, 4, 1]
    assert p(toks + [3]) == [4] and p.k == 1  # rejected at its first id: one id next time
    toks += [3, 2]  # rejected again: quiet for 3 steps
    assert p(toks) == [] and p(toks + [1]) == [] and p(toks + [1, 2]) == []
    assert p(toks + [1, 2, 3]) != []


@pytest.mark.parametrize("kw, exc", [(dict(prompt_lookup_num_tokens=0), ValueError),
                                     (dict(prompt_lookup_num_tokens=65), ValueError),
                                     (dict(prompt_lookup_num_tokens=2.0), TypeError),
                                     (dict(max_matching_ngram_size=0), ValueError)])
def test_bad_arguments(tiny_model, kw, exc):
    with pytest.raises(exc, match=next(iter(kw))):
        tiny_model.generate("abc", **kw)


def test_cli_and_server_flags(repeating_dir, tmp_path):
    """--prompt-lookup K on the command line, --speculative ngram[:K] on the server (and a request's own
    prompt_lookup_num_tokens): the same text as without; bad values are one-line errors."""
    import subprocess
    import sys

    from fastapi.testclient import TestClient

    from qwen_native.server import create_app

    def cli(*extra):
        return subprocess.run([sys.executable, "-m", "qwen_native", "--model", str(repeating_dir), "--prompt",
                               PROMPTS[0], "--no-chat-template", "--temperature", "0", "-n", "20", "-q", *extra],
                              capture_output=True, text=True, timeout=120)

    plain, spec = cli(), cli("--prompt-lookup", "6")
    assert plain.returncode == spec.returncode == 0 and plain.stdout == spec.stdout, spec.stderr
    bad = cli("--prompt-lookup", "0")
    assert bad.returncode == 2 and "--prompt-lookup" in bad.stderr
    served = subprocess.run([sys.executable, "-m", "qwen_native", "serve", "--model", str(repeating_dir),
                             "--speculative", "medusa"], capture_output=True, text=True, timeout=60)
    assert served.returncode == 2 and "--speculative" in served.stderr and len(served.stderr.splitlines()) == 1
    with qwen_native.load(repeating_dir, dtype="float32", num_threads=1, max_batch=2) as m:
        want = m.generate(PROMPTS[0], max_new_tokens=20, **GREEDY).text
        with TestClient(create_app(m, "tiny", prompt_lookup=8)) as tc:
            body = dict(prompt=PROMPTS[0], max_tokens=20, temperature=0)
            for extra in ({}, {"prompt_lookup_num_tokens": 3}):
                r = tc.post("/v1/completions", json={**body, **extra})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
            r = tc.post("/v1/completions", json={**body, "prompt_lookup_num_tokens": 0})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_lookup_num_tokens"
