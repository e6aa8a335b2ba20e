"""Joining a Ray cluster, or starting a local one for this server, and leaving it."""

from __future__ import annotations

import os


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to the cluster at `address`, or start a local one bound to 127.0.0.1 (the
    same command on a laptop and, with an address, on a cluster). Returns whether this
    process started it, and so must stop it."""
    import ray

    if address is not None:
        ray.init(address=address, log_to_driver=True)
        return False
    # Ray's ports listen on every interface whatever the address, so its token auth stays
    # on (its default; the token is made once in ~/.ray/auth_token)
    ray.init(num_cpus=num_cpus or os.cpu_count(), _node_ip_address="127.0.0.1",
             include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    return True


def stop_ray() -> None:
    """Ray's own processes (GCS, raylet, workers) end with it when this process started it."""
    import ray

    ray.shutdown()
