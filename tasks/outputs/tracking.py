"""Tracking step: the evolution as MLflow runs.

One parent run per experiment run, found again on re-run by its config fingerprint tag, so a
resumed run continues it; one child run per model, found again by its name, so a resume never
duplicates it. Everything goes through `MlflowClient` with explicit run ids: `mlflow.active_run()`
is thread-local and would be None inside Prefect's worker threads.

Each model is also an MLflow 3 "external" logged model. Lineage is MLflow's own: a model's child
run has its logged model as an output (`LoggedModelOutput`, step = generation) and, for a merge,
the parents' logged models as inputs (`LoggedModelInput`); `parents_of` reads it back. MLflow keeps
no order among a run's model inputs: the ordered parent list is the run's `parents` param.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from tasks.core.errors import InputError

CONFIG_TAG = "evolve.config_fingerprint"
MODEL_TAG = "evolve.model"
LOGGED_MODEL_TAG = "evolve.logged_model_id"
PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, tokens)
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
RUN_SECONDS = "run_seconds"  # the parent run's working time: its sessions summed
SESSIONS_TAG = "evolve.sessions"


def sqlite_uri(db_path: Path) -> str:
    return f"sqlite:///{Path(db_path).resolve()}"


def check_store(uri: str) -> None:
    """Refuse, before any work, a SQLite tracking store that SQLite itself finds damaged (a
    truncated copy, a half-restored file); MLflow would fail on it mid-run with a long traceback.
    Read-only: a missing store is made by MLflow later, nothing is written here."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///")).resolve()
    if not path.is_file():
        return
    try:
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            found = [str(row[0]) for row in db.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as exc:
        found = [str(exc)]
    if found != ["ok"]:
        raise InputError(
            f"the MLflow store {path} is damaged ({found[0]}): restore it (`dvc checkout "
            f"{path.name}` where DVC tracks it) or move it aside for a new one; nothing else is "
            "lost, the merges and evaluations are cached under data/"
        )


def prepare_store(uri: str) -> None:
    """Create and migrate a new SQLite store now (seconds of MLflow's migrations), so the run's
    first record does not wait for it; an existing store is only opened."""
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    with _store_lock(uri):  # as Tracker: two processes migrating one new store corrupt it
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)


def _quiet_mlflow() -> None:
    """MLflow's INFO lines (a new store's "Creating initial MLflow database tables...") off; after
    importing mlflow, whose import sets its logger's level."""
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def open_tracker(
    uri: str,
    experiment: str,
    run_name: str,
    config_fingerprint: str,
    *,
    enabled: bool,
    artifact_dir: Path | None = None,
) -> Tracker | NoTracker:
    """The run's MLflow record, or one that records nothing (tracking.enabled=false)."""
    if not enabled:
        return NoTracker()
    return Tracker(uri, experiment, run_name, config_fingerprint, artifact_dir)


class NoTracker:
    """A Tracker that records nothing and touches no store: tracking.enabled=false."""

    parent_id: str | None = None
    resumed = False

    def child_count(self) -> int:
        return 0

    def log_model(self, *_: Any, **__: Any) -> None:
        return None

    # every other record is a call that does nothing, too
    start = log_model_metrics = log_model_artifacts = log_generation = log_model
    log_artifact = log_table = finish = tag_run = register = log_model


class Tracker:
    """MLflow record of one evolution run (`open_tracker` chooses it or NoTracker)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        config_fingerprint: str,
        artifact_dir: Path | None = None,
    ) -> None:
        self.run_name = run_name
        self.config_fingerprint = config_fingerprint
        self.parent_id: str | None = None
        self.resumed = False
        self._children: dict[str, str] = {}
        self._model_ids: dict[str, str] = {}
        from mlflow.tracking import MlflowClient

        _quiet_mlflow()
        self.uri = uri
        with _store_lock(uri):
            # the client creates and migrates a new SQLite store on construction; two processes
            # doing that at once corrupt it
            # the registry in the same store: its default is ./mlflow.db under the cwd
            self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                self.experiment_id = self.client.create_experiment(
                    experiment,
                    # without it MLflow writes artifacts to ./mlruns under whatever the cwd is
                    artifact_location=(
                        Path(artifact_dir).resolve().as_uri() if artifact_dir else None
                    ),
                    tags={KIND_TAG: KIND},
                )
            else:
                self.experiment_id = found.experiment_id
                if KIND_TAG not in found.tags:  # made before the tag: a kind someone chose stays
                    self.client.set_experiment_tag(self.experiment_id, KIND_TAG, KIND)

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """Open (or reopen) the parent run."""
        with _store_lock(self.uri):  # two processes with one config must share one parent run
            self._find_or_create_parent(params, tags)
        run = self.client.get_run(self.parent_id)
        self._session_start = time.time()
        self._earlier_seconds = run.data.metrics.get(RUN_SECONDS, 0.0)
        self._run_start_ms = run.info.start_time
        # the run_seconds metric's step: the latest value (MLflow's: highest step) is this
        # session's, also when it is killed before the last session's generation count
        self._session = int(run.data.tags.get(SESSIONS_TAG, "0")) + 1
        self.client.set_tag(self.parent_id, SESSIONS_TAG, str(self._session))
        return self.parent_id

    def run_seconds(self) -> float:
        """The parent run's working time so far: the earlier sessions' and this one's. A resumed
        run's start-to-end span also counts the time it was not running."""
        return round(self._earlier_seconds + time.time() - self._session_start, 1)

    def _find_or_create_parent(self, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        existing = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{CONFIG_TAG}` = '{self.config_fingerprint}'",
            max_results=50,
        )
        parents = [r for r in existing if PARENT_TAG not in r.data.tags]
        if parents:
            run = sorted(parents, key=lambda r: r.info.start_time)[0]
            self.parent_id = run.info.run_id
            self.resumed = True
            self.client.update_run(self.parent_id, status="RUNNING")
            children = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}'",
                max_results=10_000,
            )
            self._children = {
                r.data.tags[MODEL_TAG]: r.info.run_id for r in children if MODEL_TAG in r.data.tags
            }
            self._model_ids = {
                r.data.tags[MODEL_TAG]: r.data.tags[LOGGED_MODEL_TAG]
                for r in children
                if MODEL_TAG in r.data.tags and LOGGED_MODEL_TAG in r.data.tags
            }
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.run_name,
                tags={CONFIG_TAG: self.config_fingerprint, **tags},
            )
            self.parent_id = run.info.run_id
            self._log_params(self.parent_id, params)
        return self.parent_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_model(
        self,
        name: str,
        *,
        params: Mapping[str, Any],
        metrics: Mapping[str, float | None],
        tags: Mapping[str, str],
        parents: Sequence[str] = (),
    ) -> str:
        """Create the model's child run (and its MLflow logged model, with its parents as
        lineage) once; later calls only add metrics and tags."""
        from mlflow.entities import Metric, RunTag

        run_id = self._children.get(name)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=name,
                tags={PARENT_TAG: self.parent_id, MODEL_TAG: name},
            )
            run_id = run.info.run_id
            self._children[name] = run_id
            self._log_params(run_id, params)
        now = _now_ms()
        self.client.log_batch(
            run_id,
            metrics=[
                Metric(k, float(v), now, 0)
                for k, v in metrics.items()
                if v is not None and math.isfinite(v)
            ],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )
        if name not in self._model_ids:
            self._model_ids[name] = self._log_external_model(name, run_id, params, tags, parents)
            self.client.set_tag(run_id, LOGGED_MODEL_TAG, self._model_ids[name])
        self._link_lineage(name, run_id, parents, _generation(params))
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def log_model_metrics(self, name: str, metrics: Mapping[str, float | None]) -> None:
        """Add metrics to the child run of model `name` (logged before by `log_model`)."""
        from mlflow.entities import Metric

        now = _now_ms()
        values = [
            Metric(k, float(v), now, 0)
            for k, v in metrics.items()
            if v is not None and math.isfinite(v)
        ]
        self.client.log_batch(self._child(name), metrics=values)

    def log_model_artifacts(
        self, name: str, paths: Sequence[str | Path], artifact_path: str | None = None
    ) -> None:
        """Files as artifacts of model `name`'s child run, under `artifact_path`; a file logged
        again (a resumed run) replaces the earlier copy."""
        run_id = self._child(name)
        for path in paths:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def _child(self, name: str) -> str:
        run_id = self._children.get(name)
        if run_id is None:
            raise KeyError(f"model '{name}' has no child run yet (log_model first)")
        return run_id

    def _link_lineage(self, name: str, run_id: str, parents: Sequence[str], step: int) -> None:
        """The run's own logged model as its output, the parents' as its inputs; only the links
        still missing, so a resume (or a crash between two calls) never logs one twice: MLflow's
        SQL store raises IntegrityError on a second output link to the same model."""
        from mlflow.entities import LoggedModelInput, LoggedModelOutput

        run = self.client.get_run(run_id)
        outputs = {m.model_id for m in (run.outputs.model_outputs if run.outputs else [])}
        inputs = {m.model_id for m in (run.inputs.model_inputs if run.inputs else [])}
        model_id = self._model_ids[name]
        if model_id not in outputs:
            self.client.log_outputs(run_id, models=[LoggedModelOutput(model_id, step)])
        missing: list[str] = []
        for parent in dict.fromkeys(parents):
            parent_id = self._model_ids.get(parent)
            if parent_id is None:
                logging.getLogger(__name__).warning(
                    "%s: parent %s has no logged model in this run; lineage link skipped",
                    name,
                    parent,
                )
            elif parent_id not in inputs:
                missing.append(parent_id)
        if missing:
            self.client.log_inputs(
                run_id, datasets=None, models=[LoggedModelInput(m) for m in missing]
            )

    def _log_external_model(
        self,
        name: str,
        run_id: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        parents: Sequence[str],
    ) -> str:
        """An MLflow 3 external model: weights stay in the store, MLflow holds the record."""
        model = self.client.create_logged_model(
            self.experiment_id,
            name=name,
            source_run_id=run_id,
            tags={**{k: str(v) for k, v in tags.items()}, MODEL_TAG: name},
            params={k: _param_value(v) for k, v in params.items()},
            model_type="merged-llm" if parents else "foundation-llm",
        )
        self.client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

    def log_generation(self, generation: int, metrics: Mapping[str, float | None]) -> None:
        """A generation's metrics (step = generation) and the run's time so far, which a run
        killed later keeps."""
        from mlflow.entities import Metric

        now = _now_ms()
        values = [
            Metric(k, float(v), now, generation)
            for k, v in metrics.items()
            if v is not None and math.isfinite(v)
        ]
        values.append(Metric(RUN_SECONDS, self.run_seconds(), now, self._session))
        self.client.log_batch(self.parent_id, metrics=values)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.parent_id, str(path), artifact_path or Path(path).name)
        else:
            self.client.log_artifact(self.parent_id, str(path), artifact_path)

    def log_table(self, rows: list[dict[str, Any]], file_name: str) -> None:
        if rows:
            columns = {k: [r.get(k) for r in rows] for k in rows[0]}
            self.client.log_table(self.parent_id, data=columns, artifact_file=file_name)

    def finish(self, status: str = "FINISHED", tags: Mapping[str, str] | None = None) -> None:
        """Close the parent run. Its end time is its start plus `run_seconds`, so the UI's
        Duration is the time it ran, not the days between a first start and a resume's end;
        the real end is the `evolve.ended_at` tag."""
        seconds = self.run_seconds()
        self.client.log_metric(self.parent_id, RUN_SECONDS, seconds, step=self._session)
        ended = {"evolve.ended_at": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        for k, v in {**(tags or {}), **ended}.items():
            self.client.set_tag(self.parent_id, k, v)
        end_ms = self._run_start_ms + int(1000 * seconds)
        self.client.set_terminated(self.parent_id, status=status, end_time=end_ms)

    def register(
        self, registered_name: str, name: str, description: str, tags: Mapping[str, Any]
    ) -> str:
        """Model `name`'s logged model as a version of the registered model `registered_name`
        (made when missing); the existing version when it is already one (a re-run). Returns
        the version."""
        from mlflow.exceptions import MlflowException
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        model_id = self._model_ids[name]
        with _store_lock(self.uri):
            try:
                self.client.get_registered_model(registered_name)
            except MlflowException:
                self.client.create_registered_model(
                    registered_name,
                    description=f"The best model of each finished run of {registered_name}.",
                )
            filter_string = f"name = '{registered_name}'"
            for version in self.client.search_model_versions(filter_string):
                if version.tags.get(LOGGED_MODEL_TAG) == model_id:
                    return str(version.version)
            logged = self.client.get_logged_model(model_id)
            version = self.client.create_model_version(
                registered_name,
                # the logged model's location, not `models:/<id>`: MLflow resolves that URI
                # through the default tracking store, not this client's
                source=logged.artifact_location,
                run_id=self._child(name),
                model_id=model_id,
                tags={**{k: _param_value(v) for k, v in tags.items()}, LOGGED_MODEL_TAG: model_id},
                description=description,
            )
        # what mlflow.register_model adds: the logged model's page lists its versions
        listed = json.loads(logged.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        listed.append({"name": registered_name, "version": str(version.version)})
        self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})
        return str(version.version)

    def child_count(self) -> int:
        return len(self._children)

    def tag_run(self, run_id: str, key: str, value: str) -> None:
        """Tag another run of the store (a study tags the runs it pooled)."""
        self.client.set_tag(run_id, key, value)


def parents_of(client: Any, model_id: str) -> list[str]:
    """The logged model ids of `model_id`'s parents, read back through MLflow's API: the model
    inputs of the run that produced it (in no particular order; [] for a foundation)."""
    run_id = client.get_logged_model(model_id).source_run_id
    if not run_id:
        return []
    run = client.get_run(run_id)
    return [m.model_id for m in (run.inputs.model_inputs if run.inputs else [])]


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    with FileLock(uri.removeprefix("sqlite:///") + ".lock"):
        yield


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:6000]


def _generation(params: Mapping[str, Any]) -> int:
    """The step of a model's output link: its generation, 0 when unknown."""
    try:
        return int(params.get("generation") or 0)
    except (TypeError, ValueError):
        return 0


def _now_ms() -> int:
    return int(time.time() * 1000)
