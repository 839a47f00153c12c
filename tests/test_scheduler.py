"""The model's request queue: many threads, asyncio and open streams sharing one model, each request getting
exactly what it gets alone; more requests than KV cache slots; prefix reuse per slot; generation options."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

import qwen_native
from qwen_native import GenerationOptions

GREEDY = dict(do_sample=False, repetition_penalty=1.0)
# Raw prompts with distinct first words: no request can reuse another's cached prefix, so every request's
# arithmetic is the same whatever ran before or beside it.
PROMPTS = ["Tell me a story", "Where is the sea", "Count to ten", "Name a colour", "Why is the sky blue",
           "Write a poem", "List three fruits", "Describe a cat"]
RUNS = [dict(GREEDY), dict(temperature=0.9, top_p=0.9, seed=5), dict(temperature=1.2, top_k=40, seed=11),
        dict(repetition_penalty=1.3, do_sample=False)]


def job(i):
    return PROMPTS[i % len(PROMPTS)], dict(RUNS[i % len(RUNS)], max_new_tokens=12 + i % 5, chat_template=False)


@pytest.fixture(scope="module")
def alone(tiny_dir):
    """What each job gives on a fresh model with one slot, one at a time."""
    out = {}
    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1, max_batch=1) as m:
        for i in range(16):
            prompt, kw = job(i)
            m.core.reset()  # nothing cached: each request computed from scratch
            out[i] = m.generate(prompt, **kw)
    return out


def test_open_stream_beside_threads_and_asyncio(tiny_dir, alone):
    """A stream left open in one thread while other threads and asyncio.to_thread calls generate on the same
    model: every call gets exactly the text and ids it gets alone; the stream's own thread can start another
    request while the stream is unfinished; the stream then finishes with its own text."""
    with qwen_native.load(tiny_dir, dtype="float32", num_threads=2, max_batch=4) as m:
        prompt0, kw0 = job(0)
        s = m.generate(prompt0, stream=True, **kw0)
        first = next(s)
        got, errors = {}, []

        def worker(i):
            try:
                prompt, kw = job(i)
                got[i] = m.generate(prompt, **kw)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(1, 7)]
        for t in threads:
            t.start()

        async def from_asyncio():
            calls = [asyncio.to_thread(m.generate, job(i)[0], **job(i)[1]) for i in range(7, 11)]
            return await asyncio.gather(*calls)

        for i, r in zip(range(7, 11), asyncio.run(from_asyncio())):
            got[i] = r
        prompt, kw = job(11)
        got[11] = m.generate(prompt, **kw)  # this thread again, its stream still open
        for t in threads:
            t.join()
        assert not errors, errors
        text = first + "".join(s)
        assert text == alone[0].text and s.result.token_ids == alone[0].token_ids
        for i, r in got.items():
            assert (r.token_ids, r.text) == (alone[i].token_ids, alone[i].text), f"job {i}"
        assert m._scheduler.idle and m._scheduler.consistent()


def test_more_requests_than_slots(tiny_dir, alone):
    """Twelve threads on two slots: the others wait their turn, nobody deadlocks, every answer is its own."""
    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1, max_batch=2) as m:
        got = {}

        def worker(i):
            prompt, kw = job(i)
            if i % 3 == 0:
                with m.generate(prompt, stream=True, **kw) as s:
                    text = "".join(s)
                got[i] = (s.result.token_ids, text)
            else:
                r = m.generate(prompt, **kw)
                got[i] = (r.token_ids, r.text)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert got == {i: (alone[i].token_ids, alone[i].text) for i in range(12)}


def test_prefix_reuse_finds_its_slot(tiny_dir):
    """The next turn of a conversation reuses the slot holding its history, even after other requests used the
    other slots in between."""
    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1, max_batch=3) as m:
        conv = [{"role": "user", "content": "Tell me a story"}]
        r1 = m.generate(conv, max_new_tokens=6, **GREEDY)
        for p in ("abc", "xyz"):
            m.generate(p, max_new_tokens=3, chat_template=False, **GREEDY)
        conv2 = conv + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And then?"}]
        r2 = m.generate(conv2, max_new_tokens=6, **GREEDY)
        assert r2.cached_tokens >= r1.prompt_tokens - 1


def test_dropped_model_keeps_its_stream(tiny_dir, alone):
    """A stream keeps its model alive: load(...).generate(..., stream=True) reads to the end; dropping both
    then frees the model and its scheduler thread."""
    prompt, kw = job(0)
    s = qwen_native.load(tiny_dir, dtype="float32", num_threads=1).generate(prompt, stream=True, **kw)
    gc.collect()
    assert "".join(s) == alone[0].text
    before = threading.active_count()
    del s
    gc.collect()
    assert threading.active_count() == before - 1  # the scheduler thread ended with its model


def test_generation_options(tiny_model):
    opts = GenerationOptions(max_new_tokens=5, **GREEDY)
    a = tiny_model.generate("Tell me a story", opts)
    b = tiny_model.generate("Tell me a story", max_new_tokens=5, **GREEDY)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 5
    assert len(tiny_model.generate("Tell me a story", opts, max_new_tokens=2).token_ids) == 2  # keywords win
    with pytest.raises(TypeError, match="'max_tokens'; did you mean 'max_new_tokens'"):
        tiny_model.generate("hi", max_tokens=3)
    with pytest.raises(TypeError, match="options must be a GenerationOptions"):
        tiny_model.generate("hi", {"max_new_tokens": 3})
    with pytest.raises(ValueError, match="top_p"):
        GenerationOptions(top_p=2.0)
    assert qwen_native.generate("Tell me a story", tiny_model, opts).token_ids == a.token_ids


def test_verifying_proposals_keeps_the_greedy_tokens(tiny_dir, alone):
    """The verify step: proposed ids are fed after a sequence's last token in one pass, the agreeing prefix is
    kept (and the model's next id after it), the rest dropped from the cache. Right, wrong and half-right
    proposals all give exactly the greedy tokens; right ones take fewer passes."""
    import time

    from qwen_native.scheduler import Request

    prompt, kw = job(0)
    expected = alone[0].token_ids
    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1, max_batch=2) as m:
        ids = m.tokenizer.prompt_ids(prompt, chat_template=False)
        opts = GenerationOptions(**kw)

        from qwen_native.speculative import Proposer

        class Fixed(Proposer):
            def __init__(self, propose):
                self.propose = propose

            def __call__(self, tokens, limit):
                return self.propose(tokens)

        def run(proposer):
            r = Request(ids, opts.sampling(m.generation_config), None, kw["max_new_tokens"], (),
                        frozenset(m.eos_token_ids), False, time.perf_counter())
            r.proposer = Fixed(proposer) if proposer is not None else None
            m._scheduler.submit(r)
            return r.wait()

        def right(tokens, k=4):
            done = len(tokens) - len(ids)
            return expected[done:done + k]

        def wrong(tokens):
            return [(t + 1) % 512 for t in right(tokens, 3)]

        def half(tokens):
            good = right(tokens, 2)
            return good + [(t + 7) % 512 for t in right(tokens, 4)[2:]]

        passes = {}
        for name, proposer in (("right", right), ("wrong", wrong), ("half", half), ("none", None)):
            out = run(proposer)
            assert out.token_ids == expected, name
            assert m._scheduler.idle and m._scheduler.consistent(), name
            passes[name] = out.decode_passes
            assert out.decode_tokens == len(expected) - 1
        assert passes["right"] < passes["half"] < passes["none"] == passes["wrong"] == len(expected) - 1


def test_logits_of_every_position(tiny_dir, alone):
    """Model.logits: every position's float32 logits from an empty cache, in a slot of its own: the numpy
    reference's, and the generation cache is left as it was (the next chat turn still reuses its prefix)."""
    import json

    import numpy as np
    from fixtures import random_weights
    from reference import reference_logits, rel_err

    cfg = json.loads((tiny_dir / "config.json").read_text())
    w = random_weights(cfg, seed=0, tied=cfg["tie_word_embeddings"])
    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1, max_batch=1) as m:
        conv = [{"role": "user", "content": "Tell me a story"}]
        r1 = m.generate(conv, max_new_tokens=6, **GREEDY)
        ids = m.tokenizer.prompt_ids("Where is the sea", chat_template=False)
        got = m.logits(ids)
        assert got.shape == (len(ids), cfg["vocab_size"]) and got.dtype == np.float32
        assert rel_err(got, reference_logits(w, cfg, ids)) < 1e-4
        np.testing.assert_array_equal(m.logits(np.array(ids)), got)  # again, from an empty cache again
        conv2 = conv + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And then?"}]
        assert m.generate(conv2, max_new_tokens=3, **GREEDY).cached_tokens >= r1.prompt_tokens - 1
        for bad, exc in (([], ValueError), ("abc", TypeError), ([cfg["vocab_size"]], ValueError), ([-1], ValueError),
                         ([1.5], ValueError), (list(range(10)) * 100, ValueError)):
            with pytest.raises(exc):
                m.logits(bad)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_dtypes_generate(tiny_model_dir, dtype):
    """load(dtype="int8"/"int4") quantizes at load and generates through the same queue; int4 keeps the
    embedding and lm_head in int6 ("mixed"). (The formats and their forward passes are checked in
    tests/test_quant.py.)"""
    d = tiny_model_dir(tie_word_embeddings=False, hidden_size=64, intermediate_size=96)
    with qwen_native.load(d, dtype=dtype, num_threads=1) as m:
        assert m.dtype == dtype
        assert m.core.weight_format == ("int8" if dtype == "int8" else "mixed")
        r = m.generate("Tell me a story", max_new_tokens=8, **GREEDY)
        assert len(r.token_ids) == 8
        s = "".join(m.generate("Tell me a story", max_new_tokens=8, stream=True, **GREEDY))
        assert s == r.text
        assert m.logits(r.token_ids).shape == (8, m.config.vocab_size)


def test_logprobs_of_generated_tokens(tiny_dir, alone):
    """logprobs=True: each generated token's log-probability and top alternatives, the log-softmax of the model's
    logits (after the temperature when sampling) at that step, computed here from Model.logits; the tokens are
    the same as without."""
    import numpy as np

    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1) as m:
        prompt, kw = job(0)  # greedy
        r = m.generate(prompt, logprobs=True, top_logprobs=3, **kw)
        assert r.token_ids == alone[0].token_ids and len(r.logprobs) == len(r.token_ids)
        ids = m.tokenizer.prompt_ids(prompt, chat_template=False)
        logits = m.logits(ids + r.token_ids[:-1]).astype(np.float64)[len(ids) - 1:]
        ref = logits - logits.max(axis=1, keepdims=True)
        ref -= np.log(np.exp(ref).sum(axis=1, keepdims=True))
        for i, lp in enumerate(r.logprobs):
            assert lp.token_id == r.token_ids[i] and abs(lp.logprob - ref[i, lp.token_id]) < 1e-4
            assert [t[0] for t in lp.top] == list(np.argsort(-ref[i], kind="stable")[:3])
            assert all(abs(t[2] - ref[i, t[0]]) < 1e-4 for t in lp.top)
            assert lp.bytes.decode("utf-8", "replace") == lp.token or not lp.token.isprintable()
        sampled = m.generate(prompt, logprobs=True, **dict(kw, do_sample=True, temperature=0.5, seed=1))
        assert all(x.logprob <= 0 for x in sampled.logprobs) and all(x.top == () for x in sampled.logprobs)
        with pytest.raises(ValueError, match="top_logprobs"):
            m.generate(prompt, top_logprobs=2)
        with pytest.raises(ValueError, match="top_logprobs"):
            m.generate(prompt, logprobs=True, top_logprobs=21)


def test_presence_and_frequency_penalties(tiny_model):
    """OpenAI's penalties lower the logits of generated tokens: with a strong one no token repeats."""
    base = tiny_model.generate("Tell me a story", max_new_tokens=24, chat_template=False, **GREEDY)
    r = tiny_model.generate("Tell me a story", max_new_tokens=24, chat_template=False, presence_penalty=2.0,
                            frequency_penalty=2.0, **GREEDY)
    assert len(set(r.token_ids)) > len(set(base.token_ids)) or len(set(r.token_ids)) == len(r.token_ids)
    with pytest.raises(ValueError, match="presence_penalty"):
        tiny_model.generate("hi", presence_penalty=3)


def test_generate_batch_returns_results_in_order(tiny_dir, alone):
    """A list of prompts through the queue at once (more than the slots): the results in order, each what it
    gets alone."""
    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1, max_batch=3) as m:
        prompts = [job(i)[0] for i in range(8)]
        rs = m.generate_batch(prompts, max_new_tokens=12, chat_template=False, **GREEDY)
        for i, r in enumerate(rs):
            alone_r = m.generate(prompts[i], max_new_tokens=12, chat_template=False, **GREEDY)
            assert r.token_ids == alone_r.token_ids
        with pytest.raises(TypeError, match="list of prompts"):
            m.generate_batch("one prompt")


def record_passes(m):
    """The (slot, position) rows of every pass the model's scheduler runs from now on."""
    passes = []
    real = m._scheduler.core

    class Recorder:
        def __getattr__(self, name):
            return getattr(real, name)

        def forward(self, slots, ids, positions, **kw):
            passes.append(list(zip(slots, positions)))
            return real.forward(slots, ids, positions, **kw)

    m._scheduler.core = Recorder()
    return passes


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny_dir, alone, monkeypatch):
    """A prompt longer than a chunk joins a running stream: it is prefilled a chunk per pass, and every one of those
    passes also carries the stream's decode row, so the stream never waits for the whole prompt; the prompt's
    answer is what it is alone."""
    from qwen_native import scheduler

    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", 8)
    long_prompt = "Where is the sea " * 6
    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1, max_batch=2) as m:
        passes = record_passes(m)
        prompt0, kw0 = job(0)
        s = m.generate(prompt0, stream=True, **dict(kw0, max_new_tokens=150))
        next(s)
        stream_slot = passes[0][0][0]
        r = m.generate(long_prompt, max_new_tokens=3, chat_template=False, **GREEDY)
        assert "".join(s) is not None  # the stream runs to its end
    long_slot = next(slot for p in passes for slot, _ in p if slot != stream_slot)
    chunks = [[pos for slot, pos in p if slot == long_slot and pos < r.prefill_tokens] for p in passes]
    with_chunk = [p for p, c in zip(passes, chunks) if c]
    assert r.prefill_tokens > 3 * 8 and sum(len(c) for c in chunks) == r.prefill_tokens
    assert len(with_chunk) == -(-r.prefill_tokens // 8) and all(len(c) <= 8 for c in chunks)
    assert all(sum(slot == stream_slot for slot, _ in p) == 1 for p in with_chunk), with_chunk
    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1, max_batch=1) as m1:
        assert r.token_ids == m1.generate(long_prompt, max_new_tokens=3, chat_template=False, **GREEDY).token_ids


def test_prompts_arriving_together_are_prefilled_one_pass_each(tiny_dir, alone, monkeypatch):
    """With PASS_PROMPT_ROWS below any prompt's length, a pass carries one prompt chunk at most (beside decode rows),
    so prompts that arrive together are answered one after another; every answer is still what it is alone."""
    from qwen_native import scheduler

    monkeypatch.setattr(scheduler, "PASS_PROMPT_ROWS", 1)
    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1, max_batch=4) as m:
        passes = record_passes(m)
        prompts = [job(i)[0] for i in range(4)]
        results = m.generate_batch(prompts, **dict(job(0)[1], max_new_tokens=12))
    slots = [[slot for slot, _ in p] for p in passes]
    chunks = [[slot for slot in set(p) if p.count(slot) > 1] for p in slots]  # prompts: several rows of a slot
    assert sum(len(c) for c in chunks) == 4 and all(len(c) <= 1 for c in chunks), slots
    assert results[0].token_ids == alone[0].token_ids
    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1, max_batch=1) as m1:
        for p, r in zip(prompts, results):
            assert r.token_ids == m1.generate(p, **dict(job(0)[1], max_new_tokens=12)).token_ids
