"""Connect to Ray: the configured cluster, the one a Ray Job runs in, or a local one."""

from __future__ import annotations

import os

import ray

from illada.config import RayConfig


def ensure_ray(config: RayConfig) -> None:
    """Initialise Ray once per process.

    With no address configured, a Ray Job's driver joins its cluster (RAY_ADDRESS is set
    there) and anything else starts a local Ray on this machine.
    """
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=True)
