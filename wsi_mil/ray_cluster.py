"""Ray, connected the same way wherever wsi_mil uses it: batch preprocessing, service slide jobs and
cross-validation folds. Ray is imported only inside these functions (it costs about a second)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any


@contextmanager
def ray_session(address: str | None, **init_options: Any) -> Iterator[ModuleType]:
    """Yield the `ray` module connected to `address` ("auto" or None: the cluster `ray start` runs on
    this machine, None starting a local Ray when there is none; "local": always a new local Ray).
    A Ray already initialised in this process is used as it is and left running."""
    # Ray workers use the cluster's own Python environment (wsi-mil installed there); without this,
    # a driver started by `uv run` makes every worker re-create the uv environment (~40 s each).
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **init_options)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def gpus_per_task(requested: float | None) -> float:
    """`requested`, or by default 1 GPU per task when the connected cluster has GPUs and 0 when not."""
    import ray

    if requested is not None:
        return requested
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def task_exception(error: BaseException) -> BaseException:
    """The exception a Ray task raised, as the task raised it (Ray wraps it with the remote traceback);
    Ray's own errors (a worker that died, a cancelled task) are returned unchanged."""
    from ray.exceptions import RayTaskError

    if isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        return error.cause
    return error
