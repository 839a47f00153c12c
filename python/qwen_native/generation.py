"""What one generation asks for and how its text is assembled: :class:`GenerationOptions` (the arguments of
``generate``, checked once) and :class:`TextAssembler` (generated ids in, UTF-8-safe text out, cut at EOS ids and
stop strings). The scheduler (scheduler.py) runs many of these side by side; nothing here touches the model."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, FrozenSet, Optional, Sequence, Tuple, Union

import numpy as np

from .config import GenerationDefaults
from .errors import ContextLengthError
from .sampling import SamplingParams, check_sampling_args
from .speculative import MAX_PROPOSED

__all__ = ["GenerationOptions", "TextAssembler", "StopScanner", "TokenLogprob", "Piece"]

DEFAULT_MAX_NEW_TOKENS = 1024


@dataclass(frozen=True)
class GenerationOptions:
    """The arguments of ``generate`` (checked when made; None means the model's default from
    generation_config.json, completed as transformers completes it).

    - ``max_new_tokens``: at most this many generated tokens (default: generation_config.json's, else 1024, in
      either case no more than fits in the context).
    - ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``: the sampling processors, in
      transformers' order and meaning; ``repeat_last_n`` > 0 applies the repetition penalty to the last n ids only.
    - ``do_sample``: sample (True) or pick the most likely token (False). None: sample when ``temperature`` > 0 is
      passed, else as generation_config.json says; ``temperature=0`` is greedy.
    - ``presence_penalty``, ``frequency_penalty``: OpenAI's, in [-2, 2]: a generated token's logit is lowered by
      the first once it has appeared, by the second per appearance.
    - ``seed``: makes sampling repeatable.
    - ``logprobs``: report each generated token's log-probability (log-softmax of the logits after the penalties
      and the temperature, before top-k / top-p / min-p) and ``top_logprobs`` (0-20) alternatives with theirs.
    - ``prompt_lookup_num_tokens``: speculative decoding by prompt lookup (transformers' name): up to this many
      (1-64) ids proposed per step from an earlier occurrence of the last ``max_matching_ngram_size`` (default 2)
      ids, verified in one pass. Greedy tokens are exactly those of plain greedy decoding; when sampling,
      proposals are accepted by the speculative-sampling rule, so the tokens are distributed exactly as without
      them.
    - ``assistant_model``: speculative decoding with a draft model (transformers' name): another loaded ``Model``
      with the same vocabulary (e.g. Qwen2.5-0.5B-Instruct for the 1.5B) proposes up to ``num_assistant_tokens``
      (default 8, 1-64) ids per step, as many as its measured acceptance and speed make worth it; the same
      guarantees as prompt lookup.
    - ``response_format``: structured output, OpenAI's shapes: ``{"type": "json_object"}``, ``{"type":
      "json_schema", "json_schema": {"name": ..., "schema": {...}}}``, or ``{"type": "regex", "regex": ...}`` /
      ``{"type": "grammar", "grammar": <Lark>}``; the ids the grammar does not allow are masked before sampling, so
      the answer always matches (unless cut by ``max_new_tokens``). Needs ``pip install "qwen-native[structured]"``.
    - ``tools``, ``tool_choice``, ``parallel_tool_calls``: OpenAI function tools, rendered by the chat template;
      the answer's ``<tool_call>`` blocks come back as ``result.tool_calls`` (finish_reason "tool_calls").
      ``tool_choice="required"`` or ``{"type": "function", "function": {"name": ...}}`` forces calls whose
      arguments fit the tool's parameters schema; "none" leaves the tools out of the prompt.
    - ``stop``: a string or list of strings; the text ends before the first one generated.
    - ``system``: a system message put before a string or message-list prompt; ``chat_template=False`` uses a
      string prompt as raw text instead of rendering the chat template."""

    max_new_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    repeat_last_n: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    do_sample: Optional[bool] = None
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_lookup_num_tokens: Optional[int] = None
    max_matching_ngram_size: Optional[int] = None
    assistant_model: Any = None
    num_assistant_tokens: Optional[int] = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    stop: Union[None, str, Sequence[str]] = None
    system: Optional[str] = None
    chat_template: bool = True

    def __post_init__(self) -> None:
        if self.repeat_last_n is None:
            raise TypeError("repeat_last_n must be an integer >= 0 (0 = the whole context), got None")
        check_sampling_args(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                            repetition_penalty=self.repetition_penalty, repeat_last_n=self.repeat_last_n,
                            seed=self.seed, max_new_tokens=self.max_new_tokens,
                            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)
        if not isinstance(self.logprobs, (bool, np.bool_)):
            raise TypeError(f"logprobs must be True or False, got {self.logprobs!r}")
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, (int, np.integer)):
            raise TypeError(f"top_logprobs must be an integer, got {self.top_logprobs!r}")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be between 0 and 20, got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        for name, hi in (("prompt_lookup_num_tokens", MAX_PROPOSED), ("max_matching_ngram_size", 16),
                         ("num_assistant_tokens", MAX_PROPOSED)):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                    raise TypeError(f"{name} must be an integer, got {v!r}")
                if not 1 <= v <= hi:
                    raise ValueError(f"{name} must be between 1 and {hi}, got {v}")
        if self.do_sample is not None and not isinstance(self.do_sample, (bool, np.bool_)):
            raise TypeError(f"do_sample must be True, False or None, got {self.do_sample!r}")
        if not isinstance(self.parallel_tool_calls, (bool, np.bool_)):
            raise TypeError(f"parallel_tool_calls must be True or False, got {self.parallel_tool_calls!r}")
        if not isinstance(self.chat_template, (bool, np.bool_)):
            raise TypeError(f"chat_template must be True or False, got {self.chat_template!r}")
        object.__setattr__(self, "stop", _check_stops(self.stop))

    @classmethod
    def from_kwargs(cls, options: Optional["GenerationOptions"] = None, **kwargs: Any) -> "GenerationOptions":
        """`options` (or the defaults) with `kwargs` replacing fields; an unknown name is a TypeError that says
        which names exist (and the closest one)."""
        if options is not None and not isinstance(options, GenerationOptions):
            raise TypeError(f"options must be a GenerationOptions, got {type(options).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for k in kwargs:
            if k not in names:
                near = difflib.get_close_matches(k, names, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; the options are {', '.join(names)}"
                raise TypeError(f"generate() got an unexpected keyword argument {k!r}{hint}")
        if options is None:
            return cls(**kwargs)
        return dataclasses.replace(options, **kwargs) if kwargs else options

    def sampling(self, defaults: GenerationDefaults) -> SamplingParams:
        """The sampling parameters these options ask for, with the model's defaults filled in."""
        do_sample = self.do_sample
        if do_sample is None:
            do_sample = self.temperature > 0 if self.temperature is not None else defaults.do_sample

        def pick(v: Any, default: Any) -> Any:
            return default if v is None else v

        return SamplingParams(
            do_sample=bool(do_sample), temperature=pick(self.temperature, defaults.temperature),
            top_k=pick(self.top_k, defaults.top_k), top_p=pick(self.top_p, defaults.top_p),
            min_p=pick(self.min_p, defaults.min_p or 0.0),
            repetition_penalty=pick(self.repetition_penalty, defaults.repetition_penalty),
            repeat_last_n=self.repeat_last_n, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty)

    def max_new(self, defaults: GenerationDefaults, prompt_len: int, context: int) -> int:
        """max_new_tokens for a prompt of `prompt_len` ids in a context of `context` positions; ValueError when
        they cannot fit, saying what to change."""
        if prompt_len >= context:
            raise ContextLengthError(f"the prompt is {prompt_len} tokens but the model's context holds {context} "
                             "(max_context); shorten the prompt or load with a larger max_context")
        room = context - prompt_len
        if self.max_new_tokens is None:
            return min(defaults.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, room)
        if self.max_new_tokens > room:
            raise ContextLengthError(f"the prompt ({prompt_len} tokens) + max_new_tokens ({self.max_new_tokens}) "
                                     f"exceeds the context of {context} tokens (max_context); lower max_new_tokens "
                                     f"to at most {room} or load with a larger max_context")
        return int(self.max_new_tokens)


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


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token with its log-probability (see GenerationOptions.logprobs) and the `top` alternatives,
    most likely first, as (token id, text, log-probability)."""

    token_id: int
    token: str
    bytes: bytes
    logprob: float
    top: Tuple[Tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class Piece:
    """What one step adds to a generation: its text (possibly empty: a character may still be incomplete), the ids
    generated in it, and their log-probabilities when asked for."""

    text: str
    token_ids: Tuple[int, ...]
    logprobs: Tuple[TokenLogprob, ...] = ()


class StopScanner:
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


class TextAssembler:
    """One sequence's generated ids in, its text out: EOS ids end it, the UTF-8-safe detokenizer turns ids into
    whole characters, the stop scanner cuts before a stop string. ``finish_reason`` is "stop" once an EOS id or a
    stop string ended the text, else None."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], eos: FrozenSet[int]):
        self._tokenizer = tokenizer
        self._detok = tokenizer.stream()
        self._scanner = StopScanner(stops)
        self._eos = eos
        self.finish_reason: Optional[str] = None

    @property
    def stop_string(self) -> Optional[str]:
        return self._scanner.hit

    def token_text(self, token: int) -> str:
        """One token's own text (special tokens included), for log-probability reports."""
        return self._tokenizer.decode([token], skip_special_tokens=False)

    def token_bytes(self, token: int) -> bytes:
        return self._tokenizer.token_bytes(token)

    def push(self, token: int) -> str:
        """Add a generated id; return the text it completes ("" when none). After a stop, returns ""."""
        if self.finish_reason is not None:
            return ""
        if token in self._eos:
            self.finish_reason = "stop"
            return ""
        piece = self._detok.push(token)
        if not piece:
            return ""
        out, hit = self._scanner.feed(piece)
        if hit:
            self.finish_reason = "stop"
        return out

    def finish(self) -> str:
        """The text still held back, once no more ids come (cut at a stop string it completes)."""
        if self._scanner.hit is not None:
            return ""
        out, hit = self._scanner.feed(self._detok.flush())
        if hit:
            self.finish_reason = "stop"
            return out
        return out + self._scanner.finish()

