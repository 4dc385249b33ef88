"""The public API is exactly what ``hybridray.__all__`` lists, and all of it resolves."""

import hybridray


def test_all_names_resolve_and_are_unique():
    missing = [name for name in hybridray.__all__ if not hasattr(hybridray, name)]
    assert missing == []
    assert len(set(hybridray.__all__)) == len(hybridray.__all__)


def test_public_objects_are_documented():
    undocumented = [name for name in hybridray.__all__ if not name.startswith("__")
                    and callable(getattr(hybridray, name))
                    and not (getattr(hybridray, name).__doc__ or "").strip()]
    assert undocumented == []


def test_core_names_exported():
    for name in ("connect", "Cluster", "Workload", "decide", "task_options", "scaling_config",
                 "serve_options", "data_remote_args", "job_submit_kwargs", "load_topology",
                 "plan", "AuditLog", "PlacementRefused", "ResidencyViolation"):
        assert name in hybridray.__all__, name


def test_importing_hybridray_does_not_import_ray_or_scipy():
    import subprocess
    import sys

    code = "import sys, hybridray; print('ray' in sys.modules, 'scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


def test_subpackages_work_after_a_bare_import_without_loading_ray():
    import subprocess
    import sys

    code = ("import sys, hybridray; f = (hybridray.serve.deploy, hybridray.train.train, "
            "hybridray.storage.sync_dataset); print(all(map(callable, f)), 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "False"]
