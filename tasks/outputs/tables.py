"""Report step: the paper's Table 2 for a run (model, parents, avg, gain, kinship), as text,
CSV and a JSON summary."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.core.store import write_json_atomic, write_text_atomic
from tasks.select import KINSHIP_METRICS

TABLE_FILE = "results.csv"
FINAL_FILE = "final_scores.csv"  # the final benchmark's scores of the run's best models
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.json"  # flat numbers for `dvc metrics show` / `dvc exp show`
HISTORY_FILE = "generations.csv"  # one row per generation for `dvc plots show`
METRIC_KEYS = (
    "best_avg",
    "best_foundation_avg",
    "final_best_avg",
    "generations",
    "models",
    "wall_time_s",
)
PRINT_COLUMNS = ("model", "gen", "role", "parents", "avg", "gain", *KINSHIP_METRICS)


def results_rows(models: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per model in creation order. Each model has name, generation, role, parents, avg,
    gain, kinship (between its parents, by metric), scores (by task) and fingerprint."""
    rows = []
    for m in models:
        kin = m.kinship or {}
        row: dict[str, Any] = {
            "model": m.name,
            "gen": m.generation,
            "role": m.role,
            "parents": " x ".join(m.parents) if m.parents else "",
            "avg": _round(m.avg),
            "gain": _round(m.gain),
            "pcc": _round(kin.get("pcc")),
            "cs": _round(kin.get("cs")),
            "ed": _round(kin.get("ed")),
        }
        for task, value in sorted((m.scores or {}).items()):
            row[f"score_{task}"] = _round(value)
        row["fingerprint"] = m.fingerprint
        rows.append(row)
    return rows


def final_rows(models: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per model evaluated on the final benchmark, best search avg first: its rank by
    search avg, its search avg, its final avg and final scores by task."""
    rows = []
    for m in sorted(models, key=lambda m: m.final["rank"]):
        row: dict[str, Any] = {
            "model": m.name,
            "rank": m.final["rank"],
            "gen": m.generation,
            "search_avg": _round(m.avg),
            "final_avg": _round(m.final["avg"]),
        }
        for task, value in sorted(m.final["scores"].items()):
            row[f"score_{task}"] = _round(value)
        row["fingerprint"] = m.fingerprint
        rows.append(row)
    return rows


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = PRINT_COLUMNS) -> str:
    """A fixed-width text table; averages and gains shown in percent points like the paper."""

    def cell(col: str, value: Any) -> str:
        if value is None or value == "":
            return "/" if col == "gain" or col in KINSHIP_METRICS else ""
        if col in ("avg", "gain"):
            return f"{100 * value:+.2f}" if col == "gain" else f"{100 * value:.2f}"
        if col in ("pcc", "cs"):
            return f"{value:.3f}"
        if col == "ed":
            return f"{value:.4g}"
        return str(value)

    body = [[cell(c, r.get(c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def rows_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_outputs(
    output_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    final: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Path]:
    """results.csv, summary.json, metrics.json, generations.csv and, given the final
    benchmark's rows, final_scores.csv."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = output_dir / TABLE_FILE
    write_text_atomic(table, rows_to_csv(rows))
    written = {}
    if final:
        written["final"] = output_dir / FINAL_FILE
        write_text_atomic(written["final"], rows_to_csv(final))
    write_json_atomic(output_dir / SUMMARY_FILE, dict(summary))
    metrics = {k: summary[k] for k in METRIC_KEYS if k in summary}
    if summary.get("best_avg") is not None and summary.get("best_foundation_avg") is not None:
        metrics["gain_over_best_foundation"] = summary["best_avg"] - summary["best_foundation_avg"]
    metrics.update({k: v for k, v in summary.get("counts", {}).items()})
    write_json_atomic(output_dir / METRICS_FILE, metrics)
    history = output_dir / HISTORY_FILE
    write_text_atomic(
        history,
        rows_to_csv(
            [
                {
                    k: h[k]
                    for k in ("generation", "best_avg", "mean_avg_top_k", "mean_kinship_top_k")
                }
                for h in summary.get("history", [])
            ]
        ),
    )
    return {
        "table": table,
        "summary": output_dir / SUMMARY_FILE,
        "metrics": output_dir / METRICS_FILE,
        "history": history,
        **written,
    }


def best_line(summary: Mapping[str, Any]) -> str:
    """The run's best model beside its best foundation, as the end-of-run lines say it."""
    return (
        f"best {summary['best_model']} avg={summary['best_avg']:.4f} "
        f"(best foundation {summary['best_foundation_avg']:.4f})"
    )


def final_benchmark_line(summary: Mapping[str, Any]) -> str | None:
    """The final benchmark's winner (final_eval), or None when the run had none."""
    if not summary.get("final_scores"):
        return None
    return (
        f"final benchmark: best {summary['final_best_model']} "
        f"avg={summary['final_best_avg']:.4f} of the top {len(summary['final_scores'])} "
        f"by search avg ({FINAL_FILE})"
    )


def _parse(value: str) -> Any:
    if value == "":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def read_outputs(output_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows and summary a run wrote, typed back (numbers as numbers, empty as None)."""
    import json

    output_dir = Path(output_dir)
    with (output_dir / TABLE_FILE).open() as fh:
        rows = [
            {
                k: (v if k in ("model", "parents", "role", "fingerprint") else _parse(v))
                for k, v in row.items()
            }
            for row in csv.DictReader(fh)
        ]
    summary = json.loads((output_dir / SUMMARY_FILE).read_text())
    return rows, summary


def write_matrix_csv(path: Path, names: Sequence[str], matrix: Sequence[Sequence[float]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["model," + ",".join(names)]
    lines += [
        f"{n}," + ",".join(f"{v:.8g}" for v in row) for n, row in zip(names, matrix, strict=True)
    ]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def read_matrix_csv(path: Path) -> tuple[list[str], list[list[float]], str, int]:
    """(names, matrix, metric, generation) from a `gen-{g}-{metric}.csv` file."""
    path = Path(path)
    _, gen, metric = path.stem.split("-")
    with path.open() as fh:
        reader = csv.reader(fh)
        names = next(reader)[1:]
        matrix = [[float(v) for v in row[1:]] for row in reader]
    return names, matrix, metric, int(gen)
