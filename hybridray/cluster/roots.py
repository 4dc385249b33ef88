"""A cluster's storage is its own: ``up`` and ``attach`` refuse a cluster whose storage
another one uses.

Two clusters writing under one storage root overwrite each other's datasets and checkpoints
without any error: the demo (cluster ``demo`` from ``clusters/local.yaml``) once replaced a
user's ``onprem:datasets/tickets`` because both clusters' roots were the same directory. The
shipped cluster files now put ``${HYBRIDRAY_CLUSTER}`` (the cluster's own name) into every
root; this module is the guard for files that do not.

Two checks, before anything starts:

* every ``file://`` root gets an owner file (``.hybridray-cluster``, the cluster's name and
  home) when the cluster first comes up; a root, or a directory above one, whose owner file
  names another cluster is refused. This still holds after that cluster is down, because its
  data is still there.
* the roots of every cluster recorded in the same ``HYBRIDRAY_HOME`` are compared with this
  one's: the same root, or one inside the other, is refused. Object-store roots count too,
  except those served by a local cluster's own in-memory S3 server (no other cluster can see
  them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hybridray.exceptions import ClusterError
from hybridray.topology.models import Topology

OWNER_FILE = ".hybridray-cluster"


def check_storage_is_own(topology: Topology, home: Path, *, simulate: bool = False) -> None:
    """Raise ``ClusterError`` when another cluster uses (or used) one of these roots."""
    mine = _shared_roots(topology, simulate=simulate)
    for site, root in mine.items():
        if root.startswith("file://"):
            owner = _owner_above(Path(root[len("file://"):]))
            if owner is not None and owner[1].get("cluster") != topology.name:
                path, data = owner
                raise ClusterError(
                    f"sites.{site}.storage.root {root} is inside the storage of cluster "
                    f"{data.get('cluster')!r} ({path}); two clusters in one root overwrite "
                    "each other's data. Give this cluster a root of its own (put "
                    "${HYBRIDRAY_CLUSTER} in storage.root, as clusters/local.yaml does), or "
                    f"delete {path} if cluster {data.get('cluster')!r} no longer uses it")
    for other in _recorded(home, topology.name):
        theirs = _shared_roots(other, simulate=False)
        for site, root in mine.items():
            for their_site, their_root in theirs.items():
                if _overlap(root, their_root):
                    raise ClusterError(
                        f"sites.{site}.storage.root {root} overlaps cluster {other.name!r}'s "
                        f"sites.{their_site}.storage.root {their_root} (both recorded in "
                        f"{home}); two clusters in one root overwrite each other's data. Put "
                        "${HYBRIDRAY_CLUSTER} in storage.root, or pick another root")


def claim_storage(topology: Topology, home: Path, *, existing_only: bool = False) -> None:
    """Write the owner file into each ``file://`` root (best effort: a root that cannot be
    created now is reported by the first command that writes there). ``existing_only``
    (attach): only roots already on this machine; one that is not is another host's."""
    body = json.dumps({"cluster": topology.name, "home": str(home)}) + "\n"
    for root in {s.storage.root for s in topology.sites.values()}:
        if not root.startswith("file://"):
            continue
        path = Path(root[len("file://"):]) / OWNER_FILE
        if existing_only and not path.parent.is_dir():
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                tmp = path.with_name(f"{OWNER_FILE}.{os.getpid()}")
                tmp.write_text(body)
                os.replace(tmp, path)
        except OSError:
            continue


def _shared_roots(topology: Topology, *, simulate: bool) -> dict[str, str]:
    """Site -> root for the roots another cluster could also reach."""
    from hybridray.storage import emulator

    private = set(emulator.emulated_sites(topology, simulate=simulate))
    out = {}
    for name, site in topology.sites.items():
        if name in private:
            continue
        root = site.storage.root.rstrip("/")
        if site.storage.endpoint:
            root = f"{root}@{site.storage.endpoint}"
        out[name] = root
    return out


def _overlap(a: str, b: str) -> bool:
    a_ep, b_ep = a.partition("@")[2], b.partition("@")[2]
    a, b = a.partition("@")[0], b.partition("@")[0]
    if a_ep != b_ep:
        return False
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _owner_above(root: Path) -> tuple[Path, dict] | None:
    """The nearest owner file at ``root`` or above it."""
    for directory in (root, *root.parents):
        path = directory / OWNER_FILE
        try:
            return path, json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return path, {"cluster": "?"}
    return None


def _recorded(home: Path, name: str) -> list[Topology]:
    """Topologies of the other clusters recorded in ``home`` (unreadable records skipped)."""
    from hybridray.cluster.state import list_clusters, load_state

    out = []
    for other in list_clusters(home):
        if other == name:
            continue
        try:
            out.append(Topology.model_validate(load_state(other, home=home).topology_snapshot))
        except Exception:  # a damaged record is status's business, not a reason to refuse
            continue
    return out
