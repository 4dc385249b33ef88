"""The parts of Ray Train v2 that ``hybridray.train.controller`` builds on are still there.

It subclasses internal classes (hybridray pins ``ray<2.61``); a Ray release that renames one
of these hooks must fail here, by name, rather than quietly fall back to Ray's own slower
path. That the subclasses work is shown by a real run on the shared cluster:
``tests/train/test_train_cluster.py::test_checkpoints_commit_without_waiting_for_ray_trains_poll``.
"""

from __future__ import annotations

import inspect


def test_the_controller_hooks_exist():
    from ray.train.v2._internal.execution.controller import TrainController

    from hybridray.train.controller import PromptCommitController

    for name in ("_poll_workers", "get_all_reported_checkpoints", "get_state", "run",
                 "abort", "get_result"):
        assert callable(getattr(TrainController, name, None)), name
    assert inspect.iscoroutinefunction(TrainController._poll_workers)
    assert inspect.iscoroutinefunction(TrainController.get_all_reported_checkpoints)
    init = inspect.getsource(TrainController.__init__)
    for attr in ("self._health_check_interval_s", "self._latest_poll_time",
                 "self._worker_group_callbacks_to_propagate", "PreemptionCallback()"):
        assert attr in init, attr
    assert inspect.iscoroutinefunction(PromptCommitController.expedite)


def test_the_preemption_and_dataset_hooks_exist():
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.preemption_callback import PreemptionCallback
    from ray.train.v2._internal.execution.preemption import PreemptionWatcher

    assert {"node_to_ranks", "poll_interval_s", "worker_actors_by_rank"} <= set(
        inspect.signature(PreemptionWatcher.__init__).parameters)
    assert "self._stop_event" in inspect.getsource(PreemptionWatcher.__init__)
    assert "self._poll_interval_s" in inspect.getsource(PreemptionCallback.__init__)
    assert callable(PreemptionCallback._stop_watcher)
    init = inspect.getsource(DatasetsCallback.__init__)
    assert "self._datasets" in init and "self._dataset_shard_provider" in init
    assert "dataset_shard_provider" in inspect.getsource(
        DatasetsCallback.before_init_train_context)


def test_a_run_without_datasets_gets_a_provider_that_names_the_fix():
    import pytest
    from ray.train.v2._internal.data_integration.interfaces import DatasetShardMetadata

    from hybridray.train.controller import _NoDatasets

    with pytest.raises(KeyError, match="given no datasets"):
        _NoDatasets().get_dataset_shard(DatasetShardMetadata("train", 0))


def test_the_placement_group_hooks_exist():
    """``train`` drops Ray Train's cleaner callback by its class and removes the run's groups
    by their creator (``trainer.remove_placement_groups``): both must still be there."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert "PlacementGroupCleanerCallback()" in inspect.getsource(
        DataParallelTrainer._create_default_callbacks)
    assert callable(PlacementGroupCleanerCallback.after_worker_group_start)
    assert callable(state._connect_and_get_accessor)
    fields = {f.name for f in gcs_pb2.PlacementGroupTableData.DESCRIPTOR.fields}
    assert {"creator_actor_id", "state", "placement_group_id"} <= fields
