"""Requests, checked against the limits a service sets, turned into what replicas run.

The schema (``protocol``) checks types and ranges (422); these functions check the
service's own limits (``limits.*``) and what the models support (400), naming the limit.
"""

from typing import Any

from hybridray.serve import protocol as P
from hybridray.serve.errors import HTTPError


def embedding_texts(value, lim: dict[str, Any]) -> list[str]:
    """The texts of an embeddings request, checked against the service limits."""
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


def completion_job(body: P.CompletionRequest, lim: dict[str, Any]) -> dict[str, Any]:
    """What a completion replica is asked to do, checked against the service limits.

    Prompts become bytes (this model's tokens); ``max_tokens`` defaults to 16, as OpenAI's.
    """
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
        if not (key.isascii() and key.isdigit()) or int(key) > 256:
            raise HTTPError(400, f"logit_bias: {key} is not a token of this byte-level "
                                 "model (0-256)", code="invalid_token", param="logit_bias")
        bias[key] = value
    return {"prompts": out, "n": body.n, "max_tokens": max_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
            "stop": body.stop, "seed": body.seed, "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty, "logit_bias": bias,
            "logprobs": body.logprobs, "echo": body.echo}
