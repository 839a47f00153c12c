#!/usr/bin/env python3
"""qwen-native benchmark: our engine and its peers, side by side, in one run, against the machine's own roofline.

    python bench/bench.py --model /path/to/Qwen2.5-1.5B-Instruct --dtype bfloat16 --threads 2 \\
        --peer transformers --peer llama.cpp=/path/to/model-f16.gguf --json out.json

For each engine (each in its own process): load time, prefill tok/s over exactly --prompt-tokens tokens of real text
in one batched pass, time to first token for a 32-token prompt, decode tok/s over exactly --gen-tokens greedy tokens
(EOS ignored, prefill excluded), peak RSS (CPU) or peak device memory (CUDA), and achieved GB/s = bytes of weights
streamed per decoded token × decode tok/s. The machine's read bandwidth (CPU) or copy bandwidth (CUDA) is measured in
the same run; roofline tok/s = bandwidth ÷ bytes per token. Medians over --repeats. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import gguf_info  # noqa: E402

TTFT_TOKENS = 32
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
OUR_DTYPES = ("float32", "bfloat16", "int8", "int4")  # the quantized ones are ours only (no transformers peer)


# --------------------------------------------------------------------------------------------- model arithmetic
def matrix_params(cfg: Dict[str, Any]) -> Dict[str, int]:
    """Parameters of the matrices one decoded token streams: every layer's q/k/v/o and gate/up/down, and the lm_head
    (the embedding matrix itself when tied: counted once). The embedding row gather, norms and biases are
    negligible (< 0.01%) and left out."""
    H, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    attn = H * nh * hd * 2 + H * nkv * hd * 2  # q, o; k, v
    mlp = 3 * H * I
    return {"layers": L * (attn + mlp), "lm_head": V * H}


def bytes_per_token(cfg: Dict[str, Any], dtype: str) -> int:
    p = matrix_params(cfg)
    return (p["layers"] + p["lm_head"]) * DTYPE_BYTES[dtype]


def prefill_flops(cfg: Dict[str, Any], n: int) -> float:
    """FLOPs of one prefill of n tokens from an empty cache: 2·n·(layer matrix params), causal attention
    (QKᵀ and PV over the lower triangle: 2·n(n+1)·head_dim per head per layer), and the lm_head for the last token
    only (what a prefill that returns the last logits needs)."""
    H, L, nh = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or H // nh
    p = matrix_params(cfg)
    return 2.0 * n * p["layers"] + L * nh * 2.0 * n * (n + 1) * hd + 2.0 * p["lm_head"]


def weight_bytes_in_memory(cfg: Dict[str, Any], dtype: str) -> int:
    """All weights held in memory in `dtype` (embedding included; a tied lm_head not twice)."""
    p = matrix_params(cfg)
    extra = 0 if cfg.get("tie_word_embeddings", False) else cfg["vocab_size"] * cfg["hidden_size"]
    return (p["layers"] + p["lm_head"] + extra) * DTYPE_BYTES[dtype]


# ------------------------------------------------------------------------------------------------------ inputs
def resolve_model(model: str) -> str:
    if os.path.isdir(model):
        return os.path.abspath(model)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SystemExit(f"--model {model!r} is not a directory and huggingface_hub is not installed") from None
    return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])


def default_text() -> Tuple[str, str]:
    """Real English prose and code that every Python install carries: the standard library's textwrap and
    argparse sources, docstrings included."""
    stdlib = sysconfig.get_paths()["stdlib"]
    parts, names = [], []
    for name in ("textwrap.py", "argparse.py"):
        try:
            with open(os.path.join(stdlib, name), encoding="utf-8") as f:
                parts.append(f.read())
                names.append(name)
        except OSError:
            pass
    if not parts:
        with open(os.path.abspath(__file__), encoding="utf-8") as f:
            return f.read(), "bench/bench.py"
    return "\n".join(parts), f"Python {platform.python_version()} stdlib {' + '.join(names)}"


def make_prompts(model_dir: str, vocab: int, n: int, text_file: Optional[str], seed: int = 0):
    """(prompt ids (n), short prompt ids (32), description). Tokenizes real text with the model's tokenizer.json and
    cuts exactly; the 32-token prompt is the text that follows. Without a tokenizer: random ids (seeded)."""
    need = n + TTFT_TOKENS
    tok_path = os.path.join(model_dir, "tokenizer.json")
    if os.path.exists(tok_path):
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(tok_path)
            if text_file:
                with open(text_file, encoding="utf-8") as f:
                    text, source = f.read(), text_file
            else:
                text, source = default_text()
            ids = tok.encode(text, add_special_tokens=False).ids
            if not ids:
                raise ValueError("the text tokenizes to nothing")
            while len(ids) < need:
                ids = ids + ids
            ids = [int(i) for i in ids[:need]]
            if max(ids) >= vocab:
                raise ValueError(f"tokenizer.json produces ids beyond the model's vocab_size {vocab}")
            return ids[:n], ids[n:], f"real text ({source}), tokenizer.json"
        except Exception as e:  # fall through to random ids, said so in the output
            print(f"note: could not tokenize text ({type(e).__name__}: {e}); using random token ids", file=sys.stderr)
    import random

    rng = random.Random(seed)
    ids = [rng.randrange(vocab) for _ in range(need)]
    return ids[:n], ids[n:], f"random ids (seed {seed}; no usable tokenizer.json)"


# ----------------------------------------------------------------------------------------------- machine facts
def machine_facts() -> Dict[str, Any]:
    facts: Dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Core(s) per socket", "Socket(s)", "Thread(s) per core"):
                facts["lscpu " + k.strip()] = v.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    facts["cpu_count"] = os.cpu_count()
    try:
        facts["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/meminfo") as f:
            facts["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            if out:
                facts["gpus"] = out.splitlines()
        except (OSError, subprocess.SubprocessError):
            pass
    return facts


def git_state() -> Dict[str, Any]:
    def git(*a):
        return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True, timeout=20).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", "csrc", "python", "CMakeLists.txt", "pyproject.toml")
        return {"commit": commit or None, "engine_sources_modified": bool(dirty),
                "modified": dirty.splitlines()[:20] if dirty else []}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def others_busy(window: float = 3.0) -> Optional[float]:
    """Share of the machine's CPU time used over `window` seconds while this (sleeping) process waits: what
    everything else is doing right now. None where /proc/stat is unreadable."""
    def busy():
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        v = [int(x) for x in lines[0].split()[1:9]]
        n = sum(1 for ln in lines if ln.startswith("cpu") and ln[3:4].isdigit())
        return sum(v) - v[3] - v[4], n
    try:
        b0, n = busy()
        time.sleep(window)
        b1, _ = busy()
    except (OSError, ValueError, IndexError):
        return None
    return (b1 - b0) / (os.sysconf("SC_CLK_TCK") * window * max(1, n))


def wait_quiet(max_wait: float, below: float) -> Optional[float]:
    """Wait (up to max_wait s) until other processes use less than `below` of the CPUs; returns the last share."""
    deadline = time.monotonic() + max_wait
    share = others_busy()
    while share is not None and share >= below and time.monotonic() < deadline:
        print(f"  waiting for a quiet machine: others use {share * 100:.0f}% of the CPUs", flush=True)
        time.sleep(10)
        share = others_busy()
    return share


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# ------------------------------------------------------------------------------------------------- the engines
def plan_engines(args, dtypes: List[str]) -> List[Dict[str, Any]]:
    cuda = args.device.startswith("cuda")
    plan: List[Dict[str, Any]] = []
    peers = list(args.peer or [])
    also = []
    for spec in args.also_ours or []:
        label, sep, python = spec.partition("=")
        if not sep or not label or not python:
            raise SystemExit(f"--also-ours wants LABEL=PYTHON, got {spec!r}")
        also.append((label, python))
    for dt in dtypes:
        plan.append({"engine": "ours", "kind": "ours", "dtype": dt})
        for label, python in also:  # another build of ours (e.g. the commit before a change) in the same run
            plan.append({"engine": f"ours-{label}", "kind": "ours", "dtype": dt, "python": python})
        if dt not in DTYPE_BYTES:  # int8 / int4: llama.cpp's quantized GGUFs are the peers
            continue
        for p in peers:
            if p == "transformers":
                if cuda:
                    plan += [{"engine": "transformers-eager", "kind": "transformers", "dtype": dt, "attn": "eager"},
                             {"engine": "transformers-sdpa", "kind": "transformers", "dtype": dt, "attn": "sdpa"},
                             {"engine": "transformers-compile", "kind": "transformers", "dtype": dt, "attn": "sdpa",
                              "compile": True}]
                else:
                    plan.append({"engine": "transformers", "kind": "transformers", "dtype": dt, "attn": "sdpa"})
            elif p in ("transformers-eager", "transformers-sdpa"):
                plan.append({"engine": p, "kind": "transformers", "dtype": dt, "attn": p.split("-")[1]})
            elif p == "transformers-compile":
                plan.append({"engine": p, "kind": "transformers", "dtype": dt, "attn": "sdpa", "compile": True})
    for p in peers:
        if p.startswith("llama.cpp"):
            _, _, path = p.partition("=")
            e = {"engine": "llama.cpp", "kind": "llama.cpp", "gguf": os.path.abspath(path) if path else ""}
            try:
                info = gguf_info.read_gguf(e["gguf"])
                e["dtype"] = "gguf " + gguf_info.weight_type_label(info)
                e["bytes_per_token"] = gguf_info.streamed_bytes_per_token(info)
                e["gguf_types"] = gguf_info.type_breakdown(info)
            except (OSError, ValueError) as ex:
                e["dtype"] = "gguf ?"
                e["plan_error"] = f"cannot read GGUF {path!r}: {ex}" if path else \
                    "--peer llama.cpp needs a GGUF file: --peer llama.cpp=FILE.gguf"
            plan.append(e)
        elif p not in ("transformers", "transformers-eager", "transformers-sdpa", "transformers-compile"):
            plan.append({"engine": p, "kind": "unknown", "dtype": "-",
                         "plan_error": f"unknown peer {p!r} (known: transformers, transformers-eager, "
                                       "transformers-sdpa, transformers-compile, llama.cpp=FILE.gguf)"})
    if args.engines:
        wanted = [w.strip() for w in args.engines.split(",") if w.strip()]
        plan = [e for e in plan if any(e["engine"] == w or e["engine"].startswith(w + "-") for w in wanted)]
    return plan


def run_worker(job: Dict[str, Any], python: str, timeout: float, verbose: bool) -> Dict[str, Any]:
    """Runs engines.py on `job` in a new process (own session, so a timeout can end it and its children)."""
    with tempfile.TemporaryDirectory(prefix="qwen-bench-") as tmp:
        job_path, out_path, log_path = (os.path.join(tmp, n) for n in ("job.json", "out.json", "log.txt"))
        with open(job_path, "w") as f:
            json.dump(job, f)
        env = dict(os.environ)
        th = str(job.get("threads", ""))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env.setdefault(var, th)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                proc = subprocess.Popen([python, os.path.join(HERE, "engines.py"), job_path, out_path],
                                        stdout=None if verbose else log, stderr=None if verbose else log,
                                        env=env, start_new_session=True)
            except OSError as e:
                return {"engine": job.get("engine"), "status": "failed", "error": f"cannot start {python}: {e}"}
            rusage = None
            timed_out = False

            def kill():  # the worker runs in its own session: end its whole process group
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return os.wait4(proc.pid, 0)

            try:
                while True:
                    pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        rusage, proc.returncode = ru, os.waitstatus_to_exitcode(status)
                        break
                    if time.perf_counter() - t0 > timeout:
                        timed_out = True
                        _, status, rusage = kill()
                        proc.returncode = os.waitstatus_to_exitcode(status)
                        break
                    time.sleep(0.1)
            except BaseException:  # Ctrl-C in the parent must not leave a worker running
                kill()
                raise
        tail = ""
        if not verbose:
            with open(log_path, errors="replace") as f:
                tail = f.read()[-3000:]
        res: Dict[str, Any]
        if os.path.exists(out_path) and not timed_out:
            with open(out_path) as f:
                res = json.load(f)
        else:
            why = f"timed out after {timeout:.0f} s" if timed_out else f"worker exited with status {proc.returncode}"
            res = {"engine": job.get("engine"), "status": "timeout" if timed_out else "failed", "error": why}
        if res.get("status") != "ok" and tail:
            res["log_tail"] = tail
        if rusage is not None:
            res["process_max_rss_bytes"] = rusage.ru_maxrss * 1024  # the whole child life, all loads included
        res["wall_s"] = time.perf_counter() - t0
        return res


# ------------------------------------------------------------------------------------------------------ figures
def summarize(res: Dict[str, Any], e: Dict[str, Any], cfg, N: int, M: int, bandwidth: Optional[float]) -> None:
    """Medians and derived figures, added to `res` in place."""
    if res.get("status") != "ok":
        return
    med = statistics.median
    res["load_s_median"] = med(res["load_s"])
    res["prefill_tok_s"] = N / med(res["prefill_s"])
    res["ttft_s_median"] = med(res["ttft_s"])
    res["decode_tok_s"] = M / med(res["decode_s"])
    res["prefill_gflops"] = prefill_flops(cfg, N) / med(res["prefill_s"]) / 1e9
    res["prefill_tok_s_best"] = N / min(res["prefill_s"])
    res["decode_tok_s_best"] = M / min(res["decode_s"])
    res["ttft_s_best"] = min(res["ttft_s"])
    if res.get("first_prefill_after_load_s") is not None:
        res["load_to_first_token_s"] = res["load_s"][-1] + res["first_prefill_after_load_s"]
    # repeats that disagree by more than 15% of their median: something else was using the machine
    res["noisy"] = [k for k in ("prefill_s", "ttft_s", "decode_s")
                    if len(res[k]) > 1 and (max(res[k]) - min(res[k])) > 0.15 * med(res[k])]
    bpt = e.get("bytes_per_token") or res.get("decode_bytes")  # GGUF tensor sizes, or our build's own count
    if bpt is None and e.get("dtype") in DTYPE_BYTES:
        bpt = bytes_per_token(cfg, e["dtype"])
    res["bytes_per_token"] = bpt
    if bpt:
        res["achieved_gbs"] = bpt * res["decode_tok_s"] / 1e9
        if bandwidth:
            res["roofline_tok_s"] = bandwidth * 1e9 / bpt
            res["fraction_of_roofline"] = res["decode_tok_s"] / res["roofline_tok_s"]
    loads = [x for x in res.get("load1", []) if x is not None]
    res["load1_median"] = med(loads) if loads else None


def fmt(x: Optional[float], unit: str = "") -> str:
    if x is None:
        return "-"
    a = abs(x)
    s = f"{x:.0f}" if a >= 100 else f"{x:.1f}" if a >= 10 else f"{x:.2f}" if a >= 0.1 else f"{x:.3f}"
    return s + unit


def agreement(tokens: Optional[List[int]], ref: Optional[List[int]]) -> str:
    if not tokens or not ref:
        return "-"
    k = 0
    for a, b in zip(tokens, ref):
        if a != b:
            break
        k += 1
    return f"{k}/{min(len(tokens), len(ref))}"


def table(rows: List[Dict[str, Any]], cuda: bool) -> str:
    head = ["engine", "dtype", "load s", "load→1st tok s", "prefill tok/s", "GFLOP/s", "TTFT ms", "decode tok/s", "GB/token", "GB/s",
            "% roofline", "peak GPU GB" if cuda else "peak RSS GB", "load1", "others' CPU", "same greedy"]
    lines = []
    for r in rows:
        if r.get("status") != "ok":
            msg = (r.get("error") or "").strip().splitlines()
            lines.append([r["engine"], r.get("dtype", "-"), f"{r.get('status', 'failed').upper()}: "
                          + (msg[-1][:150] if msg else "")])
            continue
        mem = r.get("peak_device_bytes") if cuda else r.get("peak_rss_bytes")
        frac = r.get("fraction_of_roofline")
        oc = r.get("other_cpu")
        noisy = r.get("noisy") or []
        star = lambda k: "*" if k in noisy else ""  # noqa: E731
        lines.append([
            r["engine"], r.get("dtype", "-"), fmt(r["load_s_median"]), fmt(r.get("load_to_first_token_s")),
            fmt(r["prefill_tok_s"]) + star("prefill_s"), fmt(r["prefill_gflops"]),
            fmt(r["ttft_s_median"] * 1e3) + star("ttft_s"), fmt(r["decode_tok_s"]) + star("decode_s"),
            fmt(r["bytes_per_token"] / 1e9 if r.get("bytes_per_token") else None), fmt(r.get("achieved_gbs")),
            f"{frac * 100:.1f}%" if frac is not None else "-", fmt(mem / 1e9 if mem else None),
            fmt(r.get("load1_median")), f"{oc * 100:.0f}%" if oc is not None else "-", r.get("agree", "-")])
    full = [l for l in lines if len(l) == len(head)]
    widths = [max([len(head[i])] + [len(l[i]) for l in full]) for i in range(len(head))]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)),
           "-|-".join("-" * w for w in widths)]
    for l in lines:
        if len(l) < len(head):
            out.append(" | ".join(c.ljust(w) for c, w in zip(l[:2], widths)) + " | " + l[2])
        else:
            out.append(" | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths))))
    return "\n".join(out)


def markdown_table(rows: List[Dict[str, Any]], cuda: bool) -> str:
    t = table(rows, cuda).splitlines()
    return "\n".join(["| " + t[0] + " |", "|-" + t[1] + "-|"] + ["| " + l + " |" for l in t[2:]])


# --------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark qwen-native against transformers and llama.cpp "
                                             "(see bench/README.md).")
    ap.add_argument("--model", required=True, help="Hugging Face model directory (or repo id)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", default=None,
                    help="float32, bfloat16, int8, int4, comma-separated (default: float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--threads", type=int, default=None, help="threads for every engine (default: usable CPUs)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prefill length (default 512)")
    ap.add_argument("--gen-tokens", type=int, default=128, help="greedy tokens decoded (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats; medians are reported (default 3)")
    ap.add_argument("--peer", action="append", default=[],
                    help="transformers | transformers-eager | transformers-sdpa | transformers-compile | "
                         "llama.cpp=FILE.gguf (repeatable)")
    ap.add_argument("--engines", default=None,
                    help="comma-separated subset to run, e.g. 'ours' or 'ours,llama.cpp' (default: ours + peers)")
    ap.add_argument("--json", default=None, help="write every figure (and the raw per-repeat times) here")
    ap.add_argument("--markdown", default=None, help="also write the table as Markdown here")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs ours and the CPU probe (default: this one)")
    ap.add_argument("--also-ours", action="append", default=[], metavar="LABEL=PYTHON",
                    help="also run ours from another interpreter (another build, e.g. the previous commit), as "
                         "engine ours-LABEL; repeatable")
    ap.add_argument("--peer-python", default=None,
                    help="interpreter that runs the peers (default: --python), e.g. a venv with torch/llama_cpp")
    ap.add_argument("--text-file", default=None, help="text to tokenize for the prompts (default: stdlib sources)")
    ap.add_argument("--bandwidth-mib", type=int, default=1024,
                    help="buffer for the bandwidth probe, MiB (0: skip the bandwidth and sgemm probes)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per engine before it is stopped (default 3600)")
    ap.add_argument("--compile-timeout", type=float, default=900, help="seconds for transformers-compile (default 900)")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each engine, wait up to this long for other processes to use less than "
                         "--quiet-below of the CPUs")
    ap.add_argument("--quiet-below", type=float, default=0.10, help="CPU share counted as quiet for --wait-quiet (default 0.10)")
    ap.add_argument("--verbose", action="store_true", help="show the workers' own output")
    args = ap.parse_args(argv)
    if args.prompt_tokens < 1 or args.gen_tokens < 1 or args.repeats < 1:
        ap.error("--prompt-tokens, --gen-tokens and --repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtypes = [d.strip() for d in (args.dtype or ("bfloat16" if cuda else "float32")).split(",") if d.strip()]
    for d in dtypes:
        if d not in OUR_DTYPES:
            raise SystemExit(f"--dtype {d!r}: expected float32, bfloat16, int8 or int4")
        if cuda and d != "bfloat16":
            raise SystemExit("--device cuda runs in bfloat16 (our CUDA backend is bf16-only)")
    try:
        threads = args.threads or len(os.sched_getaffinity(0))
    except AttributeError:
        threads = args.threads or os.cpu_count() or 1
    peer_python = args.peer_python or args.python
    model_dir = resolve_model(args.model)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    N, M = args.prompt_tokens, args.gen_tokens
    prompt_ids, short_ids, prompt_desc = make_prompts(model_dir, cfg["vocab_size"], N, args.text_file)
    max_context = max(N, TTFT_TOKENS + M + 1) + 16

    started = _dt.datetime.now().astimezone()
    meta: Dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"), "model": model_dir, "device": args.device, "dtypes": dtypes,
        "threads": threads, "prompt_tokens": N, "gen_tokens": M, "ttft_prompt_tokens": TTFT_TOKENS,
        "repeats": args.repeats, "prompt": prompt_desc, "git": git_state(), "machine": machine_facts(),
        "loadavg_start": loadavg(), "python": args.python, "peer_python": peer_python,
        "bytes_per_token": {d: bytes_per_token(cfg, d) for d in DTYPE_BYTES},
        "weights_in_memory_bytes": {d: weight_bytes_in_memory(cfg, d) for d in DTYPE_BYTES},
        "prefill_gflop": prefill_flops(cfg, N) / 1e9, "prompt_ids": prompt_ids, "short_prompt_ids": short_ids,
    }
    print(f"qwen-native bench  {meta['date']}  model {model_dir}")
    m = meta["machine"]
    print(f"machine: {m.get('lscpu Model name', platform.processor())}, {m.get('cpu_count')} CPUs "
          f"({m.get('usable_cpus', '?')} usable), {m.get('mem_total_gib', '?')} GiB"
          + (f"; GPU {', '.join(m['gpus'])}" if m.get("gpus") else ""))
    g = meta["git"]
    print(f"commit {g.get('commit') or '?'}" + (" + uncommitted engine changes" if g.get("engine_sources_modified")
                                                 else ""))
    print(f"device {args.device}, {threads} threads, prompt {N} tokens of {prompt_desc}, decode {M} tokens after a "
          f"{TTFT_TOKENS}-token prompt, median of {args.repeats}; load average {meta['loadavg_start']}")
    sys.stdout.flush()

    def probe(when: str) -> Dict[str, Any]:
        """The machine worker: read (CPU) or copy (CUDA) bandwidth and, on the CPU, the sgemm peak."""
        mjob = {"engine": "machine", "kind": "machine", "device": args.device, "threads": threads,
                "bandwidth_bytes": args.bandwidth_mib << 20,
                "sgemm_shape": [N, cfg["intermediate_size"], cfg["hidden_size"]]}
        if args.wait_quiet > 0:
            wait_quiet(args.wait_quiet, args.quiet_below)
        la = loadavg()
        mres = run_worker(mjob, peer_python if cuda else args.python, 600, args.verbose)
        mres["loadavg"] = la
        if mres.get("bandwidth_gbs"):
            print(f"bandwidth ({when}): {mres['bandwidth_gbs']:.1f} GB/s ({mres.get('bandwidth_kind')}; "
                  f"{mres.get('bandwidth_tool')}) load average {la}")
        else:
            print(f"bandwidth ({when}): not measured ({mres.get('bandwidth_error') or mres.get('error')})")
        feats = mres.get("cpu_features")
        if feats and when == "start":
            have = [k for k in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
                    if feats.get(k)]
            print(f"cpu: {feats.get('model') or '?'}; features {' '.join(have) or 'none of note'}; kernel set "
                  f"{mres.get('kernel_set')}")
        if mres.get("sgemm_gflops"):
            print(f"sgemm peak ({when}): {mres['sgemm_gflops']:.0f} GFLOP/s (float32, m,n,k = {mres['sgemm_shape']},"
                  f" {threads} threads, as our prefill calls it)")
        sys.stdout.flush()
        return mres

    bandwidth = None
    probes: List[Dict[str, Any]] = []
    if args.bandwidth_mib > 0:
        probes.append(probe("start"))
        bandwidth = probes[0].get("bandwidth_gbs")

    rows: List[Dict[str, Any]] = []
    planned: List[Dict[str, Any]] = []
    for e in plan_engines(args, dtypes):
        planned.append(e)
        label = f"{e['engine']} {e.get('dtype', '')}".strip()
        if e.get("plan_error"):
            rows.append({"engine": e["engine"], "dtype": e.get("dtype", "-"), "status": "failed",
                         "error": e["plan_error"]})
            print(f"{label}: {e['plan_error']}")
            continue
        job = {"engine": e["engine"], "kind": e["kind"], "model": model_dir, "gguf": e.get("gguf"),
               "dtype": e["dtype"] if e["dtype"] in OUR_DTYPES else dtypes[0], "device": args.device,
               "threads": threads, "prompt_ids": prompt_ids, "short_ids": short_ids, "gen_tokens": M,
               "repeats": args.repeats, "max_context": max_context, "attn": e.get("attn"),
               "compile": e.get("compile", False), "warmup_decode": 8 if e.get("compile") else 3}
        if args.wait_quiet > 0:
            wait_quiet(args.wait_quiet, args.quiet_below)
        la = loadavg()
        print(f"running {label} (load average {la}) ...", flush=True)
        res = run_worker(job, e.get("python") or (args.python if e["kind"] == "ours" else peer_python),
                         args.compile_timeout if e.get("compile") else args.timeout, args.verbose)
        res["dtype"] = e.get("dtype")
        res["loadavg_at_start"] = la
        for k in ("gguf", "gguf_types", "attn"):
            if e.get(k):
                res[k] = e[k]
        summarize(res, e, cfg, N, M, bandwidth)
        if res.get("status") == "ok":
            print(f"  {label}: load {fmt(res['load_s_median'])} s, prefill {fmt(res['prefill_tok_s'])} tok/s, "
                  f"TTFT {fmt(res['ttft_s_median'] * 1e3)} ms, decode {fmt(res['decode_tok_s'])} tok/s "
                  f"({res.get('backend', '')})", flush=True)
        else:
            print(f"  {label}: {res.get('status')}: {res.get('error')}", flush=True)
        rows.append(res)

    if args.bandwidth_mib > 0:
        # Bandwidth on a shared or virtual machine drifts over minutes: probe again at the end, and take the
        # roofline as the best the machine showed (the higher figure is the one an engine could have reached).
        probes.append(probe("end"))
        bws = [p["bandwidth_gbs"] for p in probes if p.get("bandwidth_gbs")]
        bandwidth = max(bws) if bws else None
        peaks = [p["sgemm_gflops"] for p in probes if p.get("sgemm_gflops")]
        meta["machine_probe"] = dict(probes[0], bandwidth_gbs=bandwidth, sgemm_gflops=max(peaks) if peaks else None,
                                     bandwidth_runs_gbs=bws, sgemm_runs_gflops=peaks)
        meta["machine_probes"] = probes
        for r, e in zip(rows, planned):
            summarize(r, e, cfg, N, M, bandwidth)

    ours = {r["dtype"]: r for r in rows if r["engine"] == "ours" and r.get("status") == "ok"}
    for r in rows:
        if r.get("status") == "ok":
            ref = ours.get(r.get("dtype")) or next(iter(ours.values()), None)
            r["agree"] = "ref" if r is ref else agreement(r.get("tokens"), ref.get("tokens") if ref else None)
    meta["loadavg_end"] = loadavg()

    print()
    print(table(rows, cuda))
    print()
    notes = summary_lines(rows, meta, bandwidth, cuda)
    for line in notes:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "engines": rows, "summary": notes}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(rows, cuda) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    ok = any(r["engine"] == "ours" and r.get("status") == "ok" for r in rows)
    wanted_ours = any(r["engine"] == "ours" for r in rows)
    return 0 if ok or not wanted_ours else 1


def same_class(peer_dtype: Optional[str], ours_dtype: str) -> bool:
    """Which peers ours in `ours_dtype` is compared with in the summary: the same dtype; for GGUF files, F32 beside
    float32, F16/BF16 beside bfloat16, 8-bit types (Q8_0) beside int8 and narrower ones (Q4_0, Q4_K_M, ...)
    beside int4."""
    if peer_dtype == ours_dtype:
        return True
    if not (peer_dtype and peer_dtype.startswith("gguf ")):
        return False
    kind = peer_dtype[5:]
    if kind == "F32":
        return ours_dtype == "float32"
    if kind in ("F16", "BF16"):
        return ours_dtype == "bfloat16"
    return ours_dtype == ("int8" if kind.startswith("Q8") else "int4")


def summary_lines(rows, meta, bandwidth, cuda) -> List[str]:
    out = []
    probe = meta.get("machine_probe") or {}
    if bandwidth:
        runs = probe.get("bandwidth_runs_gbs") or [bandwidth]
        out.append(f"roofline: {bandwidth:.1f} GB/s {'copy' if cuda else 'read'} bandwidth, the best of the probes at "
                   f"the start and end of this run ({', '.join(f'{b:.1f}' for b in runs)} GB/s; "
                   f"{probe.get('bandwidth_kind')})")
        over = [r for r in rows if r.get("status") == "ok" and (r.get("fraction_of_roofline") or 0) > 1.0]
        if over:
            out.append("note: " + ", ".join(f"{r['engine']} {r.get('dtype')}" for r in over) + " streamed faster than "
                       "the probe measured: the probe underestimates this machine's bandwidth (or it varied)")
    builds = {r.get("core_so_built") for r in rows if r["engine"] == "ours" and r.get("status") == "ok"}
    if len(builds) > 1:
        out.append(f"warning: _core was rebuilt during this run: ours ran builds from {', '.join(sorted(map(str, builds)))}")
    peak = probe.get("sgemm_gflops")
    by_dtype: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        if r.get("status") == "ok":
            by_dtype.setdefault(r.get("dtype"), {})[r["engine"]] = r
    for r in rows:
        if r["engine"] != "ours" or r.get("status") != "ok":
            continue
        d = r["dtype"]
        s = f"ours {d}: decode {fmt(r['decode_tok_s'])} tok/s"
        if r.get("fraction_of_roofline") is not None:
            s += (f" = {r['fraction_of_roofline'] * 100:.1f}% of the roofline {fmt(r['roofline_tok_s'])} tok/s "
                  f"({bandwidth:.1f} GB/s ÷ {r['bytes_per_token'] / 1e9:.2f} GB/token)")
        s += f"; prefill {fmt(r['prefill_tok_s'])} tok/s = {fmt(r['prefill_gflops'])} GFLOP/s"
        if peak and not cuda:
            s += f" = {r['prefill_gflops'] / peak * 100:.0f}% of the sgemm peak {peak:.0f} GFLOP/s"
        s += f"; TTFT {fmt(r['ttft_s_median'] * 1e3)} ms; load {fmt(r['load_s_median'])} s ({r.get('load_via')})"
        w = meta["weights_in_memory_bytes"].get(d) or r.get("weight_bytes")  # quantized: the build's own count
        if not cuda and r.get("peak_rss_bytes") and w:
            s += f"; peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB = {r['peak_rss_bytes'] / w:.2f}× the weights"
        s += f"; backend {r.get('backend')}, _core built {r.get('core_so_built')}"
        out.append(s)
        for peer in rows:
            if peer is r or peer.get("status") != "ok" or peer["engine"] == "ours":
                continue
            if not same_class(peer.get("dtype"), d):
                continue
            out.append(f"  vs {peer['engine']} {peer.get('dtype')}: decode {r['decode_tok_s'] / peer['decode_tok_s']:.2f}×, "
                       f"prefill {r['prefill_tok_s'] / peer['prefill_tok_s']:.2f}×, "
                       f"TTFT {peer['ttft_s_median'] / r['ttft_s_median']:.2f}× faster, "
                       f"load {peer['load_s_median'] / r['load_s_median']:.2f}× faster")
    if any(r.get("noisy") for r in rows if r.get("status") == "ok"):
        out.append("* its repeats differ by more than 15% of the median: the machine was not quiet (see others' CPU); "
                   "the JSON keeps every repeat and the best (*_best)")
    failed = [r for r in rows if r.get("status") != "ok"]
    for r in failed:
        out.append(f"{r['engine']} {r.get('dtype', '')}: {r.get('status')} — {(r.get('error') or '').strip()}")
    if meta["git"].get("engine_sources_modified"):
        out.append("note: the engine sources (csrc/, python/) had uncommitted changes when this ran")
    out.append(f"load average: start {meta['loadavg_start']}, end {meta['loadavg_end']} (1, 5, 15 min)")
    return out


if __name__ == "__main__":
    sys.exit(main())
