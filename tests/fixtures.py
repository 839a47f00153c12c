"""Tiny random Qwen2 checkpoints written to disk as real files (config.json, generation_config.json, safetensors
in F32/BF16/F16, optionally sharded with an index), for every test that needs a model."""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, Optional

import numpy as np

BASE_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 97,  # odd on purpose
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 2,
    "attention_dropout": 0.0,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "torch_dtype": "float32",
}


def make_config(**overrides) -> dict:
    cfg = dict(BASE_CONFIG)
    cfg.update(overrides)
    return cfg


def core_config(cfg: dict) -> dict:
    """config.json as the native core takes it: resolved (defaults filled in) by the Python layer."""
    from qwen_native.config import parse_config

    return parse_config(cfg).to_core_dict()


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def random_weights(cfg: dict, seed: int = 0, tied: Optional[bool] = None) -> Dict[str, np.ndarray]:
    """float32 weights of a Qwen2ForCausalLM with the given config; scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = head_dim(cfg)
    qd, kvd = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    tied = cfg["tie_word_embeddings"] if tied is None else tied

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def vec(n, center=0.0, scale=0.1):
        return (center + scale * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((V, H)).astype(np.float32),
         "model.norm.weight": vec(H, 1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = vec(H, 1.0)
        w[p + "self_attn.q_proj.weight"] = mat(qd, H)
        w[p + "self_attn.q_proj.bias"] = vec(qd, 0.0, 0.5)
        w[p + "self_attn.k_proj.weight"] = mat(kvd, H)
        w[p + "self_attn.k_proj.bias"] = vec(kvd, 0.0, 0.5)
        w[p + "self_attn.v_proj.weight"] = mat(kvd, H)
        w[p + "self_attn.v_proj.bias"] = vec(kvd, 0.0, 0.5)
        w[p + "self_attn.o_proj.weight"] = mat(H, qd)
        w[p + "post_attention_layernorm.weight"] = vec(H, 1.0)
        w[p + "mlp.gate_proj.weight"] = mat(I, H)
        w[p + "mlp.up_proj.weight"] = mat(I, H)
        w[p + "mlp.down_proj.weight"] = mat(H, I)
    if not tied:
        w["lm_head.weight"] = mat(V, H)
    return w


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns, round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_round(a: np.ndarray) -> np.ndarray:
    """The float32 values a bfloat16 checkpoint of `a` holds."""
    return (to_bf16_bits(a).astype(np.uint32) << 16).view(np.float32)


def stored_values(weights: Dict[str, np.ndarray], dtype: str) -> Dict[str, np.ndarray]:
    """What a checkpoint written with `dtype` holds, as float32."""
    if dtype == "BF16":
        return {k: bf16_round(v) for k, v in weights.items()}
    if dtype == "F16":
        return {k: v.astype(np.float16).astype(np.float32) for k, v in weights.items()}
    return dict(weights)


def write_safetensors(path: str, tensors: Dict[str, np.ndarray], dtype: str = "F32",
                      metadata: Optional[dict] = None) -> None:
    """Writes the safetensors format by hand (numpy has no bfloat16): 8-byte header length, JSON header, data."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    blobs, offset = [], 0
    for name, arr in tensors.items():
        if dtype == "BF16":
            raw = to_bf16_bits(arr).tobytes()
        elif dtype == "F16":
            raw = np.ascontiguousarray(arr, dtype=np.float16).tobytes()
        else:
            raw = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)


def write_checkpoint(directory: str, cfg: dict, weights: Dict[str, np.ndarray], dtype: str = "F32",
                     shards: int = 1, generation_config: Optional[dict] = None) -> str:
    """config.json + generation_config.json + model.safetensors (or an index and `shards` shard files)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    gen = generation_config if generation_config is not None else {
        "bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"), "do_sample": False}
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    names = list(weights)
    if shards == 1:
        write_safetensors(os.path.join(directory, "model.safetensors"), weights, dtype)
        return directory
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s::shards]}
        write_safetensors(os.path.join(directory, fname), part, dtype)
        weight_map.update({n: fname for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    return directory
