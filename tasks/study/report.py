"""The study report: tasks/study/analysis.py's tables as CSV, Markdown and JSON, plus the
figures, for our runs and, computed by the same code, for the paper's published rows."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.core.store import write_json_atomic, write_text_atomic
from tasks.outputs.tables import rows_to_csv
from tasks.study.analysis import (
    RunRecord,
    compare_strategies,
    correlations,
    early_stop_replay,
    merge_points,
    paper_path_points,
    paper_runs,
    strategy_rows,
)
from tasks.study.plots import best_by_generation, kinship_vs_gain, kinship_within_s

REPORT_FILE = "report.md"
STUDY_FILE = "study.json"


def _fmt(value: Any, digits: int = 3, *, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def _r(value: Any) -> str:
    return _fmt(value, 3, signed=True)


def _p(value: Any) -> str:
    """A p-value: small ones in scientific notation rather than 0.0000."""
    if isinstance(value, float) and 0 < value < 1e-3:
        return f"{value:.1e}"
    return _fmt(value, 4)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def correlation_markdown(table: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        [
            r["scope"],
            r["metric"].upper(),
            "gain" if r["target"] == "gain" else "abs(gain)",
            r["n"],
            f"{_r(r['pearson'])} [{_r(r['ci_low'])}, {_r(r['ci_high'])}]",
            _p(r["pearson_p"]),
            _r(r["spearman"]),
            _p(r["spearman_p"]),
        ]
        for r in table
    ]
    header = ["scope", "kinship", "against", "n", "Pearson r [95% CI]", "p", "Spearman ρ", "p"]
    return _md_table(header, rows)


def strategy_markdown(table: Sequence[Mapping[str, Any]], comparison: Mapping[str, Any]) -> str:
    per_run = _md_table(
        ["strategy", "seed", "best avg", "reached in gen", "generations", "merges", "evaluations"],
        [
            [
                r["strategy"],
                r["seed"],
                f"{r['best_avg']:.4f}",
                r["reached_in_generation"],
                r["generations"],
                r["merges"],
                r["evaluations"],
            ]
            for r in table
        ],
    )
    means = _md_table(
        ["strategy", "seeds", "best avg mean ± sd"],
        [
            [name, s["n"], f"{s['mean']:.4f} ± {_fmt(s['sd'], 4)}"]
            for name, s in comparison["strategies"].items()
        ],
    )
    p = comparison["paired"]
    paired = (
        f"Paired over {p['n']} seeds, {p['treatment']} − {p['control']}: mean "
        f"{_fmt(p['mean_difference'], 4, signed=True)} ({p['wins']} better, {p['losses']} "
        f"worse, {p['ties']} tied); sign test p = {_fmt(p['sign_test_p'], 3)}, "
        f"Wilcoxon signed-rank p = {_fmt(p['wilcoxon_p'], 3)}."
    )
    return f"{per_run}\n\n{means}\n\n{paired}"


def early_stop_markdown(table: Sequence[Mapping[str, Any]]) -> str:
    return _md_table(
        [
            "threshold",
            "runs stopped early",
            "evaluations saved",
            "share",
            "best avg lost (mean)",
            "(max)",
        ],
        [
            [
                r["threshold"],
                f"{r['runs_stopped_early']}/{r['runs']}",
                f"{r['evaluations_saved']}/{r['evaluations']}",
                f"{100 * r['saved_share']:.0f}%",
                _fmt(r["best_avg_lost_mean"], 4),
                _fmt(r["best_avg_lost_max"], 4),
            ]
            for r in table
        ],
    )


def analyse(runs: Sequence[RunRecord], paper_dir: Path | None) -> dict[str, Any]:
    """Every table of the report, as plain rows."""
    points = merge_points(runs)
    table = strategy_rows(runs)
    result: dict[str, Any] = {
        "correlations": correlations(points),
        "strategies": table,
        "comparison": compare_strategies(table),
        "early_stop": early_stop_replay(runs),
        "merges": points,
    }
    if paper_dir is not None:
        table2 = paper_runs(paper_dir)
        paper_table = strategy_rows(table2)
        result["paper"] = {
            "table2_correlations": correlations(merge_points(table2), per_generation=False),
            "paths_correlations": correlations(paper_path_points(paper_dir), per_generation=False),
            "strategies": paper_table,
            "comparison": compare_strategies(paper_table),
        }
    return result


def write_report(
    out_dir: Path,
    name: str,
    runs: Sequence[RunRecord],
    paper_dir: Path | None,
    *,
    published_table1: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    """Write results/study/<name>/: CSV per table, report.md, study.json and plots/."""
    out_dir = Path(out_dir)
    result = analyse(runs, paper_dir)
    for file, rows in (
        ("correlations.csv", result["correlations"]),
        ("strategies.csv", result["strategies"]),
        ("early_stop.csv", result["early_stop"]),
        ("merges.csv", result["merges"]),
    ):
        write_text_atomic(out_dir / file, rows_to_csv(rows))
    plots = [
        kinship_vs_gain(result["merges"], out_dir / "plots" / "kinship_vs_gain.png", name),
        best_by_generation(runs, out_dir / "plots" / "best_by_generation.png", name),
        kinship_within_s(runs, out_dir / "plots" / "kinship_within_s.png", name),
    ]
    sections = [
        f"# Study `{name}`",
        f"{len(runs)} runs: "
        + ", ".join(f"{r.label} ({len(r.rows)} models)" for r in runs)
        + ". Merges shared by two runs of one seed count once.",
        "## Kinship and merge gain (the paper's Table 1)",
        correlation_markdown(result["correlations"]),
        "## Strategies (the paper's Table 2)",
        strategy_markdown(result["strategies"], result["comparison"]),
        "## Kinship early stop, replayed",
        "Stopping after the first generation whose mean kinship within S passes the threshold.",
        early_stop_markdown(result["early_stop"]),
    ]
    if "paper" in result:
        paper = result["paper"]
        for file, rows in (
            ("paper_table2_correlations.csv", paper["table2_correlations"]),
            ("paper_paths_correlations.csv", paper["paths_correlations"]),
            ("paper_strategies.csv", paper["strategies"]),
        ):
            write_text_atomic(out_dir / file, rows_to_csv(rows))
        sections += [
            "## The paper's rows, through the same code",
            "Table 2's merges (PCC only; avg on the paper's 0–100 scale):",
            correlation_markdown(paper["table2_correlations"]),
            "The two community evolution paths (Tables 5 and 6, pooled):",
            correlation_markdown(paper["paths_correlations"]),
            "Table 2 as runs:",
            strategy_markdown(paper["strategies"], paper["comparison"]),
        ]
        if published_table1:
            sections += [
                "The paper's own Table 1 (over its sampled merge experiments, as published):",
                _md_table(
                    ["kinship", "r with gain", "p", "r with abs(gain)", "p"],
                    [
                        [
                            r["metric"].upper(),
                            r["corr_normal"],
                            r["p_normal"],
                            r["corr_absolute"],
                            r["p_absolute"],
                        ]
                        for r in published_table1
                    ],
                ),
            ]
    sections += ["## Figures", *[f"![{p.stem}](plots/{p.name})" for p in plots]]
    write_text_atomic(out_dir / REPORT_FILE, "\n\n".join(sections) + "\n")
    study = {k: v for k, v in result.items() if k != "merges"}
    study["runs"] = [
        {"label": r.label, "strategy": r.strategy, "seed": r.seed, "source": r.source, **r.extra}
        for r in runs
    ]
    write_json_atomic(out_dir / STUDY_FILE, study)
    return {**study, "plots": [str(p) for p in plots], "report": str(out_dir / REPORT_FILE)}
