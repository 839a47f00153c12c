"""The native forward pass against the numpy float64 reference, on tiny random checkpoints written to disk:
every path (batched prefill, cached decode, chunked prefill, truncation), tied/untied lm_head, GQA ratios,
checkpoint dtypes, in-memory dtypes, thread counts and kernel instruction sets."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fixtures import core_config, head_dim, make_config, random_weights, stored_values, write_checkpoint
from reference import reference_logits, rel_err
from qwen_native import _core
from qwen_native.checkpoint import tensor_table

TOL = 1e-4
IDS = [3, 17, 256, 42, 9, 120, 255, 1, 77, 5, 64, 299]  # prompt
NEXT = [11, 200, 7, 150, 33, 90, 2, 180, 45, 260, 13, 99]  # fed one at a time after it


def load(directory: str, **kw) -> _core.Model:
    with open(os.path.join(directory, "config.json")) as f:
        cfg = core_config(json.load(f))
    kw.setdefault("num_threads", 2)
    return _core.Model(cfg, tensor_table(sorted(glob.glob(os.path.join(directory, "*.safetensors")))), **kw)


def checkpoint(tmp_path, disk_dtype="F32", shards=1, seed=0, **overrides):
    cfg = make_config(**overrides)
    weights = random_weights(cfg, seed=seed)
    d = write_checkpoint(str(tmp_path / f"ckpt-{disk_dtype}-{shards}-{seed}"), cfg, weights, disk_dtype, shards)
    return d, cfg, stored_values(weights, disk_dtype)


VARIANTS = {
    "gqa2-tied-f32": dict(disk_dtype="F32"),
    "gqa2-tied-bf16": dict(disk_dtype="BF16"),
    "mqa-untied-bf16": dict(disk_dtype="BF16", num_key_value_heads=1, tie_word_embeddings=False),
    "mha-untied-f32": dict(disk_dtype="F32", num_key_value_heads=4, tie_word_embeddings=False),
    "hd8-gqa4-f16": dict(disk_dtype="F16", hidden_size=64, num_attention_heads=8, num_key_value_heads=2),
    "hd64-one-head": dict(disk_dtype="F32", hidden_size=64, num_attention_heads=1, num_key_value_heads=1),
    "explicit-head-dim-odd-widths": dict(disk_dtype="BF16", hidden_size=40, head_dim=24, num_attention_heads=3,
                                         num_key_value_heads=1, intermediate_size=61, vocab_size=271),
    "sharded": dict(disk_dtype="BF16", shards=2, num_hidden_layers=3),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_then_cached_decode_matches_reference(tmp_path, name):
    d, cfg, w = checkpoint(tmp_path, **VARIANTS[name])
    ids = [i % cfg["vocab_size"] for i in IDS]
    nxt = [i % cfg["vocab_size"] for i in NEXT]
    ref = reference_logits(w, cfg, ids + nxt)
    m = load(d)
    assert rel_err(m.prefill(ids, all_logits=True), ref[: len(ids)]) < TOL
    for step, tok in enumerate(nxt):
        assert rel_err(m.decode(tok), ref[len(ids) + step]) < TOL, f"decode step {step}"
    assert m.length == len(ids) + len(nxt)


@pytest.mark.parametrize("name, shape", [
    ("hd128-gqa6", dict(hidden_size=128, head_dim=128, num_attention_heads=6, num_key_value_heads=1)),
    ("hd32-gqa3", dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1)),
    ("hd64-gqa2x2", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)),
])
def test_attention_over_many_positions_matches_reference(tmp_path, name, shape):
    """The query heads of a kv head share each pass over K and V, 32 positions at a time (the AVX-512 set with
    head_dim 16-128 in registers): prompt rows and decode steps across several such blocks against the reference."""
    d, cfg, w = checkpoint(tmp_path, disk_dtype="F32", **shape)
    ids = [(7 * i + 3) % cfg["vocab_size"] for i in range(75)]
    ref = reference_logits(w, cfg, ids)
    m = load(d)
    assert rel_err(m.prefill(ids[:40], all_logits=True), ref[:40]) < TOL
    for t in range(40, 75):
        assert rel_err(m.decode(ids[t]), ref[t]) < TOL, f"position {t}"


def test_last_logits_default_and_decode_argmax(tmp_path):
    d, cfg, w = checkpoint(tmp_path)
    ref = reference_logits(w, cfg, IDS + NEXT[:3])
    m = load(d)
    last = m.prefill(IDS)
    assert last.shape == (cfg["vocab_size"],) and rel_err(last, ref[len(IDS) - 1]) < TOL
    for step, tok in enumerate(NEXT[:3]):
        assert m.decode_argmax(tok) == int(np.argmax(ref[len(IDS) + step]))


# bf16 matrices on CPUs with AVX512-BF16 round their inputs to bf16 (VDPBF16PS in the GEMM and the GEMV;
# tests/test_kernels.py checks them exactly); everything else stays float32. Their tolerance is bf16 rounding.
BF16_TOL = 2e-2 if _core.isa().endswith("+bf16") else TOL


@pytest.mark.parametrize("dtype_on_disk", ["BF16", "F32"])
def test_bfloat16_weights_in_memory(tmp_path, dtype_on_disk):
    """bf16 in memory, f32 activations: exact widening of a bf16 checkpoint; an f32 checkpoint's matrices are
    rounded to bf16 (nearest even; norm weights and biases stay float32), so it matches the reference run on
    those values. Without AVX512-BF16, token-by-token decoding (GEMV only) is float32 throughout."""
    d, cfg, stored = checkpoint(tmp_path, disk_dtype=dtype_on_disk)
    rounded = stored_values(stored, "BF16")
    w = {k: rounded[k] if v.ndim == 2 else v for k, v in stored.items()}
    ref = reference_logits(w, cfg, IDS + NEXT)
    m = load(d, dtype="bfloat16")
    assert rel_err(m.prefill(IDS, all_logits=True), ref[: len(IDS)]) < BF16_TOL
    for step, tok in enumerate(NEXT):
        assert rel_err(m.decode(tok), ref[len(IDS) + step]) < BF16_TOL
    m.reset()
    for step, tok in enumerate(IDS + NEXT):
        assert rel_err(m.decode(tok), ref[step]) < BF16_TOL


def test_cached_decode_equals_full_recompute(tmp_path):
    d, _, _ = checkpoint(tmp_path, disk_dtype="BF16")
    m = load(d)
    m.prefill(IDS)
    cached = [m.decode(t) for t in NEXT]
    m.reset()
    full = m.prefill(IDS + NEXT, all_logits=True)[len(IDS):]
    np.testing.assert_allclose(np.stack(cached), full, rtol=0, atol=1e-5 * np.abs(full).max())


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from Linux's /proc")
def test_populate_cache_makes_it_resident_and_keeps_what_it_holds(tmp_path):
    slots, positions = 8, 4096
    d, cfg, _ = checkpoint(tmp_path, disk_dtype="BF16", max_position_embeddings=positions)
    kv_bytes = 2 * cfg["num_hidden_layers"] * slots * cfg["num_key_value_heads"] * positions * head_dim(cfg) * 4

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    unused = load(d, num_slots=slots, max_context=positions)
    before = resident()
    unused.populate_cache()
    assert resident() - before > 0.8 * kv_bytes
    m = load(d, num_slots=slots, max_context=positions)
    m.prefill(IDS, slot=5)
    m.populate_cache()
    assert list(m.lengths) == [0] * 5 + [len(IDS)] + [0] * 2
    kept = [m.decode(t, slot=5) for t in NEXT]
    fresh = load(d)
    fresh.prefill(IDS)
    np.testing.assert_array_equal(np.stack(kept), np.stack([fresh.decode(t) for t in NEXT]))


def test_truncate_then_continue_equals_fresh_run(tmp_path):
    d, _, _ = checkpoint(tmp_path, disk_dtype="BF16")
    m = load(d)
    m.prefill(IDS + NEXT)  # a first "turn"
    m.truncate(5)  # keep a shared prefix, continue differently
    assert m.length == 5
    reused = m.prefill([8, 9, 10], all_logits=True)
    fresh = load(d).prefill(IDS[:5] + [8, 9, 10], all_logits=True)[5:]
    np.testing.assert_allclose(reused, fresh, rtol=0, atol=1e-5 * np.abs(fresh).max())
    with pytest.raises(IndexError):
        m.truncate(m.length + 1)


def test_prompt_longer_than_batch_is_chunked(tmp_path):
    """Prompts over the 512-token batch buffers run as several batched passes with the same result."""
    d, cfg, w = checkpoint(tmp_path, disk_dtype="BF16", num_hidden_layers=1, max_position_embeddings=1024)
    ids = [int(i) for i in np.random.default_rng(1).integers(0, cfg["vocab_size"], 600)]
    ref = reference_logits(w, cfg, ids)
    m = load(d, max_context=1024)
    out = m.prefill(ids, all_logits=True)
    assert out.shape == (600, cfg["vocab_size"])
    assert rel_err(out, ref) < TOL
    m.reset()
    assert rel_err(m.prefill(ids), ref[-1]) < TOL


@pytest.mark.parametrize("threads", [1, 3, 16])
def test_thread_counts_agree(tmp_path, threads):
    """More threads than rows in some matrices (16 threads, 8 kv rows) must still split work correctly."""
    d, cfg, w = checkpoint(tmp_path, disk_dtype="BF16", num_key_value_heads=1, hidden_size=32)
    ref = reference_logits(w, cfg, IDS + NEXT[:4])
    for dtype, tol in (("float32", TOL), ("bfloat16", BF16_TOL)):
        m = load(d, num_threads=threads, dtype=dtype)
        assert m.num_threads == threads
        assert rel_err(m.prefill(IDS, all_logits=True), ref[: len(IDS)]) < tol
        for step, tok in enumerate(NEXT[:4]):
            assert rel_err(m.decode(tok), ref[len(IDS) + step]) < tol


ISA_SCRIPT = r"""
import glob, json, sys, numpy as np
sys.path.insert(0, sys.argv[2])
from qwen_native import _core
from qwen_native.checkpoint import tensor_table
from reference import reference_logits, rel_err
from fixtures import core_config, stored_values, random_weights
d = sys.argv[1]
with open(d + "/config.json") as f:
    cfg = json.load(f)
w = stored_values(random_weights(cfg, seed=0), "BF16")
ids = list(range(1, 40, 3))
ref = reference_logits(w, cfg, ids + [5, 6])
worst, worst_bf16_rounded = 0.0, 0.0
for dtype in ("float32", "bfloat16"):
    m = _core.Model(core_config(cfg), tensor_table(glob.glob(d + "/*.safetensors")), dtype=dtype, num_threads=2)
    errs = [rel_err(m.prefill(ids, all_logits=True), ref[:len(ids)])]
    m.reset()
    errs += [rel_err(m.decode(t), ref[i]) for i, t in enumerate(ids + [5, 6])]
    if dtype == "bfloat16" and _core.isa().endswith("+bf16"):
        worst_bf16_rounded = max(errs)  # bf16 inputs to VDPBF16PS: checked exactly in test_kernels.py
    else:
        worst = max(worst, *errs)
print(m.backend, worst, worst_bf16_rounded)
"""


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "default"])
def test_every_kernel_set_matches_reference(tmp_path, isa):
    """Each instruction-set build of the kernels, forced through QWEN_NATIVE_ISA, on widths that are not multiples
    of any vector length (hidden 40, head_dim 20, intermediate 61)."""
    d, _, _ = checkpoint(tmp_path, disk_dtype="BF16", hidden_size=40, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=61)
    env = dict(os.environ, QWEN_NATIVE_ISA=isa)
    out = subprocess.run([sys.executable, "-c", ISA_SCRIPT, d, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    backend, worst, worst_bf16_rounded = " ".join(out[:-2]), float(out[-2]), float(out[-1])
    if isa != "default" and f"({isa}," not in backend:
        pytest.skip(f"this CPU cannot run the {isa} kernels (got {backend})")
    assert worst < TOL
    assert worst_bf16_rounded < 2e-2


def test_inputs_are_checked(tmp_path):
    d, cfg, _ = checkpoint(tmp_path, max_position_embeddings=64)
    m = load(d)
    V = cfg["vocab_size"]
    for bad in ([-1], [V], [2**40], [2**32 + 5], np.array([V], dtype=np.uint64)):
        with pytest.raises(IndexError, match="outside the vocabulary"):
            m.prefill(bad)
    with pytest.raises(TypeError):
        m.prefill([1.5, 2.0])
    with pytest.raises(TypeError):
        m.prefill(["a"])
    with pytest.raises(ValueError, match="empty"):
        m.prefill([])
    with pytest.raises(ValueError, match="1-D"):
        m.prefill([[1, 2], [3, 4]])
    for bad in (-1, V, 2**70):
        with pytest.raises(IndexError):
            m.decode(bad)
    with pytest.raises(TypeError):
        m.decode(1.0)
    assert m.length == 0  # nothing above touched the cache
    with pytest.raises(IndexError, match="do not fit"):
        m.prefill([1] * 65)
    m.prefill([1] * 64)
    with pytest.raises(IndexError):
        m.decode(1)
    with pytest.raises(IndexError):
        m.decode_argmax(1)
    assert m.length == 64


def test_max_context(tmp_path):
    d, _, _ = checkpoint(tmp_path, max_position_embeddings=64)
    assert load(d).max_context == 64  # min(max_position_embeddings, 4096)
    assert load(d, max_context=10).max_context == 10
    with pytest.raises(ValueError, match="max_context"):
        load(d, max_context=65)
    with pytest.raises(ValueError):
        load(d, max_context=-1)


def test_constructor_arguments_are_checked(tmp_path):
    d, cfg, _ = checkpoint(tmp_path)
    cfg = core_config(cfg)
    table = tensor_table(glob.glob(os.path.join(d, "*.safetensors")))
    with pytest.raises(ValueError, match="dtype"):
        _core.Model(cfg, table, dtype="float16")
    with pytest.raises(ValueError, match="device"):
        _core.Model(cfg, table, device="tpu")
    with pytest.raises(ValueError, match="num_threads"):
        _core.Model(cfg, table, num_threads=-2)
    if not _core.build_info()["cuda"]:
        with pytest.raises(RuntimeError, match="no CUDA"):
            _core.Model(cfg, table, dtype="bfloat16", device="cuda")


@pytest.mark.parametrize("field,value,match", [
    ("num_hidden_layers", 1_000_000_000, "num_hidden_layers"),
    ("hidden_size", 0, "hidden_size"),
    ("vocab_size", -5, "vocab_size"),
    ("num_key_value_heads", 3, "not a multiple"),
    ("head_dim", 7, "even"),
    ("rms_norm_eps", -1.0, "rms_norm_eps"),
    ("rope_theta", 0, "rope_theta"),
])
def test_config_validated_before_allocation(tmp_path, field, value, match):
    d, cfg, _ = checkpoint(tmp_path)
    cfg = core_config(cfg)
    table = tensor_table(glob.glob(os.path.join(d, "*.safetensors")))
    with pytest.raises(ValueError, match=match):
        _core.Model(dict(cfg, **{field: value}), table)


def test_config_types_checked(tmp_path):
    d, cfg, _ = checkpoint(tmp_path)
    cfg = core_config(cfg)
    table = tensor_table(glob.glob(os.path.join(d, "*.safetensors")))
    with pytest.raises(TypeError, match="hidden_size"):
        _core.Model(dict(cfg, hidden_size="64"), table)
    with pytest.raises(ValueError, match="missing"):
        _core.Model({k: v for k, v in cfg.items() if k != "vocab_size"}, table)
    with pytest.raises(ValueError, match="missing"):
        _core.Model(dict(cfg, vocab_size=None), table)  # JSON null is missing, as in the Python layer
    with pytest.raises(ValueError, match="rope_theta"):
        _core.Model(dict(cfg, rope_theta=10 ** 400), table)  # beyond the double range (was a pybind11 cast error)
    with pytest.raises(TypeError, match="tie_word_embeddings"):
        _core.Model(dict(cfg, tie_word_embeddings="no"), table)  # (a non-empty string was true)
    # The core takes a resolved config: the defaults of config.json's optional fields are the Python layer's.
    for name in ("head_dim", "num_key_value_heads", "rope_theta", "rms_norm_eps", "tie_word_embeddings"):
        with pytest.raises(ValueError, match=f"missing \"{name}\""):
            _core.Model(dict(cfg, **{name: None}), table)
    assert _core.Model(cfg, table, num_threads=1).vocab_size == cfg["vocab_size"]


def test_tensor_mismatches_name_the_tensor(tmp_path):
    d, cfg, _ = checkpoint(tmp_path, tie_word_embeddings=False)
    cfg = core_config(cfg)
    table = tensor_table(glob.glob(os.path.join(d, "*.safetensors")))

    def without(name):
        return [t for t in table if t[0] != name]

    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight is missing"):
        _core.Model(cfg, without("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="lm_head.weight is missing"):
        _core.Model(cfg, without("lm_head.weight"))
    extra = table + [("model.layers.9.mlp.up_proj.weight",) + table[0][1:]]
    with pytest.raises(ValueError, match="unexpected tensor model.layers.9"):
        _core.Model(cfg, extra)
    reshaped = [(n, p, dt, [s[1], s[0]] if n.endswith("o_proj.weight") and s[0] != s[1] else s, o, b)
                for n, p, dt, s, o, b in table]
    bad_shape = [(n, p, dt, list(reversed(s)) if n == "model.layers.0.mlp.down_proj.weight" else s, o, b)
                 for n, p, dt, s, o, b in reshaped]
    with pytest.raises(ValueError, match=r"down_proj.weight has shape \[97, 64\]"):
        _core.Model(cfg, bad_shape)
    bad_dtype = [(n, p, "I32" if n == "model.norm.weight" else dt, s, o, b) for n, p, dt, s, o, b in table]
    with pytest.raises(ValueError, match="model.norm.weight has dtype I32"):
        _core.Model(cfg, bad_dtype)
    dup = table + [table[3]]
    with pytest.raises(ValueError, match="twice"):
        _core.Model(cfg, dup)


def test_truncated_file_is_an_error_not_a_crash(tmp_path):
    d, cfg, _ = checkpoint(tmp_path)
    cfg = core_config(cfg)
    path = os.path.join(d, "model.safetensors")
    table = tensor_table([path])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(RuntimeError, match="truncated"):
        _core.Model(cfg, table)  # the table predates the truncation: the core checks the file itself
    os.remove(path)
    with pytest.raises(RuntimeError, match="cannot open"):
        _core.Model(cfg, table)


def test_close_frees_and_later_calls_raise(tmp_path):
    d, _, _ = checkpoint(tmp_path)
    m = load(d)
    m.prefill([1, 2])
    m.close()
    assert m.closed
    with pytest.raises(RuntimeError, match="closed"):
        m.decode(1)


# --- sequences as data: a KV cache of several slots, ragged passes -------------------------------------------------

def rows(*runs):
    """(slots, ids, positions) of a pass from runs (slot, first position, ids)."""
    slots, ids, pos = [], [], []
    for slot, start, run in runs:
        slots += [slot] * len(run)
        ids += list(run)
        pos += list(range(start, start + len(run)))
    return slots, ids, pos


SEQS = {0: IDS[:5] + NEXT[:3], 2: IDS[3:6] + IDS[:4] + NEXT[5:8], 3: IDS[2:9] + NEXT[:2]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ragged_batch_equals_each_sequence_alone(tmp_path, dtype):
    """Three sequences in slots 0, 2 and 3 of one cache, run as ragged passes (prompt rows of some slots beside
    decode rows of others) give each sequence the logits it gets alone: against the numpy reference, and bit for
    bit against a one-slot model fed only that sequence (a sequence's arithmetic does not depend on the batch)."""
    d, cfg, stored = checkpoint(tmp_path, disk_dtype="BF16", tie_word_embeddings=False)
    m = load(d, dtype=dtype, num_slots=4)
    assert m.num_slots == 4 and m.lengths == [0, 0, 0, 0]
    # pass 1: prompts of 5, 3 and 7 tokens; pass 2: a decode row of 0, 4 more prompt rows of 2, a decode row of 3;
    # then decode rows of all three, twice
    passes = [[(0, 0, SEQS[0][:5]), (2, 0, SEQS[2][:3]), (3, 0, SEQS[3][:7])],
              [(0, 5, SEQS[0][5:6]), (2, 3, SEQS[2][3:7]), (3, 7, SEQS[3][7:8])],
              [(0, 6, SEQS[0][6:7]), (2, 7, SEQS[2][7:8]), (3, 8, SEQS[3][8:9])],
              [(2, 8, SEQS[2][8:9]), (0, 7, SEQS[0][7:8])]]
    got = {s: [] for s in SEQS}  # (position, logits) of the last row of each run
    for p in passes:
        out = m.forward(*rows(*p))
        assert out.shape == (len(p), cfg["vocab_size"])
        for (slot, start, run), logits in zip(p, out):
            got[slot].append((start + len(run) - 1, logits))
    assert m.lengths == [8, 0, 9, 9]
    tol = TOL if dtype == "float32" else BF16_TOL
    w = stored if dtype == "float32" else {k: v if v.ndim == 1 else v for k, v in stored.items()}
    for slot, seq in SEQS.items():
        ref = reference_logits(w, cfg, seq)
        alone = load(d, dtype=dtype)
        single = {}
        for p in passes:  # the same runs, this sequence only
            for s, start, run in p:
                if s == slot:
                    single[start + len(run) - 1] = alone.prefill(run)
        for pos, logits in got[slot]:
            assert rel_err(logits, ref[pos]) < tol, (slot, pos)
            np.testing.assert_array_equal(logits, single[pos], err_msg=f"slot {slot} position {pos}")


def test_logit_rows_and_argmax_of_a_ragged_pass(tmp_path):
    d, cfg, w = checkpoint(tmp_path)
    m = load(d, num_slots=2)
    slots, ids, pos = rows((1, 0, IDS[:6]), (0, 0, NEXT[:4]))
    every = m.forward(slots, ids, pos, logit_rows=list(range(10)))
    ref1, ref0 = reference_logits(w, cfg, IDS[:6]), reference_logits(w, cfg, NEXT[:4])
    assert rel_err(every[:6], ref1) < TOL and rel_err(every[6:], ref0) < TOL
    m.reset()
    ids_out = m.forward(slots, ids, pos, logit_rows=[2, 5, 9], argmax=True)
    assert ids_out.dtype == np.int32
    assert list(ids_out) == [int(np.argmax(ref1[2])), int(np.argmax(ref1[5])), int(np.argmax(ref0[3]))]


def test_truncating_or_resetting_one_slot_leaves_the_others(tmp_path):
    d, _, _ = checkpoint(tmp_path)
    m, alone = load(d, num_slots=3), load(d)
    m.forward(*rows((0, 0, IDS), (1, 0, NEXT), (2, 0, IDS[:7])))
    alone.prefill(IDS)
    m.truncate(4, slot=1)
    m.reset(slot=2)
    assert m.lengths == [len(IDS), 4, 0]
    np.testing.assert_array_equal(m.decode(5, slot=0), alone.decode(5))
    # the truncated and the reset slot continue like fresh runs of what they kept (to rounding: the kept keys and
    # values came from a longer batched pass)
    fresh = load(d)
    fresh.prefill(NEXT[:4])
    assert rel_err(m.decode(9, slot=1), fresh.decode(9)) < 1e-5
    fresh.reset()
    np.testing.assert_array_equal(m.prefill(IDS[:3], slot=2), fresh.prefill(IDS[:3]))
    with pytest.raises(IndexError, match="slot 3 does not exist"):
        m.truncate(0, slot=3)
    m.reset()
    assert m.lengths == [0, 0, 0]


def test_ragged_pass_errors_leave_the_cache_unchanged(tmp_path):
    d, cfg, _ = checkpoint(tmp_path, max_position_embeddings=16)
    m = load(d, num_slots=2)
    m.prefill([1, 2, 3], slot=1)
    bad = [
        (([2], [1], [0]), IndexError, "slot 2 does not exist"),
        (([0, 1, 0], [1, 2, 3], [0, 3, 1]), ValueError, "consecutive"),
        (([1], [1], [0]), ValueError, "holds 3 positions, so its next row is at position 3"),
        (([0, 0], [1, 2], [0, 2]), ValueError, "consecutive"),
        (([0] * 17, [1] * 17, list(range(17))), IndexError, "do not fit"),
        (([0], [cfg["vocab_size"]], [0]), IndexError, "outside the vocabulary"),
        (([0, 1], [1], [0, 3]), ValueError, "same length"),
    ]
    for args, exc, match in bad:
        with pytest.raises(exc, match=match):
            m.forward(*args)
    with pytest.raises(IndexError, match="logit rows"):
        m.forward([0, 0], [1, 2], [0, 1], logit_rows=[1, 0])
    assert m.lengths == [0, 3]


def test_mixed_weight_formats_match_the_reference(tmp_path):
    """One model holding float32 and bfloat16 matrices: each tensor in its own format, byte-exact (the bf16 ones
    with bf16-rounded inputs on CPUs with AVX512-BF16)."""
    d, cfg, stored = checkpoint(tmp_path, tie_word_embeddings=False)
    as_bf16 = ["model.embed_tokens.weight", "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
               "model.layers.0.self_attn.o_proj.weight"]
    w = dict(stored)
    for name in as_bf16:
        w[name] = stored_values({name: stored[name]}, "BF16")[name]
    ref = reference_logits(w, cfg, IDS + NEXT)
    m = load(d, weight_formats={name: "bfloat16" for name in as_bf16})
    assert m.weight_format == "mixed" and load(d).weight_format == "float32"
    assert rel_err(m.prefill(IDS, all_logits=True), ref[: len(IDS)]) < BF16_TOL
    for step, tok in enumerate(NEXT):
        assert rel_err(m.decode(tok), ref[len(IDS) + step]) < BF16_TOL
    # the other way round: bfloat16 matrices with a float32 lm_head
    m = load(d, dtype="bfloat16", weight_formats={"lm_head.weight": "float32"})
    w = {k: v if v.ndim == 1 or k == "lm_head.weight" else stored_values({k: v}, "BF16")[k] for k, v in stored.items()}
    m.prefill(IDS)
    assert rel_err(m.decode(NEXT[0]), reference_logits(w, cfg, IDS + NEXT[:1])[-1]) < BF16_TOL
    with pytest.raises(ValueError, match="stacked matrix"):
        load(d, weight_formats={"model.layers.0.self_attn.q_proj.weight": "bfloat16"})
    with pytest.raises(ValueError, match="float32"):
        load(d, weight_formats={"model.norm.weight": "bfloat16"})
    with pytest.raises(ValueError, match="not a matrix of this model"):
        load(d, weight_formats={"model.layers.7.mlp.up_proj.weight": "bfloat16"})
    with pytest.raises(ValueError, match="weight format"):
        load(d, weight_formats={"lm_head.weight": "int3"})


def test_memory_check_names_the_kv_cache(tmp_path):
    d, _, _ = checkpoint(tmp_path, max_position_embeddings=4096)
    with pytest.raises(RuntimeError, match=r"KV cache \d+ MiB \(1000000 slot\(s\) x 4096 positions\)"):
        load(d, num_slots=1_000_000, max_context=4096)


def test_interrupt_from_another_thread_abandons_the_pass(tmp_path):
    import threading
    import time

    d, cfg, _ = checkpoint(tmp_path, num_hidden_layers=24, max_position_embeddings=4096)
    m = load(d, max_context=4096, num_threads=1)
    m.prefill(IDS)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, cfg["vocab_size"], 4000)]
    timer = threading.Timer(0.05, m.interrupt)
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(_core.Interrupted):
        m.prefill(ids)
    assert time.perf_counter() - t0 < 5
    timer.join()
    assert m.length == len(IDS)
    assert rel_err(m.decode(NEXT[0]), load(d).prefill(IDS + NEXT[:1])) < TOL  # the cache is as it was


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
def test_decode_rows_of_seventeen_sequences_equal_each_alone(tmp_path, dtype):
    """One pass holding a decode row of each of 17 sequences (plus a prompt being prefilled beside them) gives every
    sequence, bit for bit, the logits it gets alone."""
    d, cfg, _ = checkpoint(tmp_path, disk_dtype="BF16", tie_word_embeddings=False)
    V = cfg["vocab_size"]
    prompts = [[(7 * s + 3 * i) % V for i in range(2 + s % 5)] for s in range(17)]
    m = load(d, dtype=dtype, num_slots=18)
    m.forward(*rows(*[(s, 0, p) for s, p in enumerate(prompts)]), logit_rows=[])
    step = [(s, len(p), [(11 * s + 1) % V]) for s, p in enumerate(prompts)] + [(17, 0, IDS)]
    together = m.forward(*rows(*step))
    for s, p in enumerate(prompts):
        alone = load(d, dtype=dtype, num_slots=1)
        alone.prefill(p)
        np.testing.assert_array_equal(together[s], alone.decode((11 * s + 1) % V), err_msg=f"sequence {s}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
def test_a_verify_pass_equals_decode_steps(tmp_path, dtype):
    """A sequence's last token and proposed ids fed as one run of rows (speculative verification) give, row for
    row and bit for bit, the logits of decoding them one at a time: so verifying proposals never changes a greedy
    answer."""
    d, cfg, _ = checkpoint(tmp_path, disk_dtype="BF16", tie_word_embeddings=False)
    run = NEXT[:9]  # the last token and 8 proposals
    verify, step = load(d, dtype=dtype), load(d, dtype=dtype)
    verify.prefill(IDS)
    step.prefill(IDS)
    together = verify.forward(*rows((0, len(IDS), run)), logit_rows=list(range(len(run))))
    for i, t in enumerate(run):
        np.testing.assert_array_equal(together[i], step.decode(t), err_msg=f"row {i}")
