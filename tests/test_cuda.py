"""The CUDA backend against the CPU float32 path, on tiny random checkpoints.

Skipped unless the extension has the CUDA backend and sees a GPU. QWEN_NATIVE_CUDA_CORE=<path of a _core .so>
runs these tests against another build of the extension, e.g. the CPU emulation of the CUDA runtime that
tests/cuda_emu/build.py makes (tests/test_cuda_emulated.py does that), where the heaviest cases are shrunk.

bf16 activations against float32: logits agree to a bf16 rounding (max |gpu - cpu| / max |cpu| within TOL);
greedy tokens agree except where the CPU's own top two logits are closer than that. Quantized (int8, int4) weights:
see their section."""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fixtures import core_config, make_config, random_weights, stored_values, write_checkpoint  # noqa: E402
from qwen_native.checkpoint import tensor_table  # noqa: E402


def _load_core():
    path = os.environ.get("QWEN_NATIVE_CUDA_CORE")
    if not path:
        from qwen_native import _core
        return _core
    spec = importlib.util.spec_from_file_location("_core", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


core = _load_core()
try:
    _lib = ctypes.CDLL(core.__file__)
    EMULATED = hasattr(_lib, "qwen_cuda_emu_graph_launches")
except OSError:
    _lib, EMULATED = None, False
if EMULATED:
    _lib.qwen_cuda_emu_fail_once.argtypes = [ctypes.c_char_p]

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not core.cuda_available(),
                       reason="needs the CUDA backend and a GPU (build info: %s)" % (core.build_info(),)),
]

TOL = 2e-2      # bf16 activations and weights vs float32, max-abs relative
TOL_F32 = 3e-2  # float32 checkpoint rounded to bf16 on the GPU
TOL_Q = 3e-2    # quantized weights, against the CPU's model of the same format (see the quantized section)

# Shapes covering the cases the kernels branch on: GQA group 1, 2, 4, 6, 12 (two decode head batches), head_dim
# 16 / 32 / 64 / 128, tied and untied lm_head, widths the GEMV takes (multiples of 8) and ones it leaves to cuBLAS;
# Qwen2.5-1.5B's attention (12 heads, 2 kv heads, head_dim 128) on a narrow hidden size.
CONFIGS = {
    "gqa2-tied": dict(),                                                        # hd 16, I 97 (down_proj on cuBLAS)
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "mqa": dict(num_key_value_heads=1, intermediate_size=96),
    "group6-hd64": dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=1, intermediate_size=256),
    "group12-hd32": dict(hidden_size=384, num_attention_heads=12, num_key_value_heads=1, intermediate_size=128,
                         tie_word_embeddings=False),
    "hd128": dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, intermediate_size=344),
    "group6-hd128": dict(hidden_size=256, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                         intermediate_size=256),
    "group12-hd128": dict(hidden_size=256, num_attention_heads=12, num_key_value_heads=1, head_dim=128,
                          intermediate_size=128, tie_word_embeddings=False),
    # For quantized weights: q, k and v (18, 6, 6 rows) and gate and up (61 rows each) meet inside blocks of 4 rows,
    # rows of 40 and 61 values end in part-filled groups of 32, and the vocabulary (271) in a part-filled block.
    "odd": dict(hidden_size=40, num_attention_heads=3, num_key_value_heads=1, head_dim=6, intermediate_size=61,
                vocab_size=271),
    # down_proj's 16 blocks of rows are 104 groups wide: its quantized one-token matmul splits them across 8 warps.
    "wide-mlp": dict(intermediate_size=3328),
}
# (the emulation leaves out group6-hd64: its shapes add nothing the others lack, and it is the slowest there)
QUANTIZED_CONFIGS = ["gqa2-tied", "mha-untied", "odd", "wide-mlp"] + ([] if EMULATED else ["group6-hd64"])


def checkpoint(tmp_path, name="gqa2-tied", dtype="BF16", seed=0, quantized=None, **overrides):
    """A checkpoint of CONFIGS[name]. With quantized ("int8" / "int4" for every matrix, or {tensor: format}), an F32
    one of the values the `dtype` checkpoint's tensors have once stored in those formats: the reference that a
    model holding them is exact against."""
    cfg = make_config(**dict(CONFIGS[name], **overrides))
    tag = quantized if isinstance(quantized, (str, type(None))) else "mixed"
    d = str(tmp_path / f"ckpt-{name}-{dtype}-{seed}-{tag}")
    weights = random_weights(cfg, seed=seed)
    if quantized:
        fmts = quantized if isinstance(quantized, dict) else {n: quantized for n, w in weights.items() if w.ndim == 2}
        weights = {n: core._dequantize(core._quantize(w, fmts[n]), fmts[n], *w.shape) if n in fmts else w
                   for n, w in stored_values(weights, dtype).items()}
        dtype = "F32"
    write_checkpoint(d, cfg, weights, dtype=dtype)
    return core_config(cfg), tensor_table(sorted(glob.glob(os.path.join(d, "*.safetensors"))))


def gpu(cfg, table, fmt=None, **kw):
    """On the GPU; with fmt ("int8", "int4"), every matrix stored in that format."""
    return core.Model(cfg, table, dtype=fmt or "bfloat16", device="cuda", **kw)


def cpu(cfg, table, **kw):
    return core.Model(cfg, table, dtype="float32", device="cpu", num_threads=2, **kw)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite values from the GPU"
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def prompt(n, vocab, seed=1):
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n)]


def run_and_compare(g, c, ids, steps, tol):
    """Prefill (every position's logits) and `steps` teacher-forced decode steps on both; worst relative error."""
    lc = c.prefill(ids, all_logits=True)
    worst = rel(g.prefill(ids, all_logits=True), lc)
    tok = int(np.argmax(lc[-1]))
    for _ in range(steps):
        a, b = g.decode(tok), c.decode(tok)
        worst = max(worst, rel(a, b))
        tok = int(np.argmax(b))
    assert worst < tol, f"worst relative error {worst:.3g} over prefill and {steps} decode steps"
    return worst


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_decode_match_cpu(tmp_path, name):
    cfg, table = checkpoint(tmp_path, name)
    g, c = gpu(cfg, table), cpu(cfg, table)
    assert "cuda" in g.backend
    run_and_compare(g, c, prompt(24, cfg["vocab_size"]), 20, TOL)
    assert g.length == c.length == 24 + 20


@pytest.mark.parametrize("mode", ["gemv", "cublas", "auto"])
def test_one_token_matmul_paths(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("QWEN_NATIVE_GEMV", mode)
    cfg, table = checkpoint(tmp_path, "hd128")
    g = gpu(cfg, table)
    run_and_compare(g, cpu(cfg, table), prompt(12, cfg["vocab_size"]), 6, TOL)
    name = g.backend
    if mode == "gemv":
        assert "gemv (forced)" in name and "=gemv/" in name, name
    elif mode == "cublas":
        assert "cublas (forced)" in name, name
    else:
        assert "timed" in name and "=" in name, name  # every decode shape was timed and a choice recorded


def test_f32_checkpoint_is_rounded_to_bf16(tmp_path):
    cfg, table = checkpoint(tmp_path, "mha-untied", dtype="F32")
    run_and_compare(gpu(cfg, table), cpu(cfg, table), prompt(16, cfg["vocab_size"]), 8, TOL_F32)


def test_f16_checkpoint(tmp_path):
    cfg, table = checkpoint(tmp_path, "gqa2-tied", dtype="F16")
    run_and_compare(gpu(cfg, table), cpu(cfg, table), prompt(16, cfg["vocab_size"]), 8, TOL_F32)


def test_greedy_tokens_match_cpu(tmp_path):
    cfg, table = checkpoint(tmp_path, "group6-hd64", seed=3)
    g, c = gpu(cfg, table), cpu(cfg, table)
    ids = prompt(20, cfg["vocab_size"], seed=4)
    lg, lc = g.prefill(ids), c.prefill(ids)
    tg, tc = int(np.argmax(lg)), int(np.argmax(lc))
    matched = 0
    for step in range(20):
        if tg != tc:
            break
        matched += 1
        ref = c.decode(tc)            # the CPU's logits, to judge a disagreement
        tg = g.decode_argmax(tg)      # greedy on the device: 4 bytes back
        tc = int(np.argmax(ref))
    if tg != tc:
        # Allowed only where the CPU's own choice is within bf16 noise of the GPU's.
        ref_last = ref if matched else lc
        gap = float(ref_last[tc] - ref_last[tg])
        assert gap <= TOL * float(np.max(np.abs(ref_last))), \
            f"greedy tokens differ at step {matched} ({tg} vs {tc}) with a clear CPU margin {gap:.3g}"
    assert matched >= 5, f"only {matched} greedy tokens agree"


def test_decode_argmax_equals_argmax_of_decode(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_NATIVE_GEMV", "gemv")  # both models the same kernels: bit-identical logits
    cfg, table = checkpoint(tmp_path, "hd128", seed=2)
    a, b = gpu(cfg, table), gpu(cfg, table)
    ids = prompt(10, cfg["vocab_size"], seed=2)
    ta, tb = int(np.argmax(a.prefill(ids))), int(np.argmax(b.prefill(ids)))
    assert ta == tb
    for _ in range(5 if EMULATED else 12):
        ta = a.decode_argmax(ta)
        logits = b.decode(tb)
        tb = int(np.argmax(logits))
        assert ta == tb


def test_kv_cache_across_turns_with_truncate(tmp_path):
    cfg, table = checkpoint(tmp_path, "group6-hd64", seed=5)
    g, c = gpu(cfg, table), cpu(cfg, table)
    V = cfg["vocab_size"]
    turn1, turn2 = prompt(18, V, seed=6), prompt(9, V, seed=7)
    worst = rel(g.prefill(turn1), c.prefill(turn1))
    for t in (3, 1, 4, 1):
        worst = max(worst, rel(g.decode(t), c.decode(t)))
    g.truncate(11)
    c.truncate(11)
    assert g.length == c.length == 11
    worst = max(worst, rel(g.prefill(turn2, all_logits=True), c.prefill(turn2, all_logits=True)))
    for t in (5, 9, 2):
        worst = max(worst, rel(g.decode(t), c.decode(t)))
    assert worst < TOL, worst
    # The truncated cache is the cache of the kept prefix: a fresh run of the same tokens agrees bit for bit
    # except for the order of GPU work, so within bf16 noise.
    fresh = gpu(cfg, table)
    fresh.prefill(turn1[:11] + turn2)
    g2 = gpu(cfg, table)
    g2.prefill(turn1)
    g2.truncate(11)
    g2.prefill(turn2)
    assert rel(g2.decode(5), fresh.decode(5)) < TOL
    g.reset()
    c.reset()
    assert g.length == 0
    assert rel(g.prefill(turn2), c.prefill(turn2)) < TOL


@pytest.mark.parametrize("name", ["gqa2-tied", "group6-hd128", "group12-hd128"])
def test_long_context_uses_split_kv(tmp_path, monkeypatch, name):
    # Decode over a long cache: the split-KV kernel runs several splits and merges them. The emulated device gets
    # more multiprocessors, so that there are more splits than the short emulated context fills.
    monkeypatch.setenv("QWEN_CUDA_EMU_SMS", "32")
    cfg, table = checkpoint(tmp_path, name, seed=8, max_position_embeddings=1024)
    n = 60 if EMULATED else 700  # > 512: the prompt is also prefilled in two chunks on the GPU
    g, c = gpu(cfg, table, max_context=1024), cpu(cfg, table, max_context=1024)
    ids = prompt(n, cfg["vocab_size"], seed=9)
    worst = rel(g.prefill(ids), c.prefill(ids))
    tok = 1
    for _ in range(6):
        a, b = g.decode(tok), c.decode(tok)
        worst = max(worst, rel(a, b))
        tok = int(np.argmax(b))
    assert worst < TOL, worst


@pytest.mark.parametrize("mode, fmt, name", [("gemv", None, "group6-hd64"), ("cublas", None, "group6-hd64"),
                                             ("gemv", "int8", "gqa2-tied"), ("gemv", "int4", "odd")])
def test_graph_replay_is_identical_to_eager(tmp_path, monkeypatch, mode, fmt, name):
    monkeypatch.setenv("QWEN_NATIVE_GEMV", mode)  # no timing: both models must pick the same kernels
    cfg, table = checkpoint(tmp_path, name, seed=10)
    monkeypatch.setenv("QWEN_NATIVE_CUDA_GRAPH", "1")
    with_graph = gpu(cfg, table, fmt)
    monkeypatch.setenv("QWEN_NATIVE_CUDA_GRAPH", "0")
    eager = gpu(cfg, table, fmt)
    assert "CUDA graph on" in with_graph.backend and "CUDA graph off" in eager.backend
    ids = prompt(15, cfg["vocab_size"], seed=11)
    np.testing.assert_array_equal(with_graph.prefill(ids), eager.prefill(ids))
    launches = _lib.qwen_cuda_emu_graph_launches() if EMULATED else None
    tok, steps = 7, 8 if EMULATED else 20
    for step in range(steps):
        a, b = with_graph.decode(tok), eager.decode(tok)
        np.testing.assert_array_equal(a, b, err_msg=f"decode step {step}")
        tok = int(np.argmax(a))
    ta = tb = tok
    for _ in range(5):
        ta, tb = with_graph.decode_argmax(ta), eager.decode_argmax(tb)
        assert ta == tb
    if EMULATED:
        # the first decode step runs eagerly (it sizes and times things), every later one replays the graph
        assert _lib.qwen_cuda_emu_graph_launches() - launches == steps - 1 + 5


def ragged(seqs, parts):
    """(slots, ids, positions) of one pass: for each (slot, start, n), tokens start .. start + n - 1 of seqs[slot]."""
    slots, ids, positions = [], [], []
    for s, a, n in parts:
        slots += [s] * n
        ids += seqs[s][a:a + n]
        positions += list(range(a, a + n))
    return slots, ids, positions


def test_ragged_batch_matches_each_sequence_alone(tmp_path):
    # Passes mixing slots: two prompts; a prompt with one decode row each of two other slots; single rows of three
    # slots (through the prefill kernel); one row of one slot, then of another (the decode kernel, eager, then its
    # graph). Each sequence's logits at every position are the ones it gets alone, on the CPU and on the GPU.
    cfg, table = checkpoint(tmp_path, "group6-hd64", seed=12)
    V = cfg["vocab_size"]
    seqs = {0: prompt(23, V, seed=13), 2: prompt(10, V, seed=14), 3: prompt(14, V, seed=15)}
    passes = [[(2, 0, 7), (3, 0, 12)],
              [(0, 0, 21), (2, 7, 1), (3, 12, 1)],
              [(3, 13, 1), (0, 21, 1), (2, 8, 1)],
              [(0, 22, 1)],
              [(2, 9, 1)]]
    g = gpu(cfg, table, num_slots=4)
    got = {s: [] for s in seqs}
    for parts in passes:
        slots, ids, positions = ragged(seqs, parts)
        out = g.forward(slots, ids, positions, logit_rows=list(range(len(ids))), argmax=False)
        assert out.shape == (len(ids), V)
        r = 0
        for s, _, n in parts:
            got[s].extend(out[r:r + n])
            r += n
    assert g.lengths == [23, 0, 10, 14]
    for s, ids in seqs.items():
        batched = np.array(got[s])
        assert rel(batched, cpu(cfg, table).prefill(ids, all_logits=True)) < TOL, f"slot {s} vs the CPU"
        assert rel(batched, gpu(cfg, table).prefill(ids, all_logits=True)) < TOL, f"slot {s} vs alone on the GPU"
    # The multi-row argmax of a ragged pass: the third pass again, after cutting every slot back to before it.
    for s, n in ((0, 21), (2, 8), (3, 13)):
        g.truncate(n, slot=s)
    slots, ids, positions = ragged(seqs, passes[2])
    logits = g.forward(slots, ids, positions)
    for s, n in ((0, 21), (2, 8), (3, 13)):
        g.truncate(n, slot=s)
    np.testing.assert_array_equal(g.forward(slots, ids, positions, argmax=True), np.argmax(logits, axis=1))


@pytest.mark.parametrize("op", ["truncate", "reset"])
def test_truncating_or_resetting_a_slot_leaves_the_others(tmp_path, monkeypatch, op):
    monkeypatch.setenv("QWEN_NATIVE_GEMV", "gemv")  # both models the same kernels: bit-identical logits
    cfg, table = checkpoint(tmp_path, "gqa2-tied", seed=16)
    V = cfg["vocab_size"]
    seqs = {s: prompt(n, V, seed=17 + s) for s, n in enumerate((11, 6, 15))}
    a, b = gpu(cfg, table, num_slots=3), gpu(cfg, table, num_slots=3)
    for m in (a, b):
        m.forward(*ragged(seqs, [(s, 0, len(ids)) for s, ids in seqs.items()]))
        m.decode(3, slot=1)
    # On `a` only, slot 1 is cut back (or emptied) and refilled with other tokens, over the same cache rows.
    if op == "truncate":
        a.truncate(4, slot=1)
    else:
        a.reset(slot=1)
    kept = a.lengths[1]
    assert kept == (4 if op == "truncate" else 0)
    a.prefill(prompt(8, V, seed=30), slot=1)
    assert a.lengths == [11, kept + 8, 15] and b.lengths == [11, 7, 15]
    for s in (0, 2):
        np.testing.assert_array_equal(a.decode(5, slot=s), b.decode(5, slot=s), err_msg=f"slot {s}")
    both = ([0, 2], [7, 8], [12, 16])
    np.testing.assert_array_equal(a.forward(*both), b.forward(*both))


def test_graph_replay_serves_every_slot(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_NATIVE_GEMV", "gemv")
    cfg, table = checkpoint(tmp_path, "gqa2-tied", seed=18)
    V = cfg["vocab_size"]
    monkeypatch.setenv("QWEN_NATIVE_CUDA_GRAPH", "1")
    with_graph = gpu(cfg, table, num_slots=3)
    monkeypatch.setenv("QWEN_NATIVE_CUDA_GRAPH", "0")
    eager, c = gpu(cfg, table, num_slots=3), cpu(cfg, table, num_slots=3)
    seqs = {s: prompt(n, V, seed=19 + s) for s, n in enumerate((5, 13, 20))}
    rows = ragged(seqs, [(s, 0, len(ids)) for s, ids in seqs.items()])
    np.testing.assert_array_equal(with_graph.forward(*rows), eager.forward(*rows))
    c.forward(*rows)
    launches = _lib.qwen_cuda_emu_graph_launches() if EMULATED else None
    toks, worst = [1, 2, 3], 0.0
    for step in range(12):
        s = (2 * step) % 3  # slots 0, 2, 1, 0, ...: every replay continues another slot at another position
        a, b = with_graph.decode(toks[s], slot=s), eager.decode(toks[s], slot=s)
        np.testing.assert_array_equal(a, b, err_msg=f"decode step {step} (slot {s})")
        worst = max(worst, rel(a, c.decode(toks[s], slot=s)))
        toks[s] = int(np.argmax(a))
    assert worst < TOL, worst
    for step in range(6):
        s = step % 3
        ta, tb = with_graph.decode_argmax(toks[s], slot=s), eager.decode_argmax(toks[s], slot=s)
        assert ta == tb
        toks[s] = ta
    assert with_graph.lengths == eager.lengths == [5 + 6, 13 + 6, 20 + 6]
    if EMULATED:
        assert _lib.qwen_cuda_emu_graph_launches() - launches == 12 - 1 + 6


def test_a_one_row_pass_without_logits_does_not_spoil_the_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_NATIVE_GEMV", "cublas")
    cfg, table = checkpoint(tmp_path, "gqa2-tied", seed=23, max_position_embeddings=1024)
    V = cfg["vocab_size"]
    g, c = gpu(cfg, table, max_context=600, num_slots=2), cpu(cfg, table, max_context=600, num_slots=2)
    ids = prompt(512, V, seed=24)
    for m in (g, c):
        m.prefill([1, 2, 3], slot=1)
        m.decode(4, slot=1)  # the eager first step
        # 512 rows of slot 0 fill one pass; the row of slot 1 is a one-row pass of its own, with no logits wanted
        m.forward([0] * 512 + [1], ids + [5], list(range(512)) + [4], logit_rows=[0])
    assert rel(g.decode(6, slot=1), c.decode(6, slot=1)) < TOL


@pytest.mark.skipif(not EMULATED, reason="the failure is injected through the CUDA emulator (tests/cuda_emu)")
@pytest.mark.parametrize("call", ["cudaStreamBeginCapture", "cudaStreamEndCapture", "cudaGraphInstantiate", "launch"])
def test_failed_graph_capture_falls_back_to_eager_steps(tmp_path, monkeypatch, call):
    monkeypatch.setenv("QWEN_NATIVE_GEMV", "gemv")
    cfg, table = checkpoint(tmp_path, "gqa2-tied", seed=21)
    V = cfg["vocab_size"]
    monkeypatch.setenv("QWEN_NATIVE_CUDA_GRAPH", "1")
    g = gpu(cfg, table)
    monkeypatch.setenv("QWEN_NATIVE_CUDA_GRAPH", "0")
    eager, c = gpu(cfg, table), cpu(cfg, table)
    ids = prompt(9, V, seed=22)
    np.testing.assert_array_equal(g.prefill(ids), eager.prefill(ids))
    c.prefill(ids)
    tok = 4
    np.testing.assert_array_equal(g.decode(tok), eager.decode(tok))  # the eager first step
    c.decode(tok)
    _lib.qwen_cuda_emu_fail_once(call.encode())  # the next step's recording fails there
    launches = _lib.qwen_cuda_emu_graph_launches()
    worst = 0.0
    for step in range(6):
        a, b = g.decode(tok), eager.decode(tok)
        np.testing.assert_array_equal(a, b, err_msg=f"decode step {step}")
        worst = max(worst, rel(a, c.decode(tok)))
        tok = int(np.argmax(a))
    assert worst < TOL, worst
    assert _lib.qwen_cuda_emu_graph_launches() == launches  # every step ran eagerly
    why = "cudaErrorStreamCaptureInvalidated" if call == "launch" else call
    assert "CUDA graph off (capture failed: " in g.backend and why in g.backend, g.backend
    assert g.length == eager.length == 9 + 7


# --- quantized weights ---------------------------------------------------------------------------------------------
# The CUDA backend quantizes with the CPU's own code at load, so a GPU and a CPU model of one format hold the same
# weights. Against the exact reference, float32 on the dequantized weights, the GPU's model differs by its bf16
# activations (and, in prefill, bf16 tiles of the weights), as a bf16 model does from float32: within TOL (worst
# seen on these configs 0.0073). The CPU's model rounds every matmul input to int8 per group of 32 instead, up to
# 0.016 from the same reference here (the 40- and 64-wide configs); the two errors add, so the GPU and the CPU
# models of one format were up to 0.018 apart: too close to TOL to hold on every GPU, hence TOL_Q between them.

@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("name", QUANTIZED_CONFIGS)
def test_quantized_model_matches_cpu(tmp_path, name, fmt):
    cfg, table = checkpoint(tmp_path, name)
    g = gpu(cfg, table, fmt)
    assert g.weight_format == fmt
    ids = prompt(20, cfg["vocab_size"])
    run_and_compare(g, core.Model(cfg, table, dtype=fmt, device="cpu", num_threads=2), ids, 8, TOL_Q)
    if name == "wide-mlp":  # several warps a block of rows (the split follows the bytes of a row: int4's are fewer)
        assert f"{fmt} 64x3328=qgemv/{8 if fmt == 'int8' else 4}" in g.backend, g.backend
    g.reset()
    ref_cfg, ref_table = checkpoint(tmp_path, name, quantized=fmt)
    run_and_compare(g, cpu(ref_cfg, ref_table), ids, 8, TOL)


@pytest.mark.parametrize("wide", ["int8", "int6"])
def test_mixed_formats(tmp_path, wide):
    """int4 MLPs, int8 attention projections and lm_head, a bf16 embedding, in one model; and load(dtype="int4")'s
    mix: int4 layers, int6 embedding and lm_head."""
    cfg, table = checkpoint(tmp_path, "mha-untied")
    if wide == "int8":
        formats = {name: "int4" if ".mlp." in name else "int8" for name, _, _, shape, _, _ in table
                   if len(shape) == 2 and name != "model.embed_tokens.weight"}
    else:
        formats = {name: "int4" if name.startswith("model.layers.") else "int6" for name, _, _, shape, _, _ in table
                   if len(shape) == 2}
    g = gpu(cfg, table, weight_formats=formats)
    assert g.weight_format == "mixed"
    ids = prompt(20, cfg["vocab_size"])
    c = core.Model(cfg, table, dtype="bfloat16", device="cpu", num_threads=2, weight_formats=formats)
    run_and_compare(g, c, ids, 8, TOL_Q)
    g.reset()
    run_and_compare(g, cpu(*checkpoint(tmp_path, "mha-untied", quantized=formats)), ids, 8, TOL)


def test_bad_inputs_raise_as_on_cpu(tmp_path):
    cfg, table = checkpoint(tmp_path, "gqa2-tied", max_position_embeddings=64)
    with pytest.raises(ValueError, match="bfloat16, int8 or int4"):
        core.Model(cfg, table, dtype="float32", device="cuda")
    m = gpu(cfg, table)
    V = cfg["vocab_size"]
    for bad in ([-1], [V], [2**40]):
        with pytest.raises(IndexError, match="outside the vocabulary"):
            m.prefill(bad)
    with pytest.raises(ValueError, match="empty"):
        m.prefill([])
    for bad in (-1, V):
        with pytest.raises(IndexError):
            m.decode(bad)
        with pytest.raises(IndexError):
            m.decode_argmax(bad)
    assert m.length == 0
    with pytest.raises(IndexError, match="do not fit"):
        m.prefill([1] * 65)
    m.prefill([1] * 63)
    m.decode_argmax(2)
    with pytest.raises(IndexError):
        m.decode(1)
    with pytest.raises(IndexError):
        m.decode_argmax(1)
    assert m.length == 64
    m.truncate(10)
    assert m.length == 10
    with pytest.raises(IndexError):
        m.truncate(11)
    m.close()
    with pytest.raises(RuntimeError, match="closed"):
        m.decode(1)


def test_constructor_errors(tmp_path):
    cfg, table = checkpoint(tmp_path, "gqa2-tied")
    with pytest.raises(ValueError, match="bfloat16"):
        core.Model(cfg, table, dtype="float32", device="cuda")
    with pytest.raises(ValueError, match="does not exist"):
        core.Model(cfg, table, dtype="bfloat16", device="cuda:99")
    with pytest.raises(ValueError, match="bad device"):
        core.Model(cfg, table, dtype="bfloat16", device="cuda:x")


def test_out_of_memory_names_the_size(tmp_path):
    # A KV cache of 2**24 positions × 8 layers × head_dim 256: hundreds of GB, refused before any allocation.
    cfg, table = checkpoint(tmp_path, "gqa2-tied", head_dim=256, num_hidden_layers=8,
                            max_position_embeddings=1 << 24)
    with pytest.raises(RuntimeError, match=r"needs \d+ MiB of GPU memory .* but only \d+ MiB of \d+ MiB is free"):
        gpu(cfg, table, max_context=1 << 24)
    # and the device is still usable afterwards
    cfg2, table2 = checkpoint(tmp_path, "mqa")
    gpu(cfg2, table2).prefill([1, 2, 3])
