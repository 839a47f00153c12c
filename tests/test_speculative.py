"""Speculative decoding by prompt lookup and by a draft model: the same tokens and text as plain greedy decoding,
in every case the verify step meets (several K, stop strings and EOS inside an accepted run, max_new_tokens and the
end of the context), in fewer passes when proposals are right; when sampling, the speculative-sampling rule keeps
the target's distribution (chi-square tests against exact probabilities); the proposers' adaptation."""

from __future__ import annotations

import math

import numpy as np
import pytest

import qwen_native
from qwen_native.sampling import Sampler, SamplingParams, token_distribution
from qwen_native.speculative import DraftModel, PromptLookup, lookup

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


def _chi_square_ok(counts: np.ndarray, probs: np.ndarray, alpha_z: float = 3.09) -> bool:
    """Pearson's chi-square goodness of fit at significance 0.001 (z = 3.09; Wilson-Hilferty's quantile), the
    categories with expected counts < 5 pooled. A false alarm once in a thousand runs of a seeded test: never, as
    the seeds are fixed; the point is that a wrong rule (e.g. accepting every proposal) fails by far."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs_c = np.append(counts[big], counts[~big].sum())
    exp_c = np.append(exp[big], exp[~big].sum())
    keep = exp_c > 0
    obs_c, exp_c = obs_c[keep], exp_c[keep]
    stat = float(((obs_c - exp_c) ** 2 / exp_c).sum())
    df = len(exp_c) - 1
    crit = df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3
    return stat < crit


@pytest.mark.parametrize("draft", ["certain", "other"])
def test_speculative_sampling_rule_keeps_the_distribution(draft):
    """Sampler with a proposed id: accepted with min(1, p/q), else a draw from the residual, the result is p."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=40).astype(np.float32) * 2
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=12)
    p = token_distribution(logits, params)
    q_logits = logits + rng.normal(size=40).astype(np.float32) * 2  # a draft that disagrees
    q_full = token_distribution(q_logits, params)
    q_ids = np.flatnonzero(q_full)
    proposer = np.random.default_rng(1)
    sampler = Sampler(params, seed=2)
    counts = np.zeros(40)
    accepted = 0
    for _ in range(20000):
        if draft == "certain":  # prompt lookup: a fixed id (one p gives low probability to)
            x, q = int(np.argsort(p)[-5]), None
        else:
            x, q = int(proposer.choice(40, p=q_full)), (q_ids, q_full[q_ids])
        t = sampler(logits.copy(), proposed=x, draft=q)
        accepted += t == x
        counts[t] += 1
    assert _chi_square_ok(counts, p)
    assert 1000 < accepted < 19000  # both ways were taken
    # the test can fail: accepting every proposal gives q's distribution, which it rejects
    wrong = np.bincount(proposer.choice(40, size=20000, p=q_full), minlength=40)
    assert not _chi_square_ok(wrong.astype(float), p)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """Another random model (other weights, one layer) with the same tokenizer: a draft that often disagrees."""
    from conftest import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("draft") / "model", seed=5, num_hidden_layers=1,
                           tie_word_embeddings=True)


def test_draft_model_gives_the_greedy_tokens(repeating_dir, draft_dir):
    with qwen_native.load(repeating_dir, dtype="float32", num_threads=1, max_batch=2, max_context=96) as m, \
            qwen_native.load(repeating_dir, dtype="float32", num_threads=1, max_batch=2) as same, \
            qwen_native.load(draft_dir, dtype="float32", num_threads=1, max_batch=2) as other:
        prompt = PROMPTS[0]
        plain = m.generate(prompt, max_new_tokens=40, **GREEDY)
        for draft, k in ((same, 1), (same, 4), (other, 3), (other, 8)):
            r = m.generate(prompt, max_new_tokens=40, assistant_model=draft, num_assistant_tokens=k, **GREEDY)
            assert (r.token_ids, r.text, r.finish_reason) == (plain.token_ids, plain.text, plain.finish_reason)
            assert r.accepted_tokens <= r.proposed_tokens
            if draft is same:  # the target's own weights: every proposal is right
                assert r.accepted_tokens == r.proposed_tokens > 0 and r.decode_passes < plain.decode_passes
        # stop strings, max_new_tokens, the end of the context, and EOS inside an accepted run
        stop = plain.text[len(plain.text) // 2:len(plain.text) // 2 + 2]
        room = m.max_context - len(m.tokenizer.prompt_ids(prompt, chat_template=False))
        for kw in (dict(stop=[stop]), dict(max_new_tokens=7), dict(max_new_tokens=room)):
            want = m.generate(prompt, **{**dict(max_new_tokens=30), **kw}, **GREEDY)
            got = m.generate(prompt, **{**dict(max_new_tokens=30), **kw}, assistant_model=same, **GREEDY)
            assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        # Both caches agree with their bookkeeping, and the draft's follows the target's: after a generation to the
        # end of the context its slot holds ids the target confirmed, then at most its last proposal (k - 1 fed ids).
        from qwen_native.scheduler import common_prefix

        assert m._scheduler.consistent() and same._scheduler.idle and same._scheduler.consistent()
        target_ids = m.tokenizer.prompt_ids(prompt, chat_template=False) + got.token_ids
        held = max(same._scheduler._slots, key=lambda s: s.used).ids  # the slot of the last generation
        assert len(held) > len(m.tokenizer.prompt_ids(prompt, chat_template=False)) + 8
        assert common_prefix(held, target_ids) >= len(held) - 7
        m.eos_token_ids = list(m.eos_token_ids) + [plain.token_ids[2]]
        want = m.generate(prompt, max_new_tokens=30, **GREEDY)
        got = m.generate(prompt, max_new_tokens=30, assistant_model=same, **GREEDY)
        assert got.token_ids == want.token_ids and len(got.token_ids) <= 3 and got.finish_reason == "stop"


def _exact_marginals(m, ids, params, depth=3):
    """The exact distributions of generated tokens 1..depth (marginals over the paths before them), from the
    model's float32 logits of every path with probability > 0."""
    out = [np.zeros(m.config.vocab_size) for _ in range(depth)]
    paths = [(list(ids), 1.0)]
    for d in range(depth):
        nxt = []
        for path, w in paths:
            p = token_distribution(m.logits(path)[-1], params)
            out[d] += w * p
            nxt += [(path + [int(t)], w * p[t]) for t in np.flatnonzero(p)]
        paths = nxt
    return out


@pytest.mark.parametrize("how", ["draft", "lookup"])
def test_speculative_sampling_keeps_the_target_distribution(tmp_path, how):
    """The second and third generated tokens (the first ones verified) over many seeds, against their exact
    marginals: chi-square at significance 0.001. A high temperature flattens the tiny random model's
    distribution so that proposals are both accepted and rejected."""
    from conftest import build_model_dir

    sampling = dict(do_sample=True, temperature=10.0, top_k=4)
    params = dict(**sampling, top_p=1.0, repetition_penalty=1.0, chat_template=False)
    target_dir = build_model_dir(tmp_path / "target")
    # the target's embeddings, first layer and head (same seed, one layer): a draft that often agrees
    draft_dir = build_model_dir(tmp_path / "draft", num_hidden_layers=1)
    with qwen_native.load(target_dir, dtype="float32", num_threads=1, max_batch=8) as m, \
            qwen_native.load(draft_dir, dtype="float32", num_threads=1, max_batch=8) as draft:
        prompt = "the cat sat on the the the the the"  # " the" is the model's likeliest next token
        ids = m.tokenizer.prompt_ids(prompt, chat_template=False)
        exact = _exact_marginals(m, ids, SamplingParams(**sampling))
        spec = dict(assistant_model=draft, num_assistant_tokens=3) if how == "draft" else \
            dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=1)
        results = [m.generate(prompt, max_new_tokens=4, seed=s, **spec, **params) for s in range(600)]
        assert all(len(r.token_ids) == 4 for r in results)
        proposed = sum(r.proposed_tokens for r in results)
        accepted = sum(r.accepted_tokens for r in results)
        assert 0 < accepted < proposed  # proposals were both accepted and rejected
        for d in (1, 2):
            counts = np.bincount([r.token_ids[d] for r in results], minlength=m.config.vocab_size).astype(float)
            assert _chi_square_ok(counts, exact[d]), d


def test_lookup_and_adaptation():
    assert lookup([1, 2, 3, 4, 5, 1, 2], 3, 2) == [3, 4, 5]  # the bigram (1, 2) matched
    assert lookup([9, 2, 7, 1, 2, 8, 2], 2, 2) == [8, 2]  # no earlier (8, 2): the latest earlier 2
    assert lookup([1, 2, 3], 2, 2) == []
    p = PromptLookup(4)
    toks = [1, 2, 3, 4, 5, 6, 1, 2]
    assert p(toks) == [3, 4, 5, 6] and p(toks, limit=2) == [3, 4]
    p.learn(4, 4)
    assert p.k == 4 and (p.proposed, p.accepted) == (4, 4)  # all accepted: k stays at most 4
    p = PromptLookup(4, pause=3)
    toks = [1, 2, 3, 4, 1]
    assert p(toks) == [2, 3, 4, 1]
    p.learn(4, 0)
    assert p(toks + [3]) == [4] and p.k == 1  # rejected at its first id: one id next time
    p.learn(1, 0)  # rejected again: quiet for 3 steps
    assert p(toks) == [] and p(toks) == [] and p(toks) == [] and p(toks) != []


def test_draft_adapts_to_what_pays():
    """k maximises expected ids per second from the measured times and acceptance; 0 (a pause, then a probe of
    two) when a draft step costs as much as the target's pass."""
    d = DraftModel(lambda r: None, lambda ids, k, seed: None, max_tokens=8, max_context=100)
    assert d._choose_k(limit=8) == 4  # nothing measured yet
    d._d, d._t = 0.02, 0.2  # a fast draft
    for _ in range(10):
        d.learn(4, 4)
    fast = d._choose_k(limit=8)
    for _ in range(10):
        d.learn(4, 1)
    assert fast >= 6 and 1 <= d._choose_k(limit=8) < fast and d._choose_k(limit=2) <= 2
    d._d = 0.2  # as slow as the target: plain decoding wins
    assert d._choose_k(limit=8) == 0 and d._quiet == d.pause
    assert d._choose_k(limit=8) == 2  # after the pause: a probe


@pytest.mark.parametrize("kw, exc", [(dict(prompt_lookup_num_tokens=0), ValueError),
                                     (dict(prompt_lookup_num_tokens=65), ValueError),
                                     (dict(prompt_lookup_num_tokens=2.0), TypeError),
                                     (dict(max_matching_ngram_size=0), ValueError)])
def test_bad_arguments(tiny_model, kw, exc):
    with pytest.raises(exc, match=next(iter(kw))):
        tiny_model.generate("abc", **kw)


def test_bad_assistant_models(tiny_model, tiny_dir, tmp_path):
    from conftest import build_model_dir

    with pytest.raises(TypeError, match="assistant_model must be a loaded"):
        tiny_model.generate("abc", assistant_model=str(tiny_dir))
    with pytest.raises(ValueError, match="this model itself"):
        tiny_model.generate("abc", assistant_model=tiny_model)
    with qwen_native.load(build_model_dir(tmp_path / "wide", vocab_size=600), dtype="float32") as other:
        with pytest.raises(ValueError, match="different tokenizer vocabulary"):
            tiny_model.generate("abc", assistant_model=other)
        with pytest.raises(ValueError, match="either assistant_model or prompt_lookup_num_tokens"):
            tiny_model.generate("abc", assistant_model=other, prompt_lookup_num_tokens=3)
        other.close()
        with pytest.raises(ValueError, match="closed"):
            tiny_model.generate("abc", assistant_model=other)


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
    drafted = subprocess.run([sys.executable, "-m", "qwen_native", "--model", str(repeating_dir), "--prompt",
                              PROMPTS[0], "--no-chat-template", "--temperature", "0", "-n", "20",
                              "--draft-model", str(repeating_dir), "--draft-dtype", "int8",
                              "--num-assistant-tokens", "3"],
                             capture_output=True, text=True, timeout=120)
    assert drafted.returncode == 0 and drafted.stdout == plain.stdout, drafted.stderr
    assert "proposed tokens accepted" in drafted.stderr
    bad = cli("--prompt-lookup", "0")
    assert bad.returncode == 2 and "--prompt-lookup" in bad.stderr
    served = subprocess.run([sys.executable, "-m", "qwen_native", "serve", "--model", str(repeating_dir),
                             "--speculative", "medusa"], capture_output=True, text=True, timeout=60)
    assert served.returncode == 2 and "--speculative" in served.stderr and len(served.stderr.splitlines()) == 1
    served = subprocess.run([sys.executable, "-m", "qwen_native", "serve", "--model", str(repeating_dir),
                             "--port", "0", "--speculative", f"draft:{tmp_path / 'nothing'}"],
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 1 and "draft:" in served.stderr and len(served.stderr.splitlines()) == 1
    with qwen_native.load(repeating_dir, dtype="float32", num_threads=1, max_batch=2) as m, \
            qwen_native.load(repeating_dir, dtype="float32", num_threads=1, max_batch=2) as draft:
        with TestClient(create_app(m, "tiny", draft=draft)) as tc:
            r = tc.post("/v1/completions", json=dict(prompt=PROMPTS[0], max_tokens=20, temperature=0))
            assert r.status_code == 200
            want = m.generate(PROMPTS[0], max_new_tokens=20, **GREEDY).text
            assert r.json()["choices"][0]["text"] == want
        want = m.generate(PROMPTS[0], max_new_tokens=20, **GREEDY).text
        with TestClient(create_app(m, "tiny", prompt_lookup=8)) as tc:
            body = dict(prompt=PROMPTS[0], max_tokens=20, temperature=0)
            for extra in ({}, {"prompt_lookup_num_tokens": 3}):
                r = tc.post("/v1/completions", json={**body, **extra})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
            r = tc.post("/v1/completions", json={**body, "prompt_lookup_num_tokens": 0})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_lookup_num_tokens"


def test_proposals_are_cut_when_many_sequences_decode(tiny_dir, monkeypatch):
    """A pass takes at most PASS_DECODE_ROWS decode and verify rows: with 4 sequences decoding and a budget of 8,
    each may propose one id; alone, its full K. The tokens stay the greedy ones."""
    from qwen_native import scheduler
    from qwen_native.speculative import Proposer

    monkeypatch.setattr(scheduler, "PASS_DECODE_ROWS", 8)
    seen = []

    class Recording(Proposer):
        def __init__(self, sched):
            self.sched = sched

        def __call__(self, tokens, limit):
            seen.append((sum(not s.prefilling for s in self.sched._active), limit))
            return [0] * limit  # wrong ids: rejected, never changing the tokens

    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1, max_batch=4) as m:
        want = m.generate("Hello", max_new_tokens=12, **GREEDY)
        import time

        ids = m.tokenizer.prompt_ids("Hello", chat_template=False)
        params = qwen_native.GenerationOptions(**GREEDY).sampling(m.generation_config)
        requests = []
        for _ in range(4):
            r = scheduler.Request(ids, params, None, 12, (), frozenset(m.eos_token_ids), False, time.perf_counter())
            r.proposer = Recording(m._scheduler)
            requests.append(r)
        for r in requests:
            m._scheduler.submit(r)
        outs = [r.wait() for r in requests]
    assert all(o.token_ids == want.token_ids for o in outs)
    assert any(n == 4 for n, _ in seen) and all(limit <= 1 for n, limit in seen if n == 4)
    assert any(limit >= 4 for n, limit in seen if n < 4) or all(n == 4 for n, _ in seen)
