"""A re-run with nothing to do, recognised before anything starts.

A finished run records in its summary (`summary.json`, key `rerun`) what it was made of: its
identity (the config as the results depend on it, where its files go, its tracking), the
fingerprint of every model it read or made, a digest of its local benchmark files and the
files it wrote. The same command again finds that record, checks each model folder's stat key
against the fingerprint recorded beside its weights (no weight is read: tasks/core/store.py)
and every output file, and prints the finished run's table: seconds, where replaying it
through Prefect (a temporary server, every library imported, every step served from its cache)
takes half a minute. What `make` or `dvc repro` do for a target that is up to date.

Anything that differs, or cannot be told from stat keys alone (a hub model, a model folder the
run could not write its fingerprint into, `store.verify=full`, a remote tracking server), is no
match, and the run goes through the flow as before. `runtime.replay=true` always does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flows.run.schema import EvolveConf, as_dict
from tasks.core.store import folder_digest, known_fingerprint, stable_hash
from tasks.outputs.tables import SUMMARY_FILE, TABLE_FILE, format_table, read_outputs

RECORD_KEY = "rerun"
# config sections that are no part of what a run computes (config_fingerprint) or of where
# its files go and what it records (run_identity)
NOT_IN_RESULTS = ("paths", "runtime", "tracking", "store")


def config_fingerprint(cfg: EvolveConf) -> str:
    """What identifies a run's results: everything but where files go and how steps run (and
    how much of the store is re-read)."""
    return stable_hash({k: v for k, v in as_dict(cfg).items() if k not in NOT_IN_RESULTS})


def run_identity(cfg: EvolveConf) -> str:
    """The results, plus where the run's files go and what it records: two runs with the same
    identity would write the same files."""
    plain = as_dict(cfg)
    paths = {k: str(Path(v).resolve()) for k, v in plain["paths"].items()}
    tracking = plain["tracking"]
    return stable_hash({"results": config_fingerprint(cfg), "paths": paths, "tracking": tracking})


def rerun_record(
    cfg: EvolveConf,
    models: Mapping[str, str],
    benchmarks: Iterable[str | None],
    sources: Iterable[str],
    written: Iterable[Path],
) -> dict[str, Any]:
    """What `finished_run` checks on the next run: `models` maps each model folder the run read
    or made to its fingerprint, `benchmarks` are the local task folders, `sources` the inputs'
    kinds (zoo, local, hub), `written` the files of the results folder."""
    output_dir = Path(cfg.paths.output_dir).resolve()
    folders = sorted({str(Path(b).resolve()) for b in benchmarks if b})
    return {
        "identity": run_identity(cfg),
        "checkable": all(s in ("zoo", "local") for s in sources),
        "models": dict(sorted(models.items())),
        "benchmarks": {f: folder_digest(Path(f)) for f in folders},
        "outputs": sorted({os.path.relpath(Path(p).resolve(), output_dir) for p in written}),
    }


def finished_run(cfg: EvolveConf) -> dict[str, Any] | None:
    """The finished run this config would redo with nothing to do, as `flows.evolve` reports a
    run (its summary, with the printed table and the results path); None when anything differs
    or cannot be checked without reading weights."""
    if cfg.runtime.replay or cfg.store.verify == "full":
        return None
    tracking = cfg.tracking
    if tracking.enabled and (tracking.uri or not Path(cfg.paths.mlflow_db).is_file()):
        return None  # a remote store cannot be checked here; a deleted one is logged again
    output_dir = Path(cfg.paths.output_dir).resolve()
    try:
        rows, summary = read_outputs(output_dir)
    except (OSError, ValueError):
        return None
    record = summary.get(RECORD_KEY)
    if (
        summary.get("status") != "FINISHED"
        or not isinstance(record, dict)
        or not record.get("checkable")
        or record.get("identity") != run_identity(cfg)
        or not all((output_dir / name).is_file() for name in record.get("outputs", []))
        or any(known_fingerprint(Path(p)) != fp for p, fp in record["models"].items())
        or any(folder_digest(Path(f)) != d for f, d in record["benchmarks"].items())
    ):
        return None
    return {
        **summary,
        "table": format_table(rows),
        "outputs": {
            "table": str(output_dir / TABLE_FILE),
            "summary": str(output_dir / SUMMARY_FILE),
        },
    }
