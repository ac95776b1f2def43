"""A run's inputs: the zoo (when referenced), the base and foundation models, the evaluation
tasks. `check_inputs` runs before Prefect starts (seconds, no weights read); `prepare_inputs`
inside the flow, before any merge."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flows.run.runtime import named
from flows.run.schema import ConfigError, EvalConf, EvolveConf, under
from tasks.core.errors import InputError
from tasks.fetch import ResolvedModel, fetch_task, is_zoo_ref, preflight, resolve
from tasks.lmeval import check_tasks, task_entries
from tasks.outputs.tracking import check_store, sqlite_uri
from tasks.select import check_settings
from tasks.zoo.build import ZOO_REF, expand_zoo, zoo_task

FINITE = "finite.json"  # in the state folder: fingerprints already scanned for NaN/Inf
# the eval configs: the search's fitness, and the optional final benchmark of the best models
EVAL_KEYS = ("eval", "final_eval")


@dataclass(frozen=True)
class Inputs:
    base: ResolvedModel
    foundations: list[ResolvedModel]
    eval_settings: dict[str, Any]
    final_settings: dict[str, Any] | None = None  # final_eval's, when set
    final_top_k: int = 0


def run_paths(cfg: EvolveConf) -> dict[str, Path]:
    return {k: Path(v).resolve() for k, v in asdict(cfg.paths).items()}


def _skills(cfg: EvolveConf) -> list[str]:
    return list(cfg.zoo.get("skills", []))


def _benchmark(cfg: EvolveConf, key: str) -> EvalConf | None:
    """The eval config `key` (eval, final_eval); None when final_eval is off."""
    return getattr(cfg, key)


def _task_names(cfg: EvolveConf, key: str = "eval") -> list[str]:
    """eval.tasks' (or final_eval.tasks') names, as written (an entry is a name or a mapping
    with `task`)."""
    ev = _benchmark(cfg, key)
    return [t["task"] if isinstance(t, Mapping) else t for t in (ev.tasks if ev else [])]


def uses_zoo(cfg: EvolveConf) -> bool:
    tasks = [n for key in EVAL_KEYS for n in _task_names(cfg, key)]
    refs = [cfg.models.base, *cfg.models.foundations, *tasks]
    return any(r.startswith(ZOO_REF) for r in refs)


def check_benchmark(settings: Mapping[str, Any], key: str = "eval") -> None:
    """`check_tasks` for the settings of eval config `key`, its errors keyed by it."""
    try:
        check_tasks(settings["tasks"], settings["include_path"])
    except InputError as exc:
        raise InputError(under(key, exc) if key != "eval" else str(exc)) from None


def foundation_refs(cfg: EvolveConf) -> list[str]:
    return expand_zoo(cfg.models.foundations, _skills(cfg))


def check_inputs(cfg: EvolveConf) -> None:
    """What can be checked without the zoo or any weights, so a wrong input fails in seconds:
    local folders and hub ids resolve, the strategy fits the population, and, for each benchmark
    (eval, final_eval) that names no zoo task, every task resolves with its metric; the MLflow
    store, when tracking, is not damaged."""
    if cfg.tracking.enabled:
        check_store(cfg.tracking.uri or sqlite_uri(run_paths(cfg)["mlflow_db"]))
    models = cfg.models
    for ref in [models.base, *models.foundations]:
        if not is_zoo_ref(ref):
            resolve(
                ref,
                root=Path(cfg.paths.root).resolve(),
                allow_pickle=models.allow_pickle,
                trust_remote_code=models.trust_remote_code,
            )
    strategy = cfg.strategy
    try:
        check_settings(strategy.name, strategy.partner, strategy.k, foundation_refs(cfg))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for key in EVAL_KEYS:
        if _benchmark(cfg, key) and not any(n.startswith(ZOO_REF) for n in _task_names(cfg, key)):
            # zoo tasks resolve once the zoo is built (prepare_inputs); these can be checked now
            check_benchmark(evaluation_settings(cfg, None, key), key)


def prepare_inputs(cfg: EvolveConf, paths: Mapping[str, Path]) -> Inputs:
    """Build the zoo if referenced, resolve and fingerprint every model, check them against the
    base (preflight) and resolve the evaluation tasks of the search and of the final benchmark:
    every input error surfaces here, before any model is evaluated."""
    models = cfg.models
    manifest = None
    if uses_zoo(cfg):
        zoo = named(zoo_task, f"zoo {paths['zoo_dir']}")
        manifest = zoo(str(paths["zoo_dir"]), cfg.zoo, cfg.runtime.progress)
    fetch = {
        "root": paths["root"],
        "zoo_dir": paths["zoo_dir"] if manifest else None,
        "zoo_manifest": manifest,
        "allow_pickle": models.allow_pickle,
        "trust_remote_code": models.trust_remote_code,
    }
    base = named(fetch_task, f"fetch base {models.base}")(models.base, fetch)
    foundations = [named(fetch_task, f"fetch {ref}")(ref, fetch) for ref in foundation_refs(cfg)]
    names = [m.name for m in foundations]
    if len(set(names)) != len(names):
        raise InputError(f"models.foundations: two models share a name: {names}")
    preflight(
        base,
        foundations,
        vocab_mismatch=cfg.kinship.vocab_mismatch,
        finite=models.check_finite,
        # store.verify=full re-reads everything, foundations' scans included
        finite_cache=None if cfg.store.verify == "full" else paths["state_dir"] / FINITE,
    )
    zoo_tasks = paths["zoo_dir"] / manifest["task_dir"] if manifest else None
    settings = evaluation_settings(cfg, zoo_tasks)
    check_benchmark(settings)
    final = evaluation_settings(cfg, zoo_tasks, "final_eval") if cfg.final_eval else None
    if final is not None:
        check_benchmark(final, "final_eval")
    top_k = cfg.final_eval.top_k if cfg.final_eval is not None else 0
    return Inputs(base, foundations, settings, final, top_k)


def evaluation_settings(
    cfg: EvolveConf, zoo_task_dir: Path | None, key: str = "eval"
) -> dict[str, Any]:
    """What the evaluate step receives for eval config `key` (eval, final_eval), and what keys
    its cache (all but batch size, device and the sample log): plain data only. Each task is a
    dict with its own num_fewshot, metric, limit and aggregation (the config's defaults filled
    in). Sample logs go under the state folder, beside Prefect's cached results."""
    ev = _benchmark(cfg, key)
    include = ev.include_path or (str(zoo_task_dir) if zoo_task_dir else None)
    tasks = task_entries(
        expand_zoo(ev.tasks, _skills(cfg), tasks=True),
        num_fewshot=ev.num_fewshot,
        limit=ev.limit,
        metric=ev.metric,
    )
    return {
        "tasks": tasks,
        "include_path": include,
        "batch_size": ev.batch_size,
        "dtype": ev.dtype,
        "device": cfg.device,
        "backend": ev.backend,
        "apply_chat_template": ev.apply_chat_template,
        "fewshot_as_multiturn": ev.fewshot_as_multiturn,
        "system_instruction": ev.system_instruction,
        "gen_kwargs": ev.gen_kwargs or {},
        "log_samples": ev.log_samples,
        "samples_dir": str(run_paths(cfg)["state_dir"] / "eval-samples"),
    }


def readable_by_workers(paths: Mapping[str, Path], inputs: Inputs) -> list[str]:
    """What every worker must read at the same absolute path (created here if new): the store,
    Prefect's results, the sample logs, the base and foundation models and local evaluation
    tasks."""
    shared = [paths["store_dir"], paths["state_dir"] / "prefect-results"]
    shared.append(Path(inputs.eval_settings["samples_dir"]))
    for folder in shared:
        folder.mkdir(parents=True, exist_ok=True)
    models = [inputs.base.path, *(m.path for m in inputs.foundations)]
    benchmarks = [inputs.eval_settings, inputs.final_settings or {}]
    tasks = list(dict.fromkeys(s["include_path"] for s in benchmarks if s.get("include_path")))
    return [*(str(p) for p in shared), *models, *tasks]
