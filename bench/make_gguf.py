"""Writes an unquantised GGUF (F32, F16 or BF16) of a Qwen2 Hugging Face checkpoint, so that the llama.cpp peer can
be benchmarked on the same weights as we are, in the same precision. Needs numpy and the `gguf` package (the one
llama.cpp publishes on PyPI); this is our own small writer for Qwen2 only, not llama.cpp's converter.

    python bench/make_gguf.py /path/to/hf-model-dir out.gguf --type f16

Tensors are read straight from the safetensors files (F32/F16/BF16), one at a time, and converted with numpy:
bf16 → f16 rounds to nearest (every bf16 weight of these models is within f16 range; values beyond it are
reported), bf16 → f32 and bf16 → bf16 are exact. 1-D tensors (norms, biases) stay F32 as llama.cpp expects. The
tokenizer is written from tokenizer.json (byte-level BPE: tokens, types, merges) with the special ids from
config.json / generation_config.json and the chat template from tokenizer_config.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
from typing import Dict, List, Tuple

import numpy as np

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    if hf in _TOP_NAMES:
        return _TOP_NAMES[hf]
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", hf)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ValueError(f"no GGUF name for tensor {hf!r} (not a Qwen2 checkpoint?)")


def safetensors_entries(model_dir: str) -> List[Tuple[str, str, str, List[int], int]]:
    """(name, path, dtype, shape, absolute byte offset) of every tensor, in file order."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = list(dict.fromkeys(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = []
    for fn in files:
        path = os.path.join(model_dir, fn)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                out.append((name, path, info["dtype"], info["shape"], 8 + n + info["data_offsets"][0]))
    return out


def load_tensor(path: str, dtype: str, shape: List[int], offset: int) -> np.ndarray:
    if dtype not in _ST_DTYPES:
        raise ValueError(f"unsupported safetensors dtype {dtype}")
    count = int(np.prod(shape)) if shape else 1
    return np.fromfile(path, dtype=_ST_DTYPES[dtype], count=count, offset=offset).reshape(shape)


def convert(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """src: safetensors dtype; dst: "f32" | "f16" | "bf16" (bf16 returned as uint16 bit patterns)."""
    f32 = (arr.astype(np.uint32) << 16).view(np.float32) if src == "BF16" else arr.astype(np.float32)
    if dst == "f32":
        return f32
    if dst == "f16":
        big = np.abs(f32) > 65504
        if big.any():
            print(f"warning: {int(big.sum())} values exceed the f16 range and become inf", file=sys.stderr)
        return f32.astype(np.float16)
    if src == "BF16":
        return arr
    u = f32.view(np.uint32).astype(np.uint64)  # round to nearest even
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def tokenizer_fields(model_dir: str, vocab_size: int):
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    if tok["model"]["type"] != "BPE":
        raise ValueError("only byte-level BPE tokenizers (Qwen2) are supported")
    tokens: Dict[int, Tuple[str, int]] = {i: (t, 1) for t, i in tok["model"]["vocab"].items()}  # 1 = NORMAL
    for a in tok.get("added_tokens", []):
        tokens[a["id"]] = (a["content"], 3 if a.get("special") else 4)  # 3 = CONTROL, 4 = USER_DEFINED
    n = max(vocab_size, max(tokens) + 1)
    names = [tokens.get(i, (f"[PAD{i}]", 5))[0] for i in range(n)]  # 5 = UNUSED: padding rows of the matrix
    types = [tokens.get(i, (None, 5))[1] for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return names, types, merges


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--type", choices=["f32", "f16", "bf16"], default="f16")
    args = ap.parse_args(argv)

    import gguf

    with open(os.path.join(args.model_dir, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "qwen2":
        raise SystemExit(f"model_type is {cfg.get('model_type')!r}; this writer handles qwen2 only")
    gen = {}
    gpath = os.path.join(args.model_dir, "generation_config.json")
    if os.path.exists(gpath):
        with open(gpath) as f:
            gen = json.load(f)
    tcfg = {}
    tpath = os.path.join(args.model_dir, "tokenizer_config.json")
    if os.path.exists(tpath):
        with open(tpath) as f:
            tcfg = json.load(f)

    qt = gguf.GGMLQuantizationType
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[args.type]
    w = gguf.GGUFWriter(args.out, "qwen2")
    w.add_name(os.path.basename(os.path.normpath(args.model_dir)) + f" {args.type.upper()}")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_file_type(int(file_type))

    names, types, merges = tokenizer_fields(args.model_dir, cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(names)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    w.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    if cfg.get("bos_token_id") is not None:
        w.add_bos_token_id(cfg["bos_token_id"])
    pad = gen.get("pad_token_id", cfg.get("bos_token_id"))
    if pad is not None:
        w.add_pad_token_id(pad[0] if isinstance(pad, list) else pad)
    w.add_add_bos_token(False)
    if isinstance(tcfg.get("chat_template"), str):
        w.add_chat_template(tcfg["chat_template"])

    entries = safetensors_entries(args.model_dir)
    if cfg.get("tie_word_embeddings") and any(e[0] == "lm_head.weight" for e in entries):
        entries = [e for e in entries if e[0] != "lm_head.weight"]  # tied: llama.cpp reads token_embd as output
    plan = []
    for name, path, dt, shape, off in entries:
        dst = args.type if len(shape) >= 2 else "f32"
        np_dtype, raw = {"f32": (np.float32, None), "f16": (np.float16, None), "bf16": (np.uint16, qt.BF16)}[dst]
        nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        w.add_tensor_info(gguf_name(name), shape, np.dtype(np_dtype), nbytes, raw_dtype=raw)
        plan.append((name, path, dt, shape, off, dst))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, path, dt, shape, off, dst) in enumerate(plan):
        w.write_tensor_data(np.ascontiguousarray(convert(load_tensor(path, dt, shape, off), dt, dst)))
        if (i + 1) % 50 == 0 or i + 1 == len(plan):
            print(f"{i + 1}/{len(plan)} tensors", file=sys.stderr)
    w.close()
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e9:.2f} GB, {args.type.upper()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
