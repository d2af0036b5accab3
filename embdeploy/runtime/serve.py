"""`embdeploy serve ONNX_DIR`: a Session behind HTTP (Starlette app, served by uvicorn).

    GET  /healthz        {"status": "ok", ...}
    GET  /v1/metadata    mode, V, K, H, outputs, tokens, fingerprints (Session.metadata); ?model=NAME
    POST /v1/encode      {"texts": [...], "output": optional name, "max_length": optional int, "model": optional}
                         -> {"model", "output", "shape", "data", "attention_mask", "K", "extension_fingerprint"}
    POST /v1/embeddings  OpenAI-style: {"input": str | [str], "model", "user": optional,
                         "encoding_format": "float" | "base64" (little-endian float32, the official client's default)}
                         -> {"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "usage"}
    POST /embed, POST /  text-embeddings-inference's: {"inputs": str | [str], "normalize": true, "truncate": false}
                         -> [[floats], ...]; GET /info, GET /health as TEI answers them
    GET  /v1/models      OpenAI's model list: the export's own table, then each tenant (runtime/tenants.py)
    PUT, DELETE /admin/tenants/NAME, GET /admin/tenants   add ({"path": EXT_DIR}), replace, remove tenants
                         while serving: admin keys only; 403 when the server has none

The `model` field picks the tenant (unknown: 404 listing the models; a server without tenants
answers any name with its one model). A genai export (`export --format genai`) is served by
runtime/completions.py instead: POST /v1/completions (OpenAI-style text completions), with the
same request checks, keys, tenants and metrics.

Every request is checked before it reaches the model; a bad one gets a 4xx
with {"error": {"message", "type"}} saying what to change: invalid JSON (also
nested too deeply, or a number of thousands of digits) 400, a Content-Type other
than application/json 415 (so a browser page cannot post a "simple" cross-site
request), wrong types, empty text, a lone surrogate, unknown fields 422, too many
texts, too long a text, too large a body or response 413 (the response's size is
known from the tokenized batch, so it is refused before the model runs), a body
that does not arrive in time 408. No client mistake is a 500 or a logged
traceback, and no message or route shows a path of the server's file system.

Connections are bounded: request headers must arrive within `header_timeout`
seconds of the connection (or of the previous response), the body within
`body_timeout`, idle keep-alive connections close after `keep_alive` seconds, and
at most `max_connections` are open at once (a slowloris of hundreds of sockets
is dropped, and /healthz keeps answering).

Each text is tokenized once, in a worker thread; the model runs in the batcher's
runner threads (runtime/batching.py), never on the event loop: concurrent requests
for pooled outputs share ONNX Runtime runs (an answer equals `session.encode` of the
request alone within the validation tolerance), per-token outputs and every request
with batching off run alone, exactly as `session.encode` runs them. The queue is
bounded: when it is full, or a request waits past `request_timeout`, the answer is a
503 with Retry-After. On SIGTERM uvicorn stops accepting connections, every request
in flight or queued is answered, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import logging
import socket
import time

from pathlib import Path

import numpy as np

from ..errors import EmbdeployError
from .batching import Batcher, BatchConfig, QueueFull, RequestTimedOut
from .session import Session, lone_surrogate
from .tenants import Tenants, UnknownModel

log = logging.getLogger(__name__)
access_log = logging.getLogger("embdeploy.access")  # JSON lines, one per request (create_app(access_log=True))

MAX_BATCH = 64
MAX_CHARS = 20_000  # per text; tokens past the model's max_length are truncated anyway
MAX_VALUES = 8_000_000  # numbers in one response (~150 MB of JSON)
_JSON_BYTES_PER_CHAR = 12  # a non-BMP character written as two \uXXXX escapes
ENCODE_FIELDS = ("texts", "output", "max_length", "model")
EMBEDDINGS_FIELDS = ("input", "model", "encoding_format", "user", "dimensions")
TEI_FIELDS = ("inputs", "normalize", "truncate", "truncation_direction", "prompt_name", "model")
HEADER_TIMEOUT = 10.0  # seconds for a request's headers to arrive
BODY_TIMEOUT = 30.0  # seconds for its body
KEEP_ALIVE = 5.0  # seconds an idle keep-alive connection stays open
MAX_CONNECTIONS = 1000  # open connections; more are closed at once


class RequestError(Exception):
    """A client error: HTTP status and a message that says what to send instead."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def _starlette():
    try:
        import starlette  # noqa: F401
    except ImportError:
        raise EmbdeployError(
            "`embdeploy serve` needs starlette and uvicorn; install them with `pip install 'embdeploy[serve]'`"
        ) from None


def create_app(
    session: Session,
    max_batch: int = MAX_BATCH,
    max_chars: int = MAX_CHARS,
    max_values: int = MAX_VALUES,
    body_timeout: float = BODY_TIMEOUT,
    api_keys=None,
    batching: BatchConfig | None = None,
    tenants=None,
    admin_keys=None,
    access_log: bool = False,
):
    """A Starlette (ASGI) app serving `session`; see the module docstring for the routes and limits.

    `tenants`: {name: extension dir} served over `session` (a swap export) beside its own table,
    picked by the requests' `model`; `admin_keys`: keys for the admin routes that add and remove
    tenants while serving (without any, those routes answer 403). `access_log`: one JSON line per
    request to the logger "embdeploy.access" (time, client, method, path, status, model, ms).

    `api_keys`: when given, every route but the health checks needs `Authorization: Bearer KEY` with
    one of them (401 otherwise). Prometheus metrics are served at GET /metrics from a registry of the
    app's own (never the process-wide default). `batching`: how requests share ONNX Runtime runs
    (BatchConfig; default: batching on, its defaults).
    """
    _starlette()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response
    from starlette.routing import Route

    for name, value in (("max_batch", max_batch), ("max_chars", max_chars), ("max_values", max_values)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EmbdeployError(f"{name} must be a positive integer, got {value!r}")
    batching = _batch_config(batching)
    if batching.max_queue < max_batch:
        raise EmbdeployError(f"max_queue ({batching.max_queue} texts) is less than max_batch ({max_batch} texts per "
                             "request): a full request could never be queued; raise --max-queue or lower --max-batch")
    max_body = max_batch * max_chars * _JSON_BYTES_PER_CHAR + (64 << 10)

    reply = json_reply

    async def read_json(request) -> dict:
        return await read_json_body(request, max_body, body_timeout)

    def check_fields(data: dict, allowed: tuple[str, ...]) -> None:
        unknown = [k for k in data if k not in allowed]
        if unknown:
            raise RequestError(422, f"unknown field(s) {', '.join(map(repr, unknown))}; allowed fields: {', '.join(allowed)}")

    def check_texts(texts, field: str) -> list[str]:
        if not isinstance(texts, list):
            raise RequestError(422, f"{field} must be a list of strings, got a JSON {_json_type(texts)}")
        if not texts:
            raise RequestError(422, f"{field} is an empty list; send at least one text")
        if len(texts) > max_batch:
            raise RequestError(413, f"{field} has {len(texts)} texts, the limit is {max_batch} per request; split the batch")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise RequestError(422, f"{field}[{i}] must be a string, got a JSON {_json_type(t)}")
            if not t.strip():
                raise RequestError(422, f"{field}[{i}] is empty; every text needs at least one non-space character")
            bad = lone_surrogate(t)
            if bad is not None:
                raise RequestError(422, f"{field}[{i}] holds a lone surrogate (U+{ord(t[bad]):04X} at character {bad}), "
                                        "which is not text; send valid Unicode (pair surrogates, or escape the bytes)")
            if len(t) > max_chars:
                raise RequestError(413, f"{field}[{i}] has {len(t)} characters, the limit is {max_chars}; shorten or split it")
        return texts

    widths = {"sentence_embedding": 1, "pooler_output": 1}
    metrics = _Metrics()
    batcher = Batcher(batching, session.metadata()["inputs"], metrics)
    chunk = batching.max_batch_texts
    models = Tenants(session)
    models.add_all(tenants or {})

    def predicted_values(output: str, rows, pinned) -> int:
        """Numbers the response will hold, from the tokenized texts (before the model runs)."""
        S = max(len(r.ids) for r in rows)
        last = (pinned.V + pinned.K) if output == "logits" else pinned.H
        return len(rows) * last * (1 if widths.get(output) else S)

    def pick(request, data: dict | None):
        """(name, Session, name to answer with) of the request's model (`model` field, or ?model= on GETs).

        The name labels the request's metrics; with a lone model the answer repeats the name sent."""
        model = data.get("model") if isinstance(data, dict) else request.query_params.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError(422, f"model must be a string, got a JSON {_json_type(model)}")
        try:
            name, chosen = models.resolve(model)
        except UnknownModel as e:
            raise RequestError(404, str(e), "model_not_found") from None
        request.scope[MODEL_SCOPE_KEY] = name
        return name, chosen, model or name

    def busy(e: Exception, status: int = 503) -> RequestError:
        retry = getattr(e, "retry_after", 1)
        return RequestError(status, str(e), "server_error", headers={"Retry-After": str(retry)})

    async def encode_with(model, texts: list[str], output: str, max_length, truncate: bool = True):
        """(values, rows, pinned session) of `output` for `texts`: tokenized once, run through the batcher.

        `model`: what pick() returned. truncate=False refuses a text over the model's length limit
        (TEI's default) instead of cutting it.
        """
        name, chosen, _ = model
        pinned = chosen.snapshot()  # the numbers and the fingerprint reported with them come from one table
        try:
            batcher.check_room(len(texts))  # refuse before any tokenizing when the queue is full
        except QueueFull as e:
            raise busy(e) from None

        def prepare():  # in a worker thread: tokenizing is CPU work too, and must not stall the event loop
            rows = pinned.tokenize_each(texts, max_length=max_length)
            n = predicted_values(output, rows, pinned)
            if n > max_values:
                raise RequestError(
                    413, f"the response would hold {n} numbers ({output} for {len(texts)} texts of up to "
                    f"{max(len(r.ids) for r in rows)} tokens), the limit is {max_values}; send fewer or shorter "
                    "texts, or pass max_length"
                )
            limit = pinned.max_length
            if not truncate and limit is not None:
                long = [(i, r.length) for i, r in enumerate(rows) if r.length > limit]
                if long:
                    i, n = long[0]
                    raise RequestError(413, f"inputs[{i}] has {n} tokens, the model takes at most {limit}; shorten "
                                            'it, or send "truncate": true')
            return rows

        with batcher.arrival() as arrival:
            try:
                rows = await run_in_threadpool(prepare)
                # one key per tenant and table: a run never mixes two tenants' texts
                values = await batcher.submit(pinned, (name, pinned.extension_fingerprint), rows, output,
                                              pooled=output in widths, arrival=arrival)
            except EmbdeployError as e:
                raise RequestError(422, _hide_paths(str(e), session)) from None
            except QueueFull as e:
                raise busy(e) from None
            except RequestTimedOut as e:
                raise busy(e, 504 if e.running else 503) from None
        if values.size > max_values:
            raise RequestError(
                413, f"the response would hold {values.size} numbers ({output} {list(values.shape)}), the limit is "
                f"{max_values}; send fewer or shorter texts, or pass max_length"
            )
        metrics.texts.inc(len(texts))
        return values, rows, pinned

    def attention_mask(pinned, rows) -> np.ndarray:
        """The mask Session.encode returns for these texts: its runs' masks, padded to the longest."""
        masks = [pinned.pad(rows[i:i + chunk])["attention_mask"] for i in range(0, len(rows), chunk)]
        S = max(m.shape[1] for m in masks)
        return np.concatenate([np.pad(m, [(0, 0), (0, S - m.shape[1])]) for m in masks], axis=0)

    async def healthz(request):
        return reply({"status": "ok", "mode": session.mode, "K": session.K})

    async def metadata(request):
        name, chosen, _ = pick(request, None)
        meta = chosen.metadata()
        meta["model"] = name
        meta["path"] = session.path.name  # never the server's file system layout
        if isinstance(meta.get("extension"), str) and meta["extension"] not in ("export",):
            meta["extension"] = Path(meta["extension"]).name
        return reply(meta)

    async def encode(request):
        data = await read_json(request)
        check_fields(data, ENCODE_FIELDS)
        if "texts" not in data:
            raise RequestError(422, 'the field "texts" is missing; send {"texts": ["some text", ...]}')
        texts = check_texts(data["texts"], "texts")
        model = pick(request, data)
        outputs = list(session.outputs)
        output = data.get("output")
        if output is None:
            output = "sentence_embedding" if "sentence_embedding" in outputs else outputs[0]
        elif not isinstance(output, str) or output not in outputs:
            raise RequestError(422, f"output must be one of {', '.join(map(repr, outputs))}, got {json.dumps(output)}")
        max_length = data.get("max_length")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise RequestError(422, f"max_length must be a positive integer, got {json.dumps(max_length)}")
        values, rows, pinned = await encode_with(model, texts, output, max_length)
        return reply({
            "model": model[2],
            "output": output,
            "shape": list(values.shape),
            "data": values.tolist(),
            "attention_mask": attention_mask(pinned, rows).tolist(),
            "K": pinned.K,
            "extension_fingerprint": pinned.metadata()["extension_fingerprint"],
        })

    async def embeddings(request):
        data = await read_json(request)
        check_fields(data, EMBEDDINGS_FIELDS)
        if "sentence_embedding" not in session.outputs:
            raise RequestError(
                400, f"this model exports no sentence_embedding (its outputs: {', '.join(session.outputs)}); "
                "use POST /v1/encode with an output name"
            )
        if "input" not in data:
            raise RequestError(422, 'the field "input" is missing; send {"input": ["some text", ...]}')
        raw = data["input"]
        if isinstance(raw, list) and raw and all(isinstance(x, int) and not isinstance(x, bool) for x in raw) or (
                isinstance(raw, list) and raw and all(isinstance(x, list) for x in raw)):
            raise RequestError(422, "input holds token ids; this server tokenizes text itself, with the tokenizer that "
                                    "knows the new tokens (ids from another tokenizer would reach the wrong rows): "
                                    "send the text, a string or a list of strings")
        texts = check_texts([raw] if isinstance(raw, str) else raw, "input")
        fmt = data.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise RequestError(422, f'encoding_format must be "float" or "base64", got {json.dumps(fmt)}')
        if "dimensions" in data:
            raise RequestError(400, f"dimensions is not supported: this model's embeddings have {session.H} dimensions "
                                    "and it was not trained to be truncated; leave dimensions out")
        for name in ("model", "user"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise RequestError(422, f"{name} must be a string, got a JSON {_json_type(data[name])}")
        model = pick(request, data)
        values, rows, _ = await encode_with(model, texts, "sentence_embedding", None)
        tokens = sum(len(r.ids) for r in rows)
        if fmt == "base64":  # little-endian float32 bytes, as the official client decodes them
            rows = [base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii") for v in values]
        else:
            rows = values.tolist()
        return reply({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
            "model": model[2],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    # ---- the routes text-embeddings-inference (TEI) clients call
    async def tei_health(request):
        return Response(status_code=200)

    async def tei_info(request):
        return reply({"model_id": session.path.name, "model_type": {"embedding": {"pooling": "embdeploy"}},
                      "model_dtype": session.metadata()["dtype"], "max_input_length": session.max_length,
                      "max_client_batch_size": max_batch, "version": f"embdeploy {_version()}",
                      "extension": {"mode": session.mode, "K": session.K}})

    async def tei_embed(request):
        data = await read_json(request)
        check_fields(data, TEI_FIELDS)
        if "sentence_embedding" not in session.outputs:
            raise RequestError(400, f"this model exports no sentence_embedding (its outputs: {', '.join(session.outputs)}); "
                                    "use POST /v1/encode with an output name")
        if "inputs" not in data:
            raise RequestError(422, 'the field "inputs" is missing; send {"inputs": "some text"} or {"inputs": [...]}')
        raw = data["inputs"]
        texts = check_texts([raw] if isinstance(raw, str) else raw, "inputs")
        model = pick(request, data)
        flags = {k: data.get(k, default) for k, default in (("normalize", True), ("truncate", False))}
        for k, v in flags.items():
            if not isinstance(v, bool):
                raise RequestError(422, f"{k} must be true or false, got {json.dumps(v)}")
        values, _, _ = await encode_with(model, texts, "sentence_embedding", None, truncate=flags["truncate"])
        values = values.astype(np.float64)
        if flags["normalize"]:
            values = values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)
        return reply(values.astype(np.float32).tolist())

    # ---- OpenAI's model list (model_routes); the admin routes that add and remove tenants while serving
    created = {name: int(time.time()) for name in models.names()}

    def tenant_info(name: str, chosen) -> dict:
        return {"model": name, "K": chosen.K, "extension_fingerprint": chosen.extension_fingerprint,
                "default": name == models.default}

    async def admin_list(request):
        return reply({"default": models.default, "models": [tenant_info(n, c) for n, c in models.items()]})

    async def admin_put(request):
        name = request.path_params["name"]
        data = await read_json(request)
        check_fields(data, ("path",))
        path = data.get("path")
        if not isinstance(path, str) or not path.strip():
            raise RequestError(422, 'send {"path": "extension directory on the server"} (a non-empty string)')
        try:
            chosen, replaced = await run_in_threadpool(models.add, name, Path(path).expanduser())
        except EmbdeployError as e:
            raise RequestError(422, _hide_paths(str(e), session)) from None
        created[name] = int(time.time())
        return reply({**tenant_info(name, chosen), "replaced": replaced}, 200 if replaced else 201)

    async def admin_delete(request):
        name = request.path_params["name"]
        try:
            models.remove(name)  # requests in flight keep the Session they resolved, and finish on it
        except UnknownModel as e:
            raise RequestError(404, str(e), "model_not_found") from None
        except EmbdeployError as e:
            raise RequestError(409, str(e)) from None
        return reply({"model": name, "removed": True})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(batcher.close)  # uvicorn has answered every request by now: nothing is dropped

    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/v1/metadata", metadata, methods=["GET"]),
            Route("/v1/encode", encode, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/embed", tei_embed, methods=["POST"]),
            Route("/", tei_embed, methods=["POST"]),  # TEI serves its embed route at the root too
            Route("/info", tei_info, methods=["GET"]),
            Route("/health", tei_health, methods=["GET"]),
            *model_routes(models, created),
            Route("/admin/tenants", admin_list, methods=["GET"]),
            Route("/admin/tenants/{name}", admin_put, methods=["PUT"]),
            Route("/admin/tenants/{name}", admin_delete, methods=["DELETE"]),
        ],
        exception_handlers=exception_handlers(
            "routes: GET /healthz, GET /v1/metadata, POST /v1/encode, POST /v1/embeddings, GET /v1/models, "
            "POST /embed, GET /info, GET /health, GET /admin/tenants, PUT and DELETE /admin/tenants/NAME"),
    )
    app.state.session = session
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.tenants = models
    app.add_route("/metrics", metrics.endpoint, methods=["GET"])
    keys = checked_keys(api_keys, "api_keys", "for no authentication")
    admins = checked_keys(admin_keys, "admin_keys", "to keep the admin routes off")
    return _Guard(app, keys, metrics, admins, access_log)


def json_reply(payload, status: int = 200, headers=None):
    """A JSON response; a payload holding NaN or Inf becomes a 500 that says so (JSON cannot carry them)."""
    from starlette.responses import Response

    try:
        body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        payload = {"error": {"message": "the model returned NaN or Inf for this input", "type": "server_error"}}
        status, body = 500, json.dumps(payload)
    response = Response(body, status_code=status, media_type="application/json")
    response.headers.update(headers or {})
    return response


def error_reply(status: int, message: str, kind: str, headers=None):
    return json_reply({"error": {"message": message, "type": kind}}, status, headers)


def exception_handlers(routes: str) -> dict:
    """Starlette's exception handlers of both apps: errors in OpenAI's shape; a 404 lists `routes`."""
    from starlette.exceptions import HTTPException

    async def on_request_error(request, exc: RequestError):
        return error_reply(exc.status, exc.message, exc.kind, exc.headers)

    async def on_http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            message = f"no route {request.url.path}; {routes}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_reply(exc.status_code, message, "invalid_request_error")

    async def on_crash(request, exc: Exception):
        log.exception("request to %s failed", request.url.path)
        return error_reply(500, f"internal error ({type(exc).__name__}); the server keeps running, see its log",
                           "server_error")

    return {RequestError: on_request_error, HTTPException: on_http_error, Exception: on_crash}


def model_routes(models: Tenants, created: dict) -> list:
    """GET /v1/models and /v1/models/{model} in OpenAI's format; `created`: {name: unix time}, kept by the app."""
    from starlette.routing import Route

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created.get(name, 0), "owned_by": "embdeploy"}

    async def list_models(request):
        return json_reply({"object": "list", "data": [card(name) for name in models.names()]})

    async def get_model(request):
        name = request.path_params["model"]
        if name not in models.names():
            raise RequestError(404, f"unknown model {name!r}; this server has: {', '.join(models.names())}",
                               "model_not_found")
        return json_reply(card(name))

    return [Route("/v1/models", list_models, methods=["GET"]), Route("/v1/models/{model}", get_model, methods=["GET"])]


def checked_keys(keys, what: str, without: str) -> list[str]:
    """The non-empty keys of `keys`; an empty list given on purpose is refused (it would lock everyone out)."""
    given = [k for k in (keys or []) if k]
    if keys is not None and not given:
        raise EmbdeployError(f"{what} is empty; pass at least one non-empty key, or None {without}")
    return given


async def read_json_body(request, max_body: int, body_timeout: float, example: str = '{"texts": ["some text"]}') -> dict:
    """The request's JSON object, or a RequestError saying what to send instead (type, size, time, syntax);
    `example` is the body the messages show."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise RequestError(415, f"Content-Type must be application/json, got {ctype[:60]!r}; send the JSON body "
                                "with the header Content-Type: application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise RequestError(413, f"the request body has {declared} bytes, the limit is {max_body}; send fewer or shorter texts")
    body = bytearray()

    async def collect():
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_body:
                raise RequestError(413, f"the request body is over the limit of {max_body} bytes; send fewer or shorter texts")

    try:
        await asyncio.wait_for(collect(), timeout=body_timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {body_timeout:g} s; send it at once") from None
    if not body:
        raise RequestError(400, f"the request has no body; send JSON like {example}")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError(400, "the request body is not UTF-8 text; send UTF-8 encoded JSON") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise RequestError(400, f"the request body is JSON nested too deeply; send a flat object like {example}") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise RequestError(400, f"the request body holds a value that cannot be read ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"the request body must be a JSON object like {example}, got a JSON {_json_type(data)}")
    return data


OPEN_ROUTES = ("/health", "/healthz")  # load balancers probe these without a key
MODEL_SCOPE_KEY = "embdeploy.model"  # the handler's chosen model, read back by _Guard for the metrics label


class _Metrics:
    """Prometheus metrics (prometheus-client) of one app, in a registry of its own."""

    def __init__(self):
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            raise EmbdeployError("`embdeploy serve` needs prometheus-client for its metrics; install it with "
                                 "`pip install 'embdeploy[serve]'`") from None
        import os

        # Under `--workers N` (runtime/workers.py) every process writes its values to files in this
        # directory and /metrics reads them all: the registry here only names the metrics then.
        self.shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        live = {"multiprocess_mode": "livesum"} if self.shared_dir else {}
        self.registry = CollectorRegistry()
        self.requests = Counter("embdeploy_requests", "HTTP requests by route, status and model (tenant)",
                                ["route", "status", "model"], registry=self.registry)
        self.seconds = Histogram("embdeploy_request_seconds", "Request latency by route, seconds", ["route"],
                                 registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.in_flight = Gauge("embdeploy_requests_in_flight", "Requests being handled", registry=self.registry,
                               **live)
        self.texts = Counter("embdeploy_texts", "Texts encoded", registry=self.registry)
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256)
        self.batch_texts = Histogram("embdeploy_batch_texts", "Texts per ONNX Runtime run", registry=self.registry,
                                     buckets=sizes)
        self.batch_requests = Histogram("embdeploy_batch_requests", "Requests sharing one ONNX Runtime run",
                                        registry=self.registry, buckets=sizes)
        self.queue = Gauge("embdeploy_queue_texts", "Texts waiting for a run", registry=self.registry, **live)
        self.tokens = Counter("embdeploy_tokens", "Tokens run through the model, padding excluded",
                              registry=self.registry)
        self.padding = Counter("embdeploy_padding_tokens", "Padding positions run through the model",
                               registry=self.registry)

    def batch(self, texts: int, requests: int, tokens: int, padded: int) -> None:
        """One ONNX Runtime run of `texts` texts from `requests` requests, `padded` = texts x longest positions."""
        self.batch_texts.observe(texts)
        self.batch_requests.observe(requests)
        self.tokens.inc(tokens)
        self.padding.inc(padded - tokens)

    def queued(self, texts: int) -> None:
        self.queue.set(texts)

    async def endpoint(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        registry = self.registry
        if self.shared_dir:
            from prometheus_client import CollectorRegistry, multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.shared_dir)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class _Guard:
    """ASGI wrapper: API keys and admin keys (constant-time comparison) and request metrics around the app.

    The admin routes (/admin/...) take admin keys only, and answer 403 when the server has none."""

    def __init__(self, app, keys: list[str], metrics: _Metrics, admin_keys=(), access_log: bool = False):
        self.app, self.keys, self.metrics = app, [k.encode() for k in keys], metrics
        self.admin_keys = [k.encode() for k in admin_keys]
        self.access_log = access_log
        self.state = app.state

    def _done(self, scope, route: str, status: int, seconds: float) -> None:
        model = scope.get(MODEL_SCOPE_KEY, "")
        self.metrics.requests.labels(route, str(status), model).inc()
        if self.access_log:
            client, now = scope.get("client") or ("", 0), time.time()
            access_log.info(json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
                "client": client[0], "method": scope.get("method", ""), "path": scope.get("path", ""),
                "status": status, "model": model or None, "ms": round(seconds * 1000, 3)}, ensure_ascii=False))

    @staticmethod
    async def _refuse(send, status: int, message: str, kind: str) -> None:
        headers = [(b"content-type", b"application/json")] + ([(b"www-authenticate", b"Bearer")] if status == 401 else [])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps({"error": {"message": message, "type": kind}}).encode()})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import hmac

        path = scope.get("path", "")
        route = _route_label(path)
        t = time.perf_counter()
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if path == "/admin" or path.startswith("/admin/"):
            if not self.admin_keys:
                self._done(scope, route, 403, time.perf_counter() - t)
                return await self._refuse(send, 403, "the admin routes are off: start the server with --admin-key KEY "
                                          "(or $EMBDEPLOY_ADMIN_KEYS) to add and remove tenants while serving",
                                          "permission_error")
            if not any(hmac.compare_digest(given, k) for k in self.admin_keys):
                self._done(scope, route, 401, time.perf_counter() - t)
                return await self._refuse(send, 401, "missing or wrong admin key; send the header "
                                          "Authorization: Bearer ADMIN_KEY (API keys do not open the admin routes)",
                                          "authentication_error")
        elif self.keys and path not in OPEN_ROUTES:
            if not any(hmac.compare_digest(given, k) for k in self.keys):
                self._done(scope, route, 401, time.perf_counter() - t)
                return await self._refuse(send, 401, "missing or wrong API key; send the header "
                                          "Authorization: Bearer KEY", "authentication_error")
        status = {"code": 500}

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_count)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - t
            self.metrics.seconds.labels(route).observe(elapsed)
            self._done(scope, route, status["code"], elapsed)


_KNOWN_ROUTES = ("/healthz", "/v1/metadata", "/v1/encode", "/v1/embeddings", "/embed", "/", "/info", "/health",
                 "/metrics", "/v1/models", "/admin/tenants", "/v1/completions")


def _route_label(path: str) -> str:
    """The route as a metrics label: bounded values (a tenant's or model's name is not part of it)."""
    for prefix in ("/v1/models/", "/admin/tenants/"):
        if path.startswith(prefix):
            return prefix[:-1]
    return path if path in _KNOWN_ROUTES else "other"


def _batch_config(batching) -> BatchConfig:
    """A BatchConfig from None (the defaults), a BatchConfig, or a dict of its fields."""
    if batching is None:
        return BatchConfig()
    if isinstance(batching, BatchConfig):
        return batching
    if isinstance(batching, dict):
        from dataclasses import fields

        known = [f.name for f in fields(BatchConfig)]
        unknown = [k for k in batching if k not in known]
        if unknown:
            raise EmbdeployError(f"unknown batching option(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        return BatchConfig(**batching)
    raise EmbdeployError(f"batching must be a BatchConfig, a dict of its fields or None, got {type(batching).__name__}")


@contextlib.contextmanager
def _json_lines_to_stderr(enabled: bool):
    """While serving: the access logger's lines, bare, on stderr (uvicorn configures only its own loggers)."""
    if not enabled:
        yield
        return
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = (access_log.level, access_log.propagate)
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    try:
        yield
    finally:
        access_log.removeHandler(handler)
        access_log.setLevel(previous[0])
        access_log.propagate = previous[1]


@contextlib.contextmanager
def _sigterm_is_a_clean_exit():
    """uvicorn drains on SIGTERM, then raises the signal again with the handler it found: Python's
    default would kill the drained process by the signal (exit -15); a no-op handler lets it return."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_genai(onnx_dir) -> bool:
    """Whether `onnx_dir` is an `export --format genai` directory (served by runtime/completions.py)."""
    from ..export.manifest import ExportManifest

    try:
        return ExportManifest.read(onnx_dir).format == "genai"
    except EmbdeployError:
        return False  # Session reports what is wrong with the directory


def _version() -> str:
    from .. import __version__

    return __version__


def _hide_paths(message: str, session) -> str:
    """A session's error message as a client may see it: the export's absolute path becomes its name."""
    for p in sorted({str(session.path), str(session.path.resolve())}, key=len, reverse=True):
        message = message.replace(p, session.path.name)
    return message


def guarded_protocol(header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS):
    """uvicorn's h11 protocol with a deadline for request headers and a cap on open connections.

    uvicorn times out idle keep-alive connections, but not a connection that never completes its
    headers (slowloris): this closes such a connection `header_timeout` seconds after it opened
    (or after its last response), and closes new connections beyond `max_connections` at once.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            if len(self.connections) >= max_connections:
                transport.close()
                self.transport = transport
                self._refused = True
                return
            self._refused = False
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            if getattr(self, "_refused", False):
                return
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if getattr(self, "_refused", False):
                return
            super().data_received(data)
            waiting = self.cycle is None or self.cycle.response_complete
            if not waiting:
                self._disarm()  # headers are in: the body has the app's own deadline
            elif self._header_timer is None:
                self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()

        def _arm(self):
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self):
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before the server starts, so a taken port is a clear error (not uvicorn's exit 3)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise EmbdeployError(f"cannot bind {host}:{port}: {e.strerror}; pass --host 127.0.0.1 or an address of this machine") from None
    family, _, proto, _, addr = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it a response's body waits ~40 ms behind its headers (Nagle's algorithm and delayed ACKs)
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise EmbdeployError(f"port {port} on {host} is already in use (another server?); pass another --port, "
                                 "or stop what listens there") from None
        raise EmbdeployError(f"cannot bind {host}:{port}: {e.strerror}; pass another --host or --port") from None
    return sock


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def serve(
    onnx_dir,
    host: str = "127.0.0.1",
    port: int = 8000,
    providers=None,
    threads: int | None = None,
    extension=None,
    max_batch: int = MAX_BATCH,
    max_chars: int = MAX_CHARS,
    log_level: str = "info",
    access_log: bool = False,
    header_timeout: float = HEADER_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    keep_alive: float = KEEP_ALIVE,
    max_connections: int = MAX_CONNECTIONS,
    api_keys=None,
    batching: BatchConfig | None = None,
    tenants=None,
    admin_keys=None,
    json_access_log: bool = False,
    workers: int = 1,
) -> None:
    """Open a Session on `onnx_dir` and serve it with uvicorn until interrupted (Ctrl-C / SIGTERM).

    `batching`: a BatchConfig (or a dict of its fields); SIGTERM drains every request, then returns.
    `tenants`: {name: extension dir} over a swap export (runtime/tenants.py); `admin_keys`: keys for
    the admin routes that add and remove tenants while serving. `json_access_log`: one JSON line per
    request on stderr (uvicorn's own text access log is `access_log`). `workers`: processes serving
    the one port, each with its own Session (runtime/workers.py).
    """
    _starlette()
    try:
        import uvicorn
    except ImportError:
        raise EmbdeployError(
            "`embdeploy serve` needs uvicorn; install it with `pip install 'embdeploy[serve]'`"
        ) from None
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise EmbdeployError(f"port must be an integer in 0..65535, got {port!r}")
    for name, value in (("header_timeout", header_timeout), ("body_timeout", body_timeout), ("keep_alive", keep_alive),
                        ("max_connections", max_connections)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise EmbdeployError(f"{name} must be a positive number, got {value!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise EmbdeployError(f"workers must be a positive integer, got {workers!r}")
    if workers > 1 and admin_keys:
        raise EmbdeployError(f"the admin routes need a single worker (got workers={workers}): a tenant added through "
                             "one worker would exist in that worker only. Drop --admin-key, or serve with --workers 1 "
                             "and list the tenants with --tenant / --tenants-file")
    options = dict(onnx_dir=onnx_dir, host=host, port=port, providers=providers, threads=threads,
                   extension=extension, max_batch=max_batch, max_chars=max_chars, log_level=log_level,
                   access_log=access_log, header_timeout=header_timeout, body_timeout=body_timeout,
                   keep_alive=keep_alive, max_connections=max_connections, api_keys=api_keys,
                   batching=_batch_config(batching), tenants=tenants, admin_keys=admin_keys,
                   json_access_log=json_access_log)
    if workers == 1:
        _serve_on(None, **options)
        return
    from .workers import run_workers

    run_workers(workers, bind_socket(host, port), options)


def _serve_on(sock, onnx_dir, host, port, providers, threads, extension, max_batch, max_chars, log_level, access_log,
              header_timeout, body_timeout, keep_alive, max_connections, api_keys, batching, tenants, admin_keys,
              json_access_log) -> None:
    """One server process: Session, app, uvicorn on `sock` (None: bind host:port once the app is built)."""
    import uvicorn

    if _is_genai(onnx_dir):
        from .completions import genai_app

        app = genai_app(onnx_dir, providers=providers, threads=threads, extension=extension, max_chars=max_chars,
                        body_timeout=body_timeout, api_keys=api_keys, batching=batching, tenants=tenants,
                        admin_keys=admin_keys, access_log=json_access_log)
    else:
        session = Session(onnx_dir, providers=providers, threads=threads, extension=extension)
        app = create_app(session, max_batch=max_batch, max_chars=max_chars, body_timeout=body_timeout,
                         api_keys=api_keys, batching=batching, tenants=tenants, admin_keys=admin_keys,
                         access_log=json_access_log)
    sock = sock if sock is not None else bind_socket(host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            http=guarded_protocol(header_timeout, int(max_connections)), timeout_keep_alive=keep_alive)
    with _sigterm_is_a_clean_exit(), _json_lines_to_stderr(json_access_log):
        uvicorn.Server(config).run(sockets=[sock])


__all__ = ["create_app", "serve", "RequestError", "BatchConfig", "MAX_BATCH", "MAX_CHARS", "MAX_VALUES"]
