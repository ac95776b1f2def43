"""runtime=dask: the flow's steps on Dask worker processes, a temporary LocalCluster-like
cluster and an external `dask scheduler` with `dask worker`s and a real `prefect server`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed.system import MEMORY_LIMIT

from tests.conftest import ROOT, free_port, is_healthy, run_evolve

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
# two CPU worker processes that each declare one (pretend) GPU, as the test asks
TWO_GPU_WORKERS = (
    "runtime=dask",
    "runtime.dask.gpus=[]",
    "runtime.dask.n_workers=2",
    "runtime.dask.worker_resources={GPU: 1}",
    "runtime.dask.dashboard_address=127.0.0.1:0",
)


def _summary(root: Path, run: str = "greedy_kinship") -> dict:
    return json.loads((root / "results" / run / "summary.json").read_text())


def _fully_cached(summary: dict) -> bool:
    counts = summary["counts"]
    return (
        counts["merges"] > 0
        and counts["merges_reused"] == counts["merges"]
        and counts["evals_cached"] == counts["evals"]
    )


def test_temporary_cluster_runs_the_evolution_on_worker_processes(
    micro_zoo: Path, tmp_path: Path
) -> None:
    first = run_evolve(tmp_path, micro_zoo, "+experiment=greedy_kinship", *TWO_GPU_WORKERS)
    assert first.returncode == 0, first.stderr[-4000:]
    summary = _summary(tmp_path)
    assert summary["status"] == "FINISHED" and summary["runtime"] == "dask"
    steps = summary["steps"]
    # merges and evaluations ran in at least two worker processes, none of them the flow's
    pids = {w["pid"] for kind in ("merge", "evaluate") for w in steps[kind]["where"]}
    assert len(pids) >= 2 and summary["flow"]["pid"] not in pids
    assert all(w["worker"] for kind in ("merge", "evaluate") for w in steps[kind]["where"])
    # GPU-annotated steps never overlapped more than the 2 GPUs declared (the steps' own record)
    assert 1 <= summary["peak_concurrent_steps"] <= 2
    # replayed on the other runtime it redoes nothing: caches key on content, not on workers
    # (without runtime.replay the finished run would only be reported: flows/run/uptodate.py)
    local = run_evolve(
        tmp_path, micro_zoo, "+experiment=greedy_kinship", "runtime=local", "runtime.replay=true"
    )
    assert local.returncode == 0, local.stderr[-4000:]
    assert _fully_cached(_summary(tmp_path)) and _summary(tmp_path)["runtime"] == "local"


def test_a_resource_no_worker_offers_fails_in_seconds(micro_zoo: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_evolve(
        tmp_path,
        micro_zoo,
        "+experiment=greedy",
        "runtime=dask",
        "runtime.dask.gpus=[]",
        "runtime.dask.n_workers=1",
        "runtime.dask.dashboard_address=127.0.0.1:0",
        "device=cuda",  # asks GPU: 1 of CPU workers that declare none
    )
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: runtime.dask.resources.merge: {'GPU': 1} is offered by no")
    assert "workers offer" in line
    assert time.monotonic() - started < 120  # an error, not a hang (start-up included)


# -- an external cluster --------------------------------------------------------------------------


def _wait_for(predicate, what: str, timeout: float = 120) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _can_unshare() -> bool:
    return bool(shutil.which("unshare")) and (
        subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0
    )


def test_external_scheduler_workers_and_prefect_server(micro_zoo: Path, tmp_path: Path) -> None:
    """`dask scheduler`, two `dask worker --resources GPU=1` and `prefect server start`, all on
    127.0.0.1 as the README shows; then a worker that cannot see the store is named."""
    state = tmp_path / "data" / "state" / "prefect-results"
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-server"),
        "PREFECT_API_URL": api,
        "PREFECT_LOCAL_STORAGE_PATH": str(state),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(ROOT),
    }
    scheduler_file = tmp_path / "scheduler.json"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, *cmd: str) -> subprocess.Popen:
        with (logs / f"{name}.log").open("w") as log:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        procs.append(proc)
        return proc

    worker = (str(BIN / "dask"), "worker", "--scheduler-file", str(scheduler_file))
    worker_opts = ("--nthreads", "1", "--resources", "GPU=1", "--host", "127.0.0.1")
    worker_opts += ("--preload", "flows.run.worker")
    try:
        start(
            "prefect",
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(api_port),
        )
        start(
            "scheduler",
            str(BIN / "dask"),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            "127.0.0.1:0",
            "--scheduler-file",
            str(scheduler_file),
        )
        _wait_for(scheduler_file.exists, "the scheduler file")
        for i in range(2):
            start(f"worker-{i}", *worker, *worker_opts, "--name", f"gpu-worker-{i}")
        address = json.loads(scheduler_file.read_text())["address"]
        _wait_for(lambda: is_healthy(api), "the Prefect server")

        run = run_evolve(
            tmp_path,
            micro_zoo,
            "+experiment=greedy_kinship",
            "runtime=dask",
            f"runtime.dask.address={address}",
            env={"PREFECT_API_URL": api},
        )
        assert run.returncode == 0, run.stderr[-4000:] + _tail(logs)
        summary = _summary(tmp_path)
        names = {w["worker"] for k in ("merge", "evaluate") for w in summary["steps"][k]["where"]}
        assert names <= {"gpu-worker-0", "gpu-worker-1"} and names

        if not _can_unshare():
            pytest.skip("unshare -m is not permitted here: the blind-worker check did not run")
        # a third worker in a mount namespace where the project's data folder is an empty
        # tmpfs: it cannot see the store or the zoo
        hidden = tmp_path / "data"
        start(
            "blind-worker",
            "unshare",
            "-m",
            "sh",
            "-c",
            f"mount -t tmpfs none {hidden} && exec {' '.join(worker + worker_opts)} "
            "--name blind-worker",
        )
        _wait_for(lambda: _workers(address) >= 3, "the third worker")
        blind = run_evolve(
            tmp_path,
            micro_zoo,
            "+experiment=greedy",
            "runtime=dask",
            f"runtime.dask.address={address}",
            env={"PREFECT_API_URL": api},
        )
        assert blind.returncode == 2, blind.stderr[-3000:]
        assert "worker blind-worker" in blind.stderr and str(hidden) in blind.stderr
    finally:
        stop_all(procs)
    assert all(proc.poll() is not None for proc in procs)


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group still running (workers first, last started first), then
    SIGKILL whatever has not ended within 30 s."""
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _workers(address: str) -> int:
    from distributed import Client

    with Client(address, timeout=10) as client:
        return len(client.scheduler_info(n_workers=-1)["workers"])


def _tail(logs: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.glob("*.log")))


def test_a_temporary_cluster_pins_one_gpu_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """With GPUs named, the temporary cluster starts one single-threaded worker per GPU, pinned
    with CUDA_VISIBLE_DEVICES and declaring GPU: 1 (checked on CPU: the pinning is what a GPU
    machine needs; no GPU is touched)."""
    from distributed import Client

    from flows.run.cluster import dask_task_runner
    from flows.run.schema import validate
    from tests.conftest import compose_config

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # not contacted here
    cfg = validate(
        compose_config(
            "runtime=dask", "runtime.dask.gpus=[2,5]", "runtime.dask.dashboard_address=:0"
        )
    )
    runner = dask_task_runner(cfg.runtime.dask)
    with runner.cluster_class(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        pinned = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert sorted(pinned.values()) == ["2", "5"]
        assert all(w["resources"] == {"GPU": 1} and w["nthreads"] == 1 for w in workers)
        assert all(a.startswith("tcp://127.0.0.1:") for a in pinned)
        # the default memory limit (1.0) is this machine's memory, not Dask's RAM x 1 / cores
        assert all(w["memory_limit"] == MEMORY_LIMIT for w in workers)


def test_temporary_cluster_workers_report_the_configured_memory_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distributed import Client

    from flows.run.cluster import dask_task_runner
    from flows.run.schema import ConfigError, validate
    from tests.conftest import compose_config

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # not contacted here
    overrides = ("runtime=dask", "runtime.dask.gpus=[]", "runtime.dask.dashboard_address=:0")
    limit = ("runtime.dask.n_workers=1", "runtime.dask.memory_limit=3GB")
    cfg = validate(compose_config(*overrides, *limit))
    runner = dask_task_runner(cfg.runtime.dask)
    with runner.cluster_class(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert [w["memory_limit"] for w in workers] == [3_000_000_000]
    with pytest.raises(ConfigError, match="^runtime.dask.memory_limit: bytes"):
        validate(compose_config(*overrides, "runtime.dask.memory_limit=lots"))


def test_a_worker_too_small_for_the_models_is_named_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An external `dask scheduler` with two `dask worker`s on 127.0.0.1, one started with
    `--memory-limit 200MB`: the cluster check, which runs before any step, names that one (its
    limit and the largest model's bytes, a 7B model's here) and not the other."""
    import logging

    from distributed import Client

    from flows.run.cluster import check_cluster

    seven_b = 14_483_464_192  # a 7B model's bf16 weights
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    scheduler_file = tmp_path / "scheduler.json"
    common = ("--scheduler-file", str(scheduler_file))
    worker = (str(BIN / "dask"), "worker", *common, "--nthreads", "1", "--host", "127.0.0.1")
    commands = [
        (str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", *common)
        + ("--dashboard-address", "127.0.0.1:0"),
        (*worker, "--name", "small-worker", "--memory-limit", "200MB"),
        (*worker, "--name", "roomy-worker", "--memory-limit", "0"),
    ]
    procs = []
    try:
        for i, cmd in enumerate(commands):
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            if i == 0:
                _wait_for(scheduler_file.exists, "the scheduler file")
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address, timeout=30) as client, caplog.at_level(logging.WARNING):
            client.wait_for_workers(2, timeout=120)
            needs = check_cluster(client, {}, "cpu", [str(tmp_path)], 30, model_bytes=seven_b)
            assert needs == {"merge": {}, "evaluate": {}, "kinship": {}}
            # the check itself imports nothing heavy: the 200 MB worker is still alive
            assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
        [line] = [r.getMessage() for r in caplog.records if r.name == "flows.run.cluster"]
        assert line.startswith("worker small-worker (tcp://127.0.0.1:")
        assert "memory limit 190.73 MiB" in line and f"({seven_b} bytes)" in line
        assert "\n" not in line and "roomy-worker" not in line
    finally:
        stop_all(procs)
