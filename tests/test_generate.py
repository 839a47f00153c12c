"""generate() end to end on tiny random models: greedy decoding against the numpy reference, EOS and stop
strings, streaming, the model cache, KV prefix reuse, context limits, interrupts, threads, argument errors."""

from __future__ import annotations

import _thread
import json
import threading

import numpy as np
import pytest

import qwen_native
from fixtures import random_weights, stored_values
from qwen_native import engine
from qwen_native.errors import ConfigError, TemplateError
from reference import reference_logits

GREEDY = dict(do_sample=False, repetition_penalty=1.0)
NO_EOS = {"do_sample": False, "eos_token_id": []}


@pytest.fixture
def model_dir(tiny_model_dir):
    """tiny_model_dir with an untied lm_head (varied greedy output) and, by default, no EOS ids."""
    def make(**kw):
        kw.setdefault("tie_word_embeddings", False)
        kw.setdefault("generation_config", NO_EOS)
        return tiny_model_dir(**kw)
    return make


def weights_of(d, seed=0, dtype="F32"):
    cfg = json.loads((d / "config.json").read_text())
    return cfg, stored_values(random_weights(cfg, seed=seed, tied=cfg["tie_word_embeddings"]), dtype)


def reference_greedy(cfg, weights, ids, steps):
    ids = list(ids)
    out, margins = [], []
    for _ in range(steps):
        logits = reference_logits(weights, cfg, ids)[-1]
        top2 = np.sort(logits)[-2:]
        margins.append(top2[1] - top2[0])
        tok = int(np.argmax(logits))
        out.append(tok)
        ids.append(tok)
    return out, min(margins)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_greedy_matches_numpy_reference(model_dir, dtype):
    d = model_dir(dtype=dtype, seed=3, generation_config={"do_sample": False, "eos_token_id": [0]})
    cfg, w = weights_of(d, seed=3, dtype=dtype)
    with qwen_native.load(d, num_threads=1) as m:
        assert m.dtype == ("bfloat16" if dtype == "BF16" else "float32")
        prompt = m.tokenizer.prompt_ids("Hello there")
        ref, margin = reference_greedy(cfg, w, prompt, 6)
        assert margin > 1e-3  # no near-tie that rounding could flip
        r = m.generate("Hello there", max_new_tokens=6, **GREEDY)
        n = len(r.token_ids)
        assert r.token_ids == ref[:n]
        assert n == 6 or r.token_ids[-1] == 0
        # the same through the native greedy path with a repetition penalty (logits → numpy argmax)
        r2 = m.generate("Hello there", max_new_tokens=6, do_sample=False, repetition_penalty=1.0000001)
        assert r2.token_ids == r.token_ids


@pytest.fixture(scope="module")
def baseline(tiny_model):
    """The greedy continuation of a fixed prompt: 24 tokens, no EOS in the default tiny model."""
    r = tiny_model.generate("Tell me a story", max_new_tokens=24, **GREEDY)
    assert r.finish_reason == "length" and len(r.token_ids) == 24
    return r


def test_result_fields(tiny_model, baseline):
    r = baseline
    assert r.prompt_tokens == len(tiny_model.tokenizer.prompt_ids("Tell me a story"))
    assert r.prefill_tokens + r.cached_tokens == r.prompt_tokens
    assert r.decode_tokens == len(r.token_ids) - 1
    assert r.prefill_tok_s > 0 and r.decode_tok_s > 0 and 0 < r.ttft_s <= r.total_s
    assert r.text == tiny_model.tokenizer.decode(r.token_ids)
    assert str(r) == r.text


def test_stream_joins_to_text(tiny_model, baseline):
    s = tiny_model.generate("Tell me a story", max_new_tokens=24, stream=True, **GREEDY)
    assert isinstance(s, qwen_native.GenerationStream)
    pieces = list(s)
    assert "".join(pieces) == s.result.text == baseline.text
    assert s.result.token_ids == baseline.token_ids
    assert all(pieces)
    # random bytes from a random model: U+FFFD only where the full decode has it
    assert "".join(pieces).count("\ufffd") == tiny_model.tokenizer.decode(baseline.token_ids).count("\ufffd")
    assert list(s) == []  # exhausted


def test_eos_from_generation_config(model_dir):
    d = model_dir()
    with qwen_native.load(d, num_threads=1) as m:
        full = m.generate("Tell me a story", max_new_tokens=20, **GREEDY).token_ids
    # the first token that has not appeared before becomes an EOS id (in a list of two, as Qwen2.5 has)
    k = next(i for i in range(3, 20) if full[i] not in full[:i])
    d2 = model_dir(generation_config={"do_sample": False, "eos_token_id": [1, full[k]]})
    with qwen_native.load(d2, num_threads=1) as m:
        r = m.generate("Tell me a story", max_new_tokens=20, **GREEDY)
        assert r.finish_reason == "stop" and r.token_ids == full[:k + 1]
        assert r.text == m.tokenizer.decode(full[:k])  # the EOS id adds no text
        assert m.eos_token_ids == (1, full[k])


def test_eos_falls_back_to_config_json(model_dir):
    d = model_dir(generation_config={})
    with qwen_native.load(d, num_threads=1) as m:
        assert m.eos_token_ids == (m.tokenizer.token_to_id("<|im_end|>"),)


def test_stop_strings(tiny_model, baseline):
    text = baseline.text
    assert len(text) >= 12, text
    stop = text[5:9]
    first = text.index(stop)
    r = tiny_model.generate("Tell me a story", max_new_tokens=24, stop=stop, **GREEDY)
    assert r.finish_reason == "stop" and r.text == text[:first] and r.stop_string == stop
    assert r.token_ids == baseline.token_ids[:len(r.token_ids)]
    s = tiny_model.generate("Tell me a story", max_new_tokens=24, stop=[stop], stream=True, **GREEDY)
    assert "".join(s) == r.text
    # the earliest of several wins; a stop that never appears changes nothing
    later = text[first + 6:first + 9]
    r2 = tiny_model.generate("Tell me a story", max_new_tokens=24, stop=[later, stop, "\x00never"], **GREEDY)
    assert r2.text == text[:first]
    r3 = tiny_model.generate("Tell me a story", max_new_tokens=24, stop="\x00never", **GREEDY)
    assert r3.text == text and r3.finish_reason == "length" and r3.stop_string is None
    # a stop string at the very end of the text
    r4 = tiny_model.generate("Tell me a story", max_new_tokens=24, stop=text[-2:], **GREEDY)
    assert r4.text == text[:text.index(text[-2:])] and r4.finish_reason == "stop"


def test_sampling_defaults_and_seeds(model_dir):
    d = model_dir(generation_config={"do_sample": True, "temperature": 1.5, "top_k": 0, "top_p": 1.0,
                                          "eos_token_id": []})
    with qwen_native.load(d, num_threads=1) as m:
        a = m.generate("Tell me a story", max_new_tokens=12, seed=5)
        b = m.generate("Tell me a story", max_new_tokens=12, seed=5)
        c = m.generate("Tell me a story", max_new_tokens=12, seed=6)
        assert a.token_ids == b.token_ids != c.token_ids
        greedy = m.generate("Tell me a story", max_new_tokens=12, do_sample=False).token_ids
        assert m.generate("Tell me a story", max_new_tokens=12, temperature=0).token_ids == greedy
        assert a.token_ids != greedy
    # a model whose generation_config says greedy samples when a temperature > 0 is passed
    d2 = model_dir()
    with qwen_native.load(d2, num_threads=1) as m:
        greedy = m.generate("Tell me a story", max_new_tokens=12).token_ids
        runs = {tuple(m.generate("Tell me a story", max_new_tokens=12, temperature=2.0, seed=s).token_ids)
                for s in range(4)}
        assert len(runs) > 1
        assert m.generate("Tell me a story", max_new_tokens=12, top_k=3, seed=1).token_ids == greedy


def test_repetition_penalty_changes_greedy_output(tiny_model, baseline):
    r = tiny_model.generate("Tell me a story", max_new_tokens=24, do_sample=False, repetition_penalty=5.0)
    assert r.token_ids != baseline.token_ids
    # with a window of 1, only the previous token is penalised: no immediate repeats
    r = tiny_model.generate("Tell me a story", max_new_tokens=24, do_sample=False, repetition_penalty=1e6,
                            repeat_last_n=1)
    assert all(a != b for a, b in zip(r.token_ids, r.token_ids[1:]))


def test_kv_prefix_reuse_gives_the_same_tokens(model_dir):
    d = model_dir()
    conv = [{"role": "user", "content": "Tell me a story"}]
    with qwen_native.load(d, num_threads=1) as m:
        r1 = m.generate(conv, max_new_tokens=10)
        conv2 = conv + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And then?"}]
        r2 = m.generate(conv2, max_new_tokens=10)
        assert r2.cached_tokens >= r1.prompt_tokens - 1 and r2.prefill_tokens < r2.prompt_tokens
        again = m.generate(conv2, max_new_tokens=10)  # the whole prompt is cached but its last id
        assert again.cached_tokens == again.prompt_tokens - 1 and again.prefill_tokens == 1
        assert again.token_ids == r2.token_ids
        sampled = m.generate(conv2, max_new_tokens=10, temperature=1.0, top_k=0, seed=3)
    with qwen_native.load(d, num_threads=1) as fresh:
        f2 = fresh.generate(conv2, max_new_tokens=10)
        assert f2.cached_tokens == 0 and f2.token_ids == r2.token_ids
        assert fresh.generate(conv2, max_new_tokens=10, temperature=1.0, top_k=0, seed=3).token_ids == \
            sampled.token_ids


def test_unrelated_prompt_resets_the_cache(tiny_model, baseline):
    r = tiny_model.generate("Completely different", max_new_tokens=3, chat_template=False, **GREEDY)
    assert r.cached_tokens == 0
    again = tiny_model.generate("Tell me a story", max_new_tokens=24, **GREEDY)
    assert again.token_ids == baseline.token_ids


def test_sharded_and_single_file_agree(model_dir):
    texts = []
    for shards in (1, 3):
        with qwen_native.load(model_dir(shards=shards, seed=4), num_threads=1) as m:
            texts.append(m.generate("abc", max_new_tokens=8, **GREEDY).token_ids)
    assert texts[0] == texts[1]


def test_default_dtype(tiny_model_dir):
    for ckpt, expect in (("F32", "float32"), ("BF16", "bfloat16"), ("F16", "float32")):
        with qwen_native.load(tiny_model_dir(dtype=ckpt), num_threads=1) as m:
            assert m.dtype == expect
    with qwen_native.load(tiny_model_dir(dtype="BF16"), dtype="f32", num_threads=1) as m:
        assert m.dtype == "float32"  # explicit wins
    with qwen_native.load(tiny_model_dir(dtype="F32"), dtype="bf16", num_threads=1) as m:
        assert m.dtype == "bfloat16"


def test_default_max_batch(tiny_model_dir, monkeypatch):
    """Half the memory left after the weights, in KV slots of max_context positions, between 1 and 16."""
    d = tiny_model_dir()
    with qwen_native.load(d, num_threads=1) as m:
        assert m.max_batch == engine.DEFAULT_MAX_BATCH == 16  # tiny slots: the cap
    cfg = qwen_native.config.load_config(str(d) + "/config.json")
    table = qwen_native.checkpoint.tensor_table([str(d) + "/model.safetensors"])
    slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 100 * 4
    weights = sum(int(np.prod(e[3])) * 4 for e in table)  # float32
    for free_slots, expect in ((2 * 5 + 1, 5), (1, 1), (0, 1), (2 * 40, 16)):
        monkeypatch.setattr(engine, "_available_memory", lambda: weights + free_slots * slot)
        assert engine.default_max_batch(cfg, table, "cpu", "float32", 100) == expect, free_slots
    # 1.5B at 4K on a 24 GiB machine (about 22 GiB free): 16
    big = qwen_native.config.Qwen2Config(**{**cfg.__dict__, "num_hidden_layers": 28, "num_key_value_heads": 2,
                                            "head_dim": 128, "max_position_embeddings": 32768})
    monkeypatch.setattr(engine, "_available_memory", lambda: 22 << 30)
    assert engine.default_max_batch(big, [("w", "", "BF16", (1_540_000_000 // 2, 2), 0, 0)], "cpu", "bfloat16",
                                    None) == 16
    assert engine.default_max_batch(cfg, table, "cuda", "bfloat16", None) == 16


def test_context_limits(model_dir):
    d = model_dir()
    ctx = 90
    with qwen_native.load(d, num_threads=1, max_context=ctx) as m:
        assert m.max_context == ctx
        n = len(m.tokenizer.prompt_ids("hi"))
        assert n < ctx
        r = m.generate("hi")  # the default max_new_tokens shrinks to what fits
        assert r.finish_reason == "length" and len(r.token_ids) == ctx - n
        with pytest.raises(ValueError, match="max_new_tokens"):
            m.generate("hi", max_new_tokens=ctx - n + 1)
        assert len(m.generate("hi", max_new_tokens=ctx - n).token_ids) == ctx - n
        with pytest.raises(ValueError, match="max_context"):
            m.generate("word " * 100, chat_template=False)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        qwen_native.load(d, max_context=100000)


class CoreProxy:
    """Wraps a _core.Model; raises KeyboardInterrupt at a chosen call, before or after the real call."""

    def __init__(self, core, method, at, after=False):
        self._core, self._method, self._at, self._after, self._n = core, method, at, after, 0

    def __getattr__(self, name):
        attr = getattr(self._core, name)
        if name != self._method:
            return attr

        def call(*a, **kw):
            self._n += 1
            if self._n == self._at and not self._after:
                raise KeyboardInterrupt
            out = attr(*a, **kw)
            if self._n == self._at and self._after:
                raise KeyboardInterrupt
            return out

        return call


@pytest.mark.parametrize("method, at, after", [
    ("forward", 1, False), ("forward", 1, True), ("forward", 3, False), ("forward", 3, True), ("truncate", 1, False),
    ("truncate", 1, True),
])
def test_interrupt_leaves_the_model_usable(model_dir, method, at, after):
    """An exception (here KeyboardInterrupt) out of the native model, before or after its call did its work (the
    prompt pass, a decode pass, the truncation that reuses a cached prefix), reaches the caller; the KV cache
    bookkeeping stays consistent and the model then generates what it did before."""
    d = model_dir()
    with qwen_native.load(d, num_threads=1) as m:
        expected = m.generate("Tell me a story", max_new_tokens=12).token_ids
        m.generate("Tell me", max_new_tokens=2)  # something cached, so truncate is called next
        real = m._scheduler.core
        m._scheduler.core = CoreProxy(real, method, at, after)
        with pytest.raises(KeyboardInterrupt):
            m.generate("Tell me a story", max_new_tokens=12)
        m._scheduler.core = real
        assert m._scheduler.idle and m._scheduler.consistent()
        assert m.generate("Tell me a story", max_new_tokens=12).token_ids == expected


def test_real_ctrl_c_during_streaming(model_dir):
    d = model_dir()
    with qwen_native.load(d, num_threads=1) as m:
        expected = m.generate("Tell me a story", max_new_tokens=16).token_ids
        with pytest.raises(KeyboardInterrupt):
            for i, _ in enumerate(m.generate("Tell me a story", max_new_tokens=16, stream=True)):
                if i == 1:
                    _thread.interrupt_main()  # as if SIGINT arrived now
                    for _ in range(10 ** 6):  # the interrupt lands at the next bytecode
                        pass
        assert m.generate("Tell me a story", max_new_tokens=16).token_ids == expected


def test_unfinished_stream_in_the_same_thread(tiny_model, baseline):
    """A stream left open does not block the next request of its own thread, and that request does not stop it:
    each gets exactly the tokens it gets alone."""
    s = tiny_model.generate("Tell me a story", max_new_tokens=24, stream=True, **GREEDY)
    first = next(s)
    r = tiny_model.generate("Tell me a story", max_new_tokens=24, **GREEDY)
    assert r.token_ids == baseline.token_ids
    assert first + "".join(s) == baseline.text and s.result is not None
    assert s.result.token_ids == baseline.token_ids
    with tiny_model.generate("Tell me a story", max_new_tokens=24, stream=True, **GREEDY) as s2:
        next(s2)
    assert list(s2) == [] and s2.result is None  # closed by its owner: nothing more comes
    assert tiny_model.generate("Tell me a story", max_new_tokens=24, **GREEDY).token_ids == baseline.token_ids


def test_unfinished_stream_with_one_slot(tiny_dir, baseline):
    """With room for one sequence, a second request of the thread holding an unfinished stream waits for that
    stream's generation (which runs ahead of its reader) instead of deadlocking or stopping it."""
    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1, max_batch=1) as m:
        s = m.generate("Tell me a story", max_new_tokens=24, stream=True, **GREEDY)
        first = next(s)
        assert m.generate("Tell me a story", max_new_tokens=24, **GREEDY).token_ids == baseline.token_ids
        assert first + "".join(s) == baseline.text


def test_threads_are_serialized(tiny_model, baseline):
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(tiny_model.generate("Tell me a story", max_new_tokens=24, **GREEDY).token_ids)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 9
    assert all(r == baseline.token_ids for r in results)


def test_module_generate_caches_models(tiny_dir, monkeypatch):
    loads = []
    real_load = engine.load

    def counting_load(*a, **kw):
        loads.append(a)
        return real_load(*a, **kw)

    monkeypatch.setattr(engine, "load", counting_load)
    try:
        r1 = qwen_native.generate("Tell me a story", str(tiny_dir), max_new_tokens=4, num_threads=1, **GREEDY)
        r2 = qwen_native.generate("Tell me a story", tiny_dir, max_new_tokens=4, num_threads=1, **GREEDY)
        assert len(loads) == 1 and r1.token_ids == r2.token_ids
        assert r2.cached_tokens == r2.prompt_tokens - 1  # the same Model, cache and all
        qwen_native.generate("Tell me a story", str(tiny_dir), max_new_tokens=4, num_threads=1, dtype="bfloat16")
        assert len(loads) == 2  # another dtype is another model
        pieces = list(qwen_native.generate("Tell me a story", str(tiny_dir), max_new_tokens=4, num_threads=1,
                                           stream=True, **GREEDY))
        assert "".join(pieces) == r1.text and len(loads) == 2
    finally:
        qwen_native.clear_model_cache()
    qwen_native.generate("Tell me a story", str(tiny_dir), max_new_tokens=1, num_threads=1)
    assert len(loads) == 3
    qwen_native.clear_model_cache()


def test_generate_with_a_loaded_model(tiny_model, baseline):
    r = qwen_native.generate("Tell me a story", tiny_model, max_new_tokens=24, **GREEDY)
    assert r.token_ids == baseline.token_ids


def test_messages_and_system(tiny_model):
    a = tiny_model.generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                            max_new_tokens=5, **GREEDY)
    b = tiny_model.generate("Hi", system="Be brief.", max_new_tokens=5, **GREEDY)
    assert a.token_ids == b.token_ids and a.prompt_tokens == b.prompt_tokens


def test_no_chat_template(tiny_model_dir):
    with qwen_native.load(tiny_model_dir(chat_template=False), num_threads=1) as m:
        with pytest.raises(TemplateError, match="chat_template=False"):
            m.generate("hello")
        r = m.generate("hello", chat_template=False, max_new_tokens=3)
        assert r.prompt_tokens == len(m.tokenizer.encode("hello"))


@pytest.mark.parametrize("kw, exc, name", [
    (dict(temperature=-1), ValueError, "temperature"),
    (dict(top_p=2.0), ValueError, "top_p"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(min_p=3), ValueError, "min_p"),
    (dict(repetition_penalty=0), ValueError, "repetition_penalty"),
    (dict(repeat_last_n=-1), ValueError, "repeat_last_n"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens="5"), TypeError, "max_new_tokens"),
    (dict(seed=-4), ValueError, "seed"),
    (dict(stop=""), ValueError, "stop"),
    (dict(stop=5), TypeError, "stop"),
    (dict(stop=["a", 3]), TypeError, "stop"),
    (dict(stream="yes"), TypeError, "stream"),
    (dict(do_sample="yes"), TypeError, "do_sample"),
    (dict(system=5), TypeError, "system"),
    (dict(chat_template=None), TypeError, "chat_template"),
    # (every sampling value's checks: test_sampling.py's BAD_ARGS; these are generate()'s own)
    (dict(temperature=10 ** 400), ValueError, "temperature"),
    (dict(repeat_last_n=None), TypeError, "repeat_last_n"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=10 ** 30), ValueError, "max_new_tokens"),  # beyond the context
    (dict(stop=[""]), ValueError, "stop"),
    (dict(stop=b"x"), TypeError, "stop"),
    (dict(do_sample=1), TypeError, "do_sample"),
    (dict(chat_template="no"), TypeError, "chat_template"),
])
def test_bad_generate_arguments(tiny_model, kw, exc, name):
    before = tiny_model.core.length
    with pytest.raises(exc) as e:
        tiny_model.generate("hello", **kw)
    assert name in str(e.value)
    assert tiny_model.core.length == before  # nothing ran


@pytest.mark.parametrize("prompt, exc", [(5, TypeError), ([], ValueError), ([{"role": "user"}], ValueError),
                                         ({"role": "user", "content": "x"}, TypeError), (None, TypeError),
                                         (b"hi", TypeError), (bytearray(b"hi"), TypeError), (["hi"], TypeError),
                                         ([{"role": "", "content": "x"}], ValueError),
                                         ([{"role": "user", "content": 5}], TypeError),
                                         ([{"role": "user", "content": "x", "extra": object()}], TypeError),
                                         ("a lone surrogate \ud800", ValueError),
                                         ([{"role": "user", "content": "\udfff"}], ValueError)])
def test_bad_prompts(tiny_model, prompt, exc):
    with pytest.raises(exc) as e:
        tiny_model.generate(prompt)
    assert str(e.value)
    assert tiny_model._scheduler.consistent()


def test_empty_prompt_without_template(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        tiny_model.generate("", chat_template=False)
    assert len(tiny_model.generate("", max_new_tokens=2).token_ids) == 2  # with the template it is a user turn


@pytest.mark.parametrize("kw, exc, name", [
    (dict(dtype="float16"), ValueError, "float16"),
    (dict(dtype="int3"), ValueError, "dtype"),
    (dict(max_batch=0), ValueError, "max_batch"),
    (dict(dtype=32), TypeError, "dtype"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(device=0), TypeError, "device"),
    (dict(max_context=-1), ValueError, "max_context"),
    (dict(max_context=1.5), TypeError, "max_context"),
    (dict(num_threads=-1), ValueError, "num_threads"),
    (dict(local_files_only="yes"), TypeError, "local_files_only"),
])
def test_bad_load_arguments(tiny_dir, kw, exc, name):
    with pytest.raises(exc) as e:
        qwen_native.load(tiny_dir, **kw)
    assert name in str(e.value)


def test_tokenizer_larger_than_the_model(tiny_model_dir):
    d = tiny_model_dir(vocab_size=300)  # the tokenizer fits itself into 300 ids
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 280
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="vocab_size"):
        qwen_native.load(d)


def test_close(tiny_model_dir):
    m = qwen_native.load(tiny_model_dir(), num_threads=1)
    assert "float32" in repr(m)
    m.close()
    assert m.closed and "closed" in repr(m)
    with pytest.raises(RuntimeError, match="closed"):
        m.generate("hi")


def test_dropped_stream_frees_the_model_at_once(tiny_model, baseline):
    """A stream dropped unfinished releases the model immediately (no reference cycle waiting for the GC), so
    another thread can use it."""
    import gc

    gc.disable()
    try:
        s = tiny_model.generate("Tell me a story", max_new_tokens=24, stream=True, **GREEDY)
        next(s)
        del s
        out = []
        t = threading.Thread(daemon=True, target=lambda: out.append(
            tiny_model.generate("Tell me a story", max_new_tokens=24, **GREEDY).token_ids))
        t.start()
        t.join(timeout=30)
        assert not t.is_alive() and out == [baseline.token_ids]
    finally:
        gc.enable()


def test_interrupt_while_waiting_stops_the_generation(tiny_dir, baseline, monkeypatch):
    """Ctrl-C that lands in generate() while it waits for its result (not inside a native pass) stops the
    generation at the next step and frees its place in the model, even while the traceback is alive."""
    from qwen_native import scheduler

    seen = []

    def interrupted_wait(self):
        seen.append(self)
        raise KeyboardInterrupt

    with qwen_native.load(tiny_dir, dtype="float32", num_threads=1, max_batch=1) as m:
        monkeypatch.setattr(scheduler.Request, "wait", interrupted_wait)
        try:
            m.generate("Tell me a story", max_new_tokens=150, **GREEDY)
        except KeyboardInterrupt as e:
            kept = e  # noqa: F841 - keep the traceback alive
        monkeypatch.undo()
        assert seen and seen[0].cancelled
        out = []
        t = threading.Thread(daemon=True, target=lambda: out.append(
            m.generate("Tell me a story", max_new_tokens=24, **GREEDY).token_ids))
        t.start()
        t.join(timeout=30)
        assert not t.is_alive() and out == [baseline.token_ids]
        assert seen[0].done and seen[0].outcome is None  # stopped, never finished
        assert m._scheduler.idle and m._scheduler.consistent()


def test_public_api():
    for name in ("generate", "load", "Model", "GenerationResult", "GenerationStream", "__version__",
                 "QwenNativeError", "CheckpointError", "ConfigError", "TemplateError", "ModelNotFoundError"):
        assert hasattr(qwen_native, name) and name in qwen_native.__all__
    assert issubclass(qwen_native.ConfigError, ValueError) and issubclass(qwen_native.TemplateError, ValueError)
    assert qwen_native.Model.generate.__doc__ and qwen_native.load.__doc__ and qwen_native.generate.__doc__


def test_cuda_without_a_gpu_is_a_clear_error(tiny_dir):
    from qwen_native import _core

    if _core.cuda_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises((RuntimeError, ValueError), match="(?i)cuda"):
        qwen_native.load(tiny_dir, device="cuda")
