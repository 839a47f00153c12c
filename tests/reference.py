"""An independent numpy float64 Qwen2ForCausalLM: the whole sequence at once, no KV cache, written from the
transformers modeling code's math (not from our C++). Rotary angles are float32 like transformers computes them."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import numpy as np

from fixtures import bf16_round, head_dim


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


def quantize_inputs(x: np.ndarray) -> np.ndarray:
    """What the quantized matmuls multiply instead of x (float32 rows): each group of 32 rounded to int8 levels of
    step max|x| / 127 (nearest even), times that step."""
    x = np.asarray(x, dtype=np.float32)
    n, k = x.shape
    pad = -k % 32
    g = np.concatenate([x, np.zeros((n, pad), np.float32)], axis=1).reshape(n, -1, 32)
    step = (np.abs(g).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(step > 0, np.float32(1) / np.where(step > 0, step, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.rint(g * inv)
    return (q * step).astype(np.float32).reshape(n, -1)[:, :k]


def reference_logits(weights: Dict[str, np.ndarray], cfg: dict, ids: Sequence[int], quantized: Sequence[str] = (),
                     quantized_rows: Union[Sequence[int], Dict[str, Sequence[int]]] = (),
                     bf16_rows: Optional[Dict[str, Sequence[int]]] = None) -> np.ndarray:
    """Logits (T, vocab) in float64 for token ids at positions 0..T-1. The inputs of the matmuls with the weights
    named in `quantized` are rounded by quantize_inputs in the rows `quantized_rows` (the same for every name, or
    per name); the matmuls named in `bf16_rows` take inputs and weights rounded to bfloat16 in those rows."""
    W = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}

    def rows(spec, name: str) -> np.ndarray:
        r = spec.get(name, ()) if isinstance(spec, dict) else spec
        return np.asarray(sorted(r), dtype=np.int64)

    def mm(h: np.ndarray, name: str) -> np.ndarray:
        out = h @ W[name].T
        qrows = rows(quantized_rows, name) if name in quantized else rows((), name)
        brows = rows(bf16_rows or {}, name)
        if qrows.size:
            out[qrows] = quantize_inputs(h[qrows].astype(np.float32)).astype(np.float64) @ W[name].T
        if brows.size:
            out[brows] = bf16_round(h[brows]).astype(np.float64) @ bf16_round(W[name]).astype(np.float64).T
        return out
    T = len(ids)
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim(cfg)
    eps = cfg["rms_norm_eps"]
    cos, sin = _rotary(np.arange(T), hd, cfg["rope_theta"])  # (T, hd)
    mask = np.triu(np.full((T, T), -np.inf), k=1)

    x = W["model.embed_tokens.weight"][np.asarray(ids)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rmsnorm(x, W[p + "input_layernorm.weight"], eps)
        q = mm(h, p + "self_attn.q_proj.weight") + W[p + "self_attn.q_proj.bias"]
        k = mm(h, p + "self_attn.k_proj.weight") + W[p + "self_attn.k_proj.bias"]
        v = mm(h, p + "self_attn.v_proj.weight") + W[p + "self_attn.v_proj.bias"]
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
        x = x + mm(attn, p + "self_attn.o_proj.weight")
        h = _rmsnorm(x, W[p + "post_attention_layernorm.weight"], eps)
        gate = mm(h, p + "mlp.gate_proj.weight")
        up = mm(h, p + "mlp.up_proj.weight")
        x = x + mm(gate / (1.0 + np.exp(-gate)) * up, p + "mlp.down_proj.weight")
    x = _rmsnorm(x, W["model.norm.weight"], eps)
    return mm(x, "lm_head.weight" if "lm_head.weight" in W else "model.embed_tokens.weight")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the largest |b|."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))
