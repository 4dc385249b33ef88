"""Real HTTP load for the demo, recorded request by request, and a node killed on purpose.

The load is plain ``urllib`` with a bounded retry loop (what any client with retries does), so
the report can say exactly how many requests needed one: each record holds when it was sent,
how long it took, which site answered (``x-hybridray-site``), its status and its attempts.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

SITE_HEADER = "x-hybridray-site"
RETRIES = 6               # attempts per request, as the site-loss test's client
BACKOFF_S = 0.25


@dataclass
class Request:
    """One request as the client saw it (``t`` in seconds since the load started)."""

    t: float
    kind: str             # embedding | completion
    latency_ms: float
    status: int           # the final attempt's HTTP status (0: no response at all)
    site: str | None
    attempts: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class Load:
    """Threads sending requests until stopped; ``marks`` are named moments (e.g. the kill)."""

    base_url: str
    token: str
    embed_route: str = ""
    lm_route: str = "/lm"
    lm_model: str = "lm"
    embed_model: str = "minilm"
    threads: int = 4
    lm_every: int = 4     # every n-th request of a thread is a completion
    records: list[Request] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def mark(self, name: str) -> float:
        self.marks[name] = round(self.now(), 3)
        return self.marks[name]

    def start(self) -> Load:
        self.t0 = time.monotonic()
        for i in range(self.threads):
            t = threading.Thread(target=self._loop, args=(i,), daemon=True, name=f"load-{i}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)

    def count(self, since: float = 0.0, ok: bool = True) -> int:
        with self._lock:
            return sum(1 for r in self.records if r.t >= since and r.ok == ok)

    def _loop(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            if n % self.lm_every == 0:
                body = {"model": self.lm_model, "prompt": "def parse(", "max_tokens": 16,
                        "temperature": 0.8, "seed": n}
                rec = self._send("completion", f"{self.lm_route}/v1/completions", body)
            else:
                body = {"model": self.embed_model, "encoding_format": "float",
                        "input": [f"ticket {index}-{n}: the printer on floor {n % 7} is "
                                  "out of toner again", "reset my password please"]}
                rec = self._send("embedding", f"{self.embed_route}/v1/embeddings", body)
            with self._lock:
                self.records.append(rec)

    def _send(self, kind: str, route: str, body: dict[str, Any]) -> Request:
        data = json.dumps(body).encode()
        t = self.now()
        start = time.perf_counter()
        status, site, error = 0, None, None
        for attempt in range(1, RETRIES + 1):
            req = urllib.request.Request(self.base_url + route, data=data, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    r.read()
                    status, site, error = r.status, r.headers.get(SITE_HEADER), None
            except urllib.error.HTTPError as e:
                status, site, error = e.code, e.headers.get(SITE_HEADER), f"HTTP {e.code}"
            except OSError as e:  # connection refused/reset, timeout
                status, error = 0, f"{type(e).__name__}: {e}"[:200]
            if status == 200 or (status and status < 500 and status != 429):
                break
            if self._stop.is_set() and attempt >= 2:
                break
            time.sleep(BACKOFF_S * attempt)
        return Request(t=round(t, 3), kind=kind,
                       latency_ms=round((time.perf_counter() - start) * 1000, 2),
                       status=status, site=site, attempts=attempt, error=error)

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            records = [asdict(r) for r in self.records]
        return {"records": records, "marks": dict(self.marks), "threads": self.threads}


def session_members(sid: int) -> list[int]:
    """Every live process of session ``sid`` (a node's ``ray start`` leads its own session)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def kill_node(pid: int) -> list[dict[str, Any]]:
    """SIGKILL a node as a lost machine dies: every process of its session, at once.

    ``pid`` is the node's recorded ``ray start`` pid, which leads the session; Ray gives each
    worker its own process group, so killing the group alone would leave replicas running.
    Returns ``{pid, start_time}`` of each process killed (so a reused pid is never mistaken
    for a survivor).
    """
    from hybridray.cluster.state import process_start_time

    victims = [{"pid": p, "start_time": process_start_time(p), "what": "killed node process"}
               for p in session_members(pid)]
    for v in victims:
        try:
            os.kill(v["pid"], signal.SIGKILL)
        except OSError:
            pass
    return victims
