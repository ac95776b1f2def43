"""Dask worker preload: `dask worker --preload flows.run.worker ...` (the temporary cluster preloads
it too). A worker then keeps the flow's console rules (Prefect's per-task lines go to its API, not
to the worker's terminal) and imports the libraries before steps run in its threads.

`worker_problem` runs on every worker in the cluster check (Client.run); it lives here, with
no heavy import, so that checking a worker does not load torch into it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def dask_setup(worker: Any) -> None:
    import prefect  # noqa: F401 - Prefect configures logging on import; the filter goes on top

    from flows.run.console import quiet_logs
    from tasks.core.device import settle_heap
    from tasks.evaluate import import_libraries

    quiet_logs()
    import_libraries()
    settle_heap()


def worker_problem(paths: list[str], storage: str) -> str | None:
    """What keeps this worker from running the flow's steps, if anything (runs on each worker
    through Client.run): a path it cannot read, or Prefect results stored elsewhere."""
    for path in paths:
        if not Path(path).exists() or not os.access(path, os.R_OK):
            return (
                f"cannot read {path}: the store, zoo, Prefect results and models must be at the "
                "same absolute path on every worker"
            )
    here = os.environ.get("PREFECT_LOCAL_STORAGE_PATH", "")
    if storage and Path(here or "~/.prefect/storage").expanduser() != Path(storage):
        return (
            f"stores Prefect results in {here or 'its default ~/.prefect/storage'}, not in "
            f"{storage}: set PREFECT_LOCAL_STORAGE_PATH={storage} for every worker"
        )
    return None
