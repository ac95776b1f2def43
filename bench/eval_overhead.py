"""Benchmark: one warm zoo evaluation as lm-eval does it against the adapter's savings, added one
at a time: prompt templates compiled once per process (tasks.lmeval.install_template_cache;
lm-eval compiles every prompt's template anew), each task's requests built once per process and
reused (tasks.lmeval.REQUESTS; lm-eval rebuilds them for every model), and lm-eval's
environment report gathered once (tasks.lmeval.install_env_info_cache; lm-eval runs `pip list`
and more for every result).

In one process, on one thread: the zoo's base model on every zoo task with the eval config's
batch size, a first evaluation to warm the imports, the datasets' cache and the caches, then
rounds in alternating order; prints each side's median wall and CPU time, the part of it spent
in the model's calls (tokenizing and forward passes), and checks the scores are identical.

    python -m bench.eval_overhead [--zoo DIR] [--rounds 5] [--zoo-config micro|default]

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


IN_MODEL = [0.0]  # wall seconds inside the model's request methods
IN_EVALUATE = [0.0]  # wall seconds inside lm-eval's evaluate(): requests, model, scoring


def time_model_calls() -> None:
    """Count the wall time of the HF model's request methods (tokenizing and forward passes)
    and of lm-eval's `evaluate` (which simple_evaluate calls by its module's name)."""
    from lm_eval import evaluator

    from tasks.evaluate import _quiet_hflm

    own_evaluate = evaluator.evaluate

    def evaluate(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return own_evaluate(*args, **kwargs)
        finally:
            IN_EVALUATE[0] += time.perf_counter() - start

    evaluator.evaluate = evaluate

    lm_class = _quiet_hflm()
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        own = getattr(lm_class, name)

        def counted(self: Any, requests: Any, disable_tqdm: bool = False, _own: Any = own) -> Any:
            start = time.perf_counter()
            try:
                return _own(self, requests, disable_tqdm)
            finally:
                IN_MODEL[0] += time.perf_counter() - start

        setattr(lm_class, name, counted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, help="a built zoo (default: build one)")
    parser.add_argument("--zoo-config", choices=("micro", "default"), default="micro")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)  # conf/eval/zoo.yaml
    args = parser.parse_args()

    import torch
    from lm_eval import evaluator, utils

    from tasks import lmeval

    torch.set_num_threads(1)
    workdir = None if args.zoo else Path(tempfile.mkdtemp(prefix="eval-overhead-"))
    try:
        zoo = args.zoo or build(args.zoo_config, workdir)
        tasks = sorted(p.stem for p in (zoo / "tasks").glob("*.yaml"))
        # evaluate_model installs these once per process: switched by hand below
        own_render, own_env = lmeval.install_template_cache(), lmeval.install_env_info_cache()
        cached_render, cached_env = utils.apply_template, evaluator.add_env_info
        # side -> (template rendering, requests reused, environment report)
        sides = {
            "lm-eval's own": (own_render, False, own_env),
            "templates compiled once": (cached_render, False, own_env),
            "+ requests reused": (cached_render, True, own_env),
            "+ environment once": (cached_render, True, cached_env),
        }

        def use(side: str) -> None:
            utils.apply_template, lmeval.REQUESTS.enabled, evaluator.add_env_info = sides[side]

        time_model_calls()
        use("+ environment once")
        *_, first = timed(zoo, tasks, args.batch_size)  # warm-up; fills the request cache
        walls: dict[str, list[float]] = {name: [] for name in sides}
        cpus: dict[str, list[float]] = {name: [] for name in sides}
        model: dict[str, list[float]] = {name: [] for name in sides}
        around: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(args.rounds):
            for name in sides if i % 2 == 0 else reversed(list(sides)):
                use(name)
                IN_MODEL[0] = IN_EVALUATE[0] = 0.0
                wall, cpu, result = timed(zoo, tasks, args.batch_size)
                assert result["scores"] == first["scores"], (name, result["scores"])
                walls[name].append(wall)
                cpus[name].append(cpu)
                model[name].append(IN_MODEL[0])
                around[name].append(IN_EVALUATE[0] - IN_MODEL[0])
        docs = sum(first["n_samples"].values())
        print(f"zoo {zoo}: {len(tasks)} tasks, {docs} documents, 1 thread, {args.rounds} rounds")
        print("  medians, seconds: the evaluation's wall and CPU time, the model's calls")
        print("  (tokenize + forward) and lm-eval's evaluate() around them (requests + scoring)")
        print(f"  {'':24s} {'wall':>7s} {'CPU':>7s} {'model':>7s} {'req+score':>9s}")
        for name in sides:
            row = (statistics.median(x[name]) for x in (walls, cpus, model, around))
            print(f"  {name:24s} " + " ".join(f"{v:7.2f}" for v in row))
        names = list(sides)
        for a, b in ((0, 3), (1, 2)):
            base, now = (statistics.median(walls[names[i]]) for i in (a, b))
            base_cpu, now_cpu = (statistics.median(cpus[names[i]]) for i in (a, b))
            base_rs, now_rs = (statistics.median(around[names[i]]) for i in (a, b))
            print(
                f"  {names[b]} vs {names[a]}: wall {base / now:.2f}x "
                f"({base - now:.2f} s less), CPU {base_cpu / now_cpu:.2f}x, "
                f"requests + scoring {base_rs / now_rs:.2f}x ({base_rs - now_rs:.2f} s less)"
            )
        print("  same scores on every side")
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
