"""The HTTP layer of ``jlora serve``: a Starlette app over an :class:`~jlora.serve.engine.Engine`.

Endpoints: ``GET /health``, ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true``: server-sent events in OpenAI's format), ``GET /v1/adapters``,
``POST /v1/adapters`` (``{"name", "path", "replace"}``: a PEFT or run folder under the adapter root),
``DELETE /v1/adapters/{name}``, ``GET /metrics`` (JSON). Every error is OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with its status; with an API key every request needs
``Authorization: Bearer KEY``. Needs the ``serve`` extra (``pip install 'jlora[serve]'``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import pathlib
import threading
import time
from collections.abc import AsyncIterator

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # the optional `serve` extra
    raise ImportError("`jlora serve` needs Starlette and uvicorn: pip install 'jlora[serve]'") from e

from jlora.serve import engine as engine_lib
from jlora.serve import protocol
from jlora.serve.protocol import ApiError

log = logging.getLogger("jlora.serve")
MAX_BODY = 4 << 20          # bytes of a request body at most


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _api_error(e: Exception) -> ApiError:
    """The ApiError for an exception raised while serving a request."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, engine_lib.EngineError):
        return ApiError(e.status, e.message, param=e.param)
    if isinstance(e, (ValueError, FileNotFoundError, KeyError)):
        message = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        return ApiError(400, message)
    log.exception("internal error")
    return ApiError(500, f"internal error: {type(e).__name__}: {e}")


async def _body(request: Request) -> dict:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY:
        raise ApiError(413, f"the request body has {size} bytes; the limit is {MAX_BODY}")
    chunks, total = [], 0
    async for part in request.stream():
        total += len(part)
        if total > MAX_BODY:
            raise ApiError(413, f"the request body exceeds the limit of {MAX_BODY} bytes")
        chunks.append(part)
    return protocol.parse_json(b"".join(chunks))


def contained(root: pathlib.Path | None, given) -> pathlib.Path:
    """The folder ``given`` names under ``root``, refusing anything that leaves it.

    ``given`` is relative to ``root`` (or absolute inside it); a ``..`` component is refused outright, and the
    folder and everything in it must resolve (symlinks followed) inside ``root``.
    """
    if root is None:
        raise ApiError(403, "loading adapters over the API is off: start the server with --adapter-root DIR",
                       param="path")
    if not isinstance(given, str) or not given or "\x00" in given:
        raise protocol.bad("path", f"must be a folder path under the adapter root; got {given!r}")
    path = pathlib.PurePath(given)
    if ".." in path.parts:
        raise ApiError(403, f"path: {given!r} contains '..'; give a folder under the adapter root", param="path")
    real_root = pathlib.Path(os.path.realpath(root))
    full = pathlib.Path(os.path.realpath(path if path.is_absolute() else real_root / path))

    def inside(p: pathlib.Path) -> bool:
        return p == real_root or real_root in p.parents

    if not inside(full):
        raise ApiError(403, f"path: {given!r} resolves outside the adapter root (symlinks are followed)",
                       param="path")
    if not full.is_dir():
        raise ApiError(404, f"path: no folder {given!r} under the adapter root", param="path")
    for dirpath, dirnames, filenames in os.walk(full):
        for name in dirnames + filenames:
            if not inside(pathlib.Path(os.path.realpath(os.path.join(dirpath, name)))):
                rel = os.path.relpath(os.path.join(dirpath, name), full)
                raise ApiError(403, f"path: {given!r} holds {rel!r}, a link out of the adapter root", param="path")
    return full


class _Auth:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer KEY``."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"")
            token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                why = "no API key given" if not given else "the API key is wrong"
                e = ApiError(401, f"{why}: send the header 'Authorization: Bearer <key>' with the server's "
                                  f"--api-key", code="invalid_api_key")
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: engine_lib.Engine, *, api_key: str | None = None,
               adapter_root: str | os.PathLike | None = None):
    """The ASGI app serving ``engine``; run it with uvicorn (``jlora serve`` does)."""
    root = pathlib.Path(adapter_root) if adapter_root is not None else None
    tokenizer = engine.loaded.tokenizer
    requests = engine.metrics

    def count(status: int) -> None:
        requests.count(f"http_{status}")
        requests.count("requests")

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": engine.name, "queued": engine.queued()})

    def model_card(name: str, info: dict | None) -> dict:
        card = {"id": name, "object": "model", "created": engine.created, "owned_by": "jlora", "root": name,
                "parent": None}
        if info is not None:
            card.update(created=info["created"], parent=engine.name, root=engine.name, slot=info["slot"])
        return card

    async def models(request: Request):
        cards = [model_card(engine.name, None)] + [model_card(n, i) for n, i in engine.adapters().items()]
        return JSONResponse({"object": "list", "data": cards})

    async def model(request: Request):
        name = request.path_params["name"]
        try:
            adapter = engine.check_model(name)
        except engine_lib.EngineError as e:
            return error_response(_api_error(e))
        return JSONResponse(model_card(name, None if adapter is None else engine.adapters()[adapter]))

    async def adapters(request: Request):
        return JSONResponse({"object": "list", "data": [{"name": n, **i} for n, i in engine.adapters().items()],
                             "slots": engine.bank.capacity, "rank": engine.bank.rank})

    async def load_adapter(request: Request):
        body = await _body(request)
        unknown = sorted(set(body) - {"name", "path", "replace"})
        if unknown:
            raise protocol.bad(unknown[0], "unknown field (give name, path and optionally replace)")
        name = body.get("name")
        if not isinstance(name, str):
            raise protocol.bad("name", f"is required: the adapter's name in requests; got {name!r}")
        replace = body.get("replace", False)
        if not isinstance(replace, bool):
            raise protocol.bad("replace", f"must be true or false; got {replace!r}")
        folder = contained(root, body.get("path"))
        slot = await run_in_threadpool(engine.add_adapter, name, folder, replace=replace)
        warning = engine.adapters().get(name, {}).get("warning")   # e.g. a PEFT folder naming another base model
        return JSONResponse({"name": name, "slot": slot, "object": "adapter", "loaded": True,
                             **({"warning": warning} if warning else {})})

    async def unload_adapter(request: Request):
        name = request.path_params["name"]
        await run_in_threadpool(engine.remove_adapter, name)
        return JSONResponse({"name": name, "object": "adapter", "deleted": True})

    async def metrics(request: Request):
        snap = engine.metrics.snapshot()
        snap.update(queued=engine.queued(), slots={"capacity": engine.bank.capacity, "used": len(engine.adapters()),
                                                   "rank": engine.bank.rank})
        return JSONResponse(snap)

    async def completions(request: Request):
        return await _generate(request, chat=False)

    async def chat_completions(request: Request):
        return await _generate(request, chat=True)

    async def _generate(request: Request, *, chat: bool):
        body = await _body(request)
        parse = protocol.chat_request if chat else protocol.completion_request
        req = await run_in_threadpool(parse, body, tokenizer, context=engine.context, vocab_size=engine.vocab_size)
        adapter = engine.check_model(req.model)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink_for(i):
            def sink(event):
                loop.call_soon_threadsafe(queue.put_nowait, (i, event))
            return sink

        rows = [engine_lib.Row(p, sink_for(i), adapter=adapter, max_tokens=m, temperature=req.temperature,
                               top_k=req.top_k, top_p=req.top_p,
                               seed=req.seed, index=i, ignore_eos=req.ignore_eos)
                for i, (p, m) in enumerate(zip(req.prompts, req.max_tokens))]
        engine.submit(rows)
        texts = [protocol.TextStream(tokenizer, req.stop, incremental=req.stream, after=p) for p in req.prompts]
        rid, created = protocol.new_id(chat), protocol.now()
        prompt_tokens = sum(len(p) for p in req.prompts)
        events = _events(rows, texts, queue)
        if not req.stream:
            async def cancel_if_gone():      # a client that stops waiting frees its rows (a stream's does too)
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                for row in rows:
                    row.cancel()

            watcher = asyncio.create_task(cancel_if_gone())
            try:
                finish = {}
                async for i, kind, value in events:
                    if kind == "end":
                        finish[i] = value[0]
            finally:
                watcher.cancel()
                for row in rows:
                    row.cancel()
            choices = [{"text": t.text, "finish_reason": finish[i], "token_ids": t.ids} for i, t in enumerate(texts)]
            return JSONResponse(protocol.response(req, rid, created, choices, prompt_tokens,
                                                  sum(len(t.ids) for t in texts)))
        try:
            first = await events.__anext__()           # an error before the first token is a plain error response
        except BaseException:
            for row in rows:
                row.cancel()
            raise

        async def stream() -> AsyncIterator[bytes]:
            try:
                if chat:
                    for i in range(len(rows)):
                        yield protocol.sse(protocol.chunk(req, rid, created, i, text="", role=True))
                pending = [first]
                while True:
                    for i, kind, value in pending:
                        if kind == "text":
                            yield protocol.sse(protocol.chunk(req, rid, created, i, text=value,
                                                              token_ids=texts[i].take_ids()))
                        else:
                            reason, tail = value
                            yield protocol.sse(protocol.chunk(req, rid, created, i, text=tail or (None if chat else ""),
                                                              finish_reason=reason, token_ids=texts[i].take_ids()))
                    try:
                        pending = [await events.__anext__()]
                    except StopAsyncIteration:
                        break
                if req.include_usage:
                    yield protocol.sse(protocol.usage_chunk(req, rid, created, prompt_tokens,
                                                            sum(len(t.ids) for t in texts)))
                yield protocol.sse("[DONE]")
            except ApiError as e:          # failed after the stream began: an error event, then the end
                yield protocol.sse(e.body())
                yield protocol.sse("[DONE]")
            finally:
                for row in rows:
                    row.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def route(path, endpoint, method="GET"):
        return Route(path, _guard(endpoint, count), methods=[method])

    routes = [route("/health", health), route("/v1/models", models), route("/v1/models/{name}", model),
              route("/v1/completions", completions, "POST"),
              route("/v1/chat/completions", chat_completions, "POST"),
              route("/v1/adapters", adapters), route("/v1/adapters", load_adapter, "POST"),
              route("/v1/adapters/{name}", unload_adapter, "DELETE"), route("/metrics", metrics)]

    async def http_error(request: Request, exc: HTTPException):
        e = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"
                     + (" (endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, "
                        "GET|POST /v1/adapters, DELETE /v1/adapters/NAME, GET /metrics)"
                        if exc.status_code in (404, 405) else ""))
        count(e.status)
        return error_response(e)

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    return _Auth(app, api_key) if api_key else app


def _guard(endpoint, count):
    """Wraps an endpoint: any exception becomes an OpenAI error response; counts statuses."""

    async def call(request: Request) -> Response:
        try:
            response = await endpoint(request)
        except Exception as e:  # noqa: BLE001 - no request may crash the server
            response = error_response(_api_error(e))
        count(response.status_code)
        return response

    return call


async def _events(rows, texts, queue: asyncio.Queue):
    """``(index, "text", delta)`` and ``(index, "end", (finish_reason, last delta))`` for every row, as tokens
    arrive; a row that fails raises its ApiError; a stop string cancels its row."""
    left = len(rows)
    ended = [False] * len(rows)
    while left:
        i, event = await queue.get()
        if ended[i]:
            continue
        text = texts[i]
        if isinstance(event, engine_lib.Token):
            delta = text.push(event.id)
            if text.stopped:
                rows[i].cancel()
                ended[i], left = True, left - 1
                yield i, "end", ("stop", delta + text.finish())
            elif delta:
                yield i, "text", delta
        elif isinstance(event, engine_lib.End):
            ended[i], left = True, left - 1
            tail = text.finish()
            reason = "stop" if text.stopped or event.reason == "stop" else "length"
            yield i, "end", (reason, tail)
        elif isinstance(event, engine_lib.Failed):
            raise ApiError(event.status, event.message)


def serve(engine: engine_lib.Engine, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          adapter_root=None, log_level: str = "info", sockets: list | None = None) -> None:
    """Runs the app with uvicorn until interrupted; closes the engine afterwards. ``sockets``: bound sockets to
    listen on (``jlora serve`` binds them before the model loads), else uvicorn binds ``host`` and ``port``."""
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError("`jlora serve` needs Starlette and uvicorn: pip install 'jlora[serve]'") from e
    app = create_app(engine, api_key=api_key, adapter_root=adapter_root)
    grace = 5.0
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:   # requests still running just before the grace period ends fail with 503
                timer = threading.Timer(grace - 1.0, engine.abort)   # (a thread: a signal handler takes no locks)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    started = time.perf_counter()
    try:
        Server(config).run(sockets=sockets)
    finally:
        engine.close()
        log.info("served for %.0f s", time.perf_counter() - started)


__all__ = ["create_app", "serve", "contained"]
