"""The value checks of a typed config (flows/run/schema.py): choices, ranges, and what the
libraries say of the merge method and the benchmarks. Imported by `validate` when needed, since
asking mergekit and lm-eval imports them (torch, transformers: seconds)."""

from __future__ import annotations

from typing import Any

from flows.run.schema import ConfigError, DaskConf, EvalConf, EvolveConf, under
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


def check_values(typed: EvolveConf) -> None:
    """ConfigError naming the first key whose value is out of its choices or range."""
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
