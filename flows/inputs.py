"""A run's inputs: the zoo (when referenced), the base and foundation models, the evaluation
tasks. `check_inputs` runs before Prefect starts (seconds, no weights read); `prepare_inputs`
inside the flow, before any merge."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.schema import ConfigError
from tasks.benchmark import check_tasks, task_entries
from tasks.errors import InputError
from tasks.fetch import ResolvedModel, fetch_task, is_zoo_ref, preflight, resolve
from tasks.select import check_settings
from tasks.store import to_plain
from tasks.zoo import ZOO_REF, expand_zoo, zoo_task


@dataclass(frozen=True)
class Inputs:
    base: ResolvedModel
    foundations: list[ResolvedModel]
    eval_settings: dict[str, Any]


def run_paths(cfg: Mapping[str, Any]) -> dict[str, Path]:
    return {k: Path(v).resolve() for k, v in cfg["paths"].items()}


def _skills(cfg: Mapping[str, Any]) -> list[str]:
    return list(cfg["zoo"].get("skills", []))


def _task_names(cfg: Mapping[str, Any]) -> list[str]:
    """eval.tasks' names, as written (an entry is a name or a mapping with `task`)."""
    return [t["task"] if isinstance(t, Mapping) else t for t in cfg["eval"]["tasks"]]


def uses_zoo(cfg: Mapping[str, Any]) -> bool:
    refs = [cfg["models"]["base"], *cfg["models"]["foundations"], *_task_names(cfg)]
    return any(r.startswith(ZOO_REF) for r in refs)


def foundation_refs(cfg: Mapping[str, Any]) -> list[str]:
    return expand_zoo(cfg["models"]["foundations"], _skills(cfg))


def check_inputs(cfg: Mapping[str, Any]) -> None:
    """What can be checked without the zoo or any weights, so a wrong input fails in seconds:
    local folders and hub ids resolve, the strategy fits the population, and, when no zoo task
    is named, every evaluation task resolves with its metric."""
    models = cfg["models"]
    for ref in [models["base"], *models["foundations"]]:
        if not is_zoo_ref(ref):
            resolve(
                ref,
                root=Path(cfg["paths"]["root"]).resolve(),
                allow_pickle=models["allow_pickle"],
                trust_remote_code=models["trust_remote_code"],
            )
    strategy = cfg["strategy"]
    try:
        check_settings(strategy["name"], strategy["partner"], strategy["k"], foundation_refs(cfg))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not any(name.startswith(ZOO_REF) for name in _task_names(cfg)):
        # zoo tasks resolve once the zoo is built (prepare_inputs); these can be checked now
        settings = evaluation_settings(cfg, None)
        check_tasks(settings["tasks"], settings["include_path"])


def prepare_inputs(cfg: Mapping[str, Any], paths: Mapping[str, Path]) -> Inputs:
    """Build the zoo if referenced, resolve and fingerprint every model, check them against the
    base (preflight) and resolve the evaluation tasks: every input error surfaces here."""
    models = cfg["models"]
    manifest = None
    if uses_zoo(cfg):
        manifest = zoo_task(str(paths["zoo_dir"]), cfg["zoo"], cfg["runtime"]["progress"])
    fetch = {
        "root": paths["root"],
        "zoo_dir": paths["zoo_dir"] if manifest else None,
        "zoo_manifest": manifest,
        "allow_pickle": models["allow_pickle"],
        "trust_remote_code": models["trust_remote_code"],
    }
    base = fetch_task(models["base"], fetch)
    foundations = [fetch_task(ref, fetch) for ref in foundation_refs(cfg)]
    names = [m.name for m in foundations]
    if len(set(names)) != len(names):
        raise InputError(f"models.foundations: two models share a name: {names}")
    preflight(
        base,
        foundations,
        vocab_mismatch=cfg["kinship"]["vocab_mismatch"],
        finite=models["check_finite"],
    )
    zoo_tasks = paths["zoo_dir"] / manifest["task_dir"] if manifest else None
    settings = evaluation_settings(cfg, zoo_tasks)
    check_tasks(settings["tasks"], settings["include_path"])
    return Inputs(base, foundations, settings)


def evaluation_settings(cfg: Mapping[str, Any], zoo_task_dir: Path | None) -> dict[str, Any]:
    """What the evaluate step receives, and what keys its cache: plain data only. Each task is a
    dict with its own num_fewshot, metric, limit and aggregation (eval's defaults filled in)."""
    ev = cfg["eval"]
    include = ev["include_path"] or (str(zoo_task_dir) if zoo_task_dir else None)
    tasks = task_entries(
        expand_zoo(to_plain(ev["tasks"]), _skills(cfg), tasks=True),
        num_fewshot=ev["num_fewshot"],
        limit=ev["limit"],
        metric=ev["metric"],
    )
    return {
        "tasks": tasks,
        "include_path": include,
        "batch_size": ev["batch_size"],
        "dtype": ev["dtype"],
        "device": cfg["device"],
        "backend": ev["backend"],
        "apply_chat_template": ev["apply_chat_template"],
        "fewshot_as_multiturn": ev["fewshot_as_multiturn"],
        "system_instruction": ev["system_instruction"],
        "gen_kwargs": to_plain(ev["gen_kwargs"]) or {},
    }


def readable_by_workers(paths: Mapping[str, Path], inputs: Inputs) -> list[str]:
    """What every worker must read at the same absolute path (created here if new): the store,
    Prefect's results, the base and foundation models and local evaluation tasks."""
    for folder in (paths["store_dir"], paths["state_dir"] / "prefect-results"):
        folder.mkdir(parents=True, exist_ok=True)
    models = [inputs.base.path, *(m.path for m in inputs.foundations)]
    tasks = [inputs.eval_settings["include_path"]] if inputs.eval_settings["include_path"] else []
    return [str(paths["store_dir"]), str(paths["state_dir"] / "prefect-results"), *models, *tasks]
