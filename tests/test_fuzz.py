"""Property-based fuzzing (hypothesis): random bytes and random mutations of valid files thrown at the loaders,
random values thrown at generate() and the native model. The property is always the same: only the documented
exceptions come out, with the process healthy afterwards.

Documented exceptions (what a caller may need to catch):

* loading: the qwen_native.errors classes: CheckpointError (weights / index), ConfigError (config.json,
  generation_config.json), TemplateError (tokenizer files, chat template), ModelNotFoundError (a FileNotFoundError);
* generate() arguments: TypeError (wrong type), ValueError (out of range, too long for the context; TemplateError
  and ConfigError are ValueErrors too);
* the native core (_core.Model) used directly: ValueError / TypeError (bad config or arguments), IndexError (a token
  id outside the vocabulary, a full KV cache), RuntimeError (a closed model, a model busy in another thread, a
  file that changed under it), MemoryError (an allocation that failed).

Deterministic for CI: derandomize=True (a fixed sequence of examples), no example database, no deadline. A few
thousand cases in all, well under a minute. For a longer campaign:
``QWEN_NATIVE_FUZZ_SCALE=50 QWEN_NATIVE_FUZZ_RANDOM=1 pytest tests/test_fuzz.py`` (50x the examples, fresh random
ones each run).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import struct
from typing import Any, Dict, List

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qwen_native
from conftest import build_model_dir
from qwen_native import _core
from qwen_native.chat import ChatTokenizer, render_template
from qwen_native.checkpoint import check_tensors, index_shards, read_header, read_index, tensor_table
from qwen_native.config import parse_config, parse_generation_config
from qwen_native.errors import CheckpointError, ConfigError, QwenNativeError, TemplateError

# A RuntimeWarning from numpy (overflow, invalid value) means a computation went outside its range: a failure here.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

# Under the sanitizers (tests/test_sanitizers.py, several times slower) a sixth of the examples: the full set runs
# in the plain build of the same CI run.
_SCALE = float(os.environ.get("QWEN_NATIVE_FUZZ_SCALE") or (0.15 if os.environ.get("QWEN_NATIVE_SANITIZED") else 1))
_RANDOM = os.environ.get("QWEN_NATIVE_FUZZ_RANDOM", "") not in ("", "0")


def fuzz(n: int) -> Any:
    return settings(max_examples=max(1, int(n * _SCALE)), deadline=None, derandomize=not _RANDOM, database=None,
                    print_blob=_RANDOM,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])


CORE_ERRORS = (ValueError, TypeError, IndexError, RuntimeError, MemoryError)

# JSON values, with the edge cases hostile files carry: huge and negative integers, non-finite floats (Python's
# json reads NaN and Infinity), long strings, deep-ish nesting.
_EDGE_INTS = st.sampled_from([0, 1, -1, 2, 7, 64, 97, 512, 1024, 1025, 2 ** 31, 2 ** 32 + 5, 2 ** 62, 2 ** 63 - 1,
                              2 ** 63, 2 ** 64, -2 ** 63, 10 ** 30, 10 ** 400, -10 ** 400])
_SCALARS = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | _EDGE_INTS
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON = st.recursive(_SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=10)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: one small model directory, rewritten in place by each example


class Base(dict):
    """The fixture's files and their parsed contents (a dict with a short repr, for hypothesis' reports)."""

    def __repr__(self) -> str:
        return f"<fuzz base {self['root']}>"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    root = tmp_path_factory.mktemp("fuzz")
    single = build_model_dir(root / "base1", tie_word_embeddings=False)
    raw = (single / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    work = root / "work"
    shutil.copytree(single, work)
    return Base(root=root, dir=single, work=work, header=json.loads(raw[8:8 + n]), data=raw[8 + n:],
                config=json.loads((single / "config.json").read_text()))


def _write_weights(path: pathlib.Path, blob: bytes) -> None:
    with open(path, "wb") as f:
        f.write(blob)


# ---------------------------------------------------------------------------------------------------------------
# Weights files


@fuzz(400)
@given(blob=st.binary(max_size=600) | st.builds(lambda n, body: struct.pack("<Q", n) + body,
                                               st.integers(0, 2 ** 64 - 1) | st.integers(0, 600),
                                               st.binary(max_size=600)))
def test_random_bytes_as_safetensors(base, blob):
    path = base["root"] / "random.safetensors"
    _write_weights(path, blob)
    try:
        entries = read_header(str(path))
    except CheckpointError:
        return
    size = len(blob)
    for _, _, _, shape, offset, nbytes in entries:  # whatever is accepted lies inside the file
        assert 0 <= offset and 0 <= nbytes and offset + nbytes <= size
        assert all(isinstance(d, int) and d >= 0 for d in shape)


_NAMES = ["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.down_proj.weight",
          "model.layers.1.self_attn.q_proj.bias", "model.layers.0.input_layernorm.weight", "__metadata__"]
_FIELDS = ["dtype", "shape", "data_offsets"]
_DTYPES = st.sampled_from(["F32", "BF16", "F16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "f32", ""])

_header_op = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(_NAMES), st.sampled_from(_FIELDS),
              JSON | _DTYPES | st.lists(st.integers(-3, 600), max_size=3)
              | st.tuples(st.integers(-10, 600_000), st.integers(-10, 600_000)).map(list)),
    st.tuples(st.just("del"), st.sampled_from(_NAMES)),
    st.tuples(st.just("add"), st.text(max_size=40) | st.sampled_from(_NAMES), JSON),
    st.tuples(st.just("rename"), st.sampled_from(_NAMES), st.text(max_size=40)),
    st.tuples(st.just("whole"), JSON),
)
_byte_op = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 600_000)),
    st.tuples(st.just("flip"), st.integers(0, 5_000), st.integers(1, 255)),
    st.tuples(st.just("length"), st.integers(0, 2 ** 64 - 1)),
    st.tuples(st.just("append"), st.binary(max_size=64)),
)


def _mutate_header(header: Dict[str, Any], ops: List[Any]) -> Any:
    h: Any = json.loads(json.dumps(header))
    for op in ops:
        if not isinstance(h, dict):
            break
        kind = op[0]
        if kind == "set" and isinstance(h.get(op[1]), dict):
            h[op[1]][op[2]] = op[3]
        elif kind == "del":
            h.pop(op[1], None)
        elif kind == "add":
            h[op[1]] = op[2]
        elif kind == "rename" and op[1] in h:
            h[op[2]] = h.pop(op[1])
        elif kind == "whole":
            h = op[1]
    return h


def _apply_bytes(blob: bytes, ops: List[Any]) -> bytes:
    b = bytearray(blob)
    for op in ops:
        if op[0] == "truncate":
            del b[op[1]:]
        elif op[0] == "flip" and op[1] < len(b):
            b[op[1]] ^= op[2]
        elif op[0] == "length" and len(b) >= 8:
            b[:8] = struct.pack("<Q", op[1])
        elif op[0] == "append":
            b += op[1]
    return bytes(b)


@fuzz(400)
@given(ops=st.lists(_header_op, min_size=1, max_size=3), byte_ops=st.lists(_byte_op, max_size=2))
def test_mutated_header_through_load(base, ops, byte_ops):
    """Mutations of a valid header (and of the file's bytes) through the whole load(): a CheckpointError, or a
    model that loads and generates. The core never has to refuse what the Python checks let through."""
    h = _mutate_header(base["header"], ops)
    try:
        hb = json.dumps(h).encode()
    except ValueError:  # a float json cannot write (never happens for JSON-built values) or deep recursion
        return
    hb += b" " * (-len(hb) % 8)
    blob = _apply_bytes(struct.pack("<Q", len(hb)) + hb + base["data"], byte_ops)
    _write_weights(base["work"] / "model.safetensors", blob)
    try:
        model = qwen_native.load(base["work"], num_threads=1)
    except CheckpointError:
        return
    with model:
        r = model.generate("hi", chat_template=False, max_new_tokens=2, do_sample=False)
        assert all(0 <= t < model.config.vocab_size for t in r.token_ids)


@fuzz(150)
@given(blob=st.binary(max_size=300), text=st.text(max_size=200), value=JSON)
def test_random_index_files(base, blob, text, value):
    path = base["root"] / "model.safetensors.index.json"
    for content in (blob, text.encode("utf-8", "surrogatepass"), json.dumps({"weight_map": value}).encode()):
        path.write_bytes(content)
        try:
            shards = read_index(str(path))
        except CheckpointError:
            continue
        for s in shards:
            assert isinstance(s, str) and "/" not in s and "\\" not in s and ":" not in s and ".." not in s


@fuzz(300)
@given(names=st.lists(st.text(max_size=30) | st.sampled_from(["../a.safetensors", "/etc/passwd", "C:a.safetensors",
                                                               "a/../../b.safetensors", "\u2024\u2024/x.safetensors",
                                                               "x.safetensors\0", "x.safetensors/", " .safetensors"]),
                      min_size=1, max_size=4))
def test_index_shard_names(names):
    """Only plain '*.safetensors' file names get through: nothing that could leave the model directory."""
    index = {"weight_map": {f"t{i}": n for i, n in enumerate(names)}}
    try:
        shards = index_shards(index)
    except CheckpointError:
        return
    for s in shards:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors", s) and ".." not in s
        assert os.path.basename(s) == s and not os.path.isabs(s)


# ---------------------------------------------------------------------------------------------------------------
# config.json and generation_config.json


_CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps",
                "tie_word_embeddings", "architectures", "model_type", "hidden_act", "rope_scaling",
                "use_sliding_window", "bos_token_id", "eos_token_id", "rope_parameters", "torch_dtype"]
_config_op = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(_CONFIG_KEYS), JSON | _EDGE_INTS),
    st.tuples(st.just("del"), st.sampled_from(_CONFIG_KEYS)),
)


@fuzz(600)
@example(ops=[("set", "rope_theta", 10 ** 400)])  # OverflowError before
@example(ops=[("set", "rms_norm_eps", -10 ** 400)])
@example(ops=[("set", "num_hidden_layers", 10 ** 9)])
@example(ops=[("set", "rope_theta", 2 ** 62)])  # Python accepted it, the core (rope_theta <= 1e12) did not
@given(ops=st.lists(_config_op, min_size=1, max_size=4))
def test_mutated_config(base, ops):
    """parse_config: a ConfigError or a valid config. The native core, handed the same dict directly, raises only
    its documented errors and never allocates for a config it rejects."""
    cfg = dict(base["config"])
    for op in ops:
        if op[0] == "set":
            cfg[op[1]] = op[2]
        else:
            cfg.pop(op[1], None)
    table = tensor_table([str(base["dir"] / "model.safetensors")])
    try:
        parsed = parse_config(cfg)
    except ConfigError:
        parsed = None
    if parsed is not None:
        assert parsed.num_attention_heads % parsed.num_key_value_heads == 0 and parsed.head_dim % 2 == 0
        try:
            check_tensors(table, parsed)
        except CheckpointError:
            pass
        else:  # what Python accepts, the core builds
            _core.Model(parsed.to_core_dict(), table, num_threads=1).close()
    try:
        _core.Model(cfg, table, num_threads=1).close()
    except (ValueError, TypeError, MemoryError):  # a bad config is never a RuntimeError or a crash
        pass


@fuzz(300)
@example(gen={"temperature": 10 ** 400})  # float(10**400) raised OverflowError
@example(gen={"top_p": 10 ** 400, "repetition_penalty": -10 ** 400})
@given(gen=st.dictionaries(st.sampled_from(["do_sample", "temperature", "top_k", "top_p", "min_p",
                                            "repetition_penalty", "max_new_tokens", "eos_token_id", "bos_token_id",
                                            "pad_token_id"]), JSON | _EDGE_INTS, max_size=5) | JSON)
def test_random_generation_config(base, gen):
    config = parse_config(base["config"])
    try:
        g = parse_generation_config(gen, config)
    except ConfigError:
        return
    assert 0 <= g.temperature < math.inf and 0 < g.top_p <= 1 and g.top_k >= 0
    assert all(0 <= t < config.vocab_size for t in g.eos_token_id)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer files and chat templates


@fuzz(100)
@given(tok=st.binary(max_size=200), cfg=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_random_tokenizer_files(base, tok, cfg):
    root = base["root"]
    (root / "bad_tokenizer.json").write_bytes(tok)
    (root / "bad_tokenizer_config.json").write_bytes(cfg)
    good = str(base["dir"] / "tokenizer.json")
    for args in ((str(root / "bad_tokenizer.json"),), (good, str(root / "bad_tokenizer_config.json"))):
        try:
            t = ChatTokenizer.from_files(*args)
        except TemplateError:
            continue
        try:
            t.prompt_ids("hello")
        except TemplateError:
            pass


_TEMPLATE_PIECES = ["{{", "}}", "{%", "%}", "{#", "#}", " ", "for", "m", "in", "messages", "endfor", "if", "endif",
                    "else", "set", "x", "=", "'", '"', "(", ")", "[", "]", ".", "|", "tojson", "length", "content",
                    "role", "__class__", "__mro__", "__globals__", "__init__", "cycler", "joiner", "namespace",
                    "raise_exception", "format", "attr", "*", "**", "9999999", "1", "0", "-", "+", "~", ",", ":",
                    "loop", "index", "add_generation_prompt", "bos_token", "dict", "items", "strftime_now", "\n",
                    "lipsum", "self", "_TemplateReference__context", "__subclasses__", "mro", "__builtins__",
                    "import", "os", "system", "popen", "break", "continue", "macro", "call", "caller", "filter",
                    "map", "selectattr", "string", "pprint", "safe", "escape", "%", "%s"]


@fuzz(400)
@given(pieces=st.lists(st.sampled_from(_TEMPLATE_PIECES), max_size=30), tail=st.text(max_size=10))
def test_random_chat_templates(base, pieces, tail):
    """Random template text built from jinja syntax and sandbox-escape vocabulary: a string or a TemplateError,
    nothing else (no code runs: the marker file never appears)."""
    src = "".join(pieces) + tail
    try:
        out = render_template(src, [{"role": "user", "content": "hi"}], special_tokens={"bos_token": "<s>"})
    except TemplateError:
        return
    assert isinstance(out, str)


# ---------------------------------------------------------------------------------------------------------------
# generate() arguments


_NUMBERS = (st.none() | st.booleans() | st.integers(-5, 10) | _EDGE_INTS | st.floats(allow_nan=True)
            | st.sampled_from([0.0, 1e-300, 5e-324, 0.5, 1.0, 1.5, 1e300, float("inf"), float("nan")])
            | st.text(max_size=3) | st.sampled_from([np.int64(3), np.float32(0.7), np.bool_(True), [1], (0.5,)]))
_MESSAGE = st.dictionaries(st.sampled_from(["role", "content", "tool_calls", "name", "extra"]),
                           JSON | st.sampled_from(["user", "assistant", "system", "tool"]), max_size=3)
_PROMPT = (st.text(max_size=40) | st.lists(_MESSAGE, max_size=3) | JSON
           | st.sampled_from(["", "\ud800 lone surrogate", b"bytes", bytearray(b"x"), ("user", "hi"), 5, None]))


_ARGS = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "repeat_last_n", "seed", "do_sample",
         "stop", "system", "chat_template", "stream", "max_new_tokens"]
_VALID = {  # every value here is legal, extremes included
    "temperature": st.sampled_from([0, 0.0, 1e-300, 5e-324, 0.01, 1, 1.7, 1e300]) | st.floats(0, 1e300),
    "top_k": st.sampled_from([0, 1, 2, 511, 512, 513, 10 ** 30]) | st.integers(0, 600),
    "top_p": st.sampled_from([1e-300, 5e-324, 1e-17, 0.5, 1 - 1e-16, 1, 1.0]) | st.floats(5e-324, 1.0),
    "min_p": st.sampled_from([0, 0.0, 1e-300, 0.5, 1, 1.0]) | st.floats(0, 1),
    "repetition_penalty": st.sampled_from([1e-300, 5e-324, 0.5, 1, 1.3, 1e10, 1e300]) | st.floats(5e-324, 1e300),
    "repeat_last_n": st.sampled_from([0, 1, 5, 10 ** 30]),
    "seed": st.sampled_from([0, 1, 2 ** 32, 2 ** 64 - 1, 2 ** 64, 10 ** 30]),
    "do_sample": st.sampled_from([True, False, None, np.bool_(True)]),
}


@fuzz(300)
@example(args={"do_sample": True, "top_p": 1e-300}, max_new_tokens=2)  # an empty nucleus: IndexError before
@example(args={"do_sample": True, "temperature": 5e-324}, max_new_tokens=2)  # 1/t = inf, 0 * inf = NaN picks
@example(args={"do_sample": True, "repetition_penalty": 1e-300}, max_new_tokens=2)  # logits / 0 = inf
@given(args=st.fixed_dictionaries({}, optional=_VALID), max_new_tokens=st.integers(1, 6))
def test_extreme_but_valid_sampling_values(tiny_model, args, max_new_tokens):
    """Legal values at the edges of their ranges (temperature 5e-324, top_p 1e-300, a repetition penalty of
    1e300, seeds beyond 2**64): generation succeeds, with no warning turned error and no NaN pick."""
    r = tiny_model.generate("Tell me a story", max_new_tokens=max_new_tokens, **args)
    assert 1 <= len(r.token_ids) <= max_new_tokens
    assert all(0 <= t < tiny_model.config.vocab_size for t in r.token_ids)
    assert tiny_model._scheduler.consistent()


@fuzz(400)
@example(name="temperature", value=10 ** 400, data=None)  # OverflowError before
@example(name="repeat_last_n", value=None, data=None)  # an unnamed TypeError before
@given(name=st.sampled_from(_ARGS), value=_NUMBERS | JSON | st.lists(_NUMBERS, max_size=2), data=st.data())
def test_one_bad_argument_is_named(tiny_model, name, value, data):
    """One argument takes a random (usually wrong) value, the others are legal: the call works (when the value
    happens to be legal) or raises TypeError / ValueError naming that argument; nothing runs before the check."""
    args = {} if data is None else data.draw(st.fixed_dictionaries({}, optional={
        k: v for k, v in _VALID.items() if k != name}))
    args.setdefault("max_new_tokens", 3)
    args[name] = value
    m = tiny_model
    try:
        r = m.generate("Tell me a story", **args)
        if not isinstance(r, qwen_native.GenerationResult):
            "".join(r)
    except (TypeError, ValueError) as e:
        assert name in str(e), (name, value, e)
    assert m._scheduler.consistent() and m._scheduler.idle


@fuzz(300)
@example(prompt="\ud800", system=None, chat_template=False)  # tokenizers' "TextInputSequence must be str" before
@example(prompt=[{"role": "user", "content": "a \udfff b"}], system=None, chat_template=True)
@given(prompt=_PROMPT, system=st.none() | st.text(max_size=5), chat_template=st.booleans())
def test_random_prompts(tiny_model, prompt, system, chat_template):
    """Random prompts and message lists: a result, or TypeError / ValueError (TemplateError is one) saying what is
    wrong with the prompt."""
    m = tiny_model
    try:
        r = m.generate(prompt, system=system, chat_template=chat_template, max_new_tokens=2, do_sample=False)
    except (TypeError, ValueError) as e:
        assert str(e) and (not isinstance(e, QwenNativeError) or isinstance(e, TemplateError)), e
    else:
        assert 1 <= len(r.token_ids) <= 2
    assert m._scheduler.consistent() and m._scheduler.idle


_IDS = st.one_of(
    st.lists(st.integers(-2 ** 65, 2 ** 65), max_size=6),
    st.lists(st.integers(0, 511), min_size=1, max_size=6),
    st.builds(lambda v, dt: np.array(v).astype(dt, casting="unsafe"),
              st.lists(st.integers(-3, 600), min_size=1, max_size=5),
              st.sampled_from([np.int8, np.uint8, np.int32, np.uint32, np.int64, np.uint64, np.float32, np.bool_])),
    JSON, st.sampled_from([np.zeros((2, 2), dtype=np.int64), np.array([], dtype=np.int64), "abc", b"\x01\x02",
                           np.array([2 ** 63], dtype=np.uint64), [np.int64(5), 7], [1.0], [True]]),
)


@fuzz(300)
@given(ids=_IDS, tok=_IDS | st.integers(-2 ** 65, 2 ** 65))
def test_random_token_ids_into_the_core(tiny_model, ids, tok):
    """prefill / decode / decode_argmax of the native model with random ids: IndexError, TypeError or ValueError
    before anything runs (the KV cache length unchanged), or logits of the right shape."""
    core = tiny_model.core  # used directly while the model is idle: its scheduler resyncs its slots afterwards
    assert tiny_model._scheduler.idle
    try:
        core.reset()
        for call, arg in ((core.prefill, ids), (core.decode, tok), (core.decode_argmax, tok)):
            before = core.length
            try:
                out = call(arg)
            except (IndexError, TypeError, ValueError):
                assert core.length == before
                continue
            assert core.length > before
            if isinstance(out, np.ndarray):
                assert out.shape == (core.vocab_size,) and out.dtype == np.float32
            else:
                assert 0 <= out < core.vocab_size
    finally:
        core.reset()
