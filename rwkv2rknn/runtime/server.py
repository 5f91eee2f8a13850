"""`rwkv2rknn serve`: an OpenAI-compatible HTTP API over one model, on Starlette and uvicorn.

Why this stack: both are pure Python (with uvicorn's plain h11 server, not its optional compiled
extras), so they install on an RK3588 board from wheels without torch or a compiler. FastAPI
would add pydantic and its compiled core for request models we can check in a few lines.

One model, one worker thread: requests are served one at a time in arrival order, behind a
bounded queue (``max_queue`` waiting; more get 429). The worker runs a ``Session``
(``runtime.session``, the same generation path as `run` and `chat`) and hands text to the
request's event loop as it comes. After each request the RWKV state is kept in the state cache
(``runtime.statecache``) twice: after the prompt and after the reply; a request whose prompt
extends a kept state starts there, prefills only the rest, and says so in
``usage.prompt_tokens_details.cached_tokens``.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (``stream`` as
server-sent events ending with ``data: [DONE]``), GET /health. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 bad JSON or field, 404 unknown
model, 413 body too large, 429 queue full, 503 still loading. Unknown fields are ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rwkv2rknn import __version__
from rwkv2rknn.runtime import chatformat
from rwkv2rknn.runtime.sampler import Sampler, SamplerArgs

log = logging.getLogger(__name__)

MAX_STOPS = 16


@dataclass
class ServerConfig:
    artifact: Optional[str] = None
    backend: str = "auto"
    core_mask: str = "auto"
    tokenizer: Optional[str] = None
    model_name: Optional[str] = None
    max_queue: int = 16
    max_prompt_tokens: int = 16384
    default_max_tokens: int = 1024
    request_timeout: float = 600.0
    state_cache_bytes: int = 256 << 20
    state_dir: Optional[str] = None
    max_body_bytes: int = 8 << 20
    keepalive_s: float = 1.0  # SSE comment while a streamed request waits (finds gone clients)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---------------------------------------------------------------------------------- the engine


@dataclass
class Job:
    ids: List[int]
    args: SamplerArgs
    seed: Optional[int]
    max_tokens: int
    stop: List[str]
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancel: threading.Event = field(default_factory=threading.Event)

    def push(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is going away
            self.cancel.set()


class QueueFull(Exception):
    pass


class Engine:
    """The model, its session and state cache, and the worker thread that runs requests."""

    def __init__(
        self, cfg: ServerConfig, load: Optional[Callable] = None, echo: Callable[[str], None] = log.info
    ):
        self.cfg, self.echo = cfg, echo
        self._load_fn = load or self._open
        self.status = "loading"
        self.error: Optional[BaseException] = None
        self.name = cfg.model_name or _default_name(cfg.artifact)
        self.session = self.cache = None
        self._jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not finished (the running one included)
        self.served = 0
        self.on_failed: Callable[[BaseException], None] = lambda e: None
        self._created = int(time.time())

    # ------------------------------------------------------------ loading

    def _open(self):
        from rwkv2rknn.runtime.generate import model_tokenizer
        from rwkv2rknn.runtime.loader import open_model

        c = self.cfg
        model, spec = open_model(c.artifact, c.backend, c.core_mask, echo=self.echo)
        return model, model_tokenizer(c.tokenizer or spec)

    def start(self) -> None:
        threading.Thread(target=self._load_and_serve, name="rwkv2rknn-engine", daemon=True).start()

    def _load_and_serve(self) -> None:
        from rwkv2rknn.runtime.session import Session
        from rwkv2rknn.runtime.statecache import StateCache

        try:
            model, tok = self._load_fn()
            self.session = Session(model, tok)
            self.cache = StateCache(
                self.cfg.state_cache_bytes,
                self.session.identity,
                self.cfg.state_dir,
                self.session.description,
            )
        except BaseException as e:  # noqa: BLE001 - reported by /health and the CLI
            self.status, self.error = "error", e
            log.error("loading the model failed: %s", e)
            self.on_failed(e)
            return
        self.status = "ok"
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._pending -= 1

    def stop(self) -> None:
        """Cancel what waits and what runs; the worker ends."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.push(("error", ApiError(503, "the server is shutting down", "server_error")))
        self._jobs.put(None)

    # ------------------------------------------------------------ requests

    def encode(self, text: str) -> List[int]:
        return self.session.encode(text)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._pending >= self.cfg.max_queue + 1:
                raise QueueFull()
            self._pending += 1
        self._jobs.put(job)

    @property
    def pending(self) -> int:
        return self._pending

    def _run(self, job: Job) -> None:
        if job.cancel.is_set():
            return
        if time.monotonic() > job.deadline:
            job.push(
                (
                    "error",
                    ApiError(
                        503,
                        "the request waited longer than the server's time limit (--request-timeout)",
                        "server_error",
                        code="timeout",
                    ),
                )
            )
            return
        s, cache = self.session, self.cache
        try:
            k, arrays = cache.lookup(job.ids, len(job.ids))
            if arrays is not None:
                s.set_arrays({**arrays, "tokens": job.ids[:k]})
            else:
                s.reset()
            sampler = Sampler(job.args, seed=job.seed, tokenizer=s.tokenizer)
            reply = s.generate(
                job.ids[k:],
                sampler,
                job.max_tokens,
                stop=job.stop,
                on_text=lambda t: job.push(("text", t)),
                cancel=job.cancel.is_set,
                deadline=job.deadline,
                after_prefill=lambda ss: cache.put(ss.tokens, ss.arrays()),
            )
            self.served += 1
            if reply.finish_reason == "time":
                log.warning(
                    "a request reached the time limit (--request-timeout %.0f s): reply cut",
                    self.cfg.request_timeout,
                )
            job.push(("done", reply, k))
            cache.put(s.tokens, s.arrays())
        except Exception as e:  # noqa: BLE001 - one request fails, the server goes on
            log.error("a request failed: %s", e)
            s.reset()
            job.push(("error", ApiError(500, f"generation failed: {e}", "server_error")))

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.name, "object": "model", "created": self._created, "owned_by": "rwkv2rknn"}],
        }


def _default_name(artifact: Optional[str]) -> str:
    if not artifact:
        return "rwkv2rknn-bundled"
    return os.path.basename(os.path.normpath(artifact)) or "rwkv2rknn"


# ---------------------------------------------------------------------------------- requests


async def read_json(request: Request, limit: int) -> dict:
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _number(body: dict, name: str, lo: float, hi: float, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ApiError(
            400, f"'{name}' must be a number from {lo:g} to {hi:g}, got {json.dumps(v)[:40]}", param=name
        )
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(
            400, f"'{name}' must be a whole number from {lo} to {hi}, got {json.dumps(v)[:40]}", param=name
        )
    return v


def _stops(body: dict) -> List[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > MAX_STOPS or not all(isinstance(s, str) for s in v):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    return [s for s in v if s]


def _options(body: dict, cfg: ServerConfig) -> dict:
    """The sampling and length fields every endpoint takes."""
    if body.get("n") not in (None, 1):
        raise ApiError(400, "'n' must be 1: one completion per request", param="n")
    for flag in ("stream",):
        if body.get(flag) is not None and not isinstance(body.get(flag), bool):
            raise ApiError(400, f"'{flag}' must be true or false", param=flag)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, 1, 1 << 20, cfg.default_max_tokens)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be a whole number", param="seed")
    args = SamplerArgs(
        temperature=_number(body, "temperature", 0, 2, 1.0),
        top_p=_number(body, "top_p", 0, 1, 1.0),
        top_k=_integer(body, "top_k", 0, 1 << 30, 0),
        alpha_presence=_number(body, "presence_penalty", -2, 2, 0.0),
        alpha_frequency=_number(body, "frequency_penalty", -2, 2, 0.0),
        alpha_decay=_number(body, "penalty_decay", 0, 1, 1.0),
    )
    return dict(
        args=args,
        seed=None if seed is None else abs(int(seed)),
        max_tokens=max_tokens,
        stop=_stops(body),
        stream=bool(body.get("stream")),
        usage=bool((so or {}).get("include_usage")),
    )


def _text_content(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ApiError(400, f"{where}: only text content parts are supported", param="messages")
            out.append(part["text"])
        return "".join(out)
    raise ApiError(400, f"{where}: 'content' must be a string or a list of text parts", param="messages")


def chat_prompt(body: dict) -> str:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role not in chatformat.ROLES:
            raise ApiError(
                400,
                f"messages[{i}]: role {json.dumps(role)[:30]} is not supported "
                f"(use {', '.join(chatformat.ROLES)})",
                param="messages",
            )
        turns.append((role, _text_content(m.get("content"), f"messages[{i}]")))
    return chatformat.render(turns)


def completion_prompt(body: dict):
    """The prompt as text, or as token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise ApiError(400, "'prompt' is empty", param="prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return [int(t) for t in p]
    raise ApiError(
        400, "'prompt' must be a string, a list of token ids, or a list of one of these", param="prompt"
    )


# ---------------------------------------------------------------------------------- the app


def make_app(engine: Engine) -> Starlette:
    cfg = engine.cfg

    def ready() -> None:
        if engine.status == "loading":
            raise ApiError(
                503, "the model is still loading; try again shortly", "service_unavailable", code="loading"
            )
        if engine.status != "ok":
            raise ApiError(
                503, f"the model failed to load: {engine.error}", "service_unavailable", code="load_failed"
            )

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is not None and name != engine.name:
            raise ApiError(
                404,
                f"the model '{str(name)[:80]}' does not exist; this server has '{engine.name}'",
                param="model",
                code="model_not_found",
            )

    async def health(request: Request) -> Response:
        if engine.status != "ok":
            body = {"status": engine.status}
            if engine.error is not None:
                body["error"] = str(engine.error)
            return JSONResponse(body, status_code=503)
        c = engine.cache
        return JSONResponse(
            {
                "status": "ok",
                "model": engine.name,
                "queue": engine.pending,
                "served": engine.served,
                "state_cache": {"states": len(c), "bytes": c.bytes, "hits": c.hits, "misses": c.misses},
            }
        )

    async def models(request: Request) -> Response:
        return JSONResponse(engine.models())

    async def completions(request: Request, chat: bool) -> Response:
        try:
            body = await read_json(request, cfg.max_body_bytes)
            ready()
            check_model(body)
            opts = _options(body, cfg)
            prompt = chat_prompt(body) if chat else completion_prompt(body)
            if isinstance(prompt, str):
                ids = await run_in_threadpool(engine.encode, prompt)
            else:
                ids = prompt
                vocab = int(getattr(engine.session.model, "vocab", 0) or 0)
                if vocab and not all(0 <= t < vocab for t in ids):
                    raise ApiError(
                        400, f"'prompt' has token ids outside the vocabulary (0..{vocab - 1})", param="prompt"
                    )
            if not ids:
                raise ApiError(400, "the prompt encodes to no tokens", param="prompt")
            if len(ids) > cfg.max_prompt_tokens:
                raise ApiError(
                    400,
                    f"the prompt has {len(ids)} tokens, more than this server takes "
                    f"({cfg.max_prompt_tokens}, --max-prompt-tokens)",
                    param="messages" if chat else "prompt",
                    code="context_length_exceeded",
                )
            stop = opts["stop"] + ([chatformat.TURN_END] if chat else [])
            loop = asyncio.get_running_loop()
            job = Job(
                ids,
                opts["args"],
                opts["seed"],
                opts["max_tokens"],
                stop,
                time.monotonic() + cfg.request_timeout,
                loop,
                asyncio.Queue(),
            )
            try:
                engine.submit(job)
            except QueueFull:
                raise ApiError(
                    429,
                    f"the server is busy: {cfg.max_queue} requests are waiting "
                    f"(--max-queue); try again later",
                    "rate_limit_exceeded",
                    code="queue_full",
                ) from None
        except ApiError as e:
            return e.response()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        meta = dict(
            id=rid, created=int(time.time()), model=engine.name, system_fingerprint=f"rwkv2rknn-{__version__}"
        )
        if opts["stream"]:
            return StreamingResponse(
                _stream(job, chat, meta, len(ids), opts["usage"], cfg),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _collect(request, job, chat, meta, len(ids))

    async def chat_completions(request: Request) -> Response:
        return await completions(request, True)

    async def text_completions(request: Request) -> Response:
        return await completions(request, False)

    async def not_found(request: Request, exc) -> Response:
        return ApiError(
            404, f"no such endpoint: {request.method} {request.url.path}", code="unknown_url"
        ).response()

    async def not_allowed(request: Request, exc) -> Response:
        return ApiError(
            405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"
        ).response()

    async def on_shutdown():
        engine.stop()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", text_completions, methods=["POST"]),
    ]
    return Starlette(
        routes=routes, exception_handlers={404: not_found, 405: not_allowed}, lifespan=_lifespan(on_shutdown)
    )


def _lifespan(on_shutdown):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        await on_shutdown()

    return lifespan


def _usage(prompt_tokens: int, reply, cached: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(reply.ids),
        "total_tokens": prompt_tokens + len(reply.ids),
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _finish(reply) -> str:
    return "stop" if reply.finish_reason == "stop" else "length"


async def _collect(request: Request, job: Job, chat: bool, meta: dict, n_prompt: int) -> Response:
    """Wait for the whole reply (cancelling it if the client goes away)."""
    pieces = []
    shown = chatformat.ReplyStream()
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                return Response(status_code=499)
            continue
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        kind = event[0]
        if kind == "text":
            pieces.append(shown.feed(event[1]) if chat else event[1])
        elif kind == "error":
            return event[1].response()
        else:
            reply, cached = event[1], event[2]
            text = "".join(pieces)
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": _finish(reply),
                }
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(reply)}
            return JSONResponse(
                {
                    **meta,
                    "object": "chat.completion" if chat else "text_completion",
                    "choices": [choice],
                    "usage": _usage(n_prompt, reply, cached),
                }
            )


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


async def _stream(job: Job, chat: bool, meta: dict, n_prompt: int, with_usage: bool, cfg: ServerConfig):
    """The reply as OpenAI's stream chunks; a client that goes away cancels the generation."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta=None, text=None, finish=None):
        if chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse({**meta, "object": obj, "choices": [choice]})

    shown = chatformat.ReplyStream()
    try:
        if chat:
            yield chunk(delta={"role": "assistant", "content": ""})
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=cfg.keepalive_s)
            except asyncio.TimeoutError:
                yield ": waiting\n\n"  # finds a client that has gone while the request waits
                continue
            kind = event[0]
            if kind == "text":
                piece = shown.feed(event[1]) if chat else event[1]
                if piece:
                    yield chunk(delta={"content": piece}, text=piece)
            elif kind == "error":
                yield _sse(event[1].body())
                break
            else:
                reply, cached = event[1], event[2]
                yield chunk(delta={}, text="", finish=_finish(reply))
                if with_usage:
                    yield _sse(
                        {**meta, "object": obj, "choices": [], "usage": _usage(n_prompt, reply, cached)}
                    )
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # a no-op once the reply is done; stops a reply whose client left


# ---------------------------------------------------------------------------------- running


def check_artifact(path: Optional[str]) -> None:
    """Refuse a missing or wrong artifact before the server starts (the load itself runs while
    the server answers 503)."""
    if path is None:
        return
    from rwkv2rknn.runtime.loader import is_per_layer_folder

    if is_per_layer_folder(path):
        return
    from rwkv2rknn.runtime.hybrid import load_manifest

    load_manifest(path)


def check_port(host: str, port: int) -> None:
    """A one-line error now for an address that cannot be listened on, rather than the server's
    own log line later."""
    import socket
    from rwkv2rknn.errors import UsageError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(
            f"cannot listen on host '{host}' ({e.strerror})", "give an address of this machine"
        ) from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise UsageError(
                f"cannot listen on {host}:{port} ({e.strerror})", "give another --port, or stop what uses it"
            ) from None


def run_server(
    cfg: ServerConfig,
    host: str,
    port: int,
    echo: Callable[[str], None] = log.info,
    load: Optional[Callable] = None,
) -> None:
    """Serve until interrupted; raises the load error if the model cannot be loaded."""
    import uvicorn

    check_artifact(cfg.artifact)
    check_port(host, port)
    engine = Engine(cfg, load=load, echo=echo)
    app = make_app(engine)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = uvicorn.Server(config)

    def failed(e):
        server.should_exit = True

    engine.on_failed = failed

    def announce():
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        while engine.status == "loading":
            time.sleep(0.05)
        if server.started and engine.status == "ok":
            where = f"{host}:{port}"
            try:
                where = "%s:%d" % server.servers[0].sockets[0].getsockname()[:2]
            except (IndexError, AttributeError):
                pass
            echo(f"serving {engine.name} ({engine.session.description}) on http://{where}/v1")

    engine.start()
    threading.Thread(target=announce, daemon=True).start()
    server.run()
    if engine.error is not None:
        raise engine.error
