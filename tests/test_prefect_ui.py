"""Prefect tells the run's story: the flow run and its task runs named after the experiment and
the models, the recorder's lines as the flow's log, the results as a markdown artifact; and the
console keeps third-party INFO lines off the terminal (they stay in the log file)."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from flows.run.console import quiet_logs


def test_third_party_info_stays_off_the_console_but_in_the_log_file(tmp_path: Path) -> None:
    """As Hydra sets logging up (root at INFO, a console and a file handler): mergekit's line on
    the root logger for a tied-embedding merge reaches the file only; ours and warnings both."""
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    console, log_file = io.StringIO(), tmp_path / "evolve.log"
    handlers = [logging.StreamHandler(console), logging.FileHandler(log_file)]
    root.handlers, root.level = handlers, logging.INFO
    try:
        quiet_logs()
        logging.info("Skipping optional weight lm_head.weight")  # mergekit 0.1.5's call
        logging.getLogger("some_library").info("loading shards")
        logging.getLogger("tasks.kinship").info("kinship of 3 models")
        logging.getLogger("some_library").warning("disk nearly full")
    finally:
        for handler in handlers:
            handler.close()
        root.level, root.handlers = saved
    shown, kept = console.getvalue(), log_file.read_text()
    assert "Skipping optional weight" not in shown and "loading shards" not in shown
    assert "kinship of 3 models" in shown and "disk nearly full" in shown
    for line in ("Skipping optional weight", "loading shards", "kinship of 3 models"):
        assert line in kept


def _api(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        f"{url}{path}",
        data=json.dumps(body or {}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


FLOW_RUN_LINE = re.compile(r"^Prefect flow run: (\S+/runs/flow-run/([0-9a-f-]{36}))$", re.M)


def flow_run(api: str, run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The flow run that `run` (a `python -m flows.evolve` on the shared server) made, found by
    the link it printed, not by its name: the slow tests' other runs of greedy_kinship on this
    server (test_flow's re-runs of the same command) carry the same name, and their logs say
    "generation 1 resumed"."""
    printed = FLOW_RUN_LINE.search(run.stdout)
    assert printed, run.stdout[-2000:]
    url, run_id = printed.groups()
    assert url == f"{api.removesuffix('/api')}/runs/flow-run/{run_id}"
    [found] = _api(api, "/flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    return found


@pytest.mark.slow
def test_prefect_names_the_run_its_steps_and_keeps_its_story(
    prefect_server: str | None, kinship_run: subprocess.CompletedProcess[str]
) -> None:
    assert kinship_run.returncode == 0, kinship_run.stderr[-3000:]
    assert prefect_server is not None
    run = flow_run(prefect_server, kinship_run)
    assert run["name"] == "zoo-evolution/greedy_kinship" and run["state_type"] == "COMPLETED"
    assert "strategy:greedy_kinship" in run["tags"] and "runtime:local" in run["tags"]
    tasks = [
        t["name"]
        for t in _api(
            prefect_server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}}
        )
    ]
    assert any(t.startswith("merge model-1-1 = ") for t in tasks), tasks
    assert "evaluate model-1-1" in tasks and "kinship gen 1 (6 models)" in tasks
    logs = [
        entry["message"]
        for entry in _api(
            prefect_server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}}
        )
    ]
    assert any(m.startswith("generation 1 done") for m in logs)
    # the flow's own end line only, none per task run
    assert len([m for m in logs if m.startswith("Finished in state")]) == 1
    artifacts = _api(
        prefect_server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
    )
    [story] = [a for a in artifacts if a["key"] == "evolution-zoo-evolution-greedy-kinship"]
    assert "| model | gen | role | parents | avg |" in story["data"]
    assert "| model-2-exp | 2 | exploration |" in story["data"]
    assert "## Generations" in story["data"]


@pytest.mark.slow
def test_the_run_records_its_flow_run_in_its_summary_and_mlflow(
    prefect_server: str | None,
    evolve_root: Path,
    kinship_run: subprocess.CompletedProcess[str],
) -> None:
    """summary.json and the MLflow parent run name the Prefect flow run of the run's last
    session (test_flow's re-runs, when they ran before, are later sessions) and its page."""
    from mlflow.tracking import MlflowClient

    assert kinship_run.returncode == 0, kinship_run.stderr[-3000:]
    assert prefect_server is not None
    summary = json.loads((evolve_root / "results" / "greedy_kinship" / "summary.json").read_text())
    recorded = summary["prefect"]
    [run] = _api(
        prefect_server,
        "/flow_runs/filter",
        {"flow_runs": {"id": {"any_": [recorded["flow_run_id"]]}}},
    )
    assert run["name"] == "zoo-evolution/greedy_kinship" and run["state_type"] == "COMPLETED"
    ui = prefect_server.removesuffix("/api")
    assert recorded["flow_run_url"] == f"{ui}/runs/flow-run/{run['id']}"
    parent = MlflowClient(f"sqlite:///{evolve_root / 'mlflow.db'}").get_run(
        summary["mlflow_parent_run"]
    )
    assert parent.data.tags["prefect.flow_run_id"] == run["id"]
    assert parent.data.tags["prefect.flow_run_url"] == recorded["flow_run_url"]


@pytest.mark.slow
def test_prefect_ui_in_chromium_tells_the_story(
    prefect_server: str | None, kinship_run: subprocess.CompletedProcess[str], tmp_path: Path
) -> None:
    """The pages a user opens, rendered by headless Chromium: the flow run (its name, tags and
    log), a merge's task run, the artifact with the results table."""
    from tests.test_mlflow_ui import page_text

    assert kinship_run.returncode == 0, kinship_run.stderr[-3000:]
    assert prefect_server is not None
    ui = prefect_server.removesuffix("/api")
    run = flow_run(prefect_server, kinship_run)
    page = page_text(f"{ui}/runs/flow-run/{run['id']}", tmp_path / "a")
    assert "zoo-evolution/greedy_kinship" in page and "strategy:greedy_kinship" in page
    assert "generation 1 done" in page

    merge = next(
        t
        for t in _api(
            prefect_server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}}
        )
        if t["name"].startswith("merge model-1-1 = ")
    )
    assert merge["name"] in page_text(f"{ui}/runs/task-run/{merge['id']}", tmp_path / "b")

    artifacts = _api(
        prefect_server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
    )
    story = page_text(f"{ui}/artifacts/artifact/{artifacts[0]['id']}", tmp_path / "c")
    assert "Models model gen role parents avg gain" in story
    assert "model-2-exp 2 exploration" in story
