"""Many engine replicas behind one OpenAI endpoint, on Ray Serve (one machine or a cluster).

Two deployments. `EngineReplica` (N replicas, or autoscaled): one `LLM` each and the app of
`server.build_app` over it, so every route, extra field and error body is the single server's.
`Router` (the HTTP ingress, no CPU reserved): reads each request's body (the same size and time
limits) and hands it to one engine replica through a streaming DeploymentHandle call, relaying
the response as it comes. It exists for what one replica alone cannot do:

- a replica that dies mid-request: Ray's proxy would cut the connection or answer a bare 500;
  the router answers 503 with an OpenAI error body, or ends a started stream with an error event;
- /metrics and /health of the whole deployment: a request reaches one replica, so the router
  asks all of them (`DeploymentHandle.broadcast`) and merges their series under a `replica`
  label (its own rejections under replica="router");
- a client that disconnects: the router cancels its handle call, which cancels the request's
  task on its replica and aborts the sequence there (freeing its KV blocks).

Ray replaces a replica whose process dies or whose `check_health` fails (its engine loop
stopped). A replica's counters end with it: totals over a deployment's life are what Prometheus
scraped (`sum(increase(...))`), as with any restarted process.

Imported only when serving with Ray: `import anee_fast` and a single-process `anee-fast serve`
never import ray (`pip install 'anee_fast[ray]'`).
"""
import asyncio
import json
import logging
import os
import time

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError,
                                  ReplicaUnavailableError)

from ..llm import LLM
from .metrics import CONTENT_TYPE, ServingMetrics, merge, render
from .openai_protocol import APIError
from .server import (DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, add_error_handlers,
                     build_app, check_api_key, check_exposure, is_loopback, read_body)

APP_NAME = "anee_fast"
log = logging.getLogger(__name__)
_BROADCAST_TIMEOUT_S = 10.0
# What Ray raises to a caller whose replica died, was unreachable or could take no more.
_REPLICA_LOST = (RayError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)
# No access log line per request and per handle call: it costs as much as a tiny model's step.
_QUIET = {"enable_access_log": False}


class EngineReplica:
    """One engine: an `LLM` built from `llm_options` (LLM's keyword arguments, `model` included)
    served by `build_app(llm, **app_options)`, driven in-process by the router's calls."""

    def __init__(self, llm_options: dict, app_options: dict):
        self.llm = LLM(**llm_options)
        self.app = build_app(self.llm, **app_options)
        self.service = self.app.state.service
        self.service.engine.start()
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __del__(self):
        self.service.engine.stop()

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose engine loop ended is replaced."""
        if not self.service.engine.running:
            raise RuntimeError("the engine loop is not running")

    async def http(self, request: dict):
        """Runs one HTTP request (see `_forwarded`) through this replica's app and yields the ASGI
        messages of its response as the app sends them, in lists of those sent together, their
        body parts joined (under load, one Ray message and one write carry several tokens).
        Cancelling the call (the router's client went away) cancels the app's task, which aborts
        the request's sequence."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "scheme": "http", "root_path": "", "server": None, **request}
        body = [{"type": "http.request", "body": scope.pop("body"), "more_body": False}]

        async def receive():
            if body:
                return body.pop()
            await asyncio.Future()          # no disconnect message: cancellation says it

        sent = asyncio.Queue()
        task = asyncio.ensure_future(self.app(scope, receive, sent.put))
        task.add_done_callback(lambda _: sent.put_nowait(None))
        try:
            while True:
                messages = [await sent.get()]
                while not sent.empty():
                    messages.append(sent.get_nowait())
                end = messages[-1] is None
                messages = _joined(messages[:-1] if end else messages)
                if messages:
                    yield messages
                if end:
                    return
        finally:
            task.cancel()

    def metrics(self):
        """(replica id, its metrics as Family lists), for the router's /metrics."""
        return self.replica, self.service.metrics.families(self.llm.engine)

    def health(self) -> dict:
        engine = self.llm.engine
        return {"replica": self.replica, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "status": "ok" if self.service.engine.running else "engine loop not running",
                "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting),
                "kv_blocks_in_use": engine.block_manager.num_used,
                "kv_blocks_total": engine.block_manager.num_blocks}


class Router:
    """The HTTP ingress: see the module docstring. `engine`: the EngineReplica deployment."""

    def __init__(self, engine, api_key=None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S):
        self.engine = engine
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.metrics = ServingMetrics()     # only its rejections: the replicas count the rest

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="anee_fast", docs_url=None, redoc_url=None, openapi_url=None)
        add_error_handlers(app, self.metrics)
        app.get("/health")(self._health)
        app.get("/metrics")(self._metrics)
        app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])(
            self._forward)
        return app

    async def _broadcast(self, method: str) -> list:
        """Every live replica's answer to `method`, or the exception that replica raised."""
        try:
            return await self.engine.broadcast(method).results_async(
                timeout_s=_BROADCAST_TIMEOUT_S, return_exceptions=True)
        except (*_REPLICA_LOST, TimeoutError) as e:
            raise APIError(503, f"no engine replica answered: {type(e).__name__}: {e}") from None

    async def _health(self):
        replicas = [r if isinstance(r, dict) else {"replica": None, "status": _why(r)}
                    for r in await self._broadcast("health")]
        ok = sum(r["status"] == "ok" for r in replicas)
        status = "ok" if ok == len(replicas) else "degraded" if ok else "unavailable"
        return JSONResponse({"status": status, "replicas": replicas},
                            status_code=200 if ok else 503)

    async def _metrics(self, request: Request):
        check_api_key(request, self.api_key)
        labelled = [r for r in await self._broadcast("metrics") if isinstance(r, tuple)]
        labelled.append(("router", [self.metrics.rejected_family()]))
        return Response(render(merge(labelled)), media_type=CONTENT_TYPE)

    async def _forward(self, request: Request):
        """Hands the request to one replica and relays its response (see `_Relay`)."""
        body = await read_body(request, self.max_body_bytes, self.body_timeout_s)
        messages = self.engine.options(stream=True).http.remote(_forwarded(request, body))
        try:
            first = await messages.__anext__()
        except _REPLICA_LOST as e:
            raise APIError(503, f"the engine replica serving this request failed ({_why(e)}): "
                                "retry the request") from None
        except asyncio.CancelledError:      # the client went away (Ray's proxy cancels us)
            messages.cancel()
            raise
        return _Relay(first, messages, self.metrics)


class _Relay(Response):
    """Sends a replica's response on: its start, then its body messages as they arrive. A replica
    lost mid-response ends a server-sent event stream with an OpenAI error event (and any other
    body there); the client going away cancels the replica's call. Returns at the response's end,
    not when the replica's call does: an app still running after its response ended made Ray's
    proxy (2.60) close the kept-alive connection now and then, under the client's next request."""

    def __init__(self, first: list, messages, metrics):
        self.first = first              # the replica's first messages, its response's start first
        self.messages = messages
        self.metrics = metrics
        self.background = None

    async def __call__(self, scope, receive, send):
        start = self.first[0]
        sse = dict(start["headers"]).get(b"content-type", b"").startswith(b"text/event-stream")
        relaying = asyncio.ensure_future(self._relay(send, self.first, sse))
        listening = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait([relaying, listening], return_when=asyncio.FIRST_COMPLETED)
        finally:
            listening.cancel()
            if not relaying.done():
                relaying.cancel()
                self.messages.cancel()      # aborts the request on its replica
        if relaying.done() and not relaying.cancelled():
            relaying.result()               # raises what the relay raised, if anything

    async def _relay(self, send, first: list, sse: bool) -> None:
        try:
            batch = first
            while True:
                for message in batch:
                    await send(message)
                    if message["type"] == "http.response.body" and not message.get("more_body"):
                        return
                batch = await self.messages.__anext__()
        except _REPLICA_LOST as e:
            self.metrics.request_rejected(503)
            error = APIError(503, f"the engine replica serving this request failed ({_why(e)}): "
                                  "retry the request").body()
            chunk = f"data: {json.dumps(error)}\n\n".encode() if sse else b""
            await send({"type": "http.response.body", "body": chunk, "more_body": False})


async def _disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _joined(messages: list) -> list:
    """ASGI messages with each run of consecutive body parts joined into one."""
    joined = []
    for message in messages:
        if joined and message["type"] == joined[-1]["type"] == "http.response.body":
            joined[-1] = {"type": "http.response.body",
                          "body": joined[-1].get("body", b"") + message.get("body", b""),
                          "more_body": message.get("more_body", False)}
        else:
            joined.append(message)
    return joined


def _forwarded(request: Request, body: bytes) -> dict:
    """What a replica needs of a request to rebuild its ASGI scope (all of it picklable)."""
    scope = request.scope
    return {"method": scope["method"], "path": scope["path"],
            "raw_path": scope.get("raw_path") or scope["path"].encode(),
            "query_string": scope.get("query_string", b""), "headers": list(scope["headers"]),
            "client": scope.get("client"), "body": body}


def _why(error: BaseException) -> str:
    """The first line of an error, for an error body (Ray's carry whole tracebacks)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def deployment(llm_options: dict, app_options: dict, *, replicas: int = 1,
               min_replicas=None, max_replicas=None, target_ongoing_requests=None,
               num_cpus: float = 1.0, num_gpus: float = 0.0):
    """The Ray Serve application: the router in front of the engine replicas.

    replicas: a fixed count, or with min_replicas and max_replicas the initial count of an
    autoscaled deployment that aims at `target_ongoing_requests` per replica (default: half a
    replica's max_num_seqs). num_cpus, num_gpus: what Ray reserves for each engine replica (Ray
    gives a replica with num_gpus=1 its own GPU through CUDA_VISIBLE_DEVICES).
    app_options: build_app's keyword arguments (api_key, model_name, max_body_bytes, ...).
    """
    max_num_seqs = llm_options.get("max_num_seqs", 64)
    # The engine batches what a replica admits: admit twice a batch, so one waits while one runs.
    options = {"max_ongoing_requests": 2 * max_num_seqs, "logging_config": _QUIET,
               "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    if min_replicas is not None:
        target = target_ongoing_requests or max(1, max_num_seqs // 2)
        options["autoscaling_config"] = {"min_replicas": min_replicas,
                                         "max_replicas": max_replicas,
                                         "initial_replicas": replicas,
                                         "target_ongoing_requests": target}
    else:
        options["num_replicas"] = replicas
    engine = serve.deployment(EngineReplica, **options).bind(llm_options, app_options)
    router = serve.deployment(serve.ingress()(Router), num_replicas=1, max_ongoing_requests=4096,
                              logging_config=_QUIET, ray_actor_options={"num_cpus": 0})
    return router.bind(engine, app_options.get("api_key"),
                       app_options.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES),
                       app_options.get("body_timeout_s", DEFAULT_BODY_TIMEOUT_S))


def start(app, host: str = "127.0.0.1", port: int = 8000, ray_address=None, **ray_init) -> None:
    """Connects to Ray (`ray_address`, e.g. "auto" for the cluster this machine is in; None
    starts a local one), starts Serve's HTTP proxy on host:port and deploys `app`, returning
    once every replica is up."""
    if not ray.is_initialized():
        ray.init(address=ray_address, **ray_init)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")


def serve_replicas(llm_options: dict, app_options: dict, *, host: str = "127.0.0.1",
                   port: int = 8000, ray_address=None, allow_unauthenticated: bool = False,
                   **scaling) -> None:
    """`anee-fast serve --replicas N`: deploys (see `deployment`), serves until interrupted,
    then deletes the application (a cluster would otherwise keep serving it). Beyond loopback
    it needs an api_key in app_options, or allow_unauthenticated=True (check_exposure)."""
    api_key = app_options.get("api_key")
    check_exposure(host, api_key, allow_unauthenticated)
    if not api_key and not is_loopback(host):
        log.warning("serving %s:%s without an API key: anyone who can reach it can run "
                    "generations on this deployment", host, port)
    start(deployment(llm_options, app_options, **scaling), host, port, ray_address,
          include_dashboard=False)
    print(f"serving http://{host}:{port} (Ray Serve application {APP_NAME!r}); Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.delete(APP_NAME)
