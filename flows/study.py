"""A study: `python -m flows.study +study=zoo_seeds`.

Runs a grid of experiments (strategies × seeds, plus any `study.grid` axes) through the same
evolution flow as `flows.evolve`, one after another in this process, then writes the study
report (tasks/study/report.py) to results/study/<name>/ and logs it to MLflow as one run linked
to the experiment runs. A seed changes the zoo's foundation models (zoo.seed = the zoo's seed +
seed, in a zoo folder of its own, built once) and the merge seed. Runs share the store and the
evaluation cache, so a merge or evaluation two runs have in common is done once, and a second
study run redoes nothing.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from flows.evolve import guarded, hydra_entry, run
from flows.run.console import quiet_logs
from flows.run.schema import ConfigError
from tasks.core.store import stable_hash
from tasks.study.analysis import PAPER_DIR


def cells(study: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every run of the grid: experiment × seed × each `grid` axis, in that order."""
    axes = dict(study.get("grid") or {})
    for experiment, seed, *values in itertools.product(
        study["experiments"], study["seeds"], *axes.values()
    ):
        grid = dict(zip(axes, values, strict=True))
        yield {"experiment": experiment, "seed": int(seed), "grid": grid}


def cell_overrides(
    study: Mapping[str, Any], cell: Mapping[str, Any], shared: Sequence[str], root: Path
) -> tuple[str, list[str]]:
    """The run name and the `flows.evolve` overrides of one cell."""
    seed = cell["seed"]
    extra = [f"{k}={v}" for k, v in cell["grid"].items()]
    run_name = "-".join([study["name"], cell["experiment"], f"seed{seed}", *extra]).replace(
        "/", "_"
    )
    overrides = [
        *shared,
        f"+experiment={cell['experiment']}",
        f"name=study-{study['name']}",
        f"run_name={run_name}",
        f"paths.output_dir={root / 'runs' / run_name}",
        *extra,
    ]
    if seed:
        # the zoo this run would use at seed 0 decides where its seed's zoo goes
        cfg = compose(config_name="config", overrides=overrides)
        zoo_dir = Path(cfg.paths.zoo_dir).resolve()
        overrides += [
            f"seed={seed}",
            f"zoo.seed={cfg.zoo.seed + seed}",
            f"paths.zoo_dir={zoo_dir.with_name(f'{zoo_dir.name}-seed{seed}')}",
        ]
    return run_name, overrides


def check_study(study: Mapping[str, Any]) -> None:
    if not study.get("experiments") or not study.get("seeds"):
        raise ConfigError("study: needs a non-empty `experiments` list and `seeds` list")
    if any(int(s) < 0 for s in study["seeds"]):
        raise ConfigError(f"study.seeds: seeds are 0 or more, got {list(study['seeds'])}")


def run_study(cfg: DictConfig, user_overrides: Sequence[str]) -> dict[str, Any]:
    from tasks.study.analysis import load_run
    from tasks.study.report import write_report

    study = OmegaConf.to_container(cfg.study, resolve=True)
    check_study(study)
    root = Path(cfg.paths.root).resolve() / "results" / "study" / study["name"]
    # Prefect's temporary server is one per process, so the runs share the first one's
    # database anyway: say so, with a Prefect home named after the study (a user's wins)
    home = Path(cfg.paths.root).resolve() / ".prefect" / f"study-{study['name']}"
    shared = [f"paths.prefect_home={home}"]
    # the study's own overrides would pull the study group into every run
    shared += [o for o in user_overrides if not o.lstrip("+~").startswith("study")]
    shared += list(study.get("overrides") or [])
    grid = list(cells(study))
    runs, started, totals = (
        [],
        time.time(),
        {"merges": 0, "merges_reused": 0, "evals": 0, "evals_cached": 0},
    )
    for i, cell in enumerate(grid, 1):
        run_name, overrides = cell_overrides(study, cell, shared, root)
        print(f"[{i}/{len(grid)}] {run_name}", flush=True)
        run_cfg = compose(config_name="config", overrides=overrides)
        summary = run(run_cfg)
        counts = summary["counts"]
        for key in totals:
            totals[key] += counts.get(key, 0)
        print(
            f"      best {summary['best_model']} avg={summary['best_avg']:.4f}; "
            f"{counts['merges']} merges ({counts['merges_reused']} reused), "
            f"{counts['evals']} evaluations ({counts['evals_cached']} cached)",
            flush=True,
        )
        runs.append(load_run(root / "runs" / run_name, cell["experiment"], cell["seed"]))

    import csv

    published = list(csv.DictReader((PAPER_DIR / "table1_correlation.csv").open()))
    report = write_report(root, study["name"], runs, PAPER_DIR, published_table1=published)
    report["counts"] = totals
    report["wall_time_s"] = round(time.time() - started, 1)
    _log_study(cfg, study, report, root)
    return report


def _log_study(
    cfg: DictConfig, study: Mapping[str, Any], report: Mapping[str, Any], root: Path
) -> None:
    """One MLflow run for the study, in the study's experiment, linked to its runs both ways."""
    from tasks.outputs.tracking import open_tracker, sqlite_uri

    tracking = cfg.tracking
    tracker = open_tracker(
        tracking.uri or sqlite_uri(Path(cfg.paths.mlflow_db)),
        f"study-{study['name']}",
        f"study-{study['name']}",
        stable_hash({"study": study, "runs": [r["source"] for r in report["runs"]]}),
        enabled=tracking.enabled,
        artifact_dir=Path(cfg.paths.mlflow_artifacts),
    )
    run_ids = [r["mlflow_parent_run"] for r in report["runs"] if r.get("mlflow_parent_run")]
    tracker.start(
        params={
            "experiments": study["experiments"],
            "seeds": study["seeds"],
            "grid": study.get("grid") or {},
        },
        tags={"evolve.study": study["name"], "evolve.study_runs": ",".join(run_ids)},
    )
    pooled = {
        f"{r['metric']}_{r['target']}_pearson": r["pearson"]
        for r in report["correlations"]
        if r["scope"] == "all"
    }
    means = {
        f"best_avg_{name}": s["mean"] for name, s in report["comparison"]["strategies"].items()
    }
    tracker.log_generation(0, {**pooled, **means, **report["counts"]})
    for run_id in run_ids:
        tracker.tag_run(run_id, "evolve.study", study["name"])
        tracker.tag_run(run_id, "evolve.study_run", tracker.parent_id)
    for name in (
        "report.md",
        "study.json",
        "correlations.csv",
        "strategies.csv",
        "early_stop.csv",
        "merges.csv",
        "plots",
    ):
        tracker.log_artifact(root / name)
    tracker.finish()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    quiet_logs()
    if "study" not in cfg:
        print("config error: choose a study, e.g. +study=zoo_seeds (conf/study/)", file=sys.stderr)
        sys.exit(2)
    report = guarded(lambda: run_study(cfg, HydraConfig.get().overrides.task))
    c = report["counts"]
    print(
        f"\nstudy {cfg.study.name}: {len(report['runs'])} runs in {report['wall_time_s']} s; "
        f"{c['merges']} merges ({c['merges_reused']} reused), {c['evals']} evaluations "
        f"({c['evals_cached']} cached)\nreport: {report['report']}"
    )


if __name__ == "__main__":
    hydra_entry(main)
