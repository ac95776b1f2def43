"""The recorder: everything a run leaves behind — the MLflow parent run and one child run per
model, the results folder (table, summary, kinship matrices, plots) and the console.

Used as a context manager around Algorithm 1: a run that raises still writes what finished, and
its MLflow parent run ends FAILED (KILLED on Ctrl-C) instead of staying RUNNING.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from tqdm.auto import tqdm

from flows.run.console import CONSOLE_LOGGER
from flows.run.inputs import Inputs
from flows.run.lab import Lab, ModelResult
from flows.run.runtime import flow_run_link
from flows.run.schema import EvolveConf, as_dict
from flows.run.uptodate import RECORD_KEY, config_fingerprint, rerun_record
from tasks.core.store import write_json_atomic
from tasks.outputs.cards import run_card, run_lineage, write_card, write_manifest
from tasks.outputs.plots import render_run
from tasks.outputs.story import artifact_key, run_markdown
from tasks.outputs.tables import (
    final_rows,
    format_table,
    results_rows,
    write_matrix_csv,
    write_outputs,
)
from tasks.outputs.tracking import NoTracker, Tracker, open_tracker, sqlite_uri
from tasks.select import Evolution, GenerationRecord, MergePlan

LOG = logging.getLogger(CONSOLE_LOGGER)


def say(text: str) -> None:
    """A line for the person at the terminal (kept clear of progress bars), and the log file;
    inside the flow, through Prefect's run logger, so it is the flow run's log in Prefect's UI
    (its own per-task state lines are off: console.quiet_logs)."""
    tqdm.write(text)
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        LOG.info(text)
    else:  # on to the log file too (the console filter keeps Prefect's INFO lines off)
        from prefect.logging import get_run_logger

        get_run_logger().info(text)


class Recorder:
    def __init__(self, cfg: EvolveConf, paths: Mapping[str, Path], inputs: Inputs) -> None:
        self.cfg, self.paths, self.inputs = cfg, paths, inputs
        self.output_dir = Path(paths["output_dir"])
        self.models: dict[str, ModelResult] = {}
        self.history: list[GenerationRecord] = []
        self.final: list[ModelResult] = []  # evaluated on the final benchmark, best first
        self.counted: dict[str, float] = {}  # lab counts at the last generation's close
        self.started = time.time()
        self.tracker: Tracker | NoTracker | None = None
        # which Prefect flow run this is (a resumed run: this session's), for MLflow and the summary
        self.prefect = flow_run_link()
        self.lab: Lab | None = None

    # -- the run's life ---------------------------------------------------------------------------

    def __enter__(self) -> Recorder:
        cfg = self.cfg
        tracking = cfg.tracking
        self.tracker = open_tracker(
            tracking.uri or sqlite_uri(self.paths["mlflow_db"]),
            tracking.experiment,
            cfg.run_name,
            config_fingerprint(cfg),
            enabled=tracking.enabled,
            artifact_dir=self.paths["mlflow_artifacts"],
        )
        strategy = cfg.strategy
        self.tracker.start(
            params={
                "strategy": strategy.name,
                "k": strategy.k,
                "partner": strategy.partner,
                "merge_method": cfg.merge.method,
                "kinship_metric": cfg.kinship.metric,
                "base": cfg.models.base,
                "foundations": [m.name for m in self.inputs.foundations],
                "eval_tasks": [t["task"] for t in self.inputs.eval_settings["tasks"]],
                **self._final_params(),
                "stop": asdict(strategy.stop),
                "seed": cfg.seed,
                "runtime": cfg.runtime.name,
            },
            tags={"strategy": strategy.name, "base_fingerprint": self.inputs.base.fingerprint},
        )
        # MLflow's parent run names this session's Prefect flow run (a resumed run: the latest)
        for key, value in self.prefect.items():
            if value is not None:
                self.tracker.tag_run(self.tracker.parent_id, f"prefect.{key}", value)
        if self.tracker.resumed:
            say(
                f"resuming MLflow run {self.tracker.parent_id} "
                f"({self.tracker.child_count()} model runs already logged)"
            )
        return self

    def _final_params(self) -> dict[str, Any]:
        final = self.inputs.final_settings
        if final is None:
            return {}
        tasks = [t["task"] for t in final["tasks"]]
        return {"final_eval_tasks": tasks, "final_eval_top_k": self.inputs.final_top_k}

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        reason = f"{status.lower()}: {type(exc).__name__}: {exc}"
        try:
            self._write(status, reason)
        except Exception as write_error:  # the run's own error is the one to report
            logging.getLogger(__name__).warning(
                "could not write the failed run's outputs: %r", write_error
            )
        finally:
            self.tracker.finish(status=status, tags={"stop_reason": reason[:5000]})

    def watch(self, lab: Lab) -> None:
        """Record `lab`'s counts and kinship matrices from now on."""
        self.lab = lab
        if lab.removed_partials:
            say(f"removed {len(lab.removed_partials)} partial store entries left by a killed run")

    # -- what the lab and Algorithm 1 report ------------------------------------------------------

    def model_done(self, model: ModelResult) -> None:
        """Log a model's child run as soon as it is evaluated, and print its line."""
        self.models[model.name] = model
        self.tracker.log_model(
            model.name,
            params={
                "generation": model.generation,
                "role": model.role,
                "parents": list(model.parents or []),
                "merge_method": model.merge["method"] if model.merge else None,
                "merge_parameters": (
                    {k: v for k, v in model.merge.items() if k != "method"} if model.merge else None
                ),
            },
            metrics={
                "avg": model.avg,
                "gain": model.gain,
                **{f"kinship_{k}": v for k, v in model.kinship.items()},
                **{f"score_{t}": s for t, s in model.scores.items()},
                **{f"{kind}_seconds": ran["seconds"] for kind, ran in model.ran.items()},
            },
            tags={
                "fingerprint": model.fingerprint,
                "store_path": model.path,
                **{
                    f"{kind}_ran_on": (
                        f"{ran.get('worker') or 'flow'} {ran['host']} pid {ran['pid']} "
                        f"{ran['device']}"
                    )
                    for kind, ran in model.ran.items()
                },
            },
            parents=list(model.parents or []),
        )
        self.tracker.log_model_artifacts(model.name, sorted(model.samples.values()), "samples")
        if model.parents:  # this run's card replaces the merge step's (see tasks/outputs/cards.py)
            lineage = run_lineage(self.models.values(), self.inputs.foundations)
            card = run_card(
                lineage[model.name],
                lineage,
                self.cfg.run_name,
                avg=model.avg,
                gain=model.gain,
                scores=model.scores,
                kinship=model.kinship,
            )
            write_card(model.path, card)
        if model.rebuilt:
            say(f"{model.name}: store entry failed verification and was rebuilt")
        say(model_line(model, self.cfg.kinship.metric))

    def generation_done(
        self, _evolution: Evolution, _plans: list[MergePlan], record: GenerationRecord
    ) -> None:
        """Algorithm 1 closed a generation: kinship matrices, generation metrics, a summary line."""
        self.history.append(record)
        lab = self.lab
        matrix = lab.matrix()
        for metric in self.cfg.kinship.metrics:
            write_matrix_csv(
                self.output_dir / "kinship" / f"gen-{record.generation}-{metric}.csv",
                matrix["names"],
                matrix[metric],
            )
        done = {k: v - self.counted.get(k, 0) for k, v in lab.counts.items()}
        self.counted = dict(lab.counts)
        self.tracker.log_generation(
            record.generation,
            {
                "best_avg": record.best_avg,
                "mean_avg_top_k": record.mean_avg_top_k,
                "mean_kinship_top_k": record.mean_kinship_top_k,
                "merges_done": done.get("merges", 0) - done.get("merges_reused", 0),
                "merges_reused": done.get("merges_reused", 0),
                "evals_done": done.get("evals", 0) - done.get("evals_cached", 0),
                "evals_cached": done.get("evals_cached", 0),
            },
        )
        reused = done.get("merges_reused", 0) + done.get("evals_cached", 0)
        resampled = done.get("evals_resampled", 0)
        again = f", {resampled} run again for their samples" if resampled else ""
        say(
            f"generation {record.generation} {'resumed' if reused else 'done'}: "
            f"{done.get('merges', 0)} merges ({done.get('merges_reused', 0)} reused), "
            f"{done.get('evals', 0)} evals ({done.get('evals_cached', 0)} cached{again}); "
            f"best {record.best} avg={record.best_avg:.4f}; S={record.top_k}"
        )

    def final_done(self, models: list[ModelResult]) -> None:
        """The run's best models scored on the final benchmark: `final/<task>` and `final/avg`
        on each one's child run (its sample logs under final/samples), and a line each."""
        self.final = models
        tasks = [t["task"] for t in self.inputs.final_settings["tasks"]]
        say(f"final benchmark ({', '.join(tasks)}) of the top {len(models)} by search avg:")
        for model in models:
            final = model.final
            scores = {f"final/{task}": value for task, value in final["scores"].items()}
            self.tracker.log_model_metrics(model.name, {"final/avg": final["avg"], **scores})
            self.tracker.log_model_artifacts(
                model.name, sorted(final["samples"].values()), "final/samples"
            )
            say(final_line(model))

    def finish(self, reason: str) -> dict[str, Any]:
        """Write the report, close the MLflow run; the run's summary."""
        summary, written, files = self._write("FINISHED", reason)
        best = summary["best_model"]
        tags = {"stop_reason": reason, "best_model": best}
        if self.cfg.tracking.register_best and best in self.models:
            version = self.tracker.register(
                self.cfg.tracking.experiment,
                best,
                f"{best}, best of run {self.cfg.run_name} (stopped: {reason})",
                self._registry_tags(self.models[best]),
            )
            if version is not None:
                tags["registered_model"] = f"{self.cfg.tracking.experiment} v{version}"
                say(f"registered {best} as {self.cfg.tracking.experiment} version {version}")
        self.tracker.finish(tags=tags)
        # last, once MLflow holds the whole run: what the next run checks to find nothing to do
        record = {**written, RECORD_KEY: self._rerun_record(files)}
        write_json_atomic(Path(summary["outputs"]["summary"]), record)
        return summary

    def _registry_tags(self, model: ModelResult) -> dict[str, Any]:
        """What a registered version says of its model: run, lineage (every merge back to the
        foundations), scores."""
        lineage, todo = [], [model.name]
        while todo:
            m = self.models.get(todo.pop(0))
            if m is not None and m.parents:
                lineage.append(f"{m.name} = {' x '.join(m.parents)}")
                todo += [p for p in m.parents if p not in todo]
        return {
            "run_name": self.cfg.run_name,
            "mlflow_parent_run": self.tracker.parent_id,
            "generation": model.generation,
            "parents": " x ".join(model.parents or ()),
            "lineage": "; ".join(dict.fromkeys(lineage)) or "foundation",
            "fingerprint": model.fingerprint,
            "store_path": model.path,
            "avg": model.avg,
            **{f"score_{t}": v for t, v in model.scores.items()},
            **{f"kinship_{k}": v for k, v in model.kinship.items()},
        }

    # -- outputs ----------------------------------------------------------------------------------

    def _write(self, status: str, reason: str) -> tuple[dict[str, Any], dict[str, Any], list[Path]]:
        """Table, summary, plots and resolved config of what finished, logged to MLflow too.
        Returns the run's summary with its printed table and output paths, the summary as
        written, and every file written."""
        cfg = self.cfg
        # creation order (the lab's), not the order evaluations happened to finish in
        order = list(self.lab.models) if self.lab else list(self.models)
        models = [self.models[n] for n in order if n in self.models]
        rows = results_rows(models)
        last = self.history[-1] if self.history else None
        foundation_avgs = [m.avg for m in models if m.role == "foundation" and m.avg is not None]
        counts = dict(self.lab.counts) if self.lab else {}
        summary = {
            "experiment": cfg.tracking.experiment,
            "run_name": cfg.run_name,
            "strategy": cfg.strategy.name,
            "status": status,
            "stop_reason": reason,
            "generations": last.generation if last else None,
            "best_model": last.best if last else None,
            "best_avg": last.best_avg if last else None,
            "best_foundation_avg": max(foundation_avgs, default=None),
            "models": len(models),
            "counts": {k: round(v, 1) if isinstance(v, float) else v for k, v in counts.items()},
            "runtime": cfg.runtime.name,
            "flow": {"host": socket.gethostname(), "pid": os.getpid()},
            "peak_concurrent_steps": self.lab.peak_concurrency() if self.lab else None,
            "steps": self.lab.where() if self.lab else {},
            "mlflow_parent_run": self.tracker.parent_id,
            "prefect": self.prefect,
            "history": [vars(h) for h in self.history],
            "final_scores": {
                m.name: {
                    "rank": m.final["rank"],
                    "search_avg": m.avg,
                    "avg": m.final["avg"],
                    "scores": m.final["scores"],
                }
                for m in self.final
            },
            "wall_time_s": round(time.time() - self.started, 1),
        }
        if self.final:
            best = max(self.final, key=lambda m: m.final["avg"])
            summary["final_best_model"], summary["final_best_avg"] = best.name, best.final["avg"]
        outputs = write_outputs(self.output_dir, rows, summary, final_rows(self.final))
        # where each model lives and what it came from, for flows.export
        lineage = run_lineage(models, self.inputs.foundations)
        manifest = write_manifest(self.output_dir, list(lineage.values()), self.paths["root"])
        resolved = self.output_dir / "config.yaml"
        resolved.write_text(yaml.safe_dump(as_dict(cfg), sort_keys=False))
        title = f"{cfg.tracking.experiment} / {cfg.run_name}"
        plots = render_run(self.output_dir, title) if self.history else []
        matrices = sorted((self.output_dir / "kinship").glob("*.csv"))
        files = [*outputs.values(), manifest, resolved, *plots, *matrices]
        publish_story(summary, rows, final_rows(self.final))
        self.tracker.log_table(rows, "results.json")
        for path in [*outputs.values(), resolved]:
            self.tracker.log_artifact(path)
        if self.history:
            for path in plots:
                self.tracker.log_artifact(path, "plots")
            self.tracker.log_artifact(self.output_dir / "kinship")
        report = {
            **summary,
            "table": format_table(rows),
            "outputs": {k: str(v) for k, v in outputs.items()},
        }
        return report, summary, files

    def _rerun_record(self, written: list[Path]) -> dict[str, Any]:
        inputs = [self.inputs.base, *self.inputs.foundations]
        folders = {m.path: m.fingerprint for m in inputs}
        folders.update({m.path: m.fingerprint for m in self.models.values() if m.fingerprint})
        settings = [self.inputs.eval_settings, self.inputs.final_settings or {}]
        return rerun_record(
            self.cfg,
            folders,
            [s.get("include_path") for s in settings],
            [m.source for m in inputs],
            written,
        )


def publish_story(
    summary: Mapping[str, Any], rows: list[dict[str, Any]], final: list[dict[str, Any]]
) -> None:
    """The run's story (tasks/outputs/story.py) as a Markdown artifact of the flow run, so that
    Prefect's UI alone says which experiment it was and what it found."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    try:
        create_markdown_artifact(
            markdown=run_markdown(summary, rows, final),
            key=artifact_key(summary["experiment"], summary["run_name"]),
            description=f"{summary['experiment']} / {summary['run_name']}: results",
        )
    except Exception as exc:  # the UI's copy; the results folder and MLflow hold the record
        logging.getLogger(__name__).warning("could not publish the Prefect artifact: %r", exc)


def model_line(model: ModelResult, metric: str) -> str:
    """`model-2-1  srt x model-1-3  avg 52.22  gain +7.22  pcc 0.289` (×100, as the paper)."""
    parts = [f"{model.name:<12}", f"{' x '.join(model.parents) if model.parents else '':<24}"]
    parts.append(f"avg {100 * model.avg:6.2f}")
    if model.gain is not None:
        parts.append(f"gain {100 * model.gain:+6.2f}")
    if metric in model.kinship:
        parts.append(f"{metric} {model.kinship[metric]:.3f}")
    notes = [w for w, on in (("reused", model.reused), ("cached", model.cached)) if on]
    if notes:
        parts.append(f"({', '.join(notes)})")
    return "  ".join(parts)


def final_line(model: ModelResult) -> str:
    """`1. model-2-1  final avg 48.10  (search 52.22)  gsm8k 31.20  mmlu 55.00` (×100)."""
    final = model.final
    parts = [f"{final['rank']}. {model.name:<12}", f"final avg {100 * final['avg']:6.2f}"]
    parts.append(f"(search {100 * model.avg:6.2f})")
    parts += [f"{task} {100 * value:.2f}" for task, value in final["scores"].items()]
    if final["cached"]:
        parts.append("(cached)")
    return "  ".join(parts)
