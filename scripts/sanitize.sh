#!/usr/bin/env bash
# Build the native core with AddressSanitizer + UndefinedBehaviorSanitizer and run the test suite against it.
#
#   scripts/sanitize.sh                       # build (incremental) + the whole suite
#   scripts/sanitize.sh tests/test_fuzz.py -x # build + these pytest arguments instead
#   QWEN_SANITIZE_BUILD_ONLY=1 scripts/sanitize.sh
#
# The sanitized _core goes to build/sanitize/ (QWEN_SANITIZE_BUILD to change) and is used through PYTHONPATH only:
# the installed package (editable or not) is not touched. A sitecustomize.py in the staging directory takes the
# editable install's import hook out of the way, so `import qwen_native` — in pytest and in every subprocess the
# tests start — gets the sources of this checkout with the sanitized extension. Needs: a C++ compiler with ASan and
# UBSan (gcc or clang), cmake, ninja or make, pybind11 and the test dependencies (pip install -e .[test]).
#
# How it runs: libasan must be the first library loaded, so it is LD_PRELOADed into the (uninstrumented) Python,
# with libstdc++ (see below).
# detect_leaks=0 because CPython itself keeps memory until exit; PYTHONMALLOC=malloc so Python objects and numpy
# arrays come from ASan's allocator and overflows into them are caught; allocator_may_return_null=1 so an
# impossible allocation is a MemoryError, as without ASan. Any ASan report or UBSan error stops the process with a
# stack trace (-fno-sanitize-recover), so it fails the test it happens in. The CUDA backend is not built (ASan and
# the CUDA driver do not mix; the CUDA code has its own checks in tests/test_cuda*.py), and the tests that compile
# CUDA code or a separate emulator build (test_cuda_compile.py, test_cuda_emulated.py) are left out: they do not
# load this extension.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${QWEN_SANITIZE_BUILD:-build/sanitize}
PY=${PYTHON:-python3}
CXX=${CXX:-c++}
STAGE=$ROOT/$BUILD/stage

generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_COMPILER="$CXX" \
    -DQWEN_NATIVE_SANITIZE=ON \
    -DQWEN_NATIVE_CUDA=OFF \
    -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)"
fi
cmake --build "$BUILD" --target _core --parallel "${QWEN_SANITIZE_JOBS:-2}"

# The staging package: this checkout's Python files (symlinks) + the sanitized extension.
rm -rf "$STAGE"
mkdir -p "$STAGE/qwen_native"
for f in "$ROOT"/python/qwen_native/*.py "$ROOT"/python/qwen_native/py.typed; do ln -s "$f" "$STAGE/qwen_native/"; done
ext=$(ls "$BUILD"/_core*.so | head -n 1)
ln -s "$ROOT/$ext" "$STAGE/qwen_native/"
cat > "$STAGE/sitecustomize.py" <<'PYEOF'
# Written by scripts/sanitize.sh: drop the import hooks of an editable qwen_native install, so that the staging
# directory (first on PYTHONPATH) provides qwen_native.
import sys


def _editable_qwen_native(finder):
    module = type(finder).__module__ or ""
    return "editable" in module and "qwen_native" in module


sys.meta_path[:] = [f for f in sys.meta_path if not _editable_qwen_native(f)]
PYEOF
[ "${QWEN_SANITIZE_BUILD_ONLY:-0}" = "1" ] && { echo "sanitized build: $STAGE"; exit 0; }

asan=$("$CXX" -print-file-name=libasan.so)
if [ ! -e "$asan" ]; then echo "sanitize.sh: $CXX has no libasan.so" >&2; exit 2; fi
# libstdc++ right after libasan: ASan finds the real __cxa_throw at start-up, and Python does not load libstdc++
# itself, so without it the first C++ exception aborts ("real___cxa_throw != 0").
cxxlib=$("$CXX" -print-file-name=libstdc++.so)
export LD_PRELOAD="$asan $(readlink -f "$cxxlib")${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:abort_on_error=0:print_summary=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export PYTHONMALLOC=malloc
export QWEN_NATIVE_SANITIZED=1  # tests that measure RSS skip that part: ASan's quarantine holds freed memory
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - "$STAGE" <<'PYEOF'
import os, sys
from qwen_native import _core
assert os.path.realpath(_core.__file__).startswith(os.path.realpath(sys.argv[1] + "/..")), _core.__file__
print("sanitized _core:", _core.__file__, _core.build_info())
PYEOF

if [ "$#" -eq 0 ]; then
  set -- tests -p no:cacheprovider \
    --ignore=tests/test_cuda_compile.py --ignore=tests/test_cuda_emulated.py
fi
exec "$PY" -m pytest "$@"
