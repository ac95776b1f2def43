"""What a benchmark is: the eval.tasks entries (a task name, or a mapping with its own few-shot
count, metric `name,filter`, limit, aggregation and the leaderboard's `choices`), lm-eval's task
registry (zoo and built-in tasks in one TaskManager) and the metrics each task reports, all
resolved from task configs alone, before any dataset or model is loaded (`resolve_tasks`,
`check_tasks`).

The one place that knows lm-eval's task machinery: a TaskManager over an include path, the
configs it indexed (`include:`s merged by lm-eval itself), and a task config handed to it as a
dict where a metric's aggregation is replaced. Local task YAMLs may name their data files
relative to their folder (lm-eval would resolve them against the cwd): lm-eval indexes a mirror
of the folder whose YAMLs include the originals and override `data_files` (see `_overlay`).
Also here, what makes an evaluation cost the model's forward passes plus scoring: prompt templates
compiled once per process (`install_template_cache`), each task's requests built once per process
and reused by every later evaluation of the same task content (`RequestCache`, `REQUESTS`), and
lm-eval's environment report gathered once (`install_env_info_cache`).
The little private access left is here, pinned by tests/test_lmeval.py with the version.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tasks.core.errors import InputError
from tasks.scoring.leaderboard import check_choices

METRIC = "acc"
# lm-eval's default TaskManager indexes ~15k tasks: list only a few names in error messages
MAX_NAMES_IN_ERROR = 40


# -- eval.tasks entries ---------------------------------------------------------------------------

# what an eval.tasks mapping may set; a plain name takes eval's defaults for the rest
TASK_KEYS = ("task", "num_fewshot", "metric", "limit", "aggregation", "choices")


def task_entries(
    tasks: Sequence[Any],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    metric: str = METRIC,
) -> list[dict[str, Any]]:
    """Every eval.tasks entry as a plain dict with all of TASK_KEYS but `choices`: a name, or a
    mapping with its own `num_fewshot`, `metric` (`name` or `name,filter`, or a list of them,
    scored by their mean), `limit`, `aggregation` (e.g. `mean` instead of the task's own
    aggregation function) and `choices` (the leaderboard's rescaling, tasks/scoring/leaderboard.py:
    kept only where set, so an entry without it, and its evaluation cache key, stay as they
    were); what an entry leaves out comes from the eval-wide defaults given here."""
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
        entry = {
            "task": raw["task"],
            "num_fewshot": shots,
            "metric": _metric(f"{key}.metric", raw.get("metric") or metric),
            "limit": cap,
            "aggregation": raw.get("aggregation"),
        }
        choices = check_choices(f"{key}.choices", raw.get("choices"))
        if choices is not None:
            entry["choices"] = choices
        out.append(entry)
    names = [e["task"] for e in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"eval.tasks: task '{twice[0]}' is listed twice")
    return out


def _metric(key: str, value: Any) -> str | list[str]:
    """An entry's metric: `name` or `name,filter`, or a non-empty list of them (their mean)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise InputError(f"{key}: a metric name (or `name,filter`), or a list of them, got {value!r}")


# -- lm-eval's task registry -----------------------------------------------------------------------

# The version the private access below (`_import_func_in_yml`, the index's Entry fields, the form
# of an unresolved `!function`, `utils.apply_template` replaced on its module) was checked
# against; tests/test_lmeval.py pins that behaviour and fails on any other version.
LM_EVAL_VERSION = "0.4.13"

TASK, PY_TASK, GROUP, TAG = "task", "py_task", "group", "tag"


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None, include_defaults: bool = True) -> Any:
    """One TaskManager per include path: indexing the default tasks takes 12-28 s."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager(include_defaults=True)
    return TaskManager(include_path=_overlay(include_path), include_defaults=include_defaults)


@functools.lru_cache(maxsize=8)
def _overlay(folder: str) -> str:
    """A folder that mirrors `folder`'s task YAMLs, each as `include: <the original>`, plus its
    `dataset_kwargs` with `data_files` made absolute where the original names them relative to
    its folder (lm-eval resolves them against the cwd). lm-eval resolves the include itself, with
    the original's own includes and `!function`s, and its local keys win; indexing this folder
    instead of `folder` gives every task, group and group member its absolute data files."""
    from lm_eval.tasks import TaskManager

    plain = TaskManager(include_path=folder, include_defaults=False)
    data_kwargs = {}
    for entry in plain.task_index.values():
        kwargs = (entry.cfg or {}).get("dataset_kwargs") or {}
        if entry.yaml_path is not None and "data_files" in kwargs:
            yaml_dir = Path(entry.yaml_path).resolve().parent
            absolute = _absolute_data_files(kwargs["data_files"], yaml_dir)
            data_kwargs[Path(entry.yaml_path)] = {**kwargs, "data_files": absolute}
    out = Path(tempfile.mkdtemp(prefix="lmeval-tasks-"))
    atexit.register(shutil.rmtree, out, True)
    for path in Path(folder).glob("**/*.yaml"):
        overlay: dict[str, Any] = {"include": str(path.resolve())}
        if path in data_kwargs:
            overlay["dataset_kwargs"] = data_kwargs[path]
        target = out / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(overlay, sort_keys=False))
    return str(out)


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


@functools.lru_cache(maxsize=8)
def _kinds(manager: Any) -> dict[str, str]:
    """What each name of `manager` is, from its public listings (a task with a `class` is
    Python-defined, as lm-eval decides)."""
    kinds = {name: TAG for name in manager.all_tags}
    kinds.update({name: GROUP for name in manager.all_groups})
    for name in manager.all_subtasks:
        cfg = manager.task_index[name].cfg or {}
        kinds[name] = PY_TASK if "class" in cfg else TASK
    return kinds


def _kind(name: str, manager: Any) -> str | None:
    return _kinds(manager).get(name)


def _config(name: str, manager: Any) -> Mapping[str, Any] | None:
    """The config lm-eval indexed for `name`, `include:`s merged by lm-eval and every
    `!function` left unresolved (see `_is_function`); None for a tag or Python-only task."""
    entry = manager.task_index.get(name)
    return None if entry is None else entry.cfg


def _entry(name: str, manager: Any) -> str:
    """What `name` is in lm-eval's registry, or InputError naming close matches."""
    kind = _kind(name, manager)
    if kind is None:
        available = sorted(manager.all_tasks)
        close = difflib.get_close_matches(name, available, n=5)
        shown = available if len(available) <= MAX_NAMES_IN_ERROR else close
        what = "available tasks" if shown is available else f"{len(available)} tasks; close"
        raise InputError(f"unknown lm-eval task '{name}' ({what}: {', '.join(shown) or 'none'})")
    return kind


# a `!function module.fn` as lm-eval's index keeps it unresolved: `<YAML's folder>/module.fn`
_FUNCTION = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
# config keys that hold data, never a function (an absolute dataset path may look like one)
DATA_KEYS = frozenset(
    ("task", "group", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "metadata")
)


def _is_function(value: Any) -> bool:
    return (
        isinstance(value, str)
        and os.path.isabs(value)
        and _FUNCTION.fullmatch(os.path.basename(value)) is not None
    )


def _import_functions(obj: Any) -> Any:
    """`obj` (a task config or part of it) with each unresolved `!function` imported as lm-eval
    itself resolves it (a module beside the YAML, else an importable one)."""
    from lm_eval.tasks._yaml_loader import _import_func_in_yml

    if _is_function(obj):
        return _import_func_in_yml(os.path.basename(obj), Path(os.path.dirname(obj)))
    if isinstance(obj, Mapping):
        return {k: _import_functions(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_import_functions(v) for v in obj]
    return obj


def _inline_config(cfg: Mapping[str, Any], aggregation: str | None) -> dict[str, Any]:
    """A task's config as a dict for lm-eval (which takes a dict as the whole config), with,
    given `aggregation`, every metric aggregated by it; its `!function`s are imported here
    (ImportError when a module is missing)."""
    if aggregation is not None:
        metrics = cfg.get("metric_list") or []
        cfg = {**cfg, "metric_list": [{**m, "aggregation": aggregation} for m in metrics]}
    out = {k: copy.deepcopy(v) if k in DATA_KEYS else _import_functions(v) for k, v in cfg.items()}
    out.pop("tag", None)  # an inline task must not re-register its tags
    return out


def task_spec(name: str, manager: Any, aggregation: str | None = None) -> str | dict[str, Any]:
    """The spec to hand lm-eval for `name`: the name, or, to aggregate every metric of a task
    by `aggregation`, its config dict."""
    if _entry(name, manager) != TASK or aggregation is None:
        return name
    return _inline_config(_config(name, manager) or {}, aggregation)


def _load_error(name: str, manager: Any, aggregation: str | None) -> str | None:
    """Why the task, or a task of the group, cannot be loaded: a `!function` of its config does
    not import (e.g. tinyBenchmarks' aggregations, IFEval's and MATH's scoring need their
    packages); None when all import. `aggregation` only applies to a task, not a group or tag."""
    kind = _entry(name, manager)
    if kind != TASK and aggregation is not None:
        raise InputError(f"eval.tasks: 'aggregation' applies to a task; '{name}' is not one")
    leaves = [name] if kind == TASK else subtasks(name, manager) if kind == GROUP else []
    for leaf in leaves:
        if _kind(leaf, manager) != TASK:
            continue
        try:
            _inline_config(_config(leaf, manager) or {}, aggregation)
        except ImportError as exc:
            its = "" if leaf == name else f" (its task '{leaf}')"
            return f"task '{name}' cannot be loaded{its}: {exc}{_install_hint(exc)}"
    return None


def _install_hint(exc: ImportError) -> str:
    """`; pip install "lm_eval[EXTRA]"` where an extra of lm-eval's own package metadata
    requires the missing module (IFEval's langdetect: `ifeval`), else nothing."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    missing = (getattr(exc, "name", None) or "").split(".")[0].replace("_", "-").lower()
    if not missing:  # a module's own message (MATH's names its packages and extra)
        return ""
    for line in requires("lm_eval") or []:
        req = Requirement(line)
        extra = re.search(r'extra == "([^"]+)"', str(req.marker or ""))
        if extra and req.name.replace("_", "-").lower() == missing:
            return f'; pip install "lm_eval[{extra.group(1)}]"'
    return ""


def subtasks(name: str, manager: Any, depth: int = 0) -> list[str]:
    """The tasks of group `name`, through its subgroups, read from its config (an inline task
    mapping counts by its `task` name)."""
    found: list[str] = []
    for child in (_config(name, manager) or {}).get("task") or [] if depth < 8 else []:
        child_name = child if isinstance(child, str) else child.get("task") or child.get("group")
        if _kind(child_name, manager) == GROUP:
            found += subtasks(child_name, manager, depth + 1)
        else:
            found.append(child_name)
    return found


def _check_subtask_choices(name: str, choices: Any, manager: Any) -> None:
    """A `choices` mapping (subtask -> k) names exactly the tasks of group `name`."""
    if not isinstance(choices, Mapping):
        return
    have = subtasks(name, manager) if _kind(name, manager) == GROUP else []
    if not have:
        raise InputError(f"eval.tasks: 'choices' per subtask needs a group; '{name}' is not one")
    missing, extra = sorted(set(have) - set(choices)), sorted(set(choices) - set(have))
    if missing or extra:
        wrong = f"no '{missing[0]}'" if missing else f"'{extra[0]}' is not one of them"
        raise InputError(
            f"eval.tasks: '{name}'.choices must give each of its {len(have)} tasks: {wrong}"
        )


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
    # lm-eval reports a metric function by its name
    names = [
        m.rsplit(".", 1)[-1] if _is_function(m) else getattr(m, "__name__", None) or str(m)
        for m in metrics
    ]
    return [f"{m},{f}" for f in _filters(cfg) for m in names]


def _leaf_filters(cfg: Mapping[str, Any], manager: Any, depth: int = 0) -> set[str]:
    """Filters of a group's leaf tasks (what lm-eval aggregates when a group names none)."""
    found: set[str] = set()
    children = cfg.get("task")
    for child in children if isinstance(children, list) and depth < 8 else []:
        name = child if isinstance(child, str) else child.get("task") or child.get("group")
        known = _config(name, manager)
        if known is None:
            found.add("none")
        elif _kind(name, manager) == GROUP:
            found |= _leaf_filters(known, manager, depth + 1)
        else:
            found.update(_filters({**known, **(child if isinstance(child, dict) else {})}))
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
    kind, cfg = _entry(name, manager), _config(name, manager)
    if kind == TAG:
        members = sorted(manager.task_index[name].tags)
        raise InputError(
            f"eval.tasks: '{name}' is a tag of {len(members)} tasks, not one score; name a "
            f"group or its tasks: {', '.join(members[:12])}"
        )
    if kind == PY_TASK or cfg is None:
        return None
    if kind == GROUP:
        return _group_metrics(name, cfg, manager)
    return _task_metrics(cfg)


def _output_types(name: str, manager: Any, depth: int = 0) -> set[str]:
    """lm-eval output types of task or group `name` (of its leaf tasks), read from configs;
    empty where only running a Python-defined task would tell."""
    kind, cfg = _kind(name, manager), _config(name, manager)
    if cfg is None or kind in (None, PY_TASK) or depth > 8:
        return set()
    if kind != GROUP:
        return {cfg.get("output_type", "generate_until")}
    found: set[str] = set()
    for child in cfg.get("task") or []:
        if isinstance(child, str):
            found |= _output_types(child, manager, depth + 1)
        elif isinstance(child, Mapping):
            child_name = child.get("task") or child.get("group")
            if _kind(child_name, manager) == GROUP:
                found |= _output_types(child_name, manager, depth + 1)
            else:
                base = _config(child_name, manager) or {}
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
) -> tuple[Any, dict[str, str | list[str]]]:
    """The TaskManager for `entries` and the `metric,filter` key(s) scored for each task, read from
    the task configs alone: an unknown task, a metric the task does not report or a group without
    an aggregate raises InputError before any dataset or model is loaded."""
    manager = task_manager([e["task"] for e in entries], include_path)
    metrics, unloadable = {}, []
    for e in entries:
        try:
            reported = reported_metrics(e["task"], manager)
        except InputError as exc:
            msg = str(exc)
            raise InputError(
                msg if msg.startswith("eval.tasks") else f"eval.tasks: {msg}"
            ) from None
        wanted = e["metric"]
        metrics[e["task"]] = (
            [pick_metric(e["task"], w, reported) for w in wanted]
            if isinstance(wanted, list)
            else pick_metric(e["task"], wanted, reported)
        )
        _check_subtask_choices(e["task"], e.get("choices"), manager)
        unloadable.append(_load_error(e["task"], manager, e["aggregation"]))
    missing = [msg for msg in unloadable if msg]
    if missing:  # every missing package at once, not one per try
        raise InputError("eval.tasks: " + "; ".join(missing))
    return manager, metrics


def check_tasks(tasks: Sequence[Any], include_path: str | Path | None) -> None:
    """Raise InputError naming any task lm-eval would not find, or a metric it would not
    report, before any model is touched."""
    if not tasks:
        raise InputError("eval.tasks: no evaluation task given")
    resolve_tasks(task_entries(tasks), include_path)


# -- prompt templates ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _compiled(template: str) -> Any:
    from lm_eval import utils

    return utils.env.from_string(template)


def render_template(template: str, doc: dict) -> str:
    """lm-eval's `utils.apply_template`, with each template text compiled once per process
    (a compiled jinja2 template renders safely from several threads)."""
    return _compiled(template).render(**doc)


@functools.cache
def install_template_cache() -> Callable[[str, dict], str]:
    """lm-eval renders every prompt through `utils.apply_template`, which compiles its template
    anew each time: the same few templates thousands of times per evaluation (measured: 2.6 s of
    a 6.1 s profiled zoo evaluation). Its tasks look the function up on the module at each call,
    so replacing it there, once per process, makes them all use `render_template`. Returns
    lm-eval's own function (the same on every call)."""
    from lm_eval import utils

    own = utils.apply_template
    utils.apply_template = render_template
    return own


# -- requests, built once per benchmark per process ------------------------------------------------

# leaf tasks whose requests are kept (a leaderboard suite has about 40; the zoo 3 to 6)
MAX_CACHED_TASKS = 256
# what a task's build_all_requests is called with that is not content: the LM's bound method
# (its chat template is keyed by `chat_key`) and the tokenizer's name (lm-eval's file cache key)
NOT_CONTENT = ("chat_template", "tokenizer_name")


class RequestCache:
    """The requests (lm-eval Instances) of each task, built once per process and handed to every
    later evaluation of the same task content as fresh copies.

    lm-eval rebuilds all requests of a task for every model (few-shot contexts, choices,
    targets), though they do not depend on the model; its own `cache_requests` keys them on the
    task's name and shot count only, so it would hand a zoo of another seed the requests of the
    first. Here the key is the content (`request_key`): the task's class and resolved config,
    the documents it evaluates and samples its shots from, the few-shot generator's state and
    every argument of the build. What is kept is a copy made before any model ran, and each
    evaluation gets its own copies with empty `resps`/`filtered_resps` (lm-eval writes the
    model's responses into the instances), so evaluations one after another or in threads at
    once never see each other's responses."""

    def __init__(self, max_tasks: int = MAX_CACHED_TASKS) -> None:
        self.enabled = True
        self.max_tasks = max_tasks
        self._built: OrderedDict[str, list[Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._built)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._built)

    def clear(self) -> None:
        with self._lock:
            self._built.clear()
            self.hits = self.misses = 0

    def templates(self, key: str) -> list[Any] | None:
        """The kept instances of `key` (never handed to lm-eval), or None."""
        with self._lock:
            return self._built.get(key)

    def attach(self, tasks: Iterable[Any], lm: Any, apply_chat_template: bool | str) -> None:
        """Make each of `tasks` (lm-eval leaf Task objects of one evaluation) take its requests
        from this cache: lm-eval's evaluator builds them by calling the task's
        `build_all_requests(**kwargs)`, looked up on the object, then reads `task.instances`."""
        if not self.enabled:
            return
        chat = chat_key(lm, apply_chat_template)
        for task in tasks:
            own = task.build_all_requests
            task.build_all_requests = functools.partial(self._build, task, own, chat)

    def _build(self, task: Any, own: Callable[..., None], chat: str, **kwargs: Any) -> None:
        key = request_key(task, chat, kwargs)
        with self._lock:
            kept = self._built.get(key)
            if kept is not None:
                self._built.move_to_end(key)
                self.hits += 1
        if kept is None:
            own(**kwargs)  # lm-eval builds them; this evaluation uses those very instances
            kept = [fresh_instance(i) for i in task._instances]  # before any model ran
            with self._lock:
                self.misses += 1
                self._built[key] = kept
                while len(self._built) > self.max_tasks:
                    self._built.popitem(last=False)
            return
        task._instances = [fresh_instance(i) for i in kept]


REQUESTS = RequestCache()


def fresh_instance(instance: Any) -> Any:
    """A copy of an lm-eval Instance without responses; a mutable argument is copied (a
    generation request holds its generation kwargs dict), the document is shared (read only)."""
    new = copy.copy(instance)
    new.resps, new.filtered_resps = [], {}
    args = instance.arguments
    if isinstance(args, tuple) and any(isinstance(a, dict | list | set) for a in args):
        new.arguments = copy.deepcopy(args)
    return new


def _canonical(value: Any) -> Any:
    """JSON for what a task config or document holds beyond JSON: a function as its module,
    name and the bytes of its source file (a change anywhere in its module counts), else its
    repr (an object whose repr holds its address then never matches: rebuilt, never wrong)."""
    if callable(value):
        name = f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
        try:
            source = Path(inspect.getsourcefile(value) or "").read_bytes()
        except (TypeError, OSError):
            return name
        return f"{name}:{hashlib.sha256(source).hexdigest()}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return repr(value)


def _digest(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, default=_canonical, ensure_ascii=False).encode()


def _docs_digest(task: Any) -> str:
    """A hash of the documents the task evaluates and those its few-shot examples come from:
    a config's sampler holds its own (`sampler.df`); a Python task samples from its training,
    else validation, else test documents (the test documents are its evaluated ones)."""
    h = hashlib.sha256()
    sources = [task.eval_docs]
    sampler = getattr(task, "sampler", None)
    if sampler is not None:
        sources.append(sampler.df or [])
        h.update(_digest(sampler.fewshot_indices))
    else:
        for has, docs in (
            (task.has_training_docs, task.training_docs),
            (task.has_validation_docs, task.validation_docs),
        ):
            if has():
                sources.append(docs())
    for docs in sources:
        h.update(b"\x00docs")
        _hash_docs(h, docs)
    return h.hexdigest()


def _hash_docs(h: Any, docs: Iterable[Any]) -> None:
    """Documents into `h`: a `datasets.Dataset` by its Arrow data (the rows it selects, read
    as they are stored: no conversion to Python), anything else document by document."""
    import datasets

    if not isinstance(docs, datasets.Dataset):
        for doc in docs:
            h.update(_digest(doc))
        return
    # its rows: the table itself, or through its index mapping (a select or shuffle made one)
    table = docs.data.table if docs._indices is None else docs.with_format("arrow")[:]
    h.update(str(docs.features).encode())
    for column in table.columns:
        for chunk in column.chunks:
            # a slice shares its parent's buffers: offset and length say which part it is
            h.update(f"{chunk.type}:{chunk.offset}:{len(chunk)}".encode())
            for buffer in chunk.buffers():
                if buffer is not None:
                    h.update(memoryview(buffer))


def _rnd_state(rnd: Any) -> Any:
    return rnd.getstate() if rnd is not None and hasattr(rnd, "getstate") else None


def request_key(task: Any, chat: str, build_kwargs: Mapping[str, Any]) -> str:
    """What a task's requests are built from, as a hash: its class (with its module's source),
    its resolved config as the evaluation left it (shots, generation kwargs), its documents,
    the few-shot generators' state (the fewshot seed), the build's arguments (limit, document
    indices, rank, system instruction, chat template and multi-turn flags) and, with a chat
    template, the template and the tokenizer's special tokens it renders with (`chat_key`).
    Without a chat template requests are plain strings: the tokenizer does not count."""
    build = {k: v for k, v in build_kwargs.items() if k not in NOT_CONTENT}
    parts = {
        "class": _canonical(type(task)),
        "config": task.config.to_dict(keep_callable=True),
        "docs": _docs_digest(task),
        "fewshot_rnd": _rnd_state(getattr(task, "fewshot_rnd", None)),
        "sampler_rnd": _rnd_state(getattr(getattr(task, "sampler", None), "rnd", None)),
        "build": build,
        "chat": chat if build_kwargs.get("apply_chat_template") else None,
    }
    return f"{task.task_name}-{hashlib.sha256(_digest(parts)).hexdigest()[:32]}"


def chat_key(lm: Any, apply_chat_template: bool | str) -> str:
    """What a chat template makes of the requests, beyond the template flag: the LM's class,
    the template text it picks, the tokenizer's special tokens (the template renders them)
    and the extra template arguments the LM passes."""
    if not apply_chat_template:
        return ""
    tokenizer = getattr(lm, "tokenizer", None)
    parts = {
        "lm": _canonical(type(lm)),
        "template": lm.chat_template(apply_chat_template),
        "special_tokens": getattr(tokenizer, "special_tokens_map", None),
        "args": getattr(lm, "chat_template_args", None),
    }
    return hashlib.sha256(_digest(parts)).hexdigest()


# -- environment information, gathered once per process -------------------------------------------


@functools.cache
def _env_info() -> dict[str, Any]:
    from lm_eval.loggers.utils import add_env_info

    info: dict[str, Any] = {}
    add_env_info(info)
    return info


def _add_env_info_once(storage: dict[str, Any]) -> None:
    storage.update(copy.deepcopy(_env_info()))


@functools.cache
def install_env_info_cache() -> Callable[[dict[str, Any]], None]:
    """`simple_evaluate` adds the environment to every result (`add_env_info`: torch's
    collect_env runs `pip list` and more in subprocesses; measured 2.3 s of a 3.6 s warm zoo
    evaluation). It is the same for every evaluation of a process: gathered once here, by
    replacing the name in lm-eval's evaluator module, once per process. Returns lm-eval's own."""
    from lm_eval import evaluator

    own = evaluator.add_env_info
    evaluator.add_env_info = _add_env_info_once
    return own
