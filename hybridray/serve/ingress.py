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
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybridray import labels as L
from hybridray.serve import errors
from hybridray.serve import protocol as P
from hybridray.serve.dispatch import SITE_DOWN, Dispatcher
from hybridray.serve.errors import HTTPError, error_response
from hybridray.serve.gate import Gate, GatePolicy
from hybridray.serve.inputs import completion_job, embedding_texts
from hybridray.serve.routing import ModelRoutes, Route, RoutingTable

log = logging.getLogger("ray.serve")

SITE_HEADER = "x-hybridray-site"
VERSION_HEADER = "x-hybridray-version"
POLL_S = 1.0
INFO_TTL_S = 30.0


_CURRENT: dict[str, GatePolicy | None] = {"policy": None}

app = FastAPI(
    title="hybridray serve",
    description="OpenAI-compatible completions and embeddings, served per site by Ray Serve.",
    version="1",
)
app.add_middleware(Gate, policy=lambda: _CURRENT["policy"])


@app.exception_handler(HTTPError)
async def _http_error(_request: Request, exc: HTTPError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)


@app.exception_handler(RequestValidationError)
async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        why = str(e.get("ctx", {}).get("error", ""))
        return error_response(400, f"the body is not valid JSON: {why}".rstrip(": "),
                              code="invalid_json")
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
    return error_response(422, "; ".join(parts[:10]), code="invalid_value", param=first,
                          detail=detail)


@app.exception_handler(StarletteHTTPException)
async def _starlette(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail),
                          code="not_found" if exc.status_code == 404 else None,
                          headers=getattr(exc, "headers", None))


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


# Every error a model route can answer, in the OpenAPI schema (the body is always ErrorResponse).
ERROR_RESPONSES = {code: {"model": P.ErrorResponse} for code in (400, 401, 404, 413, 422, 429,
                                                                  503, 504)}


@serve.deployment(name="Ingress", max_ongoing_requests=256, health_check_period_s=5)
@serve.ingress(app)
class Ingress:
    """Auth, limits, and site- and version-aware routing to the replica deployments."""

    def __init__(self, service: str, handles: dict[str, Any] | None = None):
        import ray

        from hybridray.serve.metrics import metrics

        self.service = service
        self.site = (ray.get_runtime_context().get_node_labels() or {}).get(L.SITE)
        self.app_name = serve.get_replica_context().app_name
        self.rng = random.Random()
        self.metrics = metrics()
        # handles bound in one-application mode (``serve run``), by deployment name
        self.dispatch = Dispatcher(service, self.app_name, dict(handles or {}), self.metrics)
        self.table, self.health = self.dispatch.table, self.dispatch.health
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
        self.table = self.dispatch.table = RoutingTable.from_config(config)
        self.limits = config["limits"]
        ing = config["ingress"]
        self.health.suspect_s = ing["suspect_s"]
        self.dispatch.assign_s = float(ing["assign_timeout_s"])
        self.dispatch.retry_after_s = float(ing["retry_after_s"])
        self.dispatch.limit_s = float(self.limits["request_timeout_s"])
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
            raise errors.unavailable(f"model {base!r} has no version taking traffic",
                                     self.dispatch.retry_after_s)
        return model, version

    def _caller(self, request: Request) -> str | None:
        site = request.headers.get(SITE_HEADER)
        if site is None:
            return self.site
        if site not in self.table.sites:
            raise HTTPError(400, f"{SITE_HEADER}: unknown site {site!r} (sites: "
                            f"{', '.join(self.table.sites)})", code="unknown_site")
        return site

    async def _call(self, *args, **kwargs):
        self._ensure_poller()
        return await self.dispatch.call(*args, **kwargs)

    def _deadline(self) -> float:
        return time.monotonic() + float(self.limits["request_timeout_s"])

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
              responses=ERROR_RESPONSES)
    async def embeddings(self, body: P.EmbeddingRequest, request: Request):
        started = time.perf_counter()
        model, version = self._model(body.model, "embedding", request)
        texts = embedding_texts(body.input, self.limits)
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
            return errors.from_replica(result["error"], result["status"])
        vectors = result["vectors"]
        if body.encoding_format == "base64":   # little-endian float32, as OpenAI sends it
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            data = vectors.tolist()
        out = {"object": "list", "model": body.model,     # the EmbeddingList shape, built
               "data": [{"object": "embedding", "index": i, "embedding": e}   # directly: it
                        for i, e in enumerate(data)],      # is the hot path
               "usage": {"prompt_tokens": result["tokens"], "total_tokens": result["tokens"]}}
        self._done("/v1/embeddings", model.name, route, version, 200, started)
        return JSONResponse(out, headers=self._headers(route, result.get("site")))

    @app.post("/v1/completions", response_model=P.Completion,
              responses=ERROR_RESPONSES)
    async def completions(self, body: P.CompletionRequest, request: Request):
        started = time.perf_counter()
        model, version = self._model(body.model, "completion", request)
        req = completion_job(body, self.limits)
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
                return errors.from_replica(first["error"], first["status"])
            return StreamingResponse(self._sse(body, stream, route, deadline, started),
                                     media_type="text/event-stream",
                                     headers={**self._headers(route, first.get("site")),
                                              "Cache-Control": "no-cache"})
        if "error" in result:
            self._done("/v1/completions", model.name, route, version, result["status"], started)
            return errors.from_replica(result["error"], result["status"])
        out = P.Completion(id=P.new_id("cmpl"), created=P.now(), model=body.model,
                           choices=result["choices"], usage=result["usage"],
                           system_fingerprint=f"hybridray-{route.version}-{route.site}")
        self._done("/v1/completions", model.name, route, version, 200, started)
        return JSONResponse(out.model_dump(), headers=self._headers(route, result.get("site")))

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
                                    ")", "type": "server_error", "param": None,
                                    "code": "timeout"}})
        except SITE_DOWN as e:   # the replica died mid-stream: too late to fail over silently
            status = 502
            yield _event({"error": {"message": f"the replica at {route.site} was lost while "
                                    f"streaming ({type(e).__name__}); retry the request",
                                    "type": "server_error", "param": None,
                                    "code": "replica_lost"}})
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
                    self.dispatch.handle(route, "info").remote(), 2.0)
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

