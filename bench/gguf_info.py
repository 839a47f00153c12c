"""Reads a GGUF file's header (metadata and tensor table, not the tensor data) with the standard library only, so
the benchmark can say what a llama.cpp peer actually streams per token: the byte size of each stored tensor, in
whatever type (F32, F16, BF16, Q4_K, Q6_K, ...) the file holds it.

Layout (GGUF v2/v3, little-endian): magic b"GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata
pairs (string key, u32 value type, value), then per tensor (string name, u32 dimension count, u64 dims with the
fastest-varying first, u32 ggml type, u64 offset into the data section), then padding to `general.alignment` (32 by
default) and the data section. A tensor's stored size is the distance to the next tensor's offset (the last one:
to the end of the file), which needs no table of quantisation block sizes; alignment padding (< 32 bytes per
tensor) is counted with it and is negligible.
"""

from __future__ import annotations

import os
import struct
from typing import Any, BinaryIO, Dict, List

# ggml tensor type ids → names (the ones a Qwen GGUF may hold; others are shown as "type<N>").
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
}

# llama.cpp's `general.file_type` values (the "mostly X" label a converter writes) → names.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS",
    20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    pass


def _read(f: BinaryIO, n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise GGUFError("unexpected end of file in the GGUF header")
    return b


def _unpack(f: BinaryIO, fmt: str) -> Any:
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _string(f: BinaryIO) -> str:
    n = _unpack(f, "<Q")
    if n > 1 << 24:
        raise GGUFError(f"implausible string length {n} in the GGUF header")
    return _read(f, n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _SCALARS:
        return _unpack(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        etype, n = _unpack(f, "<I"), _unpack(f, "<Q")
        if etype in _SCALARS and not keep:  # skip big arrays (token lists, merges) without decoding them
            f.seek(n * struct.calcsize(_SCALARS[etype]), os.SEEK_CUR)
            return f"<array of {n}>"
        items = [_value(f, etype, keep) for _ in range(n)]
        return items if keep else f"<array of {n}>"
    raise GGUFError(f"unknown GGUF metadata value type {vtype}")


def read_gguf(path: str) -> Dict[str, Any]:
    """{"version", "metadata": {key: value (arrays summarised)}, "tensors": [{"name", "shape", "type", "nbytes"}],
    "file_size"}. Shapes are given slowest-varying first (rows, cols), like numpy and safetensors."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if _read(f, 4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (bad magic)")
        version = _unpack(f, "<I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = _unpack(f, "<Q"), _unpack(f, "<Q")
        meta: Dict[str, Any] = {}
        for _ in range(n_kv):
            key = _string(f)
            vtype = _unpack(f, "<I")
            meta[key] = _value(f, vtype, keep=False)
        infos = []
        for _ in range(n_tensors):
            name = _string(f)
            nd = _unpack(f, "<I")
            dims = [_unpack(f, "<Q") for _ in range(nd)]
            ttype, offset = _unpack(f, "<I"), _unpack(f, "<Q")
            infos.append((name, list(reversed(dims)), ttype, offset))
        align = int(meta.get("general.alignment", 32) or 32)
        data_start = (f.tell() + align - 1) // align * align
    ends = sorted({o for _, _, _, o in infos} | {size - data_start})
    next_offset = {o: ends[i + 1] for i, o in enumerate(ends[:-1])}
    tensors = [{"name": n, "shape": s, "type": GGML_TYPES.get(t, f"type{t}"), "nbytes": next_offset[o] - o}
               for n, s, t, o in infos]
    return {"version": version, "metadata": meta, "tensors": tensors, "file_size": size}


def streamed_bytes_per_token(info: Dict[str, Any]) -> int:
    """Bytes of weights one decoded token reads: every matrix (2-D tensor) except the token embedding table, whose
    one-row gather is negligible; when the file has no separate `output.weight` the embedding is the tied lm_head
    and is counted once."""
    names = {t["name"] for t in info["tensors"]}
    total = 0
    for t in info["tensors"]:
        if len(t["shape"]) < 2:
            continue
        if t["name"] == "token_embd.weight" and "output.weight" in names:
            continue
        total += t["nbytes"]
    return total


def weight_type_label(info: Dict[str, Any]) -> str:
    """What the file is, e.g. "Q4_K_M", "F16", "BF16": `general.file_type` when present, else the type holding most
    of the matrix bytes."""
    ft = info["metadata"].get("general.file_type")
    if isinstance(ft, int) and ft in FILE_TYPES:
        return FILE_TYPES[ft]
    by_type: Dict[str, int] = {}
    for t in info["tensors"]:
        if len(t["shape"]) >= 2:
            by_type[t["type"]] = by_type.get(t["type"], 0) + t["nbytes"]
    return max(by_type, key=lambda k: by_type[k]) if by_type else "unknown"


def type_breakdown(info: Dict[str, Any]) -> List[str]:
    """["Q4_K: 1.02 GB", ...] over the matrices, largest first."""
    by_type: Dict[str, int] = {}
    for t in info["tensors"]:
        if len(t["shape"]) >= 2:
            by_type[t["type"]] = by_type.get(t["type"], 0) + t["nbytes"]
    return [f"{k}: {v / 1e9:.3f} GB" for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])]


if __name__ == "__main__":
    import sys

    for p in sys.argv[1:]:
        info = read_gguf(p)
        print(p, f"v{info['version']}", weight_type_label(info), f"{len(info['tensors'])} tensors",
              f"streamed/token {streamed_bytes_per_token(info) / 1e9:.3f} GB", type_breakdown(info))
