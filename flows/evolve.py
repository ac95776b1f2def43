"""Entry point: `python -m flows.evolve +experiment=greedy_kinship`.

Compose the config (Hydra), validate it and check the inputs before any work, then run the
evolution flow (Prefect) on the configured task runner. Input and config errors print one line
and exit 2, Hydra's own (a mistyped key, an unknown group option) too (`hydra_entry`); anything
else is a bug: its traceback is shown and the exit status is 1.
`-m` sweeps (`-m +experiment=greedy,greedy_kinship seed=0,1`) run one flow per job, each under a
run name of its own; the return value, the best average, is what a Hydra sweeper optimises.
"""

from __future__ import annotations

import os

# lm-eval draws a progress bar per task and evaluation that no option switches off, and steps
# running side by side garble them. tqdm reads TQDM_* defaults when first imported, so this comes
# before any import that loads it; the project's own bars pass `disable` (runtime.progress).
os.environ.setdefault("TQDM_DISABLE", "1")

import difflib  # noqa: E402
import errno  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TypeVar  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402
from omegaconf.errors import (  # noqa: E402
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
)

# light imports only up to the flow: a run with nothing to do (flows/run/uptodate.py) is told in
# seconds; the libraries (torch, Prefect, mergekit, lm-eval, MLflow) load when there is work
from flows.run.console import quiet_logs  # noqa: E402
from flows.run.schema import ConfigError, EvolveConf, typed_config  # noqa: E402
from flows.run.uptodate import finished_run  # noqa: E402
from tasks.core.errors import InputError  # noqa: E402
from tasks.core.store import own_copies  # noqa: E402
from tasks.outputs.tables import best_line, final_benchmark_line  # noqa: E402

T = TypeVar("T")

# overrides that say where files go or how steps run, not which experiment this is
NOT_IDENTITY = (
    *("experiment", "debug", "run_name"),
    *("paths.", "runtime.", "tracking.", "store.", "hydra."),
)
# DVC outputs (dvc.yaml) that libraries write in place: SQLite, Prefect's and MLflow's files
WRITTEN_IN_PLACE = ("mlflow_db", "state_dir", "mlflow_artifacts")


def sweep_run_name(cfg: DictConfig) -> str:
    """In a `-m` sweep, each job's run name carries the overrides that make it differ (e.g.
    `greedy-seed=1`), so jobs get their own results folder and Prefect home."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return cfg.run_name
    overrides = [o.lstrip("+~") for o in HydraConfig.get().overrides.task]
    if any(o.startswith("run_name=") for o in overrides):
        return cfg.run_name
    parts = [o for o in overrides if not o.split("=")[0].startswith(NOT_IDENTITY)]
    return "-".join([cfg.run_name, *parts]).replace("/", "_")


def run(cfg: DictConfig) -> dict:
    """Validate `cfg` and run the evolution; returns the run summary."""
    with open_dict(cfg):
        cfg.run_name = sweep_run_name(cfg)
    try:
        settings = typed_config(cfg)
        done = finished_run(settings)
        if done is not None:
            print(up_to_date_line(done))
            return done
        # Prefect configures logging when first used (prefect.main); the console rules go on top
        import prefect.main  # noqa: F401

        quiet_logs()
        from flows.run.checks import check_values

        check_values(settings)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{_preset_hint(cfg, str(exc))}") from None
    from flows.run.inputs import check_inputs
    from flows.run.runtime import prefect_runtime, task_runner

    check_inputs(settings)
    for key in WRITTEN_IN_PLACE:  # after `dvc pull`/`checkout` these may be links to DVC's cache
        written = Path(getattr(settings.paths, key))
        if written.exists():
            own_copies(written)
    # the flow's imports and the MLflow store while Prefect's server starts
    with prefect_runtime(settings.paths, meanwhile=lambda: get_ready(settings)):
        from prefect import tags

        from flows.run.pipeline import evolve_flow

        flow = evolve_flow.with_options(
            task_runner=task_runner(settings.runtime),
            # Prefect's UI lists runs by this, not by a random "humble-lizard"
            flow_run_name=lambda: f"{settings.tracking.experiment}/{settings.run_name}",
        )
        with tags(*flow_tags(settings)):
            return flow(settings)


def up_to_date_line(summary: dict) -> str:
    """What a run with nothing to do says before its finished run's table."""
    written = Path(summary["outputs"]["summary"])  # written last, when the run finished
    folder = written.parent
    shown = os.path.relpath(folder) if folder.is_relative_to(Path.cwd()) else str(folder)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(written.stat().st_mtime))
    return (
        f"up to date: {shown} holds this run, finished {when} with the same config, inputs and "
        "store entries; nothing was run (runtime.replay=true replays it through Prefect)"
    )


def flow_tags(settings: EvolveConf) -> list[str]:
    """Tags of the flow run, to filter runs by in Prefect's UI."""
    return [
        f"strategy:{settings.strategy.name}",
        f"runtime:{settings.runtime.name}",
        f"device:{settings.device}",
        f"experiment:{settings.tracking.experiment}",
    ]


def get_ready(settings: EvolveConf) -> None:
    """What the flow needs first: the embedded zoo built when the run uses it and it is not up to
    date (its pretraining takes one core, the server's start the other; the flow's zoo step then
    only reads the manifest), the libraries imported and, when tracking, the MLflow store created
    (a new one's migrations take seconds)."""
    from flows.run.inputs import uses_zoo

    if uses_zoo(settings):
        from tasks.zoo.build import build_zoo

        build_zoo(Path(settings.paths.zoo_dir), settings.zoo, progress=settings.runtime.progress)
    import flows.run.pipeline  # noqa: F401  (MLflow, mergekit, Prefect's flow engine)
    from tasks.evaluate import import_libraries as eval_libraries

    eval_libraries()
    if settings.tracking.enabled:
        from tasks.outputs.tracking import prepare_store, sqlite_uri

        prepare_store(settings.tracking.uri or sqlite_uri(settings.paths.mlflow_db))


def _preset_hint(cfg: DictConfig, message: str) -> str:
    """`merge.method=X` changes the method but keeps the parameters of the preset Hydra chose
    (slerp's `t`...); when that is why the merge config is refused, say how to pick X whole."""
    if not message.startswith("merge.") or not HydraConfig.initialized():
        return ""
    chosen = HydraConfig.get().runtime.choices.get("merge")
    method = cfg.merge.method
    if chosen in (None, method):
        return ""
    return (
        f" (merge.method={method} keeps the parameters of the {chosen} preset: "
        f"choose the method with merge={method})"
    )


def guarded(work: Callable[[], T]) -> T:
    """Run `work`; bad input prints one line and exits 2, a full disk one line and exits 1,
    anything else (a bug) its traceback and exits 1 (Hydra would hide the traceback)."""
    try:
        return work()
    except InputError as exc:
        kind = "config error" if isinstance(exc, ConfigError) else "error"
        # OmegaConf's messages add lines (full_key, object_type): the first one says it
        print(f"{kind}: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            traceback.print_exc()
            sys.exit(1)
        print(
            f"error: no room to write ({exc}); nothing partial was kept: free space and run the "
            "same command again to continue",
            file=sys.stderr,
        )
        sys.exit(1)
    except Exception as exc:
        from flows.run.cluster import killed_worker_reason

        reason = killed_worker_reason(exc)
        if reason is None:
            traceback.print_exc()
        else:  # not a bug: the machine's memory, said in one line
            print(f"error: {reason}", file=sys.stderr)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    quiet_logs()
    summary = guarded(lambda: run(cfg))
    print(f"\n{summary['table']}\n")
    print(
        f"stopped: {summary['stop_reason']}; {best_line(summary)}; "
        f"outputs in {summary['outputs']['table'].rsplit('/', 1)[0]}"
    )
    final = final_benchmark_line(summary)
    if final:
        print(final)
    # Prefect's own "View at" line is among the INFO lines kept off the terminal
    if summary["prefect"]["flow_run_url"]:
        print(f"Prefect flow run: {summary['prefect']['flow_run_url']}")
    return summary["best_avg"]


def hydra_line(exc: Exception) -> str:
    """Hydra's report of a bad override or config, in one line: the key and a near miss for a
    mistyped key, else Hydra's message without its search path and with its option list inline."""
    cause = exc.__cause__
    # what Hydra turns into "Could not override": a key the composed config does not have
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        key = cause.full_key
        known = [str(k) for k in cause.parent_node.keys()] if cause.parent_node is not None else []
        near = difflib.get_close_matches(str(cause.key), known, n=1)
        parent = key.rpartition(".")[0]
        guess = f"did you mean {parent + '.' if parent else ''}{near[0]}? " if near else ""
        # Hydra's message ends with the override as it must be written to add the key
        append = str(exc).split()[-1] if "+" in str(exc) else f"+{key}=..."
        return f"{key}: no such key ({guess}a new key is added with {append})"
    lines: list[str] = []
    for line in str(exc).splitlines():
        if line.startswith("Config search path"):
            break
        if line.startswith("\t") and lines:
            lines[-1] += ("" if lines[-1].endswith(":") else ",") + " " + line.strip()
        elif line.strip():
            lines.append(line.strip().rstrip("."))
    if isinstance(cause, OmegaConfBaseException):
        lines.append(str(cause).splitlines()[0])
    return "; ".join(lines)


def hydra_entry(entry: Callable[[], object]) -> None:
    """Run a `@hydra.main` entry point with Hydra's own errors (a mistyped key, an unknown group
    option, an override it cannot parse: all before the task function runs) as one line and
    exit 2. HYDRA_FULL_ERROR makes Hydra raise them instead of printing several lines and
    exiting 1; a user who set it gets Hydra's full report."""
    asked = os.environ.get("HYDRA_FULL_ERROR") == "1"  # as Hydra reads it
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        entry()
    except (HydraException, OmegaConfBaseException) as exc:
        if asked:
            raise
        print(f"config error: {hydra_line(exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    hydra_entry(main)
