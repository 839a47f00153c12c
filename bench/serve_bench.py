#!/usr/bin/env python3
"""Serving benchmark: our OpenAI-compatible server beside llama-cpp-python's (`llama_cpp.server`), same load, one run.

    python bench/serve_bench.py --model /path/to/Qwen2.5-1.5B-Instruct --dtype bfloat16 \\
        --peer-gguf /path/to/model-f16.gguf --peer-python /path/to/venv-with-llama-cpp/bin/python \\
        --clients 1,4,8,16 --json out.json

Each server runs in its own process with the same thread count and is measured alone (one after the other, never
side by side). For each number of concurrent clients C, C threads each send --requests streamed
`POST /v1/completions` back to back (greedy, --max-tokens tokens, a raw prompt of about 32 tokens, a different one
per request, so no server can reuse another request's prefix). Reported per server and C:

    aggregate tok/s   completion tokens of all requests / wall time from the first request sent to the last answered
    speed-up          aggregate tok/s / the same server's at C = 1
    TTFT p50 / p95    request sent -> first streamed text
    stream tok/s      per request, (tokens - 1) / (last text - first text): what one client sees while decoding

Tokens are counted from the usage chunk that `stream_options.include_usage` asks for, or the streamed text chunks
where a server sends none. Needs httpx (part of the test extra) in this Python; the peer's Python needs
`pip install "llama-cpp-python[server]"`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench import git_state, loadavg, machine_facts, wait_quiet  # noqa: E402

# Code to continue: a coder model writes on for far longer than --max-tokens, so every request runs its full length.
TOPICS = ["an LRU cache", "a min-heap", "a trie", "a bank account", "an interval tree", "a ring buffer",
          "a rate limiter", "a JSON tokenizer", "a matrix class", "a priority queue", "a bloom filter",
          "an event bus", "a linked list", "a state machine", "a CSV parser", "a graph with Dijkstra's algorithm"]


def prompt(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return (f"# request {i}: a complete, well documented Python module implementing {topic},\n"
            f"# with type hints, docstrings and unit tests.\n\nimport")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1, up once `ready_path` answers 200; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, argv: List[str], port: int, ready_path: str, log: str):
        self.name, self.port, self.base = name, port, f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.ready_path = ready_path

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready; see "
                                   f"{self.log.name}")
            try:
                if httpx.get(self.base + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def one_request(client: Any, base: str, model: str, text: str, max_tokens: int) -> Dict[str, Any]:
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    with client.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for c in event.get("choices") or []:
                if c.get("text"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    chunks += 1
    if first is None:
        raise RuntimeError("the server streamed no text")
    tokens = usage["completion_tokens"] if usage else chunks
    return {"ttft": first - t0, "end": last - t0, "tokens": tokens,
            "stream_tps": (tokens - 1) / (last - first) if last > first and tokens > 1 else None}


def run_load(base: str, model: str, clients: int, requests: int, max_tokens: int, seq0: int) -> Dict[str, Any]:
    import httpx

    results: List[Dict[str, Any]] = []
    errors: List[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(c: int) -> None:
        with httpx.Client() as http:
            start.wait()
            for j in range(requests):
                try:
                    res = one_request(http, base, model, prompt(seq0 + c * requests + j), max_tokens)
                    with lock:
                        results.append(res)
                except Exception as e:  # noqa: BLE001  (reported, not fatal)
                    with lock:
                        errors.append(repr(e)[:300])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)

    def pct(q: float) -> Optional[float]:
        return ttft[min(len(ttft) - 1, int(round(q * (len(ttft) - 1))))] if ttft else None

    stream = [r["stream_tps"] for r in results if r["stream_tps"]]
    return {"clients": clients, "requests": len(results), "errors": errors, "tokens": tokens, "wall_s": wall,
            "aggregate_tps": tokens / wall if results else None, "ttft_p50_s": pct(0.5), "ttft_p95_s": pct(0.95),
            "stream_tps_median": statistics.median(stream) if stream else None}


def bench_server(srv: Server, model: str, args: argparse.Namespace) -> List[Dict[str, Any]]:
    srv.wait_ready(args.ready_timeout)
    # Warm-up with the most clients of the run: first-call costs, and the first use of each KV slot (the OS maps its
    # pages then; on a VM whose memory was never touched since boot, that was ~0.8 s per slot), out of the
    # measurement, as on a server that has been up for a while.
    run_load(srv.base, model, max(args.clients), 1, 8, seq0=10_000)
    rows, seq = [], 0
    for c in args.clients:
        if args.quiet_below is not None:
            wait_quiet(30.0, args.quiet_below)
        row = run_load(srv.base, model, c, args.requests, args.max_tokens, seq0=seq)
        seq += c * args.requests
        row["server"] = srv.name
        rows.append(row)
        print(f"  {srv.name:<28} C={c:<3} {row['aggregate_tps'] or 0:7.2f} tok/s aggregate, TTFT p50 "
              f"{(row['ttft_p50_s'] or 0) * 1e3:7.0f} ms p95 {(row['ttft_p95_s'] or 0) * 1e3:7.0f} ms, "
              f"{len(row['errors'])} errors", flush=True)
    return rows


def table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| server | clients | aggregate tok/s | speed-up vs 1 client | TTFT p50 ms | TTFT p95 ms | "
             "per-stream tok/s | requests (errors) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base: Dict[str, float] = {}
    for r in rows:
        if r["clients"] == 1 and r["aggregate_tps"]:
            base[r["server"]] = r["aggregate_tps"]
    for r in rows:
        agg = r["aggregate_tps"]
        sp = f"{agg / base[r['server']]:.2f}x" if agg and r["server"] in base else "-"

        def ms(v: Optional[float]) -> str:
            return f"{v * 1e3:.0f}" if v is not None else "-"

        lines.append(f"| {r['server']} | {r['clients']} | {agg or 0:.2f} | {sp} | {ms(r['ttft_p50_s'])} | "
                     f"{ms(r['ttft_p95_s'])} | {r['stream_tps_median'] or 0:.2f} | {r['requests']} "
                     f"({len(r['errors'])}) |")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="our checkpoint (a directory or Hub id in the local cache)")
    p.add_argument("--dtype", default="bfloat16", help="our dtype (bfloat16, float32, int8, int4)")
    p.add_argument("--peer-gguf", help="a GGUF of the same weights for llama_cpp.server (F16 beside bfloat16, "
                                       "Q4_K_M beside int4)")
    p.add_argument("--peer-python", default=sys.executable, help="the Python that has llama-cpp-python[server]")
    p.add_argument("--clients", default="1,4,8,16", help="concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=2, help="requests per client, back to back")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, help="our --max-batch (default: the largest client count)")
    p.add_argument("--speculative", help="our server's --speculative (ngram[:K] or draft:M)")
    p.add_argument("--draft-dtype", help="our server's --draft-dtype (with --speculative draft:M)")
    p.add_argument("--max-context", type=int, default=2048, help="both servers' context")
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--quiet-below", type=float, default=None,
                   help="before each load, wait (up to 30 s) until other processes use less than this share of "
                        "the CPUs (0..1)")
    p.add_argument("--logs", default=".", help="folder for the servers' logs")
    p.add_argument("--json", help="write every number and the machine's facts here")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.logs, exist_ok=True)
    meta = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine_facts(), "git": git_state(),
            "load_before": loadavg(), "args": {k: v for k, v in vars(args).items()}}
    print(f"machine: {meta['machine'].get('lscpu Model name')}, {args.threads} threads; load {meta['load_before']}")
    rows: List[Dict[str, Any]] = []
    ours_name = f"qwen-native {args.dtype}"
    port = free_port()
    ours = Server(ours_name, [sys.executable, "-m", "qwen_native", "serve", "--model", args.model,
                              "--dtype", args.dtype, "--port", str(port), "--threads", str(args.threads),
                              "--max-batch", str(args.max_batch or max(args.clients)),
                              "--max-context", str(args.max_context), "--max-queue", "1024",
                              "--local-files-only", *(["--speculative", args.speculative] if args.speculative else []),
                              *(["--draft-dtype", args.draft_dtype] if args.draft_dtype else [])],
                  port, "/health", os.path.join(args.logs, "serve_ours.log"))
    try:
        model_id = None
        ours.wait_ready(args.ready_timeout)
        import httpx

        model_id = httpx.get(ours.base + "/v1/models").json()["data"][0]["id"]
        rows += bench_server(ours, model_id, args)
    finally:
        ours.stop()
    if args.peer_gguf:
        port = free_port()
        peer = Server(f"llama_cpp.server {os.path.basename(args.peer_gguf)}",
                      [args.peer_python, "-m", "llama_cpp.server", "--model", args.peer_gguf, "--host", "127.0.0.1",
                       "--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                       "--n_ctx", str(args.max_context), "--verbose", "False"],
                      port, "/v1/models", os.path.join(args.logs, "serve_peer.log"))
        try:
            rows += bench_server(peer, args.peer_gguf, args)
        except RuntimeError as e:  # a peer that cannot start is reported, not fatal: our numbers stand
            meta["peer_error"] = str(e)
            print(f"  peer not measured: {e}")
        finally:
            peer.stop()
    meta["load_after"] = loadavg()
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
