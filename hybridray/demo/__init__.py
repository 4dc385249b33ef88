"""``hybridray demo``: the whole hybrid story on one machine, for real, in a few minutes.

Brings up clusters/local.yaml as a real three-site Ray cluster (named ``demo`` so it never
collides with a cluster of yours), prepares restricted data on-prem, syncs a masked copy to
a cloud (and shows a raw copy refused), trains a small language model with DDP in bf16 where
its data may go, serves it int8 beside an embedding model at several sites with autoscaling,
sends real HTTP requests, kills a cloud node under load, tears everything down, and writes a
report (``report.md`` with plots, ``report.json`` with the facts). ``quick=True`` is the CI
size.

    from hybridray.demo import run_demo
    facts = run_demo(quick=True, name="demo-ci", home="/tmp/hr")
"""

from hybridray.demo.run import CLUSTER_FILE, Settings, run_demo

__all__ = ["CLUSTER_FILE", "Settings", "run_demo"]
