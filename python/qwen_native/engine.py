"""The user-facing model: load the files, tokenize the prompt, hand the request to the model's scheduler, stream
its text back.

One :class:`Model` owns one native model, whose KV cache has a slot per sequence that can run at once
(``max_batch``). ``generate`` may be called from any number of threads (or from asyncio through a thread): each call
is a request in the model's queue (scheduler.py), batched with the others step by step, and the KV cache is kept
between calls: a prompt that starts with ids a slot already holds (the next turn of a conversation) only prefills
the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union, overload

import numpy as np

from . import _core  # the compiled extension (types: _core.pyi)
from .chat import ChatTokenizer, Message
from .checkpoint import check_tensors, checkpoint_dtype, tensor_table
from .config import GenerationDefaults, Qwen2Config, load_config, load_generation_config
from .errors import ConfigError
from .generation import DEFAULT_MAX_NEW_TOKENS, GenerationOptions, TokenLogprob
from .hub import ModelFiles, resolve
from .sampling import SamplingParams
from .scheduler import Outcome, Request, Scheduler
from .grammar import Constraint, GrammarCompiler, constraint_grammar
from .speculative import DraftModel, PromptLookup
from .tools import TOOL_CALL_START, check_tool_choice, check_tools, tool_answer, tool_call_grammar

__all__ = ["Model", "GenerationResult", "GenerationStream", "GenerationOptions", "load", "generate",
           "clear_model_cache", "DEFAULT_MODEL", "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_MAX_BATCH"]

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
DEFAULT_MAX_BATCH = 16  # the most sequences at once (KV cache slots) that load() picks by itself
_STORED_BYTES = {"float32": 4.0, "bfloat16": 2.0, "int8": 33 / 32, "int4": 18 / 32}  # per weight, with scales

Prompt = Union[str, Sequence[Message]]
PathLike = Union[str, "os.PathLike[str]"]

_DTYPES = {"float32": "float32", "f32": "float32", "fp32": "float32",
           "bfloat16": "bfloat16", "bf16": "bfloat16", "int8": "int8", "int4": "int4"}
# Quantized dtypes keep the tensors that quantization hurts most wider: the embedding (and the lm_head, often the
# same matrix) in int6 when the rest is int4, as llama.cpp's Q4 files keep theirs in Q6_K.
_WIDER = {"int4": [("model.embed_tokens.weight", "int6"), ("lm_head.weight", "int6")]}


@dataclass
class GenerationResult:
    """What one ``generate`` call produced, with timings.

    ``token_ids`` are the generated ids (an EOS id that ended generation included); ``text`` is their text
    with special tokens left out and cut before a stop string. ``finish_reason`` is "stop" (EOS id or stop
    string) or "length" (max_new_tokens reached). ``prefill_tokens`` counts the prompt ids actually computed
    (``prompt_tokens`` minus ``cached_tokens`` reused from an earlier call's KV cache); ``decode_tokens``
    counts single-token decode steps (every generated token after the first). Times are wall-clock seconds of the
    passes this generation took part in (shared with whatever ran beside it)."""

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
    logprobs: Optional[List[TokenLogprob]] = None  # with logprobs=True: one per generated token
    decode_passes: int = 0  # forward passes after the first token (fewer than decode_tokens with speculation)
    proposed_tokens: int = 0  # speculative decoding: ids proposed (by prompt lookup or the assistant model)
    accepted_tokens: int = 0  # of which the model confirmed
    # With tools: the calls the answer made, in OpenAI's shape ({"id", "type": "function", "function": {"name",
    # "arguments": <JSON text>}}); `text` is then what was written outside them, and finish_reason "tool_calls".
    tool_calls: Optional[List[Dict[str, Any]]] = None

    def __str__(self) -> str:
        return self.text

    @classmethod
    def _of(cls, o: Outcome, tools: bool = False) -> "GenerationResult":
        """The result of an outcome; `tools`: read tool calls out of its text."""
        prefill_n = o.prompt_tokens - o.cached_tokens
        text, finish, calls = o.text, o.finish_reason, None
        if tools:
            content, found, finish = tool_answer(o.text, o.finish_reason)
            if found:
                text, calls = content or "", found
        return cls(text=text, token_ids=o.token_ids, finish_reason=finish, prompt_tokens=o.prompt_tokens,
                   cached_tokens=o.cached_tokens, prefill_tokens=prefill_n, prefill_s=o.prefill_s,
                   prefill_tok_s=prefill_n / o.prefill_s if o.prefill_s > 0 else 0.0, decode_tokens=o.decode_tokens,
                   decode_s=o.decode_s, decode_tok_s=o.decode_tokens / o.decode_s if o.decode_s > 0 else 0.0,
                   ttft_s=o.ttft_s, total_s=o.total_s, stop_string=o.stop_string, logprobs=o.logprobs,
                   decode_passes=o.decode_passes, proposed_tokens=o.proposed, accepted_tokens=o.accepted,
                   tool_calls=calls)


class GenerationStream(Iterator[str]):
    """Iterator over the text pieces of a streaming ``generate`` call; ``"".join(pieces)`` is the final text.

    After the last piece, ``result`` holds the :class:`GenerationResult`. ``close()`` (or leaving a ``with``
    block, or dropping the stream) stops the generation and frees its place in the model at once. Ctrl-C while
    waiting for a piece stops it too. The model generates ahead of a slow reader; other calls never wait for it."""

    def __init__(self, model: "Model", request: Request):
        self.result: Optional[GenerationResult] = None
        self._model = model  # kept alive while its stream is read: load(...).generate(..., stream=True) works
        self._request = request
        self._closed = False
        # Dropping the stream cancels its request (the scheduler holds the request, never the stream).
        self._finalizer = weakref.finalize(self, request.cancel)

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> str:
        while not self._closed:
            try:
                piece = self._request.next_piece()
            except BaseException:
                self._request.cancel()  # Ctrl-C while waiting, or the generation failed
                raise
            if piece is None:
                if self._request.outcome is not None and self.result is None:
                    self.result = GenerationResult._of(self._request.outcome, self._request.tools)
                break
            if piece.text:  # a step may complete no character yet
                return piece.text
        raise StopIteration

    def close(self) -> None:
        """Stop generating; the model is free of this call at once. Nothing more comes from the stream."""
        self._closed = True
        self._request.cancel()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
        raise ValueError(f"dtype must be \"bfloat16\", \"float32\", \"int8\" or \"int4\" (or None for automatic), "
                         f"got {dtype!r}")
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
    if isinstance(v, bool) or not isinstance(v, int) and not hasattr(v, "__index__"):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__} {v!r}")
    v = int(v.__index__())
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


class Model:
    """A loaded Qwen2 model: ``generate()`` runs chat or plain-text generation on it.

    Attributes: ``core`` (the native ``_core.Model``: forward passes over the KV cache), ``config``
    (:class:`~qwen_native.config.Qwen2Config`), ``generation_config``
    (:class:`~qwen_native.config.GenerationDefaults`), ``tokenizer`` (:class:`~qwen_native.chat.ChatTokenizer`),
    ``files`` (where everything came from), ``load_s`` (seconds ``load`` took).

    Use :func:`qwen_native.load` to make one. Any number of threads may call ``generate`` at once: up to
    ``max_batch`` sequences run together, later ones wait for a free slot."""

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
        # Read once: the native model refuses even property reads while the scheduler computes.
        self._max_context = int(core.max_context)
        self._max_batch = int(core.num_slots) - 1  # the last slot is logits()'s
        self._scheduler = Scheduler(core, tokenizer, scoring_slot=True)
        self._vocab_digest: Optional[str] = None
        self._compiler: Optional[GrammarCompiler] = None
        self._compiler_lock = threading.Lock()
        self._scheduler_params = SamplingParams()  # scoring requests sample nothing
        # A model dropped without close() still stops its scheduler thread (which holds the core, not the model).
        weakref.finalize(self, self._scheduler.close)

    # -- properties ------------------------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        return str(self.core.device)

    @property
    def dtype(self) -> str:
        return str(self.core.dtype)

    @property
    def max_context(self) -> int:
        """Positions of a sequence in the KV cache: prompt + generated tokens must fit."""
        return self._max_context

    @property
    def max_batch(self) -> int:
        """Sequences that run at once (slots of the KV cache)."""
        return self._max_batch

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
                f"max_context={self.max_context} max_batch={self.max_batch} threads={self.num_threads}>")

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Free the weights and the KV cache now (again: nothing happens). Generations still running end with
        RuntimeError."""
        self._scheduler.close()
        if not self.core.closed:
            self.core.close()

    # -- generation -------------------------------------------------------------------------------------------------

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """The float32 logits of every position of `ids` (a list of token ids), shape (len(ids), vocab_size),
        computed from an empty cache in a slot of its own: the generation cache is not touched. For evaluation
        (perplexity, KL divergence between dtypes)."""
        if self.closed:
            raise RuntimeError("this model has been closed")
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            raise TypeError(f"ids must be a sequence of token ids, got {type(ids).__name__}")
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
            raise ValueError("ids must be a non-empty 1-D sequence of integer token ids")
        if arr.size > self.max_context:
            raise ValueError(f"{arr.size} ids do not fit in the context of {self.max_context} tokens (max_context)")
        if int(arr.min()) < 0 or int(arr.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        request = Request([int(t) for t in arr], self._scheduler_params, None, 1, (), frozenset(), False,
                          time.perf_counter(), score=True)
        self._scheduler.submit(request)
        try:
            out = request.wait()
        except BaseException:
            request.cancel()
            raise
        assert out.logits is not None
        return out.logits


    @overload
    def generate(self, prompt: Prompt, options: Optional[GenerationOptions] = None, *,
                 stream: Literal[False] = False, **kwargs: Any) -> GenerationResult: ...

    @overload
    def generate(self, prompt: Prompt, options: Optional[GenerationOptions] = None, *, stream: Literal[True],
                 **kwargs: Any) -> GenerationStream: ...

    def generate(self, prompt: Prompt, options: Optional[GenerationOptions] = None, *, stream: bool = False,
                 **kwargs: Any) -> Union[GenerationResult, GenerationStream]:
        """Generate a reply to `prompt`: a string (one user turn) or a list of ``{"role", "content"}`` messages,
        rendered with the model's chat template (``chat_template=False``: the string is used as raw text).

        The generation arguments are those of :class:`~qwen_native.generation.GenerationOptions`, given as
        keywords (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
        ``repeat_last_n``, ``do_sample``, ``seed``, ``stop``, ``system``, ``chat_template``, ``logprobs``,
        ``prompt_lookup_num_tokens``, ``assistant_model``, ``response_format``, ``tools``, ``tool_choice``, ...) or
        as an `options` object (keywords win). Defaults come from the model's generation_config.json as
        transformers applies them; sampling is on when ``do_sample=True``, or when `temperature` > 0 is passed and
        `do_sample` is not; ``temperature=0`` is greedy.

        Returns a :class:`GenerationResult`, or with ``stream=True`` a :class:`GenerationStream` of text pieces.
        Raises ValueError / TypeError naming a bad argument, and ValueError when the prompt plus
        ``max_new_tokens`` does not fit in ``max_context``."""
        if not isinstance(stream, bool):
            raise TypeError(f"stream must be True or False, got {stream!r}")
        request = self._submit(prompt, GenerationOptions.from_kwargs(options, **kwargs), stream=stream)
        if stream:
            return GenerationStream(self, request)
        try:
            return GenerationResult._of(request.wait(), request.tools)
        except BaseException:
            request.cancel()  # Ctrl-C while waiting: the generation stops too
            raise

    def generate_batch(self, prompts: Sequence[Prompt], options: Optional[GenerationOptions] = None,
                       **kwargs: Any) -> List[GenerationResult]:
        """Generate a reply to every prompt of a list (strings or message lists), all through the model's queue at
        once (up to ``max_batch`` running together), for offline jobs; the results in the order of the prompts.
        The options are those of :meth:`generate` and apply to every prompt."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
        opts = GenerationOptions.from_kwargs(options, **kwargs)
        requests: List[Request] = []
        try:
            for p in prompts:  # every prompt checked and queued before any result is awaited
                requests.append(self._submit(p, opts, stream=False))
            return [GenerationResult._of(r.wait(), r.tools) for r in requests]
        except BaseException:
            for r in requests:
                r.cancel()
            raise

    def _submit(self, prompt: Prompt, opts: GenerationOptions, *, stream: bool, seed_offset: int = 0) -> Request:
        """Check, tokenize and queue one generation (the server calls this too)."""
        t0 = time.perf_counter()
        if self.closed:
            raise RuntimeError("this model has been closed")
        params = opts.sampling(self.generation_config)
        tools = check_tools(opts.tools)
        choice = check_tool_choice(opts.tool_choice, tools)
        ids = self.tokenizer.prompt_ids(prompt, system=opts.system, chat_template=opts.chat_template,
                                        tools=tools if choice != "none" else None)
        max_new = opts.max_new(self.generation_config, len(ids), self.max_context)
        constraint = self._constraint(opts, tools, choice)
        request = Request(ids, params, None if opts.seed is None else int(opts.seed) + seed_offset, max_new,
                          opts.stop or (), frozenset(self.eos_token_ids), stream, t0,
                          logprobs=opts.top_logprobs if opts.logprobs else None)
        request.constraint = constraint
        request.tools = choice != "none"
        if opts.assistant_model is not None and opts.prompt_lookup_num_tokens:
            raise ValueError("pass either assistant_model or prompt_lookup_num_tokens, not both")
        if opts.prompt_lookup_num_tokens:
            request.proposer = PromptLookup(opts.prompt_lookup_num_tokens, opts.max_matching_ngram_size or 2)
        elif opts.assistant_model is not None:
            request.proposer = self._draft(opts.assistant_model, params, request, opts.num_assistant_tokens or 8)
        self._scheduler.submit(request)
        return request

    def _draft(self, draft: Any, params: SamplingParams, request: Request, max_tokens: int) -> DraftModel:
        """The proposer for ``assistant_model=draft``: its requests generate from the same ids with the same
        sampling parameters, stopping at this model's EOS ids."""
        self._check_draft(draft)
        eos, sample = request.eos, not params.greedy

        def make(ids: List[int], k: int, seed: Optional[int]) -> Request:
            return Request(ids, params, seed, k, (), eos, False, time.perf_counter(), distributions=sample)

        return DraftModel(draft._scheduler.submit, make, max_tokens, draft.max_context, seed=request.seed)

    def _constraint(self, opts: GenerationOptions, tools: List[Dict[str, Any]], choice: Any) -> Optional[Constraint]:
        """The grammar a generation must follow: forced tool calls, else the response_format's; None for free
        text."""
        grammar = tool_call_grammar(tools, choice, bool(opts.parallel_tool_calls),
                                    tag_tokens=self.tokenizer.token_to_id(TOOL_CALL_START) is not None)
        argument = "tool_choice"
        if grammar is None and opts.response_format is not None:
            grammar, argument = constraint_grammar(opts.response_format), "response_format"
        if grammar is None:
            return None
        if not self.eos_token_ids:
            raise ValueError(f"{argument} needs the model's end-of-sequence ids, to end the answer where the grammar "
                             "does; this model has none (set eos_token_id in generation_config.json)")
        with self._compiler_lock:  # built once per model: llguidance's view of the vocabulary takes 1-2 s
            if self._compiler is None:
                self._compiler = GrammarCompiler(self.tokenizer, self.config.vocab_size, self.eos_token_ids)
        return self._compiler.compile(grammar, argument=argument)

    def _check_draft(self, draft: Any) -> None:
        """ValueError / TypeError unless `draft` can propose tokens for this model."""
        if not isinstance(draft, Model):
            raise TypeError(f"assistant_model must be a loaded qwen_native.Model, got {type(draft).__name__}")
        if draft is self:
            raise ValueError("assistant_model is this model itself; pass a smaller model with the same tokenizer")
        if draft.closed:
            raise ValueError("assistant_model has been closed")
        if draft._vocabulary_digest() != self._vocabulary_digest():
            raise ValueError(f"assistant_model {draft.name} has a different tokenizer vocabulary from {self.name}; "
                             "a draft model must share the target's tokenizer (e.g. Qwen2.5-0.5B-Instruct for any "
                             "Qwen2.5 model)")

    def _vocabulary_digest(self) -> str:
        """A digest of the tokenizer's vocabulary and the model's (padded) vocabulary size: equal digests mean
        two models agree on what every id is."""
        if self._vocab_digest is None:
            vocab = sorted(self.tokenizer.backend.get_vocab(with_added_tokens=True).items())
            text = json.dumps([self.config.vocab_size, vocab], ensure_ascii=False)
            self._vocab_digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return self._vocab_digest


# ---------------------------------------------------------------------------------------------------------------
# Loading and the module-level generate()


def _available_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_max_batch(config: Any, table: Sequence[Any], device: str, dtype: str,
                      max_context: Optional[int]) -> int:
    """The sequences a model runs at once when load() is not told: as many KV cache slots of `max_context` positions
    as half the memory left after the weights holds, between 1 and DEFAULT_MAX_BATCH (16: the 1.5B at 4K context
    on a 24 GiB machine gets 16). CUDA, whose free memory the Python layer cannot see, gets DEFAULT_MAX_BATCH; the
    core's memory check at load still names what does not fit."""
    avail = _available_memory() if device == "cpu" else None
    if avail is None:
        return DEFAULT_MAX_BATCH
    ctx = max_context or min(config.max_position_embeddings, 4096)
    slot = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * ctx * 4  # float32 K and V
    weights = sum(int(np.prod(e[3])) * (_STORED_BYTES[dtype] if len(e[3]) == 2 else 4.0) for e in table)
    return max(1, min(DEFAULT_MAX_BATCH, int((avail - weights) / 2 // slot)))


def load(model: PathLike, *, revision: Optional[str] = None, device: str = "cpu", dtype: Optional[str] = None,
         max_context: Optional[int] = None, max_batch: Optional[int] = None, num_threads: Optional[int] = None,
         local_files_only: Optional[bool] = None, cache_dir: Optional[PathLike] = None,
         token: Union[str, bool, None] = None) -> Model:
    """Load a Qwen2 chat model: `model` is a Hub repo id (at `revision`; files are downloaded into the Hugging
    Face cache as needed) or a local directory with config.json, tokenizer.json and safetensors weights.

    `dtype` None picks: on the CPU the checkpoint's own dtype when it is bfloat16 (weights stay bf16, sums in
    float32; prompt matmuls take bf16-rounded inputs where the CPU has AVX512-BF16), else float32; on CUDA
    bfloat16. "float32" is float32 throughout. "int8" and "int4" quantize the weights at load, in groups of
    32 with each group's step an 8-bit code relative to its row's (int8: 8.25 bits per weight; int4: with a zero
    point, 4.5 bits per weight, the embedding and lm_head in 6 bits, 6.25 per weight);
    activations stay float32. `max_context` is the KV cache size of a sequence in tokens (None or 0:
    min(max_position_embeddings, 4096)); `max_batch` how many sequences run at once, each with its own KV cache
    (None: sized by :func:`default_max_batch`); `num_threads` the CPU threads (None or 0: all this process may
    use). `local_files_only` (default: HF_HUB_OFFLINE) never touches the network."""
    t0 = time.perf_counter()
    device = _check_device(device)
    dt = _normalize_dtype(dtype)
    max_context = _optional_int("max_context", max_context, 0) or None  # 0 = the default, as in _core
    max_batch = _optional_int("max_batch", max_batch, 1)
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
    if max_batch is None:
        max_batch = default_max_batch(config, table, device, dt, max_context)
    present = {entry[0] for entry in table}
    wider = {name: f for name, f in _WIDER.get(dt, []) if name in present}
    # One KV slot per sequence, plus one for Model.logits, which never touches the generation slots.
    core = _core.Model(config.to_core_dict(), table, dtype=dt, device=device, max_context=max_context or 0,
                       num_threads=num_threads or 0, num_slots=max_batch + 1,
                       weight_formats=wider)
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


def _cached_model(model: PathLike, **load_args: Any) -> Model:
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a Hub repo id, a local directory or a qwen_native.Model, got "
                        f"{type(model).__name__}")
    name = os.fspath(model)
    is_dir = os.path.isdir(name)
    a = load_args
    request = ("request", os.path.abspath(name) if is_dir else name, a["revision"],
               os.fspath(a["cache_dir"]) if a["cache_dir"] is not None else None, _check_device(a["device"]),
               _normalize_dtype(a["dtype"]), a["max_context"], a["max_batch"], a["num_threads"])
    with _CACHE_LOCK:
        hit = _MODEL_CACHE.get(request)
        if hit is not None and not hit.closed:
            return hit
        m = load(model, **load_args)
        assert m.files is not None
        resolved = ("resolved", os.path.realpath(m.files.directory), m.device, m.dtype, m.max_context,
                    m.max_batch, m.num_threads)
        same = _MODEL_CACHE.get(resolved)
        if same is not None and not same.closed:  # the same files under another name: keep the first
            m.close()
            m = same
        _MODEL_CACHE[resolved] = m
        _MODEL_CACHE[request] = m
        return m


def generate(prompt: Prompt, model: Union[PathLike, Model] = DEFAULT_MODEL, options: Optional[GenerationOptions] = None,
             *, stream: bool = False, device: str = "cpu", dtype: Optional[str] = None, revision: Optional[str] = None,
             max_context: Optional[int] = None, max_batch: Optional[int] = None, num_threads: Optional[int] = None,
             local_files_only: Optional[bool] = None, cache_dir: Optional[PathLike] = None,
             token: Union[str, bool, None] = None, **kwargs: Any) -> Union[GenerationResult, GenerationStream]:
    """Generate a reply to `prompt` (a string, or a list of ``{"role", "content"}`` messages) with `model` (a
    Hub repo id, a local directory, or a loaded :class:`Model`).

    The model is loaded on first use and kept: a second call with the same model, device, dtype, max_context,
    max_batch and num_threads does not load it again (:func:`clear_model_cache` frees them). The loading
    arguments are those of :func:`load`; the generation arguments (`options` and the other keywords) those of
    :meth:`Model.generate`. Returns a :class:`GenerationResult`, or with ``stream=True`` an iterator of text
    pieces."""
    if isinstance(model, Model):
        m = model
    else:
        m = _cached_model(model, revision=revision, device=device, dtype=dtype, max_context=max_context,
                          max_batch=max_batch, num_threads=num_threads, local_files_only=local_files_only,
                          cache_dir=cache_dir, token=token)
    return m.generate(prompt, options, stream=stream, **kwargs)  # type: ignore[call-overload]
