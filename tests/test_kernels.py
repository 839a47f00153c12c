"""The CPU matmul kernels one by one (GEMV for one row, sgemm / bf16 GEMM for batches) against numpy float64, at
awkward sizes (1 row, widths that are not multiples of any vector length, more threads than rows), for every
instruction set this CPU can run (each forced through QWEN_NATIVE_ISA in its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fixtures import bf16_round
from reference import quantize_inputs

SHAPES = [(1, 1, 1), (1, 5, 7), (1, 33, 97), (1, 64, 1536), (2, 1, 3), (3, 17, 31), (2, 40, 33), (13, 65, 129),
          (25, 100, 1001), (12, 32, 512), (37, 70, 600)]
# Under the sanitizers (tests/test_sanitizers.py) only the kernel set this CPU selects: the plain run of the same CI
# checks every set's results, the sanitized one the memory accesses of the code that runs here.
SANITIZED = os.environ.get("QWEN_NATIVE_SANITIZED") == "1"
THREADS = [1, 3]  # 3: more threads than rows in the narrow shapes (more than cores is only slower on small CIs)

SCRIPT = r"""
import json, sys, numpy as np
from qwen_native import _core
shapes, threads = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rng = np.random.default_rng(0)
cases = []
for T, n, k in shapes:
    x = rng.standard_normal((T, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    o = rng.standard_normal((T, n)).astype(np.float32)
    for dtype in ("float32", "bfloat16", "int8", "int4", "int6"):
        # quantized formats: the weights as this kernel set stores them, for the reference
        wq = _core._dequantize(_core._quantize(w, dtype), dtype, n, k).tolist() if dtype.startswith("int") else None
        for th in threads:
            plain = _core._backend_matmul(x, w, dtype=dtype, num_threads=th)
            biased = _core._backend_matmul(x, w, bias=b, dtype=dtype, num_threads=th)
            acc = _core._backend_matmul(x, w, out=o, dtype=dtype, num_threads=th)
            cases.append(dict(T=T, n=n, k=k, dtype=dtype, threads=th, plain=plain.tolist(), biased=biased.tolist(),
                              acc=acc.tolist(), wq=wq))
print(json.dumps(dict(isa=_core.isa(), cases=cases)))
"""


def skip_unless_runnable(isa: str) -> None:
    """Skips a case this CPU cannot run, the `best` case where a name forces the CPU's choice in another case, and
    under the sanitizers every set but the selected one."""
    from qwen_native import _core

    best = _core.select_isa(_core.cpu_features())
    if isa == "best" and best in ("generic", "avx2", "avx512"):
        pytest.skip(f"this CPU's choice, {best}, is forced by name in another case")
    if isa != "best" and not _core.select_isa(_core.cpu_features(), isa).startswith(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernels (it gets {best})")
    if SANITIZED and isa != "best" and not best.startswith(isa):
        pytest.skip("under the sanitizers only the selected kernel set runs")


def run_isa(isa: str) -> dict:
    env = dict(os.environ, QWEN_NATIVE_ISA=isa)  # "best": not a set's name, so the CPU's own choice
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(SHAPES), json.dumps(THREADS)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "best"])
def test_matmul_kernels(isa):
    """Each set forced, and the CPU's own choice where that is a set no name forces (avx512+bf16's GEMM)."""
    from qwen_native import _core

    skip_unless_runnable(isa)
    result = run_isa(isa)
    got_isa = result["isa"]
    assert got_isa == _core.select_isa(_core.cpu_features(), isa), got_isa
    rng = np.random.default_rng(0)
    data = []
    for T, n, k in SHAPES:
        data.append([rng.standard_normal(s).astype(np.float32) for s in ((T, k), (n, k), (n,), (T, n))])
    by_shape = {tuple(s): d for s, d in zip(SHAPES, data)}
    worst = 0.0
    for case in result["cases"]:
        x, w, b, o = by_shape[(case["T"], case["n"], case["k"])]
        if case["dtype"] == "bfloat16":
            w = bf16_round(w)  # stored as bf16
            if got_isa.endswith("+bf16"):
                x = bf16_round(x)  # VDPBF16PS (GEMV and GEMM) takes bf16 inputs
        elif case["dtype"] in ("int8", "int4", "int6"):
            w = np.asarray(case["wq"], dtype=np.float32)  # dequantized (tests/test_quant.py checks the format)
            x = quantize_inputs(x)  # integer dot products of the int8-rounded inputs
        ref = x.astype(np.float64) @ w.astype(np.float64).T
        for name, expect in (("plain", ref), ("biased", ref + b), ("acc", ref + o)):
            got = np.asarray(case[name])
            err = float(np.max(np.abs(got - expect)) / np.max(np.abs(expect)))
            worst = max(worst, err)
            assert err < 2e-6, f"{got_isa} {case['dtype']} {name} T={case['T']} n={case['n']} k={case['k']} " \
                               f"threads={case['threads']}: rel err {err:.2e}"
    print(f"{got_isa}: worst rel err {worst:.1e}")


AVX2 = dict(avx2=True, fma=True)
AVX512 = dict(AVX2, avx512f=True, avx512bw=True, avx512vl=True, avx512dq=True)
CPUS = [  # (what kind of CPU, its features, the kernel set it gets)
    ("x86-64 without AVX2", {}, "generic"),
    ("AVX2 without FMA", dict(avx2=True), "generic"),
    ("AVX2 (Haswell to Comet Lake, Zen 1-3)", AVX2, "avx2"),
    ("AVX2 + AVX-VNNI (Alder Lake)", dict(AVX2, avx_vnni=True), "avx2"),
    ("AVX-512 F without BW", dict(AVX2, avx512f=True), "avx2"),
    ("AVX-512 without VNNI (Skylake-SP)", AVX512, "avx2"),
    ("AVX-512 + VNNI (Cascade Lake, Ice Lake)", dict(AVX512, avx512_vnni=True), "avx512"),
    ("AVX-512 + BF16 (Cooper Lake, Zen 4/5)", dict(AVX512, avx512_bf16=True, avx512_vnni=True), "avx512+bf16"),
    ("AMX (Sapphire Rapids)", dict(AVX512, avx512_bf16=True, avx512_vnni=True, amx_tile=True, amx_bf16=True,
                                   amx_int8=True),
     "avx512+bf16"),
]


@pytest.mark.parametrize("kind, features, expected", CPUS, ids=[c[0] for c in CPUS])
def test_kernel_set_for_each_kind_of_cpu(kind, features, expected):
    """The choice of kernel set, for CPUs this machine may not be: the best set the features allow; a forced set
    (QWEN_NATIVE_ISA) only when the CPU can run it."""
    from qwen_native import _core

    assert _core.select_isa(features) == expected
    assert _core.select_isa(features, "generic") == "generic"
    can = {"generic", "avx2"} if features.get("avx2") and features.get("fma") else {"generic"}
    if expected.startswith("avx512"):
        can.add("avx512")
    for force in ("avx2", "avx512"):
        assert _core.select_isa(features, force) == (force if force in can else expected)
    assert _core.select_isa(features, "sse9") == expected  # an unknown name changes nothing


def test_the_kernel_set_in_use_is_the_one_selected():
    from qwen_native import _core

    feats = _core.cpu_features()
    assert isinstance(feats["model"], str)
    forced = os.environ.get("QWEN_NATIVE_ISA")
    assert _core.isa() == _core.select_isa(feats, forced)


ROWS_SCRIPT = r"""
import json, sys, numpy as np
from qwen_native import _core
rng = np.random.default_rng(1)
out = []
for n, k in ((37, 97), (64, 1536), (300, 64)):
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((17, k)).astype(np.float32)
    for dtype in ("float32", "bfloat16", "int8", "int4", "int6"):
        for th in (1, 3):
            batch = _core._backend_matmul(x, w, bias=b, dtype=dtype, num_threads=th, rows=True)
            alone = np.concatenate([_core._backend_matmul(x[t:t + 1], w, bias=b, dtype=dtype, num_threads=th)
                                    for t in range(17)])
            prefix = all(np.array_equal(_core._backend_matmul(x[:m], w, bias=b, dtype=dtype, num_threads=th,
                                                              rows=True), batch[:m]) for m in (2, 4, 5))
            if dtype in ("float32", "bfloat16"):
                # a short run of one sequence's rows is those rows through the GEMV
                prefix = prefix and all(np.array_equal(_core._backend_matmul(x[:m], w, bias=b, dtype=dtype,
                                                                             num_threads=th), batch[:m])
                                        for m in (2, 5, 16))
            out.append(dict(n=n, k=k, dtype=dtype, threads=th, same=bool(np.array_equal(batch, alone)),
                            prefix=bool(prefix)))
print(json.dumps(dict(isa=_core.isa(), cases=out)))
"""


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "best"])
def test_rows_of_several_sequences_equal_each_alone(isa):
    """The decode rows of several sequences (2, 4, 5 and 17 of them: every remainder of the AVX2 kernel's blocks of
    3 inputs) in one matmul, reading the weights once: each row bit for bit what a one-row matmul gives, in every
    format and kernel set."""
    from qwen_native import _core

    skip_unless_runnable(isa)
    env = dict(os.environ, QWEN_NATIVE_ISA=isa)
    res = json.loads(subprocess.run([sys.executable, "-c", ROWS_SCRIPT], env=env, capture_output=True, text=True,
                                    check=True).stdout)
    assert res["isa"] == _core.select_isa(_core.cpu_features(), isa), res["isa"]
    bad = [c for c in res["cases"] if not (c["same"] and c["prefix"])]
    assert not bad, bad
