"""tests/test_cuda.py against the CUDA backend's real sources running on the CPU emulation of the CUDA runtime
(tests/cuda_emu): kernels, launch geometry, graph capture and replay, the split-KV merge, argmax, GEMV and the
backend's bookkeeping all execute here, on machines without a GPU. What it cannot show: speed, real concurrency
between blocks, and anything that differs between the emulated and the real runtime (see tests/cuda_emu/README.md).

Builds the emulated extension into build/cuda_emu (reused while the sources are unchanged), then runs
tests/test_cuda.py against it: `python tests/test_cuda_emulated.py` does both; the test runs that as a background
job (tests/background.py) beside the rest of the suite."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import pytest

import background

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unavailable() -> str:
    if platform.system() != "Linux":
        return "the emulator uses ucontext and mmap guard pages (Linux)"
    if not shutil.which(os.environ.get("CXX", "g++")):
        return "no C++ compiler"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed (part of the test extra)"
    return ""


def background_job() -> Optional[Tuple[str, List[str], Dict[str, str], str]]:
    if _unavailable():
        return None
    return "cuda_emulated", [sys.executable, os.path.abspath(__file__)], background.env_with(), ROOT


def test_cuda_backend_on_the_emulator():
    if _unavailable():
        pytest.skip(_unavailable())
    name, argv, env, cwd = background_job()
    rc, out = background.result(name, argv, timeout=2400, env=env, cwd=cwd)
    tail = out[-6000:]
    assert rc == 0, tail
    last = out.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last, tail


def main() -> int:
    b = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cuda_emu", "build.py"),
                        "--out", os.path.join(ROOT, "build", "cuda_emu")], capture_output=True, text=True)
    if b.returncode != 0:
        print(b.stdout + b.stderr)
        return 1
    env = dict(os.environ, QWEN_NATIVE_CUDA_CORE=b.stdout.strip().splitlines()[-1])
    env.pop("QWEN_NATIVE_GEMV", None)
    env.pop("QWEN_NATIVE_CUDA_GRAPH", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           os.path.join(ROOT, "tests", "test_cuda.py")], env=env, cwd=ROOT, timeout=2400).returncode


if __name__ == "__main__":
    sys.exit(main())
