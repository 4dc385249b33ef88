"""Gradient traffic across slow links: compressed DDP hooks, local SGD, DiLoCo, and byte counts.

When workers sit at two sites, every DDP step all-reduces a full copy of the gradients over
the WAN link. Two ways to cut that, selectable with ``wan.mode``:

* **Compress every step** with a DDP communication hook from
  ``torch.distributed.algorithms.ddp_comm_hooks``: ``bf16``/``fp16`` halve the bytes,
  ``powersgd`` sends rank-``r`` factors of each gradient matrix (with error feedback).
* **Communicate rarely**: ``localsgd`` averages the weights every ``sync_every`` steps;
  ``diloco`` treats the change since the last round as a pseudo-gradient and applies it with
  an outer Nesterov-momentum step (Douillard et al., 2023). Workers at the same site still
  all-reduce gradients every step among themselves (``site_ddp``): that traffic stays inside
  the site.

Every collective is counted in bytes as it is issued (the payload one rank contributes). The
bytes that cross sites are estimated with the ring all-reduce model Gloo and NCCL use for
large tensors: each rank sends ``2(W-1)/W`` times the payload to the next rank, so every
ring edge between ranks at different sites carries that much over a site link.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

FP32_BYTES = 4


def ring_edge_bytes(payload: float, world: int) -> float:
    """Bytes one ring edge carries for an all-reduce of ``payload`` bytes over ``world`` ranks."""
    return 0.0 if world < 2 else 2.0 * (world - 1) / world * payload


def cross_site_links(sites: list[str]) -> Counter:
    """Ring edges ``(src site, dst site)`` between ranks at different sites, with multiplicity."""
    world = len(sites)
    if world < 2:
        return Counter()
    return Counter((sites[i], sites[(i + 1) % world]) for i in range(world)
                   if sites[i] != sites[(i + 1) % world])


def cross_site_bytes(payload: float, sites: list[str]) -> float:
    """Bytes sent over site links by one all-reduce of ``payload`` bytes among all ranks."""
    return ring_edge_bytes(payload, len(sites)) * sum(cross_site_links(sites).values())


class ByteMeter:
    """Bytes each rank put into collectives: among all ranks, and within its own site."""

    def __init__(self):
        self._lock = threading.Lock()   # DDP hooks and their callbacks run on other threads
        self.all_ranks = 0
        self.site_local = 0

    def add(self, nbytes: int, *, scope: str) -> None:
        with self._lock:
            if scope == "all":
                self.all_ranks += int(nbytes)
            else:
                self.site_local += int(nbytes)

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.all_ranks, self.site_local


def _counted_hook(hook: Any, meter: ByteMeter, scope: str, element_bytes: int | None):
    """``hook`` wrapped to count the bytes of each bucket it all-reduces."""
    def counted(state, bucket):  # unannotated: DDP checks hook annotations at runtime
        buf = bucket.buffer()
        meter.add(buf.numel() * (element_bytes or buf.element_size()), scope=scope)
        return hook(state, bucket)

    return counted


def _counted_powersgd(meter: ByteMeter, scope: str):
    """PowerSGD wrapped to count what it sends: the whole bucket during its plain all-reduce
    warm-up, afterwards the P and Q factors plus the tensors it leaves uncompressed.

    One bucket at a time: PowerSGD issues a bucket's P and Q all-reduces from callbacks of
    its futures, on the process group's threads, while backward goes on issuing the next
    bucket's from its own thread. Which comes first depends on timing, and the ranks of a
    collective must issue it in the same order (Gloo pairs them by that order; over a slow
    link the ranks disagree and Gloo aborts with "Received data size doesn't match expected
    size"). So a bucket's hook first waits for the previous bucket's whole exchange: every
    rank then issues U0 P0 Q0 U1 P1 Q1 ... Backward waits for the link a little longer; the
    bytes sent are the same.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as P

    previous: list[Any] = []          # the future of the last bucket this rank started

    def counted(state, bucket):
        if previous:
            previous.pop().wait()
        buf = bucket.buffer()
        vanilla = state.iter < state.start_powerSGD_iter
        before = state.total_numel_after_compression
        fut = P.powerSGD_hook(state, bucket)
        sent = buf.numel() if vanilla else state.total_numel_after_compression - before
        meter.add(sent * buf.element_size(), scope=scope)
        previous.append(fut)
        return fut

    return counted


class WanStrategy:
    """How one worker's gradients and weights travel; built by ``make_strategy``.

    ``wrap`` returns the module to train (DDP or the model itself), ``after_step`` runs the
    averaging rounds of local SGD / DiLoCo, ``payload_per_step_fp32`` is what plain fp32 DDP
    would send per step (the "before" of the report).
    """

    def __init__(self, wan: Any, sites: list[str], rank: int, device: torch.device):
        self.wan = wan
        self.mode = wan.mode
        self.sites = sites
        self.rank = rank
        self.world = len(sites)
        self.device = device
        self.meter = ByteMeter()
        self.site_group: Any = None
        self.site_world = self.world
        self._powersgd_state: Any = None
        self._outer: torch.optim.Optimizer | None = None
        self._anchor: list[torch.Tensor] = []
        self._params: list[nn.Parameter] = []

    # -- building ---------------------------------------------------------------------------
    def wrap(self, model: nn.Module, raw: nn.Module) -> nn.Module:
        """The module to train: DDP with this mode's hook, or ``model`` for local rounds."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        self._params = [p for p in raw.parameters() if p.requires_grad]
        ids = [self.device.index] if self.device.type == "cuda" else None
        if self.world < 2:
            return model
        if self.mode in ("localsgd", "diloco"):
            self._make_site_groups()
            with torch.no_grad():  # start every replica from rank 0's weights, as DDP does
                flat = torch.cat([p.detach().reshape(-1) for p in self._params])
                dist.broadcast(flat, src=0)
                self._scatter(flat, self._params)
            if self.mode == "diloco":
                self._anchor = [p.detach().clone().float() for p in self._params]
                self._outer = torch.optim.SGD(self._anchor, lr=self.wan.outer_lr,
                                              momentum=self.wan.outer_momentum, nesterov=True)
            if self.site_world < 2 or not self.wan.site_ddp:
                return model
            ddp = DDP(model, device_ids=ids, process_group=self.site_group,
                      gradient_as_bucket_view=True)
            ddp.register_comm_hook(self.site_group, _counted_hook(
                _default_hooks().allreduce_hook, self.meter, "site", None))
            return ddp
        ddp = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
        hooks = _default_hooks()
        if self.mode == "fp32":
            ddp.register_comm_hook(None, _counted_hook(hooks.allreduce_hook, self.meter, "all",
                                                       None))
        elif self.mode in ("bf16", "fp16"):
            hook = hooks.bf16_compress_hook if self.mode == "bf16" else hooks.fp16_compress_hook
            ddp.register_comm_hook(None, _counted_hook(hook, self.meter, "all", 2))
        elif self.mode == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as P

            self._powersgd_state = P.PowerSGDState(
                process_group=None, matrix_approximation_rank=self.wan.powersgd_rank,
                start_powerSGD_iter=self.wan.powersgd_start, min_compression_rate=2,
                use_error_feedback=True, warm_start=True, random_seed=0)
            ddp.register_comm_hook(self._powersgd_state, _counted_powersgd(self.meter, "all"))
        return ddp

    def _make_site_groups(self) -> None:
        # Every rank must create every group, in the same order.
        for site in sorted(set(self.sites)):
            ranks = [r for r, s in enumerate(self.sites) if s == site]
            group = dist.new_group(ranks)
            if self.sites[self.rank] == site:
                self.site_group, self.site_world = group, len(ranks)

    # -- rounds -----------------------------------------------------------------------------
    def syncs_at(self, step: int, last_step: int) -> bool:
        """Whether an averaging round follows optimizer step ``step`` (1-based)."""
        return self.mode in ("localsgd", "diloco") and self.world > 1 and (
            step % self.wan.sync_every == 0 or step == last_step)

    @torch.no_grad()
    def after_step(self, step: int, last_step: int) -> None:
        """Run the averaging round of local SGD / DiLoCo when one is due."""
        if not self.syncs_at(step, last_step):
            return
        dtype = torch.bfloat16 if self.wan.outer_dtype == "bf16" else torch.float32
        if self.mode == "localsgd":
            flat = torch.cat([p.detach().reshape(-1).to(dtype) for p in self._params])
            self._all_reduce_mean(flat)
            self._scatter(flat, self._params)
            return
        assert self._outer is not None
        flat = torch.cat([(a - p.detach().float()).reshape(-1).to(dtype)
                          for a, p in zip(self._anchor, self._params, strict=True)])
        self._all_reduce_mean(flat)
        offset = 0
        for a in self._anchor:
            n = a.numel()
            a.grad = flat[offset:offset + n].view_as(a).float()
            offset += n
        self._outer.step()
        self._outer.zero_grad(set_to_none=True)
        for a, p in zip(self._anchor, self._params, strict=True):
            p.copy_(a.to(p.dtype))

    def _all_reduce_mean(self, flat: torch.Tensor) -> None:
        self.meter.add(flat.numel() * flat.element_size(), scope="all")
        dist.all_reduce(flat)
        flat.div_(self.world)

    @staticmethod
    def _scatter(flat: torch.Tensor, params: list[nn.Parameter]) -> None:
        offset = 0
        for p in params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p).to(p.dtype))
            offset += n

    # -- reporting and state ----------------------------------------------------------------
    def payload_per_step_fp32(self) -> int:
        """Bytes per step plain fp32 DDP would all-reduce among all ranks (the baseline)."""
        return sum(p.numel() for p in self._params) * FP32_BYTES if self.world > 1 else 0

    def report(self, all_bytes: float, site_bytes: float, steps: int) -> dict[str, Any]:
        """Per-step communication figures for ``steps`` steps that moved these bytes."""
        steps = max(steps, 1)
        payload = all_bytes / steps
        base = self.payload_per_step_fp32()
        cross = cross_site_bytes(payload, self.sites)
        base_cross = cross_site_bytes(base, self.sites)
        return {
            "wan_mode": self.mode,
            "comm_bytes_per_step": payload + site_bytes / steps,
            "comm_bytes_per_step_all_ranks": payload,
            "baseline_comm_bytes_per_step": base,
            "cross_site_bytes_per_step": cross,
            "baseline_cross_site_bytes_per_step": base_cross,
            "comm_reduction": base / payload if payload else None,
        }

    def state_dict(self) -> dict[str, Any] | None:
        if self._outer is None:
            return None
        return {"outer": self._outer.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self._outer is None:
            return
        # the checkpoint holds averaged weights: they are the anchor of the next round
        for a, p in zip(self._anchor, self._params, strict=True):
            a.copy_(p.detach().float())
        if state and state.get("outer"):
            self._outer.load_state_dict(state["outer"])


def _default_hooks():
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks


def make_strategy(wan: Any, sites: list[str], rank: int, device: torch.device) -> WanStrategy:
    """The strategy for ``wan`` (a ``WanSection``) given the site of every rank."""
    return WanStrategy(wan, sites, rank, device)
