"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the background engine loop.

`build_app(llm)` makes the app: `/v1/completions`, `/v1/chat/completions` (chat template from
the tokenizer), both streaming with server-sent events, `/v1/models`, `/health` and `/metrics`
(Prometheus text; with the GPU's energy where an energy meter reads it). Requests may carry
`energy_budget`, `prompt_budget` and `controller`; every response reports the compute spent in an extra `anee`
field. Bad requests get an OpenAI error body with a 4xx status and touch nothing else.

Request bodies: `Content-Type: application/json` only (415; a form or text/plain POST from a web
page cannot start a generation), read within `body_timeout_s` (408) and up to `max_body_bytes`
(413), valid JSON nested at most MAX_JSON_DEPTH deep whose strings are valid Unicode (400). A
client that disconnects before its body is complete is counted as status 499.

The Ray Serve router (ray_serve.py) answers with the same pieces: `add_error_handlers`,
`check_api_key`, `read_body`.

Exposure: `serve` refuses a host beyond loopback without an API key unless
`allow_unauthenticated=True` (`anee-fast serve --allow-unauthenticated`), and then warns.

Context rule: a prompt must leave room for at least one token (prompt tokens < the model's
positions), and prompt + max_tokens must fit the positions; a request without max_tokens gets
16 tokens (completions, fewer if the context ends sooner) or the rest of the context and of the
KV cache (chat).
"""
import asyncio
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..control.registry import make_controller
from ..engine import energy
from ..engine.sampling import SamplingParams
from .async_engine import AsyncEngine
from .metrics import CONTENT_TYPE, ServingMetrics
from .openai_protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_BODY_TIMEOUT_S = 30.0
MAX_JSON_DEPTH = 64
DEFAULT_COMPLETION_TOKENS = 16
log = logging.getLogger(__name__)
_CONTROLLER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_DISCONNECT_POLL_S = 0.5
# A response sent before the request's body was read whole: the rest of the body must not be
# read as the next request, so the connection closes.
_CLOSE = {"Connection": "close"}


def build_app(llm, api_key=None, *, model_name=None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, energy_budget: float = 1.0,
              controller="budget", energy_meter=None, prompt_budget=None) -> FastAPI:
    """The FastAPI app serving `llm` (an `LLM`); its engine loop runs while the app is up.

    api_key: when set, `/v1/*` and `/metrics` need `Authorization: Bearer <api_key>`.
    max_body_bytes, body_timeout_s: the largest request body, and the most seconds its upload
    may take (a client that sends less than its Content-Length does not hold a connection).
    energy_budget, controller, prompt_budget: what a request without those fields gets (the
    controller may be a file path here; requests may only name controllers or give per-layer
    action lists; prompt_budget None: the request's energy_budget).
    energy_meter: what `/metrics` reads `anee_energy_joules_total` from: an EnergyMeter, a string
    saying why there is none, or None for `energy.energy_meter` of the model's device.
    """
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) \
            or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an integer >= 1, got {max_body_bytes!r}")
    if isinstance(body_timeout_s, bool) or not isinstance(body_timeout_s, (int, float)) \
            or not math.isfinite(body_timeout_s) or body_timeout_s <= 0:
        raise ValueError(f"body_timeout_s must be a finite number > 0, got {body_timeout_s!r}")
    if energy_meter is None:
        energy_meter = energy.energy_meter(llm.weights.device)
    service = _Service(llm, model_name or llm.name, energy_budget, make_controller(controller),
                       energy_meter, prompt_budget)

    @asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        try:
            yield
        finally:
            service.engine.stop()

    app = FastAPI(title="anee_fast", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service

    add_error_handlers(app, service.metrics)

    @app.get("/health")
    async def health():
        if not service.engine.running:
            raise APIError(503, "the engine loop is not running")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        check_api_key(request, api_key)
        return Response(service.metrics.render(llm.engine), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        check_api_key(request, api_key)
        return {"object": "list", "data": [service.model_card()]}

    async def read_request(request: Request, model):
        """The authorized, parsed body of a POST, for this server's model."""
        check_api_key(request, api_key)
        req = parse_request(model, await _json_body(request, max_body_bytes, body_timeout_s))
        service.check_model(req.model)
        return req

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_request(request, CompletionRequest)
        ids = service.prompt_ids(req.prompt)
        return await service.respond(request, req, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_request(request, ChatCompletionRequest)
        if req.max_completion_tokens is not None:
            if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
                raise APIError(400, "max_tokens and max_completion_tokens differ: give one",
                               param="max_tokens")
            req.max_tokens = req.max_completion_tokens
        ids = service.chat_ids(req.messages)
        return await service.respond(request, req, ids, chat=True)

    return app


def add_error_handlers(app: FastAPI, metrics) -> None:
    """Answers every error with an OpenAI error body, counted by `metrics.request_rejected`:
    APIError with its own status, starlette's HTTP errors (404, 405) with theirs, anything
    else with 500."""
    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        metrics.request_rejected(error.status)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error):
        metrics.request_rejected(error.status_code)
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(),
                            status_code=error.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, error: Exception):
        log.exception("request failed")
        metrics.request_rejected(500)
        return JSONResponse(APIError(500, f"internal error: {type(error).__name__}: {error}").body(),
                            status_code=500)


def check_api_key(request: Request, api_key) -> None:
    """Refuses (401) a request without `Authorization: Bearer <api_key>`; api_key None: none."""
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def _json_body(request: Request, limit: int, timeout_s: float):
    """The decoded JSON body: sent as application/json (415), read within `timeout_s` seconds
    (408) and up to `limit` bytes (413), valid JSON (400) that _check_json accepts."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, "the request body must be JSON sent with 'Content-Type: "
                            f"application/json', got {media_type or 'no Content-Type'}",
                       code="unsupported_media_type")
    raw = await read_body(request, limit, timeout_s)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:          # nested far deeper than MAX_JSON_DEPTH
        raise APIError(400, _TOO_DEEP) from None
    _check_json(body)
    return body


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request's body, read within `timeout_s` seconds (408) and up to `limit` bytes (413);
    499 when the client disconnects before it is complete."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body has {length} bytes, more than the limit of {limit}",
                       headers=_CLOSE)
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, "the request body is larger than the limit of "
                                        f"{limit} bytes", headers=_CLOSE)
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s (it had "
                            f"{size} bytes then)", headers=_CLOSE) from None
    except ClientDisconnect:
        raise APIError(499, "the client disconnected before sending the whole request "
                            "body") from None
    return b"".join(chunks)


_TOO_DEEP = f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} deep"


def _check_json(body) -> None:
    """Refuses (400) what json.loads accepts but nothing downstream should see: arrays and
    objects nested more than MAX_JSON_DEPTH deep, and strings that are not valid Unicode (a lone
    surrogate escape such as \\ud800, which no tokenizer encodes and no response can echo)."""
    level, depth = [body], 0
    while level:
        below = []
        for value in level:
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise APIError(400, "the request body holds a string that is not valid "
                                        f"Unicode: the lone surrogate {value[e.start]!r} at "
                                        f"character {e.start}") from None
            elif isinstance(value, (list, dict)):
                if depth == MAX_JSON_DEPTH:
                    raise APIError(400, _TOO_DEEP)
                below += [*value, *value.values()] if isinstance(value, dict) else value
        level, depth = below, depth + 1


class _Service:
    """What the endpoints share: the model, the engine loop, the metrics, request building."""

    def __init__(self, llm, model_name, energy_budget, controller, energy_meter, prompt_budget):
        controller.check_model(llm.spec.num_layers, llm.spec.hidden_size)
        self.llm = llm
        self.model_name = model_name
        self.energy_budget = energy_budget
        self.prompt_budget = prompt_budget
        self.controller = controller
        self.created = int(time.time())
        self.metrics = ServingMetrics(energy_meter)
        self.engine = AsyncEngine(llm.engine, self.metrics)

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "anee_fast", "max_model_len": self.llm.spec.max_positions}

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist: this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")

    # ---- prompts ---------------------------------------------------------------------------------

    def prompt_ids(self, prompt) -> list:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokenizer = self._tokenizer("prompt")
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt")
            return [int(t) for t in tokenizer.encode(prompt)]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        vocab = self.llm.spec.vocab_size
        outside = [t for t in prompt if not 0 <= t < vocab]
        if outside:
            raise APIError(400, f"prompt token ids must be in [0, {vocab}), got {outside[0]}",
                           param="prompt")
        return list(prompt)

    def chat_ids(self, messages) -> list:
        tokenizer = self._tokenizer("messages")
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"the model {self.model_name!r} has no chat template: use "
                                "/v1/completions", param="messages")
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                             tokenize=False)
        return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]

    def _tokenizer(self, param):
        if self.llm.tokenizer is None:
            raise APIError(400, f"the model {self.model_name!r} has no tokenizer: give the prompt "
                                "as a list of token ids", param=param)
        return self.llm.tokenizer

    # ---- a request -------------------------------------------------------------------------------

    def new_sequence(self, req, ids, chat: bool):
        context = self.llm.spec.max_positions
        if len(ids) >= context:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the model's context is "
                                f"{context} tokens and must leave room for at least one more",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        room = context - len(ids)
        max_tokens = req.max_tokens
        if max_tokens is None:
            blocks = self.llm.engine.block_manager
            cache_room = blocks.num_blocks * blocks.block_size - len(ids)
            max_tokens = max(1, min(room, cache_room) if chat else
                             min(DEFAULT_COMPLETION_TOKENS, room))
        elif max_tokens > room:
            raise APIError(400, f"max_tokens is {max_tokens}, but the prompt's {len(ids)} tokens "
                                f"leave room for {room} in the model's context of {context}",
                           param="max_tokens", code="context_length_exceeded")
        # The request model has checked every sampling field.
        sampling = SamplingParams(max_tokens=max_tokens, temperature=req.temperature,
                                  top_k=req.top_k, top_p=req.top_p, seed=req.seed,
                                  stop_token_ids=list(req.stop_token_ids),
                                  ignore_eos=req.ignore_eos)
        controller = self.controller if req.controller is None else self._controller(
            req.controller)
        budget = self.energy_budget if req.energy_budget is None else req.energy_budget
        prompt_budget = self.prompt_budget if req.prompt_budget is None else req.prompt_budget
        try:
            return self.llm.engine.new_sequence(ids, sampling, budget, controller,
                                                prompt_budget=prompt_budget)
        except ValueError as e:         # what only the engine checks: its KV cache's capacity
            raise APIError(400, str(e)) from None

    def _controller(self, controller):
        """A request's controller: a name (make_controller shares one instance per name, so the
        requests that name it share its work in a step) or a per-layer action list; never a file.
        Checked against the model here, so that a bad one is an error about `controller`."""
        if isinstance(controller, str) and (not _CONTROLLER_NAME.fullmatch(controller)
                                            or os.path.exists(controller)):
            raise APIError(400, f"controller {controller!r}: a request may give a controller "
                                "name or a per-layer action list; controller files are chosen "
                                "with `anee-fast serve --controller PATH`", param="controller")
        try:
            made = make_controller(controller)
            made.check_model(self.llm.spec.num_layers, self.llm.spec.hidden_size)
        except (ValueError, OSError) as e:
            raise APIError(400, str(e), param="controller") from None
        return made

    async def respond(self, request, req, ids, chat: bool):
        seq = self.new_sequence(req, ids, chat)
        meta = _Meta(chat, self.model_name)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return _EventStream(self._sse(seq, meta, usage), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache"})
        return await self._complete(request, seq, meta)

    async def _complete(self, request, seq, meta):
        async def last_event():
            async for event in self.engine.generate(seq):
                if event.finished:
                    return event

        waiting = asyncio.ensure_future(last_event())
        try:
            while not waiting.done():
                await asyncio.wait([waiting], timeout=_DISCONNECT_POLL_S)
                if not waiting.done() and await request.is_disconnected():
                    return Response(status_code=499)
        finally:
            # A client gone, or this task cancelled (a Ray router whose client went away):
            # leaving the iteration aborts the sequence.
            waiting.cancel()
        event = waiting.result()
        if event.error is not None:
            raise APIError(500, f"the engine failed on this request: {event.error}")
        text = self._text(seq.generated_ids)
        choice = {"index": 0, "finish_reason": seq.finish_reason, "token_ids": seq.generated_ids}
        if meta.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return meta.body([choice], usage=_usage(seq), anee=seq.stats())

    async def _sse(self, seq, meta, include_usage):
        """Server-sent events: one chunk per step's new tokens, then the end, then [DONE]."""
        text = _Detokenizer(self.llm.tokenizer)
        events = self.engine.generate(seq)
        try:
            if meta.chat:
                yield _event(meta.body([_chunk_choice(meta, {"role": "assistant", "content": ""})]))
            async for event in events:
                if event.error is not None:
                    yield _event(APIError(500, f"the engine failed on this request: "
                                               f"{event.error}").body())
                    break
                delta = text.push(event.new_token_ids, final=event.finished)
                if delta or event.new_token_ids:
                    yield _event(meta.body([_chunk_choice(meta, delta, event.new_token_ids)]))
                if event.finished:
                    end = meta.body([_chunk_choice(meta, "", [], seq.finish_reason)],
                                    anee=seq.stats())
                    yield _event(end)
                    if include_usage:
                        yield _event(meta.body([], usage=_usage(seq)))
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()

    def _text(self, ids) -> str:
        if self.llm.tokenizer is None:
            return ""
        return self.llm.tokenizer.decode(ids, skip_special_tokens=True)


class _Detokenizer:
    """Text of a growing list of token ids, piece by piece, decoding only the newest tokens.

    Decodes ids[prefix:] and ids[prefix:read] and emits the difference, so each step costs a
    few tokens whatever the length so far, and tokenizers that drop a leading space when a
    piece is decoded alone still get their context. A piece that ends inside a character
    (U+FFFD) waits for the next token, unless it is the last.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.prefix = 0
        self.read = 0

    def push(self, new_ids, final: bool = False) -> str:
        self.ids += new_ids
        if self.tokenizer is None:
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class _EventStream(StreamingResponse):
    """A stream that ends as soon as the client disconnects, which aborts its request (and frees
    its KV blocks) at once instead of at the next token it fails to send."""

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as group:
            async def stream():
                try:
                    await self.stream_response(send)
                except OSError:        # the client went away while we were sending
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()
        await self.body_iterator.aclose()


class _Meta:
    """The id, object type and model shared by every body of one response."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model

    def body(self, choices, **extra) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        if self.chat and (not choices or "delta" in choices[0]):
            kind = "chat.completion.chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}


def _chunk_choice(meta, delta, token_ids=(), finish_reason=None) -> dict:
    choice = {"index": 0, "finish_reason": finish_reason, "token_ids": list(token_ids)}
    if meta.chat:
        choice["delta"] = delta if isinstance(delta, dict) else {"content": delta}
    else:
        choice.update(text=delta, logprobs=None)
    return choice


def _usage(seq) -> dict:
    return {"prompt_tokens": seq.num_prompt_tokens, "completion_tokens": seq.num_generated,
            "total_tokens": seq.num_prompt_tokens + seq.num_generated}


def _event(body) -> str:
    return f"data: {json.dumps(body)}\n\n"


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host`: "localhost" or a loopback address (127.0.0.0/8,
    ::1). Any other name may resolve to an address others reach, so it counts as exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key, allow_unauthenticated: bool = False) -> None:
    """Refuses (ValueError) to serve beyond loopback without an API key, unless allowed."""
    if not api_key and not is_loopback(host) and not allow_unauthenticated:
        raise ValueError(f"host {host!r} can be reached from other machines and no API key is "
                         "set: set one (--api-key KEY or $ANEE_FAST_API_KEY), bind 127.0.0.1, "
                         "or serve everyone who can reach it with --allow-unauthenticated")


def serve(llm, host: str = "127.0.0.1", port: int = 8000, api_key=None, *,
          allow_unauthenticated: bool = False, **app_options) -> None:
    """Runs the server until interrupted (uvicorn). Beyond loopback it needs an `api_key`, or
    allow_unauthenticated=True, and then warns on stderr (check_exposure)."""
    check_exposure(host, api_key, allow_unauthenticated)
    app = build_app(llm, api_key, **app_options)
    if not api_key and not is_loopback(host):
        print(f"WARNING: serving {host}:{port} without an API key: anyone who can reach it can "
              "run generations on this machine", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


class ServerThread:
    """The server in a background thread of this process (tests, benchmarks).

    `with ServerThread(llm) as server:` serves on a free loopback port; `server.url` is its base
    URL (`http://127.0.0.1:PORT`). Leaving the block shuts the server and its engine loop down.
    """

    def __init__(self, llm, api_key=None, host: str = "127.0.0.1", port: int = 0, **app_options):
        self.app = build_app(llm, api_key, **app_options)
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = None
        self.url = None

    def __enter__(self):
        self._thread = threading.Thread(target=self._server.run, name="anee-server", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server did not start (is the port in use?)")
            time.sleep(0.02)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join()
