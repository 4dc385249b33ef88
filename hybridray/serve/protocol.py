"""The OpenAI-compatible wire format: requests (validated strictly) and responses.

Requests refuse unknown fields and wrong types (a typo such as ``max_token`` is a 422 naming
the field, not a silently ignored option); numbers are range-checked here, and the limits a
service sets (``limits.*``) are checked by the ingress, which knows them.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Text = Annotated[str, Field(max_length=10_000_000)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class CompletionRequest(_Request):
    """``POST /v1/completions`` (OpenAI's legacy completions API, plus ``top_k``)."""

    model: str = Field(min_length=1, max_length=200)
    prompt: Text | list[Text] | TokenIds | list[TokenIds] = Field(
        description="Text, texts, or byte-token ids (0-255) for this byte-level model.")
    max_tokens: int | None = Field(16, ge=0, description="Tokens (bytes) to generate.")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=100_000)
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    user: str | None = Field(None, max_length=1000)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        if isinstance(value, str):
            value = [value]
        if value is None:
            return None
        if len(value) > 4:
            raise ValueError(f"at most 4 stop sequences (got {len(value)})")
        for s in value:
            if not s:
                raise ValueError("stop sequences must not be empty")
            if len(s.encode()) > 256:
                raise ValueError("a stop sequence is at most 256 bytes")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        if value is None:
            return None
        if len(value) > 300:
            raise ValueError("logit_bias holds at most 300 entries")
        for key, bias in value.items():
            # ASCII digits only: str.isdigit() also accepts "²" or "٣", which int() refuses.
            if not (key.isascii() and key.isdigit()) or len(key) > 6:
                raise ValueError(f"logit_bias keys are token ids as strings (got {key!r})")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values lie in [-100, 100] (got {bias})")
        return value


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``."""

    model: str = Field(min_length=1, max_length=200)
    input: Text | list[Text] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=1000)


# ---- responses ----------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    """An OpenAI model object, plus what hybridray knows about where and how it is served."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hybridray"
    kind: Literal["embedding", "completion"]
    data_class: str
    versions: list[dict]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
