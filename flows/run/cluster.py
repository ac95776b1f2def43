"""runtime=dask: Prefect's Dask task runner (prefect-dask) on a temporary cluster of this machine
or on a running scheduler, the resources each step asks of a worker, and the checks that the
cluster can run this flow before any heavy work.

A temporary cluster is Dask's own SpecCluster: one worker process per visible GPU, each pinned to
its GPU with CUDA_VISIBLE_DEVICES and declaring `GPU: 1` (or `n_workers` CPU workers), all bound
to 127.0.0.1, all handed the flow's Prefect API so no worker starts a server of its own, each
with the memory limit `runtime.dask.memory_limit` (Dask terminates a worker at 95% of it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

from flows.run.schema import ConfigError, DaskConf
from flows.run.worker import worker_problem
from tasks.core.device import STEP_KINDS, available_cores
from tasks.core.errors import InputError


def dask_task_runner(dask: DaskConf) -> Any:
    """A DaskTaskRunner on `dask.address`, or on a temporary cluster built by
    `temporary_cluster` from the rest of `dask`."""
    # Dask logs every scheduler and worker event at INFO; the console is the flow's. Read when
    # distributed is first imported, here and in the workers this process starts.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    from prefect_dask import DaskTaskRunner

    if dask.address:
        if not os.environ.get("PREFECT_API_URL"):
            raise ConfigError(
                "runtime.dask.address: workers of an external cluster need one Prefect API; "
                "start `prefect server start --host 127.0.0.1` (or use Prefect Cloud) and set "
                "PREFECT_API_URL for this command and for every worker"
            )
        return DaskTaskRunner(address=dask.address)
    gpus = visible_gpus() if dask.gpus == "auto" else [str(g) for g in dask.gpus or []]
    n_workers = len(gpus) if gpus else dask.n_workers
    resources = dask.worker_resources
    if resources == "auto":
        resources = {"GPU": 1} if gpus else {}
    return DaskTaskRunner(
        cluster_class=temporary_cluster,
        cluster_kwargs={
            "n_workers": n_workers,
            "threads_per_worker": dask.threads_per_worker,
            "gpus": gpus,
            "resources": dict(resources),
            "dashboard_address": dask.dashboard_address,
            "memory_limit": dask.memory_limit,
        },
    )


def visible_gpus() -> list[str]:
    """Ids of the GPUs this process sees (as CUDA_VISIBLE_DEVICES names them, if set)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    named = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return named[:count] if named else [str(i) for i in range(count)]


def temporary_cluster(
    n_workers: int,
    threads_per_worker: int,
    gpus: list[str],
    resources: dict[str, float],
    dashboard_address: str,
    memory_limit: str | float = 1.0,
) -> Any:
    """A Dask SpecCluster on 127.0.0.1 (the task runner enters and closes it). `memory_limit`
    per worker, as `dask worker --memory-limit` reads it (1.0: this machine's memory)."""
    from distributed import Nanny, Scheduler, SpecCluster

    # the workers share this machine's cores: each step gets cores ÷ the cluster's task slots
    threads = max(1, available_cores() // (n_workers * threads_per_worker))
    env = {"PREFECT_API_URL": prefect_api_url(), "OMP_NUM_THREADS": str(threads)}
    workers = {}
    for i in range(n_workers):
        worker_env = dict(env)
        if gpus:
            worker_env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        workers[f"worker-{i}"] = {
            "cls": Nanny,
            "options": {
                "nthreads": threads_per_worker,
                "resources": resources,
                "env": worker_env,
                "host": "127.0.0.1",
                "preload": ["flows.run.worker"],
                "memory_limit": memory_limit,
            },
        }
    scheduler = {
        "cls": Scheduler,
        "options": {"host": "127.0.0.1", "dashboard_address": dashboard_address},
    }
    return SpecCluster(workers=workers, scheduler=scheduler, name="kinship-evolve")


def prefect_api_url() -> str:
    """The API the flow talks to: PREFECT_API_URL, else its temporary server's."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"].rstrip("/")
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


# -- inside the flow ------------------------------------------------------------------------------


def dask_client() -> Any | None:
    """The Dask client of the running flow's task runner; None when it is not Dask."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    runner = context.task_runner if context else None
    return runner.client if hasattr(runner, "cluster_kwargs") else None


def check_cluster(
    client: Any,
    wanted: Mapping[str, Mapping[str, float]],
    device: str,
    paths: list[str],
    timeout_s: float = 30,
    model_bytes: int = 0,
) -> dict[str, dict[str, float]]:
    """The resources each step kind asks of a worker, after checking that the cluster has them
    and that every worker can read `paths`. Raises InputError within `timeout_s`. A worker
    whose memory limit is below `model_bytes` (the largest model's) is reported, one warning
    line each: it may still run steps that do not hold a whole model in its memory.

    On `device: cpu` nothing is asked. On `auto`, a resource no worker declares (GPU on CPU-only
    workers) is not asked either; on `cuda`, it is an error naming the step kind.
    """
    try:
        client.wait_for_workers(1, timeout=timeout_s)
    except TimeoutError:
        raise InputError(
            f"runtime.dask: no worker joined the scheduler at {client.scheduler.address} "
            f"within {timeout_s:.0f} s"
        ) from None
    workers = client.scheduler_info(n_workers=-1)["workers"]
    for line in small_workers(workers, model_bytes):
        logging.getLogger(__name__).warning(line)
    offers = {w.get("name", addr): dict(w.get("resources") or {}) for addr, w in workers.items()}
    offered_keys = {key for resources in offers.values() for key in resources}
    needs: dict[str, dict[str, float]] = {}
    for kind in STEP_KINDS:
        want = {} if device == "cpu" else dict(wanted.get(kind) or {})
        if device == "auto":
            want = {k: v for k, v in want.items() if k in offered_keys}
        if want and not any(
            all(have.get(k, 0) >= v for k, v in want.items()) for have in offers.values()
        ):
            raise InputError(
                f"runtime.dask.resources.{kind}: {want} is offered by no worker "
                f"(workers offer: {offers}); start workers with --resources, or set device=cpu"
            )
        needs[kind] = want
    storage = os.environ.get("PREFECT_LOCAL_STORAGE_PATH", "")
    for addr, problem in client.run(worker_problem, paths, storage).items():
        if problem:
            name = workers.get(addr, {}).get("name", addr)
            raise InputError(f"worker {name} ({addr}) {problem}")
    return needs


def small_workers(workers: Mapping[str, Mapping[str, Any]], model_bytes: int) -> list[str]:
    """One line per worker (scheduler_info's) whose memory limit is below `model_bytes`."""
    from dask.utils import format_bytes

    lines = []
    for addr, info in workers.items():
        limit = info.get("memory_limit") or 0  # 0: no limit
        if model_bytes and 0 < limit < model_bytes:
            lines.append(
                f"worker {info.get('name', addr)} ({addr}): memory limit {format_bytes(limit)} "
                f"is below the largest model's {format_bytes(model_bytes)} ({model_bytes} bytes); "
                "Dask restarts a worker at 95% of its limit: start it with a larger "
                "--memory-limit (0 = none)"
            )
    return lines


def killed_worker_reason(exc: BaseException) -> str | None:
    """One line for a run that failed because Dask gave up on a task whose workers kept dying
    (distributed's KilledWorker, after `distributed.scheduler.allowed-failures` retries); None
    for any other failure."""
    seen: BaseException | None = exc
    while seen is not None and type(seen).__name__ != "KilledWorker":
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    task = getattr(seen, "task", "?")
    last = getattr(seen, "last_worker", None)
    tries = getattr(seen, "allowed_failures", None)
    where = f" (last on {getattr(last, 'address', last)})" if last is not None else ""
    return (
        f"runtime.dask: the workers running task {task} died "
        f"{tries + 1 if isinstance(tries, int) else 'several'} times{where}; a worker dies when "
        "it passes 95% of its memory limit (runtime.dask.memory_limit, `dask worker "
        "--memory-limit`) or the system kills it: give the workers more memory or run fewer per "
        "machine"
    )


def annotate(resources: Mapping[str, float] | None) -> Any:
    """Dask's resource annotation for a submit; a no-op when no resource is asked."""
    if not resources:
        return nullcontext()
    import dask

    return dask.annotate(resources=dict(resources))
