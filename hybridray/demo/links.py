"""Traffic on every shaped link of a namespace cluster, sampled once a second for the report.

The bytes come from the kernel: each link direction is an HTB class on its site's uplink, and
``tc -s class show`` counts what went through it. The report plots the rate between samples
against the link's shaped rate, so a reader sees which links carried what, and that none
went faster than it was shaped to.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from hybridray.cluster import netns


class LinkSampler:
    """Samples every shaped link's byte counter in a thread until ``stop``."""

    def __init__(self, rec: netns.NetRecord, *, t0: float, interval: float = 1.0):
        self.rec, self.t0, self.interval = rec, t0, interval
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="link-sampler")

    def start(self) -> None:
        self._thread.start()

    def _sample(self) -> None:
        row: dict[str, Any] = {"t": round(time.time() - self.t0, 2), "bytes": {}}
        for link in self.rec.links:
            row["bytes"][f"{link.src}->{link.dst}"] = netns.class_bytes(self.rec, link.src,
                                                                        link.dst)
        self.samples.append(row)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception as e:  # a link removed at down: the report keeps what it has
                self.errors.append(f"{type(e).__name__}: {e}"[:200])
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        """Stop sampling; the facts for the report: shaped rates and samples."""
        self._stop.set()
        self._thread.join(timeout=10)
        return {"shaped_mbps": {f"{lk.src}->{lk.dst}": lk.mbps for lk in self.rec.links},
                "latency_applied": self.rec.netem, "samples": self.samples,
                "errors": self.errors[:5]}
