"""Merge step: mergekit behind a thin adapter.

`merge_models` turns (parents, method, params) into a mergekit `MergeConfiguration`, runs it
through mergekit's Python API and writes the result atomically. The mergekit YAML of each merge
is saved in the merged folder (`mergekit_config.yml`) so any merge can be re-run with
`mergekit-yaml` by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.card import merge_card, write_card
from tasks.device import resolve_device, running_step
from tasks.store import (
    atomic_dir,
    entry_lock,
    fingerprint_model,
    stable_hash,
    to_plain,
    verify_model,
)

MERGEKIT_CONFIG_FILE = "mergekit_config.yml"

# method -> whether mergekit needs the shared base model as `base_model`
METHODS_NEEDING_BASE: dict[str, bool] = {
    "slerp": False,
    "linear": False,
    "task_arithmetic": True,
    "ties": True,
    "dare_ties": True,
}
MERGE_METHODS = tuple(METHODS_NEEDING_BASE)
PRESETS = Path(__file__).resolve().parents[1] / "conf" / "merge"


def check_method(method: str) -> None:
    if method not in METHODS_NEEDING_BASE:
        raise ValueError(
            f"unknown merge method '{method}': choose one of {', '.join(MERGE_METHODS)}"
        )


def preset(method: str) -> dict[str, Any]:
    """A method's parameters as conf/merge/<method>.yaml sets them (the one place they live),
    e.g. the paper's layer-gradient SLERP for `slerp`."""
    check_method(method)
    cfg = yaml.safe_load((PRESETS / f"{method}.yaml").read_text())
    return {
        "parameters": cfg.get("parameters") or {},
        "model_parameters": cfg.get("model_parameters") or {},
    }


def build_merge_config(
    parents: Sequence[Path],
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    base: Path | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The mergekit YAML (as a dict) for merging `parents` with `method`.

    `params` holds `parameters` (global mergekit parameters) and `model_parameters` (applied to
    every parent). For SLERP the first parent is mergekit's `base_model`: t=0 keeps it.
    """
    check_method(method)
    if len(parents) < 2:
        raise ValueError(f"a merge needs at least two parents, got {len(parents)}")
    if method == "slerp" and len(parents) != 2:
        raise ValueError(f"slerp merges exactly two models, got {len(parents)}")
    params = dict(preset(method) if params is None else params)
    global_params = to_plain(params.get("parameters") or {})
    model_params = to_plain(params.get("model_parameters") or {})
    paths = [str(Path(p).resolve()) for p in parents]

    config: dict[str, Any] = {"merge_method": method, "dtype": dtype}
    models = []
    for path in paths:
        entry: dict[str, Any] = {"model": path}
        if model_params:
            entry["parameters"] = dict(model_params)
        models.append(entry)
    if method == "slerp":
        config["base_model"] = paths[0]
    elif METHODS_NEEDING_BASE[method]:
        if base is None:
            raise ValueError(f"merge method '{method}' needs the shared base model")
        config["base_model"] = str(Path(base).resolve())
    config["models"] = models
    if global_params:
        config["parameters"] = global_params
    return config


def merge_models(
    parents: Sequence[Path],
    out_dir: Path,
    method: str = "slerp",
    params: Mapping[str, Any] | None = None,
    *,
    base: Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
) -> Path:
    """Merge `parents` into `out_dir` (written atomically) and return `out_dir`."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = build_merge_config(parents, method, params, base=base, dtype=dtype)
    merge_config = MergeConfiguration.model_validate(config)
    torch_device = resolve_device(device)
    options = MergeOptions(
        cuda=torch_device.startswith("cuda"),
        device=torch_device,
        copy_tokenizer=True,
        # the model card step may ask the hub about local paths and fail offline
        write_model_card=False,
        safe_serialization=True,
        random_seed=seed,
        quiet=True,
    )
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        run_merge(merge_config, str(tmp), options)
        (tmp / MERGEKIT_CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        # the card (README.md) is outside the weights fingerprint; the run rewrites it later
        write_card(tmp, merge_card(config, out_dir.name))
        fingerprint_model(tmp)
    return out_dir


def merge_identity(
    parent_fingerprints: Sequence[str],
    method: str,
    params: Mapping[str, Any] | None,
    *,
    base_fingerprint: str | None,
    dtype: str,
    seed: int,
) -> str:
    """Content address of a merge: same parents, method and parameters -> same id."""
    return stable_hash(
        {
            "parents": list(parent_fingerprints),
            "method": method,
            "params": to_plain(params or preset(method)),
            "base": base_fingerprint if METHODS_NEEDING_BASE.get(method) else None,
            "dtype": dtype,
            "seed": seed if method == "dare_ties" else None,
        }
    )


def merge_or_reuse(
    merge_id: str,
    parents: list[str],
    out_dir: str,
    method: str,
    params: dict[str, Any],
    base: str | None,
    dtype: str,
    device: str,
    seed: int,
) -> dict[str, Any]:
    """Merge into the content-addressed `out_dir` unless a verified entry is already there.

    The store is the cache of merges (it is what DVC versions), so an entry that fails
    verification is rebuilt instead of trusted.
    """
    out = Path(out_dir)
    # two runs sharing a store must not write the same entry at once: the second waits, then
    # finds the first one's verified entry
    with entry_lock(out):
        note = None
        if out.exists():
            if (out / MERGEKIT_CONFIG_FILE).is_file() and verify_model(out):
                return {"merge_id": merge_id, "fingerprint": fingerprint_model(out), "reused": True}
            note = f"store entry {out} failed verification; rebuilding it"
            logging.getLogger(__name__).warning(note)
        merge_models(
            [Path(p) for p in parents],
            out,
            method,
            params,
            base=Path(base) if base else None,
            dtype=dtype,
            device=device,
            seed=seed,
        )
        return {
            "merge_id": merge_id,
            "fingerprint": fingerprint_model(out),
            "reused": False,
            "rebuilt": note is not None,
        }


# -- Prefect task ---------------------------------------------------------------------------------


# the store is the merge cache (verified on reuse), so Prefect caches nothing here
@task(name="merge", cache_policy=NO_CACHE, persist_result=False, tags=["merge"])
def merge_task(request: dict[str, Any], threads: int = 1) -> dict[str, Any]:
    """`merge_or_reuse(**request)` with the step's share of the cores; `ran` says where and how
    long."""
    with running_step("merge", threads, resolve_device(request["device"])) as ran:
        result = merge_or_reuse(**request)
    return {**result, "ran": ran}
