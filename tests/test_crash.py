"""A run killed with SIGKILL (during a merge, during an evaluation, between generations) and run
again finishes with the same table as an uninterrupted run, one MLflow parent run and one child
run per model, no partial folder in the store and no process left behind."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tasks.core.store import PARTIAL_PREFIX
from tests.conftest import ROOT, run_evolve, without_prefect_server

pytestmark = pytest.mark.slow


def _store_entries(root: Path) -> tuple[list[str], list[str]]:
    store = root / "data" / "store"
    names = [e.name for e in os.scandir(store)] if store.is_dir() else []
    partial = [n for n in names if n.startswith(PARTIAL_PREFIX)]
    complete = [n for n in names if not n.startswith(".")]
    return partial, complete


def _kill_when(root: Path, zoo: Path, ready: Callable[[str], bool], timeout: float = 600) -> str:
    """Start the run, SIGKILL it (only the main process, as a crash would) once `ready(stdout)`
    holds; return what it printed."""
    out_file = root.parent / f"{root.name}-{time.time_ns()}.out"
    cmd = [
        sys.executable,
        "-m",
        "flows.evolve",
        "+debug=micro",
        "+experiment=greedy_kinship",
        f"paths.root={root}",
        f"paths.zoo_dir={zoo}",
    ]
    with out_file.open("w") as out:
        # a crash leaves the run's own temporary server behind: the path being tested
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=without_prefect_server()
        )
        deadline = time.time() + timeout
        try:
            while proc.poll() is None and time.time() < deadline:
                if ready(out_file.read_text()):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return out_file.read_text()
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                proc.kill()
    pytest.fail(f"the run ended before the kill point:\n{out_file.read_text()[-3000:]}")


def _rows(root: Path) -> list[dict[str, str]]:
    with (root / "results" / "greedy_kinship" / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


def _our_processes(root: Path) -> list[str]:
    """Processes of this run: its command line or its Prefect home names the run's folder."""
    found = []
    for proc in psutil.process_iter():
        try:
            cmd = " ".join(proc.cmdline())
            home = proc.environ().get("PREFECT_HOME", "")
        except psutil.Error:
            continue
        if str(root) in cmd or str(root) in home:
            found.append(cmd)
    return found


def test_sigkill_anywhere_then_resume_matches_uninterrupted_run(
    tmp_path: Path, micro_zoo: Path, evolve_root: Path, kinship_run: subprocess.CompletedProcess
) -> None:
    assert kinship_run.returncode == 0, kinship_run.stderr[-3000:]
    reference = _rows(evolve_root)
    root = tmp_path / "crash"

    # 1. during a merge: a partial store folder exists (or, if merges are too quick to see one,
    #    the first merge has just landed and the others are in flight)
    def merging(_: str) -> bool:
        partial, complete = _store_entries(root)
        return bool(partial) or bool(complete)

    _kill_when(root, micro_zoo, merging)

    # 2. during an evaluation: generation 1's merges are all in the store, its evaluations not done
    n_gen1 = sum(r["gen"] == "1" for r in reference)

    def evaluating(out: str) -> bool:
        return len(_store_entries(root)[1]) >= n_gen1 and "generation 1 " not in out

    _kill_when(root, micro_zoo, evaluating)

    # 3. between generations
    _kill_when(root, micro_zoo, lambda out: "generation 1 " in out)

    final = run_evolve(root, micro_zoo, "+experiment=greedy_kinship", own_server=True)
    assert final.returncode == 0, final.stderr[-3000:]
    assert _rows(root) == reference
    assert _store_entries(root)[0] == []

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("zoo-evolution").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId"))
    assert children == sorted(r["model"] for r in reference)
    time.sleep(1)
    assert _our_processes(root) == []
