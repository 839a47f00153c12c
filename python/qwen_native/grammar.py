"""Constrained decoding (structured output) on llguidance: a grammar decides which ids may come next.

* :func:`constraint_grammar` turns an OpenAI-style ``response_format`` into an llguidance grammar string (JSON
  schema, any JSON object, a regex or a Lark grammar), or None for plain text.
* :class:`GrammarCompiler` is built once per tokenizer (making llguidance's token trie costs 1-2 s for Qwen2's
  151,936 ids, so the caller keeps it); ``compile(grammar)`` checks a grammar and returns a fresh
  :class:`Constraint`.
* :class:`Constraint` follows one generated sequence: ``fill_mask`` computes the allowed next ids as a bitmask
  (llguidance drops the GIL while it does, so it can overlap a forward pass), ``apply`` sets the logits of the
  others to -inf, ``consume`` advances, ``valid_prefix`` checks proposed ids without advancing, ``rollback``
  undoes. Once the grammar is complete (``is_stopped``) the mask allows only the EOS ids.

JSON is generated compactly on one line with Python's separators (``", "`` and ``": "``), the form Qwen's chat
template shows the model (``tojson``) and the one it writes; free whitespace would let a model pad forever.
llguidance is an optional dependency (``pip install "qwen-native[structured]"``), imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._checks import is_int, json_text, only_keys, openai_name, short

if TYPE_CHECKING:
    import llguidance

    from .chat import ChatTokenizer

__all__ = ["JSON_OPTIONS", "constraint_grammar", "json_schema_grammar", "GrammarCompiler", "Constraint", "apply_mask",
           "llguidance_module"]

# llguidance's JSON compile options for every JSON grammar we make (a schema's own "x-guidance" overrides them).
JSON_OPTIONS: Dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")


def llguidance_module() -> Any:
    """The llguidance module, or ImportError saying how to install it."""
    try:
        import llguidance
    except ImportError:
        raise ImportError('structured output (response_format, tool_choice "required" or a named tool) needs '
                          'llguidance: pip install "qwen-native[structured]"') from None
    return llguidance


def json_schema_grammar(schema: Mapping[str, Any], where: str = "response_format") -> str:
    """The llguidance grammar of JSON text valid against `schema` (compact, see JSON_OPTIONS)."""
    llg = llguidance_module()
    try:
        return str(llg.LLMatcher.grammar_from_json_schema(json_text(schema, where), defaults=JSON_OPTIONS))
    except ValueError as e:
        raise ValueError(f"{where} is not a usable JSON schema: {e}") from None


def constraint_grammar(response_format: Any) -> Optional[str]:
    """The llguidance grammar for an OpenAI-style `response_format`, or None for plain text.

    Accepted: ``{"type": "text"}``; ``{"type": "json_object"}`` (any JSON object); ``{"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ..., "description": ...}}`` (OpenAI's shape; the
    schema defaults to {}, any JSON value, and is enforced whatever "strict" says); and two extensions:
    ``{"type": "regex", "regex": "..."}`` and ``{"type": "grammar", "grammar": "<Lark grammar>"}`` (llguidance's
    Lark dialect). The grammar is not compiled here: :meth:`GrammarCompiler.compile` does that against the
    model's tokenizer.
    """
    if not isinstance(response_format, Mapping):
        raise TypeError(f"response_format must be a dict such as {{'type': 'json_object'}}, got "
                        f"{type(response_format).__name__}")
    kind = response_format.get("type")
    if kind not in _RESPONSE_FORMAT_TYPES:
        raise ValueError(f"response_format['type'] must be one of {', '.join(map(repr, _RESPONSE_FORMAT_TYPES))}, "
                         f"got {short(kind)}")
    if kind == "text":
        only_keys(response_format, ("type",), "response_format")
        return None
    if kind == "json_object":
        only_keys(response_format, ("type",), "response_format")
        return json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        only_keys(response_format, ("type", "json_schema"), "response_format")
        spec = response_format.get("json_schema")
        where = "response_format['json_schema']"
        if not isinstance(spec, Mapping):
            raise TypeError(f"{where} must be a dict {{'name': ..., 'schema': {{...}}}}, got {type(spec).__name__}")
        only_keys(spec, ("name", "schema", "strict", "description"), where)
        openai_name(spec.get("name"), f"{where}['name']")
        if not isinstance(spec.get("description", ""), str):
            raise TypeError(f"{where}['description'] must be a string")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise TypeError(f"{where}['strict'] must be true or false, got {short(spec['strict'])}")
        schema = spec.get("schema", {})
        if not isinstance(schema, Mapping):
            raise TypeError(f"{where}['schema'] must be a JSON schema (a dict), got {type(schema).__name__}")
        return json_schema_grammar(schema, f"{where}['schema']")
    llg = llguidance_module()
    only_keys(response_format, ("type", kind), "response_format")
    text = response_format.get(kind)
    if not isinstance(text, str):
        raise TypeError(f"response_format[{kind!r}] must be a string, got {short(text)}")
    if not text:
        raise ValueError(f"response_format[{kind!r}] is empty: give the {kind} the output must match")
    if kind == "regex":
        return str(llg.LLMatcher.grammar_from_regex(text))
    return str(llg.LLMatcher.grammar_from_lark(text))


class GrammarCompiler:
    """Compiles grammars against one tokenizer; build it once per model and keep it (1-2 s for Qwen2's
    vocabulary), then ``compile`` a grammar per request (about 2 ms for a JSON schema of a few properties).

    `tokenizer` is the model's :class:`~qwen_native.chat.ChatTokenizer`, `vocab_size` the model's embedding rows
    (the width of a logits row; Qwen pads it past the tokenizer's ids, and llguidance never allows the padding),
    `eos_token_ids` the ids that end a sequence (the only ones allowed once a grammar is complete).
    """

    def __init__(self, tokenizer: "ChatTokenizer", vocab_size: int, eos_token_ids: Sequence[int]):
        llg = llguidance_module()
        backend = getattr(tokenizer, "backend", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise TypeError(f"tokenizer must be a qwen_native ChatTokenizer, got {type(tokenizer).__name__}")
        if not is_int(vocab_size) or vocab_size < tokenizer.vocab_size:
            raise ValueError(f"vocab_size must be the model's vocabulary size, at least the tokenizer's "
                             f"{tokenizer.vocab_size} ids, got {short(vocab_size)}")
        if isinstance(eos_token_ids, (str, bytes)) or not isinstance(eos_token_ids, Sequence) or not eos_token_ids:
            raise TypeError(f"eos_token_ids must be a non-empty list of ids, got {short(eos_token_ids)}")
        for i in eos_token_ids:
            if not is_int(i) or not 0 <= i < vocab_size:
                raise ValueError(f"eos_token_ids holds {short(i)}, which is not an id below vocab_size {vocab_size}")
        self.vocab_size: int = int(vocab_size)
        self.eos_token_ids: Tuple[int, ...] = tuple(int(i) for i in eos_token_ids)
        try:
            # Added tokens written <...> (Qwen2.5's <tool_call>) become llguidance special tokens: a grammar names
            # them as <tool_call>, not as the string "<tool_call>".
            self._tokenizer: "llguidance.LLTokenizer" = llg.LLTokenizer(
                backend.to_str(), n_vocab=self.vocab_size, eos_token=list(self.eos_token_ids))
        except ValueError as e:  # not a byte-level or byte-fallback tokenizer
            raise ValueError(f"tokenizer: llguidance cannot use this tokenizer: {e}") from None

    def compile(self, grammar: str, *, argument: str = "response_format") -> "Constraint":
        """A fresh :class:`Constraint` for `grammar` (from :func:`constraint_grammar` or
        :func:`~qwen_native.tools.tool_call_grammar`); ValueError naming `argument` when the grammar cannot be
        compiled (a bad regex, an unsupported schema keyword, an unknown token, ...)."""
        llg = llguidance_module()
        if not isinstance(grammar, str):
            raise TypeError(f"grammar must be a string from constraint_grammar(), got {type(grammar).__name__}")
        # Construction drops the GIL; errors (user ones included) leave the matcher in an error state, not raise.
        matcher = llg.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            message = matcher.get_error().strip()
            if len(message) > 2000:
                message = message[:2000] + " ..."
            raise ValueError(f"{argument}: the grammar cannot be compiled: {message}")
        return Constraint(matcher, self.vocab_size, self.eos_token_ids, self._tokenizer)


class Constraint:
    """One sequence's grammar state (made by :meth:`GrammarCompiler.compile`). Not thread-safe: one thread at a
    time, e.g. a helper thread for ``fill_mask`` while the scheduler waits for the forward pass."""

    def __init__(self, matcher: "llguidance.LLMatcher", vocab_size: int, eos_token_ids: Sequence[int],
                 tokenizer: "llguidance.LLTokenizer"):
        self._matcher = matcher
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self._mask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)  # (ceil(vocab_size / 32),) words of bits
        # EOS ids consumed after the grammar stopped: llguidance accepts them without recording a step, so they
        # are counted here for rollback.
        self._eos_after_stop = 0

    # -- state ----------------------------------------------------------------------------------------------------

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete: only an EOS id may follow."""
        return bool(self._matcher.is_stopped())

    @property
    def is_accepting(self) -> bool:
        """The text so far is a complete match (EOS is allowed next, though more may be)."""
        return bool(self._matcher.is_accepting())

    # -- masks ----------------------------------------------------------------------------------------------------

    def fill_mask(self) -> np.ndarray:
        """The allowed next ids as int32 bitmask words (bit ``i % 32`` of word ``i // 32`` for id i), computed into
        a buffer this constraint owns and returned: the next call overwrites it. The GIL is released meanwhile."""
        self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        return self._mask

    def apply(self, logits: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        """Set the logits of the ids `mask` disallows to -inf, in place. `logits` is one row of vocab_size
        floats; `mask` defaults to the last :meth:`fill_mask`."""
        if mask is None:
            mask = self._mask
        if not isinstance(logits, np.ndarray) or logits.ndim != 1 or logits.shape[0] != self.vocab_size:
            raise ValueError(f"logits must be one row of {self.vocab_size} logits, got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        if not isinstance(mask, np.ndarray) or mask.dtype != np.int32 or mask.shape != self._mask.shape:
            raise ValueError(f"mask must be the int32 array of {self._mask.shape[0]} words fill_mask() returns")
        apply_mask(logits, mask)

    # -- advancing ------------------------------------------------------------------------------------------------

    def consume(self, token_id: int) -> None:
        """Advance past `token_id`; ValueError (and no change) when the grammar does not allow it."""
        t = int(token_id)
        if not 0 <= t < self.vocab_size:
            raise ValueError(f"token_id must be an id below vocab_size {self.vocab_size}, got {t}")
        if t in self.eos_token_ids and self._matcher.is_stopped():
            self._eos_after_stop += 1
            return
        # Checked first: a refused id would leave llguidance's matcher in an error state for good.
        if self._matcher.validate_tokens([t]) != 1 or not self._matcher.consume_token(t):
            raise ValueError(f"token_id: the grammar does not allow id {t} "
                             f"({self._tokenizer.dbg_tokens([t])}) here")

    def valid_prefix(self, ids: Sequence[int]) -> int:
        """How many of `ids` (e.g. proposed by speculative decoding) the grammar accepts in a row from here,
        without advancing. An EOS id counts when it may end the sequence."""
        ids = [int(i) for i in ids]
        for n, i in enumerate(ids):
            if not 0 <= i < self.vocab_size:  # llguidance takes only ids it knows (and raises on negative ones)
                ids = ids[:n]
                break
        if not ids:
            return 0
        if self._matcher.is_stopped():  # llguidance's validate_tokens says 0 for EOS here; consume takes it
            return 1 if ids[0] in self.eos_token_ids else 0
        return int(self._matcher.validate_tokens(ids))

    def rollback(self, n: int) -> None:
        """Undo the last `n` consumed ids (e.g. rejected proposals)."""
        if not is_int(n) or n < 0:
            raise ValueError(f"n must be a number of ids >= 0, got {short(n)}")
        undo_eos = min(n, self._eos_after_stop)
        self._eos_after_stop -= undo_eos
        n -= undo_eos
        if n and not self._matcher.rollback(n):
            raise ValueError(f"n: cannot roll back {n} ids, more than were consumed")


def apply_mask(logits: np.ndarray, mask: np.ndarray) -> None:
    """Set ``logits[i] = -inf`` for every id i whose bit is clear in the int32 bitmask `mask`, in place.

    float32 rows are masked on their bits, without branches (``u & keep | ~keep & bits(-inf)``): ~0.15 ms for
    151,936 ids whatever the mask, where a boolean-indexed store costs up to 1 ms on a scattered one."""
    V = logits.shape[0]
    # Little-endian bytes of each word, bits in little order: bit k of word w is id 32 * w + k.
    bits = np.unpackbits(mask.astype("<i4", copy=False).view(np.uint8), bitorder="little", count=V)  # (V,) 0/1
    if logits.dtype == np.float32 and logits.flags.c_contiguous and logits.flags.writeable:
        keep = bits.astype(np.uint32)
        np.negative(keep, out=keep)  # 1 -> 0xFFFFFFFF, 0 -> 0
        u = logits.view(np.uint32)
        u &= keep
        np.invert(keep, out=keep)
        keep &= np.uint32(0xFF800000)  # the bits of -inf where the id is not allowed
        u |= keep
    else:
        np.copyto(logits, -np.inf, where=~bits.view(bool))
