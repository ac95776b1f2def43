"""Process-level setup for a run: Prefect's home, result storage and task runner; the console."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.device import cpu_share

if TYPE_CHECKING:  # annotations only: Dask workers import this module without the schema
    from flows.run.schema import EvolveConf, PathsConf, RuntimeConf

SERVER_STARTUP_TIMEOUT_S = 120  # Prefect's temporary API server, on a busy host


def named(step: Any, run_name: str) -> Any:
    """Prefect task `step` with its runs named `run_name` in the UI ("merge model-1-2 = srt x kb",
    not Prefect's "merge-2ab"). A callable, not a template: Prefect formats a string name with
    the task's parameters. The name is no part of the cache key (the steps key on content), so a
    re-run stays cached."""
    return step.with_options(task_run_name=lambda: run_name)


def task_runner(runtime: RuntimeConf) -> Any:
    """Prefect's task runner for `runtime` (conf/runtime/): `local`, threads of this process, at
    most `max_workers` steps at once; `dask`, prefect-dask's DaskTaskRunner
    (flows/run/cluster.py)."""
    if runtime.name == "dask":
        from flows.run.cluster import dask_task_runner

        return dask_task_runner(runtime.dask)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=runtime.max_workers)


@dataclass(frozen=True)
class Placement:
    """How the lab submits steps: the resources each kind asks of a Dask worker, and how many
    steps share this machine's cores (None: each worker decides)."""

    concurrency: int | None
    resources: dict[str, dict[str, float]] = field(default_factory=dict)

    def threads(self, steps: int) -> int | None:
        """Torch threads for each of `steps` steps submitted together."""
        return None if self.concurrency is None else cpu_share(min(self.concurrency, steps))


def place_steps(cfg: EvolveConf, readable: list[str], model_bytes: int = 0) -> Placement:
    """The placement for `cfg.runtime`; on Dask, after checking that the workers offer what
    the steps ask and can read `readable` (the store, zoo, models), and reporting workers whose
    memory limit is below `model_bytes` (the largest model's)."""
    runtime = cfg.runtime
    if runtime.name == "local":
        return Placement(runtime.max_workers)
    from flows.run.cluster import check_cluster, dask_client

    dask = runtime.dask
    needs = check_cluster(
        dask_client(),
        dask.resources,
        cfg.device,
        readable,
        dask.check_timeout_s,
        model_bytes,
    )
    return Placement(None, needs)


@contextmanager
def prefect_runtime(
    paths: PathsConf, meanwhile: Callable[[], None] = lambda: None
) -> Iterator[None]:
    """Point Prefect at the project's state: its database under `prefect_home`, task results and
    cache keys under `state_dir`, so a resume on any machine finds them. Without PREFECT_API_URL
    Prefect's temporary API server starts here, in the background, while `meanwhile` runs
    (imports, input checks): it takes seconds of its own process, which the flow would
    otherwise wait for at its first API call."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    home = Path(paths.prefect_home).resolve()
    reaped = reap_orphan_servers(home)
    if reaped:
        logging.getLogger(__name__).warning(
            "stopped %d Prefect server(s) left by a run that was killed", len(reaped)
        )
    storage = Path(paths.state_dir).resolve() / "prefect-results"
    storage.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)  # Prefect creates its home without parents
    env = {
        # the ephemeral API server runs in a subprocess that reads its settings from the env
        "PREFECT_HOME": str(home),
        "PREFECT_LOCAL_STORAGE_PATH": str(storage),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # its default 20 s is too short on a busy host (measured: timed out beside other runs)
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(SERVER_STARTUP_TIMEOUT_S),
    }
    os.environ.update(env)
    with temporary_settings(
        updates={
            PREFECT_HOME: home,
            PREFECT_LOCAL_STORAGE_PATH: storage,
            PREFECT_SERVER_ANALYTICS_ENABLED: False,
            PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: SERVER_STARTUP_TIMEOUT_S,
        }
    ):
        wait_for_server = _start_server()
        try:
            meanwhile()
        finally:
            wait_for_server()
        yield


def flow_run_link() -> dict[str, str | None]:
    """Which Prefect flow run this is: its id, and its page in Prefect's UI when the run talks
    to a server a user can open (PREFECT_API_URL); None under the temporary server, which is
    gone when the run ends. Outside a flow run, both None."""
    from prefect.context import FlowRunContext
    from prefect.utilities.urls import url_for

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return {"flow_run_id": None, "flow_run_url": None}
    run_id = str(context.flow_run.id)
    return {"flow_run_id": run_id, "flow_run_url": url_for("flow-run", obj_id=run_id)}


def _start_server() -> Callable[[], None]:
    """Start Prefect's temporary server (the one its client would start on first use: one per
    process, `SubprocessASGIServer()`) in a thread; returns the wait for it, which re-raises a
    failure to start. Nothing to start when an API is configured."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return lambda: None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    failed: list[BaseException] = []

    def start() -> None:
        try:
            server.start(timeout=SERVER_STARTUP_TIMEOUT_S)  # the thread lacks the settings context
        except BaseException as exc:  # handed to the waiting thread
            failed.append(exc)

    thread = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failed:
            raise failed[0]

    return wait


SERVER_PIDS = "ephemeral-server.pids"


def _is_prefect_server(proc: Any) -> bool:
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:  # gone or not ours
        return False
    return "prefect" in cmd and "uvicorn" in cmd


def record_server_pids(prefect_home: Path) -> None:
    """Note the temporary Prefect server this process started, so that a run killed hard (the
    server outlives it) can be cleaned up by the next run."""
    import psutil

    servers = [p for p in psutil.Process().children(recursive=True) if _is_prefect_server(p)]
    if servers:
        Path(prefect_home).mkdir(parents=True, exist_ok=True)
        lines = [f"{p.pid} {p.ppid()}" for p in servers]
        (Path(prefect_home) / SERVER_PIDS).write_text("\n".join(lines) + "\n")


def reap_orphan_servers(prefect_home: Path) -> list[int]:
    """Stop temporary Prefect servers left by an earlier run of this project that was killed."""
    import psutil

    pid_file = Path(prefect_home) / SERVER_PIDS
    if not pid_file.is_file():
        return []
    reaped = []
    for line in pid_file.read_text().splitlines():
        try:
            pid, parent = (int(v) for v in line.split())
            proc = psutil.Process(pid)
            # only orphans: a live run's server still has the parent that started it
            if _is_prefect_server(proc) and proc.ppid() != parent:
                proc.kill()
                reaped.append(pid)
        except (ValueError, psutil.Error):
            continue
    pid_file.unlink(missing_ok=True)
    return reaped
