"""The live-capacity snapshot: never older than its bound, refreshed while used, quiet when idle.

Pure tests with a counting reader (no Ray); ``test_on_cluster.py`` checks live placement on a
real cluster (``test_live_capacity_orders_fastest_by_free_units``), and
``test_snapshot_follows_a_real_cluster`` below checks it against Ray itself.
"""

from __future__ import annotations

import pickle
import time

import pytest

from hybridray.placement.snapshot import CapacitySnapshots, Snapshot


class Reader:
    """Counts readings; each returns a snapshot naming its number."""

    def __init__(self, fail_after: int | None = None):
        self.count = 0
        self.fail_after = fail_after
        self.connection = "a"

    def __call__(self) -> Snapshot:
        if self.fail_after is not None and self.count >= self.fail_after:
            raise ConnectionError("GCS unreachable")
        self.count += 1
        return Snapshot([{"reading": self.count}], {}, time.monotonic(), self.connection)


def until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


def snapshots(reader: Reader, **kw) -> CapacitySnapshots:
    return CapacitySnapshots(reader=reader, connection=lambda: reader.connection, **kw)


def test_a_reading_is_reused_until_it_is_older_than_the_bound():
    reader = Reader()
    snaps = snapshots(reader, max_age_s=0.2, refresh_s=60)   # no background reading here
    try:
        first = snaps.get()
        assert snaps.get() is first and reader.count == 1
        assert until(lambda: first.age_s > 0.2)
        again = snaps.get()
        assert again is not first and reader.count == 2 and again.age_s <= 0.2
    finally:
        snaps.close()


def test_a_decision_may_ask_for_a_fresher_reading_than_the_bound():
    reader = Reader()
    snaps = snapshots(reader, max_age_s=60, refresh_s=60)
    try:
        first = snaps.get()
        fresh = snaps.get(max_age_s=0)          # as a training run's or a sync's decision
        assert fresh is not first and reader.count == 2
        assert snaps.get() is fresh             # and later decisions use that reading
    finally:
        snaps.close()


def test_max_age_zero_reads_for_every_decision_and_starts_no_thread():
    reader = Reader()
    snaps = snapshots(reader, max_age_s=0)
    for _ in range(5):
        snaps.get()
    assert reader.count == 5 and snaps._thread is None


def test_a_decision_that_reads_afresh_starts_no_background_reader():
    # a training run's or a sync's placement: the thread would poll the GCS for idle_s
    reader = Reader()
    snaps = snapshots(reader, max_age_s=5)
    for _ in range(3):
        snaps.get(max_age_s=0)
    assert reader.count == 3 and snaps._thread is None
    snaps.get()                                    # a decision that may reuse one does
    assert snaps._thread is not None
    snaps.close()


def test_the_background_thread_refreshes_while_used_and_stops_when_idle():
    reader = Reader()
    snaps = snapshots(reader, max_age_s=5, refresh_s=0.02, idle_s=0.3)
    try:
        snaps.get()
        assert until(lambda: reader.count >= 3)          # refreshed without being asked
        assert snaps.get().nodes[0]["reading"] >= 3      # and decisions see the new one
        assert until(lambda: not snaps._thread.is_alive())   # idle: it stopped
        stopped_at = reader.count
        time.sleep(0.1)
        assert reader.count == stopped_at                # an idle driver reads nothing
        snaps.get()
        assert snaps._thread.is_alive()                  # used again: refreshing again
    finally:
        snaps.close()


def test_a_change_of_rays_auth_settings_stops_every_background_reader_first():
    """Ray aborts the process when a GCS call of the old connection meets a new token, so
    the in-process switch to another cluster's token stops the readers before it."""
    from hybridray.cluster.auth import _sync_ray_auth

    reader = Reader()
    snaps = snapshots(reader, max_age_s=5, refresh_s=0.02, idle_s=60)
    try:
        snaps.get()
        assert until(lambda: reader.count >= 2) and snaps._thread.is_alive()
        _sync_ray_auth()
        assert snaps._thread is None                     # stopped and joined
        stopped_at = reader.count
        time.sleep(0.1)
        assert reader.count == stopped_at                # no read crosses the change
        snaps.get()
        assert snaps._thread.is_alive()                  # the next decision restarts it
    finally:
        snaps.close()


def test_a_new_ray_connection_is_never_served_the_old_reading():
    reader = Reader()
    snaps = snapshots(reader, max_age_s=60, refresh_s=60)
    try:
        snaps.get()
        reader.connection = "b"                           # ray.shutdown(); ray.init(other)
        got = snaps.get()
        assert reader.count == 2 and got.connection == "b"
    finally:
        snaps.close()


def test_a_failing_background_read_drops_the_reading_and_the_caller_sees_the_error():
    reader = Reader(fail_after=1)
    snaps = snapshots(reader, max_age_s=60, refresh_s=0.02)
    try:
        snaps.get()
        assert until(lambda: not snaps._thread.is_alive())
        with pytest.raises(ConnectionError):
            snaps.get()
    finally:
        snaps.close()


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        CapacitySnapshots(refresh_s=0)
    with pytest.raises(ValueError):
        CapacitySnapshots(max_age_s=-1)


def test_a_cluster_object_pickles_without_its_snapshot_thread():
    import hybridray
    from hybridray.topology import load_topology
    from tests.paths import CLUSTERS

    cluster = hybridray.Cluster(load_topology(CLUSTERS / "local.yaml"))
    cluster._snapshots = snapshots(Reader())
    copy = pickle.loads(pickle.dumps(cluster))
    assert copy._snapshots is None and copy.name == cluster.name


@pytest.mark.slow
def test_snapshot_follows_a_real_cluster(hr_cluster):
    """Against Ray itself: a decision's capacity is Ray's, no older than the bound, and a
    change in free CPUs reaches decisions without anyone invalidating anything."""
    import ray

    from hybridray.placement import Workload

    wl = Workload(cpus=1, site="cloud-a", burst=False, data_classes="public")

    def free_at_cloud_a() -> int:
        return hr_cluster.place(wl).primary.units_free

    before = free_at_cloud_a()
    snaps = hr_cluster._snapshots
    assert snaps is not None and snaps.get().age_s <= snaps.max_age_s

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self):
            return True

    holder = hr_cluster.actor(Holder, wl)
    try:
        ray.get(holder.ready.remote())
        assert until(lambda: free_at_cloud_a() == before - 1, timeout=30)
    finally:
        ray.kill(holder)
    assert until(lambda: free_at_cloud_a() == before, timeout=30)
