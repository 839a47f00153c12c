"""The tests that drive native code (core forward paths, kernels, hardening, fuzzing) again, against a build of
the extension with AddressSanitizer + UndefinedBehaviorSanitizer (scripts/sanitize.sh), so every CI run checks the
C++ for memory errors and undefined behaviour. `scripts/sanitize.sh` with no arguments runs the whole suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import background

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE_TESTS = ["tests/test_core.py", "tests/test_kernels.py", "tests/test_hardening.py", "tests/test_fuzz.py"]


def _sanitizers_available() -> str:
    if os.environ.get("QWEN_NATIVE_SANITIZED"):
        return "already running under the sanitizers"
    if not shutil.which("cmake"):
        return "cmake is not on PATH (pip install cmake)"
    cxx = os.environ.get("CXX", "c++")
    if not shutil.which(cxx):
        return f"no C++ compiler ({cxx})"
    lib = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not lib or not os.path.isabs(lib) or not os.path.exists(lib):
        return f"{cxx} has no AddressSanitizer runtime"
    return ""


def background_job():
    """The sanitized build and its test run, as a background job (tests/background.py) beside the rest of the
    suite."""
    if _sanitizers_available():
        return None
    argv = ["bash", os.path.join(ROOT, "scripts", "sanitize.sh"), *NATIVE_TESTS, "-q", "-p", "no:cacheprovider"]
    return "sanitizers", argv, dict(os.environ, PYTHON=sys.executable), ROOT


@pytest.mark.skipif(bool(_sanitizers_available()), reason=_sanitizers_available() or "available")
def test_native_code_under_asan_and_ubsan():
    name, argv, env, cwd = background_job()
    rc, out = background.result(name, argv, timeout=2400, env=env, cwd=cwd)
    tail = out[-6000:]
    assert rc == 0, tail
    assert "ERROR: AddressSanitizer" not in tail and "runtime error:" not in tail, tail
    assert " passed" in tail, tail
