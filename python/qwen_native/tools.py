"""Tool calls in OpenAI's shapes, written the way Qwen2.5 writes them.

Qwen2.5's chat template lists the ``tools`` in the system message and asks for each call as

    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

(``<tool_call>`` and ``</tool_call>`` are single added tokens of its tokenizer). Here:

* :func:`check_tools` / :func:`check_tool_choice` check a request's ``tools`` and ``tool_choice``;
* :func:`tool_call_grammar` is the llguidance grammar that forces calls (``tool_choice="required"`` or a named
  function): only ``<tool_call>`` blocks whose JSON names a tool and whose arguments fit its parameters schema;
* :func:`parse_tool_calls` splits generated text into content and calls; :class:`ToolCallStream` does the same
  piece by piece for streaming, as OpenAI's chunk deltas. A block that is not a well-formed call (bad JSON, no
  name, cut by max_tokens) stays text. A call is emitted whole when its block closes: its name first, then its
  arguments in one fragment (only then is it known to be a call rather than text).

A history's assistant ``tool_calls`` carry their arguments as a JSON string (OpenAI); the template wants the
object, so :func:`qwen_native.chat.normalize_messages` decodes them before rendering.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._checks import json_text, only_keys, openai_name, short
from .grammar import JSON_OPTIONS, llguidance_module

__all__ = ["ToolChoice", "Delta", "check_tools", "check_tool_choice", "tool_call_grammar", "parse_tool_calls",
           "tool_answer",
           "ToolCallStream", "TOOL_CALL_START", "TOOL_CALL_END"]

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

ToolChoice = Union[str, Dict[str, Any]]  # "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
Delta = Tuple[str, Any]  # ("content", text) or ("tool_call", OpenAI's delta.tool_calls[i] dict)


# ---------------------------------------------------------------------------------------------------------------
# Checking a request


def check_tools(tools: Any) -> List[Dict[str, Any]]:
    """Check OpenAI `tools` (``[{"type": "function", "function": {"name", "description"?, "parameters"?,
    "strict"?}}]``) and return plain copies for the chat template ([] for None)."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise TypeError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}} dicts, got "
                        f"{type(tools).__name__}")
    out: List[Dict[str, Any]] = []
    seen: Dict[str, int] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise TypeError(f"{where} must be a dict {{'type': 'function', 'function': {{...}}}}, got "
                            f"{type(tool).__name__}")
        only_keys(tool, ("type", "function"), where)
        if tool.get("type") != "function":
            raise ValueError(f"{where}['type'] must be 'function' (the only kind of tool), got "
                             f"{short(tool.get('type'))}")
        fn = tool.get("function")
        where += "['function']"
        if not isinstance(fn, Mapping):
            raise TypeError(f"{where} must be a dict {{'name': ..., 'parameters': {{...}}}}, got {type(fn).__name__}")
        only_keys(fn, ("name", "description", "parameters", "strict"), where)
        name = openai_name(fn.get("name"), f"{where}['name']")
        if name in seen:
            raise ValueError(f"{where}['name'] {name!r} is also the name of tools[{seen[name]}]; tool names must "
                             "be unique")
        seen[name] = i
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise TypeError(f"{where}['description'] must be a string, got {type(fn['description']).__name__}")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise TypeError(f"{where}['strict'] must be true or false, got {short(fn['strict'])}")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, Mapping):
                raise TypeError(f"{where}['parameters'] must be a JSON schema (a dict), got {type(params).__name__}")
            if params.get("type", "object") != "object":
                raise ValueError(f"{where}['parameters'] must describe a JSON object (type 'object'), got type "
                                 f"{short(params.get('type'))}")
        plain = {k: v for k, v in fn.items() if v is not None}
        out.append({"type": "function", "function": json.loads(json_text(plain, where))})
    return out


def check_tool_choice(tool_choice: Any, tools: Any) -> ToolChoice:
    """Check OpenAI `tool_choice` against `tools`: "auto", "none", "required" or ``{"type": "function",
    "function": {"name": ...}}`` naming one of them. None means "auto" with tools, "none" without (OpenAI's
    defaults)."""
    names = [t["function"]["name"] for t in check_tools(tools)]
    if tool_choice is None:
        return "auto" if names else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': "
                             f"{{'name': ...}}}}, got {short(tool_choice)}")
        if tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools: pass tools=[...] too")
        return tool_choice
    if not isinstance(tool_choice, Mapping):
        raise TypeError(f"tool_choice must be a string or a dict, got {type(tool_choice).__name__}")
    only_keys(tool_choice, ("type", "function"), "tool_choice")
    if tool_choice.get("type") != "function":
        raise ValueError(f"tool_choice['type'] must be 'function', got {short(tool_choice.get('type'))}")
    fn = tool_choice.get("function")
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise TypeError("tool_choice['function'] must be a dict {'name': <the name of one of the tools>}")
    only_keys(fn, ("name",), "tool_choice['function']")
    if fn["name"] not in names:
        raise ValueError(f"tool_choice['function']['name'] {short(fn['name'])} is not among the tools' names "
                         f"({', '.join(map(repr, names)) or 'no tools were given'})")
    return {"type": "function", "function": {"name": fn["name"]}}


# ---------------------------------------------------------------------------------------------------------------
# Forcing calls


def _call_schema(fn: Mapping[str, Any]) -> Dict[str, Any]:
    """The JSON schema of one call's body {"name": <this name>, "arguments": <its parameters>}."""
    params = dict(fn.get("parameters") or {})
    params.setdefault("type", "object")
    schema: Dict[str, Any] = {}
    # Local references ("#/$defs/X", as pydantic writes them) resolve against the root: keep the definitions there.
    for key in ("$defs", "definitions"):
        if key in params:
            schema[key] = params.pop(key)
    schema.update({
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": JSON_OPTIONS,
    })
    return schema


def tool_call_grammar(tools: Any, tool_choice: Any, parallel_tool_calls: bool = True, *,
                      tag_tokens: bool = True) -> Optional[str]:
    """The llguidance grammar that makes the model call tools, or None when it may answer freely ("auto",
    "none").

    With "required" the model writes one call of any of `tools` (one or more, separated by newlines, when
    `parallel_tool_calls`); with a named function, calls of that one only. Each call is a ``<tool_call>`` block
    whose JSON body fits the tool's parameters schema; the sequence ends after the last block. `tag_tokens`: the
    tags are single tokens of the tokenizer (Qwen2.5's are; ``tokenizer.token_to_id("<tool_call>")`` is not None);
    False writes them as text.
    """
    if not isinstance(parallel_tool_calls, bool):
        raise TypeError(f"parallel_tool_calls must be true or false, got {short(parallel_tool_calls)}")
    checked = check_tools(tools)
    choice = check_tool_choice(tool_choice, checked)
    if choice in ("auto", "none"):
        return None
    if isinstance(choice, dict):
        chosen = [t["function"] for t in checked if t["function"]["name"] == choice["function"]["name"]]
    else:
        chosen = [t["function"] for t in checked]
    llg = llguidance_module()
    # In llguidance's Lark, <tool_call> names the token; "<tool_call>" would be its text spelled by other tokens.
    start, end = (TOOL_CALL_START, TOOL_CALL_END) if tag_tokens else (json.dumps(TOOL_CALL_START),
                                                                     json.dumps(TOOL_CALL_END))
    lines = ['start: tool_call ("\\n" tool_call)*' if parallel_tool_calls else "start: tool_call",
             f'tool_call: {start} "\\n" ({" | ".join(f"call_{i}" for i in range(len(chosen)))}) "\\n" {end}']
    lines += [f"call_{i}: %json {json.dumps(_call_schema(fn), ensure_ascii=False)}" for i, fn in enumerate(chosen)]
    return str(llg.LLMatcher.grammar_from_lark("\n".join(lines) + "\n"))


# ---------------------------------------------------------------------------------------------------------------
# Reading calls back


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN / Infinity, which json.loads would take


def _parse_call(body: str) -> Optional[Tuple[str, str]]:
    """(name, arguments as JSON text) of a block's body, or None when it is not a well-formed call."""
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


class _Content:
    """Content text as it streams, stripped of surrounding whitespace like the whole text: leading whitespace is
    dropped, trailing whitespace held until more text follows."""

    def __init__(self) -> None:
        self._started = False
        self._pending = ""

    def add(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._pending + text
        body = text.rstrip()
        self._pending = text[len(body):]
        return body


def _held_back(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolCallStream:
    """Generated text in pieces → OpenAI streaming deltas: ``("content", text)`` and ``("tool_call", delta)``,
    where a call's first delta is ``{"index", "id", "type": "function", "function": {"name", "arguments": ""}}``
    and the next ``{"index", "function": {"arguments": text}}``. Text that may be the start of ``<tool_call>``
    is held until the next piece decides. The deltas of all pieces and ``finish()`` add up to
    :func:`parse_tool_calls` of the whole text.
    """

    def __init__(self) -> None:
        self._buffer = ""       # text not yet emitted (outside a block) or the body so far (inside one)
        self._inside = False
        self._searched = 0      # characters of _buffer already searched for the tag
        self._content = _Content()
        self._calls = 0
        self._finished = False

    def push(self, text: str) -> List[Delta]:
        """The deltas `text` (the next piece of generated text) completes."""
        if self._finished:
            raise RuntimeError("push() after finish(): this stream is done")
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        self._buffer += text
        out: List[Delta] = []
        while True:
            tag = TOOL_CALL_END if self._inside else TOOL_CALL_START
            at = self._buffer.find(tag, self._searched)
            if at < 0:
                self._searched = max(0, len(self._buffer) - len(tag) + 1)
                if not self._inside:
                    keep = _held_back(self._buffer, tag)
                    self._emit_text(self._buffer[:len(self._buffer) - keep], out)
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    self._searched = 0
                return out
            if self._inside:
                self._close_block(self._buffer[:at], out)
            else:
                self._emit_text(self._buffer[:at], out)
            self._inside = not self._inside
            self._buffer = self._buffer[at + len(tag):]
            self._searched = 0

    def finish(self) -> List[Delta]:
        """The deltas of the text still held (an unclosed block is text); call once at the end."""
        if self._finished:
            return []
        self._finished = True
        out: List[Delta] = []
        self._emit_text((TOOL_CALL_START if self._inside else "") + self._buffer, out)
        self._buffer = ""
        return out

    def _emit_text(self, text: str, out: List[Delta]) -> None:
        text = self._content.add(text)
        if text:
            out.append(("content", text))

    def _close_block(self, body: str, out: List[Delta]) -> None:
        call = _parse_call(body)
        if call is None:
            self._emit_text(TOOL_CALL_START + body + TOOL_CALL_END, out)
            return
        name, arguments = call
        i = self._calls
        self._calls += 1
        out.append(("tool_call", {"index": i, "id": _call_id(), "type": "function",
                                  "function": {"name": name, "arguments": ""}}))
        out.append(("tool_call", {"index": i, "function": {"arguments": arguments}}))


def tool_answer(text: str, finish_reason: str) -> Tuple[Optional[str], List[Dict[str, Any]], str]:
    """A finished answer of a request with tools: (content, calls, finish_reason), where the finish reason becomes
    "tool_calls" when the answer made calls (unless max_new_tokens cut it: "length" stays)."""
    content, calls = parse_tool_calls(text)
    if calls and finish_reason != "length":
        finish_reason = "tool_calls"
    return content, calls, finish_reason


def parse_tool_calls(text: str) -> Tuple[Optional[str], List[Dict[str, Any]]]:
    """Split generated `text` into its content (the text outside well-formed ``<tool_call>`` blocks, stripped;
    None when empty) and its calls in OpenAI's shape ``{"id": "call_...", "type": "function", "function":
    {"name": ..., "arguments": "<JSON text>"}}``. Malformed blocks, and a last block left unclosed, are content."""
    stream = ToolCallStream()
    deltas = stream.push(text) + stream.finish()
    content = "".join(d for kind, d in deltas if kind == "content")
    calls: List[Dict[str, Any]] = []
    for kind, d in deltas:
        if kind != "tool_call":
            continue
        if "id" in d:
            calls.append({"id": d["id"], "type": "function", "function": dict(d["function"])})
        else:
            calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    return content or None, calls
