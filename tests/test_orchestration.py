"""How the flow runs: honest failure, bounded concurrency, Hydra sweeps, a readable console."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, evolve_command, run_evolve

pytestmark = pytest.mark.slow

# A real fault inside a real run: the merge step raises from generation 2 on (the micro zoo's
# generation 1 makes 3 merges).
INJECT_FAULT = """
import sys
import tasks.merge as merge

real, calls = merge.merge_models, []


def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) > 3:
        raise RuntimeError("injected fault in a generation-2 merge")
    return real(*args, **kwargs)


merge.merge_models = failing
import runpy

runpy.run_module("flows.evolve", run_name="__main__", alter_sys=True)
"""


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def _runs(root: Path, experiment: str = "zoo-evolution") -> list:
    client = _client(root)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def _parents(runs: list) -> list:
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def test_a_bug_mid_generation_fails_the_run_honestly(micro_zoo: Path, tmp_path: Path) -> None:
    cmd = evolve_command(tmp_path, micro_zoo, "+experiment=greedy_kinship")
    result = subprocess.run(
        [sys.executable, "-c", INJECT_FAULT, *cmd[3:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    # a bug is not bad input: exit 1 with the traceback, not a one-line "error:"
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: injected fault in a generation-2 merge" in result.stderr
    assert not result.stderr.startswith("error:")

    runs = _runs(tmp_path)
    [parent] = _parents(runs)
    assert parent.info.status == "FAILED"
    assert "injected fault" in parent.data.tags["stop_reason"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # what finished is kept: 3 foundations and generation 1's 3 merges, each complete
    assert sorted(r.info.run_name for r in children) == sorted(
        ["add", "rev", "srt", "model-1-1", "model-1-2", "model-1-3"]
    )
    assert all(r.info.status == "FINISHED" and "avg" in r.data.metrics for r in children)
    out = tmp_path / "results" / "greedy_kinship"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "FAILED" and summary["generations"] == 1
    with (out / "results.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 6


def test_bad_input_is_one_line_and_exit_2(micro_zoo: Path, tmp_path: Path) -> None:
    result = run_evolve(tmp_path, micro_zoo, "models.foundations=[zoo:add,/nonexistent/model]")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: /nonexistent/model: model folder not found at /nonexistent/model"
    ]


def test_sweep_runs_one_job_per_experiment_with_one_step_at_a_time(
    micro_zoo: Path, tmp_path: Path
) -> None:
    cmd = evolve_command(
        tmp_path,
        micro_zoo,
        "+experiment=greedy,greedy_kinship",
        "runtime.max_workers=1",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    )
    cmd.insert(3, "-m")  # Hydra's flag goes before the overrides
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    parents = sorted(r.info.run_name for r in _parents(_runs(tmp_path)))
    assert parents == ["greedy", "greedy_kinship"]
    for name in ("greedy", "greedy_kinship"):
        summary = json.loads((tmp_path / "results" / name / "summary.json").read_text())
        assert summary["status"] == "FINISHED" and summary["strategy"] == name
        # the steps recorded it themselves: never two merges or evaluations at once
        assert summary["peak_concurrent_steps"] == 1
    # the console: one line per model and per generation, not Prefect's per-task lines
    assert "Finished in state" not in result.stdout + result.stderr
    assert "model-1-1 " in result.stdout and "generation 1 done" in result.stdout


def test_default_workers_do_overlap(
    evolve_root: Path, kinship_run: subprocess.CompletedProcess[str]
) -> None:
    """The counterpart of max_workers=1: with the default two workers, steps ran side by side
    (so the overlap record above can tell the two apart)."""
    assert kinship_run.returncode == 0, kinship_run.stderr[-3000:]
    summary = json.loads((evolve_root / "results" / "greedy_kinship" / "summary.json").read_text())
    assert summary["peak_concurrent_steps"] == 2
