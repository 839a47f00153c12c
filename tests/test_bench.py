"""The benchmark harness (bench/bench.py) on a tiny random checkpoint: it runs end to end in seconds, reports every
figure for our engine, survives a missing peer, and its arithmetic (bytes per token, GGUF sizes) is right. Nothing
here depends on how fast anything is."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

from fixtures import make_config, random_weights, write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench", "bench.py")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(os.path.dirname(path))
    return mod


bench = _load("qwen_bench", BENCH)
gguf_info = _load("qwen_bench_gguf_info", os.path.join(REPO, "bench", "gguf_info.py"))

QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    cfg = make_config()
    write_checkpoint(str(d), cfg, random_weights(cfg), dtype="BF16")
    return str(d), cfg


def run_bench(*args, timeout=300):
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=timeout)


def test_bench_runs_ours_and_reports_every_figure(bench_model, tmp_path):
    model_dir, cfg = bench_model
    out = tmp_path / "out.json"
    md = tmp_path / "table.md"
    p = run_bench("--model", model_dir, "--prompt-tokens", "12", "--gen-tokens", "5", "--repeats", "2",
                  "--threads", "1", "--dtype", "float32,bfloat16", "--bandwidth-mib", "16", "--json", str(out),
                  "--markdown", str(md), "--peer", "llama.cpp=" + str(tmp_path / "missing.gguf"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ours" in p.stdout and "decode tok/s" in p.stdout and "load average" in p.stdout

    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["prompt_tokens"] == 12 and meta["gen_tokens"] == 5 and meta["threads"] == 1
    assert "random ids" in meta["prompt"]  # the fixture has no tokenizer.json
    assert meta["bytes_per_token"]["float32"] == 2 * meta["bytes_per_token"]["bfloat16"]
    probe = meta["machine_probe"]
    assert probe["status"] == "ok", probe
    assert probe.get("bandwidth_gbs", 1) > 0 and probe.get("sgemm_gflops", 1) > 0

    rows = {(r["engine"], r.get("dtype")): r for r in data["engines"]}
    for dt in ("float32", "bfloat16"):
        r = rows[("ours", dt)]
        assert r["status"] == "ok", r
        assert len(r["load_s"]) == len(r["prefill_s"]) == len(r["ttft_s"]) == len(r["decode_s"]) == 2
        assert len(r["tokens"]) == 5 + 1  # the first token from the prefill, then exactly gen-tokens decodes
        assert all(0 <= t < cfg["vocab_size"] for t in r["tokens"])
        for k in ("prefill_tok_s", "decode_tok_s", "ttft_s_median", "load_s_median", "achieved_gbs",
                  "prefill_gflops"):
            assert r[k] > 0, k
        assert r["bytes_per_token"] == bench.bytes_per_token(cfg, dt)
        assert r["peak_rss_bytes"] > 0
        assert r["backend"]
        assert r["load_via"].startswith("_core.Model")  # no tokenizer.json: qwen_native.load cannot be used
    assert rows[("ours", "float32")]["agree"] == "ref"

    missing = [r for r in data["engines"] if r["engine"] == "llama.cpp"]
    assert len(missing) == 1 and missing[0]["status"] == "failed" and "missing.gguf" in missing[0]["error"]
    assert md.read_text().startswith("| engine")


def test_bench_tokenizes_real_text_when_the_model_has_a_tokenizer(tmp_path):
    tokenizer_fixture = pytest.importorskip("tokenizer_fixture")
    d = tmp_path / "tok"
    cfg = make_config(vocab_size=512)
    tokenizer_fixture.write_tokenizer(str(d), cfg["vocab_size"])
    write_checkpoint(str(d), cfg, random_weights(cfg))
    out = tmp_path / "out.json"
    p = run_bench("--model", str(d), "--prompt-tokens", "40", "--gen-tokens", "3", "--repeats", "1",
                  "--threads", "1", "--bandwidth-mib", "0", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["prompt"].startswith("real text")
    assert data["engines"][0]["status"] == "ok" and len(data["engines"][0]["tokens"]) == 4
    import qwen_native

    if hasattr(qwen_native, "load"):  # load time is measured through the public API
        assert data["engines"][0]["load_via"] == "qwen_native.load"


def test_bench_engine_filter_and_bad_peer(bench_model, tmp_path):
    model_dir, _ = bench_model
    out = tmp_path / "out.json"
    p = run_bench("--model", model_dir, "--prompt-tokens", "4", "--gen-tokens", "2", "--repeats", "1",
                  "--threads", "1", "--bandwidth-mib", "0", "--peer", "nonsense", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(out.read_text())["engines"]
    assert [r["engine"] for r in rows] == ["ours", "nonsense"]
    assert rows[1]["status"] == "failed" and "unknown peer" in rows[1]["error"]

    p = run_bench("--model", model_dir, "--prompt-tokens", "4", "--gen-tokens", "2", "--repeats", "1",
                  "--threads", "1", "--bandwidth-mib", "0", "--peer", "nonsense", "--engines", "ours",
                  "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert [r["engine"] for r in json.loads(out.read_text())["engines"]] == ["ours"]


def test_missing_python_module_is_reported_not_raised(bench_model, tmp_path):
    """A peer whose package is absent from the interpreter comes back as 'missing'."""
    model_dir, _ = bench_model
    job = {"engine": "transformers", "kind": "transformers", "model": model_dir, "dtype": "float32",
           "device": "cpu", "threads": 1, "prompt_ids": [1, 2], "short_ids": [3], "gen_tokens": 1, "repeats": 1,
           "max_context": 16}
    env_python = sys.executable
    probe = subprocess.run([env_python, "-c", "import torch, transformers"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("torch and transformers are installed here; the missing-peer path cannot be shown")
    res = bench.run_worker(job, env_python, 120, verbose=False)
    assert res["status"] == "missing" and "not installed" in res["error"]


def test_bytes_per_token_of_qwen25_15b():
    cfg = make_config(**QWEN25_15B)
    # 28 layers × (q,o 1536² each; k,v 256×1536 each; gate,up,down 8960×1536 each) + lm_head 151936×1536 (tied)
    params = 28 * (2 * 1536 * 1536 + 2 * 256 * 1536 + 3 * 8960 * 1536) + 151936 * 1536
    assert params == 1_543_569_408
    assert bench.bytes_per_token(cfg, "bfloat16") == 2 * params  # 3.09 GB
    assert bench.bytes_per_token(cfg, "float32") == 4 * params  # 6.17 GB
    untied = make_config(**dict(QWEN25_15B, tie_word_embeddings=False))
    assert bench.bytes_per_token(untied, "bfloat16") == 2 * params  # the embedding gather is not streamed
    assert bench.weight_bytes_in_memory(untied, "bfloat16") == 2 * (params + 151936 * 1536)
    flops = bench.prefill_flops(cfg, 512)
    assert 2 * 512 * 1.31e9 < flops < 2 * 512 * 1.31e9 * 1.05


def _write_gguf(path, tensors, metadata):
    """A minimal GGUF v3 written by hand: metadata (u32 / string) and tensors of raw bytes (type id, shape)."""
    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for k, v in metadata.items():
        out += s(k) + (struct.pack("<II", 4, v) if isinstance(v, int) else struct.pack("<I", 8) + s(v))
    offset, blobs = 0, []
    for name, ttype, shape, nbytes in tensors:
        out += s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", ttype, offset)
        pad = -nbytes % 32
        blobs.append(b"\0" * (nbytes + pad))
        offset += nbytes + pad
    out += b"\0" * (-len(out) % 32)
    with open(path, "wb") as f:
        f.write(out + b"".join(blobs))


def test_gguf_streamed_bytes(tmp_path):
    p = str(tmp_path / "m.gguf")
    tensors = [("token_embd.weight", 1, [100, 64], 100 * 64 * 2),   # F16
               ("blk.0.attn_q.weight", 12, [64, 256], 64 * 144),  # Q4_K: 144 bytes per 256 values
               ("blk.0.attn_norm.weight", 0, [64], 256),
               ("output.weight", 14, [100, 256], 100 * 210)]  # Q6_K: 210 bytes / 256 values
    _write_gguf(p, tensors, {"general.architecture": "qwen2", "general.file_type": 15})
    info = gguf_info.read_gguf(p)
    assert [t["name"] for t in info["tensors"]] == [t[0] for t in tensors]
    assert info["tensors"][0]["shape"] == [100, 64] and info["tensors"][0]["type"] == "F16"
    assert gguf_info.weight_type_label(info) == "Q4_K_M"
    q, out = info["tensors"][1]["nbytes"], info["tensors"][3]["nbytes"]
    assert q - 64 * 144 < 32 and out - 100 * 210 < 32  # sizes come out to within the alignment padding
    # with a separate output matrix, the embedding table is a gather, not streamed
    assert gguf_info.streamed_bytes_per_token(info) == q + out
    tied = str(tmp_path / "tied.gguf")
    _write_gguf(tied, tensors[:3], {"general.architecture": "qwen2"})
    info = gguf_info.read_gguf(tied)
    assert gguf_info.streamed_bytes_per_token(info) == info["tensors"][0]["nbytes"] + info["tensors"][1]["nbytes"]
    assert gguf_info.weight_type_label(info) == "F16"  # no file_type: the type holding most matrix bytes
    with open(str(tmp_path / "bad.gguf"), "wb") as f:
        f.write(b"NOPE" + b"\0" * 32)
    with pytest.raises(gguf_info.GGUFError):
        gguf_info.read_gguf(str(tmp_path / "bad.gguf"))


def test_serve_bench_end_to_end(tiny_dir, tmp_path):
    """bench/serve_bench.py against our server on the tiny checkpoint: every figure for every client count; a peer
    that cannot start is reported in the JSON, not fatal."""
    out = tmp_path / "serve.json"
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "serve_bench.py"), "--model", str(tiny_dir),
                        "--dtype", "float32", "--clients", "1,3", "--requests", "2", "--max-tokens", "5",
                        "--threads", "1", "--max-context", "256", "--ready-timeout", "120",
                        "--peer-gguf", str(tmp_path / "missing.gguf"), "--logs", str(tmp_path), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [r["clients"] for r in rows] == [1, 3] and all(r["server"] == "qwen-native float32" for r in rows)
    for r in rows:
        assert r["requests"] == 2 * r["clients"] and not r["errors"], r
        assert 2 * r["clients"] <= r["tokens"] <= 5 * 2 * r["clients"]
        assert r["aggregate_tps"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p95_s"] < r["wall_s"]
    assert "peer_error" in res["meta"] and "| qwen-native float32 | 3 |" in p.stdout
