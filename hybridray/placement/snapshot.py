"""Live capacity without two GCS round trips per decision: a snapshot with bounded staleness.

A live decision needs the cluster's nodes (labels, totals, alive) and what each has free.
Reading both from Ray is two calls to the GCS (``ray.nodes()`` and the available resources):
about a millisecond on an idle machine and several on a loaded one, which was nearly all of
what ``Cluster.place`` cost. ``CapacitySnapshots`` keeps the last reading and refreshes it in
a background thread while placement is in use:

* a decision never uses a reading older than ``max_age_s`` (default ``MAX_AGE_S``, 1 s): an
  older one is refreshed in the calling thread before it is used;
* while decisions keep coming, a thread takes a new reading every ``refresh_s`` (default
  ``REFRESH_S``, 0.25 s), so a decision normally sees capacity at most that old;
* after ``idle_s`` (default ``IDLE_S``, 30 s) without a decision the thread stops, so an
  idle driver sends the GCS nothing; the next decision reads afresh.

Ray's own free-resource view in the GCS is itself reported by each raylet periodically, and
a task placed by a decision claims its resources only when Ray schedules it, so a quarter
second is within what "live" ever meant. ``max_age_s=0`` (for the snapshot, or for one
decision: a training run's or a sync's) reads afresh and starts no background reader.
The live-capacity rule itself is unchanged: only alive, labelled, non-head nodes count, with
what Ray reports free on each.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

MAX_AGE_S = 1.0      # no decision uses capacity older than this
REFRESH_S = 0.25     # how often the background thread reads while decisions come
IDLE_S = 30.0        # the thread stops after this long without a decision

_LIVE: weakref.WeakSet = weakref.WeakSet()   # every CapacitySnapshots of this process


def pause_all() -> None:
    """Stop every background reader of this process, waiting for each to finish its read.

    Called before this process's Ray auth settings change (``hybridray.cluster.auth``: an
    in-process client of another cluster): a GCS call made with the old connection and the
    new token fails a check inside Ray's C++ client, which aborts the whole process. A
    reader starts again with the next decision.
    """
    for snapshots in list(_LIVE):
        snapshots.close()


@dataclass(frozen=True)
class Snapshot:
    """One reading of the cluster: ``ray.nodes()`` and the free resources per node id."""

    nodes: list[dict[str, Any]]
    free: dict[str, dict[str, float]]
    taken_at: float = field(default_factory=time.monotonic)    # when the reading started
    connection: Any = None          # the Ray connection it was read over

    @property
    def age_s(self) -> float:
        return time.monotonic() - self.taken_at


def read_ray() -> Snapshot:
    """A fresh reading from the connected Ray cluster (two GCS calls)."""
    import ray
    from ray._private import state as ray_state

    taken = time.monotonic()
    free = ray_state.available_resources_per_node()
    return Snapshot(ray.nodes(), free, taken, ray_connection())


def ray_connection() -> Any:
    """What identifies this process's current Ray connection (a new ``ray.init`` after a
    ``ray.shutdown`` gives a new one): its core worker."""
    import ray._private.worker as w

    return id(getattr(w.global_worker, "core_worker", None))


class CapacitySnapshots:
    """The latest ``Snapshot`` of one Ray connection, never older than ``max_age_s``."""

    def __init__(self, *, max_age_s: float = MAX_AGE_S, refresh_s: float = REFRESH_S,
                 idle_s: float = IDLE_S, reader=read_ray, connection=ray_connection):
        if refresh_s <= 0 or max_age_s < 0 or idle_s <= 0:
            raise ValueError("refresh_s and idle_s must be > 0 and max_age_s >= 0")
        self.max_age_s, self.refresh_s, self.idle_s = max_age_s, refresh_s, idle_s
        self._reader, self._connection = reader, connection
        self._latest: Snapshot | None = None
        self._lock = threading.Lock()           # one reading at a time
        self._last_use = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.reads = 0                          # readings taken (for tests and benchmarks)
        _LIVE.add(self)

    def get(self, max_age_s: float | None = None) -> Snapshot:
        """The latest reading if it is at most ``max_age_s`` old (default: the bound this
        was made with), else a new one."""
        bound = self.max_age_s if max_age_s is None else max_age_s
        self._last_use = time.monotonic()
        latest = self._latest
        if latest is not None and latest.connection != self._connection():
            self._latest = latest = None        # another cluster, or Ray was restarted
        if latest is None or latest.age_s > bound:
            latest = self._refresh(bound)
        if bound > 0:   # a decision that reads afresh anyway gains nothing from a reader
            self._ensure_thread()
        return latest

    def invalidate(self) -> None:
        """Forget the reading: the next decision reads afresh (after a change we made)."""
        self._latest = None

    def close(self) -> None:
        """Stop the background thread (it also stops by itself when idle)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None

    def _refresh(self, max_age: float | None) -> Snapshot:
        with self._lock:
            latest = self._latest       # another thread may have read while we waited
            if latest is not None and max_age is not None and latest.age_s <= max_age:
                return latest
            snap = self._reader()
            self._latest = snap
            self.reads += 1
            return snap

    def _ensure_thread(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="hybridray-capacity",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            if time.monotonic() - self._last_use > self.idle_s:
                return
            try:
                self._refresh(None)
            except Exception:      # Ray shut down or the GCS is unreachable: the caller's
                self._latest = None  # next decision reads (and raises) in its own thread
                return
