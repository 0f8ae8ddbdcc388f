"""Connecting to Ray: an existing cluster by address, or a local one started here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray

#: Custom resource that Tune trial drivers reserve instead of a CPU, so that on a small machine
#: the CPUs go to the Train workers that do the work.
TRIAL_DRIVER_RESOURCE = "trial_driver"

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}


def connect(address: str | None = None, *, num_cpus: int | None = None,
            quiet: bool = False) -> bool:
    """Connect to the cluster at `address` (or $RAY_ADDRESS), else start a local Ray.

    A local Ray keeps its dashboard on 127.0.0.1: Ray Train needs the dashboard's State API to
    clean up after runs stopped early (without it the next run's workers can hang). Returns True
    when this call started Ray (so the caller should shut it down).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    if address:
        # Ray Train's placement-group cleaner looks the cluster up by address; with more than
        # one Ray on a machine, "auto" would be ambiguous.
        if address != "auto" and not address.startswith("ray://"):
            runtime_env["env_vars"]["RAY_ADDRESS"] = address
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=not quiet)
        return True
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        object_store_memory=256 * 2**20,
        resources={TRIAL_DRIVER_RESOURCE: 64},
        runtime_env=runtime_env,
        log_to_driver=not quiet,
    )
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                quiet: bool = False) -> Iterator[None]:
    """Ray for the duration of the block, connected as `connect` does; after the block (even
    on an error) disconnected, and a local Ray stopped, unless Ray was up before the call."""
    started = connect(address, num_cpus=num_cpus, quiet=quiet)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
