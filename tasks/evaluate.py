"""Evaluation step: lm-eval's `simple_evaluate` on a loaded HF model (or lm-eval's vLLM model).

The model and tokenizer are loaded here (not by lm-eval from a name) so the dtype and device
are ours and nothing asks the hub. What the benchmark is (entries, registry, metrics) lives in
tasks/lmeval.py and is resolved before any model is loaded.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import task

from tasks.core.device import resolve_device, running_step
from tasks.core.errors import InputError
from tasks.core.load import load_model
from tasks.core.store import atomic_dir, entry_lock, folder_digest, stable_hash
from tasks.core.weights import AUTO, effective_dtype
from tasks.lmeval import (
    METRIC,
    REQUESTS,
    all_local,
    install_env_info_cache,
    install_template_cache,
    resolve_tasks,
    sampled_tasks,
    task_entries,
    task_manager,
    task_spec,
)
from tasks.scoring.leaderboard import entry_scores

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


BACKENDS = ("hf", "vllm")
VLLM_HINT = "pip install vllm"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _vllm_lm(model_dir: Path, dtype: str, batch_size: int | str) -> Any:
    """lm-eval's vLLM model on `model_dir` (vLLM loads the weights itself, on the GPU)."""
    if not vllm_installed():
        raise InputError(
            f"eval.backend: vllm is not installed ({VLLM_HINT}), or use eval.backend=hf"
        )
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(pretrained=str(model_dir), dtype=dtype, batch_size=batch_size)


def _sample_count(n_docs: int, limit: int | float) -> int:
    """lm-eval's reading of `limit`: a fraction of the documents below 1, else a count."""
    return math.ceil(n_docs * limit) if limit < 1 else min(int(limit), n_docs)


def build_tasks(
    entries: Sequence[Mapping[str, Any]], manager: Any
) -> tuple[list[Any], dict[str, list[Any]], dict[str, list[int]]]:
    """lm-eval Task/Group objects for `entries` (their datasets are loaded here), each leaf task
    set to its entry's few-shot count; the leaves of each entry; the document indices of the
    entries with a limit."""
    objects, leaves, indices = [], {}, {}
    for e in entries:
        loaded = manager.load([task_spec(e["task"], manager, e["aggregation"])])
        groups = loaded.get("groups") or {}
        objects.append(groups[e["task"]] if e["task"] in groups else loaded["tasks"][e["task"]])
        leaves[e["task"]] = list(loaded["tasks"].values())
        for leaf in leaves[e["task"]]:
            if e["num_fewshot"] is not None:
                leaf.set_config(key="num_fewshot", value=e["num_fewshot"])
            if e["limit"] is not None:
                count = _sample_count(len(leaf.eval_docs), e["limit"])
                indices[leaf.task_name] = list(range(count))
    return objects, leaves, indices


def evaluate_model(
    model_dir: Path,
    tasks: Sequence[Any],
    include_path: Path | None = None,
    *,
    batch_size: int | str = 32,
    device: str = "cpu",
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    dtype: str = AUTO,
    metric: str = METRIC,
    backend: str = "hf",
    apply_chat_template: bool | str = False,
    fewshot_as_multiturn: bool = False,
    system_instruction: str | None = None,
    gen_kwargs: Mapping[str, Any] | None = None,
    log_samples: bool | str = False,
) -> dict[str, Any]:
    """Each task's score (its metric, as lm-eval reports it: 0-1 for accuracies) for the model
    in `model_dir`, and their mean ("avg").

    `tasks`: names or mappings (see `task_entries`); `limit`, `num_fewshot` and `metric` are the
    defaults for entries that set none. `include_path`: a folder of task YAMLs, seen beside
    lm-eval's built-in tasks when a task is not in it; None: the built-in tasks only.
    `log_samples`: keep per-sample outputs ("samples": leaf task -> one record per document,
    see `compact_samples`) of every task (True), none (False) or the generation tasks ("auto");
    "samples_for" names the entries they cover.
    """
    _quiet()
    from lm_eval import simple_evaluate

    install_template_cache()
    install_env_info_cache()
    if not tasks:
        raise ValueError("evaluate_model: no tasks given")
    if backend not in BACKENDS:
        raise InputError(f"eval.backend: '{backend}' is not one of {', '.join(BACKENDS)}")
    entries = task_entries(tasks, num_fewshot=num_fewshot, limit=limit, metric=metric)
    manager, metrics = resolve_tasks(entries, include_path)  # config errors before any loading
    sampled = sampled_tasks(entries, manager, log_samples)
    if all_local([e["task"] for e in entries], include_path):
        # local data only: keep `datasets` from asking the hub (it reads this on first import);
        # hub-hosted benchmarks (eval=open_llm) leave the user's setting alone
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    objects, leaves, indices = build_tasks(entries, manager)

    if backend == "vllm":
        lm = _vllm_lm(Path(model_dir), dtype, batch_size)
        model = None
    else:
        torch_device = resolve_device(device)
        model, tokenizer = load_model(Path(model_dir), torch_device, dtype)
        lm = _quiet_hflm()(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=torch_device
        )
    # each leaf task's requests come from the process's cache when another evaluation built them
    REQUESTS.attach((t for found in leaves.values() for t in found), lm, apply_chat_template)
    out = simple_evaluate(
        model=lm,
        tasks=objects,
        samples=indices or None,
        task_manager=manager,
        bootstrap_iters=0,  # no stderr: it costs seconds per task and is not used
        log_samples=bool(sampled),
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=fewshot_as_multiturn,
        system_instruction=system_instruction,
        gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
    )
    _quiet()  # lm-eval resets its logger level while it runs
    del lm, model  # the weights go now, not when the step's worker next collects
    reported = {**(out.get("groups") or {}), **out["results"]}
    scores = entry_scores_of(entries, metrics, reported)
    counts = out.get("n-samples", {})
    n_samples = {
        name: sum(int(counts.get(t.task_name, {}).get("effective", 0)) for t in leaves[name])
        for name in metrics
    }
    shots = {
        t.task_name: out["configs"].get(t.task_name, {}).get("num_fewshot")
        for name in metrics
        for t in leaves[name]
    }
    logged = out.get("samples") or {}
    return {
        "scores": scores,
        # the entries' scores (rescaled where they set `choices`), not their `/raw` twins
        "avg": sum(scores[name] for name in metrics) / len(metrics),
        "n_samples": n_samples,
        "metrics": metrics,
        "num_fewshot": shots,
        "samples": {
            t.task_name: compact_samples(logged.get(t.task_name, []))
            for name in sampled
            for t in leaves[name]
        },
        "samples_for": sampled,
    }


RAW = "/raw"  # suffix of the raw twin of a rescaled score


def entry_scores_of(
    entries: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, str | list[str]],
    reported: Mapping[str, Mapping[str, Any]],
) -> dict[str, float]:
    """Each entry's score from lm-eval's reported values (task or group -> `metric,filter` ->
    value): the mean of its metrics, rescaled as its `choices` says (tasks/scoring/leaderboard.py),
    with, for an entry that sets `choices`, lm-eval's raw value beside it as `<task>/raw`."""
    scores: dict[str, float] = {}
    for e in entries:
        name, keys = e["task"], metrics[e["task"]]
        keys = keys if isinstance(keys, list) else [keys]
        choices = e.get("choices")
        needed = {name: keys}
        if isinstance(choices, Mapping):
            needed.update({sub: keys for sub in choices})
        for task_name, wanted in needed.items():
            values = reported.get(task_name) or {}
            absent = [k for k in wanted if k not in values]
            if absent:
                have = sorted(k for k in values if k != "alias" and "_stderr" not in k)
                raise InputError(
                    f"eval.tasks: task '{task_name}' reported no '{absent[0]}' (it has: {have})"
                )
        score, raw = entry_scores(name, keys, choices, reported)
        scores[name] = score
        if choices is not None:
            scores[name + RAW] = raw
    return scores


def _single(values: Sequence[Any]) -> Any:
    """A one-element list as its element (one request, one response), else the list."""
    values = list(values)
    return values[0] if len(values) == 1 else values


def compact_samples(logged: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """lm-eval's logged samples of one task (a record per document and filter, each with the
    whole document and three hashes) as one record per document: `doc_id`, `prompt`, `target`,
    `choices` (the continuations scored, multiple choice) or `gen_kwargs` (generation), the
    model's `responses`, each filter's response (`filtered`) and each per-sample metric under
    the `metric,filter` key lm-eval reports the task's score by (`metrics`)."""
    by_doc: dict[Any, dict[str, Any]] = {}
    for sample in logged:
        record = by_doc.get(sample["doc_id"])
        if record is None:
            args = [tuple(a) for a in sample["arguments"]]  # one (context, ...) per request
            record = {"doc_id": sample["doc_id"], "prompt": args[0][0], "target": sample["target"]}
            second = [a[1] for a in args if len(a) > 1]
            if second and all(isinstance(a, str) for a in second):
                record["choices"] = second
            elif second and isinstance(second[0], Mapping):
                record["gen_kwargs"] = dict(second[0])
            record["responses"] = _single(_single(r) for r in sample["resps"])
            record["filtered"], record["metrics"] = {}, {}
            by_doc[sample["doc_id"]] = record
        flt = sample["filter"]
        record["filtered"][flt] = _single(sample["filtered_resps"])
        for metric in sample["metrics"]:
            record["metrics"][f"{metric},{flt}"] = sample[metric]
    return [by_doc[k] for k in sorted(by_doc)]


def _jsonable(value: Any) -> Any:
    """numpy scalars as numbers; anything else JSON cannot hold as its text."""
    return value.item() if hasattr(value, "item") else str(value)


def write_samples(folder: Path, samples: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict:
    """`<task>.jsonl` per task in `folder`, written whole or not at all (the folder appears
    only once every file is complete); task -> path. Two runs evaluating the same model on the
    same benchmark write the same folder: the entry lock (tasks.core.store) takes them in turn."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)  # the lock file lives there
    with entry_lock(folder), atomic_dir(folder) as tmp:
        for task_name, records in samples.items():
            lines = (json.dumps(r, default=_jsonable, ensure_ascii=False) + "\n" for r in records)
            (tmp / f"{task_name}.jsonl").write_text("".join(lines))
    return {name: str(folder / f"{name}.jsonl") for name in samples}


def samples_wanted(settings: Mapping[str, Any]) -> list[str]:
    """The entries of `settings` whose samples an evaluation with them keeps (eval.log_samples),
    read from the task configs: a cached result made without them lacks them."""
    entries = settings["tasks"]
    manager = task_manager([e["task"] for e in entries], settings.get("include_path"))
    return sampled_tasks(entries, manager, settings.get("log_samples", False))


def has_samples(result: Mapping[str, Any], wanted: Sequence[str]) -> bool:
    """Whether an evaluation result holds the samples of every entry in `wanted`, on disk."""
    covered = set(result.get("samples_for") or [])
    files = (result.get("eval_samples") or {}).values()
    return set(wanted) <= covered and all(Path(p).is_file() for p in files)


# settings that change how a model is run or what is kept of it, not what it scores
NOT_IN_KEY = ("batch_size", "device", "log_samples", "samples_dir")


def evaluation_key(
    fingerprint: str, settings: Mapping[str, Any], model_dir: Path | None = None
) -> str:
    """Same weights, same benchmark -> same scores. The tasks with their per-task settings and
    every lm-eval option that changes prompts or outputs count; batch size, device and sample
    logging do not, and neither does `fewshot_as_multiturn` without a chat template (lm-eval
    ignores it then). Given `model_dir`, dtype `auto` counts as the dtype it loads in, so `auto`
    on a bfloat16 model and an explicit bfloat16 are one evaluation."""
    benchmark = {k: v for k, v in settings.items() if k not in NOT_IN_KEY}
    if model_dir is not None and benchmark.get("dtype") == AUTO:
        benchmark["dtype"] = effective_dtype(AUTO, [Path(model_dir)])
    if not benchmark.get("apply_chat_template"):
        benchmark.pop("fewshot_as_multiturn", None)
    for name in ("system_instruction", "gen_kwargs"):
        if not benchmark.get(name):  # unset, None or empty: the same run
            benchmark.pop(name, None)
    if benchmark.get("include_path"):
        # the task files, not where they live, define a local benchmark
        benchmark["include_path"] = folder_digest(Path(benchmark["include_path"]))
    return f"eval-{fingerprint}-{stable_hash(benchmark)}"


# -- Prefect task ---------------------------------------------------------------------------------


# cached on the weights' fingerprint and the benchmark: a resume, or another run that meets the
# same model, never evaluates it twice
@task(
    name="evaluate",
    cache_key_fn=lambda _ctx, p: evaluation_key(p["fingerprint"], p["settings"], p["model_dir"]),
    persist_result=True,
)
def evaluate_task(
    model_dir: str, fingerprint: str, settings: dict[str, Any], threads: int = 1
) -> dict[str, Any]:
    """`evaluate_model` with the flow's settings and the step's share of the cores; `ran` says
    where and how long. Per-sample outputs go to files under `samples_dir`, in a folder named
    by the evaluation's cache key (`eval_samples`: task -> path), not into the cached result."""
    with running_step("evaluate", threads, resolve_device(settings["device"])) as ran:
        result = evaluate_model(
            Path(model_dir),
            settings["tasks"],
            Path(settings["include_path"]) if settings.get("include_path") else None,
            batch_size=settings["batch_size"],
            device=settings["device"],
            dtype=settings.get("dtype", AUTO),
            backend=settings.get("backend", "hf"),
            apply_chat_template=settings.get("apply_chat_template", False),
            fewshot_as_multiturn=settings.get("fewshot_as_multiturn", False),
            system_instruction=settings.get("system_instruction"),
            gen_kwargs=settings.get("gen_kwargs"),
            log_samples=settings.get("log_samples", False),
        )
        samples = result.pop("samples")
        paths = {}
        if samples:
            if not settings.get("samples_dir"):
                raise ValueError("evaluate_task: samples were kept but settings has no samples_dir")
            key = evaluation_key(fingerprint, settings, Path(model_dir))
            paths = write_samples(Path(settings["samples_dir"]) / key, samples)
    return {**result, "eval_samples": paths, "ran": ran}
