"""An independent numpy float64 Qwen2ForCausalLM: the whole sequence at once, no KV cache, written from the
transformers modeling code's math (not from our C++). Rotary angles are float32 like transformers computes them."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from fixtures import head_dim


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rotary(positions: np.ndarray, hd: int, theta: float):
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)))).astype(np.float32)
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # float32, as transformers
    emb = np.concatenate([angles, angles], axis=-1).astype(np.float64)
    return np.cos(emb), np.sin(emb)


def _rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def reference_logits(weights: Dict[str, np.ndarray], cfg: dict, ids: Sequence[int]) -> np.ndarray:
    """Logits (T, vocab) in float64 for token ids at positions 0..T-1."""
    W = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    T = len(ids)
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim(cfg)
    eps = cfg["rms_norm_eps"]
    cos, sin = _rotary(np.arange(T), hd, cfg["rope_theta"])  # (T, hd)
    mask = np.triu(np.full((T, T), -np.inf), k=1)

    x = W["model.embed_tokens.weight"][np.asarray(ids)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rmsnorm(x, W[p + "input_layernorm.weight"], eps)
        q = h @ W[p + "self_attn.q_proj.weight"].T + W[p + "self_attn.q_proj.bias"]
        k = h @ W[p + "self_attn.k_proj.weight"].T + W[p + "self_attn.k_proj.bias"]
        v = h @ W[p + "self_attn.v_proj.weight"].T + W[p + "self_attn.v_proj.bias"]
        q = q.reshape(T, nh, hd).transpose(1, 0, 2)   # (nh, T, hd)
        k = k.reshape(T, nkv, hd).transpose(1, 0, 2)  # (nkv, T, hd)
        v = v.reshape(T, nkv, hd).transpose(1, 0, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = np.repeat(k, nh // nkv, axis=0)  # kv head g serves query heads g*group .. (g+1)*group-1
        v = np.repeat(v, nh // nkv, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(T, nh * hd)
        x = x + attn @ W[p + "self_attn.o_proj.weight"].T
        h = _rmsnorm(x, W[p + "post_attention_layernorm.weight"], eps)
        gate = h @ W[p + "mlp.gate_proj.weight"].T
        up = h @ W[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ W[p + "mlp.down_proj.weight"].T
    x = _rmsnorm(x, W["model.norm.weight"], eps)
    lm_head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return x @ lm_head.T


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the largest |b|."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))
