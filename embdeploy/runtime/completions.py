"""`embdeploy serve` on a genai export: OpenAI-style text completions over onnxruntime-genai.

    GET  /healthz          {"status": "ok", "mode", "K", "format": "genai"}
    GET  /v1/models        the export's own table, then each tenant (swap exports, --tenant NAME=EXT_DIR)
    POST /v1/completions   {"model", "prompt": str | [str], "max_tokens": 16, "temperature": 1, "top_p": 1,
                           "seed", "stop": str | [str], "stream": false, "user"}
                           -> {"id", "object": "text_completion", "created", "model",
                               "choices": [{"text", "index", "logprobs": null, "finish_reason": "stop" | "length"}],
                               "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
                           stream=true: server-sent events, one text_completion chunk per piece of text,
                           the last with its finish_reason, then `data: [DONE]`
    GET  /metrics          Prometheus: requests, latency, generated tokens

`model` picks the tenant as it does for embeddings (runtime/tenants.py): in swap mode each
tenant is its extension's tokenizer and (K, H) rows over the one loaded genai model, fed per
generator; unknown names get 404 listing the models, a server without tenants answers any
name. Prompts are encoded with the tenant's transformers tokenizer (runtime/generate.py says
why), generation runs in worker threads, at most `max_generations` at once; a request that
cannot start within `request_timeout` seconds gets 503 with Retry-After. temperature 0 is greedy
search (what the export's gate compared with transformers); OpenAI's default, 1, samples.
Fields OpenAI defines that this server does not implement (n > 1, echo, logprobs, suffix,
best_of, logit_bias, penalties) are refused with 400 naming them, never ignored. The request
checks, API keys, metrics and access log are serve.py's.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import EmbdeployError
from .serve import (
    MODEL_SCOPE_KEY, RequestError, _Guard, _json_type, _Metrics, _starlette, checked_keys, exception_handlers,
    json_reply, model_routes, read_json_body,
)
from .session import lone_surrogate
from .tenants import Tenants, UnknownModel

COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "user",
                     "stream_options", "n", "echo", "logprobs", "suffix", "best_of", "logit_bias", "presence_penalty",
                     "frequency_penalty")
# OpenAI fields whose only value here is their default: anything else is refused, not silently ignored
_DEFAULTS_ONLY = {"n": 1, "echo": False, "logprobs": None, "suffix": None, "best_of": 1, "logit_bias": None,
                  "presence_penalty": 0, "frequency_penalty": 0}
DEFAULT_MAX_TOKENS = 16  # OpenAI's
MAX_PROMPTS = 16
MAX_STOPS = 4
MAX_GENERATIONS = 4  # generations running at once (each holds a KV cache of the request's length)
EXAMPLE = '{"model": "NAME", "prompt": "some text", "max_tokens": 16}'


@dataclass(frozen=True)
class GenaiTenant:
    """One vocabulary over the loaded genai model: its tokenizer and the tables fed to each generator.

    Looks enough like a Session for `Tenants` (path, mode, fork)."""

    generator: object  # runtime.generate.Generator: the og.Model, shared by every tenant
    tokenizer: object
    tables: dict  # swap: {graph input: (K, H) rows}; merged: {}
    K: int
    extension_fingerprint: str | None

    @classmethod
    def of(cls, onnx_dir) -> "GenaiTenant":
        from .generate import Generator

        gen = Generator(onnx_dir)
        return cls(gen, gen.tokenizer, gen.tables, gen.manifest.K, gen.manifest.extension_fingerprint)

    @property
    def path(self) -> Path:
        return self.generator.manifest.path

    @property
    def mode(self) -> str:
        return self.generator.manifest.mode

    @property
    def eos(self) -> tuple[int, ...]:
        return self.generator.interface.eos_token_ids

    def fork(self, extension) -> "GenaiTenant":
        """Tenant of extension directory `extension`: its rows (checked against this export) and its tokenizer."""
        from ..extend.model import read_manifest
        from .session import _load_tokenizer

        tables = self.generator.extension_tables(extension)  # refused unless made for this base, with this K
        m, exp = read_manifest(Path(extension)), self.generator.manifest
        tokens = tuple(t["token"] for t in m["tokens"])
        tokenizer = _load_tokenizer(Path(extension), exp.V, tokens, exp.base_tokenizer)
        return GenaiTenant(self.generator, tokenizer, tables, int(m["K"]), m["extension_fingerprint"])


def context_length(gen) -> int | None:
    from ..export.genai import GENAI_CONFIG

    value = json.loads((gen.manifest.path / GENAI_CONFIG).read_text())["model"].get("context_length")
    return int(value) if value is not None else None


class _Stops:
    """Cuts the text at the first stop string; holds back what could still become one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that can be sent after `piece`; sets `stopped` when a stop string appeared."""
        self.text += piece
        hits = [i for i in (self.text.find(s, max(0, self.sent - self.hold)) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(self.text) - self.hold if self.stops else len(self.text)
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def rest(self) -> str:
        out = "" if self.stopped else self.text[self.sent:]
        self.sent = len(self.text)
        return out


def create_completions_app(tenant: GenaiTenant, max_chars: int = 20_000, body_timeout: float = 30.0, api_keys=None,
                           tenants=None, access_log: bool = False, max_generations: int = MAX_GENERATIONS,
                           request_timeout: float = 30.0):
    """A Starlette (ASGI) app serving completions from the genai export `tenant`; see the module docstring.

    `tenants`: {name: extension dir} over a swap export, picked by the requests' `model`.
    """
    _starlette()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    if isinstance(max_generations, bool) or not isinstance(max_generations, int) or max_generations < 1:
        raise EmbdeployError(f"max_generations must be a positive integer, got {max_generations!r}")
    from prometheus_client import Counter

    metrics = _Metrics()
    generated = Counter("embdeploy_generated_tokens", "Tokens generated by /v1/completions", ["model"],
                        registry=metrics.registry)
    prompt_tokens = Counter("embdeploy_prompt_tokens", "Prompt tokens read by /v1/completions", ["model"],
                            registry=metrics.registry)
    models = Tenants(tenant)
    models.add_all(tenants or {})
    context = context_length(tenant.generator)
    slots = asyncio.Semaphore(max_generations)
    max_body = MAX_PROMPTS * max_chars * 12 + (64 << 10)
    created = {name: int(time.time()) for name in models.names()}

    reply = json_reply

    def parse(data: dict) -> dict:
        """The request's fields, checked; every problem names the field and what to send."""
        unknown = [k for k in data if k not in COMPLETION_FIELDS]
        if unknown:
            raise RequestError(422, f"unknown field(s) {', '.join(map(repr, unknown))}; allowed fields: "
                                    f"{', '.join(COMPLETION_FIELDS)}")
        unsupported = [f"{k}={json.dumps(data[k])}" for k, default in _DEFAULTS_ONLY.items()
                       if k in data and data[k] != default and not (default is None and data[k] is None)]
        if unsupported:
            raise RequestError(400, f"not supported by this server: {', '.join(unsupported)}; leave them out "
                                    "(one completion per prompt, text only)")
        if "prompt" not in data:
            raise RequestError(422, f'the field "prompt" is missing; send {EXAMPLE}')
        raw = data["prompt"]
        if isinstance(raw, list) and raw and all(isinstance(x, (int, list)) and not isinstance(x, bool) for x in raw):
            raise RequestError(422, "prompt holds token ids; this server tokenizes text itself, with the tokenizer that "
                                    "knows the new tokens (ids from another tokenizer would reach the wrong rows): "
                                    "send the text, a string or a list of strings")
        prompts = [raw] if isinstance(raw, str) else raw
        if not isinstance(prompts, list) or not prompts:
            raise RequestError(422, f"prompt must be a string or a non-empty list of strings, got a JSON {_json_type(raw)}")
        if len(prompts) > MAX_PROMPTS:
            raise RequestError(413, f"prompt has {len(prompts)} prompts, the limit is {MAX_PROMPTS} per request; split them")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise RequestError(422, f"prompt[{i}] must be a string, got a JSON {_json_type(p)}")
            if not p.strip():
                raise RequestError(422, f"prompt[{i}] is empty; send at least one non-space character")
            if len(p) > max_chars:
                raise RequestError(413, f"prompt[{i}] has {len(p)} characters, the limit is {max_chars}; shorten it")
            bad = lone_surrogate(p)
            if bad is not None:
                raise RequestError(422, f"prompt[{i}] holds a lone surrogate (U+{ord(p[bad]):04X} at character {bad}); "
                                        "send valid Unicode")
        out = {"prompts": prompts}
        n = data.get("max_tokens", DEFAULT_MAX_TOKENS)
        if n is None:
            n = DEFAULT_MAX_TOKENS
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RequestError(422, f"max_tokens must be a positive integer, got {json.dumps(n)}")
        out["max_tokens"] = n
        search = {}
        for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
            v = data.get(name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high or (name == "top_p" and v == 0):
                raise RequestError(422, f"{name} must be a number in {'(0' if name == 'top_p' else '[0'}, {high:g}], "
                                        f"got {json.dumps(v)}")
            search[name] = float(v)
        temperature = search.get("temperature", 1.0)
        if temperature == 0:
            search = {"do_sample": False}
        else:
            search = {"do_sample": True, "temperature": temperature, "top_p": search.get("top_p", 1.0)}
        seed = data.get("seed")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 31:
                raise RequestError(422, f"seed must be an integer in [0, 2^31), got {json.dumps(seed)}")
            search["random_seed"] = seed
        out["search"] = search
        stop = data.get("stop")
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
            raise RequestError(422, f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them, got "
                                    f"{json.dumps(stop)[:80]}")
        out["stops"] = stops
        stream = data.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise RequestError(422, f"stream must be true or false, got {json.dumps(stream)}")
        out["stream"] = stream
        options = data.get("stream_options")
        if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
            raise RequestError(422, 'stream_options must be {"include_usage": true|false}')
        out["include_usage"] = bool((options or {}).get("include_usage"))
        for name in ("model", "user"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise RequestError(422, f"{name} must be a string, got a JSON {_json_type(data[name])}")
        return out

    def encode(chosen: GenaiTenant, prompts: list[str], max_tokens: int) -> list[list[int]]:
        rows = []
        for i, p in enumerate(prompts):
            ids = chosen.tokenizer(p)["input_ids"]
            if context is not None and len(ids) + max_tokens > context:
                raise RequestError(400, f"prompt[{i}] has {len(ids)} tokens and max_tokens is {max_tokens}, over the "
                                        f"model's context of {context} tokens; send a shorter prompt or fewer max_tokens")
            rows.append(ids)
        return rows

    async def acquire():
        try:
            await asyncio.wait_for(slots.acquire(), timeout=request_timeout)
        except asyncio.TimeoutError:
            raise RequestError(503, f"every generation slot ({max_generations}) stayed busy for {request_timeout:g} s; "
                                    "retry later", "server_error", headers={"Retry-After": "1"}) from None

    def pick(data: dict):
        try:
            name, chosen = models.resolve(data.get("model"))
        except UnknownModel as e:
            raise RequestError(404, str(e), "model_not_found") from None
        return name, chosen, data.get("model") or name

    async def completions(request):
        data = await read_json_body(request, max_body, body_timeout, EXAMPLE)
        req = parse(data)
        name, chosen, shown = pick(data)
        request.scope[MODEL_SCOPE_KEY] = name
        if req["search"]["do_sample"]:  # OpenAI has no top-k: every column (genai_config.json's default is 50)
            m = chosen.generator.manifest
            req["search"]["top_k"] = m.V + m.K
        rows = encode(chosen, req["prompts"], req["max_tokens"])
        prompt_tokens.labels(name).inc(sum(len(r) for r in rows))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": shown}
        if req["stream"]:
            return StreamingResponse(stream(chosen, name, rows, req, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        choices, used = [], 0
        for index, ids in enumerate(rows):
            await acquire()
            try:
                text, reason, n = await run_in_threadpool(complete_text, chosen, ids, req)
            finally:
                slots.release()
            generated.labels(name).inc(n)
            used += n
            choices.append({"text": text, "index": index, "logprobs": None, "finish_reason": reason})
        prompt = sum(len(r) for r in rows)
        return reply({**head, "choices": choices,
                      "usage": {"prompt_tokens": prompt, "completion_tokens": used, "total_tokens": prompt + used}})

    def complete_text(chosen, ids, req) -> tuple[str, str, int]:
        """(text, finish reason, tokens generated) for one prompt, in a worker thread."""
        from .generate import decode_pieces

        tokens: list[int] = []
        stops, cancelled = _Stops(req["stops"]), threading.Event()
        text = []
        for piece in decode_pieces(chosen.tokenizer, _collect(chosen, ids, req, tokens, cancelled)):
            text.append(stops.feed(piece))
            if stops.stopped:
                cancelled.set()
                break
        text.append(stops.rest())
        reason = "stop" if stops.stopped or (tokens and tokens[-1] in chosen.eos) else "length"
        return "".join(text), reason, len(tokens)

    def _collect(chosen, ids, req, tokens, cancelled):
        """The generated ids, appended to `tokens` too; stops at the next token once `cancelled` is set."""
        for token in chosen.generator.generate_ids(ids, req["max_tokens"], extension=chosen.tables, **req["search"]):
            tokens.append(token)
            yield token
            if cancelled.is_set():
                return

    async def stream(chosen, name, rows, req, head):
        """Server-sent events: each piece of text as it is decoded, a last chunk per prompt with its finish reason."""
        from .generate import decode_pieces

        loop = asyncio.get_running_loop()
        used = 0

        def event(payload) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

        for index, ids in enumerate(rows):
            queue: asyncio.Queue = asyncio.Queue()
            cancelled = threading.Event()
            tokens: list[int] = []
            stops = _Stops(req["stops"])

            def work():
                try:
                    for piece in decode_pieces(chosen.tokenizer, _collect(chosen, ids, req, tokens, cancelled)):
                        loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
                        if cancelled.is_set():
                            break
                    loop.call_soon_threadsafe(queue.put_nowait, ("done", None))
                except Exception as e:  # reported in the stream: the response has started, no status can change
                    loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

            await acquire()
            try:
                thread = threading.Thread(target=work, name="embdeploy-completion", daemon=True)
                thread.start()
                try:
                    while True:
                        kind, value = await queue.get()
                        if kind == "error":
                            yield event({"error": {"message": f"generation failed ({type(value).__name__})",
                                                   "type": "server_error"}})
                            return
                        text = stops.feed(value) if kind == "piece" else stops.rest()
                        if stops.stopped:
                            cancelled.set()
                        if text:
                            yield event({**head, "choices": [{"text": text, "index": index, "logprobs": None,
                                                              "finish_reason": None}]})
                        if kind == "done" or stops.stopped:
                            break
                finally:
                    cancelled.set()  # a client that went away stops the generation at its next token
                    await asyncio.get_running_loop().run_in_executor(None, thread.join)
            finally:
                slots.release()
            reason = "stop" if stops.stopped or (tokens and tokens[-1] in chosen.eos) else "length"
            generated.labels(name).inc(len(tokens))
            used += len(tokens)
            yield event({**head, "choices": [{"text": "", "index": index, "logprobs": None, "finish_reason": reason}]})
        if req["include_usage"]:
            prompt = sum(len(r) for r in rows)
            yield event({**head, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": used,
                                                          "total_tokens": prompt + used}})
        yield "data: [DONE]\n\n"

    async def healthz(request):
        return reply({"status": "ok", "format": "genai", "mode": tenant.mode, "K": tenant.K})


    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/health", healthz, methods=["GET"]),
            *model_routes(models, created),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers=exception_handlers(
            "a genai export serves GET /healthz, GET /v1/models, POST /v1/completions, GET /metrics "
            "(embeddings routes need an ONNX export)"),
    )
    app.state.tenants = models
    app.state.metrics = metrics
    app.add_route("/metrics", metrics.endpoint, methods=["GET"])
    return _Guard(app, checked_keys(api_keys, "api_keys", "for no authentication"), metrics, (), access_log)


def genai_app(onnx_dir, providers=None, threads=None, extension=None, max_chars: int = 20_000,
              body_timeout: float = 30.0, api_keys=None, batching=None, tenants=None, admin_keys=None,
              access_log: bool = False):
    """What `embdeploy serve` runs for a genai export; the options that apply to ONNX sessions only are refused."""
    problems = []
    if providers not in (None, "cpu", ["cpu"], ("cpu",)):
        problems.append(f"--providers {providers}: genai exports are built and validated for the CPU; drop --providers")
    if threads is not None:
        problems.append("--threads: onnxruntime-genai takes its threads from genai_config.json's session_options; "
                        "drop --threads")
    if admin_keys:
        problems.append("--admin-key: the admin routes serve ONNX exports for now; list the tenants with --tenant "
                        "or --tenants-file")
    if problems:
        raise EmbdeployError("cannot serve this genai export:\n" + "\n".join(f"  - {p}" for p in problems))
    tenant = GenaiTenant.of(onnx_dir)
    if extension is not None:
        tenant = tenant.fork(extension)
    timeout = getattr(batching, "request_timeout", 30.0) if batching is not None else 30.0
    return create_completions_app(tenant, max_chars=max_chars, body_timeout=body_timeout, api_keys=api_keys,
                                  tenants=tenants, access_log=access_log, request_timeout=timeout)


__all__ = ["GenaiTenant", "create_completions_app", "genai_app"]
