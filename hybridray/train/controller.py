"""Ray Train v2's controller, with three costs of a short run taken out.

Measured on the 2-core machine (``benchmarks/bench_train.py``; per-process CPU while the
workers train), what a hybridray run paid that plain PyTorch DDP did not, apart from the
workers themselves:

1. **The commit wait.** Ray Train commits a reported checkpoint in its controller, which
   polls every worker's result queue every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s); the
   checkpoint is registered (and so is what a restart resumes from) at the first poll that
   finds every rank's report. A worker that waits for the commit (``hybridray.train.loop``
   does after each checkpoint, so a failure never redoes more than one checkpoint interval)
   waited a second on average, doing nothing. Polling faster all the time costs every worker
   an RPC per poll for the whole run. ``PromptCommitController`` keeps Ray's interval while
   nobody waits and polls every ``FAST_POLL_S`` while a worker waits for a commit, and for
   ``LINGER_S`` after a worker says its training function is returning (``expedite``:
   ``fit()`` returns at the poll that sees every worker finished).
2. **A preemption watcher process.** Ray Train starts a ``PreemptionWatcher`` *actor* per
   worker group, as training starts: a new Python process importing Ray Train (about 1.5
   CPU-seconds on these cores, taken from the first seconds of training) to make one GCS
   call every 5 s. ``InProcessPreemptionWatcher`` runs the very same watcher (Ray's class:
   same poll, same failure domains, same ``mark_preempt`` calls to the workers) as a thread
   of the controller, which has Ray Train imported already.
3. **A dataset manager with no datasets.** Ray Train starts a ``DatasetManager`` actor for
   every run, also one given no Ray Datasets (hybridray's loop reads its token shards
   itself). ``DatasetsOnlyWhenGiven`` starts it only when there are datasets.

Everything else is Ray's own controller. These subclass internal classes of Ray Train v2
(hybridray pins ``ray<2.61``); ``tests/train/test_controller.py`` checks the hooks they rely
on, and ``tests/train/test_train_cluster.py`` shows them working in a real run.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.preemption_callback import PreemptionCallback
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.preemption import PreemptionWatcher

FAST_POLL_S = 0.05      # between polls while a worker waits for a commit
LINGER_S = 2.0          # fast polls go on this long after a worker says it is finishing


class PromptCommitController(TrainController):
    """``TrainController`` whose poll comes early when a worker waits for a commit, and
    whose preemption watcher is a thread of its own process."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._commit_waiters = 0
        self._fast_until = 0.0
        self._wake: asyncio.Event | None = None
        super().__init__(*args, **kwargs)
        self._worker_group_callbacks_to_propagate = [
            InProcessPreemptionWatcher() if type(c) is PreemptionCallback else c
            for c in self._worker_group_callbacks_to_propagate]

    def _event(self) -> asyncio.Event:
        if self._wake is None:          # created on the actor's event loop
            self._wake = asyncio.Event()
        return self._wake

    def _gap(self) -> float:
        """Seconds between polls now."""
        if self._commit_waiters or time.monotonic() < self._fast_until:
            return FAST_POLL_S
        return self._health_check_interval_s

    async def _poll_workers(self):
        """Ray's ``_poll_workers``, whose wait ends early when a commit is awaited."""
        wake = self._event()
        while True:
            left = self._gap() - (time.monotonic() - self._latest_poll_time)
            if left <= 0:
                break
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), timeout=left)
            except asyncio.TimeoutError:
                pass
            if self.get_state().is_terminal():
                import ray

                ray.actor.exit_actor()
        status = self._worker_group.poll_status(timeout=self._health_check_interval_s)
        self._latest_poll_time = time.monotonic()
        return status

    async def get_all_reported_checkpoints(self, *args: Any, **kwargs: Any):
        self._commit_waiters += 1
        self._event().set()
        try:
            return await super().get_all_reported_checkpoints(*args, **kwargs)
        finally:
            self._commit_waiters -= 1

    async def expedite(self, seconds: float = LINGER_S) -> None:
        """Poll every ``FAST_POLL_S`` for ``seconds``: a worker's training function is
        about to return (``hybridray.train.loop.RaySession.finished``)."""
        self._fast_until = max(self._fast_until, time.monotonic() + seconds)
        self._event().set()


def expedite_controller() -> None:
    """From a Ray Train worker: ask the run's controller to poll soon (a no-op under any
    controller but ``PromptCommitController``)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        get_train_context().controller_actor.expedite.remote()
    except Exception:
        pass


class InProcessPreemptionWatcher(PreemptionCallback):
    """Ray's ``PreemptionCallback``, with Ray's ``PreemptionWatcher`` as a thread in the
    controller instead of an actor process of its own."""

    def after_worker_group_start(self, worker_group: Any) -> None:
        self._stop_watcher()
        node_to_ranks: dict[str, list[int]] = {}
        by_rank: dict[int, Any] = {}
        for w in worker_group.get_workers():
            rank = w.distributed_context.world_rank
            node_to_ranks.setdefault(w.metadata.node_id, []).append(rank)
            by_rank[rank] = w.actor
        self._watcher = PreemptionWatcher(node_to_ranks=node_to_ranks,
                                          poll_interval_s=self._poll_interval_s,
                                          worker_actors_by_rank=by_rank)

    def _stop_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher._stop_event.set()      # its daemon thread ends at its next wake-up


class _NoDatasets:
    """The shard provider of a run given no Ray Datasets."""

    def get_dataset_shard(self, dataset_info: Any) -> Any:
        raise KeyError(f"no dataset {dataset_info.dataset_name!r}: this run was given no "
                       "datasets (pass them through the trainer's `datasets` argument)")

    def shutdown_data_executors(self) -> None:
        pass


class DatasetsOnlyWhenGiven(DatasetsCallback):
    """Ray's ``DatasetsCallback``, which starts no ``DatasetManager`` actor for a run given
    no datasets."""

    def before_init_train_context(self, workers: list[Any]) -> dict[str, list[Any]]:
        if self._datasets:
            return super().before_init_train_context(workers)
        self._dataset_shard_provider = _NoDatasets()
        return {"dataset_shard_provider": [self._dataset_shard_provider] * len(workers)}
