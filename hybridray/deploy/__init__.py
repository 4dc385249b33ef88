"""Deploying a topology for real: rendered files, the cluster's secrets, jobs placed by policy.

``render`` writes what operators run (``ray up`` files for cloud VMs, join scripts and a
systemd unit for static hosts, KubeRay ``RayCluster`` manifests, a README), all at once or
not at all; ``certs``/``secrets`` make the token, the cluster CA and host certificates those
files refer to; ``jobs.submit`` places a job's driver by policy. docs/deploy.md tells the
whole story. Importing this package does not import Ray.
"""

from hybridray.deploy.common import RenderOptions
from hybridray.deploy.render import Rendered, build, render

__all__ = ["RenderOptions", "Rendered", "build", "render"]
