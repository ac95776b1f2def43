"""Study step: the paper's questions asked of many runs at once.

Plain functions over the files a run leaves in its results folder (results.csv, generations.csv,
summary.json, config.yaml) and over the paper's published rows, so our zoo's figures and the
paper's are computed by the same code:

- `correlations`: the Table 1 analog, kinship (PCC, CS, ED) against gain and |gain|;
- `strategy_rows` / `compare_strategies`: the Table 2 analog, best avg per run and the paired
  difference between strategies across seeds;
- `early_stop_replay`: what a kinship early stop would have saved and lost, from each history.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tasks.outputs.tables import read_outputs
from tasks.select import KINSHIP_METRICS as METRICS
from tasks.select import similarity

PAPER_DIR = Path(__file__).resolve().parent / "paper"  # the paper's published tables, as data
MIN_POINTS = 4  # fewest merges a correlation is reported for
THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5 ... 0.95


@dataclass
class RunRecord:
    """One finished evolution run, as the study reads it."""

    strategy: str
    seed: int | str
    rows: list[dict[str, Any]]  # results.csv: one per model, numbers parsed
    history: list[dict[str, Any]]  # generations.csv: best_avg, mean_kinship_top_k per generation
    metric: str = "pcc"  # the kinship metric of mean_kinship_top_k
    source: str = ""  # results folder, or the paper table
    extra: dict[str, Any] = field(default_factory=dict)  # summary.json fields worth keeping

    @property
    def label(self) -> str:
        return f"{self.strategy}-seed{self.seed}"

    @property
    def merges(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["gen"] > 0 and r["gain"] is not None]


def _number(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _read_csv(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def load_run(folder: Path, strategy: str | None = None, seed: int | str | None = None) -> RunRecord:
    """Read a run's results folder. Strategy and seed default to what its config.yaml says."""
    folder = Path(folder)
    table, summary = read_outputs(folder)
    config_file = folder / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    rows = []
    for parsed in table:
        row: dict[str, Any] = {
            "model": parsed["model"],
            "gen": parsed["gen"],
            "role": parsed["role"],
            "parents": parsed["parents"],
            "avg": parsed["avg"],
            "gain": parsed["gain"],
            "fingerprint": parsed.get("fingerprint", ""),
        }
        row.update({m: parsed.get(m) for m in METRICS})
        rows.append(row)
    history = [
        {
            "generation": int(h["generation"]),
            "best_avg": float(h["best_avg"]),
            "mean_kinship_top_k": _number(h.get("mean_kinship_top_k")),
        }
        for h in _read_csv(folder / "generations.csv")
    ]
    return RunRecord(
        strategy=strategy or summary.get("strategy") or config.get("strategy", {}).get("name"),
        seed=seed if seed is not None else config.get("seed", 0),
        rows=rows,
        history=history,
        metric=config.get("kinship", {}).get("metric", "pcc"),
        source=str(folder),
        extra={
            k: summary.get(k)
            for k in ("counts", "mlflow_parent_run", "stop_reason", "wall_time_s", "best_model")
        },
    )


def merge_points(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Every distinct merge of the runs, with its generation, gain and parents' kinship.

    Two strategies of one seed share their first merges (same parents, same weights): a merge
    is counted once per seed, by its fingerprint, so shared merges do not weigh twice."""
    seen: set[tuple[Any, str]] = set()
    points = []
    for run in runs:
        for row in run.merges:
            key = (run.seed, row["fingerprint"] or f"{run.label}/{row['model']}")
            if key in seen:
                continue
            seen.add(key)
            points.append({**row, "seed": run.seed, "strategy": run.strategy})
    return points


def _correlation(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from scipy import stats

    n = len(x)
    nan = float("nan")
    out = {"n": n, "pearson": nan, "pearson_p": nan, "ci_low": nan, "ci_high": nan}
    out.update({"spearman": nan, "spearman_p": nan})
    # four points that vary, or NaN rather than an error: with three, scipy's t approximation
    # gives Spearman p = 0 for any perfect ranking, and Fisher's interval is undefined
    if n < MIN_POINTS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    pearson = stats.pearsonr(x, y)
    spearman = stats.spearmanr(x, y)
    out.update(pearson=float(pearson.statistic), pearson_p=float(pearson.pvalue))
    ci = pearson.confidence_interval(confidence_level=0.95)
    out.update(ci_low=float(ci.low), ci_high=float(ci.high))
    out.update(spearman=float(spearman.statistic), spearman_p=float(spearman.pvalue))
    return out


def correlations(
    points: Sequence[Mapping[str, Any]], *, per_generation: bool = True
) -> list[dict[str, Any]]:
    """The Table 1 analog: for each kinship metric, the correlation of the parents' kinship with
    the merge's gain and with |gain|, pooled over all points and (optionally) per generation."""
    scopes: list[tuple[str, list[Mapping[str, Any]]]] = [("all", list(points))]
    if per_generation:
        for gen in sorted({p["gen"] for p in points}):
            scopes.append((f"gen {gen}", [p for p in points if p["gen"] == gen]))
    table = []
    for scope, chosen in scopes:
        for metric in METRICS:
            pairs = [
                (p[metric], p["gain"])
                for p in chosen
                if p.get(metric) is not None and p["gain"] is not None
            ]
            if not pairs:
                continue
            x = np.array([a for a, _ in pairs], dtype=np.float64)
            gain = np.array([b for _, b in pairs], dtype=np.float64)
            for target, y in (("gain", gain), ("abs_gain", np.abs(gain))):
                table.append(
                    {"scope": scope, "metric": metric, "target": target, **_correlation(x, y)}
                )
    return table


def best_generation(history: Sequence[Mapping[str, Any]]) -> int:
    """The first generation whose best avg equals the run's final best."""
    final = history[-1]["best_avg"]
    return next(h["generation"] for h in history if h["best_avg"] >= final)


def strategy_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """The Table 2 analog per run: best avg, the generation it was reached in, what it cost."""
    table = []
    for run in runs:
        counts = run.extra.get("counts") or {}
        table.append(
            {
                "strategy": run.strategy,
                "seed": run.seed,
                "best_avg": run.history[-1]["best_avg"],
                "best_foundation_avg": run.history[0]["best_avg"],
                "reached_in_generation": best_generation(run.history),
                "generations": run.history[-1]["generation"],
                "merges": len([r for r in run.rows if r["gen"] > 0]),
                "evaluations": len(run.rows),
                "merges_reused": counts.get("merges_reused"),
                "evals_cached": counts.get("evals_cached"),
            }
        )
    return table


def compare_strategies(
    table: Sequence[Mapping[str, Any]], treatment: str = "greedy_kinship", control: str = "greedy"
) -> dict[str, Any]:
    """Across seeds: each strategy's best avg as mean ± sd, and the paired difference
    (treatment − control, seed by seed) with a sign test and a Wilcoxon signed-rank test."""
    from scipy import stats

    by_strategy: dict[str, dict[Any, float]] = {}
    for row in table:
        by_strategy.setdefault(row["strategy"], {})[row["seed"]] = row["best_avg"]
    summary: dict[str, Any] = {"strategies": {}}
    for name, values in by_strategy.items():
        vals = list(values.values())
        summary["strategies"][name] = {
            "n": len(vals),
            "mean": statistics.fmean(vals),
            "sd": statistics.stdev(vals) if len(vals) > 1 else float("nan"),
        }
    seeds = sorted(set(by_strategy.get(treatment, {})) & set(by_strategy.get(control, {})), key=str)
    diffs = [by_strategy[treatment][s] - by_strategy[control][s] for s in seeds]
    nonzero = [d for d in diffs if d != 0]
    wins = sum(d > 0 for d in diffs)
    losses = sum(d < 0 for d in diffs)
    paired: dict[str, Any] = {
        "treatment": treatment,
        "control": control,
        "seeds": seeds,
        "differences": diffs,
        "n": len(diffs),
        "wins": wins,
        "losses": losses,
        "ties": len(diffs) - len(nonzero),
        "mean_difference": statistics.fmean(diffs) if diffs else float("nan"),
        "sign_test_p": (
            float(stats.binomtest(wins, len(nonzero), 0.5).pvalue) if nonzero else float("nan")
        ),
        "wilcoxon_p": float(stats.wilcoxon(nonzero).pvalue) if nonzero else float("nan"),
    }
    summary["paired"] = paired
    return summary


def early_stop_replay(
    runs: Sequence[RunRecord], thresholds: Iterable[float] = THRESHOLDS
) -> list[dict[str, Any]]:
    """Replays the kinship early stop (`strategy.stop.kinship_threshold`) on each run's history:
    stopping after the first generation whose mean kinship within S passes the threshold (as
    tasks/select.py decides it) skips every later generation's evaluations."""
    table = []
    for threshold in thresholds:
        saved = total = stopped = 0
        losses = []
        for run in runs:
            total += len(run.rows)
            stop = next(
                (
                    h
                    for h in run.history
                    if h["mean_kinship_top_k"] is not None
                    and similarity(run.metric, h["mean_kinship_top_k"])
                    >= similarity(run.metric, threshold)
                ),
                None,
            )
            if stop is None:
                losses.append(0.0)
                continue
            stopped += stop["generation"] < run.history[-1]["generation"]
            saved += sum(r["gen"] > stop["generation"] for r in run.rows)
            losses.append(run.history[-1]["best_avg"] - stop["best_avg"])
        table.append(
            {
                "threshold": threshold,
                "runs": len(runs),
                "runs_stopped_early": stopped,
                "evaluations": total,
                "evaluations_saved": saved,
                "saved_share": saved / total if total else float("nan"),
                "best_avg_lost_mean": statistics.fmean(losses) if losses else float("nan"),
                "best_avg_lost_max": max(losses) if losses else float("nan"),
            }
        )
    return table


# -- the paper's published rows, read into the same shapes ---------------------------------------


def paper_runs(paper_dir: Path) -> list[RunRecord]:
    """Table 2's two experiments as runs (avg on the paper's 0–100 scale, PCC kinship only).
    The published table has no mean kinship within S, so these runs cannot replay an early stop.
    """
    runs = []
    for strategy in ("greedy", "greedy_kinship"):
        rows = []
        for raw in _read_csv(Path(paper_dir) / f"table2_{strategy}.csv"):
            gen = int(raw["generation"])
            rows.append(
                {
                    "model": raw["model"],
                    "gen": gen,
                    "role": "foundation" if gen == 0 else "merge",
                    "parents": raw.get("parents", ""),
                    "avg": float(raw["avg"]),
                    "gain": _number(raw["gain"]),
                    # a row both experiments publish alike is their shared start: one merge.
                    # Same name and avg is not enough: model-3-2 has two different gains.
                    "fingerprint": ":".join(
                        raw[c] for c in ("model", "avg", "gain", "kinship_pcc")
                    ),
                    "pcc": _number(raw["kinship_pcc"]),
                    "cs": None,
                    "ed": None,
                }
            )
        history, best = [], float("-inf")
        for gen in sorted({r["gen"] for r in rows}):
            best = max([best] + [r["avg"] for r in rows if r["gen"] == gen])
            history.append({"generation": gen, "best_avg": best, "mean_kinship_top_k": None})
        runs.append(RunRecord(strategy, "paper", rows, history, source=f"table2_{strategy}.csv"))
    return runs


def paper_path_points(paper_dir: Path) -> list[dict[str, Any]]:
    """The two community evolution paths (Tables 5 and 6): one merge per generation each."""
    points = []
    for table in ("table5_path1.csv", "table6_path2.csv"):
        for raw in _read_csv(Path(paper_dir) / table):
            points.append(
                {
                    "model": raw["model_merged"],
                    "gen": int(raw["generation"]),
                    "gain": float(raw["gain"]),
                    "avg": float(raw["atp"]),
                    "path": table,
                    **{m: float(raw[m]) for m in METRICS},
                }
            )
    return points
