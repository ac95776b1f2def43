"""The evolution flow: which task runs when.

Algorithm 1 itself lives in tasks/select.py; this module only submits the Prefect tasks it asks
for (zoo, fetch, merge, evaluate, kinship), logs what comes back to MLflow and writes the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.futures import wait

from flows.runtime import record_server_pids
from tasks.evaluate import check_tasks, evaluate_task
from tasks.fetch import expand_references, fetch_task, is_zoo_ref, preflight
from tasks.kinship import kinship_matrix_task
from tasks.merge import merge_identity, merge_task
from tasks.plots import render_run
from tasks.report import format_table, results_rows, write_matrix_csv, write_outputs
from tasks.select import Evolution, GenerationRecord, MergePlan, StopRules, run_evolution
from tasks.store import remove_partials, stable_hash
from tasks.track import Tracker, sqlite_uri
from tasks.zoo import zoo_task


@dataclass
class Population:
    """What the flow knows about each model beyond Algorithm 1's averages."""

    paths: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    parent_kinship: dict[str, dict[str, float]] = field(default_factory=dict)
    matrices: dict[int, dict[str, Any]] = field(default_factory=dict)
    counts: dict[str, int] = field(
        default_factory=lambda: {"merges": 0, "merges_reused": 0, "evals": 0, "evals_cached": 0}
    )


def _eval_settings(cfg: dict[str, Any], task_dir: Path | None) -> dict[str, Any]:
    ev = cfg["eval"]
    include = ev["include_path"] or (str(task_dir) if task_dir else None)
    return {
        "tasks": list(ev["tasks"]),
        "include_path": include,
        "batch_size": ev["batch_size"],
        "limit": ev["limit"],
        "num_fewshot": ev["num_fewshot"],
        "dtype": ev["dtype"],
        "device": cfg["device"],
    }


@flow(name="evolve", log_prints=False, persist_result=False)
def evolve_flow(cfg: dict[str, Any]) -> dict[str, Any]:
    """Evolve the configured foundation models by Top-k Greedy Merging (with kinship)."""
    log = get_run_logger()
    started = time.time()
    paths = {k: Path(v).resolve() for k, v in cfg["paths"].items()}
    record_server_pids(paths["prefect_home"])
    models_cfg, kin_cfg, merge_cfg = cfg["models"], cfg["kinship"], cfg["merge"]

    # -- inputs: the zoo (when referenced), the base and the foundation models --------------------
    refs = [models_cfg["base"], *models_cfg["foundations"]]
    manifest = None
    if any(is_zoo_ref(r) for r in refs) or any(t.startswith("zoo:") for t in cfg["eval"]["tasks"]):
        manifest = zoo_task(str(paths["zoo_dir"]), cfg["zoo"])
    foundations = expand_references(
        list(models_cfg["foundations"]), list((manifest or {}).get("foundations", {}))
    )
    fetch_kwargs = {
        "root": paths["root"],
        "zoo_dir": paths["zoo_dir"] if manifest else None,
        "zoo_manifest": manifest,
        "allow_pickle": models_cfg["allow_pickle"],
        "trust_remote_code": models_cfg["trust_remote_code"],
    }
    base = fetch_task(models_cfg["base"], **fetch_kwargs)
    resolved = [fetch_task(ref, **fetch_kwargs) for ref in foundations]
    names = [m.name for m in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"models.foundations: two models share a name: {names}")

    preflight(
        base,
        resolved,
        vocab_mismatch=kin_cfg["vocab_mismatch"],
        finite=models_cfg["check_finite"],
    )
    eval_settings = _eval_settings(
        cfg, paths["zoo_dir"] / manifest["task_dir"] if manifest else None
    )
    if eval_settings["tasks"] == ["zoo:*"]:
        eval_settings["tasks"] = list(manifest["tasks"])
    check_tasks(eval_settings["tasks"], eval_settings["include_path"])
    pop = Population()
    for m in resolved:
        pop.paths[m.name], pop.fingerprints[m.name] = m.path, m.fingerprint

    removed = remove_partials(paths["store_dir"])
    if removed:
        log.warning("removed %d partial store entries left by an interrupted run", len(removed))

    # -- tracking ---------------------------------------------------------------------------------
    config_fingerprint = stable_hash(
        {k: v for k, v in cfg.items() if k not in ("paths", "runtime", "tracking")}
    )
    tracker = Tracker(
        cfg["tracking"]["uri"] or sqlite_uri(paths["mlflow_db"]),
        cfg["tracking"]["experiment"],
        cfg["run_name"],
        config_fingerprint,
        enabled=cfg["tracking"]["enabled"],
        artifact_dir=paths["mlflow_artifacts"],
    )
    tracker.start(
        params={
            "strategy": cfg["strategy"]["name"],
            "k": cfg["strategy"]["k"],
            "partner": cfg["strategy"]["partner"],
            "merge_method": merge_cfg["method"],
            "kinship_metric": kin_cfg["metric"],
            "base": models_cfg["base"],
            "foundations": names,
            "eval_tasks": eval_settings["tasks"],
            "stop": cfg["strategy"]["stop"],
            "seed": cfg["seed"],
        },
        tags={"strategy": cfg["strategy"]["name"], "base_fingerprint": base.fingerprint},
    )
    if tracker.resumed:
        print(
            f"resuming MLflow run {tracker.parent_id} "
            f"({tracker.child_count()} model runs already logged)"
        )

    # -- evaluation and kinship -------------------------------------------------------------------
    def evaluate(model_names: list[str]) -> dict[str, float]:
        futures = {
            n: evaluate_task.submit(pop.paths[n], pop.fingerprints[n], eval_settings)
            for n in model_names
        }
        wait(list(futures.values()))
        averages = {}
        for n, fut in futures.items():
            result = fut.result()
            pop.scores[n] = result["scores"]
            averages[n] = result["avg"]
            pop.counts["evals"] += 1
            pop.counts["evals_cached"] += fut.state.name == "Cached"
        return averages

    def population_matrix() -> dict[str, Any]:
        """Kinship of every pair of the current population, one pass over the models."""
        names_now = [n for n in evolution.members if n in pop.fingerprints]
        key = len(names_now)
        if key not in pop.matrices:
            matrix = kinship_matrix_task(
                [pop.paths[n] for n in names_now],
                [pop.fingerprints[n] for n in names_now],
                base.path,
                base.fingerprint,
                kin_cfg,
                cfg["device"],
            )
            pop.matrices[key] = {
                "names": names_now,
                "index": {n: i for i, n in enumerate(names_now)},
                **matrix,
            }
        return pop.matrices[key]

    def kinship(a: str, b: str, metric: str | None = None) -> float:
        m = population_matrix()
        return m[metric or kin_cfg["metric"]][m["index"][a]][m["index"][b]]

    def mean_kinship(top: list[str]) -> float | None:
        pairs = [(a, b) for i, a in enumerate(top) for b in top[i + 1 :]]
        return sum(kinship(a, b) for a, b in pairs) / len(pairs) if pairs else None

    # -- merging ----------------------------------------------------------------------------------
    def realize(plans: list[MergePlan]) -> dict[str, float]:
        """Merge every plan of a generation together, then evaluate the children together."""
        futures = {}
        for plan in plans:
            pop.parent_kinship[plan.name] = {
                metric: kinship(*plan.parents, metric=metric) for metric in kin_cfg["metrics"]
            }
            params = {
                "parameters": merge_cfg["parameters"],
                "model_parameters": merge_cfg["model_parameters"],
            }
            merge_id = merge_identity(
                [pop.fingerprints[p] for p in plan.parents],
                merge_cfg["method"],
                params,
                base_fingerprint=base.fingerprint,
                dtype=merge_cfg["dtype"],
                seed=cfg["seed"],
            )
            out_dir = paths["store_dir"] / merge_id
            futures[plan.name] = merge_task.submit(
                merge_id,
                [pop.paths[p] for p in plan.parents],
                str(out_dir),
                merge_cfg["method"],
                params,
                base.path,
                merge_cfg["dtype"],
                cfg["device"],
                cfg["seed"],
            )
            pop.paths[plan.name] = str(out_dir)
        wait(list(futures.values()))
        for name, fut in futures.items():
            result = fut.result()
            pop.fingerprints[name] = result["fingerprint"]
            pop.counts["merges"] += 1
            pop.counts["merges_reused"] += result["reused"]
            if result.get("rebuilt"):
                print(f"{name}: store entry failed verification and was rebuilt")
        return evaluate([p.name for p in plans])

    def log_models(model_names: list[str]) -> None:
        for n in model_names:
            member = evolution.members[n]
            kin = pop.parent_kinship.get(n, {})
            tracker.log_model(
                n,
                params={
                    "generation": member.generation,
                    "role": member.role,
                    "parents": list(member.parents or []),
                    "merge_method": merge_cfg["method"] if member.parents else None,
                    "merge_parameters": (
                        {
                            "parameters": merge_cfg["parameters"],
                            "model_parameters": merge_cfg["model_parameters"],
                        }
                        if member.parents
                        else None
                    ),
                },
                metrics={
                    "avg": member.avg,
                    "gain": evolution.gain(n),
                    **{f"kinship_{k}": v for k, v in kin.items()},
                    **{f"score_{t}": s for t, s in pop.scores.get(n, {}).items()},
                },
                tags={"fingerprint": pop.fingerprints[n], "store_path": pop.paths[n]},
                parents=list(member.parents or []),
            )

    def on_generation(evo: Evolution, plans: list[MergePlan], record: GenerationRecord) -> None:
        log_models([p.name for p in plans] if plans else list(evo.foundations))
        matrix = population_matrix()
        for metric in kin_cfg["metrics"]:
            write_matrix_csv(
                paths["output_dir"] / "kinship" / f"gen-{record.generation}-{metric}.csv",
                matrix["names"],
                matrix[metric],
            )
        done = {k: v - counted[k] for k, v in pop.counts.items()}
        counted.update(pop.counts)
        tracker.log_generation(
            record.generation,
            {
                "best_avg": record.best_avg,
                "mean_avg_top_k": record.mean_avg_top_k,
                "mean_kinship_top_k": record.mean_kinship_top_k,
                "merges_done": done["merges"] - done["merges_reused"],
                "merges_reused": done["merges_reused"],
                "evals_done": done["evals"] - done["evals_cached"],
                "evals_cached": done["evals_cached"],
            },
        )
        reused = done["merges_reused"] + done["evals_cached"]
        state = "resumed" if reused else "done"
        print(
            f"generation {record.generation} {state}: {done['merges']} merges "
            f"({done['merges_reused']} reused), {done['evals']} evals "
            f"({done['evals_cached']} cached)"
            f"; best {record.best} avg={record.best_avg:.4f}; S={record.top_k}",
            flush=True,
        )

    # -- Algorithm 1 ------------------------------------------------------------------------------
    counted = dict(pop.counts)
    strat = cfg["strategy"]
    evolution = Evolution(
        names,
        k=strat["k"],
        strategy=strat["name"],
        partner=strat["partner"],
        stop=StopRules(**strat["stop"]),
    )
    evolution.record(evaluate(names))
    reason = run_evolution(
        evolution,
        realize,
        kinship=kinship,
        metric=kin_cfg["metric"],
        mean_kinship=mean_kinship,
        on_generation=on_generation,
    )

    # -- report -----------------------------------------------------------------------------------
    members = list(evolution.members.values())
    rows = results_rows(
        members,
        {m.name: evolution.gain(m.name) for m in members},
        pop.parent_kinship,
        pop.scores,
        pop.fingerprints,
    )
    best = evolution.best()
    summary = {
        "experiment": cfg["tracking"]["experiment"],
        "run_name": cfg["run_name"],
        "strategy": strat["name"],
        "stop_reason": reason,
        "generations": evolution.generation,
        "best_model": best.name,
        "best_avg": best.avg,
        "best_foundation_avg": max(evolution.members[n].avg for n in names),
        "models": len(members),
        "counts": pop.counts,
        "mlflow_parent_run": tracker.parent_id,
        "history": [vars(h) for h in evolution.history],
        "wall_time_s": round(time.time() - started, 1),
    }
    outputs = write_outputs(paths["output_dir"], rows, summary)
    plots = render_run(paths["output_dir"], f"{cfg['tracking']['experiment']} / {cfg['run_name']}")
    table = format_table(rows)
    tracker.log_table(rows, "results.json")
    for path in outputs.values():
        tracker.log_artifact(path)
    for path in plots:
        tracker.log_artifact(path, "plots")
    tracker.log_artifact(paths["output_dir"] / "kinship")
    resolved = paths["output_dir"] / "config.yaml"
    resolved.write_text(yaml.safe_dump(cfg, sort_keys=False))
    tracker.log_artifact(resolved)
    tracker.finish(tags={"stop_reason": reason, "best_model": best.name})
    return {**summary, "table": table, "outputs": {k: str(v) for k, v in outputs.items()}}
