"""Evaluation step: lm-eval's `simple_evaluate` on a loaded HF model.

The model and tokenizer are loaded here (not by lm-eval from a name) so the dtype and device
are ours and nothing asks the hub. Local task YAMLs may name their data files relative to the
YAML's folder; lm-eval would resolve such paths against the cwd, so each such task's index entry
holds its config with `data_files` made absolute (groups of local tasks then load them too).

Each eval.tasks entry carries its own few-shot count, metric (`metric,filter`), limit and
aggregation. Every entry is resolved from the task configs alone before any dataset or model
is loaded (`resolve_tasks`): unknown task, unreported metric, group without an aggregate.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import task

from tasks.device import resolve_device, running_step
from tasks.errors import InputError
from tasks.store import stable_hash

METRIC = "acc"
# lm-eval's default TaskManager indexes ~15k tasks: list only a few names in error messages
MAX_NAMES_IN_ERROR = 40
QUIET_LOGGERS = ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate", "evaluate")


def _quiet() -> None:
    """Library logs and bars off: steps run side by side, and their bars would interleave."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def import_libraries() -> None:
    """Import lm-eval and transformers' model classes in the calling thread, before steps run in
    several: their lazy imports race when first done from threads at once (measured: "ImportError:
    cannot import name 'AutoModelForCausalLM'" in 5 of 5 fresh processes)."""
    from lm_eval import simple_evaluate  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    _quiet_hflm()


@functools.cache
def _quiet_hflm() -> type:
    """lm-eval's HF model with its per-request progress bars off (its documented disable_tqdm;
    the evaluator itself never passes it)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


# -- eval.tasks entries ---------------------------------------------------------------------------

# what an eval.tasks mapping may set; a plain name takes eval's defaults for the rest
TASK_KEYS = ("task", "num_fewshot", "metric", "limit", "aggregation")


def task_entries(
    tasks: Sequence[Any],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    metric: str = METRIC,
) -> list[dict[str, Any]]:
    """Every eval.tasks entry as a plain dict with all of TASK_KEYS: a name, or a mapping with
    its own `num_fewshot`, `metric` (`name` or `name,filter`), `limit` and `aggregation` (e.g.
    `mean` instead of the task's own aggregation function); what an entry leaves out comes from
    the eval-wide defaults given here."""
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(tasks):
        key = f"eval.tasks[{i}]"
        if isinstance(raw, str):
            raw = {"task": raw}
        if not isinstance(raw, Mapping):
            raise InputError(f"{key}: a task name or a mapping with 'task', got {raw!r}")
        unknown = sorted(set(raw) - set(TASK_KEYS))
        if unknown:
            raise InputError(f"{key}: unknown key {unknown[0]!r} (allowed: {', '.join(TASK_KEYS)})")
        if not isinstance(raw.get("task"), str) or not raw["task"]:
            raise InputError(f"{key}: 'task' must name an lm-eval task, got {raw.get('task')!r}")
        shots = raw.get("num_fewshot", num_fewshot)
        if shots is not None and (not isinstance(shots, int) or shots < 0):
            raise InputError(f"{key}.num_fewshot: a count of 0 or more, got {shots!r}")
        cap = raw.get("limit", limit)
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, int | float) or cap <= 0
        ):
            raise InputError(f"{key}.limit: a positive count (or a fraction below 1), got {cap!r}")
        out.append(
            {
                "task": raw["task"],
                "num_fewshot": shots,
                "metric": str(raw.get("metric") or metric),
                "limit": cap,
                "aggregation": raw.get("aggregation"),
            }
        )
    names = [e["task"] for e in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"eval.tasks: task '{twice[0]}' is listed twice")
    return out


# -- lm-eval's task registry -----------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None, include_defaults: bool = True) -> Any:
    """One TaskManager per include path: indexing the default tasks takes 12-28 s."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager(include_defaults=True)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    folder = Path(include_path)
    for entry in manager.task_index.values():
        in_folder = entry.yaml_path is not None and folder in Path(entry.yaml_path).parents
        if in_folder and "data_files" in ((entry.cfg or {}).get("dataset_kwargs") or {}):
            # built from this config (by name or as a group member), not from the YAML again
            entry.cfg, entry.yaml_path = _local_config(entry.yaml_path), None
    return manager


def task_manager(names: Sequence[str], include_path: str | Path | None) -> Any:
    """The TaskManager that sees `names`: the local folder's alone when it has them all (fast),
    else the local folder's and lm-eval's built-in tasks together."""
    if not include_path:
        return _task_manager(None)
    folder = str(Path(include_path).resolve())
    local = _task_manager(folder, False)
    if all(name in local.task_index for name in names):
        return local
    return _task_manager(folder, True)


def _absolute_data_files(data_files: Any, folder: Path) -> Any:
    """Resolve relative local paths (str, list or split -> path mapping) against `folder`."""
    if isinstance(data_files, str):
        is_url = "://" in data_files
        return data_files if is_url or os.path.isabs(data_files) else str(folder / data_files)
    if isinstance(data_files, Mapping):
        return {k: _absolute_data_files(v, folder) for k, v in data_files.items()}
    if isinstance(data_files, list | tuple):
        return [_absolute_data_files(v, folder) for v in data_files]
    return data_files


def _entry(name: str, manager: Any) -> Any:
    """lm-eval's index entry for `name`, or InputError naming close matches."""
    entry = manager.task_index.get(name)
    if entry is None:
        available = sorted(manager.all_tasks)
        close = difflib.get_close_matches(name, available, n=5)
        shown = available if len(available) <= MAX_NAMES_IN_ERROR else close
        what = "available tasks" if shown is available else f"{len(available)} tasks; close"
        raise InputError(f"unknown lm-eval task '{name}' ({what}: {', '.join(shown) or 'none'})")
    return entry


@dataclass(frozen=True)
class _FunctionRef:
    """A `!function module.name` of a task YAML, not imported yet."""

    spec: str
    folder: Path


def _load_task_yaml(path: Path) -> dict[str, Any]:
    """lm-eval's task YAML with includes merged (as its own loader does) and every `!function`
    left as a _FunctionRef: importing e.g. tinyBenchmarks' aggregation functions needs a package
    that is only wanted when those functions are used."""
    from lm_eval.tasks._yaml_loader import _Base

    path = Path(path).resolve()

    class Loader(_Base):  # type: ignore[misc, valid-type]
        pass

    def function(loader: Any, node: Any) -> _FunctionRef:
        return _FunctionRef(loader.construct_scalar(node), path.parent)

    Loader.add_constructor("!function", function)
    with path.open("rb") as fh:
        cfg = yaml.load(fh, Loader=Loader)  # noqa: S506 - lm-eval's own YAML dialect
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        inc_cfg = _load_task_yaml(Path(inc) if os.path.isabs(inc) else path.parent / inc)
        inc_cfg.pop("task_list", None)
        merged.update(inc_cfg)
    return {**merged, **cfg}


def _import_functions(obj: Any) -> Any:
    from lm_eval.tasks._yaml_loader import _import_func_in_yml

    if isinstance(obj, _FunctionRef):
        return _import_func_in_yml(obj.spec, obj.folder)
    if isinstance(obj, Mapping):
        return {k: _import_functions(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_import_functions(v) for v in obj]
    return obj


def _local_config(yaml_path: Path) -> dict[str, Any]:
    """A local task's config with its data files made absolute and its `!function`s imported."""
    cfg = _import_functions(_load_task_yaml(yaml_path))
    kwargs = cfg["dataset_kwargs"]
    folder = Path(yaml_path).resolve().parent
    cfg["dataset_kwargs"] = {
        **kwargs,
        "data_files": _absolute_data_files(kwargs["data_files"], folder),
    }
    return cfg


def _inline_config(entry: Any, aggregation: str | None) -> dict[str, Any]:
    """A task's config with, given `aggregation`, every metric aggregated by it; its
    `!function`s are imported here (ImportError when a module is missing)."""
    cfg = _load_task_yaml(entry.yaml_path) if entry.yaml_path is not None else dict(entry.cfg)
    if aggregation is not None:
        cfg["metric_list"] = [
            {**m, "aggregation": aggregation} for m in cfg.get("metric_list") or []
        ]
    cfg.pop("tag", None)  # an inline task must not re-register its tags
    return _import_functions(cfg)


def task_spec(name: str, manager: Any, aggregation: str | None = None) -> str | dict[str, Any]:
    """The spec to hand lm-eval for `name`: the name, or, to aggregate every metric of a task
    by `aggregation`, its config dict."""
    from lm_eval.tasks._index import Kind

    entry = _entry(name, manager)
    if entry.kind != Kind.TASK or aggregation is None:
        return name
    return _inline_config(entry, aggregation)


def _check_loadable(name: str, manager: Any, aggregation: str | None) -> None:
    """The task's `!function`s import (e.g. tinyBenchmarks' aggregations need their package);
    `aggregation` only applies to a task, not a group or tag."""
    from lm_eval.tasks._index import Kind

    entry = _entry(name, manager)
    if entry.kind != Kind.TASK:
        if aggregation is not None:
            raise InputError(f"eval.tasks: 'aggregation' applies to a task; '{name}' is not one")
        return
    try:
        _inline_config(entry, aggregation)
    except ImportError as exc:
        raise InputError(f"eval.tasks: task '{name}' cannot be loaded: {exc}") from None


# -- metrics a task reports, from its config (no dataset, no model) --------------------------------


def _filters(cfg: Mapping[str, Any]) -> list[str]:
    filters = cfg.get("filter_list")
    if isinstance(filters, list) and filters:
        return [f["name"] for f in filters]
    return ["none"]


def _task_metrics(cfg: Mapping[str, Any]) -> list[str]:
    """`metric,filter` keys a task config makes lm-eval report (its metric_list, else lm-eval's
    defaults for the output type), for every filter of its filter_list."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    listed = [m["metric"] for m in cfg.get("metric_list") or [] if isinstance(m, Mapping)]
    output_type = cfg.get("output_type", "generate_until")
    metrics = listed or DEFAULT_METRIC_REGISTRY.get(output_type, [])
    names = [
        m.spec.rsplit(".", 1)[-1]
        if isinstance(m, _FunctionRef)
        else getattr(m, "__name__", None) or str(m)
        for m in metrics
    ]
    return [f"{m},{f}" for f in _filters(cfg) for m in names]


def _leaf_filters(cfg: Mapping[str, Any], manager: Any, depth: int = 0) -> set[str]:
    """Filters of a group's leaf tasks (what lm-eval aggregates when a group names none)."""
    from lm_eval.tasks._index import Kind

    found: set[str] = set()
    children = cfg.get("task")
    for child in children if isinstance(children, list) and depth < 8 else []:
        name = child if isinstance(child, str) else child.get("task") or child.get("group")
        entry = manager.task_index.get(name)
        if entry is None or entry.cfg is None:
            found.add("none")
        elif entry.kind == Kind.GROUP:
            found |= _leaf_filters(entry.cfg, manager, depth + 1)
        else:
            found.update(_filters({**entry.cfg, **(child if isinstance(child, dict) else {})}))
    return found or {"none"}


def _group_metrics(name: str, cfg: Mapping[str, Any], manager: Any) -> list[str]:
    aggregates = cfg.get("aggregate_metric_list")
    if isinstance(aggregates, Mapping):
        aggregates = [aggregates]
    if not aggregates:
        children = cfg.get("task") or []
        shown = [c if isinstance(c, str) else c.get("task") or c.get("group") for c in children]
        raise InputError(
            f"eval.tasks: group '{name}' has no aggregate metric (aggregate_metric_list), so it "
            f"has no single score; name its tasks instead: {', '.join(map(str, shown[:12]))}"
        )
    keys = []
    for agg in aggregates:
        filters = agg.get("filter_list")
        if filters is None:
            filters = sorted(_leaf_filters(cfg, manager))
        for f in [filters] if isinstance(filters, str) else filters:
            keys.append(f"{agg['metric']},{f}")
    return keys


def reported_metrics(name: str, manager: Any) -> list[str] | None:
    """The `metric,filter` keys lm-eval will report for task or group `name`, read from its
    config; None for a Python-defined task (only running it tells)."""
    from lm_eval.tasks._index import Kind

    entry = _entry(name, manager)
    if entry.kind == Kind.TAG:
        raise InputError(
            f"eval.tasks: '{name}' is a tag of {len(entry.tags)} tasks, not one score; name a "
            f"group or its tasks: {', '.join(sorted(entry.tags)[:12])}"
        )
    if entry.kind == Kind.PY_TASK or entry.cfg is None:
        return None
    if entry.kind == Kind.GROUP:
        return _group_metrics(name, entry.cfg, manager)
    return _task_metrics(entry.cfg)


def pick_metric(name: str, wanted: str, reported: Sequence[str] | None) -> str:
    """The full `metric,filter` key for `wanted` (`metric` means its unfiltered value, or its
    only filter), or InputError naming what the task reports."""
    if reported is None:
        return wanted if "," in wanted else f"{wanted},none"
    same = [k for k in reported if k.split(",")[0] == wanted.split(",")[0]]
    if "," in wanted:
        hit = wanted if wanted in reported else None
    else:
        hit = (
            f"{wanted},none" if f"{wanted},none" in same else (same[0] if len(same) == 1 else None)
        )
    if hit is None:
        hint = "; name one of its filters" if len(same) > 1 and "," not in wanted else ""
        raise InputError(
            f"eval.tasks: task '{name}' does not report metric '{wanted}'{hint} "
            f"(it reports: {', '.join(reported) or 'nothing'})"
        )
    return hit


def resolve_tasks(
    entries: Sequence[Mapping[str, Any]], include_path: str | Path | None
) -> tuple[Any, dict[str, str]]:
    """The TaskManager for `entries` and the `metric,filter` key scored for each task, read from
    the task configs alone: an unknown task, a metric the task does not report or a group without
    an aggregate raises InputError before any dataset or model is loaded."""
    manager = task_manager([e["task"] for e in entries], include_path)
    metrics = {}
    for e in entries:
        try:
            reported = reported_metrics(e["task"], manager)
        except InputError as exc:
            msg = str(exc)
            raise InputError(
                msg if msg.startswith("eval.tasks") else f"eval.tasks: {msg}"
            ) from None
        metrics[e["task"]] = pick_metric(e["task"], e["metric"], reported)
        _check_loadable(e["task"], manager, e["aggregation"])
    return manager, metrics


def check_tasks(tasks: Sequence[Any], include_path: str | Path | None) -> None:
    """Raise InputError naming any task lm-eval would not find, or a metric it would not
    report, before any model is touched."""
    if not tasks:
        raise InputError("eval.tasks: no evaluation task given")
    resolve_tasks(task_entries(tasks), include_path)


# transformers 5.23's from_pretrained is not thread-safe: it swaps process-wide globals for the
# duration of a load (PreTrainedModel.tie_weights -> no-op, torch's default dtype, torch.linspace)
# and restores what it saw on entry, so two interleaved loads can leave tie_weights a no-op for
# good. A tied-embedding model (no lm_head tensor: Qwen2, Gemma, Llama-3.2) then keeps its
# lm_head on the meta device and `.to(device)` raises "Cannot copy out of meta tensor". Measured
# here (bench/concurrent_load.py, 3 threads): tied loads failed in 44/50 tries with plain
# transformers and 10/10 through this function unlocked; untied loads never raised but left the
# process patched in 40/50 tries, and every later tied load, even a sequential one, then failed.
# In a fresh process the threads also race transformers' lazy import (ImportError: cannot import
# name 'AutoModelForCausalLM', 5/5 tries). So: one load at a time, imports included. This only
# orders the loads made here: a from_pretrained elsewhere in the process can still interleave.
_LOAD_LOCK = threading.Lock()


def load_model(model_dir: Path, device: str, dtype: str) -> tuple[Any, Any]:
    """Tokenizer and model from `model_dir`, on `device`, in eval mode; safe across threads."""
    with _LOAD_LOCK:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch_dtype = getattr(torch, dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype)
        model.to(device).eval()
    return model, tokenizer


BACKENDS = ("hf", "vllm")
VLLM_HINT = "pip install vllm"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _vllm_lm(model_dir: Path, dtype: str, batch_size: int | str) -> Any:
    """lm-eval's vLLM model on `model_dir` (vLLM loads the weights itself, on the GPU)."""
    if not vllm_installed():
        raise InputError(
            f"eval.backend: vllm is not installed ({VLLM_HINT}), or use eval.backend=hf"
        )
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(pretrained=str(model_dir), dtype=dtype, batch_size=batch_size)


def _sample_count(n_docs: int, limit: int | float) -> int:
    """lm-eval's reading of `limit`: a fraction of the documents below 1, else a count."""
    return math.ceil(n_docs * limit) if limit < 1 else min(int(limit), n_docs)


def build_tasks(
    entries: Sequence[Mapping[str, Any]], manager: Any
) -> tuple[list[Any], dict[str, list[Any]], dict[str, list[int]]]:
    """lm-eval Task/Group objects for `entries` (their datasets are loaded here), each leaf task
    set to its entry's few-shot count; the leaves of each entry; the document indices of the
    entries with a limit."""
    objects, leaves, samples = [], {}, {}
    for e in entries:
        loaded = manager.load([task_spec(e["task"], manager, e["aggregation"])])
        groups = loaded.get("groups") or {}
        objects.append(groups[e["task"]] if e["task"] in groups else loaded["tasks"][e["task"]])
        leaves[e["task"]] = list(loaded["tasks"].values())
        for leaf in leaves[e["task"]]:
            if e["num_fewshot"] is not None:
                leaf.set_config(key="num_fewshot", value=e["num_fewshot"])
            if e["limit"] is not None:
                count = _sample_count(len(leaf.eval_docs), e["limit"])
                samples[leaf.task_name] = list(range(count))
    return objects, leaves, samples


def evaluate_model(
    model_dir: Path,
    tasks: Sequence[Any],
    include_path: Path | None = None,
    *,
    batch_size: int | str = 32,
    device: str = "cpu",
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    dtype: str = "float32",
    metric: str = METRIC,
    backend: str = "hf",
    apply_chat_template: bool | str = False,
    fewshot_as_multiturn: bool = False,
    system_instruction: str | None = None,
    gen_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Each task's score (its metric, as lm-eval reports it: 0-1 for accuracies) for the model
    in `model_dir`, and their mean ("avg").

    `tasks`: names or mappings (see `task_entries`); `limit`, `num_fewshot` and `metric` are the
    defaults for entries that set none. `include_path`: a folder of task YAMLs, seen beside
    lm-eval's built-in tasks when a task is not in it; None: the built-in tasks only.
    """
    _quiet()
    from lm_eval import simple_evaluate

    if not tasks:
        raise ValueError("evaluate_model: no tasks given")
    if backend not in BACKENDS:
        raise InputError(f"eval.backend: '{backend}' is not one of {', '.join(BACKENDS)}")
    entries = task_entries(tasks, num_fewshot=num_fewshot, limit=limit, metric=metric)
    manager, metrics = resolve_tasks(entries, include_path)  # config errors before any loading
    if include_path and manager is _task_manager(str(Path(include_path).resolve()), False):
        # local data only: keep `datasets` from asking the hub (it reads this on first import);
        # hub-hosted benchmarks (eval=open_llm) leave the user's setting alone
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    objects, leaves, samples = build_tasks(entries, manager)

    if backend == "vllm":
        lm = _vllm_lm(Path(model_dir), dtype, batch_size)
        model = None
    else:
        torch_device = resolve_device(device)
        model, tokenizer = load_model(Path(model_dir), torch_device, dtype)
        lm = _quiet_hflm()(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=torch_device
        )
    out = simple_evaluate(
        model=lm,
        tasks=objects,
        samples=samples or None,
        task_manager=manager,
        bootstrap_iters=0,  # no stderr: it costs seconds per task and is not used
        log_samples=False,
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=fewshot_as_multiturn,
        system_instruction=system_instruction,
        gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
    )
    _quiet()  # lm-eval resets its logger level while it runs
    del lm, model  # the weights go now, not when the step's worker next collects
    reported = {**(out.get("groups") or {}), **out["results"]}
    scores: dict[str, float] = {}
    for name, key in metrics.items():
        values = reported.get(name) or {}
        if key not in values:
            have = sorted(k for k in values if k != "alias" and "_stderr" not in k)
            raise InputError(f"eval.tasks: task '{name}' reported no '{key}' (it has: {have})")
        scores[name] = float(values[key])
    counts = out.get("n-samples", {})
    n_samples = {
        name: sum(int(counts.get(t.task_name, {}).get("effective", 0)) for t in leaves[name])
        for name in metrics
    }
    shots = {
        t.task_name: out["configs"].get(t.task_name, {}).get("num_fewshot")
        for name in metrics
        for t in leaves[name]
    }
    return {
        "scores": scores,
        "avg": sum(scores.values()) / len(scores),
        "n_samples": n_samples,
        "metrics": metrics,
        "num_fewshot": shots,
    }


# settings that change how a model is run, not what it scores
NOT_IN_KEY = ("batch_size", "device")


def evaluation_key(fingerprint: str, settings: Mapping[str, Any]) -> str:
    """Same weights, same benchmark -> same scores. The tasks with their per-task settings and
    every lm-eval option that changes prompts or outputs count; batch size and device do not,
    and neither does `fewshot_as_multiturn` without a chat template (lm-eval ignores it then)."""
    benchmark = {k: v for k, v in settings.items() if k not in NOT_IN_KEY}
    if not benchmark.get("apply_chat_template"):
        benchmark.pop("fewshot_as_multiturn", None)
    for name in ("system_instruction", "gen_kwargs"):
        if not benchmark.get(name):  # unset, None or empty: the same run
            benchmark.pop(name, None)
    if benchmark.get("include_path"):
        # the task files, not where they live, define a local benchmark
        folder = Path(benchmark["include_path"])
        benchmark["include_path"] = stable_hash(
            {p.name: p.read_bytes().hex() for p in sorted(folder.glob("*")) if p.is_file()}
        )
    return f"eval-{fingerprint}-{stable_hash(benchmark)}"


# -- Prefect task ---------------------------------------------------------------------------------


# cached on the weights' fingerprint and the benchmark: a resume, or another run that meets the
# same model, never evaluates it twice
@task(
    name="evaluate",
    cache_key_fn=lambda _ctx, p: evaluation_key(p["fingerprint"], p["settings"]),
    persist_result=True,
    tags=["evaluate"],
)
def evaluate_task(
    model_dir: str, fingerprint: str, settings: dict[str, Any], threads: int = 1
) -> dict[str, Any]:
    """`evaluate_model` with the flow's settings and the step's share of the cores; `ran` says
    where and how long."""
    with running_step("evaluate", threads, resolve_device(settings["device"])) as ran:
        result = evaluate_model(
            Path(model_dir),
            settings["tasks"],
            Path(settings["include_path"]) if settings.get("include_path") else None,
            batch_size=settings["batch_size"],
            device=settings["device"],
            limit=settings.get("limit"),
            num_fewshot=settings.get("num_fewshot"),
            dtype=settings.get("dtype", "float32"),
            backend=settings.get("backend", "hf"),
            apply_chat_template=settings.get("apply_chat_template", False),
            fewshot_as_multiturn=settings.get("fewshot_as_multiturn", False),
            system_instruction=settings.get("system_instruction"),
            gen_kwargs=settings.get("gen_kwargs"),
        )
    return {**result, "ran": ran}
