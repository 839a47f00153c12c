"""Safetensors files as the native core reads them: each header parsed and checked here, then a table of
(name, path, dtype, shape, byte offset, byte length) handed to ``_core.Model``, which reads the bytes itself
(straight into its own memory: no second copy of the weights in Python)."""

from __future__ import annotations

import json
import os
import re
import struct
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple

from ._checks import is_int as _is_int, short as _short
from .errors import CheckpointError

if TYPE_CHECKING:
    from .config import Qwen2Config

TensorEntry = Tuple[str, str, str, List[int], int, int]

_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
_MAX_HEADER = 100 << 20  # the safetensors format's own limit
_FIX = "delete it and download it again"
_CORE_DTYPES = ("BF16", "F16", "F32")  # what the native core reads
_PLAIN_SHARD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors$")


def read_header(path: str) -> List[TensorEntry]:
    """Parse and check one safetensors file's header; return its tensors with absolute file offsets."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is {size} bytes long: too short to be a safetensors file; {_FIX}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                why = (f"is larger than the file ({size} bytes)" if 8 + n > size else
                       f"is over the format's limit of {_MAX_HEADER} bytes")
                raise CheckpointError(f"{path}: header length {n} {why}: the file is truncated or not safetensors; "
                                      f"{_FIX}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: the header is not valid JSON ({e}); the file is corrupt: {_FIX}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: the header is nested too deeply; the file is corrupt: {_FIX}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object; the file is corrupt: {_FIX}")

    data_start, data_size = 8 + n, size - 8 - n
    entries: List[TensorEntry] = []
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {_short(name)}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: header entry is not an object; the file is corrupt: {_FIX}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
            raise CheckpointError(f"{where}: unknown dtype {_short(dtype)}; the file is corrupt: {_FIX}")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 1 << 62 for d in shape):
            raise CheckpointError(f"{where}: shape {_short(shape)} is not a list of non-negative integers; the file "
                                  f"is corrupt: {_FIX}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise CheckpointError(
                f"{where}: data_offsets {_short(offsets)} lie outside the file's {data_size} data bytes "
                f"(truncated or corrupt file): {_FIX}")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * _DTYPE_SIZES[dtype]:
            raise CheckpointError(
                f"{where}: {offsets[1] - offsets[0]} bytes do not hold a {dtype} tensor of shape {_short(shape)} "
                f"({_short(numel * _DTYPE_SIZES[dtype])} bytes); the file is corrupt: {_FIX}")
        spans.append((offsets[0], offsets[1], name))
        entries.append((name, path, dtype, list(shape), data_start + offsets[0], offsets[1] - offsets[0]))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file; the file is corrupt: {_FIX}")
    return entries


def tensor_table(paths: Sequence[str]) -> List[TensorEntry]:
    """Every tensor of a (possibly sharded) checkpoint; a name in two shards is an error."""
    table: List[TensorEntry] = []
    seen: Dict[str, str] = {}
    for p in paths:
        for entry in read_header(p):
            if entry[0] in seen:
                raise CheckpointError(f"tensor {entry[0]!r} is in both {seen[entry[0]]} and {p}; the shards do not "
                                      "belong to one checkpoint")
            seen[entry[0]] = p
            table.append(entry)
    if not table:
        raise CheckpointError(f"no tensors in {', '.join(paths)}; the file is corrupt: {_FIX}")
    return table


def check_tensors(table: Sequence[TensorEntry], config: "Qwen2Config") -> None:
    """CheckpointError unless the checkpoint holds exactly the tensors config.json implies, with their shapes, in a
    dtype the core reads. The names and shapes come from the core (its one list of Qwen2 parameters), which checks
    them again when it loads; this is the message a user sees, with the file and what to do."""
    from . import _core

    expected = {name: tuple(shape) for name, shape in _core.parameter_shapes(config.to_core_dict()).items()}
    layers = config.num_hidden_layers
    mismatch = "the weights and config.json do not belong to the same model, or the file is corrupt"
    seen = set()
    for name, path, dtype, shape, _, _ in table:
        want = expected.get(name)
        if want is None:
            raise CheckpointError(f"{path}: unexpected tensor {_short(name)}: not a parameter of the {layers}-layer "
                                  f"Qwen2ForCausalLM config.json describes; {mismatch}")
        if tuple(shape) != want:
            raise CheckpointError(f"{path}: tensor {_short(name)} has shape {_short(shape)} but config.json implies "
                                  f"{list(want)}; {mismatch}")
        if dtype not in _CORE_DTYPES:
            raise CheckpointError(f"{path}: tensor {_short(name)} is stored as {dtype}; qwen_native reads BF16, F16 "
                                  "and F32 checkpoints (not quantized ones): use the model's original safetensors "
                                  "weights")
        seen.add(name)
    missing = [n for n in expected if n not in seen]
    if missing == ["lm_head.weight"] and not config.tie_word_embeddings:
        raise CheckpointError("tensor lm_head.weight is missing from the checkpoint, and config.json has "
                              f"tie_word_embeddings false; {mismatch}")
    missing = [n for n in missing if n != "lm_head.weight"]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]}{more} is missing from the checkpoint: an incomplete download or "
                              f"a shard left out? Download the model files again; or {mismatch}")


def checkpoint_dtype(table: Sequence[TensorEntry]) -> str:
    """The dtype most of the weight bytes are stored in ("BF16", "F16", "F32", ...)."""
    by_dtype: Dict[str, int] = {}
    for _, _, dtype, _, _, nbytes in table:
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return max(by_dtype, key=lambda d: by_dtype[d])


def read_index(path: str) -> List[str]:
    """The shard file names a model.safetensors.index.json file names (see :func:`index_shards`)."""
    from .config import read_json

    return index_shards(read_json(path, error=CheckpointError), path)


def index_shards(index: Any, index_path: str = "model.safetensors.index.json") -> List[str]:
    """Shard file names named by a model.safetensors.index.json (parsed), each once, in first-seen order. Names
    must be plain file names inside the snapshot: no directories, '..' or drive letters."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no \"weight_map\" object naming the shards; the file is corrupt: "
                              f"{_FIX}")
    shards: List[str] = []
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not _PLAIN_SHARD.match(shard) or ".." in shard:
            raise CheckpointError(
                f"{index_path}: tensor {_short(tensor)} points at {_short(shard)}, which is not a plain "
                "'*.safetensors' file name in the model directory; refusing to read it")
        if shard not in shards:
            shards.append(shard)
    return shards

