"""tests/test_cuda.py against the CUDA backend's real sources running on the CPU emulation of the CUDA runtime
(tests/cuda_emu): kernels, launch geometry, graph capture and replay, the split-KV merge, argmax, GEMV and the
backend's bookkeeping all execute here, on machines without a GPU. What it cannot show: speed, real concurrency
between blocks, and anything that differs between the emulated and the real runtime (see tests/cuda_emu/README.md).

Builds the emulated extension into build/cuda_emu (reused while the sources are unchanged)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cuda_backend_on_the_emulator():
    if platform.system() != "Linux":
        pytest.skip("the emulator uses ucontext and mmap guard pages (Linux)")
    if not shutil.which(os.environ.get("CXX", "g++")):
        pytest.skip("no C++ compiler")
    try:
        import pybind11  # noqa: F401
    except ImportError:
        pytest.skip("pybind11 is not installed (part of the test extra)")
    b = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cuda_emu", "build.py"),
                        "--out", os.path.join(ROOT, "build", "cuda_emu")], capture_output=True, text=True)
    assert b.returncode == 0, b.stdout + b.stderr
    so = b.stdout.strip().splitlines()[-1]
    env = dict(os.environ, QWEN_NATIVE_CUDA_CORE=so)
    env.pop("QWEN_NATIVE_GEMV", None)
    env.pop("QWEN_NATIVE_CUDA_GRAPH", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                        os.path.join(ROOT, "tests", "test_cuda.py")], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=1800)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], tail
