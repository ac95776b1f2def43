"""Structured config: the shape and the allowed values of every knob in conf/.

`validate(cfg)` runs before any work. OmegaConf rejects unknown keys and wrong types against the
dataclasses below (`typed_config`); the checks after it (flows/run/checks.py) reject values
outside their choices, each error naming the key to fix. This module imports no step: the
typed config alone costs no torch, Prefect or mergekit import (a finished run is recognised on
it in seconds: flows/run/uptodate.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tasks.core.errors import InputError


class ConfigError(InputError):
    """A config value that cannot work; the message starts with the key to fix."""


# Every field has a type and no default: conf/ holds every value. A key missing from the composed
# config is an error naming it, not a second default that could disagree with conf/.


@dataclass
class PathsConf:
    root: str
    data_dir: str
    zoo_dir: str
    store_dir: str
    state_dir: str
    output_dir: str
    mlflow_db: str
    mlflow_artifacts: str
    prefect_home: str


@dataclass
class ModelsConf:
    base: str
    foundations: list[str]
    allow_pickle: bool
    trust_remote_code: bool
    check_finite: bool


@dataclass
class StoreConf:
    # how a re-run trusts a reused store entry: `stat` re-hashes its weights only when their
    # names, sizes, mtimes or inodes changed (after a `dvc pull`/`checkout`, once); `full`
    # re-hashes every byte, and re-scans the base and foundations for NaN/Inf
    verify: str


@dataclass
class MergeConf:
    method: str
    dtype: str  # auto: the parents' stored dtype (tasks.core.weights)
    parameters: dict[str, Any]
    model_parameters: dict[str, Any]
    # mergekit's memory options (tasks.merge.MEMORY_OPTIONS), conf/merge/options/default.yaml
    options: dict[str, Any]


@dataclass
class EvalConf:
    # a task name, or a mapping {task, num_fewshot, metric, limit, aggregation}
    tasks: list[Any]
    include_path: str | None
    metric: str  # `metric` or `metric,filter`, for tasks that name none
    batch_size: Any  # a positive int, or lm-eval's "auto" / "auto:N"
    limit: Any  # documents per task: a count, or a fraction below 1
    num_fewshot: int | None  # null: each task's own
    dtype: str  # auto: the model's stored dtype
    backend: str  # hf | vllm
    apply_chat_template: Any  # false, true or a template name
    fewshot_as_multiturn: bool
    system_instruction: str | None
    gen_kwargs: dict[str, Any] | None  # for generate_until tasks
    log_samples: Any  # auto (generation tasks), true (every task) or false


@dataclass
class FinalEvalConf(EvalConf):
    """A second benchmark for the run's best models (`final_eval=open_llm`)."""

    top_k: int  # the run's top_k models by search avg


@dataclass
class KinshipConf:
    metric: str
    metrics: list[str]
    abs_cosine: bool
    vocab_mismatch: str
    chunk_elems: int


@dataclass
class StopConf:
    until_stable: bool
    patience: int | None
    max_generations: int | None
    kinship_threshold: float | None


@dataclass
class StrategyConf:
    name: str
    k: int
    partner: str
    stop: StopConf


@dataclass
class TrackingConf:
    enabled: bool
    uri: str | None
    experiment: str
    register_best: bool  # a finished run's best model as a version in the Model Registry


@dataclass
class DaskConf:
    address: str | None
    gpus: Any  # "auto", null or a list of GPU ids
    n_workers: int
    threads_per_worker: int
    worker_resources: Any  # "auto" or a mapping such as {GPU: 1}
    dashboard_address: str
    memory_limit: Any  # per temporary-cluster worker, as `dask worker --memory-limit` reads it
    resources: dict[str, Any]
    check_timeout_s: float


@dataclass
class RuntimeConf:
    name: str
    max_workers: int  # local only
    progress: bool
    replay: bool  # replay a finished run through Prefect instead of reporting it
    dask: DaskConf


@dataclass
class EvolveConf:
    paths: PathsConf
    zoo: dict[str, Any]
    models: ModelsConf
    store: StoreConf
    merge: MergeConf
    eval: EvalConf
    final_eval: FinalEvalConf | None  # null: no final benchmark
    kinship: KinshipConf
    strategy: StrategyConf
    tracking: TrackingConf
    runtime: RuntimeConf
    name: str
    run_name: str
    seed: int
    device: str


def under(key: str, exc: InputError) -> str:
    """An `eval.`-keyed message of the task layer, keyed for the eval config `key` instead."""
    msg = str(exc)
    return f"{key}.{msg.removeprefix('eval.')}" if msg.startswith("eval.") else f"{key}: {msg}"


def typed_config(cfg: DictConfig) -> EvolveConf:
    """The composed `cfg` as the typed config every step reads, or ConfigError naming the
    offending key: an unknown key, a wrong type, a key conf/ does not set."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvolveConf), plain)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{missing[0]}: missing; conf/ must set every key")
        typed: EvolveConf = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(f"{key}: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    return typed


def validate(cfg: DictConfig) -> EvolveConf:
    """`typed_config`, then every value checked against its choices and ranges (ConfigError
    naming the offending key)."""
    from flows.run.checks import check_values

    typed = typed_config(cfg)
    check_values(typed)
    return typed


def as_dict(conf: EvolveConf) -> dict[str, Any]:
    """The typed config as plain data, keys in the schema's order: what the run records
    (resolved.yaml) and fingerprints (its MLflow run's identity)."""
    return asdict(conf)
