"""Tracker lineage through MLflow 3's logged-model inputs/outputs, checked through MLflow's API."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.outputs.tracking import NoTracker, Tracker, open_tracker, parents_of

EXPERIMENT = "lineage"
FINGERPRINT = "cfg-123"


def _tracker(tmp_path: Path, enabled: bool = True) -> Tracker | NoTracker:
    tracker = open_tracker(
        f"sqlite:///{tmp_path}/mlflow.db",
        EXPERIMENT,
        "greedy",
        FINGERPRINT,
        enabled=enabled,
        artifact_dir=tmp_path / "artifacts",
    )
    tracker.start({"strategy": "greedy"}, {"strategy": "greedy"})
    return tracker


def _log(tracker: Tracker, name: str, generation: int, parents: list[str], avg: float) -> None:
    tracker.log_model(
        name,
        params={"generation": generation, "role": "merge" if parents else "foundation"},
        metrics={"avg": avg, "gain": None},
        tags={"fingerprint": f"fp-{name}"},
        parents=parents,
    )


def _models(tracker: Tracker) -> dict[str, str]:
    found = tracker.client.search_logged_models([tracker.experiment_id], max_results=1000)
    names = [m.name for m in found]
    assert len(names) == len(set(names)), names
    return {m.name: m.model_id for m in found}


def _lineage(tracker: Tracker, model_id: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(input model ids, (output model id, step)) of the run that produced `model_id`."""
    run = tracker.client.get_run(tracker.client.get_logged_model(model_id).source_run_id)
    return (
        sorted(m.model_id for m in run.inputs.model_inputs),
        [(m.model_id, m.step) for m in run.outputs.model_outputs],
    )


def _runs(tracker: Tracker) -> list:
    return tracker.client.search_runs([tracker.experiment_id], max_results=1000)


@pytest.fixture
def logged(tmp_path: Path) -> Tracker:
    tracker = _tracker(tmp_path)
    _log(tracker, "A", 0, [], 0.5)
    _log(tracker, "B", 0, [], 0.4)
    _log(tracker, "C", 1, ["A", "B"], 0.6)
    return tracker


def test_merged_model_lineage_is_mlflow_inputs_and_outputs(logged: Tracker) -> None:
    ids = _models(logged)
    assert set(ids) == {"A", "B", "C"}

    assert _lineage(logged, ids["C"]) == (sorted([ids["A"], ids["B"]]), [(ids["C"], 1)])
    assert _lineage(logged, ids["A"]) == ([], [(ids["A"], 0)])
    assert _lineage(logged, ids["B"]) == ([], [(ids["B"], 0)])
    assert sorted(parents_of(logged.client, ids["C"])) == sorted([ids["A"], ids["B"]])
    assert parents_of(logged.client, ids["A"]) == []

    # the logged models are searchable by type, and no lineage lives in tags any more
    merged = logged.client.search_logged_models(
        [logged.experiment_id], filter_string="model_type = 'merged-llm'"
    )
    assert [m.model_id for m in merged] == [ids["C"]]
    for model_id in ids.values():
        tags = logged.client.get_logged_model(model_id).tags
        assert "parents" not in tags and "parent_model_ids" not in tags


def test_resume_never_duplicates_runs_models_or_links(logged: Tracker, tmp_path: Path) -> None:
    ids = _models(logged)
    runs_before = len(_runs(logged))
    logged.finish()

    again = _tracker(tmp_path)
    assert again.resumed and again.parent_id == logged.parent_id
    assert again.child_count() == 3
    _log(again, "A", 0, [], 0.5)
    _log(again, "B", 0, [], 0.4)
    _log(again, "C", 1, ["A", "B"], 0.7)  # a re-logged merge only adds metrics
    _log(again, "D", 2, ["C", "A"], 0.8)  # a new merge of models logged before the resume

    assert len(_runs(again)) == runs_before + 1
    assert _models(again) == {**ids, "D": _models(again)["D"]}
    assert _lineage(again, ids["C"]) == (sorted([ids["A"], ids["B"]]), [(ids["C"], 1)])
    d = _models(again)["D"]
    assert _lineage(again, d) == (sorted([ids["C"], ids["A"]]), [(d, 2)])
    c_run = again.client.get_logged_model(ids["C"]).source_run_id
    history = again.client.get_metric_history(c_run, "avg")
    assert sorted(m.value for m in history) == [0.6, 0.7]


def test_model_artifacts_and_metrics_go_to_its_child_run(logged: Tracker, tmp_path: Path) -> None:
    """Sample logs and final-benchmark metrics of a model land on its own run; logged again
    (a resumed run) the file replaces the earlier copy."""
    samples = tmp_path / "out" / "task_a.jsonl"
    samples.parent.mkdir()
    samples.write_text('{"doc_id": 0}\n')
    logged.log_model_artifacts("C", [samples], "final/samples")
    logged.log_model_metrics("C", {"final/avg": 0.25, "final/task_a": 0.5, "final/none": None})
    logged.finish()
    samples.write_text('{"doc_id": 1}\n')
    again = _tracker(tmp_path)
    again.log_model_artifacts("C", [samples], "final/samples")
    run_id = again.client.get_logged_model(_models(again)["C"]).source_run_id
    listed = [a.path for a in again.client.list_artifacts(run_id, "final/samples")]
    assert listed == ["final/samples/task_a.jsonl"]
    fetched = again.client.download_artifacts(run_id, listed[0], str(tmp_path / "dl"))
    assert Path(fetched).read_text() == '{"doc_id": 1}\n'
    assert {k: v for k, v in again.client.get_run(run_id).data.metrics.items() if "/" in k} == {
        "final/avg": 0.25,
        "final/task_a": 0.5,
    }
    a_run = again.client.get_logged_model(_models(again)["A"]).source_run_id
    assert again.client.list_artifacts(a_run) == []
    with pytest.raises(KeyError, match="no child run"):
        again.log_model_metrics("Z", {"final/avg": 1.0})


def test_disabled_tracker_does_nothing(tmp_path: Path) -> None:
    tracker = _tracker(tmp_path, enabled=False)
    assert tracker.parent_id is None
    assert tracker.log_model("A", params={"generation": 0}, metrics={"avg": 1.0}, tags={}) is None
    tracker.log_generation(0, {"best": 1.0})
    tracker.log_table([{"model": "A"}], "results.json")
    tracker.log_artifact(tmp_path)
    tracker.finish()
    assert tracker.child_count() == 0
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "artifacts").exists()
