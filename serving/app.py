"""The serving app: MLflow-compatible scoring, vector search, health and lineage in one small FastAPI app.

Why hand-written rather than `mlflow models serve`: the same scoring protocol (MLflow clients keep
working) at a fraction of the per-request cost, plus `/search` and `/version` beside it. Handlers
parse JSON with orjson into column lists and call the model's numpy fast path; nothing per request
builds a DataFrame unless a value needs pandas' parsing.

Endpoints:
- `POST /invocations`: `{"dataframe_split"|"dataframe_records"|"instances"|"inputs": …, "params": …}` →
  `{"predictions": [{"prediction": …}, …]}` exactly as `mlflow models serve` answers for the registered
  pyfunc (`params: {"probabilities": true}` adds `proba_<class>`); errors are `{"error_code", "message"}`.
  Parsing is strict (serving.requests): typed params and numbers, at most `max_rows` rows.
- `POST /search`: `{"query", "k", "filter"}` → `{"results": [...]}`; the filter is structured and
  compiled by us (serving.filters); concurrent queries share encoder batches (503 when no index).
- `GET /health` (and MLflow's `/ping`): 200 once the model is loaded (no token, so load balancers and
  HEALTHCHECK can call it).
- `GET /version`: the lineage of what is served; `GET /openapi.json`: the API (serving.openapi).

Headers are read one way on every route (`header`): the raw ASGI list, and a second Authorization,
Content-Type or Content-Length header is a 400 rather than first-wins on one route and last-wins on
another.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import AsyncIterator, MutableMapping
from typing import Any, Protocol

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from lifecycle.errors import LifecycleError
from serving.batching import Batcher, QueryBatcher
from serving.config import IndexRef, ServingConfig
from serving.filters import FilterError, column_kind, compile_filter
from serving.model import Served, ServingModel, load_model
from serving.requests import Problem, parse_invocation, parse_search, wants_probabilities

log = logging.getLogger("serving")

INLINE_ROWS = 256  # up to this many rows are predicted on the event loop (~0.1 ms); more go to a thread
SINGLE_HEADERS = (b"authorization", b"content-type", b"content-length")
Scope = MutableMapping[str, Any]  # an ASGI scope (Starlette's `request.scope` is typed so)


class Searcher(Protocol):
    metadata_types: dict[str, Any]

    def embed_many(self, queries: list[str]) -> Any: ...

    def search_vectors(self, vectors: Any, k: int = 5, where: str | None = None) -> list[list[dict]]: ...


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY, default=str)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def open_searcher(index: IndexRef, encoder_threads: int | None = None, precision: str = "auto") -> Searcher:
    """The LanceDB searcher of `lifecycle.search`, imported here so that model-only servers skip lancedb.

    The exact table version is preferred to the tag: a tag can be moved to a later build. The query
    encoder gets `encoder_threads` torch threads, as a text model's does (batches, not intra-op
    threads, give the throughput under load; see ServingConfig.encoder_threads), and the weights'
    `precision` (ServingConfig.search_precision, "auto" resolved for this CPU).
    """
    from lifecycle.encoder import load_encoder, query_precision
    from lifecycle.search import Searcher as LanceSearcher

    precision = query_precision(precision)
    load_encoder("cpu", encoder_threads, precision)

    version = index.version if index.version is not None else index.tag
    return LanceSearcher(index.uri, index.table, version, storage_options=index.storage_options or None,
                         distance_type=index.distance_type, query_params=index.query_params,
                         max_chars=index.max_chars, precision=precision)


def header(scope: Scope, name: bytes) -> str | None:
    """The value of a request header, the same on every route.

    Raises:
        Problem: 400 when a header that must be single (Authorization, Content-Type, Content-Length)
            comes more than once.
    """
    values = [v for k, v in scope["headers"] if k == name]
    if len(values) > 1 and name in SINGLE_HEADERS:
        raise Problem(400, f"more than one {name.decode().title()} header")
    return values[0].decode("latin-1") if values else None


async def _body_chunks(receive: Any) -> AsyncIterator[bytes]:
    """The request body from raw ASGI messages; a client that leaves mid-body is a 499 (logged once)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Problem(499, "client disconnected before the body was complete")
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body", False):
            return


def log_gone(scope: Scope) -> None:
    """One quiet line for a client that went away mid-request (no traceback, nothing to answer)."""
    log.warning("%s %s: client went away before its request body was complete (499)", scope.get("method"),
                scope.get("path"))


class Endpoints:
    """The logic every route shares, on the raw ASGI scope: token, bounded JSON, predict, search."""

    def __init__(self, model: Served, token: bytes | None, config: ServingConfig, batcher: Batcher | None,
                 searcher: Searcher | None = None) -> None:
        self.model, self.token, self.limit, self.batcher = model, token, config.max_body_bytes, batcher
        self.max_rows = config.limits.max_rows
        self.wanted = model.schema.input_columns
        self.searcher = searcher
        self.columns: dict[str, str] = {}
        self.queries: QueryBatcher | None = None
        if searcher is not None:
            kinds = {name: column_kind(t) for name, t in searcher.metadata_types.items()}
            self.columns = {name: kind for name, kind in kinds.items() if kind is not None}
            self.queries = QueryBatcher(searcher, collect_s=config.batch_collect_ms / 1000)

    def authorize(self, scope: Scope) -> None:
        authorization = header(scope, b"authorization")
        if self.token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        # compare_digest: the time taken does not reveal how much of the token matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
            raise Problem(401, "missing or invalid bearer token")

    async def read_json(self, scope: Scope, receive: Any) -> Any:
        mime = (header(scope, b"content-type") or "").split(";")[0].strip().lower()
        declared = header(scope, b"content-length")
        if mime != "application/json":
            raise Problem(415, f"Content-Type must be application/json (got {mime[:80] or 'none'!r})")
        limit = self.limit
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise Problem(413, f"request body larger than {limit} bytes")
        parts, size = [], 0
        async for chunk in _body_chunks(receive):  # also bounds chunked bodies that declare no length
            size += len(chunk)
            if size > limit:
                raise Problem(413, f"request body larger than {limit} bytes")
            parts.append(chunk)
        try:
            return orjson.loads(parts[0] if len(parts) == 1 else b"".join(parts))
        except orjson.JSONDecodeError as exc:
            raise Problem(400, f"malformed JSON: {exc}") from None

    async def invoke(self, payload: Any) -> list[dict]:
        columns, rows = parse_invocation(payload, self.wanted, self.max_rows, self.model.schema.numeric)
        proba = wants_probabilities(payload)
        model = self.model
        try:
            if self.batcher is not None:  # text: concurrent requests share encoder batches
                return await self.batcher.predict(columns, rows, proba)
            if rows <= INLINE_ROWS:
                return model.predict_columns(columns, rows, proba)
            return await run_in_threadpool(model.predict_columns, columns, rows, proba)
        except LifecycleError as exc:
            raise Problem(400, str(exc)) from None
        except Exception:
            log.exception("prediction failed")
            raise Problem(500, "prediction failed (see the server log)") from None

    async def search(self, payload: Any) -> list[dict]:
        query, k, spec = parse_search(payload)
        if self.searcher is None or self.queries is None:
            raise Problem(503, "no index: this deployment serves no vector index")
        try:
            where = compile_filter(spec, self.columns)
        except FilterError as exc:
            raise Problem(400, str(exc)) from None
        try:
            return await self.queries.search(query, k, where)
        except (LifecycleError, ValueError):  # our compiled filter should not fail; never echo Lance's text
            log.warning("search refused a compiled filter or query (k=%d)", k)
            raise Problem(400, "search failed: the index could not run this query") from None
        except Exception:
            log.exception("search failed")
            raise Problem(500, "search failed (see the server log)") from None


def _problem_body(exc: Problem) -> bytes:
    return orjson.dumps({"error_code": Problem.CODES.get(exc.status, "ERROR"), "message": exc.message})


class ServingApp:
    """The ASGI app: `POST /invocations` straight on ASGI, everything else through FastAPI.

    Why: the scoring route is the hot path. Starlette's Request, routing and exception middleware cost
    ~0.14 ms of a ~0.5 ms single-row request (measured in-process); here it parses headers from the
    ASGI scope and answers with two messages. Behaviour (errors, limits, token) is shared: `Endpoints`.
    """

    def __init__(self, api: FastAPI, endpoints: Endpoints) -> None:
        self.api, self.endpoints, self.state = api, endpoints, api.state

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/invocations" and scope["method"] == "POST":
            await self.invocations(scope, receive, send)
        else:
            await self.api(scope, receive, send)

    async def invocations(self, scope: Scope, receive: Any, send: Any) -> None:
        ep = self.endpoints
        extra: list[tuple[bytes, bytes]] = []
        try:
            ep.authorize(scope)
            payload = await ep.read_json(scope, receive)
            status, body = 200, orjson.dumps({"predictions": await ep.invoke(payload)},
                                             option=orjson.OPT_SERIALIZE_NUMPY, default=str)
        except Problem as exc:
            if exc.status == 499:
                return log_gone(scope)  # nobody to answer
            status, body = exc.status, _problem_body(exc)
            if exc.status == 401:
                extra.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                                *extra]})
        await send({"type": "http.response.body", "body": body})


def create_app(config: ServingConfig, model: Served | None = None,
               searcher: Searcher | None = None) -> ServingApp:
    """Build the app for one deployment; the model (and searcher) load here, before the port opens.

    Args:
        config: The snapshot's config (lineage, token, limits, index).
        model: A loaded model (tests); default: load `config.model_dir`.
        searcher: A search backend (`embed_many`, `search_vectors`, `metadata_types`); default: open
            `config.index` if set.

    Raises:
        LifecycleError: the model or index cannot be loaded (the server must not start half-working).
    """
    from serving.openapi import document

    if model is None:
        model = load_model(config.model_dir, encoder_threads=config.encoder_threads)  # booster or linear
    if searcher is None and config.index is not None:
        searcher = open_searcher(config.index, config.encoder_threads, config.search_precision)
    secret = config.token()
    batcher = (Batcher(model, config.batch_rows, config.batch_collect_ms / 1000)
               if isinstance(model, ServingModel) and model.needs_text else None)
    ep = Endpoints(model, secret.get_secret_value().encode() if secret else None, config, batcher, searcher)
    lineage = dict(config.lineage)
    spec = orjson.dumps(document(model.schema, config.limits.max_rows, ep.columns if searcher else None,
                                 secret is not None))

    app = FastAPI(title="lifecycle serving", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher  # batch counts, for tests and operators
    app.state.queries = ep.queries

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> Response:
        if exc.status == 499:
            log_gone(request.scope)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return Response(_problem_body(exc), exc.status, headers, media_type="application/json")

    @app.post("/invocations")  # reached only through FastAPI directly; ServingApp answers it first
    async def invocations(request: Request) -> Response:
        ep.authorize(request.scope)
        return _json({"predictions": await ep.invoke(await ep.read_json(request.scope, request.receive))})

    @app.post("/search")
    async def search(request: Request) -> Response:
        ep.authorize(request.scope)
        return _json({"results": await ep.search(await ep.read_json(request.scope, request.receive))})

    @app.get("/health")
    @app.get("/ping")  # MLflow's name for it (ScoringServerClient waits on /ping)
    async def health() -> Response:
        return _json({"status": "ok", "model_loaded": True, "search": searcher is not None})

    @app.get("/version")
    async def version(request: Request) -> Response:
        ep.authorize(request.scope)
        return _json({**lineage, "task": model.task.value, "inputs": ep.wanted, "worker_pid": os.getpid()})

    @app.get("/openapi.json")
    async def openapi(request: Request) -> Response:
        ep.authorize(request.scope)
        return Response(spec, media_type="application/json")

    return ServingApp(app, ep)
