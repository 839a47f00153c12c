"""``qwen-native`` / ``python -m qwen_native``: generate from the command line, flags as in candle's Qwen example.

The answer streams to stdout; load time, prefill tok/s and decode tok/s go to stderr. Errors are one line on
stderr and a non-zero exit status (2: bad arguments, 1: anything else, 130: interrupted).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, List, NoReturn, Optional, Sequence

from ._checks import one_line as _one_line

PROG = "qwen-native"

# candle's --model names (which-model values) for the Qwen2.5 family, mapped to Hub repos.
_SHORTHAND = re.compile(r"^(?:2\.5-)?(coder-)?(0\.5|1\.5|3|7|14|32|72)b$", re.IGNORECASE)


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise _ArgError(message)


_DRAFT_DTYPE_HELP = ("the draft model's dtype (default: --dtype); int8 makes a fast draft, and the output stays the "
                     "main model's whatever the draft's dtype")

def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    from . import DEFAULT_MODEL, __version__

    p = _Parser(prog=PROG, description="Run a Qwen2 / Qwen2.5 chat model on the CPU (or CUDA) without PyTorch.")
    p.add_argument("--prompt", "-p", help="the user message (default: read stdin when it is not a terminal)")
    p.add_argument("--model", "--model-id", dest="model", default=DEFAULT_MODEL,
                   help=f"Hub repo id or local model directory (default {DEFAULT_MODEL}); candle-style sizes such "
                        "as 0.5b, 1.5b, 7b, coder-1.5b name the Qwen2.5 Instruct models")
    p.add_argument("--revision", help="Hub branch, tag or commit (default main)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (the default; overrides --device)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", help="bfloat16 (bf16), float32 (f32), int8 or int4 (quantized at load); default: "
                                   "the checkpoint's on CPU")
    p.add_argument("--temperature", type=float, help="sampling temperature; 0 = greedy (default: the model's "
                                                     "generation_config.json)")
    p.add_argument("--top-p", type=float, help="nucleus sampling probability mass")
    p.add_argument("--top-k", type=int, help="sample only among the k most likely tokens (0 = off)")
    p.add_argument("--min-p", type=float, help="drop tokens below min-p x the top token's probability")
    p.add_argument("--seed", type=int, help="random seed for sampling (default: random)")
    p.add_argument("--sample-len", "-n", dest="sample_len", type=_positive_int,
                   help="maximum number of tokens to generate (default 1024, bounded by the context)")
    p.add_argument("--repeat-penalty", type=float, help="repetition penalty, 1 = off (default: the model's)")
    p.add_argument("--repeat-last-n", type=_nonneg_int, default=64,
                   help="context size for the repeat penalty (default 64; 0 = the whole context)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--no-chat-template", action="store_true", help="use the prompt as raw text")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--prompt-lookup", type=_positive_int, metavar="K",
                   help="speculative decoding by prompt lookup: up to K proposed tokens per step, taken from the "
                        "prompt and the answer so far (the same output, or when sampling the same "
                        "distribution; faster when the answer repeats its input)")
    p.add_argument("--draft-model", metavar="M",
                   help="speculative decoding with a draft model: a smaller model with the same tokenizer (e.g. "
                        "0.5b for 1.5b), loaded like the main one, proposes tokens the main one verifies (the "
                        "same output; faster when the draft is fast and often right)")
    p.add_argument("--draft-dtype", help=_DRAFT_DTYPE_HELP)
    p.add_argument("--num-assistant-tokens", type=_positive_int, metavar="K",
                   help="with --draft-model: at most K proposed tokens per step (default 8; fewer when they do "
                        "not pay)")
    p.add_argument("--max-context", type=_positive_int, help="KV cache size in tokens (default min(model, 4096))")
    p.add_argument("--threads", type=_nonneg_int, help="CPU threads (default: all available)")
    p.add_argument("--local-files-only", action="store_true", help="never download; use the local cache only")
    p.add_argument("--quiet", "-q", action="store_true", help="no statistics on stderr")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def _model_name(name: str) -> str:
    if os.path.exists(name):
        return name
    m = _SHORTHAND.match(name)
    if m:
        coder = "Coder-" if m.group(1) else ""
        return f"Qwen/Qwen2.5-{coder}{m.group(2)}B-Instruct"
    return name


def _err(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()


def build_serve_parser() -> argparse.ArgumentParser:
    from . import DEFAULT_MODEL
    from .engine import DEFAULT_MAX_BATCH

    p = _Parser(prog=f"{PROG} serve", description="Serve a model over an OpenAI-compatible HTTP API "
                                                   "(needs pip install \"qwen-native[server]\").")
    p.add_argument("--model", "--model-id", dest="model", default=DEFAULT_MODEL,
                   help=f"Hub repo id or local model directory (default {DEFAULT_MODEL})")
    p.add_argument("--revision", help="Hub branch, tag or commit (default main)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_nonneg_int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", help="bfloat16, float32, int8 or int4 (default: the checkpoint's on CPU)")
    p.add_argument("--max-batch", type=_positive_int, default=None,
                   help="sequences generated at once, each in its own KV cache slot (default: as many as half the "
                        f"free memory holds, at most {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-context", type=_positive_int, default=None,
                   help="tokens of a sequence (prompt + answer); default min(max_position_embeddings, 4096)")
    p.add_argument("--max-queue", type=_nonneg_int, default=None,
                   help="requests that may wait for a slot; more get HTTP 429 (default 64)")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/ requests")
    p.add_argument("--speculative", metavar="ngram[:K]|draft:M",
                   help="speculative decoding: ngram = prompt lookup, up to K (default 10) proposed tokens per "
                        "step; draft:M = proposals of model M (same tokenizer, loaded like the main one); a "
                        "request's own prompt_lookup_num_tokens wins")
    p.add_argument("--draft-dtype", help="with --speculative draft:M: " + _DRAFT_DTYPE_HELP)
    p.add_argument("--threads", type=_nonneg_int, default=None, help="CPU threads (default: all usable)")
    p.add_argument("--local-files-only", action="store_true", help="never download; use the local HF cache only")
    return p


def _serve(argv: List[str]) -> int:
    try:
        args = build_serve_parser().parse_args(argv)
    except _ArgError as e:
        _err(f"{_one_line(e)} (see {PROG} serve --help)")
        return 2
    try:
        from . import server
    except ImportError as e:
        _err(_one_line(e))
        return 1
    kw = {} if args.max_queue is None else {"max_queue": args.max_queue}
    if args.speculative is not None:
        kind, _, k = args.speculative.partition(":")
        if kind == "draft" and k:
            kw["draft_model"] = _model_name(k)
            kw["draft_dtype"] = args.draft_dtype
        elif kind == "ngram" and (not k or (k.isdigit() and 1 <= int(k) <= 64)):
            kw["prompt_lookup"] = int(k or 10)
        else:
            _err(f"--speculative must be ngram, ngram:K with K in 1..64, or draft:MODEL, got {args.speculative!r} "
                 f"(see {PROG} serve --help)")
            return 2
    return server.serve(_model_name(args.model), host=args.host, port=args.port, api_key=args.api_key,
                        revision=args.revision, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
                        max_context=args.max_context, num_threads=args.threads,
                        local_files_only=True if args.local_files_only else None, **kw)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``qwen-native`` command (``qwen-native serve ...`` serves); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["serve"]:
            return _serve(args[1:])
        return _main(args)
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.stderr.write("\n")
        _err("interrupted")
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


def _main(argv: List[str]) -> int:
    for stream in (sys.stdout, sys.stderr):
        try:  # a terminal that cannot show some characters gets '?' rather than a crash mid-answer
            stream.reconfigure(errors="replace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    try:
        args = build_parser().parse_args(argv)
    except _ArgError as e:
        _err(f"{_one_line(e)} (see {PROG} --help)")
        return 2

    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            _err("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
            return 2
        prompt = sys.stdin.read()
        if not prompt.strip():
            _err("the prompt read from stdin is empty")
            return 2

    try:
        import qwen_native
        from .sampling import check_sampling_args

        # Bad values fail before the (slow) load.
        check_sampling_args(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repeat_penalty, seed=args.seed)
        qwen_native.GenerationOptions(prompt_lookup_num_tokens=args.prompt_lookup,
                                      num_assistant_tokens=args.num_assistant_tokens)
        if args.draft_model is not None and args.prompt_lookup is not None:
            raise ValueError("pass either --prompt-lookup or --draft-model, not both")
        device = "cpu" if args.cpu else args.device
        load_args = dict(device=device, dtype=args.dtype, max_context=args.max_context, num_threads=args.threads,
                         local_files_only=True if args.local_files_only else None)
        model = qwen_native.load(_model_name(args.model), revision=args.revision, **load_args)
        draft = None
        if args.draft_model is not None:
            draft = qwen_native.load(_model_name(args.draft_model),
                                     **{**load_args, "dtype": args.draft_dtype or args.dtype})
        if not args.quiet:
            sys.stderr.write(f"loaded {model.name} in {model.load_s:.2f} s ({model.device}, {model.dtype}, "
                             f"{model.num_threads} threads, context {model.max_context})\n")
            sys.stderr.flush()
        stream = model.generate(prompt, max_new_tokens=args.sample_len, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                repetition_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                                seed=args.seed, stop=args.stop, stream=True, system=args.system,
                                chat_template=not args.no_chat_template,
                                prompt_lookup_num_tokens=args.prompt_lookup, assistant_model=draft,
                                num_assistant_tokens=args.num_assistant_tokens)
        out = sys.stdout
        for piece in stream:
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        r = stream.result
        if r is not None and not args.quiet:
            sys.stderr.write(
                f"prompt: {r.prompt_tokens} tokens, prefill {r.prefill_tok_s:.1f} tok/s ({r.prefill_s:.2f} s)\n"
                f"generated: {len(r.token_ids)} tokens, decode {r.decode_tok_s:.1f} tok/s, "
                f"time to first token {r.ttft_s:.2f} s, finish: {r.finish_reason}\n")
            if r.proposed_tokens:
                sys.stderr.write(f"speculative: {r.accepted_tokens} of {r.proposed_tokens} proposed tokens accepted, "
                                 f"{r.decode_tokens / max(1, r.decode_passes):.2f} tokens per pass\n")
            sys.stderr.flush()
        model.close()
        if draft is not None:
            draft.close()
        return 0
    except (KeyboardInterrupt, BrokenPipeError):
        raise
    except (ValueError, TypeError, OSError, RuntimeError, MemoryError, IndexError) as e:
        _err(_one_line(e))
        return 1
    except Exception as e:  # anything unexpected: still one line, with its type for a bug report
        _err(f"{type(e).__name__}: {_one_line(e)}")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
