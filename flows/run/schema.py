"""Structured config: the shape and the allowed values of every knob in conf/.

`validate(cfg)` runs before any work. OmegaConf rejects unknown keys and wrong types against the
dataclasses below; the checks after it reject values outside their choices, each error naming
the key to fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tasks.core.device import STEP_KINDS
from tasks.core.errors import InputError
from tasks.core.store import VERIFY_MODES
from tasks.core.weights import AUTO
from tasks.core.weights import DTYPES as STORED_DTYPES
from tasks.delta import VOCAB_MISMATCH
from tasks.evaluate import BACKENDS, VLLM_HINT, vllm_installed
from tasks.kinship import METRICS
from tasks.lmeval import task_entries
from tasks.merge import MethodError, check_method, merge_methods, merge_options
from tasks.select import check_settings


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


DTYPES = (AUTO, *STORED_DTYPES)
RUNTIMES = ("local", "dask")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}")


def _check_dask(dask: DaskConf) -> None:
    gpus, resources = dask.gpus, dask.worker_resources
    if not (gpus in ("auto", None) or isinstance(gpus, list)):
        raise ConfigError(f"runtime.dask.gpus: 'auto', null or a list of GPU ids, got {gpus!r}")
    if not (resources == "auto" or isinstance(resources, dict)):
        raise ConfigError(
            f"runtime.dask.worker_resources: 'auto' or a mapping such as {{GPU: 1}}, "
            f"got {resources!r}"
        )
    for kind in dask.resources:
        _choice("runtime.dask.resources", kind, STEP_KINDS)
    limit = dask.memory_limit
    if isinstance(limit, bool) or not (
        (isinstance(limit, int | float) and 0 <= limit)
        or (isinstance(limit, str) and (limit == "auto" or _is_bytes(limit)))
    ):
        raise ConfigError(
            "runtime.dask.memory_limit: bytes (16GB, 16e9), a fraction of this machine's memory "
            f"(1.0 = all of it), auto (Dask's RAM x threads / cores) or 0 (none), got {limit!r}"
        )
    if dask.n_workers < 1 or dask.threads_per_worker < 1:
        raise ConfigError("runtime.dask.n_workers and threads_per_worker: must be positive")


def _is_bytes(text: str) -> bool:
    from dask.utils import parse_bytes

    try:
        parse_bytes(text)
    except ValueError:
        return False
    return True


def under(key: str, exc: InputError) -> str:
    """An `eval.`-keyed message of the task layer, keyed for the eval config `key` instead."""
    msg = str(exc)
    return f"{key}.{msg.removeprefix('eval.')}" if msg.startswith("eval.") else f"{key}: {msg}"


def _check_eval(ev: EvalConf, key: str = "eval") -> None:
    if not ev.tasks:
        raise ConfigError(f"{key}.tasks: at least one evaluation task is needed")
    try:
        task_entries(ev.tasks, num_fewshot=ev.num_fewshot, limit=ev.limit)
    except InputError as exc:
        raise ConfigError(under(key, exc)) from None
    _choice(f"{key}.backend", ev.backend, BACKENDS)
    if ev.backend == "vllm" and not vllm_installed():
        raise ConfigError(
            f"{key}.backend: vllm is not installed; install it with `{VLLM_HINT}` "
            f"(a CUDA machine), or use {key}.backend=hf"
        )
    template = ev.apply_chat_template
    if not isinstance(template, bool | str):
        raise ConfigError(
            f"{key}.apply_chat_template: true, false or a template name, got {template!r}"
        )
    if not (isinstance(ev.log_samples, bool) or ev.log_samples == "auto"):
        raise ConfigError(f"{key}.log_samples: auto, true or false, got {ev.log_samples!r}")
    _choice(f"{key}.dtype", ev.dtype, DTYPES)
    batch = ev.batch_size
    if not (isinstance(batch, int) and batch >= 1) and not str(batch).startswith("auto"):
        raise ConfigError(f"{key}.batch_size: a positive integer or 'auto', got {batch!r}")


def validate(cfg: DictConfig) -> EvolveConf:
    """The composed `cfg` as the typed config every step reads, or ConfigError naming the
    offending key: an unknown key, a wrong type, a key conf/ does not set, a value out of range."""
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

    _choice("merge.dtype", typed.merge.dtype, DTYPES)
    _choice("store.verify", typed.store.verify, VERIFY_MODES)
    try:
        check_settings(typed.strategy.name, typed.strategy.partner, typed.strategy.k)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _choice("kinship.metric", typed.kinship.metric, METRICS)
    for i, metric in enumerate(typed.kinship.metrics):
        _choice(f"kinship.metrics[{i}]", metric, METRICS)
    if typed.kinship.metric not in typed.kinship.metrics:
        raise ConfigError(f"kinship.metrics: must include kinship.metric '{typed.kinship.metric}'")
    _choice("kinship.vocab_mismatch", typed.kinship.vocab_mismatch, VOCAB_MISMATCH)
    stop = typed.strategy.stop
    if stop.patience is not None and stop.patience < 1:
        raise ConfigError(
            f"strategy.stop.patience: must be at least 1 or null, got {stop.patience}"
        )
    if stop.max_generations is not None and stop.max_generations < 1:
        raise ConfigError(
            f"strategy.stop.max_generations: must be at least 1 or null, got {stop.max_generations}"
        )
    if not (stop.until_stable or stop.patience or stop.max_generations or stop.kinship_threshold):
        raise ConfigError("strategy.stop: every stop rule is off; evolution would never end")
    _check_eval(typed.eval)
    if typed.final_eval is not None:
        _check_eval(typed.final_eval, "final_eval")
        if typed.final_eval.top_k < 1:
            raise ConfigError(f"final_eval.top_k: must be at least 1, got {typed.final_eval.top_k}")
    if typed.runtime.max_workers < 1:
        raise ConfigError(f"runtime.max_workers: must be positive, got {typed.runtime.max_workers}")
    _choice("runtime.name", typed.runtime.name, RUNTIMES)
    _check_dask(typed.runtime.dask)
    if (
        typed.device != "auto"
        and typed.device not in ("cpu", "mps")
        and not typed.device.startswith("cuda")
    ):
        raise ConfigError(f"device: '{typed.device}' is not auto, cpu, cuda or cuda:N")
    # last: asking mergekit imports it (and peft, transformers' models), seconds that a typo
    # elsewhere need not wait for
    _choice("merge.method", typed.merge.method, merge_methods())
    try:
        # what mergekit's registry says the method needs, for Algorithm 1's pairs and the base
        merge = typed.merge
        check_method(
            merge.method,
            {"parameters": merge.parameters, "model_parameters": merge.model_parameters},
        )
        merge_options(merge.options)
    except MethodError as exc:
        raise ConfigError(str(exc)) from None
    return typed


def as_dict(conf: EvolveConf) -> dict[str, Any]:
    """The typed config as plain data, keys in the schema's order: what the run records
    (resolved.yaml) and fingerprints (its MLflow run's identity)."""
    return asdict(conf)
