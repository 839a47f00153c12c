"""The quantized weight formats (int8 and int4, tensor.h) against a numpy reference of the same formats: the bytes
the loader writes (decoded here from the documented layout), how close they are to the weights, and every forward
path of a model stored in them (prefill on dequantized tiles, one-row passes on integer dot products of
int8-quantized inputs) against the numpy reference model run on the same dequantized weights."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from fixtures import bf16_round, core_config, make_config, random_weights, write_checkpoint
from qwen_native import _core
from qwen_native.checkpoint import tensor_table
from reference import quantize_inputs, reference_logits, rel_err

G, R = 32, 4  # values per group, rows per block
IDS = [3, 17, 256, 42, 9, 120, 255, 1, 77, 5, 64, 299]
NEXT = [11, 200, 7, 150, 33, 90]


def coded_parts(q: np.ndarray, fmt: str, n: int, k: int):
    """The formats' parts per row, read from the layout tensor.h documents: D (n, 1) as float32, the codes a (uint8)
    and (int4) c (int8) per group (n, groups), the levels (n, groups, 32: int8's signed)."""
    groups = -(-k // G)
    codes, high = (2, 0) if fmt == "int4" else (1, 8)  # a row's bytes of codes and of top bits per group
    blocks = q.reshape(q.shape[0], -1)
    D = blocks[:, :2 * R].copy().view(np.uint16).astype(np.uint32) << 16  # bfloat16 D0..D3
    D = D.view(np.float32).reshape(-1, 1)[:n]
    if fmt == "int8":
        body = blocks[:, 2 * R:].reshape(-1, groups, R * (1 + G))
        a = body[:, :, :R].transpose(0, 2, 1).reshape(-1, groups)[:n]
        levels = body[:, :, R:].reshape(-1, groups, R, G).transpose(0, 2, 1, 3).reshape(-1, groups, G)[:n]
        return D, a, None, levels.view(np.int8)
    body = blocks[:, 2 * R:].reshape(-1, groups, R * (codes + G // 2 + high))
    a = body[:, :, :R].transpose(0, 2, 1).reshape(-1, groups)[:n]
    c = body[:, :, R:2 * R].view(np.int8).transpose(0, 2, 1).reshape(-1, groups)[:n] if codes == 2 else None
    at = codes * R
    nib = body[:, :, at:at + R * G // 2].reshape(-1, groups, R, G // 2).transpose(0, 2, 1, 3)
    nib = nib.reshape(-1, groups, G // 2)[:n].astype(np.int32)
    levels = np.concatenate([nib & 15, nib >> 4], axis=-1)
    if high:
        h = body[:, :, at + R * G // 2:].reshape(-1, groups, R, 8).transpose(0, 2, 1, 3)
        h = h.reshape(-1, groups, 8)[:n].astype(np.int32)
        top = np.concatenate([(h >> (2 * s)) & 3 for s in range(4)], axis=-1)  # value j + 8s: bits 2s of byte j
        levels = levels | (top << 4)
    return D, a, c, levels


def decode(q: np.ndarray, fmt: str, n: int, k: int) -> np.ndarray:
    """The values a block of bytes stands for, read from the layout tensor.h documents."""
    D, a, c, levels = coded_parts(q, fmt, n, k)
    d = (D * a.astype(np.float32))[..., None]  # exact: D has 8 significant bits, a 8
    if fmt == "int8":  # symmetric: d q, exact
        return (d * levels.astype(np.float32)).reshape(n, -1)[:, :k]
    if fmt == "int6":  # symmetric: d (q - 32), exact
        return (d * (levels.astype(np.float32) - 32)).reshape(n, -1)[:, :k]
    m = -d * c.astype(np.float32)[..., None] / 8  # exact
    return (d * levels.astype(np.float32) + m).reshape(n, -1)[:, :k]


def bf16_ceil(v: np.ndarray) -> np.ndarray:
    """The smallest float32 of bfloat16 precision at or above each v >= 0."""
    u = np.asarray(v, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0xffff) & 0xffff0000).astype(np.uint32).view(np.float32)


def quantize_q8(w: np.ndarray):
    """int8's parts of w (n, k), computed here the way the format defines them (w of moderate scale, so that the
    core's scaling of each row by a power of two changes nothing): each group's step max|w| / 127; the row's D that
    of the largest step / 255, rounded up to bfloat16 precision; the code a = ceil(step / D); levels rounded."""
    n, k = w.shape
    g = np.concatenate([w, np.zeros((n, -k % G), np.float32)], axis=1).reshape(n, -1, G).astype(np.float32)
    step = np.abs(g).max(axis=-1) / np.float32(127)  # (n, groups)
    D = bf16_ceil(step.max(axis=1, keepdims=True) / np.float32(255))  # (n, 1)
    a = np.where(D > 0, np.minimum(np.ceil(step / np.where(D > 0, D, 1)), 255), 0).astype(np.float32)
    d = (D * a)[..., None]
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    levels = np.clip(np.rint(g * inv), -127, 127).astype(np.int8)
    return D, a.astype(np.uint8), levels


SHAPES = [(1, 1), (3, 31), (4, 32), (5, 33), (9, 97), (16, 1536), (37, 200)]


@pytest.mark.parametrize("n, k", SHAPES)
def test_int8_bytes_are_the_format(n, k):
    """What the loader stores for int8 is, level for level and code for code, the format's definition (8.25 bits a
    weight), and every value is within half its group's step."""
    rng = np.random.default_rng(n * 1000 + k)
    w = (rng.standard_normal((n, k)) * 0.05 * rng.uniform(0.1, 1, (n, 1))).astype(np.float32)
    q = _core._quantize(w, "int8")
    assert q.nbytes == -(-n // R) * R * (2 + -(-k // G) * (1 + G))  # + a bfloat16 D a row
    D, a, levels = quantize_q8(w)
    gD, ga, _, glevels = coded_parts(q, "int8", n, k)
    np.testing.assert_array_equal(gD, D)
    np.testing.assert_array_equal(ga, a)
    np.testing.assert_array_equal(glevels, levels)
    expect = ((D * a.astype(np.float32))[..., None] * levels.astype(np.float32)).reshape(n, -1)[:, :k]
    np.testing.assert_array_equal(decode(q, "int8", n, k), expect)
    np.testing.assert_array_equal(_core._dequantize(q, "int8", n, k), expect)
    step = (D * a.astype(np.float32)).repeat(G, 1)[:, :k]
    assert np.all(np.abs(decode(q, "int8", n, k) - w) <= step / 2 + 1e-7)


@pytest.mark.parametrize("fmt", ["int4", "int6"])
@pytest.mark.parametrize("n, k", SHAPES)
def test_coded_bytes_decode_and_beat_plain_rounding(n, k, fmt):
    """int4 / int6 bytes decode (here, from the documented layout) to what the core dequantizes, every value one
    float32 rounding of exact terms; the levels are in range; and the chosen codes reconstruct each row at least as
    well as plain rounding with float32 steps would (int4: min/max; int6: the largest |value| onto -32..31): the
    error-minimising search wins more than the 8-bit codes cost (for int4 clearly, overall)."""
    rng = np.random.default_rng(n * 1000 + k)
    w = (rng.standard_normal((n, k)) * 0.05 + rng.standard_normal((n, 1)) * 0.01).astype(np.float32)
    q = _core._quantize(w, fmt)
    group_bytes = 18 if fmt == "int4" else 25  # a row's: codes and levels, 4.5 / 6.25 bits a weight
    assert q.nbytes == -(-n // R) * R * (2 + -(-k // G) * group_bytes)  # + a bfloat16 D a row
    got = decode(q, fmt, n, k)
    np.testing.assert_array_equal(_core._dequantize(q, fmt, n, k), got)
    D, a, c, levels = coded_parts(q, fmt, n, k)
    assert np.all(levels <= (15 if fmt == "int4" else 63))
    pad = -k % G
    wg = np.concatenate([w, np.zeros((n, pad), np.float32)], axis=1).reshape(n, -1, G)
    gg = np.concatenate([got, np.zeros((n, pad), np.float32)], axis=1).reshape(n, -1, G)
    if fmt == "int4":
        mn, mx = wg.min(-1, keepdims=True), wg.max(-1, keepdims=True)
        d = np.where(mx > mn, (mx - mn) / 15, 1)
        plain = np.clip(np.rint((wg - mn) / d), 0, 15) * d + mn
    else:
        d = np.maximum(wg.max(-1, keepdims=True) / 31, -wg.min(-1, keepdims=True) / 32)
        d = np.where(d > 0, d, 1)
        plain = np.clip(np.rint(wg / d), -32, 31) * d
    # A last group shorter than 32 is fitted with its zero padding: compare whole groups.
    full = k // G
    err_ours = ((gg - wg) ** 2)[:, :full].sum((-1, -2))
    err_plain = ((plain - wg) ** 2)[:, :full].sum((-1, -2))
    assert np.all(err_ours <= err_plain * 1.02 + 1e-12)
    if n * full >= 8:  # and better overall, where there are enough groups to say
        assert err_ours.sum() < (0.9 if fmt == "int4" else 1.0) * err_plain.sum()


@pytest.mark.parametrize("fmt", ["int8", "int4", "int6"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38, -2 ** 125])
def test_a_value_that_does_not_fit_is_an_error(fmt, bad):
    """inf and NaN, and values so large (|x| >= 2^125) that a group's range or sums could overflow float32."""
    w = np.ones((3, 40), np.float32)
    w[1, 33] = bad
    with pytest.raises(ValueError, match="does not fit"):
        _core._quantize(w, fmt)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int6"])
def test_any_scale_quantizes_alike(fmt):
    """A row's codes do not depend on its scale (the search runs on the row scaled by a power of two, and steps are
    codes of a bfloat16 per row, not float16): a row times 2^100 or 2^-100 dequantizes to exactly the row's values
    times that; rows of 1e30 or 1e-30 come within a few percent of the unit row's error (their inputs round
    differently), never to garbage."""
    w = np.random.default_rng(2).standard_normal((8, 96)).astype(np.float32)
    unit = _core._dequantize(_core._quantize(w, fmt), fmt, 8, 96)
    for e in (100, -100):
        ws = np.ldexp(w, e).astype(np.float32)
        np.testing.assert_array_equal(_core._dequantize(_core._quantize(ws, fmt), fmt, 8, 96), np.ldexp(unit, e))
    for scale in (np.float32(1e30), np.float32(1e-30)):
        ws = w * scale
        assert rel_err(_core._dequantize(_core._quantize(ws, fmt), fmt, 8, 96), ws) < 1.1 * rel_err(unit, w)


# --- models ------------------------------------------------------------------------------------------------------

def model(tmp_path, **overrides):
    cfg = make_config(**overrides)
    weights = random_weights(cfg, seed=0)
    d = str(tmp_path / "ckpt")
    write_checkpoint(d, cfg, weights, "BF16")
    table = tensor_table(sorted(glob.glob(os.path.join(d, "*.safetensors"))))
    stored = {k: v.astype(np.float32) for k, v in random_weights(cfg, seed=0).items()}
    from fixtures import stored_values
    return cfg, table, stored_values(stored, "BF16")


def close(got, ref):
    """Row by row against the reference. An input within float32 rounding of a boundary between two int8 levels may
    round the other way in the float64 reference: one level (1/127 of its group's range) in one input, which moves
    the logits of that row (and, through its keys and values, of later rows) by about 1%. A wrong scale, offset,
    nibble or layout moves them by their whole size. (The kernels' rounding itself is checked exactly in
    test_quantize_inputs_reference_is_what_the_kernels_do.)"""
    errs = np.array([rel_err(g, r) for g, r in zip(got, ref)])
    assert errs.max() < 3e-2, errs
    assert errs[0] < 1e-4 or errs.min() < 1e-4, errs  # rows before any such rounding agree to float32 rounding


def dequantized(weights, formats):
    """The weights as the quantized model holds them: each matrix of `formats` through the format and back."""
    out = dict(weights)
    for name, fmt in formats.items():
        w = weights[name]
        out[name] = _core._dequantize(_core._quantize(w, fmt), fmt, *w.shape).astype(np.float32)
    return out


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("variant", [dict(), dict(tie_word_embeddings=False, intermediate_size=96),
                                     dict(hidden_size=40, head_dim=20, num_attention_heads=2, num_key_value_heads=1,
                                          intermediate_size=61, vocab_size=271)])
def test_quantized_model_matches_the_reference(tmp_path, dtype, variant):
    """Prefill and one-row decode steps (integer dot products of int8-quantized inputs for the runs the kernel set
    takes on integers: up to 96 rows, or all with VNNI) against the numpy reference on the same dequantized weights,
    with every matmul input rounded the same way; and a prompt run as a batch gives exactly the logits it gives token
    by token."""
    cfg, table, w = model(tmp_path, **variant)
    ids = [i % cfg["vocab_size"] for i in IDS]
    nxt = [i % cfg["vocab_size"] for i in NEXT]
    matrices = [n for n, v in w.items() if v.ndim == 2]
    wq = dequantized(w, {n: dtype for n in matrices})
    m = _core.Model(core_config(cfg), table, dtype=dtype, num_threads=2)
    assert m.weight_format == dtype
    ref = reference_logits(wq, cfg, ids + nxt, quantized=matrices, quantized_rows=range(len(ids) + len(nxt)))
    batched = m.prefill(ids, all_logits=True)
    got = np.concatenate([batched, np.stack([m.decode(tok) for tok in nxt])])
    close(got, ref)
    m.reset()
    np.testing.assert_array_equal(np.stack([m.decode(t) for t in ids]), batched)  # batch-invariant rows
    # and the quantization itself is not what is being hidden: far from the unquantized model's logits at int4
    plain = reference_logits(w, cfg, ids)
    assert rel_err(ref[:len(ids)], plain) > (1e-3 if dtype == "int4" else 1e-5)


@pytest.mark.parametrize("tied, wider", [(False, {"lm_head.weight": "int8"}),  # and a float32 embedding
                                         (False, {"lm_head.weight": "int6", "model.embed_tokens.weight": "int6"}),
                                         (True, {"model.embed_tokens.weight": "int6"})])  # load(dtype="int4")'s mix
def test_mixed_quantized_and_plain_formats(tmp_path, tied, wider):
    """int4 layers with a wider embedding and lm_head in one model."""
    cfg, table, w = model(tmp_path, tie_word_embeddings=tied)
    formats = {n: "int4" for n, v in w.items() if v.ndim == 2 and n.startswith("model.layers.")}
    formats.update(wider)
    m = _core.Model(core_config(cfg), table, dtype="float32", num_threads=1, weight_formats=formats)
    assert m.weight_format == "mixed"
    wq = dequantized(w, formats)
    ref = reference_logits(wq, cfg, IDS + NEXT[:2], quantized=list(formats), quantized_rows=range(len(IDS) + 2))
    close(np.concatenate([m.prefill(IDS, all_logits=True), [m.decode(NEXT[0])], [m.decode(NEXT[1])]]), ref)


def test_quantize_inputs_reference_is_what_the_kernels_do():
    """The reference's rounding of matmul inputs against the kernels: a quantized matmul equals the rounded
    inputs times the dequantized weight (and differs from the unrounded inputs' product)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 100)).astype(np.float32)
    w = rng.standard_normal((8, 100)).astype(np.float32)
    for fmt in ("int8", "int4", "int6"):
        wq = _core._dequantize(_core._quantize(w, fmt), fmt, 8, 100).astype(np.float64)
        got = _core._backend_matmul(x, w, dtype=fmt)
        np.testing.assert_allclose(got, quantize_inputs(x).astype(np.float64) @ wq.T, rtol=1e-5, atol=1e-5)
        assert np.abs(got - x.astype(np.float64) @ wq.T).max() > 1e-4


@pytest.mark.parametrize("fmt", ["int8", "int4", "int6"])
def test_a_long_run_of_each_format(fmt):
    """One matmul of more rows than the kernel set takes on integers (where it has a limit): tiles of dequantized
    rows, float32 through sgemm, or bf16 (inputs and weights rounded) through the VDPBF16PS GEMM on AVX512-BF16
    CPUs, except the last row: on integers, as that row alone; odd n and k, a bias."""
    limit = _core.quant_dot_rows(fmt)
    T = min(limit, 200) + 3
    rng = np.random.default_rng(7)
    x = rng.standard_normal((T, 301)).astype(np.float32)
    w = rng.standard_normal((45, 301)).astype(np.float32)
    b = rng.standard_normal(45).astype(np.float32)
    wq = _core._dequantize(_core._quantize(w, fmt), fmt, 45, 301).astype(np.float64)
    ref = quantize_inputs(x).astype(np.float64) @ wq.T  # integers (VNNI without BF16: at any length)
    if T > limit and _core.isa().endswith("+bf16"):
        ref[:-1] = bf16_round(x[:-1]).astype(np.float64) @ bf16_round(wq).astype(np.float64).T
    elif T > limit:
        ref[:-1] = x[:-1].astype(np.float64) @ wq.T
    got = _core._backend_matmul(x, w, bias=b, dtype=fmt, num_threads=2)
    assert rel_err(got, ref + b) < 1e-5
    np.testing.assert_array_equal(got[-1:], _core._backend_matmul(x[-1:], w, bias=b, dtype=fmt, num_threads=2))


def test_long_runs_take_tiles_or_integers(tmp_path):
    """An int8 run longer than the kernel set's integer limit (96 rows without VNNI, 64 with AVX512-BF16, none
    with VNNI alone) takes tiles of dequantized rows: float32 through sgemm with unrounded inputs, or on AVX512-BF16
    CPUs bf16 through the VDPBF16PS GEMM, inputs and weights rounded to bf16; its last row takes integers, as alone.
    The lm_head takes at most 32 rows at a time: its inputs are rounded to int8."""
    cfg, table, w = model(tmp_path, max_position_embeddings=256)
    ids = [int(i) for i in np.random.default_rng(5).integers(0, cfg["vocab_size"], 120)]
    T = len(ids)
    matrices = [n for n, v in w.items() if v.ndim == 2]
    wq = dequantized(w, {n: "int8" for n in matrices})
    m = _core.Model(core_config(cfg), table, dtype="int8", num_threads=2)
    long_run = _core.quant_dot_rows("int8") < T
    layers = [n for n in matrices if n.startswith("model.layers.")]
    rounded = {n: range(T) if n not in layers or not long_run else [T - 1] for n in matrices}
    bf16_rows = {n: range(T - 1) for n in layers} if long_run and _core.isa().endswith("+bf16") else {}
    ref = reference_logits(wq, cfg, ids, quantized=matrices, quantized_rows=rounded, bf16_rows=bf16_rows)
    got = m.prefill(ids, all_logits=True)
    close(got, ref)
    if not long_run:
        return  # integer dot products all through: compared as test_quantized_model_matches_the_reference does
    # a rounding flip in the lm_head's input moves one row only: the layers themselves agree to float32 rounding
    assert np.median([rel_err(g, r) for g, r in zip(got, ref)]) < 1e-4
    # the last row's logits are those of the last token recomputed alone on the cached rest (a repeated prompt)
    m.truncate(T - 1)
    np.testing.assert_array_equal(m.prefill(ids[-1:]), got[-1])
