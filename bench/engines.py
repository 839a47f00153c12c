"""One engine, measured in its own process: `python bench/engines.py JOB.json OUT.json`.

bench.py writes the job (engine, model, dtype, device, threads, the exact token ids) and reads the result. Running
each engine in a fresh process keeps peak memory and thread pools apart. Every engine implements the same five
calls, and every figure is taken the same way around them:

    load()            weights from disk into memory, ready to run          → load time (median of repeats)
    prefill(ids)      one batched pass over `ids` from an empty cache; returns argmax of the last logits
    decode(token)     one token through the model; returns argmax of its logits (greedy, EOS never stops it)
    reset()           empty the KV cache
    unload()          free the model

Per repeat: reset, prefill(32-token prompt) timed from ids in to first token out (TTFT); then exactly M decode
calls, timed together (decode tok/s, prefill excluded); then reset and prefill(N-token prompt) timed (prefill
tok/s). One untimed warm-up (short prefill + a few decode steps) comes first.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Dict, List, Optional


# ----------------------------------------------------------------------------------------------- process figures
def vm_hwm_bytes() -> Optional[int]:
    """Peak resident set of this process (VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:
        return None


def reset_hwm() -> bool:
    """Restart the VmHWM count from the current RSS (Linux ≥ 4.0), so the peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class CpuShare:
    """How much of the machine other processes used while we were timing: (all busy CPU time in /proc/stat − this
    process's CPU time) ÷ (wall time × CPUs). 0 on a quiet machine; 0.5 means one of two cores was busy elsewhere."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ncpu = 0
        self.other = self.wall = 0.0
        self._start = None

    def _busy(self) -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        self.ncpu = sum(1 for ln in lines if ln.startswith("cpu") and ln[3:4].isdigit())
        v = [int(x) for x in lines[0].split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        total = sum(v[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
        return (total - idle) / self.tick

    def start(self):
        b = self._busy()
        t = os.times()
        self._start = None if b is None else (b, t.user + t.system, time.perf_counter())

    def stop(self):
        if self._start is None:
            return
        b = self._busy()
        t = os.times()
        b0, own0, w0 = self._start
        self.other += max(0.0, (b - b0) - (t.user + t.system - own0))
        self.wall += time.perf_counter() - w0
        self._start = None

    def fraction(self) -> Optional[float]:
        if not self.wall or not self.ncpu:
            return None
        return min(1.0, self.other / (self.wall * self.ncpu))


class DeviceMemSampler(threading.Thread):
    """Samples this process's GPU memory (NVML, else nvidia-smi) every few tens of ms; keeps the maximum. Where the
    per-process figure is unavailable (a container whose pids the driver does not see), it keeps the rise of the
    device's total used memory over its value at start instead (`self.source` says which)."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval, self.peak, self.source = interval, 0, None
        self.base_total, self.peak_total = None, 0
        self._stop_evt = threading.Event()
        self.pid = os.getpid()
        self._nvml = None
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.source = "nvml"
        except Exception:
            if shutil.which("nvidia-smi"):
                self.source, self.interval = "nvidia-smi", max(interval, 0.25)

    def _total(self) -> int:
        if self._nvml is not None:
            return sum(int(self._nvml.nvmlDeviceGetMemoryInfo(h).used) for h in self._handles)
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return sum(int(x) << 20 for x in out.split() if x.isdigit())

    def _sample(self) -> int:
        used = 0
        try:
            total = self._total()
            if self.base_total is None:
                self.base_total = total
            self.peak_total = max(self.peak_total, total - self.base_total)
        except Exception:
            pass
        if self._nvml is not None:
            for h in self._handles:
                for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                    try:
                        for p in getattr(self._nvml, fn)(h):
                            if p.pid == self.pid and p.usedGpuMemory:
                                used += int(p.usedGpuMemory)
                    except Exception:
                        pass
            return used
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0] == str(self.pid) and parts[1].isdigit():
                used += int(parts[1]) << 20
        return used

    def run(self):
        while not self._stop_evt.is_set():
            try:
                self.peak = max(self.peak, self._sample())
            except Exception:
                pass
            self._stop_evt.wait(self.interval)

    def start(self):
        try:
            self.base_total = self._total()  # before this process has allocated anything on the device
        except Exception:
            pass
        super().start()

    def stop(self) -> int:
        self._stop_evt.set()
        self.join(timeout=15)
        try:
            self.peak = max(self.peak, self._sample())
        except Exception:
            pass
        if self.peak == 0 and self.peak_total > 0:
            self.source = f"{self.source} device-wide rise over start, sampled"
            return self.peak_total
        self.source = f"{self.source} per-process, sampled"
        return self.peak


# ----------------------------------------------------------------------------------------------------- engines
def _argmax(logits) -> int:
    import numpy as np

    return int(np.argmax(logits))


class Ours:
    """qwen_native through its public `load`; for a test checkpoint without tokenizer.json (which `load` needs), the
    same files through _core.Model directly (`load_via` says which)."""

    def __init__(self, job):
        self.job = job
        self.model = self.core = None
        self.load_via = None

    def load(self):
        import qwen_native

        j = self.job
        no_tokenizer = os.path.isdir(j["model"]) and not os.path.exists(os.path.join(j["model"], "tokenizer.json"))
        if not no_tokenizer:
            self.model = qwen_native.load(j["model"], dtype=j["dtype"], device=j["device"],
                                          num_threads=j["threads"], max_context=j["max_context"])
            self.core = self.model.core
            self.load_via = "qwen_native.load"
        else:
            from qwen_native import _core
            from qwen_native.checkpoint import tensor_table
            from qwen_native.config import load_config
            from qwen_native.hub import local_weights

            d = j["model"]
            cfg = load_config(os.path.join(d, "config.json")).to_core_dict()
            self.core = _core.Model(cfg, tensor_table(local_weights(d)), dtype=j["dtype"], device=j["device"],
                                    max_context=j["max_context"], num_threads=j["threads"])
            self.load_via = "_core.Model + checkpoint.tensor_table (no tokenizer.json, which qwen_native.load needs)"

    def unload(self):
        for obj in (self.model, self.core):
            close = getattr(obj, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    pass
        self.model = self.core = None

    def reset(self):
        self.core.reset()

    def prefill(self, ids):
        return _argmax(self.core.prefill(ids))

    def decode(self, tok):
        return int(self.core.decode_argmax(tok))

    def info(self) -> Dict[str, Any]:
        import qwen_native
        from qwen_native import _core

        so = getattr(_core, "__file__", None)
        built = None
        if so and os.path.exists(so):
            built = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(os.path.getmtime(so)))
        streamed = getattr(self.core, "decode_bytes", None)  # this build's own count of its stored bytes
        return {"backend": self.core.backend, "load_via": self.load_via, "core_so": so, "core_so_built": built,
                "decode_bytes": streamed, "weight_bytes": getattr(self.core, "weight_bytes", None),
                "version": f"qwen_native {qwen_native.__version__}",
                "build": dict(_core.build_info()) if hasattr(_core, "build_info") else None}


class Transformers:
    """transformers + torch. CPU: the requested dtype, torch.set_num_threads(threads). CUDA: bf16 with eager or
    SDPA attention, or (compile=True) a StaticCache with the decode step under torch.compile."""

    def __init__(self, job):
        import torch
        import transformers

        self.torch, self.transformers, self.job = torch, transformers, job
        torch.set_num_threads(job["threads"])
        self.dev = torch.device("cuda" if job["device"].startswith("cuda") else "cpu")
        if job["device"].startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job["dtype"]]
        self.model = self.cache = self.step = None
        self.pos = 0

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def load(self):
        from transformers import AutoModelForCausalLM

        kw = dict(dtype=self.dtype, attn_implementation=self.job.get("attn") or "sdpa")
        if self.dev.type == "cuda":
            kw["device_map"] = str(self.dev)
        self.model = AutoModelForCausalLM.from_pretrained(self.job["model"], **kw).eval()
        self.sync()
        import inspect

        # transformers ≥ 5.2x names the KV cache argument `cache` (`past_key_values` is deprecated); older: the latter
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        if self.job.get("compile"):
            from transformers import StaticCache

            self.cache = StaticCache(config=self.model.config, max_cache_len=self.job["max_context"])
            self.step = self.torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=True)

    def unload(self):
        self.model = self.cache = self.step = None
        gc.collect()
        if self.dev.type == "cuda":
            self.torch.cuda.empty_cache()

    def reset(self):
        self.pos = 0
        if self.job.get("compile"):
            self.cache.reset()
        else:
            self.cache = None

    def _run(self, ids: List[int], compiled: bool) -> int:
        torch = self.torch
        with torch.no_grad():  # not inference_mode: a StaticCache must stay writable by reset() and compiled code
            x = torch.tensor([ids], dtype=torch.long, device=self.dev)
            kw = {self.cache_arg: self.cache, "use_cache": True}
            if self.job.get("compile"):
                kw["cache_position"] = torch.arange(self.pos, self.pos + len(ids), device=self.dev)
                if compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                    out = self.step(input_ids=x, **kw)
                else:
                    out = self.model(input_ids=x, logits_to_keep=1, **kw)
            else:
                out = self.model(input_ids=x, logits_to_keep=1, **kw)
                self.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            self.pos += len(ids)
            return int(out.logits[0, -1].argmax().item())  # .item() waits for the device

    def prefill(self, ids):
        return self._run(list(ids), compiled=False)

    def decode(self, tok):
        return self._run([tok], compiled=True)

    def peak_device_allocator(self) -> Optional[int]:
        if self.dev.type == "cuda":
            return int(self.torch.cuda.max_memory_reserved())
        return None

    def info(self):
        t = self.torch
        return {"backend": f"torch {t.__version__} ({self.dev.type}, {t.get_num_threads()} threads, "
                           f"attn={self.job.get('attn') or 'sdpa'}{', compile+static cache' if self.job.get('compile') else ''})",
                "version": f"transformers {self.transformers.__version__}, torch {t.__version__}"}


class LlamaCpp:
    """llama-cpp-python on a GGUF file: n_batch = n_ubatch ≥ the prompt so prefill is one batch, n_threads and
    n_threads_batch = threads; logits read after `eval` and argmax taken here, so EOS never stops it."""

    def __init__(self, job):
        import llama_cpp

        self.llama_cpp, self.job, self.llm = llama_cpp, job, None

    def load(self):
        j = self.job
        batch = max(512, len(j["prompt_ids"]), len(j["short_ids"]))
        self.llm = self.llama_cpp.Llama(
            model_path=j["gguf"], n_ctx=j["max_context"], n_batch=batch, n_ubatch=batch, n_threads=j["threads"],
            n_threads_batch=j["threads"], n_gpu_layers=-1 if j["device"].startswith("cuda") else 0,
            logits_all=False, verbose=False, seed=0)

    def unload(self):
        if self.llm is not None:
            close = getattr(self.llm, "close", None)
            if callable(close):
                close()
        self.llm = None
        gc.collect()

    def reset(self):
        self.llm.reset()

    def _last_logits(self):
        import numpy as np

        lc, llm = self.llama_cpp, self.llm
        ptr = lc.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))

    def prefill(self, ids):
        self.llm.eval(list(ids))
        return _argmax(self._last_logits())

    def decode(self, tok):
        self.llm.eval([tok])
        return _argmax(self._last_logits())

    def info(self):
        return {"backend": f"llama.cpp ({'cuda' if self.job['device'].startswith('cuda') else 'cpu'}, "
                           f"{self.job['threads']} threads)",
                "version": f"llama-cpp-python {getattr(self.llama_cpp, '__version__', '?')}"}


ENGINES = {"ours": Ours, "transformers": Transformers, "llama.cpp": LlamaCpp}


# -------------------------------------------------------------------------------------------------- measurement
def measure(job: Dict[str, Any], res: Dict[str, Any]) -> None:
    cuda = job["device"].startswith("cuda")
    sampler = DeviceMemSampler() if cuda else None
    if sampler is not None and sampler.source:
        sampler.start()
    try:
        eng = ENGINES[job["kind"]](job)
    except ImportError as e:
        res["status"] = "missing"
        raise RuntimeError(f"not installed in {sys.executable}: {e}") from None
    R, M = job["repeats"], job["gen_tokens"]
    res.update(load_s=[], ttft_s=[], decode_s=[], prefill_s=[], load1=[])

    for i in range(R):
        if i == R - 1:
            res["peak_rss_covers"] = "last load + all runs" if reset_hwm() else "whole process (VmHWM reset failed)"
        t0 = time.perf_counter()
        eng.load()
        res["load_s"].append(time.perf_counter() - t0)
        if i < R - 1:
            eng.unload()
            gc.collect()

    t0 = time.perf_counter()  # warm-up: page faults, lazy init, thread pools, (compile) graphs
    eng.reset()
    tok = eng.prefill(job["short_ids"])
    # an engine that maps its weights lazily pays for reading them here: load + this = load to first token
    res["first_prefill_after_load_s"] = time.perf_counter() - t0
    for _ in range(job.get("warmup_decode", 3)):
        tok = eng.decode(tok)
    res["warmup_s"] = time.perf_counter() - t0

    share = CpuShare()
    for r in range(R):
        res["load1"].append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        eng.reset()
        share.start()
        t0 = time.perf_counter()
        tok = eng.prefill(job["short_ids"])
        t1 = time.perf_counter()
        toks = [tok]
        for _ in range(M):
            tok = eng.decode(tok)
            toks.append(tok)
        t2 = time.perf_counter()
        share.stop()
        res["ttft_s"].append(t1 - t0)
        res["decode_s"].append(t2 - t1)
        if r == 0:
            res["tokens"] = toks
        eng.reset()
        share.start()
        t0 = time.perf_counter()
        eng.prefill(job["prompt_ids"])
        res["prefill_s"].append(time.perf_counter() - t0)
        share.stop()
        eng.reset()
    res["other_cpu"] = share.fraction()
    res.update(eng.info())
    res["peak_rss_bytes"] = vm_hwm_bytes()
    if cuda:
        alloc = getattr(eng, "peak_device_allocator", lambda: None)()
        if alloc is not None:
            res["peak_device_allocator_bytes"] = alloc
        if sampler is not None and sampler.source:
            res["peak_device_bytes"] = sampler.stop()
            res["peak_device_source"] = sampler.source
        else:
            res["peak_device_bytes"] = alloc
            res["peak_device_source"] = "torch allocator (no NVML/nvidia-smi)" if alloc is not None else None


def machine(job: Dict[str, Any], res: Dict[str, Any]) -> None:
    """The roofline and the compute peak, measured in this run. CPU: `_core.read_bandwidth` (a multi-threaded
    streaming read over a buffer far larger than the caches) and `_core.sgemm_gflops` at a prefill-shaped product.
    CUDA: a device-to-device copy (torch, else cupy), counted as bytes read + bytes written per second."""
    nbytes = int(job["bandwidth_bytes"])
    if job["device"].startswith("cuda"):
        res["bandwidth_kind"] = "device-to-device copy, (read + write) bytes / s, best of 10"
        try:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
            a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
            b = torch.empty_like(a)
            a.fill_(1)
            best = 0.0
            for _ in range(13):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                b.copy_(a)
                e1.record()
                torch.cuda.synchronize()
                best = max(best, 2 * a.numel() * 2 / (e0.elapsed_time(e1) / 1e3) / 1e9)
            res["bandwidth_gbs"] = best
            res["bandwidth_tool"] = f"torch {torch.__version__}"
            res["gpu"] = torch.cuda.get_device_name()
            return
        except ImportError:
            pass
        import cupy

        a = cupy.ones(nbytes // 4, dtype=cupy.float32)
        b = cupy.empty_like(a)
        best = 0.0
        for _ in range(13):
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            e0.record()
            b[...] = a
            e1.record()
            e1.synchronize()
            best = max(best, 2 * a.nbytes / (cupy.cuda.get_elapsed_time(e0, e1) / 1e3) / 1e9)
        res["bandwidth_gbs"] = best
        res["bandwidth_tool"] = f"cupy {cupy.__version__}"
        return
    from qwen_native import _core

    if hasattr(_core, "cpu_features"):  # what the kernels are chosen from
        res["cpu_features"] = dict(_core.cpu_features())
        res["kernel_set"] = _core.isa()
    T = job["threads"]
    res["bandwidth_kind"] = f"streaming read, {T} threads, {nbytes / 2**30:.2f} GiB buffer, best of 10"
    if hasattr(_core, "read_bandwidth"):
        res["bandwidth_gbs"] = _core.read_bandwidth(nbytes, T, 10)
        res["bandwidth_tool"] = "qwen_native._core.read_bandwidth"
    else:
        res["bandwidth_error"] = "this build of qwen_native._core has no read_bandwidth"
    m, n, k = job["sgemm_shape"]
    if hasattr(_core, "sgemm_gflops"):
        res["sgemm_gflops"] = _core.sgemm_gflops(m, n, k, T, 3)
        res["sgemm_shape"] = [m, n, k]
    else:
        res["sgemm_error"] = "this build of qwen_native._core has no sgemm_gflops"


def main(argv: List[str]) -> int:
    job_path, out_path = argv[1], argv[2]
    with open(job_path) as f:
        job = json.load(f)
    res: Dict[str, Any] = {"engine": job["engine"], "status": "ok", "python": sys.executable}
    try:
        (machine if job["kind"] == "machine" else measure)(job, res)
    except BaseException as e:  # report, never hide: KeyboardInterrupt included, the parent decides
        if res["status"] == "ok":
            res["status"] = "failed"
        res["error"] = str(e) if res["status"] == "missing" else f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(res, f)
    return 0 if res["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
