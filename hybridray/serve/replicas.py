"""The Serve deployments that hold models: one per (model, version, site).

Each replica checks, before it loads anything, that the node it landed on may hold the
model's data class (``check_residency``: defence in depth behind the label selector), then
loads the model, quantizes it and checks it against fp32 (``QualityReport``). A replica whose
model misses its accuracy bound fails to start, so Serve never routes to it.

Answers are plain dicts. Bad input comes back as ``{"error": ..., "status": 400}``, never as
an exception, so it cannot look like a failed replica to the router, and the replica stays up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

from ray import serve

from hybridray.placement.guard import check_residency

log = logging.getLogger("ray.serve")


def _threads(spec: dict[str, Any]) -> None:
    import torch

    n = spec.get("threads") or max(1, int(spec.get("cpus") or 1))
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def _where(spec: dict[str, Any]) -> str:
    """Check residency on this node and return its site (raises ``ResidencyViolation``)."""
    site = check_residency(spec["data_class"])
    if site != spec["site"]:
        log.warning("replica for site %s runs at site %s (label selectors were overridden?)",
                    spec["site"], site)
    return site


def _bad(message: str, code: str = "invalid_request", status: int = 400,
         param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": code}, "status": status}


@serve.deployment(name="EmbeddingReplica", max_ongoing_requests=64, health_check_period_s=5)
class EmbeddingReplica:
    """An embedding model; concurrent requests are merged by ``@serve.batch``."""

    def __init__(self, spec: dict[str, Any]):
        from hybridray.serve.embedding import Embedder
        from hybridray.serve.metrics import metrics

        self.spec = spec
        self.site = _where(spec)
        _threads(spec)
        started = time.perf_counter()
        self.model = Embedder(spec["source"], quantize=spec["quantize"],
                              min_cosine=spec["min_cosine"])
        self.load_s = time.perf_counter() - started
        self.metrics = metrics()
        self.tags = {"service": spec["service"], "model": spec["model"],
                     "version": spec["version"], "site": self.site}
        log.info("embedding %s@%s at %s: %s", spec["model"], spec["version"], self.site,
                 self.model.report.to_json())

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.embed_batch.set_max_batch_size(int(config.get("max_batch_size", 32)))
        self.embed_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s",
                                                                   0.002)))

    def info(self) -> dict[str, Any]:
        return {"site": self.site, "version": self.spec["version"], "pid": os.getpid(),
                "kind": "embedding", "dimensions": self.model.dimensions,
                "max_input_tokens": self.model.max_tokens, "load_s": round(self.load_s, 3),
                "quality": self.model.report.to_json()}

    async def embed(self, texts: list[str], dimensions: int | None = None) -> dict[str, Any]:
        if dimensions is not None and dimensions != self.model.dimensions:
            return _bad(f"this model returns {self.model.dimensions} dimensions; omit "
                        f"dimensions or set it to {self.model.dimensions} (got {dimensions})",
                        param="dimensions")
        counts = self.model.token_counts(texts)
        for i, n in enumerate(counts):
            if n > self.model.max_tokens:
                return _bad(f"input[{i}] is {n} tokens; this model reads at most "
                            f"{self.model.max_tokens}", code="context_length_exceeded",
                            param="input")
        vectors = await self.embed_batch(texts)
        _count_tokens(self, sum(counts), 0)
        return {"vectors": vectors, "tokens": sum(counts), "site": self.site,
                "version": self.spec["version"]}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def embed_batch(self, requests: list[list[str]]) -> list[Any]:
        flat = [t for texts in requests for t in texts]
        self.metrics.batch_size.observe(len(flat), tags=self.tags)
        vectors = await asyncio.to_thread(self.model.encode, flat)
        out, i = [], 0
        for texts in requests:
            out.append(vectors[i:i + len(texts)])
            i += len(texts)
        return out

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")


@serve.deployment(name="CompletionReplica", max_ongoing_requests=8, health_check_period_s=5)
class CompletionReplica:
    """A byte-level GPT answering completions; generation runs off the event loop."""

    def __init__(self, spec: dict[str, Any]):
        from hybridray.serve.lm import LanguageModel
        from hybridray.serve.metrics import metrics

        self.spec = spec
        self.site = _where(spec)
        _threads(spec)
        started = time.perf_counter()
        self.model = LanguageModel(spec["source"], quantize=spec["quantize"],
                                   max_perplexity_ratio=spec["max_perplexity_ratio"])
        check_residency(self.model.data_class)   # the checkpoint's own label, not only ours
        self.load_s = time.perf_counter() - started
        self.metrics = metrics()
        self.tags = {"service": spec["service"], "model": spec["model"],
                     "version": spec["version"], "site": self.site}
        log.info("completion %s@%s at %s: %s", spec["model"], spec["version"], self.site,
                 self.model.report.to_json())

    def reconfigure(self, config: dict[str, Any]) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {"site": self.site, "version": self.spec["version"], "pid": os.getpid(),
                "kind": "completion", "context_tokens": self.model.block_size - 1,
                "data_class": self.model.data_class, "load_s": round(self.load_s, 3),
                "quality": self.model.report.to_json()}

    async def complete(self, req: dict[str, Any]) -> dict[str, Any]:
        """All choices of a request at once: ``{"choices": [...], "usage": ...}``."""
        from hybridray.serve.lm import InputError

        choices: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = 0
        try:
            for p_index, prompt in enumerate(req["prompts"]):
                prompt_tokens += len(prompt)
                for c in range(req["n"]):
                    steps = await asyncio.to_thread(self._run, prompt, req, p_index, c)
                    choice = _join(steps, index=len(choices), logprobs=req["logprobs"])
                    completion_tokens += steps[-1].completion_tokens
                    choices.append(choice)
        except InputError as e:
            return _bad(str(e), code="context_length_exceeded", param="prompt")
        _count_tokens(self, prompt_tokens, completion_tokens)
        return {"choices": choices, "site": self.site, "version": self.spec["version"],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    async def stream(self, req: dict[str, Any]):
        """Yield ``{"index", "text", "finish_reason", "logprobs"}`` chunks, then usage."""
        from hybridray.serve.lm import InputError

        for prompt in req["prompts"]:
            try:
                self.model.check_prompt(prompt)
            except InputError as e:
                yield _bad(str(e), code="context_length_exceeded", param="prompt")
                return
        yield {"site": self.site, "version": self.spec["version"]}   # first: who answers
        index = prompt_tokens = completion_tokens = 0
        for p_index, prompt in enumerate(req["prompts"]):
            prompt_tokens += len(prompt)
            for c in range(req["n"]):
                async for step in self._stream_one(prompt, req, p_index, c):
                    completion_tokens += step.completion_tokens
                    chunk = {"index": index, "text": step.text,
                             "finish_reason": step.finish_reason}
                    if req["logprobs"] is not None:
                        chunk["logprobs"] = _logprobs([step])
                    if step.text or step.finish_reason:
                        yield chunk
                index += 1
        _count_tokens(self, prompt_tokens, completion_tokens)
        yield {"usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}}

    async def _stream_one(self, prompt: bytes, req: dict[str, Any], p_index: int, c: int):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def produce() -> None:
            try:
                for step in self.model.generate(prompt, _sampling(req, p_index, c),
                                                echo=req["echo"], cancelled=cancelled):
                    loop.call_soon_threadsafe(queue.put_nowait, step)
            except BaseException as e:   # delivered to the consumer, re-raised there
                loop.call_soon_threadsafe(queue.put_nowait, e)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = threading.Thread(target=produce, daemon=True, name="hybridray-generate")
        worker.start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()       # the client went away (or we finished): stop sampling

    def _run(self, prompt: bytes, req: dict[str, Any], p_index: int, c: int) -> list:
        return list(self.model.generate(prompt, _sampling(req, p_index, c), echo=req["echo"]))

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")


def _count_tokens(replica, prompt: int, completion: int) -> None:
    """Token counters (Ray's counters refuse increments of 0)."""
    for kind, n in (("prompt", prompt), ("completion", completion)):
        if n > 0:
            replica.metrics.tokens.inc(n, tags={**replica.tags, "kind": kind})


def _sampling(req: dict[str, Any], p_index: int, choice: int):
    from hybridray.serve.lm import Sampling

    seed = req.get("seed")
    if seed is not None:   # distinct, reproducible streams per prompt and choice
        seed = (seed + 1_000_003 * p_index + 7919 * choice) % (2**63)
    return Sampling(max_tokens=req["max_tokens"], temperature=req["temperature"],
                    top_p=req["top_p"], top_k=req.get("top_k"),
                    stop=[s.encode() for s in req.get("stop") or []], seed=seed,
                    presence_penalty=req["presence_penalty"],
                    frequency_penalty=req["frequency_penalty"],
                    logit_bias={int(k): float(v) for k, v in (req.get("logit_bias") or {})
                                .items()},
                    logprobs=req["logprobs"])


def _logprobs(steps: list) -> dict[str, Any]:
    tokens, token_lp, top, offsets = [], [], [], []
    offset = 0
    for s in steps:
        for t, lp, tp in zip(s.tokens, s.token_logprobs, s.top_logprobs, strict=False):
            tokens.append(t)
            token_lp.append(lp)
            top.append(tp)
            offsets.append(offset)
            offset += 1
    return {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top,
            "text_offset": offsets}


def _join(steps: list, *, index: int, logprobs: int | None) -> dict[str, Any]:
    return {"index": index, "text": "".join(s.text for s in steps),
            "finish_reason": steps[-1].finish_reason,
            "logprobs": _logprobs(steps) if logprobs is not None else None}
