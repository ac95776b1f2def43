"""Evaluation step: lm-eval's `simple_evaluate` on a loaded HF model.

The model and tokenizer are loaded here (not by lm-eval from a name) so the dtype and device
are ours and nothing asks the hub. Local task YAMLs may name their data files relative to the
YAML's folder; lm-eval would resolve such paths against the cwd, so each task's config is loaded
with lm-eval's own YAML loader, its `data_files` made absolute, and passed as an inline dict.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None) -> Any:
    """One TaskManager per include path: indexing the default tasks takes 12-28 s."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager(include_defaults=True)
    return TaskManager(include_path=include_path, include_defaults=False)


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


def task_spec(name: str, manager: Any) -> str | dict[str, Any]:
    """The spec to hand lm-eval for `name`: its config dict with absolute data files, or the name.

    Groups, tags and tasks without local data files are passed by name unchanged.
    """
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None:
        available = sorted(manager.all_tasks)
        close = difflib.get_close_matches(name, available, n=5)
        shown = available if len(available) <= MAX_NAMES_IN_ERROR else close
        what = "available tasks" if shown is available else f"{len(available)} tasks; close"
        raise InputError(f"unknown lm-eval task '{name}' ({what}: {', '.join(shown) or 'none'})")
    if entry.kind != Kind.TASK or entry.yaml_path is None:
        return name
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    kwargs = cfg.get("dataset_kwargs") or {}
    if "data_files" not in kwargs:
        return name
    folder = Path(entry.yaml_path).resolve().parent
    cfg["dataset_kwargs"] = {
        **kwargs,
        "data_files": _absolute_data_files(kwargs["data_files"], folder),
    }
    cfg.pop("tag", None)  # an inline task must not re-register its tags
    return cfg


def check_tasks(tasks: Sequence[str], include_path: str | Path | None) -> None:
    """Raise InputError naming any task lm-eval would not find, before any model is touched."""
    if not tasks:
        raise InputError("eval.tasks: no evaluation task given")
    manager = _task_manager(str(Path(include_path).resolve()) if include_path else None)
    for name in tasks:
        try:
            task_spec(name, manager)
        except InputError as exc:
            raise InputError(f"eval.tasks: {exc}") from None


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


def evaluate_model(
    model_dir: Path,
    tasks: Sequence[str],
    include_path: Path | None = None,
    *,
    batch_size: int | str = 32,
    device: str = "cpu",
    limit: int | None = None,
    num_fewshot: int | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Accuracy of the model in `model_dir` on each lm-eval task, and their mean ("avg").

    `include_path`: a folder of task YAMLs, used instead of lm-eval's built-in tasks; None uses
    the built-in ones (e.g. the Open LLM Leaderboard tasks).
    """
    _quiet()
    from lm_eval import simple_evaluate

    if not tasks:
        raise ValueError("evaluate_model: no tasks given")
    manager = _task_manager(str(Path(include_path).resolve()) if include_path else None)
    specs = [task_spec(name, manager) for name in tasks]
    if include_path and all(isinstance(spec, dict) for spec in specs):
        # local data only: keep `datasets` from asking the hub (it reads this on first import);
        # hub-hosted benchmarks (eval=open_llm) leave the user's setting alone
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    torch_device = resolve_device(device)
    model, tokenizer = load_model(Path(model_dir), torch_device, dtype)
    lm = _quiet_hflm()(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=torch_device
    )
    out = simple_evaluate(
        model=lm,
        tasks=specs,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=0,  # no stderr: it costs seconds per task and is not used
        log_samples=False,
    )
    _quiet()  # lm-eval resets its logger level while it runs
    del lm, model  # the weights go now, not when the step's worker next collects
    results = out["results"]
    scores: dict[str, float] = {}
    for name in tasks:
        metrics = results.get(name)
        if metrics is None:
            raise InputError(f"lm-eval returned no results for task '{name}' (a group?)")
        key = next((k for k in metrics if k.split(",")[0] == METRIC), None)
        if key is None:
            raise InputError(f"task '{name}' has no '{METRIC}' metric: {sorted(metrics)}")
        scores[name] = float(metrics[key])
    n_samples = {
        name: int(out.get("n-samples", {}).get(name, {}).get("effective", 0)) for name in tasks
    }
    return {"scores": scores, "avg": sum(scores.values()) / len(scores), "n_samples": n_samples}


def evaluation_key(fingerprint: str, settings: Mapping[str, Any]) -> str:
    """Same weights, same benchmark -> same scores; batch size and device do not count."""
    benchmark = {k: v for k, v in settings.items() if k not in ("batch_size", "device")}
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
        )
    return {**result, "ran": ran}
