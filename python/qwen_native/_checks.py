"""Small helpers the Python layer shares for checking values and wording errors (one copy of each)."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional, Sequence, Type

# The most read of a model's small files (config, generation config, index, tokenizer config, chat template; real
# ones are kilobytes), so a hostile multi-gigabyte one is refused without being read into memory.
MAX_SMALL_FILE = 64 << 20


def is_int(v: Any) -> bool:
    """An int that is not a bool (JSON true is not a size)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def short(v: Any, limit: int = 80) -> str:
    """repr(v) cut to a readable length (a hostile file can hold a 10,000-digit number); never raises."""
    try:
        r = repr(v)
    except Exception:  # a repr that fails (or an int too long to print) must not replace the real error
        r = f"<{type(v).__name__}>"
    return r if len(r) <= limit else r[:limit - 3] + "..."


# OpenAI's rule for the names of functions and of json_schema response formats.
OPENAI_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


def openai_name(value: Any, where: str) -> str:
    """`value` if it is a name OpenAI accepts (a function's, a json_schema's); ValueError naming `where` if not."""
    if not isinstance(value, str) or not OPENAI_NAME.match(value):
        raise ValueError(f"{where} must be a name of 1 to 64 letters, digits, '_' or '-' (as OpenAI requires), got "
                         f"{short(value)}")
    return value


def only_keys(value: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    """ValueError naming `where` and the first key of `value` that is not in `allowed` (a typo such as
    'parameter'), listing the allowed ones."""
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise ValueError(f"{where} has an unknown key {short(unknown[0])}; the keys are "
                         f"{', '.join(repr(k) for k in allowed)}")


def json_text(value: Any, where: str) -> str:
    """`value` as JSON text; TypeError/ValueError naming `where` when it holds something JSON cannot (a set,
    NaN, ...)."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except TypeError as e:
        raise TypeError(f"{where} must hold only JSON values (dicts, lists, strings, numbers, booleans, None): "
                        f"{e}") from None
    except ValueError as e:
        raise ValueError(f"{where} must hold only JSON values: {e}") from None


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def read_small(path: str, what: Optional[str] = None, error: Type[Exception] = ValueError) -> bytes:
    """The bytes of one of a model's small files; `error` naming the file when it is missing, unreadable or larger
    than such a file can be."""
    what = what or os.path.basename(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SMALL_FILE + 1)
    except FileNotFoundError:
        raise error(f"{what} not found at {path}") from None
    except OSError as e:
        raise error(f"cannot read {what} at {path}: {e.strerror or e}") from None
    if len(raw) > MAX_SMALL_FILE:
        raise error(f"{what} at {path} is over {MAX_SMALL_FILE >> 20} MiB, far more than such a file holds; the "
                    "file is corrupt")
    return raw
