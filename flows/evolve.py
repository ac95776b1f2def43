"""Entry point: `python -m flows.evolve +experiment=greedy_kinship`.

Compose the config (Hydra), validate it and check the inputs before any work, then run the
evolution flow (Prefect) on the configured task runner. Input and config errors print one line
and exit 2; anything else is a bug: its traceback is shown and the exit status is 1.
`-m` sweeps (`-m +experiment=greedy,greedy_kinship seed=0,1`) run one flow per job, each under a
run name of its own; the return value, the best average, is what a Hydra sweeper optimises.
"""

from __future__ import annotations

import os

# lm-eval draws a progress bar per task and evaluation that no option switches off, and steps
# running side by side garble them. tqdm reads TQDM_* defaults when first imported, so this comes
# before any import that loads it; the project's own bars pass `disable` (runtime.progress).
os.environ.setdefault("TQDM_DISABLE", "1")

import errno  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TypeVar  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from flows.run.inputs import check_inputs  # noqa: E402
from flows.run.runtime import prefect_runtime, quiet_logs, task_runner  # noqa: E402
from flows.run.schema import ConfigError, validate  # noqa: E402
from tasks.core.errors import InputError  # noqa: E402
from tasks.core.store import own_copies  # noqa: E402

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
    settings = validate(cfg)
    plain = OmegaConf.to_container(settings, resolve=True)
    check_inputs(plain)
    for key in WRITTEN_IN_PLACE:  # after `dvc pull`/`checkout` these may be links to DVC's cache
        if Path(plain["paths"][key]).exists():
            own_copies(Path(plain["paths"][key]))
    with prefect_runtime(plain["paths"]):
        from flows.run.pipeline import evolve_flow

        return evolve_flow.with_options(task_runner=task_runner(plain["runtime"]))(plain)


def guarded(work: Callable[[], T]) -> T:
    """Run `work`; bad input prints one line and exits 2, a full disk one line and exits 1,
    anything else (a bug) its traceback and exits 1 (Hydra would hide the traceback)."""
    try:
        return work()
    except InputError as exc:
        kind = "config error" if isinstance(exc, ConfigError) else "error"
        print(f"{kind}: {exc}", file=sys.stderr)
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
    except Exception:
        traceback.print_exc()
        sys.exit(1)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    quiet_logs()
    summary = guarded(lambda: run(cfg))
    print(f"\n{summary['table']}\n")
    print(
        f"stopped: {summary['stop_reason']}; best {summary['best_model']} "
        f"avg={summary['best_avg']:.4f} (best foundation {summary['best_foundation_avg']:.4f}); "
        f"outputs in {summary['outputs']['table'].rsplit('/', 1)[0]}"
    )
    if summary.get("final_scores"):
        print(
            f"final benchmark: best {summary['final_best_model']} "
            f"avg={summary['final_best_avg']:.4f} of the top {len(summary['final_scores'])} "
            "by search avg (final_scores.csv)"
        )
    return summary["best_avg"]


if __name__ == "__main__":
    main()
