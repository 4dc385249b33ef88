"""Serving with Ray Serve: OpenAI-style completions and embeddings, per site, by policy.

    from hybridray.serve import deploy
    service = deploy("jobs/configs/serve-embed.yaml", ["http.port=8001"])
    print(service.url, service.status())
    service.shift({"minilm": {"v1": 90, "v2": 10}})      # traffic, in place
    service.promote("minilm", "v2")                      # v2 only, no failed requests
    service.delete()

The CLI is ``hybridray serve CONFIG [key=value ...]``; ``jobs/serve.py`` is the same for
``ray job submit`` and holds an application builder for ``serve run`` / ``serve deploy``.
Importing this package imports neither Ray nor torch; the names below load on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ServeConfig": "hybridray.serve.config",
    "load_serve_config": "hybridray.serve.config",
    "parse_serve_config": "hybridray.serve.config",
    "ServePlan": "hybridray.serve.plan",
    "plan_service": "hybridray.serve.plan",
    "Service": "hybridray.serve.service",
    "deploy": "hybridray.serve.service",
    "delete": "hybridray.serve.service",
    "service_status": "hybridray.serve.service",
    "QualityReport": "hybridray.serve.quantize",
    "QualityError": "hybridray.serve.quantize",
    "service_app": "hybridray.serve.apps",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hybridray.serve' has no attribute {name!r}")
