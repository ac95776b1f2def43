"""Benchmark: the evolution phase through the pipeline against its floor, quiet and busy.

    python -m bench.evolution [--zoo data/zoo] [--experiment greedy_kinship] [--skip-dask]

Measured in one run, each evolution in a fresh root (nothing cached) on an already built zoo:
  - floor: the same merges, evaluations and kinship matrices as the `local` run made, called one
    after another in this bare process (no Prefect, no MLflow, no Hydra);
  - local: `python -m flows.evolve runtime=local` (Prefect threads, 2 workers);
  - dask: `runtime=dask` (a temporary cluster of 2 worker processes);
  - local, busy: `local` again beside two CPU-bound processes.
The evolution phase is the flow's own `wall_time_s` (summary.json: from the recorder's start,
after the zoo, fetch and preflight); the process's whole wall time is printed beside it. Prints
ratios to the floor and, for the busy run, to the quiet one, and per-kind step seconds so the
remainder (orchestration, tracking, start-up) is visible.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
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


def floor(run_root: Path, zoo: Path, experiment: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The run's merges, evaluations and kinship matrices, bare and sequential."""
    from tasks.evaluate import evaluate_model
    from tasks.kinship import kinship_matrix
    from tasks.merge import merge_models
    from tasks.zoo.build import load_manifest

    manifest = load_manifest(zoo)
    task_dir = zoo / manifest["task_dir"]
    with (run_root / "results" / experiment / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    merge = cfg["merge"]
    params = {"parameters": merge["parameters"], "model_parameters": merge["model_parameters"]}
    seconds = {"merge": 0.0, "evaluate": 0.0, "kinship": 0.0}
    with tempfile.TemporaryDirectory(prefix="floor-") as scratch:
        paths = {r["model"]: zoo / r["model"] for r in rows if r["role"] == "foundation"}
        generations = sorted({int(r["gen"]) for r in rows})
        for gen in generations:
            for row in (r for r in rows if int(r["gen"]) == gen):
                if row["role"] != "foundation":
                    t = time.perf_counter()
                    parents = [paths[p] for p in row["parents"].split(" x ")]
                    out = Path(scratch) / row["model"]
                    merge_models(parents, out, merge["method"], params, base=zoo / "base")
                    paths[row["model"]] = out
                    seconds["merge"] += time.perf_counter() - t
                t = time.perf_counter()
                evaluate_model(paths[row["model"]], manifest["tasks"], task_dir, batch_size=64)
                seconds["evaluate"] += time.perf_counter() - t
            t = time.perf_counter()
            kinship_matrix(list(paths.values()), zoo / "base", cfg["kinship"]["metrics"])
            seconds["kinship"] += time.perf_counter() - t
    return {"wall_time_s": sum(seconds.values()), "seconds": seconds, "models": len(rows)}


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
        cfg = json.loads(json.dumps(_config(work_dir / "local", args.experiment)))
        import torch

        torch.set_num_threads(1)  # as each pipeline step runs with max_workers=2 on 2 cores
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


def _config(root: Path, experiment: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((root / "results" / experiment / "config.yaml").read_text())


def report(results: dict[str, dict[str, Any]]) -> None:
    base = results["floor"]["wall_time_s"]
    print(f"\n{'run':<8}{'phase s':>9}{'process s':>11}{'vs floor':>10}  step seconds")
    for name, r in results.items():
        counts = r.get("counts", {})
        steps = r.get("seconds") or {
            "merge": counts.get("merge_seconds", 0.0),
            "evaluate": counts.get("eval_seconds", 0.0),
            "kinship": counts.get("kinship_seconds", 0.0),
        }
        step_text = ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
        process = f"{r['process_s']:.1f}" if "process_s" in r else "-"
        ratio = r["wall_time_s"] / base
        print(f"{name:<8}{r['wall_time_s']:>9.1f}{process:>11}{ratio:>9.2f}x  {step_text}")
    if "busy" in results:
        ratio = results["busy"]["wall_time_s"] / results["local"]["wall_time_s"]
        print(f"\nlocal beside two CPU-bound processes: {ratio:.2f}x its quiet phase time")


if __name__ == "__main__":
    main()
