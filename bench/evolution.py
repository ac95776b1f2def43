"""Benchmark: the evolution phase through the pipeline against its floor, quiet and busy.

    python -m bench.evolution [--zoo data/zoo] [--experiment greedy_kinship] [--skip-dask]

Measured in one run, each evolution in a fresh root (nothing cached) on an already built zoo:
  - compute: the model-compute floor, what no pipeline can avoid: the `local` run's merges and
    kinship matrices, and for each evaluation only the model's work (loading it, tokenizing and
    running lm-eval's requests through lm-eval's HF model), the requests built once beforehand;
  - floor: the same merges, evaluations and kinship matrices as the `local` run made, called one
    after another in this bare process (no Prefect, no MLflow, no Hydra);
  - local: `python -m flows.evolve runtime=local` (Prefect threads, 2 workers);
  - dask: `runtime=dask` (a temporary cluster of 2 worker processes);
  - local, busy: `local` again beside two CPU-bound processes;
  - the `local` command once more (up to date: reported, nothing run) and with
    `runtime.replay=true` (replayed through Prefect, every step from its cache), whole process.
The evolution phase is the flow's own `wall_time_s` (summary.json: from the recorder's start,
after the zoo, fetch and preflight); the process's whole wall time is printed beside it. Prints
ratios to the floor and, for the busy run, to the quiet one, and per-kind step seconds so the
remainder (orchestration, tracking, start-up) is visible.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_flow(root: Path, zoo: Path, experiment: str, *overrides: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "flows.evolve",
        f"+experiment={experiment}",
        f"paths.root={root}",
        f"paths.zoo_dir={zoo}",
        "runtime.progress=false",
        *overrides,
    ]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((root / "results" / experiment / "summary.json").read_text())
    return {"process_s": wall, **summary}


def replay(
    run_root: Path, zoo: Path, experiment: str, cfg: dict[str, Any], evaluate: Callable[[Path], Any]
) -> dict[str, Any]:
    """The `local` run's merges, evaluations (`evaluate` on each model's folder) and kinship
    matrices, one after another in this process, each kind timed."""
    from tasks.kinship import kinship_matrix
    from tasks.merge import merge_models

    with (run_root / "results" / experiment / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    merge = cfg["merge"]
    params = {"parameters": merge["parameters"], "model_parameters": merge["model_parameters"]}
    seconds = {"merge": 0.0, "evaluate": 0.0, "kinship": 0.0}
    with tempfile.TemporaryDirectory(prefix="replay-") as scratch:
        paths = {r["model"]: zoo / r["model"] for r in rows if r["role"] == "foundation"}
        for gen in sorted({int(r["gen"]) for r in rows}):
            for row in (r for r in rows if int(r["gen"]) == gen):
                if row["role"] != "foundation":
                    t = time.perf_counter()
                    parents = [paths[p] for p in row["parents"].split(" x ")]
                    out = Path(scratch) / row["model"]
                    merge_models(parents, out, merge["method"], params, base=zoo / "base")
                    paths[row["model"]] = out
                    seconds["merge"] += time.perf_counter() - t
                t = time.perf_counter()
                evaluate(paths[row["model"]])
                seconds["evaluate"] += time.perf_counter() - t
            t = time.perf_counter()
            kinship_matrix(list(paths.values()), zoo / "base", cfg["kinship"]["metrics"])
            seconds["kinship"] += time.perf_counter() - t
    return {"wall_time_s": sum(seconds.values()), "seconds": seconds, "models": len(rows)}


def floor(run_root: Path, zoo: Path, experiment: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The run's merges, evaluations (our evaluate step, lm-eval's whole evaluation) and kinship
    matrices, bare and sequential."""
    from tasks.evaluate import evaluate_model
    from tasks.zoo.build import load_manifest

    manifest = load_manifest(zoo)
    tasks, task_dir = list(manifest["tasks"]), zoo / manifest["task_dir"]
    return replay(
        run_root,
        zoo,
        experiment,
        cfg,
        lambda model_dir: evaluate_model(model_dir, tasks, task_dir, batch_size=64),
    )


def benchmark_requests(tasks: list[Any], task_dir: Path) -> dict[str, list[Any]]:
    """lm-eval's requests for the zoo's benchmark, by request type, built once (as lm-eval's
    evaluator builds them: each leaf task's `build_all_requests`, then every request `repeats`
    times)."""
    from tasks.evaluate import build_tasks
    from tasks.lmeval import METRIC, resolve_tasks, task_entries

    entries = task_entries(tasks, num_fewshot=None, limit=None, metric=METRIC)
    manager, _ = resolve_tasks(entries, task_dir)
    _, leaves, indices = build_tasks(entries, manager)
    by_type: dict[str, list[Any]] = {}
    for leaf in (leaf for group in leaves.values() for leaf in group):
        leaf.build_all_requests(samples=indices.get(leaf.task_name))
        for request in leaf.instances:
            by_type.setdefault(request.request_type, []).extend([request] * request.repeats)
    return by_type


def model_compute(run_root: Path, zoo: Path, experiment: str, cfg: dict[str, Any]) -> dict:
    """The floor of what depends on the models: the run's merges and kinship matrices, and per
    evaluation the model's load and its forward passes over prebuilt requests."""
    from tasks.core.load import load_model
    from tasks.evaluate import _quiet, _quiet_hflm
    from tasks.zoo.build import load_manifest

    manifest = load_manifest(zoo)
    requests = benchmark_requests(list(manifest["tasks"]), zoo / manifest["task_dir"])
    _quiet()
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)  # "already loaded"

    def forward(model_dir: Path) -> None:
        model, tokenizer = load_model(model_dir, "cpu", "auto")
        lm = _quiet_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=64)
        for request_type, batch in requests.items():
            getattr(lm, request_type)(batch)

    forward(zoo / "base")  # imports and first-call costs are not the floor's
    return replay(run_root, zoo, experiment, cfg, forward)


def busy_loop(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=str(ROOT / "data" / "zoo"))
    parser.add_argument("--experiment", default="greedy_kinship")
    parser.add_argument("--skip-dask", action="store_true")
    args = parser.parse_args()
    # lm-eval's per-task bars off in the floor too (tqdm reads this on its first import)
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"})
    zoo = Path(args.zoo).resolve()
    if not (zoo / "manifest.json").is_file():
        raise SystemExit(f"no zoo at {zoo}: build it first (python -m flows.zoo)")
    print(f"evolution bench: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-evolution-") as work:
        work_dir = Path(work)
        results["local"] = run_flow(work_dir / "local", zoo, args.experiment, "runtime=local")
        # the same command again: up to date (flows/run/uptodate.py), then replayed
        local = (work_dir / "local", zoo, args.experiment, "runtime=local")
        again = [run_flow(*local), run_flow(*local, "runtime.replay=true")]
        cfg = json.loads(json.dumps(_config(work_dir / "local", args.experiment)))
        import torch

        torch.set_num_threads(1)  # as each pipeline step runs with max_workers=2 on 2 cores
        results["compute"] = model_compute(work_dir / "local", zoo, args.experiment, cfg)
        results["floor"] = floor(work_dir / "local", zoo, args.experiment, cfg)
        if not args.skip_dask:
            results["dask"] = run_flow(work_dir / "dask", zoo, args.experiment, "runtime=dask")
        stop_at = time.time() + 3600
        hogs = [multiprocessing.Process(target=busy_loop, args=(stop_at,)) for _ in range(2)]
        for hog in hogs:
            hog.start()
        try:
            results["busy"] = run_flow(work_dir / "busy", zoo, args.experiment, "runtime=local")
        finally:
            for hog in hogs:
                hog.terminate()
    report(results)
    up_to_date, replayed = again
    print(
        f"the same command again: {up_to_date['process_s']:.1f} s whole (up to date: nothing "
        f"run); with runtime.replay=true {replayed['process_s']:.1f} s whole, of which the "
        f"phase {replayed['wall_time_s']:.1f} s (every step from the store or Prefect's cache)"
    )


def _config(root: Path, experiment: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((root / "results" / experiment / "config.yaml").read_text())


def report(results: dict[str, dict[str, Any]]) -> None:
    compute, bare = results["compute"]["wall_time_s"], results["floor"]["wall_time_s"]
    print(f"\n{'run':<9}{'phase s':>9}{'process s':>11}{'vs compute':>12}{'vs floor':>10}  step s")
    for name in ("compute", "floor", "local", "dask", "busy"):
        if name not in results:
            continue
        r = results[name]
        counts = r.get("counts", {})
        steps = r.get("seconds") or {
            "merge": counts.get("merge_seconds", 0.0),
            "evaluate": counts.get("eval_seconds", 0.0),
            "kinship": counts.get("kinship_seconds", 0.0),
        }
        step_text = ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
        process = f"{r['process_s']:.1f}" if "process_s" in r else "-"
        phase = r["wall_time_s"]
        print(
            f"{name:<9}{phase:>9.1f}{process:>11}{phase / compute:>11.2f}x{phase / bare:>9.2f}x"
            f"  {step_text}"
        )
    local = results["local"]["wall_time_s"]
    print(f"\nlocal vs the model-compute floor: {local / compute:.2f}x (goal <= 2x, quiet)")
    if "busy" in results:
        ratio = results["busy"]["wall_time_s"] / local
        print(f"local beside two CPU-bound processes: {ratio:.2f}x its quiet time (goal <= 3x)")


if __name__ == "__main__":
    main()
