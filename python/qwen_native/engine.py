"""The user-facing model: load the files, tokenize the prompt, run the native core, pick tokens, stream text.

One :class:`Model` owns one native model and its KV cache. ``generate`` calls are serialized with a lock (the
native core serves one thread at a time). The KV cache is kept between calls: when a new prompt starts with the ids
already cached (the next turn of a conversation), only the new ids are prefilled.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Generator, Iterator, List, Literal, Optional, Sequence, Tuple, Union, overload

import numpy as np

from . import _core  # type: ignore[attr-defined]  # the compiled extension
from .chat import ChatTokenizer, Message
from .checkpoint import check_tensors, checkpoint_dtype, tensor_table
from .config import GenerationDefaults, Qwen2Config, load_config, load_generation_config
from .errors import ConfigError
from .hub import ModelFiles, resolve
from .sampling import Sampler, SamplingParams, check_sampling_args

__all__ = ["Model", "GenerationResult", "GenerationStream", "load", "generate", "clear_model_cache",
           "DEFAULT_MODEL", "DEFAULT_MAX_NEW_TOKENS"]

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
DEFAULT_MAX_NEW_TOKENS = 1024

Prompt = Union[str, Sequence[Message]]
PathLike = Union[str, "os.PathLike[str]"]

_DTYPES = {"float32": "float32", "f32": "float32", "fp32": "float32",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass
class GenerationResult:
    """What one ``generate`` call produced, with timings.

    ``token_ids`` are the generated ids (an EOS id that ended generation included); ``text`` is their text
    with special tokens left out and cut before a stop string. ``finish_reason`` is "stop" (EOS id or stop
    string) or "length" (max_new_tokens reached). ``prefill_tokens`` counts the prompt ids actually computed
    (``prompt_tokens`` minus ``cached_tokens`` reused from the previous call's KV cache); ``decode_tokens``
    counts single-token decode steps (every generated token after the first)."""

    text: str
    token_ids: List[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    prefill_tokens: int
    prefill_s: float
    prefill_tok_s: float
    decode_tokens: int
    decode_s: float
    decode_tok_s: float
    ttft_s: float
    total_s: float
    stop_string: Optional[str] = None

    def __str__(self) -> str:
        return self.text


class GenerationStream(Iterator[str]):
    """Iterator over the text pieces of a streaming ``generate`` call; ``"".join(pieces)`` is the final text.

    After the last piece, ``result`` holds the :class:`GenerationResult`. ``close()`` (or leaving a ``with``
    block, or dropping the stream) stops generation early and frees the model for the next call."""

    def __init__(self, model: "Model", plan: "_Plan"):
        self.result: Optional[GenerationResult] = None
        # A weak reference: the generator must not keep its stream alive (a cycle would hold the model's lock
        # until the garbage collector ran).
        self._gen = model._run(plan, weakref.ref(self))

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as stop:
            if stop.value is not None:
                self.result = stop.value
            raise StopIteration from None

    def close(self) -> None:
        """Stop generating; the model is free again."""
        self._gen.close()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class _Plan:
    ids: List[int]
    params: SamplingParams
    seed: Optional[int]
    max_new_tokens: int
    stops: Tuple[str, ...]
    eos: FrozenSet[int]
    t0: float


class _StopScanner:
    """Cuts the text before the first stop string, holding back only a tail that could start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.buf = ""
        self.hit: Optional[str] = None

    def feed(self, piece: str) -> Tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop string was found (then nothing more follows)."""
        if not self.stops:
            return piece, False
        self.buf += piece
        first, which = -1, None
        for s in self.stops:
            i = self.buf.find(s)
            if i != -1 and (first == -1 or i < first):
                first, which = i, s
        if first != -1:
            out, self.buf, self.hit = self.buf[:first], "", which
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.buf) - hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def finish(self) -> str:
        out, self.buf = self.buf, ""
        return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64)
    y = np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def _normalize_dtype(dtype: Optional[str]) -> Optional[str]:
    if dtype is None:
        return None
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a string such as \"bfloat16\" or \"float32\", got {type(dtype).__name__}")
    d = _DTYPES.get(dtype.strip().lower())
    if d is None:
        if dtype.strip().lower() in ("float16", "f16", "fp16", "half"):
            raise ValueError("dtype=\"float16\" is not supported; use \"bfloat16\" or \"float32\" (float16 "
                             "checkpoints are converted to float32 on the CPU)")
        raise ValueError(f"dtype must be \"bfloat16\" or \"float32\" (or None for automatic), got {dtype!r}")
    return d


def _check_device(device: str) -> str:
    if not isinstance(device, str):
        raise TypeError(f"device must be a string (\"cpu\" or \"cuda\"), got {type(device).__name__}")
    d = device.strip().lower()
    if d == "cpu" or d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
        return d
    raise ValueError(f"device must be \"cpu\", \"cuda\" or \"cuda:N\", got {device!r}")


def _optional_int(name: str, v: Any, minimum: int) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__} {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def _check_stops(stop: Union[None, str, Sequence[str]]) -> Tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    for s in items:
        if not isinstance(s, str):
            raise TypeError(f"stop must be a string or a list of strings, got an item of type {type(s).__name__}")
        if not s:
            raise ValueError("stop strings must not be empty")
    return tuple(dict.fromkeys(items))


class Model:
    """A loaded Qwen2 model: ``generate()`` runs chat or plain-text generation on it.

    Attributes: ``core`` (the native ``_core.Model``: prefill/decode/KV cache), ``config``
    (:class:`~qwen_native.config.Qwen2Config`), ``generation_config``
    (:class:`~qwen_native.config.GenerationDefaults`), ``tokenizer`` (:class:`~qwen_native.chat.ChatTokenizer`),
    ``files`` (where everything came from), ``load_s`` (seconds ``load`` took).

    Use :func:`qwen_native.load` to make one. One model serves one ``generate`` at a time; calls from several
    threads wait for each other."""

    def __init__(self, core: Any, config: Qwen2Config, generation_config: GenerationDefaults,
                 tokenizer: ChatTokenizer, *, files: Optional[ModelFiles] = None, name: Optional[str] = None,
                 load_s: float = 0.0):
        self.core = core
        self.config = config
        self.generation_config = generation_config
        self.tokenizer = tokenizer
        self.files = files
        self.name = name or (files.repo_id or files.directory if files is not None else "model")
        self.load_s = load_s
        eos = tuple(generation_config.eos_token_id)
        if not eos and tokenizer.eos_token_id is not None:
            eos = (tokenizer.eos_token_id,)
        self.eos_token_ids: Tuple[int, ...] = eos
        # Read once: the native model refuses even property reads while another thread is computing.
        self._max_context = int(core.max_context)
        self._cached: List[int] = []     # the ids whose keys/values are in core's KV cache, in order
        self._lock = threading.Lock()
        self._owner: Optional[int] = None
        self._stream_ref: Optional["weakref.ReferenceType[GenerationStream]"] = None

    # -- properties ------------------------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        return str(self.core.device)

    @property
    def dtype(self) -> str:
        return str(self.core.dtype)

    @property
    def max_context(self) -> int:
        """Positions in the KV cache: prompt + generated tokens must fit."""
        return self._max_context

    @property
    def num_threads(self) -> int:
        return int(self.core.num_threads)

    @property
    def closed(self) -> bool:
        return bool(self.core.closed)

    def __repr__(self) -> str:
        if self.closed:
            return f"<qwen_native.Model {self.name} (closed)>"
        return (f"<qwen_native.Model {self.name} device={self.device} dtype={self.dtype} "
                f"max_context={self.max_context} threads={self.num_threads}>")

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Free the weights and the KV cache now (an unfinished stream of this thread is stopped first)."""
        self._acquire()
        try:
            self.core.close()
            self._cached = []
        finally:
            self._release()

    # -- locking ----------------------------------------------------------------------------------------------------

    def _acquire(self, stream: Optional["weakref.ReferenceType[GenerationStream]"] = None) -> None:
        me = threading.get_ident()
        if not self._lock.acquire(blocking=False):
            if self._owner == me:
                # This thread holds the model through a stream it left unfinished: stop that stream.
                old = self._stream_ref() if self._stream_ref is not None else None
                if old is not None:
                    old.close()
                if not self._lock.acquire(blocking=False):
                    raise RuntimeError("this model is busy with an unfinished generate() in this thread")
            else:
                self._lock.acquire()
        self._owner = me
        self._stream_ref = stream

    def _release(self) -> None:
        self._owner = None
        self._stream_ref = None
        self._lock.release()

    # -- generation -------------------------------------------------------------------------------------------------

    @overload
    def generate(self, prompt: Prompt, *, max_new_tokens: Optional[int] = ..., temperature: Optional[float] = ...,
                 top_k: Optional[int] = ..., top_p: Optional[float] = ..., min_p: Optional[float] = ...,
                 repetition_penalty: Optional[float] = ..., repeat_last_n: int = ...,
                 do_sample: Optional[bool] = ..., seed: Optional[int] = ...,
                 stop: Union[None, str, Sequence[str]] = ..., stream: Literal[False] = ...,
                 system: Optional[str] = ..., chat_template: bool = ...) -> GenerationResult: ...

    @overload
    def generate(self, prompt: Prompt, *, max_new_tokens: Optional[int] = ..., temperature: Optional[float] = ...,
                 top_k: Optional[int] = ..., top_p: Optional[float] = ..., min_p: Optional[float] = ...,
                 repetition_penalty: Optional[float] = ..., repeat_last_n: int = ...,
                 do_sample: Optional[bool] = ..., seed: Optional[int] = ...,
                 stop: Union[None, str, Sequence[str]] = ..., stream: Literal[True],
                 system: Optional[str] = ..., chat_template: bool = ...) -> GenerationStream: ...

    def generate(self, prompt: Prompt, *, max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None, repeat_last_n: int = 0,
                 do_sample: Optional[bool] = None, seed: Optional[int] = None,
                 stop: Union[None, str, Sequence[str]] = None, stream: bool = False,
                 system: Optional[str] = None,
                 chat_template: bool = True) -> Union[GenerationResult, GenerationStream]:
        """Generate a reply to `prompt`: a string (one user turn) or a list of ``{"role", "content"}`` messages,
        rendered with the model's chat template (``chat_template=False``: the string is used as raw text).

        Decoding defaults come from the model's generation_config.json as transformers applies them; explicit
        arguments win. Sampling is on when ``do_sample=True``, or when `temperature` > 0 is passed and
        `do_sample` is not, or else when generation_config.json says ``do_sample``; greedy otherwise or with
        ``temperature=0``. `repetition_penalty` applies over the whole context (prompt included) or its last
        `repeat_last_n` ids. `seed` makes sampling repeatable. Generation ends at an EOS id of
        generation_config.json, at a `stop` string (the text is cut before it) or after `max_new_tokens`
        (default: generation_config's max_new_tokens, else 1024, at most what fits in ``max_context``; an
        explicit value that does not fit is a ValueError).

        Returns a :class:`GenerationResult`; with ``stream=True``, a :class:`GenerationStream` of text pieces.
        """
        if not isinstance(stream, bool):
            raise TypeError(f"stream must be True or False, got {stream!r}")
        plan = self._plan(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                          repeat_last_n=repeat_last_n, do_sample=do_sample, seed=seed, stop=stop, system=system,
                          chat_template=chat_template)
        if stream:
            return GenerationStream(self, plan)
        gen = self._run(plan, None)
        try:
            while True:
                next(gen)
        except StopIteration as done:
            return done.value
        finally:
            gen.close()  # on any exception (Ctrl-C included), free the model now, not when gen is collected

    def _plan(self, prompt: Prompt, *, max_new_tokens: Optional[int], temperature: Optional[float],
              top_k: Optional[int], top_p: Optional[float], min_p: Optional[float],
              repetition_penalty: Optional[float], repeat_last_n: int, do_sample: Optional[bool],
              seed: Optional[int], stop: Union[None, str, Sequence[str]], system: Optional[str],
              chat_template: bool) -> _Plan:
        t0 = time.perf_counter()
        if self.core.closed:
            raise RuntimeError("this model has been closed; load it again")
        if repeat_last_n is None:  # check_sampling_args takes None as "unset"; here 0 is the default
            raise TypeError("repeat_last_n must be an integer >= 0 (0 = the whole context), got None")
        check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, repeat_last_n=repeat_last_n, seed=seed,
                            max_new_tokens=max_new_tokens)
        if do_sample is not None and not isinstance(do_sample, (bool, np.bool_)):
            raise TypeError(f"do_sample must be True, False or None, got {do_sample!r}")
        stops = _check_stops(stop)
        gc = self.generation_config
        if do_sample is None:
            do_sample = temperature > 0 if temperature is not None else gc.do_sample
        params = SamplingParams(
            do_sample=do_sample,
            temperature=gc.temperature if temperature is None else temperature,
            top_k=gc.top_k if top_k is None else top_k,
            top_p=gc.top_p if top_p is None else top_p,
            min_p=(gc.min_p or 0.0) if min_p is None else min_p,
            repetition_penalty=gc.repetition_penalty if repetition_penalty is None else repetition_penalty,
            repeat_last_n=repeat_last_n)

        ids = self.tokenizer.prompt_ids(prompt, system=system, chat_template=chat_template)
        ctx = self.max_context
        if len(ids) >= ctx:
            raise ValueError(f"the prompt is {len(ids)} tokens but the model's context holds {ctx} (max_context); "
                             "shorten the prompt or load with a larger max_context")
        room = ctx - len(ids)
        if max_new_tokens is None:
            max_new = min(gc.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, room)
        else:
            max_new = int(max_new_tokens)
            if max_new > room:
                raise ValueError(f"the prompt ({len(ids)} tokens) + max_new_tokens ({max_new}) exceeds the "
                                 f"context of {ctx} tokens (max_context); lower max_new_tokens to at most {room} "
                                 "or load with a larger max_context")
        return _Plan(ids=ids, params=params, seed=None if seed is None else int(seed), max_new_tokens=max_new,
                     stops=stops, eos=frozenset(self.eos_token_ids), t0=t0)

    def _run(self, plan: _Plan, stream: Optional["weakref.ReferenceType[GenerationStream]"]
             ) -> Generator[str, None, GenerationResult]:
        """The generation loop: yields text pieces, returns the result."""
        self._acquire(stream)
        core = self.core
        try:
            ids = plan.ids
            params = plan.params
            # Reuse the cached prefix; at least the last prompt id is computed, for its logits.
            reuse = min(_common_prefix(self._cached, ids), len(ids) - 1)
            if core.length > reuse:
                core.truncate(reuse)
            del self._cached[reuse:]

            t = time.perf_counter()
            logits = core.prefill(ids[reuse:])
            self._cached = list(ids)
            prefill_s = time.perf_counter() - t

            fast_greedy = params.greedy and params.repetition_penalty == 1.0
            sampler = Sampler(params, plan.seed)
            context = np.empty(len(ids) + plan.max_new_tokens, dtype=np.int64)
            context[:len(ids)] = ids
            n = len(ids)
            tok = int(np.argmax(logits)) if fast_greedy else sampler(logits, context[:n], inplace=True)
            ttft_s = time.perf_counter() - plan.t0
            generated = [tok]
            context[n] = tok
            n += 1

            detok = self.tokenizer.stream()
            scanner = _StopScanner(plan.stops)
            parts: List[str] = []
            decode_s = 0.0
            steps = 0
            finish = "length"
            while True:
                if tok in plan.eos:
                    finish = "stop"
                    break
                piece = detok.push(tok)
                if piece:
                    out, hit = scanner.feed(piece)
                    if out:
                        parts.append(out)
                        yield out
                    if hit:
                        finish = "stop"
                        break
                if len(generated) >= plan.max_new_tokens:
                    break
                t = time.perf_counter()
                if fast_greedy:
                    nxt = int(core.decode_argmax(tok))
                    self._cached.append(tok)
                else:
                    logits = core.decode(tok)
                    self._cached.append(tok)
                    nxt = sampler(logits, context[:n], inplace=True)
                decode_s += time.perf_counter() - t
                steps += 1
                tok = nxt
                generated.append(tok)
                context[n] = tok
                n += 1

            if scanner.hit is None:
                out, hit = scanner.feed(detok.flush())
                if hit:
                    finish = "stop"
                else:
                    out += scanner.finish()
                if out:
                    parts.append(out)
                    yield out
            total_s = time.perf_counter() - plan.t0
            prefill_n = len(ids) - reuse
            return GenerationResult(
                text="".join(parts), token_ids=generated, finish_reason=finish, prompt_tokens=len(ids),
                cached_tokens=reuse, prefill_tokens=prefill_n, prefill_s=prefill_s,
                prefill_tok_s=prefill_n / prefill_s if prefill_s > 0 else 0.0, decode_tokens=steps,
                decode_s=decode_s, decode_tok_s=steps / decode_s if decode_s > 0 else 0.0, ttft_s=ttft_s,
                total_s=total_s, stop_string=scanner.hit)
        finally:
            # An exception or Ctrl-C can land between a native call and the bookkeeping after it: if the two
            # disagree, start from an empty cache rather than a wrong one.
            try:
                if not core.closed and core.length != len(self._cached):
                    core.reset()
                    self._cached = []
            except Exception:
                self._cached = []
            finally:
                self._release()


# ---------------------------------------------------------------------------------------------------------------
# Loading and the module-level generate()


def load(model: PathLike, *, revision: Optional[str] = None, device: str = "cpu", dtype: Optional[str] = None,
         max_context: Optional[int] = None, num_threads: Optional[int] = None,
         local_files_only: Optional[bool] = None, cache_dir: Optional[PathLike] = None,
         token: Union[str, bool, None] = None) -> Model:
    """Load a Qwen2 chat model: `model` is a Hub repo id (at `revision`; files are downloaded into the Hugging
    Face cache as needed) or a local directory with config.json, tokenizer.json and safetensors weights.

    `dtype` None picks: on the CPU the checkpoint's own dtype when it is bfloat16 (weights stay bf16, sums in
    float32; prompt matmuls take bf16-rounded inputs where the CPU has AVX512-BF16), else float32; on CUDA
    bfloat16. "float32" is float32 throughout. `max_context` is the KV cache size in tokens (None or 0:
    min(max_position_embeddings, 4096)); `num_threads` the CPU threads (None or 0: all this process may use).
    `local_files_only` (default: HF_HUB_OFFLINE) never touches the network."""
    t0 = time.perf_counter()
    device = _check_device(device)
    dt = _normalize_dtype(dtype)
    max_context = _optional_int("max_context", max_context, 0) or None  # 0 = the default, as in _core
    num_threads = _optional_int("num_threads", num_threads, 0)
    if local_files_only is not None and not isinstance(local_files_only, bool):
        raise TypeError(f"local_files_only must be True, False or None, got {local_files_only!r}")

    files = resolve(model, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir, token=token)
    config = load_config(files.config)
    gen = load_generation_config(files.generation_config, config)
    tokenizer = ChatTokenizer.from_files(files.tokenizer, files.tokenizer_config, files.chat_template)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"tokenizer.json has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
                          f"{config.vocab_size}: the tokenizer does not belong to these weights")
    if max_context is not None and max_context > config.max_position_embeddings:
        raise ValueError(f"max_context={max_context} is beyond the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    table = tensor_table(files.weights)
    check_tensors(table, config)
    if dt is None:
        if device == "cpu":
            dt = "bfloat16" if checkpoint_dtype(table) == "BF16" else "float32"
        else:
            dt = "bfloat16"
    core = _core.Model(config.to_core_dict(), table, dtype=dt, device=device, max_context=max_context or 0,
                       num_threads=num_threads or 0)
    name = files.repo_id or os.fspath(model)
    return Model(core, config, gen, tokenizer, files=files, name=name, load_s=time.perf_counter() - t0)


_CACHE_LOCK = threading.Lock()
_MODEL_CACHE: Dict[Tuple[Any, ...], Model] = {}


def clear_model_cache() -> None:
    """Close and forget the models that :func:`generate` loaded and kept."""
    with _CACHE_LOCK:
        models = list({id(m): m for m in _MODEL_CACHE.values()}.values())
        _MODEL_CACHE.clear()
    for m in models:
        try:
            m.close()
        except Exception:
            pass


def _cached_model(model: PathLike, *, revision: Optional[str], device: str, dtype: Optional[str],
                  max_context: Optional[int], num_threads: Optional[int], local_files_only: Optional[bool],
                  cache_dir: Optional[PathLike], token: Union[str, bool, None]) -> Model:
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a Hub repo id, a local directory or a qwen_native.Model, got "
                        f"{type(model).__name__}")
    name = os.fspath(model)
    is_dir = os.path.isdir(name)
    request = ("request", os.path.abspath(name) if is_dir else name, revision,
               os.fspath(cache_dir) if cache_dir is not None else None, _check_device(device),
               _normalize_dtype(dtype), max_context, num_threads)
    with _CACHE_LOCK:
        hit = _MODEL_CACHE.get(request)
        if hit is not None and not hit.closed:
            return hit
        m = load(model, revision=revision, device=device, dtype=dtype, max_context=max_context,
                 num_threads=num_threads, local_files_only=local_files_only, cache_dir=cache_dir, token=token)
        assert m.files is not None
        resolved = ("resolved", os.path.realpath(m.files.directory), m.device, m.dtype, m.max_context,
                    m.num_threads)
        same = _MODEL_CACHE.get(resolved)
        if same is not None and not same.closed:  # the same files under another name: keep the first
            m.close()
            m = same
        _MODEL_CACHE[resolved] = m
        _MODEL_CACHE[request] = m
        return m


@overload
def generate(prompt: Prompt, model: Union[PathLike, Model] = ..., *, max_new_tokens: Optional[int] = ...,
             temperature: Optional[float] = ..., top_k: Optional[int] = ..., top_p: Optional[float] = ...,
             min_p: Optional[float] = ..., repetition_penalty: Optional[float] = ..., repeat_last_n: int = ...,
             do_sample: Optional[bool] = ..., seed: Optional[int] = ..., stop: Union[None, str, Sequence[str]] = ...,
             stream: Literal[False] = ..., system: Optional[str] = ..., chat_template: bool = ...,
             device: str = ..., dtype: Optional[str] = ..., revision: Optional[str] = ...,
             max_context: Optional[int] = ..., num_threads: Optional[int] = ...,
             local_files_only: Optional[bool] = ..., cache_dir: Optional[PathLike] = ...,
             token: Union[str, bool, None] = ...) -> GenerationResult: ...


@overload
def generate(prompt: Prompt, model: Union[PathLike, Model] = ..., *, max_new_tokens: Optional[int] = ...,
             temperature: Optional[float] = ..., top_k: Optional[int] = ..., top_p: Optional[float] = ...,
             min_p: Optional[float] = ..., repetition_penalty: Optional[float] = ..., repeat_last_n: int = ...,
             do_sample: Optional[bool] = ..., seed: Optional[int] = ..., stop: Union[None, str, Sequence[str]] = ...,
             stream: Literal[True], system: Optional[str] = ..., chat_template: bool = ...,
             device: str = ..., dtype: Optional[str] = ..., revision: Optional[str] = ...,
             max_context: Optional[int] = ..., num_threads: Optional[int] = ...,
             local_files_only: Optional[bool] = ..., cache_dir: Optional[PathLike] = ...,
             token: Union[str, bool, None] = ...) -> GenerationStream: ...


def generate(prompt: Prompt, model: Union[PathLike, Model] = DEFAULT_MODEL, *,
             max_new_tokens: Optional[int] = None, temperature: Optional[float] = None, top_k: Optional[int] = None,
             top_p: Optional[float] = None, min_p: Optional[float] = None,
             repetition_penalty: Optional[float] = None, repeat_last_n: int = 0, do_sample: Optional[bool] = None,
             seed: Optional[int] = None, stop: Union[None, str, Sequence[str]] = None, stream: bool = False,
             system: Optional[str] = None, chat_template: bool = True, device: str = "cpu",
             dtype: Optional[str] = None, revision: Optional[str] = None, max_context: Optional[int] = None,
             num_threads: Optional[int] = None, local_files_only: Optional[bool] = None,
             cache_dir: Optional[PathLike] = None,
             token: Union[str, bool, None] = None) -> Union[GenerationResult, GenerationStream]:
    """Generate a reply to `prompt` (a string, or a list of ``{"role", "content"}`` messages) with `model` (a
    Hub repo id, a local directory, or a loaded :class:`Model`).

    The model is loaded on first use and kept: a second call with the same model, device, dtype, max_context
    and num_threads does not load it again (:func:`clear_model_cache` frees them). The loading arguments are
    those of :func:`load`; the generation arguments those of :meth:`Model.generate`. Returns a
    :class:`GenerationResult`, or with ``stream=True`` an iterator of text pieces."""
    if isinstance(model, Model):
        m = model
    else:
        m = _cached_model(model, revision=revision, device=device, dtype=dtype, max_context=max_context,
                          num_threads=num_threads, local_files_only=local_files_only, cache_dir=cache_dir,
                          token=token)
    return m.generate(  # type: ignore[call-overload,misc]
        prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, repeat_last_n=repeat_last_n, do_sample=do_sample, seed=seed,
        stop=stop, stream=stream, system=system, chat_template=chat_template)
