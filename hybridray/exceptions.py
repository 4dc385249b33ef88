"""Every error hybridray raises on purpose, so callers can catch by meaning.

The CLI turns any ``HybridRayError`` into one clear message and a non-zero exit; it never
shows a traceback for these. Each message names the problem *and* the fix.

Hierarchy::

    HybridRayError
    ├── ConfigError                 a cluster file (or override) is invalid
    ├── PlacementRefused            no site may or can run a workload
    │   └── ResidencyViolation      a node was asked to touch data above its class
    │       └── NodeNotMember       the node is not a recorded member of the cluster (drift)
    ├── ClusterError                bringing a cluster up/down, attaching or connecting failed
    │   ├── ClusterNotFound         no recorded cluster of that name
    │   └── NetnsError              namespace hosts cannot be made here (not root) or failed
    ├── PlanInfeasible              the cost planner cannot meet the demand
    ├── DataError                   a dataset cannot be read, moved or committed as asked
    │   ├── IntegrityError          stored bytes, rows or schema differ from the manifest
    │   └── MaskingError            masking rules are invalid, or raw values survived them
    ├── TrainError                  a training run's model, data, checkpoint or storage is unusable
    ├── ResourceWaitTimeout         work waited on Ray for resources past its deadline
    └── DeployError                 deployment files cannot be rendered as asked
        └── CertificateError        a TLS certificate, key or CA is missing or does not match
"""

from __future__ import annotations


class HybridRayError(Exception):
    """Base class of all errors hybridray raises deliberately."""


class ConfigError(HybridRayError):
    """A cluster file, or a ``key=value`` override, is invalid.

    ``problems`` holds every problem found (one line each, ``file: key.path: message``),
    so a user fixes them all in one round instead of one per run.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class PlacementRefused(HybridRayError):
    """No site may (residency) or can (capacity, shape) run a workload.

    Attributes:
        rule: the rule that refused, e.g. ``"residency"`` or ``"capacity"``.
        fix: what the user can change to make the workload placeable.
    """

    def __init__(self, message: str, *, rule: str, fix: str):
        self.rule = rule
        self.fix = fix
        self.message = message
        super().__init__(f"{message} [rule: {rule}] Fix: {fix}")

    def __reduce__(self):  # keyword-only fields: pickle them so Ray can return the error
        return _rebuild, (type(self), (self.message,), {"rule": self.rule, "fix": self.fix})


class ResidencyViolation(PlacementRefused):
    """Raised inside a worker whose node may not hold the data class it was about to touch."""

    def __init__(self, message: str, *, fix: str):
        super().__init__(message, rule="residency", fix=fix)

    def __reduce__(self):
        return _rebuild, (type(self), (self.message,), {"fix": self.fix})


class NodeNotMember(ResidencyViolation):
    """Raised inside a worker whose node is not a recorded member of the cluster: it joined
    without ``hybridray up``/``attach``/``admit`` (drift), so it may not run placed work."""

    def __init__(self, message: str, *, fix: str):
        PlacementRefused.__init__(self, message, rule="drift", fix=fix)


class ClusterError(HybridRayError):
    """Starting, stopping, attaching or connecting to a hybridray cluster failed."""


class ClusterNotFound(ClusterError):
    """No cluster of that name is recorded in the state directory."""


class NetnsError(ClusterError):
    """Namespace hosts (``--hosts netns``) cannot run here, or making or cutting them failed."""


class PlanInfeasible(HybridRayError):
    """The demand cannot be met within capacity and residency; ``binding`` says why."""

    def __init__(self, message: str, binding: list[str]):
        self.binding = list(binding)
        super().__init__(message + ("\n  " + "\n  ".join(self.binding) if self.binding else ""))


class TrainError(HybridRayError):
    """A training run cannot start or go on: an unknown model size, an unreadable or mismatched
    checkpoint or dataset (the message names the file), a storage root that cannot be written."""


class ResourceWaitTimeout(HybridRayError):
    """Work waited for CPUs or GPUs longer than its deadline (``$HYBRIDRAY_WAIT_TIMEOUT_S``,
    ``--wait-timeout``); the message says what it waited for, where, what held it, and the
    fix. The wait was stopped the way Ctrl-C stops it (a Ray Train run is aborted)."""


class DeployError(HybridRayError):
    """``hybridray render`` cannot produce a site's files (an unsupported provider, a missing
    region, project or namespace: the message names the key and the fix). Nothing is written
    when it is raised."""


class CertificateError(DeployError):
    """A TLS certificate, key or CA is missing, unreadable, expired, or does not match the
    cluster's CA; the message names the file and how to issue a matching one."""


class DataError(HybridRayError):
    """A dataset cannot be synced, listed or read: a missing or corrupt source (the message
    names the file), mismatched schemas, a destination holding another dataset, storage that
    cannot be reached after bounded retries. Nothing is committed when it is raised."""


class IntegrityError(DataError):
    """Stored files differ from the committed manifest (sha256, size, rows or schema).

    ``problems`` holds one line per bad file, so one ``verify`` names them all.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        self.message = message
        super().__init__(message + ("\n  " + "\n  ".join(self.problems) if self.problems
                                    else ""))

    def __reduce__(self):
        return _rebuild, (type(self), (self.message, self.problems), {})


class MaskingError(DataError):
    """A masking spec is invalid, or a scan found a raw value that should have been masked."""


def _rebuild(cls, args, kwargs):
    """Unpickle an error whose constructor takes more than the message (Ray ships errors
    raised in tasks back to the driver by pickling them)."""
    return cls(*args, **kwargs)
