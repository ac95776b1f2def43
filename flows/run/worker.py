"""Dask worker preload: `dask worker --preload flows.run.worker ...` (the temporary cluster preloads
it too). A worker then keeps the flow's console rules (Prefect's per-task lines go to its API, not
to the worker's terminal) and imports the libraries before steps run in its threads."""

from __future__ import annotations

from typing import Any


def dask_setup(worker: Any) -> None:
    import prefect  # noqa: F401 - Prefect configures logging on import; the filter goes on top

    from flows.run.runtime import quiet_logs
    from tasks.core.device import settle_heap
    from tasks.evaluate import import_libraries

    quiet_logs()
    import_libraries()
    settle_heap()
