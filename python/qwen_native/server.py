"""An OpenAI-compatible HTTP server over one loaded :class:`~qwen_native.Model` (FastAPI on uvicorn: the
``server`` extra, ``pip install "qwen-native[server]"``).

HTTP only translates: every request becomes generations in the model's own queue (scheduler.py), the same one
``generate()`` uses, so concurrent clients are batched together step by step. Endpoints: ``POST
/v1/chat/completions`` and ``POST /v1/completions`` (both streamed as server-sent events on request),
``GET /v1/models``, ``GET /health``. Bad input is a 4xx in OpenAI's error shape naming the parameter; a client
that disconnects cancels its generations within one step.

    qwen-native serve --model Qwen/Qwen2.5-1.5B-Instruct --port 8000
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Tuple

try:
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("the server needs its extra: pip install \"qwen-native[server]\" (FastAPI and uvicorn)") from e

from .engine import Model
from .errors import ContextLengthError
from .generation import GenerationOptions, Piece
from .scheduler import Outcome, Request
from .tools import ToolCallStream, tool_answer

__all__ = ["create_app", "serve"]

_ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_QUEUE = 64  # requests waiting for a slot beyond the running ones; more are refused with 429


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# -- request parsing ------------------------------------------------------------------------------------------------

def _int(body: Dict[str, Any], key: str, lo: int, hi: Optional[int] = None) -> Optional[int]:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"{key} must be an integer, got {json.dumps(v)[:40]}", key)
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise APIError(400, f"{key} must be {bound}, got {v}", key)
    return v


def _options(body: Dict[str, Any], chat: bool,
             speculative: Optional[Mapping[str, Any]] = None) -> Tuple[GenerationOptions, int]:
    """GenerationOptions and n from an OpenAI request body; APIError naming the parameter when one is wrong.
    `speculative`: the server's --speculative options, for requests that do not give prompt_lookup_num_tokens."""
    max_new = _int(body, "max_completion_tokens", 1) if chat else None
    if max_new is None:
        max_new = _int(body, "max_tokens", 1)
    n = _int(body, "n", 1, 16) or 1
    kw: Dict[str, Any] = {"max_new_tokens": max_new, "chat_template": chat}
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty",
                "top_k", "seed", "stop", "prompt_lookup_num_tokens"):
        if body.get(key) is not None:
            kw[key] = body[key]
    for key in ("response_format",) + (("tools", "tool_choice", "parallel_tool_calls") if chat else ()):
        if body.get(key) is not None:
            kw[key] = body[key]
    if speculative and "prompt_lookup_num_tokens" not in kw:
        kw.update(speculative)
    if chat:
        if body.get("logprobs") is not None:
            if not isinstance(body["logprobs"], bool):
                raise APIError(400, "logprobs must be true or false", "logprobs")
            kw["logprobs"] = body["logprobs"]
        top = _int(body, "top_logprobs", 0, 20)
        if top is not None:
            if not kw.get("logprobs"):
                raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            kw["top_logprobs"] = top
    else:
        top = _int(body, "logprobs", 0, 5)
        if top is not None:
            kw.update(logprobs=True, top_logprobs=top)
    try:
        return GenerationOptions(**kw), n
    except (TypeError, ValueError) as e:
        text = str(e)
        param = next((k for k in kw if text.startswith(k) or f" {k} " in text), None)
        raise APIError(400, text, param) from None


def _prompt(body: Dict[str, Any], chat: bool) -> Any:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in _ROLES:
                raise APIError(400, f"messages[{i}].role must be one of {', '.join(_ROLES)}, got "
                                    f"{json.dumps(role)[:40]}", "messages")
        return messages
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "prompt must be a non-empty string", "prompt")
    if body.get("echo"):
        raise APIError(400, "echo is not supported", "echo")
    return prompt


# -- responses ------------------------------------------------------------------------------------------------------

def _chat_logprobs(pieces_or_outcome: Any) -> Optional[Dict[str, Any]]:
    lps = pieces_or_outcome
    if lps is None:
        return None
    return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.bytes),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                                          for _, t, v in lp.top]} for lp in lps]}


def _completion_logprobs(lps: Any, offset: int = 0) -> Optional[Dict[str, Any]]:
    if lps is None:
        return None
    offsets, at = [], offset
    for lp in lps:
        offsets.append(at)
        at += len(lp.token)
    return {"tokens": [lp.token for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{t: v for _, t, v in lp.top} for lp in lps], "text_offset": offsets}


def _usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _in_thread(fn: Any, *args: Any) -> "asyncio.Future[Any]":
    """fn(*args) on a thread of its own, as an awaitable. For waits on a generation, which last as long as it does:
    the event loop's default executor has min(32, CPUs + 4) threads, so with more open requests than that the later
    ones would not be read (or streamed) until earlier ones ended."""
    loop = asyncio.get_running_loop()
    fut: "asyncio.Future[Any]" = loop.create_future()

    def settle(result: Any, error: Optional[BaseException]) -> None:
        if not fut.done():
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:  # handed to the awaiting coroutine
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    threading.Thread(target=run, daemon=True, name="qwen-native-wait").start()
    return fut


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# -- the app --------------------------------------------------------------------------------------------------------

def create_app(model: Model, model_id: str, *, api_key: Optional[str] = None, max_queue: int = DEFAULT_MAX_QUEUE,
               prompt_lookup: Optional[int] = None, draft: Optional[Model] = None) -> FastAPI:
    """The FastAPI app serving `model` under the name `model_id`. Speculative decoding for requests that do not ask
    for their own (``prompt_lookup_num_tokens``): prompt lookup of up to `prompt_lookup` ids, or a `draft`
    model's proposals."""
    speculative: Dict[str, Any] = {}
    if prompt_lookup:
        speculative["prompt_lookup_num_tokens"] = prompt_lookup
    elif draft is not None:
        speculative["assistant_model"] = draft
    app = FastAPI(title="qwen-native", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return e.response()

    @app.middleware("http")
    async def authorize(request: HTTPRequest, call_next: Any) -> Any:
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                                code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> Dict[str, Any]:
        running, waiting = model._scheduler.load()
        return {"status": "ok", "model": model_id, "running": running, "waiting": waiting,
                "max_batch": model.max_batch}

    @app.get("/v1/models")
    async def models() -> Dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "qwen-native"}]}

    async def body_of(request: HTTPRequest) -> Dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model") not in (None, model_id):
            raise APIError(404, f"The model `{body.get('model')}` does not exist; this server serves `{model_id}`",
                           "model", "model_not_found")
        return body

    def submit(prompt: Any, opts: GenerationOptions, n: int, stream: bool) -> List[Request]:
        running, waiting = model._scheduler.load()
        if waiting + n > max_queue:
            raise APIError(429, f"the server is busy: {waiting} requests are waiting for one of {model.max_batch} "
                                "slots; retry later", code="rate_limit_exceeded", type="rate_limit_error")
        requests: List[Request] = []
        try:
            for i in range(n):  # n choices: independent generations (seeds seed, seed + 1, ...)
                requests.append(model._submit(prompt, opts, stream=stream, seed_offset=i))
        except ContextLengthError as e:
            raise APIError(400, str(e), "messages" if opts.chat_template else "prompt",
                           "context_length_exceeded") from None
        except (TypeError, ValueError, ImportError) as e:  # the prompt, messages, tools or format
            for r in requests:
                r.cancel()
            text = str(e)
            param = next((k for k in ("response_format", "tools", "tool_choice", "parallel_tool_calls")
                          if text.startswith(k)), "messages" if opts.chat_template else "prompt")
            raise APIError(400, text, param) from None
        return requests

    async def wait_all(http: HTTPRequest, requests: List[Request]) -> List[Outcome]:
        """The outcomes, cancelling every generation if the client goes away first."""
        tasks = [_in_thread(r.wait) for r in requests]
        try:
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=0.25)
                if await http.is_disconnected():
                    raise asyncio.CancelledError
            return [t.result() for t in tasks]
        finally:
            for r in requests:
                r.cancel()

    async def pieces(requests: List[Request]) -> AsyncIterator[Tuple[int, Optional[Piece], Request]]:
        """(choice index, piece or None at its end, request) as they come, from every generation."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def read(i: int, r: Request) -> None:
            try:
                while True:
                    p = r.next_piece()
                    loop.call_soon_threadsafe(queue.put_nowait, (i, p, r))
                    if p is None:
                        return
            except BaseException:
                loop.call_soon_threadsafe(queue.put_nowait, (i, None, r))

        readers = [_in_thread(read, i, r) for i, r in enumerate(requests)]
        left = len(requests)
        try:
            while left:
                i, p, r = await queue.get()
                if p is None:
                    left -= 1
                yield i, p, r
        finally:
            for r in requests:
                r.cancel()  # a client that went away (or a server stopping) ends the generations
            await asyncio.gather(*readers, return_exceptions=True)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest) -> Any:
        return await complete(http, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest) -> Any:
        return await complete(http, chat=False)

    async def complete(http: HTTPRequest, chat: bool) -> Any:
        body = await body_of(http)
        prompt = _prompt(body, chat)
        opts, n = _options(body, chat, speculative)
        stream = body.get("stream") is True
        include_usage = stream and isinstance(body.get("stream_options"), dict) and \
            body["stream_options"].get("include_usage") is True
        requests = submit(prompt, opts, n, stream)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        prompt_tokens = len(requests[0].ids)
        if not stream:
            outs = await wait_all(http, requests)
            choices = []
            for i, o in enumerate(outs):
                c: Dict[str, Any] = {"index": i, "finish_reason": o.finish_reason}
                if chat:
                    c["message"] = {"role": "assistant", "content": o.text}
                    if requests[i].tools:
                        content, calls, c["finish_reason"] = tool_answer(o.text, o.finish_reason)
                        if calls:
                            c["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
                    c["logprobs"] = _chat_logprobs(o.logprobs)
                else:
                    c["text"] = o.text
                    c["logprobs"] = _completion_logprobs(o.logprobs)
                choices.append(c)
            return {"id": rid, "object": kind, "created": now, "model": model_id, "choices": choices,
                    "usage": _usage(prompt_tokens, sum(len(o.token_ids) for o in outs))}

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: List[Dict[str, Any]], usage: Optional[Dict[str, int]] = None) -> str:
            data: Dict[str, Any] = {"id": rid, "object": chunk_kind, "created": now, "model": model_id,
                                    "choices": choices}
            if include_usage:
                data["usage"] = usage
            return _sse(data)

        async def events() -> AsyncIterator[str]:
            if chat:
                for i in range(n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            generated = 0
            offsets = [0] * n
            # With tools, each choice's text goes through a ToolCallStream: content deltas, and each call as a
            # name delta then its arguments.
            calls = [ToolCallStream() if chat and r.tools else None for r in requests]
            called = [False] * n

            def deltas(i: int, text: str, end: bool = False) -> List[Dict[str, Any]]:
                reader = calls[i]
                if reader is None:
                    return [{"content": text}] if text else []
                out = []
                for kind, d in reader.push(text) + (reader.finish() if end else []):
                    if kind == "content":
                        out.append({"content": d})
                    else:
                        out.append({"tool_calls": [d]})
                        called[i] = True
                return out

            async for i, p, r in pieces(requests):
                if p is None:
                    if r.error is not None and r.outcome is None:
                        err = {"message": str(r.error), "type": "server_error", "param": None, "code": None}
                        yield _sse({"error": err})
                        return
                    reason = r.outcome.finish_reason if r.outcome is not None else "stop"
                    if chat:
                        for d in deltas(i, "", end=True):
                            yield chunk([{"index": i, "delta": d, "logprobs": None, "finish_reason": None}])
                        reason = "tool_calls" if called[i] and reason != "length" else reason
                    yield chunk([{"index": i, ("delta" if chat else "text"): ({} if chat else ""),
                                  "logprobs": None, "finish_reason": reason}])
                    continue
                generated += len(p.token_ids)
                if not p.text and not p.logprobs:
                    continue
                lps = list(p.logprobs) if p.logprobs else None
                if chat:
                    ds = deltas(i, p.text)
                    if not ds and lps:
                        ds = [{"content": ""}]
                    for j, d in enumerate(ds):
                        yield chunk([{"index": i, "delta": d, "logprobs": _chat_logprobs(lps) if j == 0 else None,
                                      "finish_reason": None}])
                else:
                    yield chunk([{"index": i, "text": p.text, "logprobs": _completion_logprobs(lps, offsets[i]),
                                  "finish_reason": None}])
                    offsets[i] += len(p.text)
            if include_usage:
                yield chunk([], _usage(prompt_tokens, generated))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# -- the command ----------------------------------------------------------------------------------------------------

def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
          max_queue: int = DEFAULT_MAX_QUEUE, prompt_lookup: Optional[int] = None, draft_model: Optional[str] = None,
          draft_dtype: Optional[str] = None, **load_args: Any) -> int:
    """Bind, load, check the chat template, serve until SIGINT/SIGTERM; the exit status. Every startup failure is
    one line on stderr. `draft_model`: loaded beside the model (same load arguments; `draft_dtype` if given) to
    propose tokens."""
    import uvicorn

    from . import load
    from ._checks import one_line

    def fail(message: str) -> int:
        sys.stderr.write(f"qwen-native serve: error: {message}\n")
        return 1

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # before the (slow) load, so a port in use fails at once
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        return fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    draft = None
    try:
        m = load(model, **load_args)
        if draft_model is not None:
            try:
                draft = load(draft_model, **{**load_args, "dtype": draft_dtype or load_args.get("dtype")})
                m._check_draft(draft)
            except Exception as e:
                m.close()
                if draft is not None:
                    draft.close()
                raise ValueError(f"--speculative draft:{draft_model}: {one_line(e)}") from None
    except Exception as e:
        sock.close()
        return fail(one_line(e))
    try:
        m.tokenizer.prompt_ids([{"role": "user", "content": "hello"}])  # the template compiles and renders
    except Exception as e:
        m.close()
        sock.close()
        return fail(f"the chat template does not work: {one_line(e)}")
    # Every slot's KV cache resident now, not page by page in the passes of the first requests that reach each slot
    # (Zen 4 VM, 1.5B, 16 slots of 2048 positions: the passes of a first 16-client load took 2-5x as long).
    for loaded in (m, draft):
        if loaded is not None:
            loaded.core.populate_cache()
    model_id = m.name
    app = create_app(m, model_id, api_key=api_key, max_queue=max_queue, prompt_lookup=prompt_lookup, draft=draft)
    sys.stderr.write(f"qwen-native: serving {model_id} on http://{host}:{sock.getsockname()[1]}/v1 "
                     f"({m.device}, {m.dtype}, max_batch {m.max_batch}, context {m.max_context})\n")
    sys.stderr.flush()
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler it found; with
    # these a graceful stop exits 0 instead of dying by the signal
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        m.close()  # generations still running end; the scheduler thread stops
        if draft is not None:
            draft.close()
        sock.close()
    return 0
