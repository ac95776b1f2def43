"""What a benchmark is: the eval.tasks entries (a task name, or a mapping with its own few-shot
count, metric `name,filter`, limit and aggregation), lm-eval's task registry (zoo and built-in
tasks in one TaskManager) and the metrics each task reports, all resolved from task configs
alone, before any dataset or model is loaded (`resolve_tasks`, `check_tasks`).

Local task YAMLs may name their data files relative to the YAML's folder; lm-eval would resolve
such paths against the cwd, so each such task's index entry holds its config with `data_files`
made absolute (groups of local tasks then load them too).
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.core.errors import InputError

METRIC = "acc"
# lm-eval's default TaskManager indexes ~15k tasks: list only a few names in error messages
MAX_NAMES_IN_ERROR = 40


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
    return _task_manager(folder, not all_local(names, include_path))


def all_local(names: Sequence[str], include_path: str | Path | None) -> bool:
    """Whether the local task folder has every task named (then none needs the hub)."""
    if not include_path:
        return False
    local = _task_manager(str(Path(include_path).resolve()), False)
    return all(name in local.task_index for name in names)


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


def _output_types(name: str, manager: Any, depth: int = 0) -> set[str]:
    """lm-eval output types of task or group `name` (of its leaf tasks), read from configs;
    empty where only running a Python-defined task would tell."""
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(name)
    if entry is None or entry.cfg is None or entry.kind == Kind.PY_TASK or depth > 8:
        return set()
    if entry.kind != Kind.GROUP:
        return {entry.cfg.get("output_type", "generate_until")}
    found: set[str] = set()
    for child in entry.cfg.get("task") or []:
        if isinstance(child, str):
            found |= _output_types(child, manager, depth + 1)
        elif isinstance(child, Mapping):
            known = manager.task_index.get(child.get("task") or child.get("group"))
            base = known.cfg if known is not None and known.cfg is not None else {}
            if known is not None and known.kind == Kind.GROUP:
                found |= _output_types(known.name, manager, depth + 1)
            else:
                found.add({**base, **child}.get("output_type", "generate_until"))
    return found


GENERATION = "generate_until"


def sampled_tasks(
    entries: Sequence[Mapping[str, Any]], manager: Any, log_samples: bool | str
) -> list[str]:
    """The entries whose per-sample outputs are kept: all (True), none (False), or those with a
    generation task ("auto": a wrong answer is only understood by reading it; a multiple-choice
    item's loglikelihoods say little)."""
    if not (isinstance(log_samples, bool) or log_samples == "auto"):
        raise InputError(f"eval.log_samples: auto, true or false, got {log_samples!r}")
    if isinstance(log_samples, bool):
        return [e["task"] for e in entries] if log_samples else []
    return [e["task"] for e in entries if GENERATION in _output_types(e["task"], manager)]


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
