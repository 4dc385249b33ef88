"""The ingress: one OpenAI-style HTTP API in front of every model, version and site of a service.

    POST /v1/completions   text completion (sampling, stop, logprobs, n, echo; SSE streaming)
    POST /v1/embeddings    embeddings (float or base64)
    GET  /v1/models        models, their versions, traffic weights, sites, replicas, and the
                           quantized-vs-fp32 accuracy each replica measured when it was built
    GET  /healthz          200 when every model has a running replica somewhere, else 503
    GET  /openapi.json     the schema (/docs renders it)

Everything it routes by (models, versions and weights, sites, limits, token digests) arrives
as the deployment's ``user_config``, so shifting traffic or rotating a token reconfigures the
running replicas in place. Bad input is a 4xx with an OpenAI-style error body; the only 5xx
are 503 (no site can take the request now: ``Retry-After``) and 504 (the deadline passed).
"""

import asyncio
import base64
import json
import logging
import random
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybridray import labels as L
from hybridray.serve import protocol as P
from hybridray.serve.gate import Gate, GatePolicy
from hybridray.serve.routing import ModelRoutes, Route, RoutingTable, SiteHealth

log = logging.getLogger("ray.serve")

SITE_HEADER = "x-hybridray-site"
VERSION_HEADER = "x-hybridray-version"
# Errors that mean "this site cannot answer now", not "this request is bad": try the next.
SITE_DOWN = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)
POLL_S = 1.0
INFO_TTL_S = 30.0


class HTTPError(Exception):
    """Raised in a handler, answered as an OpenAI-style error."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = \
            status, message, type_, code, param
        self.headers = headers or {}


def _error(status: int, message: str, type_: str = "invalid_request_error",
           code: str | None = None, param: str | None = None,
           headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


_CURRENT: dict[str, GatePolicy | None] = {"policy": None}

app = FastAPI(
    title="hybridray serve",
    description="OpenAI-compatible completions and embeddings, served per site by Ray Serve.",
    version="1",
)
app.add_middleware(Gate, policy=lambda: _CURRENT["policy"])


@app.exception_handler(HTTPError)
async def _http_error(_request: Request, exc: HTTPError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)


@app.exception_handler(RequestValidationError)
async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        return _error(400, f"the body is not valid JSON: {e.get('ctx', {}).get('error', '')}"
                      .rstrip(": "), code="invalid_json")
    parts, first, unions = [], None, {}
    for e in errors:
        names = [str(x) for x in e.get("loc", ()) if x != "body"]
        kinds = [n for n in names if "[" in n or n.startswith("constrained-") or
                 n in ("str", "int", "float", "bool", "list", "dict")]
        loc = ".".join(n for n in names if n not in kinds) or "body"
        first = first or loc
        if kinds:   # one failure per member of a union type: say it once, per field
            unions.setdefault(loc, []).append(kinds[0].replace("constrained-", ""))
            continue
        parts.append(f"{loc}: {e.get('msg')}")
    for loc, kinds in unions.items():
        parts.append(f"{loc}: has the wrong type (accepted: {', '.join(dict.fromkeys(kinds))})")
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
              for e in errors]
    return _error(422, "; ".join(parts[:10]), code="invalid_value", param=first, detail=detail)


@app.exception_handler(StarletteHTTPException)
async def _starlette(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), code="not_found"
                  if exc.status_code == 404 else None, headers=getattr(exc, "headers", None))


async def _assigned(response) -> None:
    """Wait until Serve has assigned ``response`` to a replica (not for its result).

    Uses the response's private future: Ray 2.60 has no public "assigned" signal, and its
    public ``choose_replica``/``dispatch`` pair rejects reservations made across loops.
    """
    await response._fetch_future_result_async()


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _err_args(error: dict[str, Any]) -> dict[str, Any]:
    return {"message": error["message"], "type_": error.get("type", "invalid_request_error"),
            "code": error.get("code"), "param": error.get("param")}


@serve.deployment(name="Ingress", max_ongoing_requests=256, health_check_period_s=5)
@serve.ingress(app)
class Ingress:
    """Auth, limits, and site- and version-aware routing to the replica deployments."""

    def __init__(self, service: str, handles: dict[str, Any] | None = None):
        import ray

        from hybridray.serve.metrics import metrics

        self.service = service
        self.bound = dict(handles or {})        # deployment name -> handle (one-app mode)
        self.handles: dict[tuple[str, str], Any] = {}
        self.site = (ray.get_runtime_context().get_node_labels() or {}).get(L.SITE)
        self.app_name = serve.get_replica_context().app_name
        self.table = RoutingTable({})
        self.health = SiteHealth()
        self.rng = random.Random()
        self.metrics = metrics()
        self.config: dict[str, Any] = {}
        self.limits: dict[str, Any] = {}
        self.info: dict[tuple[str, str], tuple[float, dict | None]] = {}
        self.poller: asyncio.Task | None = None

    # -- configuration --------------------------------------------------------------------
    def reconfigure(self, config: dict[str, Any]) -> None:
        for m in config.get("models", {}).values():      # resolve "this application"
            for v in m["versions"].values():
                for spec in v["sites"].values():
                    spec["app"] = spec.get("app") or self.app_name
        self.config = config
        self.table = RoutingTable.from_config(config)
        self.limits = config["limits"]
        ing = config["ingress"]
        self.health.suspect_s = ing["suspect_s"]
        auth, rate = config["auth"], self.limits.get("rate_limit")
        _CURRENT["policy"] = GatePolicy(
            auth=auth["enabled"], digests=frozenset(auth["digests"]),
            public_paths=tuple(auth["public_paths"]),
            max_body_bytes=self.limits["max_body_bytes"],
            rate=rate["requests_per_s"] if rate else None, burst=rate["burst"] if rate else 0,
            retry_after_s=ing["retry_after_s"], on_reject=self._rejected)

    def generation(self) -> str | None:
        """The routing table this replica applied (``deploy`` waits for it on every one)."""
        return self.config.get("generation")

    def _rejected(self, route: str, reason: str) -> None:
        self.metrics.rejected.inc(tags={"service": self.service, "route": route,
                                        "reason": reason})

    # -- health ---------------------------------------------------------------------------
    def _ensure_poller(self) -> None:
        if self.poller is None or self.poller.done():
            self.poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                running = {}
                for app_name, app_status in status.applications.items():
                    for dep, d in app_status.deployments.items():
                        running[(app_name, dep)] = int(d.replica_states.get("RUNNING", 0))
                self.health.update(running)
                for model in self.table.models.values():
                    for routes in model.routes.values():
                        for r in routes:
                            self.metrics.replicas.set(
                                running.get((r.app, r.deployment), 0),
                                tags={"service": self.service, "model": r.model,
                                      "version": r.version, "site": r.site})
            except Exception as e:  # the controller may be restarting; keep the last view
                log.warning("hybridray ingress: cannot read Serve status: %s", e)
            await asyncio.sleep(POLL_S)

    async def check_health(self) -> None:
        self._ensure_poller()

    # -- routing ----------------------------------------------------------------------------
    def _handle(self, route: Route):
        key = (route.app, route.deployment)
        handle = self.handles.get(key)
        if handle is None:
            handle = self.bound.get(route.deployment) if route.app == self.app_name else None
            if handle is None:
                handle = serve.get_deployment_handle(route.deployment, app_name=route.app)
            self.handles[key] = handle
        return handle

    def _model(self, name: str, kind: str, request: Request) -> tuple[ModelRoutes, str]:
        base, _, pinned = name.partition("@")
        pinned = pinned or request.headers.get(VERSION_HEADER) or None
        model = self.table.models.get(base)
        if model is None:
            known = ", ".join(sorted(self.table.models)) or "none"
            raise HTTPError(404, f"model {base!r} does not exist here (models: {known})",
                            code="model_not_found", param="model")
        if model.kind != kind:
            route = "/v1/embeddings" if model.kind == "embedding" else "/v1/completions"
            raise HTTPError(400, f"model {base!r} serves {model.kind}s; use {route}",
                            code="wrong_model_kind", param="model")
        version = model.pick_version(self.rng, pinned)
        if version is None:
            if pinned:
                raise HTTPError(404, f"model {base!r} has no version {pinned!r} (versions: "
                                f"{', '.join(model.routes)})", code="version_not_found",
                                param="model")
            raise self._unavailable(f"model {base!r} has no version taking traffic")
        return model, version

    def _caller(self, request: Request) -> str | None:
        site = request.headers.get(SITE_HEADER)
        if site is None:
            return self.site
        if site not in self.table.sites:
            raise HTTPError(400, f"{SITE_HEADER}: unknown site {site!r} (sites: "
                            f"{', '.join(self.table.sites)})", code="unknown_site")
        return site

    def _unavailable(self, why: str) -> HTTPError:
        retry = self.config.get("ingress", {}).get("retry_after_s", 1.0)
        return HTTPError(503, f"{why}; retry later", type_="server_error",
                         code="unavailable", headers={"Retry-After": str(max(1, round(retry)))})

    def _deadline(self) -> float:
        return time.monotonic() + float(self.limits["request_timeout_s"])

    async def _call(self, model: ModelRoutes, version: str, method: str, args: tuple,
                    caller: str | None, deadline: float, *, stream: bool = False):
        """Call ``method`` at the best site, failing over; returns (result, route).

        First pass: each site in order gets ``assign_timeout_s`` to take the request. A site
        whose replicas are busy (or that is gone but not yet known to be) is passed over.
        Second pass, when every site only timed out: wait, until the deadline, at the best of
        them that was healthy before this request, i.e. queue where capacity should free up.

        For ``stream``, the result is ``(first chunk, generator)``. Raises ``HTTPError`` 503
        when no site can take it, 504 when the deadline passes.
        """
        self._ensure_poller()
        assign_s = float(self.config["ingress"]["assign_timeout_s"])
        routes = self.health.order(self.table, model.routes[version], caller)
        healthy_before = {r: self.health.rank(r) == 0 for r in routes}
        tried: list[str] = []
        waiting: list[Route] = []
        for route in routes:
            outcome = await self._attempt(route, method, args, stream, deadline, assign_s)
            if isinstance(outcome, str):
                tried.append(f"{route.site}: {outcome}")
                if outcome.startswith("no replica free"):
                    waiting.append(route)
                continue
            return self._answered(outcome, route, routes, tried)
        queue_at = [r for r in waiting if healthy_before[r]]
        if queue_at and time.monotonic() < deadline:
            route = queue_at[0]
            outcome = await self._attempt(route, method, args, stream, deadline, None)
            if not isinstance(outcome, str):
                return self._answered(outcome, route, routes, tried)
            tried.append(f"{route.site}: {outcome}")
        if time.monotonic() >= deadline:
            raise HTTPError(504, f"no answer within limits.request_timeout_s="
                            f"{self.limits['request_timeout_s']}s", type_="server_error",
                            code="timeout")
        raise self._unavailable("no site could take the request (" + "; ".join(tried) + ")")

    async def _attempt(self, route: Route, method: str, args: tuple, stream: bool,
                       deadline: float, assign_s: float | None):
        """One site: the result (``(first, generator)`` for streams), or why not (a str)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "deadline passed"
        handle = self._handle(route).options(method_name=method, stream=stream)
        response = handle.remote(*args)
        assigned = False
        try:
            await asyncio.wait_for(_assigned(response),
                                   remaining if assign_s is None else min(assign_s, remaining))
            assigned = True
            if stream:
                first = await asyncio.wait_for(response.__anext__(), deadline - time.monotonic())
                return (first, response)
            return await asyncio.wait_for(response, deadline - time.monotonic())
        except asyncio.TimeoutError:
            response.cancel()
            if assigned:
                raise HTTPError(504, f"no answer within limits.request_timeout_s="
                                f"{self.limits['request_timeout_s']}s", type_="server_error",
                                code="timeout") from None
            self.health.suspect(route)
            return f"no replica free within {assign_s or remaining:.3g}s"
        except BackPressureError:
            return "queue full"
        except SITE_DOWN as e:
            self.health.suspect(route)
            return type(e).__name__

    def _answered(self, result, route: Route, routes: list[Route], tried: list[str]):
        self.health.clear(route)
        if tried:
            self.metrics.failovers.inc(tags={
                "service": self.service, "model": route.model, "from_site": routes[0].site,
                "to_site": route.site, "reason": tried[0].split(": ", 1)[1][:40]})
        return result, route

    def _done(self, route_name: str, model: str, route: Route | None, version: str | None,
              status: int, started: float) -> None:
        site = route.site if route else "none"
        self.metrics.requests.inc(tags={"service": self.service, "route": route_name,
                                        "model": model, "version": version or "none",
                                        "site": site, "status": str(status)})
        self.metrics.latency.observe((time.perf_counter() - started) * 1000,
                                     tags={"service": self.service, "route": route_name,
                                           "model": model, "site": site})

    @staticmethod
    def _headers(route: Route, site: str | None = None) -> dict[str, str]:
        """Where the answer came from: the replica's own site (its node's label)."""
        return {SITE_HEADER: site or route.site, VERSION_HEADER: route.version}

    # -- routes ---------------------------------------------------------------------------
    @app.post("/v1/embeddings", response_model=P.EmbeddingList,
              responses={400: {"model": P.ErrorResponse}, 401: {"model": P.ErrorResponse},
                         404: {"model": P.ErrorResponse}, 413: {"model": P.ErrorResponse},
                         422: {"model": P.ErrorResponse}, 503: {"model": P.ErrorResponse}})
    async def embeddings(self, body: P.EmbeddingRequest, request: Request):
        started = time.perf_counter()
        model, version = self._model(body.model, "embedding", request)
        texts = self._texts(body.input)
        deadline = self._deadline()
        route = None
        try:
            result, route = await self._call(model, version, "embed", (texts, body.dimensions),
                                             self._caller(request), deadline)
        except HTTPError as e:
            self._done("/v1/embeddings", model.name, route, version, e.status, started)
            raise
        if "error" in result:
            self._done("/v1/embeddings", model.name, route, version, result["status"], started)
            return _error(result["status"], **_err_args(result["error"]))
        vectors = result["vectors"]
        if body.encoding_format == "base64":
            data = [P.EmbeddingItem(index=i, embedding=base64.b64encode(
                v.astype("<f4").tobytes()).decode()) for i, v in enumerate(vectors)]
        else:
            data = [P.EmbeddingItem(index=i, embedding=v.tolist()) for i, v in enumerate(vectors)]
        out = P.EmbeddingList(data=data, model=body.model, usage=P.Usage(
            prompt_tokens=result["tokens"], total_tokens=result["tokens"]))
        self._done("/v1/embeddings", model.name, route, version, 200, started)
        return JSONResponse(out.model_dump(), headers=self._headers(route, result.get("site")))

    def _texts(self, value) -> list[str]:
        lim = self.limits
        if isinstance(value, str):
            texts = [value]
        elif value and isinstance(value[0], (int, list)):
            raise HTTPError(400, "token-id input is not supported by this embedding model; "
                                 "send text", code="unsupported_input", param="input")
        else:
            texts = list(value)
        if not texts:
            raise HTTPError(400, "input must not be empty", code="empty_input", param="input")
        if len(texts) > lim["max_inputs"]:
            raise HTTPError(400, f"{len(texts)} inputs; at most {lim['max_inputs']} per request "
                                 "(limits.max_inputs)", code="too_many_inputs", param="input")
        for i, t in enumerate(texts):
            if not t:
                raise HTTPError(400, f"input[{i}] is empty; every input needs text",
                                code="empty_input", param="input")
            if len(t) > lim["max_input_chars"]:
                raise HTTPError(400, f"input[{i}] is {len(t)} characters; at most "
                                     f"{lim['max_input_chars']} (limits.max_input_chars)",
                                code="input_too_long", param="input")
        return texts

    @app.post("/v1/completions", response_model=P.Completion,
              responses={400: {"model": P.ErrorResponse}, 401: {"model": P.ErrorResponse},
                         404: {"model": P.ErrorResponse}, 413: {"model": P.ErrorResponse},
                         422: {"model": P.ErrorResponse}, 503: {"model": P.ErrorResponse}})
    async def completions(self, body: P.CompletionRequest, request: Request):
        started = time.perf_counter()
        model, version = self._model(body.model, "completion", request)
        req = self._completion(body)
        deadline = self._deadline()
        caller = self._caller(request)
        route = None
        try:
            if body.stream:
                (first, stream), route = await self._call(
                    model, version, "stream", (req,), caller, deadline, stream=True)
            else:
                result, route = await self._call(model, version, "complete", (req,), caller,
                                                 deadline)
        except HTTPError as e:
            self._done("/v1/completions", model.name, route, version, e.status, started)
            raise
        if body.stream:
            if "error" in first:
                stream.cancel()
                self._done("/v1/completions", model.name, route, version, first["status"],
                           started)
                return _error(first["status"], **_err_args(first["error"]))
            return StreamingResponse(self._sse(body, stream, route, deadline, started),
                                     media_type="text/event-stream",
                                     headers={**self._headers(route, first.get("site")),
                                              "Cache-Control": "no-cache"})
        if "error" in result:
            self._done("/v1/completions", model.name, route, version, result["status"], started)
            return _error(result["status"], **_err_args(result["error"]))
        out = P.Completion(id=P.new_id("cmpl"), created=P.now(), model=body.model,
                           choices=result["choices"], usage=result["usage"],
                           system_fingerprint=f"hybridray-{route.version}-{route.site}")
        self._done("/v1/completions", model.name, route, version, 200, started)
        return JSONResponse(out.model_dump(), headers=self._headers(route, result.get("site")))

    def _completion(self, body: P.CompletionRequest) -> dict[str, Any]:
        lim = self.limits
        raw = body.prompt
        if isinstance(raw, str):
            prompts = [raw.encode()]
        elif raw and isinstance(raw[0], int):
            prompts = [raw]
        elif raw and isinstance(raw[0], list):
            prompts = list(raw)
        else:
            prompts = [p.encode() for p in raw]
        if not prompts:
            raise HTTPError(400, "prompt must not be an empty list", code="empty_prompt",
                            param="prompt")
        if len(prompts) > lim["max_prompts"]:
            raise HTTPError(400, f"{len(prompts)} prompts; at most {lim['max_prompts']} per "
                                 "request (limits.max_prompts)", code="too_many_prompts",
                            param="prompt")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, list):
                bad = [t for t in p if t > 255]
                if bad:
                    raise HTTPError(400, f"prompt[{i}]: token {bad[0]} is not a byte; this "
                                         "byte-level model reads ids 0-255",
                                    code="invalid_token", param="prompt")
                p = bytes(p)
            if len(p) > lim["max_prompt_chars"]:
                raise HTTPError(400, f"prompt[{i}] is {len(p)} bytes; at most "
                                     f"{lim['max_prompt_chars']} (limits.max_prompt_chars)",
                                code="prompt_too_long", param="prompt")
            out.append(p)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens > lim["max_tokens"]:
            raise HTTPError(400, f"max_tokens is {max_tokens}; this service allows at most "
                                 f"{lim['max_tokens']} (limits.max_tokens)",
                            code="max_tokens_too_large", param="max_tokens")
        if body.n > lim["max_n"]:
            raise HTTPError(400, f"n is {body.n}; at most {lim['max_n']} (limits.max_n)",
                            code="n_too_large", param="n")
        if body.best_of is not None and body.best_of != body.n:
            raise HTTPError(400, "best_of is not supported; leave it out or set it equal to n",
                            code="unsupported_parameter", param="best_of")
        if body.suffix:
            raise HTTPError(400, "suffix (insertion) is not supported by this model",
                            code="unsupported_parameter", param="suffix")
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            if int(key) > 256:
                raise HTTPError(400, f"logit_bias: {key} is not a token of this byte-level "
                                     "model (0-256)", code="invalid_token", param="logit_bias")
            bias[key] = value
        return {"prompts": out, "n": body.n, "max_tokens": max_tokens,
                "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                "stop": body.stop, "seed": body.seed, "presence_penalty": body.presence_penalty,
                "frequency_penalty": body.frequency_penalty, "logit_bias": bias,
                "logprobs": body.logprobs, "echo": body.echo}

    async def _sse(self, body: P.CompletionRequest, stream, route: Route, deadline: float,
                   started: float):
        cid, created = P.new_id("cmpl"), P.now()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        status = 200
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(),
                                                   max(0.001, deadline - time.monotonic()))
                except StopAsyncIteration:
                    break
                if "usage" in chunk:
                    if include_usage:
                        yield _event({"id": cid, "object": "text_completion", "created": created,
                                      "model": body.model, "choices": [],
                                      "usage": chunk["usage"]})
                    continue
                yield _event({"id": cid, "object": "text_completion", "created": created,
                              "model": body.model, "choices": [{
                                  "text": chunk["text"], "index": chunk["index"],
                                  "logprobs": chunk.get("logprobs"),
                                  "finish_reason": chunk["finish_reason"]}]})
            yield "data: [DONE]\n\n"
        except asyncio.TimeoutError:
            status = 504
            stream.cancel()
            yield _event({"error": {"message": "deadline passed while streaming "
                                    f"(limits.request_timeout_s={self.limits['request_timeout_s']}"
                                    ")", "type": "server_error", "code": "timeout"}})
        except SITE_DOWN as e:   # the replica died mid-stream: too late to fail over silently
            status = 502
            yield _event({"error": {"message": f"the replica at {route.site} was lost while "
                                    f"streaming ({type(e).__name__}); retry the request",
                                    "type": "server_error", "code": "replica_lost"}})
        finally:
            self._done("/v1/completions", route.model, route, route.version, status, started)

    @app.get("/v1/models", response_model=P.ModelList)
    async def list_models(self):
        return P.ModelList(data=[await self._card(m) for m in self.table.models.values()])

    @app.get("/v1/models/{model_id}", response_model=P.ModelCard,
             responses={404: {"model": P.ErrorResponse}})
    async def get_model(self, model_id: str):
        model = self.table.models.get(model_id.partition("@")[0])
        if model is None:
            raise HTTPError(404, f"model {model_id!r} does not exist here",
                            code="model_not_found", param="model")
        return await self._card(model)

    async def _card(self, model: ModelRoutes) -> P.ModelCard:
        self._ensure_poller()
        versions = []
        for version, routes in model.routes.items():
            sites = {}
            for r in routes:
                sites[r.site] = {"replicas": self.health.running.get((r.app, r.deployment)),
                                 **(await self._info(r) or {})}
            versions.append({"version": version, "weight": model.weights[version],
                             "sites": sites})
        return P.ModelCard(id=model.name, created=P.now(), kind=model.kind,
                           data_class=model.data_class, versions=versions)

    async def _info(self, route: Route) -> dict | None:
        key = (route.app, route.deployment)
        stamp, info = self.info.get(key, (0.0, None))
        if info is None or time.monotonic() - stamp > INFO_TTL_S:
            try:
                info = await asyncio.wait_for(
                    self._handle(route).options(method_name="info").remote(), 2.0)
                info.pop("site", None)
                info.pop("version", None)
            except Exception:   # not running right now: keep what we knew
                info = info or None
            self.info[key] = (time.monotonic(), info)
        return info

    @app.get("/healthz")
    async def healthz(self):
        self._ensure_poller()
        models = {}
        for model in self.table.models.values():
            up = sorted({r.site for routes in model.routes.values() for r in routes
                         if self.health.running.get((r.app, r.deployment), 1) > 0})
            models[model.name] = up
        ok = all(models.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "site": self.site,
                             "models": {m: len(s) for m, s in models.items()}},
                            status_code=200 if ok else 503)

