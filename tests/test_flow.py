"""The real flow end to end on the micro zoo: Prefect, mergekit, lm-eval, MLflow, all real."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, evolve_command, run_evolve

pytestmark = pytest.mark.slow


def _summary(root: Path, run_name: str) -> dict:
    return json.loads((root / "results" / run_name / "summary.json").read_text())


def _rows(root: Path, run_name: str) -> list[dict[str, str]]:
    with (root / "results" / run_name / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


def _mlflow_runs(root: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_greedy_kinship_runs_algorithm_1_end_to_end(
    evolve_root: Path, kinship_run: subprocess.CompletedProcess[str]
) -> None:
    assert kinship_run.returncode == 0, kinship_run.stderr[-4000:]
    summary = _summary(evolve_root, "greedy_kinship")
    rows = _rows(evolve_root, "greedy_kinship")
    n_found = sum(r["role"] == "foundation" for r in rows)
    gen1 = [r for r in rows if r["gen"] == "1"]
    assert len(gen1) == n_found * (n_found - 1) // 2  # every pair of foundation models
    assert summary["generations"] >= 2
    gen2 = [r for r in rows if r["gen"] == "2"]
    assert [r["model"] for r in gen2 if r["role"] == "exploration"] == ["model-2-exp"]
    for r in rows:
        assert 0.0 <= float(r["avg"]) <= 1.0
        if r["role"] != "foundation":
            assert r["gain"] != "" and r["pcc"] != "" and r["cs"] != "" and r["ed"] != ""
            merged = Path(evolve_root / "data" / "store")
            assert any(merged.iterdir())
    # the printed Table 2-like table
    assert "model-2-exp" in kinship_run.stdout and "stopped:" in kinship_run.stdout
    # the mergekit YAML of each merge sits in the merged folder
    configs = list((evolve_root / "data" / "store").glob("*/mergekit_config.yml"))
    assert len(configs) == len(rows) - n_found
    # MLflow: one parent run, one child run per model
    runs = _mlflow_runs(evolve_root, summary["experiment"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1
    assert sorted(r.info.run_name for r in children) == sorted(r["model"] for r in rows)
    exp_child = next(r for r in children if r.info.run_name == "model-2-exp")
    assert exp_child.data.params["role"] == "exploration"
    assert {"avg", "gain", "kinship_pcc", "kinship_cs", "kinship_ed"} <= set(exp_child.data.metrics)


def test_rerun_redoes_no_merge_or_evaluation(
    evolve_root: Path, micro_zoo: Path, kinship_run: subprocess.CompletedProcess[str]
) -> None:
    assert kinship_run.returncode == 0
    first = _rows(evolve_root, "greedy_kinship")
    again = run_evolve(evolve_root, micro_zoo, "+experiment=greedy_kinship")
    assert again.returncode == 0, again.stderr[-4000:]
    counts = _summary(evolve_root, "greedy_kinship")["counts"]
    assert counts["merges"] > 0 and counts["merges_reused"] == counts["merges"]
    assert counts["evals"] > 0 and counts["evals_cached"] == counts["evals"]
    assert _rows(evolve_root, "greedy_kinship") == first
    runs = _mlflow_runs(evolve_root, _summary(evolve_root, "greedy_kinship")["experiment"])
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    assert len(runs) == 1 + len(first)


def test_greedy_experiment_has_no_exploration_and_shares_the_mlflow_experiment(
    evolve_root: Path, micro_zoo: Path, kinship_run: subprocess.CompletedProcess[str]
) -> None:
    canary = "hf_canary_do_not_log_7f3a9c"
    result = run_evolve(evolve_root, micro_zoo, "+experiment=greedy", env={"HF_TOKEN": canary})
    assert result.returncode == 0, result.stderr[-4000:]
    # the token reaches no param, tag, log, artifact or cached result
    assert canary not in result.stdout + result.stderr
    for path in evolve_root.rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path
    rows = _rows(evolve_root, "greedy")
    assert rows and all(r["role"] != "exploration" for r in rows)
    runs = _mlflow_runs(evolve_root, _summary(evolve_root, "greedy")["experiment"])
    parents = {r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert parents == {"greedy", "greedy_kinship"}


def test_bad_config_fails_before_any_work(micro_zoo: Path, tmp_path: Path) -> None:
    result = run_evolve(tmp_path, micro_zoo, "+experiment=greedy", "strategy.k=1")
    assert result.returncode != 0
    assert "strategy.k" in result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "data").exists()


def test_two_processes_share_one_store_and_mlflow_db(micro_zoo: Path, tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            evolve_command(tmp_path, micro_zoo, f"+experiment={name}"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("greedy", "greedy_kinship")
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    store = tmp_path / "data" / "store"
    entries = [p for p in store.iterdir() if not p.name.startswith(".")]
    assert not [p for p in store.iterdir() if p.name.startswith(".partial-")]
    # every entry is complete and verified; merges both runs asked for exist once
    from tasks.store import verify_model

    assert entries and all(verify_model(p) for p in entries)
    needed = {
        r["fingerprint"]
        for name in ("greedy", "greedy_kinship")
        for r in _rows(tmp_path, name)
        if r["role"] != "foundation"
    }
    assert len(entries) == len(needed)
    runs = _mlflow_runs(tmp_path, "zoo-evolution")
    assert sorted(r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags) == [
        "greedy",
        "greedy_kinship",
    ]
