"""The study command (flows/study.py) and its report (tasks/study*.py): the figures are checked
against an independent numpy computation from the raw results.csv files and the paper's rows."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tasks.select import KINSHIP_METRICS as METRICS
from tasks.study.analysis import PAPER_DIR as PAPER
from tasks.study.analysis import RunRecord, compare_strategies, early_stop_replay
from tests.conftest import ROOT


def _rank(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank (what Spearman's rho correlates)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc * yc).sum() / np.sqrt((xc**2).sum() * (yc**2).sum()))


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _check_against(table: list[dict[str, str]], points: list[dict[str, float]], scope: str) -> int:
    """Each (metric, target) row of `table` in `scope` equals numpy on `points`; returns how
    many rows were checked."""
    checked = 0
    for metric in METRICS:
        pts = [p for p in points if p.get(metric) is not None]
        if not pts:
            continue
        x = np.array([p[metric] for p in pts])
        gain = np.array([p["gain"] for p in pts])
        for target, y in (("gain", gain), ("abs_gain", np.abs(gain))):
            (row,) = [
                r
                for r in table
                if r["scope"] == scope and r["metric"] == metric and r["target"] == target
            ]
            assert int(row["n"]) == len(pts)
            assert float(row["pearson"]) == pytest.approx(_pearson(x, y), abs=1e-9)
            assert float(row["spearman"]) == pytest.approx(_pearson(_rank(x), _rank(y)), abs=1e-9)
            checked += 1
    return checked


@pytest.fixture(scope="module")
def study(
    evolve_root: Path, micro_zoo: Path, kinship_run: subprocess.CompletedProcess[str]
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Both strategies on seed 0 of the micro zoo, beside the shared greedy_kinship run, whose
    merges and evaluations the study's greedy_kinship run must reuse."""
    assert kinship_run.returncode == 0, kinship_run.stderr[-3000:]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.study",
            "+debug=micro",
            "+study=zoo_seeds",
            "study.seeds=[0]",
            f"paths.root={evolve_root}",
            f"paths.zoo_dir={micro_zoo}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return result, evolve_root / "results" / "study" / "zoo_seeds"


@pytest.mark.slow
def test_study_runs_the_grid_and_reuses_shared_work(study, evolve_root: Path) -> None:
    result, out = study
    assert result.returncode == 0, result.stderr[-3000:]
    assert "study zoo_seeds: 2 runs" in result.stdout
    report = json.loads((out / "study.json").read_text())
    runs = {r["label"]: r for r in report["runs"]}
    assert set(runs) == {"greedy-seed0", "greedy_kinship-seed0"}
    # the same config as the shared run: every merge and evaluation comes from the store/cache
    counts = runs["greedy_kinship-seed0"]["counts"]
    assert counts["merges_reused"] == counts["merges"] > 0
    assert counts["evals_cached"] == counts["evals"] > 0
    for name in ("report.md", "correlations.csv", "strategies.csv", "early_stop.csv"):
        assert (out / name).stat().st_size > 0
    assert len(list((out / "plots").glob("*.png"))) == 3
    # one Prefect home for the study's runs (they share one process's server)
    homes = {p.name for p in (evolve_root / ".prefect").iterdir()}
    assert "study-zoo_seeds" in homes and not any(h.startswith("zoo_seeds-") for h in homes)
    text = (out / "report.md").read_text()
    assert "Table 1" in text and "Table 2" in text and "early stop" in text


@pytest.mark.slow
def test_study_is_one_mlflow_run_linked_to_its_runs(study) -> None:
    from mlflow.tracking import MlflowClient

    result, out = study
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{out.parents[2] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("study-zoo_seeds")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    (study_run,) = [r for r in runs if r.data.tags.get("evolve.study_runs")]
    linked = study_run.data.tags["evolve.study_runs"].split(",")
    assert len(linked) == 2
    for run_id in linked:
        assert client.get_run(run_id).data.tags["evolve.study_run"] == study_run.info.run_id
    artifacts = {a.path for a in client.list_artifacts(study_run.info.run_id)}
    assert {"report.md", "correlations.csv", "plots"} <= artifacts


@pytest.mark.slow
def test_table1_analog_matches_numpy_on_the_raw_results(study) -> None:
    result, out = study
    assert result.returncode == 0, result.stderr[-3000:]
    # every merge of every run, once per seed and fingerprint, read from results.csv directly
    points: dict[tuple[str, str], dict[str, float]] = {}
    for results in sorted((out / "runs").glob("*/results.csv")):
        for row in _read(results):
            if row["gen"] != "0" and row["gain"]:
                points.setdefault(
                    ("0", row["fingerprint"]),
                    {
                        "gen": int(row["gen"]),
                        "gain": float(row["gain"]),
                        **{m: float(row[m]) for m in METRICS},
                    },
                )
    merges = list(points.values())
    table = _read(out / "correlations.csv")
    assert _check_against(table, merges, "all") == 6
    for gen in {p["gen"] for p in merges}:
        chosen = [p for p in merges if p["gen"] == gen]
        if len(chosen) >= 4 and len({p["gain"] for p in chosen}) > 1:
            assert _check_against(table, chosen, f"gen {gen}") == 6
        elif len(chosen) < 4:  # too few to report: NaN, not a figure
            rows = [r for r in table if r["scope"] == f"gen {gen}"]
            assert rows and all(r["pearson"] == "nan" for r in rows)


@pytest.mark.slow
def test_paper_rows_through_the_same_code(study) -> None:
    result, out = study
    assert result.returncode == 0, result.stderr[-3000:]
    paths = [
        {"gain": float(r["gain"]), **{m: float(r[m]) for m in METRICS}}
        for table in ("table5_path1.csv", "table6_path2.csv")
        for r in _read(PAPER / table)
    ]
    assert _check_against(_read(out / "paper_paths_correlations.csv"), paths, "all") == 6
    # Table 2's merges, each distinct model once (both experiments start from the same merges)
    table2 = {}
    for name in ("table2_greedy.csv", "table2_greedy_kinship.csv"):
        for r in _read(PAPER / name):
            if r["gain"]:
                table2[(r["model"], r["avg"], r["gain"], r["kinship_pcc"])] = {
                    "gain": float(r["gain"]),
                    "pcc": float(r["kinship_pcc"]),
                }
    checked = _check_against(
        _read(out / "paper_table2_correlations.csv"), list(table2.values()), "all"
    )
    assert checked == 2
    strategies = {r["strategy"]: r for r in _read(out / "paper_strategies.csv")}
    assert float(strategies["greedy"]["best_avg"]) == 68.72
    assert float(strategies["greedy_kinship"]["best_avg"]) == 69.13
    assert int(strategies["greedy_kinship"]["reached_in_generation"]) == 5


def _run(strategy: str, seed: int, bests: list[float], kinship: list[float]) -> RunRecord:
    history = [
        {"generation": g, "best_avg": b, "mean_kinship_top_k": k}
        for g, (b, k) in enumerate(zip(bests, kinship, strict=True))
    ]
    # three models evaluated per generation
    rows: list[dict[str, Any]] = [
        {"model": f"m{g}{i}", "gen": g, "gain": None if g == 0 else 0.0}
        for g in range(len(bests))
        for i in range(3)
    ]
    return RunRecord(strategy, seed, rows, history)


def test_strategy_comparison_and_early_stop_replay() -> None:
    runs = [
        _run("greedy", 0, [0.5, 0.6, 0.6, 0.6], [0.1, 0.6, 0.9, 0.97]),
        _run("greedy_kinship", 0, [0.5, 0.6, 0.62, 0.65], [0.1, 0.6, 0.8, 0.7]),
        _run("greedy", 1, [0.4, 0.5, 0.5, 0.5], [0.1, 0.5, 0.9, 0.9]),
        _run("greedy_kinship", 1, [0.4, 0.5, 0.5, 0.5], [0.1, 0.5, 0.6, 0.8]),
    ]
    table = [
        {"strategy": r.strategy, "seed": r.seed, "best_avg": r.history[-1]["best_avg"]}
        for r in runs
    ]
    comparison = compare_strategies(table)
    paired = comparison["paired"]
    assert paired["differences"] == pytest.approx([0.05, 0.0])
    assert (paired["wins"], paired["losses"], paired["ties"]) == (1, 0, 1)
    assert paired["sign_test_p"] == pytest.approx(1.0)
    assert comparison["strategies"]["greedy"]["mean"] == pytest.approx(0.55)

    replay = {r["threshold"]: r for r in early_stop_replay(runs, thresholds=(0.55, 0.85))}
    # 0.55: greedy-0 and kinship-0 stop after gen 1 (6 evaluations saved each), greedy-1 after
    # gen 2 (3), kinship-1 after gen 2 (0.6 >= 0.55; 3); only kinship-0 loses (0.65 - 0.6)
    assert replay[0.55]["evaluations_saved"] == 18
    assert replay[0.55]["evaluations"] == 48
    assert replay[0.55]["best_avg_lost_max"] == pytest.approx(0.05)
    # 0.85: greedy-0 after gen 2 (3), greedy-1 after gen 2 (3); the kinship runs never pass it
    assert replay[0.85]["evaluations_saved"] == 6
    assert replay[0.85]["runs_stopped_early"] == 2
    assert replay[0.85]["best_avg_lost_max"] == 0.0
