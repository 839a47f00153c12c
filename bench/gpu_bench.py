"""Self-contained GPU benchmark of the CUDA backend, run by bench/gpu_check.sh (bench/bench.py --device cuda is the
full side-by-side harness; this one needs nothing but numpy, and adds the CUDA-specific ablations).

    python bench/gpu_bench.py --make-qwen15b DIR          # random-weights checkpoint with Qwen2.5-1.5B's exact config
    python bench/gpu_bench.py --model DIR [--json OUT]    # ours in several modes, then peers in their own processes

OUT is rewritten after every engine ("complete": false until the last), so a run stopped by a time limit keeps
every engine that finished.

Ours, per mode (default; CUDA graph off; one-token matmuls forced to our GEMV; forced to cuBLAS): load time,
TTFT for a 32-token prompt (ids in → first greedy token out), decode tok/s for 128 greedy tokens through
decode_argmax (4 bytes back per token), prefill tok/s for 512 tokens, device memory, achieved GB/s (bf16 weight
bytes per token × tok/s) against a device-to-device copy bandwidth measured in the same run (torch, else cupy).
Peers, each in a fresh process when torch + transformers import: transformers bf16 eager and SDPA on the same GPU,
the same ids, greedy with its KV cache. Medians over --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

QWEN15B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536,
    "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768, "max_window_layers": 21,
    "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


# ------------------------------------------------------------------------------------------------ the checkpoint
def make_checkpoint(directory: str, cfg: Dict[str, Any], seed: int = 0, shards: int = 2) -> None:
    """Random bf16 weights for `cfg` (matrices N(0, 1/cols), norms ~1, biases small), written as safetensors
    shards plus an index, streamed tensor by tensor."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    qd, kvd = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes: List[tuple] = [("model.embed_tokens.weight", (V, H), "emb"), ("model.norm.weight", (H,), "norm")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (H,), "norm"), (p + "post_attention_layernorm.weight", (H,), "norm"),
                   (p + "self_attn.q_proj.weight", (qd, H), "mat"), (p + "self_attn.q_proj.bias", (qd,), "bias"),
                   (p + "self_attn.k_proj.weight", (kvd, H), "mat"), (p + "self_attn.k_proj.bias", (kvd,), "bias"),
                   (p + "self_attn.v_proj.weight", (kvd, H), "mat"), (p + "self_attn.v_proj.bias", (kvd,), "bias"),
                   (p + "self_attn.o_proj.weight", (H, qd), "mat"), (p + "mlp.gate_proj.weight", (I, H), "mat"),
                   (p + "mlp.up_proj.weight", (I, H), "mat"), (p + "mlp.down_proj.weight", (H, I), "mat")]
    if not cfg.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", (V, H), "mat"))

    def values(shape, kind):
        n = int(np.prod(shape))
        if kind == "norm":
            return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)
        x = rng.standard_normal(n, dtype=np.float32)
        x *= {"emb": 0.5, "bias": 0.1}.get(kind, 1.0 / np.sqrt(shape[-1]))
        return x

    parts = [shapes[s::shards] for s in range(shards)]
    weight_map = {}
    for s, part in enumerate(parts):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape, _ in part:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        with open(os.path.join(directory, fname), "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for name, shape, kind in part:
                x = values(shape, kind)
                u = x.view(np.uint32)
                f.write(((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes())  # round to nearest even
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}, f)


def weight_bytes_per_token(cfg: Dict[str, Any]) -> int:
    """bf16 bytes one decoded token streams: every layer matrix plus the lm_head (tied: the embedding, once)."""
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    qd, kvd = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = (qd + 2 * kvd) * H + H * qd + 3 * H * I
    return 2 * (cfg["num_hidden_layers"] * per_layer + V * H)


def prompt_ids(cfg: Dict[str, Any], n: int, seed: int) -> List[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, cfg["vocab_size"], n)]


# ------------------------------------------------------------------------------------------------ measurements
def nvml_process_bytes() -> Optional[int]:
    """This process's device memory (NVML, else nvidia-smi), or None."""
    pid = os.getpid()
    try:
        import pynvml

        pynvml.nvmlInit()
        total = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                if p.pid == pid and p.usedGpuMemory:
                    total += int(p.usedGpuMemory)
        if total:
            return total
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        for line in out.splitlines():
            f = [x.strip() for x in line.split(",")]
            if len(f) == 2 and f[0] == str(pid):
                return int(float(f[1])) << 20
    except Exception:
        pass
    return None


def copy_bandwidth(mib: int = 1024) -> Dict[str, Any]:
    """Device-to-device copy, bytes read + written per second, best of 10 (torch, else cupy)."""
    nbytes = mib << 20
    try:
        import torch

        a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        a.fill_(1)
        for _ in range(3):
            b.copy_(a)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = 0.0
        for _ in range(10):
            e0.record()
            b.copy_(a)
            e1.record()
            torch.cuda.synchronize()
            best = max(best, 2 * nbytes / (e0.elapsed_time(e1) / 1e3))
        return {"copy_GBps": best / 1e9, "via": "torch", "gpu": torch.cuda.get_device_name()}
    except Exception as e:  # noqa: BLE001
        err = repr(e)
    try:
        import cupy

        a = cupy.ones(nbytes, dtype=cupy.uint8)
        b = cupy.empty_like(a)
        best = 0.0
        for _ in range(10):
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            e0.record()
            b[...] = a
            e1.record()
            e1.synchronize()
            best = max(best, 2 * nbytes / (cupy.cuda.get_elapsed_time(e0, e1) / 1e3))
        return {"copy_GBps": best / 1e9, "via": "cupy"}
    except Exception as e:  # noqa: BLE001
        return {"copy_GBps": None, "error": err + " / " + repr(e)}


def load_core():
    path = os.environ.get("QWEN_NATIVE_CUDA_CORE")  # another build of the extension (tests/cuda_emu for a dry run)
    if not path:
        from qwen_native import _core
        return _core
    import importlib.util

    spec = importlib.util.spec_from_file_location("_core", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def core_inputs(model_dir: str):
    """(the resolved config _core.Model takes, the tensor table), through qwen_native's own resolution: hub.resolve,
    or for a weights-only checkpoint such as --make-qwen15b's (no tokenizer.json, which resolve needs) the shard
    lookup resolve uses."""
    from qwen_native import hub
    from qwen_native.checkpoint import tensor_table
    from qwen_native.config import load_config

    if os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        files = hub.resolve(model_dir)
        config, weights = files.config, files.weights
    else:
        config, weights = os.path.join(model_dir, "config.json"), hub.local_weights(model_dir)
    return load_config(config).to_core_dict(), tensor_table(list(weights))


def bench_ours(model_dir: str, mode: str, env: Dict[str, str], n_prompt: int, n_short: int, n_gen: int,
               repeats: int) -> Dict[str, Any]:
    for k in ("QWEN_NATIVE_CUDA_GRAPH", "QWEN_NATIVE_GEMV"):
        os.environ.pop(k, None)
    os.environ.update(env)
    core = load_core()
    cfg, table = core_inputs(model_dir)
    short, long_ = prompt_ids(cfg, n_short, 1), prompt_ids(cfg, n_prompt, 2)
    ctx = max(n_prompt, n_short + n_gen + 8) + 64
    t = time.perf_counter()
    m = core.Model(cfg, table, dtype="bfloat16", device="cuda", max_context=ctx)
    load_s = time.perf_counter() - t
    # warm-up: module load, cuBLAS heuristics, the timed first decode step, graph capture
    tok = int(np.argmax(m.prefill(short)))
    for _ in range(8):
        tok = m.decode_argmax(tok)
    m.reset()
    m.prefill(long_)
    ttft, dec, pre, tokens = [], [], [], []
    for _ in range(repeats):
        m.reset()
        t = time.perf_counter()
        tok = int(np.argmax(m.prefill(short)))
        ttft.append(time.perf_counter() - t)
        seq = [tok]
        t = time.perf_counter()
        for _ in range(n_gen):
            tok = m.decode_argmax(tok)
            seq.append(tok)
        dec.append(time.perf_counter() - t)
        tokens = seq
        m.reset()
        t = time.perf_counter()
        m.prefill(long_)
        pre.append(time.perf_counter() - t)
    res = {
        "engine": f"ours ({mode})", "mode": mode, "env": env, "load_s": load_s,
        "ttft_ms": 1e3 * statistics.median(ttft), "decode_tok_s": n_gen / statistics.median(dec),
        "prefill_tok_s": n_prompt / statistics.median(pre), "prefill_ms": 1e3 * statistics.median(pre),
        "raw": {"ttft_s": ttft, "decode_s": dec, "prefill_s": pre}, "tokens": tokens,
        "device_bytes_process": nvml_process_bytes(), "backend": m.backend,
    }
    m.close()
    return res


def bench_transformers(model_dir: str, attn: str, n_prompt: int, n_short: int, n_gen: int,
                       repeats: int) -> Dict[str, Any]:
    import torch
    import transformers

    cfg, _ = core_inputs(model_dir)
    short = torch.tensor([prompt_ids(cfg, n_short, 1)], device="cuda")
    long_ = torch.tensor([prompt_ids(cfg, n_prompt, 2)], device="cuda")
    t = time.perf_counter()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                                  attn_implementation=attn)
    except TypeError:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16,
                                                                  attn_implementation=attn)
    model = model.to("cuda").eval()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t

    def step(ids, past):
        out = model(input_ids=ids, past_key_values=past, use_cache=True)
        return out.past_key_values, int(out.logits[0, -1].argmax())

    def generate():
        past, tok = step(short, None)
        seq = [tok]
        t0 = time.perf_counter()
        for _ in range(n_gen):
            past, tok = step(torch.tensor([[tok]], device="cuda"), past)
            seq.append(tok)
        return seq, time.perf_counter() - t0

    ttft, dec, pre, tokens = [], [], [], []
    with torch.no_grad():
        step(short, None)
        generate()  # warm-up
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(short, None)
            ttft.append(time.perf_counter() - t0)
            tokens, d = generate()
            dec.append(d)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                model(input_ids=long_, use_cache=False, logits_to_keep=1)
            except TypeError:
                model(input_ids=long_, use_cache=False)
            torch.cuda.synchronize()
            pre.append(time.perf_counter() - t0)
    return {
        "engine": f"transformers-{attn}", "load_s": load_s, "ttft_ms": 1e3 * statistics.median(ttft),
        "decode_tok_s": n_gen / statistics.median(dec), "prefill_tok_s": n_prompt / statistics.median(pre),
        "prefill_ms": 1e3 * statistics.median(pre), "raw": {"ttft_s": ttft, "decode_s": dec, "prefill_s": pre},
        "tokens": tokens, "device_bytes_process": nvml_process_bytes(),
        "backend": f"transformers {transformers.__version__}, torch {torch.__version__}, {attn}",
    }


MODES = {
    "default": {},
    "no-graph": {"QWEN_NATIVE_CUDA_GRAPH": "0"},
    "gemv": {"QWEN_NATIVE_GEMV": "gemv"},
    "cublas": {"QWEN_NATIVE_GEMV": "cublas"},
}


def worker(args) -> int:
    """One engine in this process; result as JSON on the last stdout line."""
    try:
        if args.worker.startswith("ours:"):
            mode = args.worker[5:]
            r = bench_ours(args.model, mode, MODES[mode], args.prompt_tokens, args.short_tokens, args.gen_tokens,
                           args.repeats)
        elif args.worker == "copy":
            r = copy_bandwidth()
        else:
            r = bench_transformers(args.model, args.worker.split("-", 1)[1], args.prompt_tokens, args.short_tokens,
                                   args.gen_tokens, args.repeats)
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        r = {"engine": args.worker, "error": f"{type(e).__name__}: {e}"}
    print("RESULT " + json.dumps(r))
    return 0


def run_worker(args, name: str, timeout: int) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model", args.model or "",
           "--prompt-tokens", str(args.prompt_tokens), "--short-tokens", str(args.short_tokens),
           "--gen-tokens", str(args.gen_tokens), "--repeats", str(args.repeats)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"engine": name, "error": f"timeout after {timeout} s"}
    sys.stderr.write(f"--- {name} ({time.perf_counter() - t:.0f} s)\n{p.stderr[-4000:]}")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"engine": name, "error": f"exit {p.returncode}: {(p.stdout + p.stderr)[-500:]}"}


def summarize(args, cfg: Dict[str, Any], rows: List[Dict[str, Any]], bw: Dict[str, Any], complete: bool):
    """The result document: rows with their derived figures (roofline once the copy bandwidth is known)."""
    gb_tok = weight_bytes_per_token(cfg) / 1e9
    copy_gbps = bw.get("copy_GBps")
    ref = next((r.get("tokens") for r in rows if r.get("mode") == "default" and r.get("tokens")), None)
    for r in rows:
        if "decode_tok_s" in r:
            r["GB_per_token"] = gb_tok
            r["achieved_GBps"] = gb_tok * r["decode_tok_s"]
            if copy_gbps:
                r["roofline_tok_s"] = copy_gbps / gb_tok
                r["pct_roofline"] = 100 * r["decode_tok_s"] / r["roofline_tok_s"]
        if ref and r.get("tokens"):
            same = 0
            for a, b in zip(ref, r["tokens"]):
                if a != b:
                    break
                same += 1
            r["same_greedy_as_default"] = same
    return {"model": args.model, "config": cfg, "bandwidth": bw, "rows": rows, "complete": complete,
            "shapes": {"prompt": args.prompt_tokens, "short": args.short_tokens, "gen": args.gen_tokens,
                       "repeats": args.repeats}}


def write_json(path: Optional[str], result: Dict[str, Any]) -> None:
    """Replaces `path` whole (never a half-written file), so a run cut short keeps every engine that finished."""
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def fmt(v, spec):
    if isinstance(v, (int, float)):
        return format(v, spec)
    width = "".join(c for c in spec.split(".")[0] if c.isdigit())
    return "-".rjust(int(width) if width else 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--make-qwen15b", metavar="DIR")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--short-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="default,no-graph,gemv,cublas")
    ap.add_argument("--peers", default="transformers-eager,transformers-sdpa")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per engine process")
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.make_qwen15b:
        t = time.perf_counter()
        make_checkpoint(args.make_qwen15b, dict(QWEN15B))
        print(f"wrote {args.make_qwen15b} in {time.perf_counter() - t:.1f} s")
        if not args.model:
            return 0
    if not args.model:
        ap.error("--model is required")
    cfg, _ = core_inputs(args.model)
    gb_tok = weight_bytes_per_token(cfg) / 1e9

    # The JSON is rewritten after every engine: a run stopped by its time limit keeps what finished.
    rows: List[Dict[str, Any]] = []
    bw: Dict[str, Any] = {}
    for m in [m for m in args.modes.split(",") if m]:
        rows.append(run_worker(args, "ours:" + m, args.timeout))
        write_json(args.json, summarize(args, cfg, rows, bw, complete=False))
    bw = run_worker(args, "copy", 120)
    write_json(args.json, summarize(args, cfg, rows, bw, complete=False))
    for p in [p for p in args.peers.split(",") if p]:
        rows.append(run_worker(args, p, args.timeout))
        write_json(args.json, summarize(args, cfg, rows, bw, complete=False))
    write_json(args.json, summarize(args, cfg, rows, bw, complete=True))
    copy_gbps = bw.get("copy_GBps")

    print(f"\nGPU: {bw.get('gpu', '?')}; copy bandwidth {fmt(copy_gbps, '.0f')} GB/s ({bw.get('via', bw.get('error'))}); "
          f"{gb_tok:.2f} GB of bf16 weights per token → roofline {fmt(copy_gbps and copy_gbps / gb_tok, '.0f')} tok/s")
    hdr = f"{'engine':24s} {'load s':>7s} {'TTFT ms':>8s} {'prefill tok/s':>13s} {'prefill ms':>10s} " \
          f"{'decode tok/s':>12s} {'GB/s':>6s} {'%roof':>6s} {'dev GB':>7s} {'same':>5s}"
    print(hdr)
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:24s} ERROR {r['error'][:150]}")
            continue
        dev = r.get("device_bytes_process")
        print(f"{r['engine']:24s} {r['load_s']:7.2f} {r['ttft_ms']:8.2f} {r['prefill_tok_s']:13.0f} "
              f"{r['prefill_ms']:10.2f} {r['decode_tok_s']:12.1f} {r['achieved_GBps']:6.0f} "
              f"{fmt(r.get('pct_roofline'), '6.1f')} {fmt(dev and dev / 1e9, '7.2f')} "
              f"{fmt(r.get('same_greedy_as_default'), '5d')}")
    for r in rows:
        if r.get("mode") == "default":
            print("backend:", r.get("backend"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
