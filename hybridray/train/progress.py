"""Progress of a running training: an actor rank 0 reports to, and the console view of it.

Ray Train keeps only the metrics of the last report; users want to watch every log interval,
and a restart must be visible (and its redone steps counted) even though the worker group
that reported before it is gone. So rank 0 also sends each step and log record to a small
actor on the driver's own node (it outlives any worker node), and the driver polls it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from hybridray.train.config import TrainConfig


class Board:
    """Actor rank 0 reports progress to; the driver polls it (also across restarts)."""

    def __init__(self):
        self.attempts: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.step = 0
        self.summary: dict[str, Any] | None = None

    def start(self, step: int, resumed: bool, sites: list[str]) -> None:
        self.attempts.append({"start_step": step, "max_step": step, "resumed": resumed,
                              "sites": sites, "started_at": time.time()})
        self.step = step

    def step_done(self, step: int) -> None:
        self.step = step
        if self.attempts:
            self.attempts[-1]["max_step"] = max(self.attempts[-1]["max_step"], step)

    def log(self, metrics: dict[str, Any]) -> None:
        self.logs.append(metrics)

    def finish(self, summary: dict[str, Any]) -> None:
        """The last attempt's end-to-end figures, sent once its last checkpoint committed."""
        self.summary = summary

    def poll(self, since: int) -> dict[str, Any]:
        return {"attempts": self.attempts, "logs": self.logs[since:], "step": self.step,
                "summary": self.summary}


def driver_node_strategy():
    """Keep the progress board on the driver's own node, hard.

    It must outlive any worker node: the record of a run that lost a node is the point of
    it. A soft preference for the head let Ray put it elsewhere when the head looked busy,
    and it died with the node the chaos test killed (the restart went unrecorded). The
    driver's node is the one node whose loss ends the run anyway: the driver dies with it.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


class Watcher:
    """The driver's copy of the board, kept current by a background thread.

    The final record must not depend on one last call succeeding: a run that lost a node
    leaves the cluster busy for a while, and a single slow ``poll`` used to return an empty
    record (no attempts, no logs) for a run that had in fact restarted and finished. So the
    driver polls all along, keeps what it has seen, and a failed poll only means the record
    is as of the previous one (``error`` says why).
    """

    def __init__(self, board: Any, interval: float = 1.0,
                 on_update: Callable[[list, list, int], None] | None = None):
        self.board, self.interval, self.on_update = board, interval, on_update
        self.attempts: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.step = 0
        self.summary: dict[str, Any] | None = None
        self.error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="train-watch")

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self, attempts: int = 3, timeout: float = 30.0) -> dict[str, Any]:
        """Stop polling, take one last look (retried), and return the record."""
        self._stop.set()
        self._thread.join(timeout=timeout)
        for _ in range(attempts):
            if self.poll(timeout):
                break
        return self.state()

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"attempts": list(self.attempts), "logs": list(self.logs),
                    "step": self.step, "summary": self.summary, "error": self.error}

    def poll(self, timeout: float = 10.0) -> bool:
        import ray

        with self._lock:
            try:
                state = ray.get(self.board.poll.remote(len(self.logs)), timeout=timeout)
            except Exception as e:   # watching must never take the run down
                self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                return False
            new_attempts = state["attempts"][len(self.attempts):]
            self.attempts = list(state["attempts"])
            self.logs.extend(state["logs"])
            self.step, self.error = state["step"], None
            self.summary = state.get("summary") or self.summary
        if self.on_update:
            self.on_update(new_attempts, state["logs"], state["step"])
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()


class Display:
    """Live console view: a step bar plus one line per log interval, fed by a ``Watcher``."""

    def __init__(self, config: TrainConfig, plan: Any):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.config, self.plan = config, plan
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=self.console, transient=False)
        self.task = self.progress.add_task(plan.run_name, total=config.train.steps, info="")

    def start(self) -> None:
        sites = Counter(self.plan.placement.assign(self.config.train.max_workers))
        self.console.print(f"[bold]{self.plan.run_name}[/]: {self.plan.model_name}, "
                           f"{self.plan.data_class.value} data, workers "
                           + ", ".join(f"{s}×{n}" for s, n in sites.items())
                           + f", wan {self.config.wan.mode}, checkpoints "
                             f"{self.plan.storage_uri}/{self.plan.run_name}")
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def update(self, new_attempts: list[dict[str, Any]], new_logs: list[dict[str, Any]],
               step: int) -> None:
        for attempt in new_attempts:
            if attempt["resumed"]:
                self.console.print(f"[yellow]restarted[/] from the checkpoint at step "
                                   f"{attempt['start_step']} on "
                                   + ", ".join(f"{s}×{n}" for s, n in
                                               Counter(attempt["sites"]).items()))
        for m in new_logs:
            self.console.print(_log_line(m))
        info = ""
        if new_logs:
            m = new_logs[-1]
            info = f"loss {m['loss']:.3f}  {m['tokens_per_s']:,.0f} tok/s"
            self.progress.update(self.task, info=info)
        self.progress.update(self.task, completed=step)


def _log_line(m: dict[str, Any]) -> str:
    sites = ", ".join(f"{s}×{n}" for s, n in m.get("workers_per_site", {}).items())
    comm = m.get("comm_bytes_per_step") or 0
    return (f"step {m['step']:>6}/{m['steps']}  loss {m['loss']:.4f}  eval "
            f"{m['eval_loss']:.4f}@{m.get('eval_step', '?')}  {m['tokens_per_s']:>8,.0f} tok/s  "
            "MFU "
            f"{100 * m['mfu']:5.2f}%  lr {m['lr']:.2e}  {sites}  wan {m.get('wan_mode')} "
            f"{comm / 1e6:.2f} MB/step ({(m.get('cross_site_bytes_per_step') or 0) / 1e6:.2f} "
            "MB across sites)")
