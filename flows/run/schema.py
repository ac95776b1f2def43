"""Structured config: the shape and the allowed values of every knob in conf/.

`validate(cfg)` runs before any work. OmegaConf rejects unknown keys and wrong types against the
dataclasses below; the checks after it reject values outside their choices, each error naming
the key to fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tasks.core.device import STEP_KINDS
from tasks.core.errors import InputError
from tasks.core.store import VERIFY_MODES
from tasks.delta import VOCAB_MISMATCH
from tasks.evaluate import BACKENDS, VLLM_HINT, vllm_installed
from tasks.kinship import METRICS
from tasks.lmeval import task_entries
from tasks.merge import MethodError, check_method, merge_methods, merge_options
from tasks.select import check_settings


class ConfigError(InputError):
    """A config value that cannot work; the message starts with the key to fix."""


@dataclass
class PathsConf:
    root: str = "."
    data_dir: str = "data"
    zoo_dir: str = "data/zoo"
    store_dir: str = "data/store"
    state_dir: str = "data/state"
    output_dir: str = "results"
    mlflow_db: str = "mlflow.db"
    mlflow_artifacts: str = "mlartifacts"
    prefect_home: str = ".prefect"


@dataclass
class ModelsConf:
    base: str = "zoo:base"
    foundations: list[str] = field(default_factory=lambda: ["zoo:*"])
    allow_pickle: bool = False
    trust_remote_code: bool = False
    check_finite: bool = True


@dataclass
class StoreConf:
    # how a re-run trusts a reused store entry: `stat` re-hashes its weights only when their
    # names, sizes, mtimes or inodes changed (after a `dvc pull`/`checkout`, once); `full`
    # re-hashes every byte, and re-scans the base and foundations for NaN/Inf
    verify: str = "stat"


@dataclass
class MergeConf:
    method: str = "slerp"
    dtype: str = "float32"
    parameters: dict[str, Any] = field(default_factory=dict)
    model_parameters: dict[str, Any] = field(default_factory=dict)
    # mergekit's memory options (tasks.merge.MEMORY_OPTIONS), conf/merge/options/default.yaml
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConf:
    # a task name, or a mapping {task, num_fewshot, metric, limit, aggregation}
    tasks: list[Any] = field(default_factory=lambda: ["zoo:*"])
    include_path: str | None = None
    metric: str = "acc"  # `metric` or `metric,filter`, for tasks that name none
    batch_size: Any = 64  # a positive int, or lm-eval's "auto" / "auto:N"
    limit: Any = None  # documents per task: a count, or a fraction below 1
    num_fewshot: int | None = None  # null: each task's own
    dtype: str = "float32"
    backend: str = "hf"  # hf | vllm
    apply_chat_template: Any = False  # false, true or a template name
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    gen_kwargs: dict[str, Any] | None = None  # for generate_until tasks
    log_samples: Any = "auto"  # auto (generation tasks), true (every task) or false


@dataclass
class FinalEvalConf(EvalConf):
    """A second benchmark for the run's best models (`final_eval=open_llm`)."""

    top_k: int = 1  # the run's top_k models by search avg


@dataclass
class KinshipConf:
    metric: str = "pcc"
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    abs_cosine: bool = False
    vocab_mismatch: str = "shared_rows"
    chunk_elems: int = 1 << 24


@dataclass
class StopConf:
    until_stable: bool = True
    patience: int | None = 2
    max_generations: int | None = 6
    kinship_threshold: float | None = None


@dataclass
class StrategyConf:
    name: str = "greedy_kinship"
    k: int = 3
    partner: str = "lowest"
    stop: StopConf = field(default_factory=StopConf)


@dataclass
class TrackingConf:
    enabled: bool = True
    uri: str | None = None
    experiment: str = "zoo-evolution"


@dataclass
class DaskConf:
    address: str | None = None
    gpus: Any = "auto"  # "auto", null or a list of GPU ids
    n_workers: int = 2
    threads_per_worker: int = 1
    worker_resources: Any = "auto"  # "auto" or a mapping such as {GPU: 1}
    dashboard_address: str = "127.0.0.1:8787"
    resources: dict[str, Any] = field(
        default_factory=lambda: {kind: {"GPU": 1} for kind in STEP_KINDS}
    )
    check_timeout_s: float = 30.0


@dataclass
class RuntimeConf:
    name: str = "local"
    max_workers: int = 2  # local only
    progress: bool = True
    dask: DaskConf = field(default_factory=DaskConf)


@dataclass
class EvolveConf:
    paths: PathsConf = field(default_factory=PathsConf)
    zoo: dict[str, Any] = field(default_factory=dict)
    models: ModelsConf = field(default_factory=ModelsConf)
    store: StoreConf = field(default_factory=StoreConf)
    merge: MergeConf = field(default_factory=MergeConf)
    eval: EvalConf = field(default_factory=EvalConf)
    final_eval: FinalEvalConf | None = None  # null: no final benchmark
    kinship: KinshipConf = field(default_factory=KinshipConf)
    strategy: StrategyConf = field(default_factory=StrategyConf)
    tracking: TrackingConf = field(default_factory=TrackingConf)
    runtime: RuntimeConf = field(default_factory=RuntimeConf)
    name: str = "zoo-evolution"
    run_name: str = "greedy_kinship"
    seed: int = 0
    device: str = "auto"


DTYPES = ("float32", "float16", "bfloat16")
RUNTIMES = ("local", "dask")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}")


def _check_dask(dask: Any) -> None:
    gpus, resources = dask.gpus, dask.worker_resources
    if not (gpus in ("auto", None) or OmegaConf.is_list(gpus)):
        raise ConfigError(f"runtime.dask.gpus: 'auto', null or a list of GPU ids, got {gpus!r}")
    if not (resources == "auto" or OmegaConf.is_dict(resources)):
        raise ConfigError(
            f"runtime.dask.worker_resources: 'auto' or a mapping such as {{GPU: 1}}, "
            f"got {resources!r}"
        )
    for kind in dask.resources:
        _choice("runtime.dask.resources", kind, STEP_KINDS)
    if dask.n_workers < 1 or dask.threads_per_worker < 1:
        raise ConfigError("runtime.dask.n_workers and threads_per_worker: must be positive")


def under(key: str, exc: InputError) -> str:
    """An `eval.`-keyed message of the task layer, keyed for the eval config `key` instead."""
    msg = str(exc)
    return f"{key}.{msg.removeprefix('eval.')}" if msg.startswith("eval.") else f"{key}: {msg}"


def _check_eval(ev: Any, key: str = "eval") -> None:
    if not ev.tasks:
        raise ConfigError(f"{key}.tasks: at least one evaluation task is needed")
    try:
        task_entries(OmegaConf.to_container(ev.tasks), num_fewshot=ev.num_fewshot, limit=ev.limit)
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


def validate(cfg: DictConfig) -> DictConfig:
    """Return `cfg` merged onto the schema, or raise ConfigError naming the offending key."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    try:
        typed = OmegaConf.merge(OmegaConf.structured(EvolveConf), plain)
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
