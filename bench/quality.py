#!/usr/bin/env python3
"""How much a dtype costs in quality: perplexity and KL divergence against a reference dtype over a text, ours in
each dtype beside llama.cpp GGUFs of the same weights (as llama.cpp's `llama-perplexity --kl-divergence` does).

    python bench/quality.py --model /path/to/Qwen2.5-1.5B-Instruct --dtype bfloat16,int8,int4 \\
        --gguf /path/to/model-Q8_0.gguf --gguf /path/to/model-Q4_K_M.gguf --peer-python /venv/bin/python \\
        --tokens 2048 --ctx 512 --json quality.json

The text (default: the Python standard library's textwrap.py + argparse.py, as bench.py uses) is tokenized once
with the model's tokenizer.json and cut into chunks of --ctx tokens; every engine gets every chunk from an empty
cache and returns the logits of every position (ours: `Model.logits`; llama.cpp: `logits_all=True`). Like
llama-perplexity, only the second half of each chunk is scored (each scored token has at least ctx/2 tokens of
context). Per engine: perplexity of the text, KL(reference || engine) per scored token (mean and 99th
percentile), top-1 agreement with the reference, and bits per weight of the matrices one token streams (ours: the
build's own count; GGUF: the stored tensor sizes). Each engine runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402  (prompts and model arithmetic shared with the speed benchmark)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def worker(job: Dict[str, Any]) -> Dict[str, Any]:
    """Logits of every chunk in one engine; the scored rows' log-probabilities saved, or compared with the
    reference's."""
    chunks, half = job["chunks"], job["ctx"] // 2
    t0 = time.perf_counter()
    if job["kind"] == "ours":
        import qwen_native

        m = qwen_native.load(job["model"], dtype=job["dtype"], num_threads=job["threads"], max_context=job["ctx"],
                             max_batch=1)
        load_s = time.perf_counter() - t0
        run = m.logits
        extra = {"decode_bytes": m.core.decode_bytes, "backend": m.core.backend}
    else:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=job["ctx"], n_batch=job["ctx"], n_ubatch=job["ctx"],
                              n_threads=job["threads"], logits_all=True, verbose=False)
        load_s = time.perf_counter() - t0

        def run(ids: List[int]) -> np.ndarray:
            llm.reset()
            llm.eval(ids)
            return np.array(llm.scores[:len(ids)], dtype=np.float32)

        extra = {}
    ref = np.load(job["reference"], mmap_mode="r") if job.get("reference") else None
    saved, kls, agree, nll = [], [], [], []
    t1 = time.perf_counter()
    for c, ids in enumerate(chunks):
        lp = log_softmax(run(ids)[half - 1:-1])  # predictions of tokens half .. end
        targets = np.asarray(ids[half:])
        nll.append(-lp[np.arange(len(targets)), targets])
        if ref is None:
            saved.append(lp.astype(np.float32))
            continue
        r = np.asarray(ref[c], dtype=np.float64)
        v = min(r.shape[1], lp.shape[1])  # a GGUF's vocabulary may be padded differently
        rp = np.exp(r[:, :v])
        kls.append((rp * (r[:, :v] - lp[:, :v])).sum(axis=1))
        agree.append(r[:, :v].argmax(axis=1) == lp[:, :v].argmax(axis=1))
    out: Dict[str, Any] = {"load_s": load_s, "eval_s": time.perf_counter() - t1,
                           "ppl": float(np.exp(np.concatenate(nll).mean())), **extra}
    if ref is None:
        np.save(job["save"], np.stack(saved))
    else:
        kl = np.concatenate(kls)
        out.update(kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
                   top1=float(np.concatenate(agree).mean()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--reference", default="float32", help="our dtype the others are compared with (default float32)")
    ap.add_argument("--dtype", default="bfloat16,int8,int4", help="our dtypes to measure, comma-separated")
    ap.add_argument("--gguf", action="append", default=[], help="a llama.cpp GGUF of the same weights (repeatable)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for ours")
    ap.add_argument("--peer-python", default=None, help="interpreter with llama_cpp (default: --python)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of text (a multiple of --ctx is used)")
    ap.add_argument("--ctx", type=int, default=512, help="chunk length; the second half of each is scored")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--text-file", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one engine
    args = ap.parse_args(argv)
    if args.job:
        with open(args.job) as f:
            job = json.load(f)
        with open(job["out"], "w") as f:
            json.dump(worker(job), f)
        return 0

    model_dir = os.path.abspath(args.model)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    n_chunks = max(1, args.tokens // args.ctx)
    ids, _, desc = bench.make_prompts(model_dir, cfg["vocab_size"], n_chunks * args.ctx, args.text_file)
    chunks = [ids[i * args.ctx:(i + 1) * args.ctx] for i in range(n_chunks)]
    threads = args.threads or len(os.sched_getaffinity(0))
    params = sum(bench.matrix_params(cfg).values())
    tmp = tempfile.mkdtemp(prefix="qwen-quality-")
    ref_path = os.path.join(tmp, "reference.npy")
    print(f"quality: {model_dir}, {n_chunks} chunks of {args.ctx} tokens of {desc}, second halves scored, "
          f"{threads} threads; reference: ours {args.reference}", flush=True)

    def run(job: Dict[str, Any], python: str) -> Dict[str, Any]:
        job = dict(job, chunks=chunks, ctx=args.ctx, threads=threads, model=model_dir,
                   out=os.path.join(tmp, "out.json"))
        path = os.path.join(tmp, "job.json")
        with open(path, "w") as f:
            json.dump(job, f)
        p = subprocess.run([python, os.path.abspath(__file__), "--model", model_dir, "--job", path],
                           capture_output=True, text=True)
        if p.returncode != 0:
            return {"status": "failed", "error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
        with open(job["out"]) as f:
            return dict(json.load(f), status="ok")

    rows = []
    ref = run({"kind": "ours", "dtype": args.reference, "save": ref_path}, args.python)
    if ref["status"] != "ok":
        print("reference failed:", ref["error"])
        return 1
    rows.append(dict(ref, engine="ours", dtype=args.reference, kl_mean=0.0, kl_p99=0.0, top1=1.0,
                     bpw=8 * ref["decode_bytes"] / params))
    jobs = [({"kind": "ours", "dtype": d}, args.python, "ours", d)
            for d in args.dtype.split(",") if d.strip() and d.strip() != args.reference]
    for g in args.gguf:
        info = bench.gguf_info.read_gguf(g)
        jobs.append(({"kind": "llama.cpp", "gguf": os.path.abspath(g), "bytes": bench.gguf_info.streamed_bytes_per_token(info)},
                     args.peer_python or args.python, "llama.cpp", "gguf " + bench.gguf_info.weight_type_label(info)))
    for job, python, engine, dtype in jobs:
        print(f"running {engine} {dtype} ...", flush=True)
        r = run(dict(job, reference=ref_path), python)
        r.update(engine=engine, dtype=dtype)
        if r["status"] == "ok":
            r["bpw"] = 8 * (r.get("decode_bytes") or job.get("bytes")) / params
        rows.append(r)
    head = f"{'engine':<10} {'dtype':<12} {'bits/weight':>11} {'PPL':>8} {'mean KL':>9} {'KL p99':>8} {'top-1':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['engine']:<10} {r['dtype']:<12} FAILED: {r['error']}")
            continue
        lines.append(f"{r['engine']:<10} {r['dtype']:<12} {r['bpw']:>11.2f} {r['ppl']:>8.3f} {r['kl_mean']:>9.5f} "
                     f"{r['kl_p99']:>8.4f} {100 * r['top1']:>6.1f}%")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model_dir, "chunks": n_chunks, "ctx": args.ctx, "text": desc, "reference": args.reference,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
