"""A run's plots are drawn from its files, and drawn again only when what they show changed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tasks.core.store import PARTIAL_PREFIX
from tasks.outputs.plots import RENDERED_INDEX, last_matrices, render_run

pytestmark = pytest.mark.slow


def _mtimes(plots: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in plots.glob("*.png")}


def test_plots_are_redrawn_only_when_their_inputs_change(
    tmp_path: Path, evolve_root: Path, kinship_run: subprocess.CompletedProcess
) -> None:
    assert kinship_run.returncode == 0, kinship_run.stderr[-3000:]
    run = tmp_path / "run"
    shutil.copytree(evolve_root / "results" / "greedy_kinship", run)
    shutil.rmtree(run / "plots")
    plots = run / "plots"

    first = render_run(run, "t")
    heatmaps = last_matrices(run / "kinship")  # a heatmap per metric, of the last generation
    assert len(first) == 2 + len(heatmaps) == 5
    assert all(p.is_file() and p.stat().st_size > 0 for p in first)
    assert not list(plots.glob(f"{PARTIAL_PREFIX}*"))
    drawn = _mtimes(plots)

    # the same inputs: nothing is drawn again
    assert render_run(run, "t") == first
    assert _mtimes(plots) == drawn

    # one kinship matrix changes: its heatmap alone is redrawn
    changed = heatmaps[-1]
    text = changed.read_text().splitlines()
    cells = text[1].split(",")
    cells[-1] = "0.123456"
    changed.write_text("\n".join([text[0], ",".join(cells), *text[2:]]) + "\n")
    render_run(run, "t")
    now = _mtimes(plots)
    assert [n for n in now if now[n] != drawn[n]] == [f"{changed.stem}.png"]

    # a deleted picture, or an unreadable index, is drawn again
    (plots / "family_tree.png").unlink()
    render_run(run, "t")
    assert (plots / "family_tree.png").is_file()
    (plots / RENDERED_INDEX).write_text("not json")
    before = _mtimes(plots)
    render_run(run, "t")
    assert all(v != before[n] for n, v in _mtimes(plots).items())

    # another title is another picture
    before = _mtimes(plots)
    render_run(run, "another title")
    assert all(v != before[n] for n, v in _mtimes(plots).items())


def test_report_shows_the_table_plots_and_final_benchmark(
    tmp_path: Path, evolve_root: Path, kinship_run: subprocess.CompletedProcess
) -> None:
    import json

    from flows.report import main

    assert kinship_run.returncode == 0, kinship_run.stderr[-3000:]
    run = evolve_root / "results" / "greedy_kinship"
    summary = json.loads((run / "summary.json").read_text())
    main([str(run), "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "table.txt").read_text()
    assert f"best {summary['best_model']} avg={summary['best_avg']:.4f}" in text
    final = summary["final_scores"]
    assert final, "the shared run has a final benchmark"
    assert f"final benchmark: best {summary['final_best_model']}" in text
    for name, scores in final.items():
        (line,) = [ln for ln in text.splitlines() if ln.split()[1:2] == [name]]
        assert line.split()[0] == str(scores["rank"])
        assert f"{100 * scores['avg']:.2f}" in line
    assert len(list((tmp_path / "report" / "plots").glob("*.png"))) >= 4
