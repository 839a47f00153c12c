"""CI guard for the CUDA backend on machines without a GPU: every csrc/cuda/*.cu compiles with nvcc, and the
objects link into a shared library with no undefined symbol that loads and answers cuda_available() without a GPU.

Needs nvcc on PATH and the cuBLAS headers (the nvidia-cublas wheel, which the `test` extra installs on Linux
x86-64, or a CUDA toolkit that has them); skipped, saying which is missing, otherwise. One architecture (sm_80),
compile only: a few seconds per file."""

from __future__ import annotations

import concurrent.futures
import glob
import os
import platform
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def cublas_dirs(nvcc: str):
    """(include dir, libcublas.so.N) from the nvidia-cublas wheel (cu13 or cu12 layout), else the toolkit."""
    try:
        import nvidia  # namespace package of NVIDIA's wheels
        bases = list(nvidia.__path__)
    except ImportError:
        bases = []
    for base in bases:
        for sub in sorted(os.listdir(base)):
            inc, lib = os.path.join(base, sub, "include"), os.path.join(base, sub, "lib")
            libs = sorted(glob.glob(os.path.join(lib, "libcublas.so.*")))
            if os.path.isfile(os.path.join(inc, "cublas_v2.h")) and libs:
                return inc, libs[0]
    toolkit = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    for inc in (os.path.join(toolkit, "include"), os.path.join(toolkit, "targets", "x86_64-linux", "include")):
        if os.path.isfile(os.path.join(inc, "cublas_v2.h")):
            libs = sorted(glob.glob(os.path.join(toolkit, "lib*", "libcublas.so*")) +
                          glob.glob(os.path.join(toolkit, "targets", "x86_64-linux", "lib", "libcublas.so*")))
            return inc, libs[0] if libs else None
    return None, None


@pytest.fixture(scope="module")
def toolchain():
    nvcc = shutil.which("nvcc")
    if not nvcc:
        pytest.skip("nvcc is not on PATH")
    inc, lib = cublas_dirs(nvcc)
    if not inc:
        pytest.skip("no cuBLAS headers: pip install nvidia-cublas (part of the test extra on Linux x86-64)")
    return nvcc, inc, lib


@pytest.fixture(scope="module")
def objects(toolchain, tmp_path_factory):
    nvcc, inc, _ = toolchain
    out = tmp_path_factory.mktemp("cuda_objs")

    def compile_one(src):
        obj = str(out / (os.path.basename(src) + ".o"))
        cmd = [nvcc, "-c", "-std=c++17", "-arch=sm_80", "-Xcompiler=-fPIC", "-Werror=all-warnings",
               "-I", os.path.join(ROOT, "csrc"), "-I", inc, src, "-o", obj]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return src, obj, r

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        results = list(ex.map(compile_one, CUDA_SOURCES))
    return results


def test_there_are_cuda_sources():
    assert len(CUDA_SOURCES) >= 4, CUDA_SOURCES


@pytest.mark.parametrize("name", [os.path.basename(s) for s in CUDA_SOURCES])
def test_cu_file_compiles(objects, name):
    for src, _, r in objects:
        if os.path.basename(src) == name:
            assert r.returncode == 0, f"nvcc failed on {name}:\n{r.stdout}\n{r.stderr}"
            return
    raise AssertionError(name)


def test_objects_link_and_load_without_a_gpu(toolchain, objects, tmp_path):
    nvcc, _, lib = toolchain
    if any(r.returncode for _, _, r in objects):
        pytest.skip("a file did not compile (reported above)")
    if not lib:
        pytest.skip("no libcublas.so to link against")
    # The core's symbols the backend uses: the float16 conversions (weights.cpp) and the CPU kernels' quantize_row
    # (quantized weights are made on the host), with the flags CMakeLists.txt gives each kernel set.
    cxx = os.environ.get("CXX", "g++")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    host = [("weights.cpp", []), ("cpu/kernels_generic.cpp", []), ("cpu/kernels_dispatch.cpp", [])]
    if x86:
        host += [("cpu/kernels_avx2.cpp", ["-mavx2", "-mfma", "-mf16c"]),
                 ("cpu/kernels_avx512.cpp", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni",
                                             "-mavx2", "-mfma", "-mf16c"]),
                 ("cpu/gemm_bf16.cpp", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
                                        "-mavx2", "-mfma"])]
    host_objs = []
    for src, flags in host:
        o = str(tmp_path / (os.path.basename(src) + ".o"))
        r = subprocess.run([cxx, "-std=c++17", "-O1", "-fPIC", "-c", *flags, *(["-DQWEN_X86=1"] if x86 else []),
                            "-I", os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", src), "-o", o],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        host_objs.append(o)
    so = str(tmp_path / "libqwen_cuda_check.so")
    r = subprocess.run([nvcc, "-shared", "-arch=sm_80", "-o", so, *[o for _, o, _ in objects], *host_objs,
                        "-Xlinker", lib, "-Xlinker", "--no-undefined", "-Xlinker", "-rpath=" + os.path.dirname(lib)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"link failed:\n{r.stdout}\n{r.stderr}"
    # Loads (static cudart, libcublas through the rpath) and answers without a GPU instead of crashing.
    code = ("import ctypes, sys; f = ctypes.CDLL(sys.argv[1])._ZN4qwen14cuda_availableEv; "
            "f.restype = ctypes.c_bool; print(f())")
    r = subprocess.run([sys.executable, "-c", code, so], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in ("True", "False")
