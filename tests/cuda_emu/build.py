"""Builds `_core` with the CUDA backend running on the CPU emulation in this folder (tests only).

The sources of csrc/cuda/ are compiled as they are, by the host compiler, after three mechanical rewrites:
`kernel<<<grid, block, smem, stream>>>(args)` becomes `emu_launch(grid, block, smem, stream, kernel, args)`,
`extern __shared__ T name[];` becomes a pointer to the emulator's shared memory, and `__shared__` becomes
`static` (blocks run one at a time, so a function-static array is exactly the block's shared memory). Everything
else of the extension (bindings, model, CPU backend) is the real code, so tests/test_cuda.py runs unchanged
against it: QWEN_NATIVE_CUDA_CORE=<the .so this prints> python -m pytest tests/test_cuda.py.

    python tests/cuda_emu/build.py [--out DIR] [--jobs N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import hashlib
import os
import re
import subprocess
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^;{}()]*?>)?)\s*<<<\s*(.*?)\s*>>>\s*\(", re.S)
EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?unsigned\s+char\s+(\w+)\s*\[\s*\]\s*;")


def rewrite(src: str) -> str:
    src = EXTERN_SHARED.sub(r"unsigned char* \1 = ::emu::dynamic_smem();", src)
    src = re.sub(r"\b__shared__\b", "static", src)
    src, n = LAUNCH.subn(lambda m: f"emu_launch({m.group(2)}, {m.group(1)}, ", src)
    if "<<<" in src:
        raise SystemExit("build.py: a kernel launch was not rewritten")
    return src


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "cuda_emu"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    args = ap.parse_args()

    import pybind11  # the build needs its headers

    out = os.path.abspath(args.out)
    gen = os.path.join(out, "gen")
    obj = os.path.join(out, "obj")
    os.makedirs(gen, exist_ok=True)
    os.makedirs(obj, exist_ok=True)

    sources = []
    for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        dst = os.path.join(gen, os.path.basename(cu)[:-3] + ".cpp")
        text = rewrite(open(cu).read())
        if not os.path.exists(dst) or open(dst).read() != text:
            with open(dst, "w") as f:
                f.write(text)
        sources.append((dst, []))
    # The rest of the extension: every C++ file but the CPU-ISA-specific kernels (the portable ones serve) and the
    # CPU-only build's stand-in for the CUDA backend.
    skip = {"no_cuda.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp", "gemm_bf16.cpp"}
    for cpp in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))):
        if os.path.basename(cpp) not in skip:
            sources.append((cpp, []))
    sources.append((os.path.join(HERE, "emu.cpp"), []))

    include = [f"-I{os.path.join(HERE, 'include')}", f"-I{os.path.join(ROOT, 'csrc')}",
               f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    # The emulated decode attention splits the cache every 8 keys (64 on a GPU) so that tiny test contexts
    # exercise the split-KV merge; batched quantized matmuls dequantize tiles of 4096 values (4M on a GPU) so
    # that tiny test matrices take several.
    flags = ["-std=c++20", "-O1", "-g", "-fPIC", "-fvisibility=hidden", "-DQWEN_CUDA=1",
             "-DQWEN_CUDA_DECODE_MIN_CHUNK=8", "-DQWEN_CUDA_DEQUANT_TILE_ELEMS=4096",
             "-DQWEN_CUDA_TUNE_MAX_REPS=1", "-DQWEN_CUDA_TUNE_LAUNCHES=1", "-Wall", "-Wno-unused-parameter", "-Wno-unused-variable", "-Wno-unknown-pragmas"]

    def compile_one(item):
        src, extra = item
        tag = hashlib.sha1(src.encode()).hexdigest()[:8]
        o = os.path.join(obj, os.path.basename(src) + "." + tag + ".o")
        deps = [src] + glob.glob(os.path.join(ROOT, "csrc", "**", "*.h*"), recursive=True) + \
            glob.glob(os.path.join(HERE, "include", "*.h"))
        if os.path.exists(o) and os.path.getmtime(o) >= max(os.path.getmtime(d) for d in deps):
            return o
        cmd = [args.cxx, *flags, *include, *extra, "-c", src, "-o", o]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"compiling {src} failed:\n{r.stderr}")
        return o

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as ex:
        objs = list(ex.map(compile_one, sources))
    so = os.path.join(out, "_core" + sysconfig.get_config_var("EXT_SUFFIX"))
    r = subprocess.run([args.cxx, "-shared", "-o", so, *objs, "-pthread"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"linking failed:\n{r.stderr}")
    print(so)
    return 0


if __name__ == "__main__":
    sys.exit(main())
