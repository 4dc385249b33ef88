"""A real S3-compatible server on loopback, so "cloud" storage in a local cluster is S3.

The local cluster runs its cloud sites on this machine, but their storage should behave like
the object store it stands for: no rename, atomic single-object PUTs, list-after-write,
network errors. moto's server mode speaks the S3 protocol over HTTP (Ray's own tests use it),
so the same ``pyarrow.fs.S3FileSystem`` code that talks to AWS talks to it.

``start`` runs ``python -m moto.server`` as a child in its own session on a free port and
returns an ``S3Server`` record (pid, process start time, port); ``stop`` ends exactly that
process, and only while both pid and start time still match, so a recycled pid is never
signalled. Its objects live in the server's memory (spilling large ones to temp files) and
are gone once it stops: ``hybridray down`` of a local cluster deletes its cloud data.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hybridray.exceptions import DataError
from hybridray.procs import process_start_time, reap

START_TIMEOUT_S = 30.0
# Any key pair works with the emulator; these are used when the environment has none, so
# pyarrow never falls back to probing EC2 instance metadata (seconds of timeouts offline).
EMULATOR_ACCESS_KEY = "hybridray-local"
EMULATOR_SECRET_KEY = "hybridray-local-secret"


@dataclass(frozen=True)
class S3Server:
    """One running emulator: how to reach it and how to recognise its process later."""

    pid: int
    start_time: int          # /proc/PID/stat field 22, so a recycled pid is never ours
    port: int
    log: str = ""
    host: str = "127.0.0.1"  # a namespace host's address when it runs in one

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def alive(self) -> bool:
        return process_start_time(self.pid) == self.start_time

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> S3Server:
        return cls(**data)


def start(*, port: int | None = None, log: str | os.PathLike | None = None,
          buckets: list[str] | tuple[str, ...] = (),
          timeout: float = START_TIMEOUT_S, host: str = "127.0.0.1",
          netns: str | None = None) -> S3Server:
    """Start a loopback S3 server (moto) and wait until it answers; create ``buckets``.

    With ``netns`` it runs inside that network namespace (a namespace host of a cluster
    started with ``--hosts netns``), listening on ``host``, that host's address.

    Raises:
        DataError: moto is not installed, or the server did not come up in time.
    """
    try:
        import moto.server  # noqa: F401  (only to fail early with an install hint)
    except ImportError:
        raise DataError('the local S3 server needs moto: pip install "hybridray[local]"') from None
    port = port or (9000 if netns else _free_port())  # a namespace host's ports are its own
    log_path = Path(log) if log else Path(os.devnull)
    if log:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    with open(log_path, "ab") as out:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True)
    server = S3Server(pid=proc.pid, start_time=process_start_time(proc.pid) or -1, port=port,
                      log=str(log) if log else "", host=host)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise DataError(f"the local S3 server exited with code {proc.returncode} while "
                            f"starting on port {port}" + (f"; see {log}" if log else ""))
        if _answers(port, host):
            break
        if time.monotonic() > deadline:
            stop(server)
            raise DataError(f"the local S3 server did not answer on {host}:{port} within "
                            f"{timeout:.0f}s")
        time.sleep(0.1)
    for bucket in buckets:
        create_bucket(server.endpoint, bucket)
    return server


def stop(server: S3Server, timeout: float = 10.0) -> bool:
    """Stop ``server`` if its process is still the one started; True if it was running."""
    if not server.alive():
        reap(server.pid)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while server.alive() and time.monotonic() < deadline:
        reap(server.pid)
        time.sleep(0.05)
    if server.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGKILL)
    reap(server.pid)
    return True


def create_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` on the server at ``endpoint`` (no error if it exists)."""
    import pyarrow.fs as pafs

    from hybridray.storage.fs import s3_filesystem

    fs = s3_filesystem(endpoint, allow_bucket_creation=True, emulator=True)
    if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        fs.create_dir(bucket)


def _answers(port: int, host: str = "127.0.0.1") -> bool:
    import http.client

    try:
        conn = http.client.HTTPConnection(host, port, timeout=1)
        conn.request("GET", "/")
        conn.getresponse().read()
        conn.close()
        return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


