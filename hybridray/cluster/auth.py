"""Ray token auth for hybridray clusters: the token file, and talking to a cluster in-process.

Every cluster gets its own random token; a driver, a ``ray job submit`` or a node that does not
present it is refused by the GCS. Ray reads the token through a process-wide, cached loader
configured from ``RAY_AUTH_*`` variables, so an in-process client (``up`` waiting for nodes,
``status``) swaps those variables in for the duration and resets the cache on the way in and
out. One process should therefore talk to one cluster at a time.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
TLS_VARS = ("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


def write_token(path: Path) -> None:
    """A fresh 256-bit token, readable by the owner only (created with mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def auth_env(token_path: str | os.PathLike) -> dict[str, str]:
    """The variables that make Ray (node, driver or job CLI) use this cluster's token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def _sync_ray_auth(reload_config: bool = False) -> None:
    """Make Ray's cached auth mode and token follow the environment as it is now.

    Ray reads ``RAY_AUTH_MODE`` once into its config; when the variable is unset the mode is
    left as it is, so a process that talked to a hybridray cluster can still follow the
    documented ``os.environ.update(ray_env(state)); ray.init(...)`` afterwards.
    """
    from ray._raylet import (
        AuthenticationMode,
        AuthenticationTokenLoader,
        Config,
        get_authentication_mode,
    )

    from hybridray.placement.snapshot import pause_all

    pause_all()   # no background capacity read may cross the change (Ray aborts on it)

    mode = os.environ.get("RAY_AUTH_MODE")
    if reload_config or (mode is not None and (mode.lower() == "token") != (
            get_authentication_mode() == AuthenticationMode.TOKEN)):
        Config.initialize("")  # re-reads RAY_AUTH_MODE from the environment
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def token_auth(token_path: str | os.PathLike,
               tls: dict[str, str] | None = None) -> Iterator[None]:
    """Within the block, this process's Ray clients present the token at ``token_path``
    (and, with ``tls``, the cluster's TLS certificate: Ray reads those variables into its
    config once, so the config is reloaded on the way in and out)."""
    saved = {k: os.environ.get(k) for k in (*AUTH_VARS, *TLS_VARS)}
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the path
    os.environ.update(auth_env(token_path))
    reload = bool(tls) or bool(saved["RAY_USE_TLS"])
    for k in TLS_VARS:
        os.environ.pop(k, None)
    os.environ.update(tls or {})
    _sync_ray_auth(reload)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _sync_ray_auth(reload)


def apply_env(env: dict[str, str]) -> None:
    """``os.environ.update(env)`` plus the resets Ray needs to follow it in this process.

    Ray caches the auth mode and token of the first cluster a process talks to, so a
    process that switches clusters (a test, a notebook) must call this instead of a bare
    ``os.environ.update``; the first connection of a fresh process works either way.
    """
    tls_before = os.environ.get("RAY_USE_TLS")
    if "RAY_AUTH_TOKEN_PATH" in env:
        for k in TLS_VARS:  # a cluster without TLS must not inherit the last one's
            os.environ.pop(k, None)
    os.environ.update(env)
    if "RAY_AUTH_TOKEN_PATH" in env:
        os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the path
    _sync_ray_auth(reload_config=tls_before != os.environ.get("RAY_USE_TLS"))
