#!/usr/bin/env python3
"""Speculative decoding benchmark: plain greedy decoding beside prompt lookup (``prompt_lookup_num_tokens``) and a
draft model (``assistant_model``), on input-grounded prompts (the answer repeats much of its input: edit this code,
rewrite this JSON, fix this text) and on fresh generation (nothing to look up), one process, one run.

    python bench/spec_bench.py --model /path/to/Qwen2.5-Coder-1.5B-Instruct --dtype bfloat16 --threads 2 \\
        --prompt-lookup 10 --draft /path/to/Qwen2.5-Coder-0.5B-Instruct --max-new-tokens 160 --json spec.json

Per prompt and mode: decode tok/s (prefill excluded; the draft model's work, its prompt prefill included, counts
as decode time), decode passes, tokens per pass, proposed and accepted tokens; the speed-up of each kind is the
geometric mean over its prompts. Every mode must give the same tokens (checked: greedy decoding is exact with
speculation), so a difference is reported as an error, never averaged over.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench import git_state, loadavg, machine_facts  # noqa: E402

CODE = '''def moving_average(values, window):
    """Return the moving averages of values over the given window."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''
JSON_DOC = json.dumps({"users": [{"id": i, "name": n, "email": f"{n.lower()}@example.com", "active": i % 2 == 0}
                                 for i, n in enumerate(["Alice", "Bob", "Carol", "Dave", "Erin"])]}, indent=2)
TEXT = ("Teh quick brown fox jumpd over the lazy dog. It was a sunny day and the fox was verry happy. "
        "Afterwards the dog woke up and chased the fox acros the field untill sunset.")

GROUNDED = {
    "rename": f"Rename the variable `total` to `running_sum` in this code. Output only the code.\n\n{CODE}",
    "docstring": f"Add type hints to this function and keep everything else identical. Output only the code."
                 f"\n\n{CODE}",
    "json": f"Set every user's \"active\" field to true in this JSON and output the whole JSON.\n\n{JSON_DOC}",
    "typos": f"Fix the spelling mistakes in this text. Output only the corrected text.\n\n{TEXT}",
}
FRESH = {
    "story": "Write a short story about a lighthouse keeper.",
    "algorithm": "Explain how quicksort works, step by step.",
}


def run(model: Any, prompt: str, max_new: int, **spec: Any) -> Dict[str, Any]:
    t0 = time.perf_counter()
    r = model.generate(prompt, max_new_tokens=max_new, do_sample=False, repetition_penalty=1.0, **spec)
    return {"tokens": r.token_ids, "decode_tok_s": r.decode_tok_s, "decode_tokens": r.decode_tokens,
            "decode_passes": r.decode_passes, "wall_s": time.perf_counter() - t0,
            "proposed": r.proposed_tokens, "accepted": r.accepted_tokens,
            "tokens_per_pass": r.decode_tokens / r.decode_passes if r.decode_passes else None}


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-lookup", type=int, default=10, help="K of prompt lookup (0: not run)")
    ap.add_argument("--draft", help="a draft model (same tokenizer) to run as assistant_model")
    ap.add_argument("--draft-dtype", help="the draft's dtype (default: --dtype)")
    ap.add_argument("--num-assistant-tokens", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--only", help="comma-separated prompt names to run (default: all)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import qwen_native

    meta = {"machine": machine_facts(), "git": git_state(), "load_before": loadavg(), "args": vars(args)}
    model = qwen_native.load(args.model, dtype=args.dtype, num_threads=args.threads, max_batch=1,
                             local_files_only=True)
    modes: Dict[str, Dict[str, Any]] = {}
    if args.prompt_lookup:
        modes["lookup"] = {"prompt_lookup_num_tokens": args.prompt_lookup}
    draft = None
    if args.draft:
        draft = qwen_native.load(args.draft, dtype=args.draft_dtype or args.dtype, num_threads=args.threads,
                                 max_batch=1, local_files_only=True)
        modes["draft"] = {"assistant_model": draft, "num_assistant_tokens": args.num_assistant_tokens}
        meta["draft"] = {"model": args.draft, "dtype": draft.dtype, "load_s": draft.load_s}
    for spec in [{}] + list(modes.values()):
        run(model, "Hello", 4, **spec)  # warm-up
    only = set(args.only.split(",")) if args.only else None
    rows, errors = [], []
    for kind, prompts in (("grounded", GROUNDED), ("fresh", FRESH)):
        for name, prompt in prompts.items():
            if only is not None and name not in only:
                continue
            row: Dict[str, Any] = {"kind": kind, "prompt": name, "plain": run(model, prompt, args.max_new_tokens)}
            plain = row["plain"]
            line = f"{kind:<9} {name:<10} plain {plain['decode_tok_s']:6.2f} tok/s"
            for mode, spec in modes.items():
                r = run(model, prompt, args.max_new_tokens, **spec)
                if r["tokens"] != plain["tokens"]:
                    errors.append(f"{name}: {mode} changed the greedy tokens")
                r["speedup"] = r["decode_tok_s"] / plain["decode_tok_s"] if plain["decode_tok_s"] else None
                row[mode] = r
                line += (f" | {mode} {r['decode_tok_s']:6.2f} tok/s, {r['tokens_per_pass'] or 0:4.2f} tok/pass, "
                         f"{r['accepted']}/{r['proposed']} accepted, x{r['speedup'] or 0:.2f}")
            rows.append(row)
            print(f"{line} ({plain['decode_tokens']} tokens)", flush=True)
    summary: Dict[str, Any] = {}
    for mode in modes:
        for kind in ("grounded", "fresh"):
            ups = [r[mode]["speedup"] for r in rows if r["kind"] == kind and r[mode]["speedup"]]
            if ups:
                summary[f"{mode}_{kind}"] = g = math.exp(sum(math.log(u) for u in ups) / len(ups))
                print(f"{mode} {kind}: geometric-mean speed-up x{g:.2f}")
    for e in errors:
        print("ERROR:", e)
    meta["load_after"] = loadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "summary": summary, "errors": errors}, f, indent=1,
                      default=str)
    if draft is not None:
        draft.close()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
