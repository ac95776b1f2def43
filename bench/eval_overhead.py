"""Benchmark: one warm zoo evaluation with lm-eval's own template rendering (every prompt's
template compiled anew, `lm_eval.utils.apply_template`) against the adapter's template cache
(tasks.lmeval.install_template_cache: each template text compiled once per process).

In one process, on one thread: the zoo's base model on every zoo task with the eval config's
batch size, a first evaluation to warm the imports and the datasets' cache, then rounds in
alternating order; prints each side's median wall time and checks the scores are identical.

    python -m bench.eval_overhead [--zoo DIR] [--rounds 3] [--zoo-config micro|default]

Without --zoo it builds the zoo of --zoo-config (micro: about a minute; default: the README's
zoo, minutes) in a temp dir and deletes it at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")


def build(zoo_config: str, folder: Path) -> Path:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tasks.zoo.build import build_zoo

    conf = Path(__file__).resolve().parents[1] / "conf"
    overrides = ["+debug=micro"] if zoo_config == "micro" else []
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    zoo = folder / "zoo"
    build_zoo(zoo, OmegaConf.to_container(cfg.zoo, resolve=True), progress=False)
    return zoo


def timed(zoo: Path, tasks: list[str], batch_size: int) -> tuple[float, float, dict[str, Any]]:
    """Wall and CPU seconds of one evaluation (CPU time: the process's own work, which other
    busy processes on the machine stretch less than its wall time) and its result."""
    from tasks.evaluate import evaluate_model

    wall, cpu = time.perf_counter(), time.process_time()
    result = evaluate_model(zoo / "base", tasks, zoo / "tasks", batch_size=batch_size)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, help="a built zoo (default: build one)")
    parser.add_argument("--zoo-config", choices=("micro", "default"), default="micro")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)  # conf/eval/zoo.yaml
    args = parser.parse_args()

    import torch
    from lm_eval import utils

    torch.set_num_threads(1)
    workdir = None if args.zoo else Path(tempfile.mkdtemp(prefix="eval-overhead-"))
    try:
        zoo = args.zoo or build(args.zoo_config, workdir)
        tasks = sorted(p.stem for p in (zoo / "tasks").glob("*.yaml"))
        from tasks.lmeval import install_template_cache, render_template

        # evaluate_model installs the cache too, once per process: switched by hand below
        lm_evals_own = install_template_cache()
        sides = {"lm-eval's rendering": lm_evals_own, "template cache": render_template}
        utils.apply_template = lm_evals_own
        *_, first = timed(zoo, tasks, args.batch_size)  # warm-up
        walls: dict[str, list[float]] = {name: [] for name in sides}
        cpus: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(args.rounds):
            for name in sides if i % 2 == 0 else reversed(list(sides)):
                utils.apply_template = sides[name]
                wall, cpu, result = timed(zoo, tasks, args.batch_size)
                assert result["scores"] == first["scores"], (name, result["scores"])
                walls[name].append(wall)
                cpus[name].append(cpu)
        docs = sum(first["n_samples"].values())
        print(f"zoo {zoo}: {len(tasks)} tasks, {docs} documents, 1 thread, {args.rounds} rounds")
        for name in sides:
            wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
            print(f"  {name:20s} median wall {wall:6.2f} s, CPU {cpu:6.2f} s")
        base, cached = (statistics.median(cpus[name]) for name in sides)
        saved = f"{base - cached:.2f} s per evaluation ({base / cached:.2f}x)"
        print(f"  CPU saved {saved}; same scores")
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
