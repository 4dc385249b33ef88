"""Progress of a running training: an actor rank 0 reports to, and the console view of it.

Ray Train keeps only the metrics of the last report; users want to watch every log interval,
and a restart must be visible (and its redone steps counted) even though the worker group
that reported before it is gone. So rank 0 also sends each step and log record to a small
actor on the head node, which outlives any worker node, and the driver polls it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from hybridray import labels as L
from hybridray.train.config import TrainConfig


class Board:
    """Actor rank 0 reports progress to; the driver polls it (also across restarts)."""

    def __init__(self):
        self.attempts: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.step = 0

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

    def poll(self, since: int) -> dict[str, Any]:
        return {"attempts": self.attempts, "logs": self.logs[since:], "step": self.step}


def head_node_strategy():
    """Keep the progress board on the head (it outlives any worker node), else here."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((n["NodeID"] for n in ray.nodes() if n.get("Alive")
                 and (n.get("Labels") or {}).get(L.ROLE) == "head"),
                ray.get_runtime_context().get_node_id())
    return NodeAffinitySchedulingStrategy(head, soft=True)


class Display:
    """Live console view: a step bar plus one line per log interval, fed by the board."""

    def __init__(self, board: Any, config: TrainConfig, plan: Any):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.board, self.config, self.plan = board, config, plan
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=self.console, transient=False)
        self.task = self.progress.add_task(plan.run_name, total=config.train.steps, info="")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="train-display")
        self._seen_logs = 0
        self._seen_attempts = 0

    def start(self) -> None:
        sites = Counter(self.plan.placement.assign(self.config.train.max_workers))
        self.console.print(f"[bold]{self.plan.run_name}[/]: {self.config.model.size} GPT, "
                           f"{self.plan.data_class.value} data, workers "
                           + ", ".join(f"{s}×{n}" for s, n in sites.items())
                           + f", wan {self.config.wan.mode}, checkpoints "
                             f"{self.plan.storage_uri}/{self.plan.run_name}")
        self.progress.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()
        self.progress.stop()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._poll()
            except Exception:  # the display must never take the run down
                pass

    def _poll(self) -> None:
        import ray

        state = ray.get(self.board.poll.remote(self._seen_logs), timeout=10)
        for attempt in state["attempts"][self._seen_attempts:]:
            if attempt["resumed"]:
                self.console.print(f"[yellow]restarted[/] from the checkpoint at step "
                                   f"{attempt['start_step']} on "
                                   + ", ".join(f"{s}×{n}" for s, n in
                                               Counter(attempt["sites"]).items()))
        self._seen_attempts = len(state["attempts"])
        for m in state["logs"]:
            self.console.print(_log_line(m))
        self._seen_logs += len(state["logs"])
        info = ""
        if state["logs"]:
            m = state["logs"][-1]
            info = f"loss {m['loss']:.3f}  {m['tokens_per_s']:,.0f} tok/s"
        self.progress.update(self.task, completed=state["step"], info=info)


def _log_line(m: dict[str, Any]) -> str:
    sites = ", ".join(f"{s}×{n}" for s, n in m.get("workers_per_site", {}).items())
    comm = m.get("comm_bytes_per_step") or 0
    return (f"step {m['step']:>6}/{m['steps']}  loss {m['loss']:.4f}  eval "
            f"{m['eval_loss']:.4f}@{m.get('eval_step', '?')}  {m['tokens_per_s']:>8,.0f} tok/s  "
            "MFU "
            f"{100 * m['mfu']:5.2f}%  lr {m['lr']:.2e}  {sites}  wan {m.get('wan_mode')} "
            f"{comm / 1e6:.2f} MB/step ({(m.get('cross_site_bytes_per_step') or 0) / 1e6:.2f} "
            "MB across sites)")
