"""The MLflow UI, served on a run's store and read by headless Chromium, shows the evolution."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_healthy

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
    "--virtual-time-budget=30000",
]


@pytest.fixture(scope="module")
def mlflow_ui(evolve_root: Path, kinship_run: subprocess.CompletedProcess[str]):
    assert kinship_run.returncode == 0, kinship_run.stderr[-3000:]
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{evolve_root / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, 120, "mlflow server")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def page_text(url: str, profile: Path) -> str:
    """The rendered page (after its JavaScript ran) as plain text."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (scripts/setup.sh installs it)")
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())


def test_ui_shows_parent_run_children_and_metrics(
    mlflow_ui: str, evolve_root: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{evolve_root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("zoo-evolution")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(
        r
        for r in runs
        if "mlflow.parentRunId" not in r.data.tags and r.info.run_name == "greedy_kinship"
    )
    children = [
        r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]

    listing = page_text(
        f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs", tmp_path / "a"
    )
    assert "zoo-evolution" in listing
    assert parent.info.run_name in listing
    assert f"{len(runs)} matching runs" in listing

    run_page = page_text(
        f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}",
        tmp_path / "b",
    )
    for metric in ("best_avg", "mean_avg_top_k", "mean_kinship_top_k"):
        assert metric in run_page
    assert f"{parent.data.metrics['best_avg']}"[:6] in run_page
    for child in children:
        assert child in run_page

    exp_child = next(r for r in runs if r.info.run_name == "model-2-exp")
    child_page = page_text(
        f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{exp_child.info.run_id}",
        tmp_path / "c",
    )
    for metric in ("avg", "gain", "kinship_pcc", "kinship_cs", "kinship_ed"):
        assert metric in child_page
    assert "exploration" in child_page


def test_experiment_is_a_training_one_and_its_best_model_is_registered(
    mlflow_ui: str, evolve_root: Path, tmp_path: Path
) -> None:
    """Not MLflow 3's GenAI overview (traces, tokens): the experiment is of the training kind;
    the run's best model is a version of the registered model named after the experiment,
    with its logged model, lineage and scores."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{evolve_root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("zoo-evolution")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = next(
        r
        for r in client.search_runs([experiment.experiment_id])
        if "mlflow.parentRunId" not in r.data.tags and r.info.run_name == "greedy_kinship"
    )
    best = parent.data.tags["best_model"]
    assert parent.data.metrics["run_seconds"] > 0
    versions = client.search_model_versions("name = 'zoo-evolution'")
    version = next(v for v in versions if v.tags.get("run_name") == "greedy_kinship")
    child = client.get_run(version.run_id)
    assert child.info.run_name == best
    # MLflow 3.17's SQL registry keeps no model id on a version (ModelVersion.model_id is
    # None): the version points at the logged model by its tag, its source and the logged
    # model's own list of versions (as mlflow.register_model writes it)
    logged = client.get_logged_model(version.tags["evolve.logged_model_id"])
    assert logged.name == best and logged.source_run_id == version.run_id
    assert version.source == logged.artifact_location
    listed = json.loads(logged.tags["mlflow.modelVersions"])
    assert {"name": "zoo-evolution", "version": str(version.version)} in listed
    assert float(version.tags["avg"]) == pytest.approx(child.data.metrics["avg"])
    assert version.tags["lineage"]

    page = page_text(f"{mlflow_ui}/#/models/zoo-evolution", tmp_path / "m")
    assert "zoo-evolution" in page and f"Version {version.version}" in page
    page = page_text(
        f"{mlflow_ui}/#/models/zoo-evolution/versions/{version.version}", tmp_path / "v"
    )
    assert f"Source Run : {best}" in page and logged.model_id in page


def test_experiment_opens_on_the_training_runs_as_docs_operations_says(
    mlflow_ui: str, evolve_root: Path, tmp_path: Path
) -> None:
    """What a user sees on opening the experiment, in a fresh browser profile. The link
    docs/operations.md gives (`?workflowType=machine_learning`) opens the training-runs table.
    The bare link opens the GenAI overview in MLflow 3.17 whatever the experiment's kind tag
    says (its UI follows the GenAI / Model training switch, default GenAI): pinned here so that
    a MLflow that honours the tag fails this test and the docs get updated."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{evolve_root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("zoo-evolution")
    at = f"{mlflow_ui}/#/experiments/{experiment.experiment_id}"

    training = page_text(f"{at}?workflowType=machine_learning", tmp_path / "a")
    assert training.startswith(f"Runs - Experiment {experiment.experiment_id} - MLflow")
    assert "greedy_kinship" in training and "matching runs" in training
    assert "Token Usage" not in training

    bare = page_text(at, tmp_path / "b")
    assert bare.startswith(f"Overview - Experiment {experiment.experiment_id} - MLflow"), bare[:300]
    assert "Token Usage" in bare and "matching runs" not in bare
