"""Tokenizer, chat template and streaming detokenizer.

* :class:`ChatTokenizer` wraps a ``tokenizers.Tokenizer`` (tokenizer.json) with the special tokens and chat
  template from tokenizer_config.json (or chat_template.jinja).
* Chat templates are rendered the way transformers renders them: jinja2's ``ImmutableSandboxedEnvironment`` with
  ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a ``tojson`` filter that keeps non-ASCII text
  (``ensure_ascii=False``), ``raise_exception``, ``strftime_now``, the special tokens as variables and
  ``add_generation_prompt=True``. Templates come from the Hub and are untrusted: any attempt to reach Python
  internals (``__class__``, ``__globals__``, ...) stops rendering with a :class:`~qwen_native.errors.TemplateError`.
* :class:`IncrementalDecoder` turns generated ids into text pieces whose concatenation is exactly the full
  decode: it never emits half a UTF-8 character (no U+FFFD that the full decode lacks) and emits each character
  as soon as its last byte arrives.
"""

from __future__ import annotations

import json
import operator
import os
from datetime import datetime
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Union

from ._checks import read_small
from .config import read_json
from .errors import TemplateError

__all__ = ["ChatTokenizer", "IncrementalDecoder", "Message", "compile_template", "render_template",
           "normalize_messages"]

Message = Mapping[str, Any]

# Caps on what a template can build with * and ** (the sandbox's MAX_RANGE already caps range()).
_MAX_REPEAT_LEN = 1 << 20
_MAX_POW_BITS = 4096

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# ---------------------------------------------------------------------------------------------------------------
# Chat templates


def _make_environment() -> Any:
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Environment(ImmutableSandboxedEnvironment):
        # Stop at the first unsafe attribute instead of rendering it as an empty Undefined, so nothing a template
        # learns by probing internals can be used, and the caller is told.
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
            if op == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT_LEN:
                        raise SecurityError("the template tried to build a huge string or list with '*'")
                return operator.mul(left, right)
            if op == "**":
                if (isinstance(left, int) and isinstance(right, int) and right > 0
                        and max(abs(left), 2).bit_length() * right > _MAX_POW_BITS):
                    raise SecurityError("the template tried to compute a huge number with '**'")
                return operator.pow(left, right)
            return super().call_binop(context, op, left, right)

    def raise_exception(message: Any) -> None:
        raise jinja2.exceptions.TemplateError(str(message))

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class TemplateDict:
        # dict() for templates without handing them the dict type itself.
        def __call__(self, *args: Any, **kwargs: Any) -> Dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> Dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespace() that refuses underscore names, so templates cannot shadow internals.
        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja's Namespace
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"chat templates cannot set underscore attributes on a namespace ({name!r})")

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


_ENV: Any = None
_COMPILED: Dict[str, Any] = {}


def compile_template(source: str) -> Any:
    """Compile a chat template in the sandbox (cached); TemplateError on a syntax error."""
    global _ENV
    if not isinstance(source, str):
        raise TemplateError(f"the chat template must be a string, got {type(source).__name__}")
    hit = _COMPILED.get(source)
    if hit is not None:
        return hit
    import jinja2

    if _ENV is None:
        _ENV = _make_environment()
    try:
        compiled = _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template has a syntax error at line {e.lineno}: {e.message}") from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template cannot be compiled: {e}") from None
    if len(_COMPILED) > 16:
        _COMPILED.clear()
    _COMPILED[source] = compiled
    return compiled


def _plain(value: Any, where: str) -> Any:
    """A copy of `value` made of plain JSON types only, so the template sees no objects with methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item(), where)
    raise TypeError(f"{where} holds a {type(value).__name__}; chat messages may hold only strings, numbers, "
                    "booleans, None, lists and dicts")


def _decode_tool_call_arguments(message: Dict[str, Any]) -> None:
    """An assistant message's ``tool_calls`` carry OpenAI's arguments, a JSON string; chat templates (Qwen2.5's
    ``tool_call.arguments | tojson``, as transformers expects) want the object, or they would write the JSON
    string quoted a second time. Decode them in place; a string that is not a JSON object stays as it is."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                args = json.loads(fn["arguments"])
            except ValueError:
                continue
            if isinstance(args, dict):
                fn["arguments"] = args


def normalize_messages(messages: Any, system: Optional[str] = None) -> List[Dict[str, Any]]:
    """Check a conversation (a list of {"role", "content"} dicts) and return plain copies with None-valued keys
    dropped (as transformers does). `system`, if given, becomes a leading system message."""
    if isinstance(messages, (str, bytes, bytearray, memoryview)) or not isinstance(messages, Sequence):
        raise TypeError(f"prompt must be a string or a list of {{'role', 'content'}} dicts, got "
                        f"{type(messages).__name__}")
    out: List[Dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"prompt[{i}]"
        if not isinstance(m, Mapping):
            raise TypeError(f"{where} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}['role'] must be a non-empty string such as 'user', got {role!r}")
        if "content" not in m and "tool_calls" not in m:
            raise ValueError(f"{where} has no 'content'")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise TypeError(f"{where}['content'] must be a string, got {type(content).__name__}")
        plain = {k: _plain(v, f"{where}[{k!r}]") for k, v in m.items() if v is not None}
        _decode_tool_call_arguments(plain)
        out.append(plain)
    if not out:
        raise ValueError("prompt is an empty list of messages")
    if system is not None:
        if not isinstance(system, str):
            raise TypeError(f"system must be a string, got {type(system).__name__}")
        if out[0]["role"] == "system":
            raise ValueError("system= was given but the messages already start with a system message; pass one")
        out.insert(0, {"role": "system", "content": system})
    return out


def render_template(source: str, messages: Any, *, add_generation_prompt: bool = True,
                    special_tokens: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> str:
    """Render chat template `source` for `messages` the way transformers' ``apply_chat_template`` does."""
    import jinja2
    from jinja2.exceptions import SecurityError

    compiled = compile_template(source)
    variables: Dict[str, Any] = dict(special_tokens or {})
    variables.update({k: _plain(v, k) for k, v in kwargs.items()})
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    variables["messages"] = normalize_messages(messages)
    variables["add_generation_prompt"] = bool(add_generation_prompt)
    try:
        return compiled.render(**variables)
    except SecurityError as e:
        raise TemplateError(f"the chat template tried something the sandbox forbids: {e}") from None
    except jinja2.TemplateError as e:  # raise_exception(), undefined variables used in an operation, ...
        raise TemplateError(f"the chat template failed: {e}") from None
    except RecursionError:
        raise TemplateError("the chat template failed: it recursed too deeply") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as e:
        raise TemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def _token_content(v: Any) -> Optional[str]:
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping) and isinstance(v.get("content"), str):  # {"content": ..., "__type": "AddedToken"}
        return v["content"]
    return None


class ChatTokenizer:
    """tokenizer.json plus the special tokens and chat template of tokenizer_config.json.

    ``encode``/``decode`` work on plain lists of ints; ``backend`` is the underlying ``tokenizers.Tokenizer``.
    """

    def __init__(self, tokenizer: Any, tokenizer_config: Optional[Mapping[str, Any]] = None,
                 chat_template: Optional[str] = None):
        self.backend = tokenizer
        cfg = dict(tokenizer_config or {})
        self.tokenizer_config: Dict[str, Any] = cfg
        if chat_template is None:
            chat_template = _template_from_config(cfg)
        self.chat_template: Optional[str] = chat_template
        special: Dict[str, Any] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            content = _token_content(cfg.get(key))
            if content is not None:
                special[key] = content
        extra = cfg.get("additional_special_tokens")
        if isinstance(extra, list):
            special["additional_special_tokens"] = [c for c in (_token_content(t) for t in extra) if c is not None]
        self.special_tokens: Dict[str, Any] = special
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids: FrozenSet[int] = frozenset(i for i, t in added.items() if getattr(t, "special", False))
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        eos = special.get("eos_token")
        self.eos_token_id: Optional[int] = tokenizer.token_to_id(eos) if eos else None

    @classmethod
    def from_files(cls, tokenizer_json: str, tokenizer_config_json: Optional[str] = None,
                   chat_template_file: Optional[str] = None) -> "ChatTokenizer":
        """Load tokenizer.json, and tokenizer_config.json / chat_template.jinja when given."""
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(os.fspath(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise TemplateError(f"cannot load {tokenizer_json}: {e}; the file is missing, corrupt or not a 'fast' "
                                "tokenizer (tokenizer.json of the tokenizers library): download it again") from None
        cfg: Dict[str, Any] = {}
        if tokenizer_config_json is not None:
            cfg = read_json(tokenizer_config_json, error=TemplateError)
        template = None
        if chat_template_file is not None:
            try:
                template = read_small(chat_template_file, error=TemplateError).decode("utf-8")
            except UnicodeDecodeError as e:
                raise TemplateError(f"cannot read {chat_template_file}: {type(e).__name__}: {e}") from None
        return cls(tok, cfg, template)

    # -- ids ------------------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        """Token ids of `text`. Special-token text such as ``<|im_start|>`` becomes the special token."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        try:
            return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)
        except TypeError:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a bad decode; tokenizers says "must be str"
                raise ValueError(f"the text is not valid Unicode: it holds {text[e.start:e.end]!r} ({e.reason}); "
                                 "remove or replace that character") from None
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are left out unless `skip_special_tokens` is False."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self.backend.id_to_token(int(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (byte-level BPE: its vocabulary string mapped back through the byte
        alphabet; a special token: its text in UTF-8)."""
        tok = self.backend.id_to_token(int(token_id))
        if tok is None:
            return b""
        table = _byte_decoder()
        if all(c in table for c in tok) and int(token_id) not in self.special_ids:
            return bytes(table[c] for c in tok)
        return tok.encode("utf-8")

    def stream(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        """A fresh :class:`IncrementalDecoder` over this tokenizer."""
        return IncrementalDecoder(self.backend, skip_special_tokens=skip_special_tokens)

    # -- prompts --------------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The prompt text for `messages` (a list of {"role", "content"} dicts) under this model's template."""
        if self.chat_template is None:
            raise TemplateError("this model has no chat template (tokenizer_config.json has no \"chat_template\" "
                                "and there is no chat_template.jinja); pass chat_template=False to use the prompt "
                                "as plain text")
        return render_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                               special_tokens=self.special_tokens, **kwargs)

    def prompt_ids(self, prompt: Union[str, Sequence[Message]], *, system: Optional[str] = None,
                   chat_template: bool = True, tools: Optional[Sequence[Mapping[str, Any]]] = None) -> List[int]:
        """Prompt ids for a string (one user turn) or a list of messages; with ``chat_template=False`` the
        string is tokenized as it is. `tools` (checked by :func:`qwen_native.tools.check_tools`) go to the
        template, which lists them for the model."""
        if not isinstance(chat_template, bool):
            raise TypeError(f"chat_template must be True or False, got {chat_template!r}")
        if not chat_template:
            if not isinstance(prompt, str):
                raise TypeError("chat_template=False needs the prompt as one string, not a list of messages")
            if system is not None:
                raise ValueError("system= needs the chat template; it cannot be used with chat_template=False")
            if tools:
                raise ValueError("tools= needs the chat template; it cannot be used with chat_template=False")
            ids = self.encode(prompt, add_special_tokens=True)
            if not ids:
                raise ValueError("prompt is empty: there is nothing to continue")
            return ids
        if isinstance(prompt, str):
            messages: Any = [{"role": "user", "content": prompt}]
        else:
            messages = prompt
        messages = normalize_messages(messages, system)
        return self.encode(self.apply_chat_template(messages, tools=tools or None), add_special_tokens=False)


_BYTE_DECODER: Dict[str, int] = {}


def _byte_decoder() -> Dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): the 188 printable bytes stand for themselves, the other 68 for the
    characters from U+0100 up, in byte order."""
    if not _BYTE_DECODER:
        printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        n = 0
        for b in range(256):
            if b in printable:
                _BYTE_DECODER[chr(b)] = b
            else:
                _BYTE_DECODER[chr(256 + n)] = b
                n += 1
    return _BYTE_DECODER


def _template_from_config(cfg: Mapping[str, Any]) -> Optional[str]:
    t = cfg.get("chat_template")
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {e.get("name"): e.get("template") for e in t if isinstance(e, Mapping)}
        chosen = named.get("default")
        if isinstance(chosen, str):
            return chosen
        raise TemplateError("tokenizer_config.json has several chat templates but none named \"default\"")
    raise TemplateError(f"tokenizer_config.json: \"chat_template\" must be a string, got {type(t).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# Streaming detokenization


class IncrementalDecoder:
    """Generated ids in, text pieces out; ``"".join(pieces) + flush()`` equals ``decode(all ids)``.

    It decodes a short window of recent ids and emits the text the window gained, except for trailing U+FFFD:
    that is a character still missing bytes (or invalid bytes whose fate the next id decides), held until the
    next id. So a character is emitted with the id that completes it, and never as a replacement character the
    full decode would not contain. Special tokens are skipped (``skip_special_tokens``).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: List[int] = []
        self._prefix = 0   # window start (a few ids of context before `_read`)
        self._read = 0     # the text of ids[:_read] is all emitted, and ends on a whole character
        self._extra = 0    # characters of ids[_read:] already emitted (complete ones before a partial one)

    def _decode(self, ids: List[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now complete ("" when none is)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        start = len(prefix_text) + self._extra
        if not text.endswith("\ufffd"):
            piece = text[start:]
            self._prefix, self._read, self._extra = self._read, len(self._ids), 0
            return piece
        stable = len(text.rstrip("\ufffd"))
        if stable > start:
            self._extra += stable - start
            return text[start:stable]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end becomes U+FFFD, as in the full
        decode); call once when generation ends."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        start = len(prefix_text) + self._extra
        self._prefix, self._read, self._extra = len(self._ids), len(self._ids), 0
        return text[start:]
