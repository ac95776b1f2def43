"""Merge step: mergekit behind a thin adapter.

`merge_models` turns (parents, method, params) into a mergekit `MergeConfiguration`, runs it
through mergekit's Python API and writes the result atomically. The mergekit YAML of each merge
is saved in the merged folder (`mergekit_config.yml`) so any merge can be re-run with
`mergekit-yaml` by hand.

What each method needs comes from mergekit's own registry (`mergekit.merge_methods`): its name,
its input contract (whether it requires, accepts or ignores a base model and how many inputs it
takes) and its parameters (scope, default, required). From that contract we derive where the
shared base goes (`base_role`), which parameters a merge id depends on (`effective_params`), and
whether the random seed matters (`uses_seed`, by running the method's kernel under two seeds).
A mergekit upgrade that registers a method makes it available here without a code change.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.core.device import resolve_device, running_step
from tasks.core.store import (
    MERGEKIT_CONFIG_FILE,
    atomic_dir,
    entry_lock,
    fingerprint_model,
    stable_hash,
    to_plain,
    verify_model,
)
from tasks.core.weights import AUTO, effective_dtype
from tasks.outputs.cards import merge_card, write_card

PRESETS = Path(__file__).resolve().parents[1] / "conf" / "merge"
N_PARENTS = 2  # Algorithm 1 merges pairs

# where the shared base goes in mergekit's config (`base_role`)
SHARED_BASE = "shared"  # the run's base model is mergekit's `base_model` (task vectors)
FIRST_PARENT = "first_parent"  # the first parent is `base_model` (SLERP: t=0 keeps it)

# mergekit options that change how a merge uses memory and time, never the merged weights (the
# shard size changes the files, not the tensors): passed through from `merge.options` and left
# out of the merge id. The step sets the rest (device from the worker, seed from the run, ...).
MEMORY_OPTIONS = (
    "lazy_unpickle",
    "low_cpu_memory",
    "out_shard_size",
    "read_to_gpu",
    "multi_gpu",
    "async_write",
    "write_threads",
)


class MethodError(ValueError):
    """A merge method, parameter or option that cannot work; the message starts with the key."""


# -- what mergekit says about its methods ---------------------------------------------------------


def merge_methods() -> tuple[str, ...]:
    """Every merge method the installed mergekit registers, by name."""
    from mergekit.merge_methods import registered_methods

    return tuple(sorted(m.spec.name for m in registered_methods()))


def method_spec(method: str) -> Any:
    """mergekit's `MergeMethodSpec` of `method` (name, input contract, parameters)."""
    from mergekit.merge_methods import registered_methods

    specs = {m.spec.name: m.spec for m in registered_methods()}
    if method not in specs:
        raise MethodError(
            f"merge.method: '{method}' is not a mergekit merge method; "
            f"choose one of {', '.join(sorted(specs))}"
        )
    return specs[method]


def _input_ids(role: str | None, n_parents: int) -> tuple[list[str], str | None]:
    parents = [f"parent{i}" for i in range(n_parents)]
    if role == SHARED_BASE:
        return ["base", *parents], "base"
    return parents, parents[0] if role == FIRST_PARENT else None


def base_role(method: str, n_parents: int = N_PARENTS, has_base: bool = True) -> str | None:
    """Where mergekit gets its `base_model` when merging `n_parents` parents with `method`.

    Tried in order against the method's own input contract: the shared base beside the parents
    (a method that requires or accepts a base: task arithmetic, TIES, DARE, model_stock,
    nuslerp's task-vector form...); else the first parent as the base (a method that requires a
    base but takes exactly two inputs: slerp, nearswap, arcee_fusion); else no base. A method
    whose contract admits none of these cannot merge the parents (passthrough takes one input):
    MethodError with mergekit's own reason.
    """
    from mergekit.merge_methods import BasePolicy

    contract = method_spec(method).contract
    takes_base = contract.base in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL)
    candidates: list[str | None] = []
    if takes_base and has_base:
        candidates.append(SHARED_BASE)
    if contract.base == BasePolicy.REQUIRED:
        candidates.append(FIRST_PARENT)
    else:
        candidates.append(None)
    reasons = []
    for role in candidates:
        ids, base_id = _input_ids(role, n_parents)
        try:
            contract.validate_ids(ids, base_id)
        except ValueError as exc:
            reasons.append(str(exc))
            continue
        return role
    raise MethodError(
        f"merge.method: {method} cannot merge {n_parents} models"
        f"{' and the shared base' if has_base and takes_base else ''} "
        f"({'; '.join(dict.fromkeys(reasons))})"
    )


def _parameters(method: str) -> dict[str, Any]:
    return {p.name: p for p in method_spec(method).parameters}


def _split(params: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    params = to_plain(params or {})
    return dict(params.get("parameters") or {}), dict(params.get("model_parameters") or {})


def check_method(
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    n_parents: int = N_PARENTS,
    has_base: bool = True,
) -> str | None:
    """Refuse, before any work, a merge mergekit would refuse or silently misread; return
    `base_role`.

    `params` holds `parameters` (the merge's, read by mergekit for every input) and
    `model_parameters` (set on each parent). Refused: an unknown method, a method that cannot
    merge `n_parents` parents (passthrough), a parameter name the method does not have (mergekit
    ignores it), a whole-merge parameter under model_parameters (mergekit never reads it there),
    a missing required parameter, and a plain value of the wrong type.
    """
    role = base_role(method, n_parents, has_base)
    if params is None:
        return role
    specs = _parameters(method)
    shared, per_model = _split(params)
    known = ", ".join(specs) or "none"
    for key, given in (("merge.parameters", shared), ("merge.model_parameters", per_model)):
        for name, value in given.items():
            spec = specs.get(name)
            if spec is None:
                raise MethodError(
                    f"{key}: '{name}' is not a parameter of {method} (its parameters: {known})"
                )
            if key == "merge.model_parameters" and spec.scope.value == "shared":
                raise MethodError(
                    f"{key}: '{name}' applies to the whole {method} merge, not to one model; "
                    "set it under merge.parameters"
                )
            # lists (gradients) and filter lists are mergekit's to evaluate per tensor
            if not isinstance(value, list | dict):
                try:
                    spec.validate(value)
                except ValueError as exc:
                    first = str(exc).splitlines()[-1].strip() if str(exc) else ""
                    raise MethodError(f"{key}.{name}: {value!r} is not valid ({first})") from None
    for name, spec in specs.items():
        if spec.required and name not in shared and name not in per_model:
            where = "merge.parameters" if spec.scope.value == "shared" else "merge.model_parameters"
            raise MethodError(f"{where}: {method} needs '{name}', which has no default")
    return role


def effective_params(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The value of each of `method`'s parameters in this merge, as mergekit resolves it: a
    parent's own setting, else the merge's, else mergekit's default. Two configs that differ
    only where mergekit does not look (a default spelled out, a value at the other level) give
    the same values, hence the same merge id."""
    shared, per_model = _split(params)
    out = {}
    for name, spec in _parameters(method).items():
        if spec.scope.value != "shared" and name in per_model:
            out[name] = per_model[name]
        elif name in shared:
            out[name] = shared[name]
        elif not spec.required:
            out[name] = to_plain(spec.default)
    return out


def _off_default(spec: Any) -> Any:
    """A float parameter moved off its default: half of it (density 1 -> 0.5 switches DARE's
    random drop on), 0.5 where there is no default."""
    default = None if spec.required else spec.default
    if isinstance(default, float | int) and not isinstance(default, bool) and default:
        return default / 2 if spec.value_type is float else default
    return 0.5 if spec.value_type is float else default


@cache
def uses_seed(method: str, n_parents: int = N_PARENTS) -> bool:
    """Whether `method`'s result depends on the random seed, measured on mergekit's own kernel.

    The method merges a tensor group twice, under two seeds (as `run_merge` seeds: random, numpy
    and torch): a 64x64 group with required parameters at 0.5 and again with every float
    parameter off its default (DARE drops at random only when density < 1), then a group of
    ~1M elements (mergekit's arcee_fusion samples only above 1M). Different results: the seed is
    part of the merge id. A method the probe cannot run counts as seeded (a needless re-merge,
    never a wrong reuse).
    """
    import numpy as np
    import torch

    try:
        role = base_role(method, n_parents)
    except MethodError:
        return False  # cannot merge the parents at all
    ids, base_id = _input_ids(role, n_parents)
    specs = method_spec(method).parameters
    required = {p.name: 0.5 for p in specs if p.required}
    moved = {p.name: v for p in specs if (v := _off_default(p)) is not None}
    # the probe reseeds the process's generators: give them back as they were
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():  # torch's CPU and CUDA generators
            return _seed_changes_result(method, ids, base_id, (required, moved))
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


def _seed_changes_result(
    method: str, ids: list[str], base_id: str | None, variants: tuple[dict[str, Any], ...]
) -> bool:
    import numpy as np
    import torch
    from mergekit.merge_methods import get, merge_tensors

    for shape, params in (((64, 64), variants), ((1024, 1040), variants[1:])):
        gen = torch.Generator().manual_seed(0)
        base = torch.randn(shape, generator=gen) * 0.02
        inputs = [base + 2e-3 * torch.randn(shape, generator=gen) for _ in ids]
        if base_id == "base":
            inputs[0] = base
        for parameters in params:
            results = []
            for seed in (0, 1):
                random.seed(seed)
                np.random.seed(seed)
                torch.manual_seed(seed)
                try:
                    results.append(
                        merge_tensors(
                            inputs,
                            get(method),
                            parameters=parameters,
                            ids=ids,
                            base_index=0 if base_id else None,
                        )
                    )
                except Exception:  # noqa: BLE001 - unknown behaviour counts as seeded
                    return True
            if not torch.equal(*results):
                return True
    return False


# -- config ---------------------------------------------------------------------------------------


def preset(method: str) -> dict[str, Any]:
    """A method's parameters as conf/merge/<method>.yaml sets them (the one place they live),
    e.g. the paper's layer-gradient SLERP for `slerp`; none for a method without a preset."""
    method_spec(method)
    path = PRESETS / f"{method}.yaml"
    cfg = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return {
        "parameters": cfg.get("parameters") or {},
        "model_parameters": cfg.get("model_parameters") or {},
    }


def merge_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """`merge.options` checked against mergekit's `MergeOptions` and MEMORY_OPTIONS, with shard
    sizes such as "1B" or "500M" read as mergekit-yaml's --out-shard-size reads them."""
    from mergekit.common import parse_kmb
    from mergekit.options import MergeOptions

    out = dict(to_plain(options or {}))
    for name in out:
        if name not in MEMORY_OPTIONS:
            why = (
                "is set by the merge step"
                if name in MergeOptions.model_fields
                else "is not a mergekit option"
            )
            raise MethodError(
                f"merge.options.{name}: {why}; the options are {', '.join(MEMORY_OPTIONS)}"
            )
    if isinstance(out.get("out_shard_size"), str):
        try:
            out["out_shard_size"] = parse_kmb(out["out_shard_size"])
        except ValueError:
            raise MethodError(
                f"merge.options.out_shard_size: {out['out_shard_size']!r} is not a size "
                "such as 500M or 5B"
            ) from None
    try:
        MergeOptions(**out)
    except ValueError as exc:
        raise MethodError(f"merge.options: {str(exc).splitlines()[1:3]}") from None
    return out


def build_merge_config(
    parents: Sequence[Path],
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    base: Path | None = None,
    dtype: str = AUTO,
) -> dict[str, Any]:
    """The mergekit YAML (as a dict) for merging `parents` with `method`.

    `params` holds `parameters` (global mergekit parameters) and `model_parameters` (applied to
    every parent); `base_role` says whether `base` or the first parent is mergekit's
    `base_model` (for SLERP the first parent: t=0 keeps it). mergekit computes and writes in
    `dtype` (it writes in `dtype` when no `out_dtype` is set); `auto`: the parents' stored dtype
    (tasks.core.weights.effective_dtype).
    """
    if len(parents) < 2:
        raise MethodError(f"a merge needs at least two parents, got {len(parents)}")
    params = dict(preset(method) if params is None else params)
    role = check_method(method, params, n_parents=len(parents), has_base=base is not None)
    global_params, model_params = _split(params)
    paths = [str(Path(p).resolve()) for p in parents]

    dtype = effective_dtype(dtype, parents)
    config: dict[str, Any] = {"merge_method": method, "dtype": dtype}
    models = []
    for path in paths:
        entry: dict[str, Any] = {"model": path}
        if model_params:
            entry["parameters"] = dict(model_params)
        models.append(entry)
    if role == FIRST_PARENT:
        config["base_model"] = paths[0]
    elif role == SHARED_BASE:
        config["base_model"] = str(Path(base).resolve())  # type: ignore[arg-type]
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
    dtype: str = AUTO,
    device: str = "cpu",
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
) -> Path:
    """Merge `parents` into `out_dir` (written atomically) and return `out_dir`.

    mergekit computes on `device` (`auto`: CUDA when this worker has it); `options` are
    mergekit's memory options (MEMORY_OPTIONS), e.g. `{lazy_unpickle: true, out_shard_size: 1B}`.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = build_merge_config(parents, method, params, base=base, dtype=dtype)
    merge_config = MergeConfiguration.model_validate(config)
    torch_device = resolve_device(device)
    run_options = MergeOptions(
        **merge_options(options),
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
        run_merge(merge_config, str(tmp), run_options)
        (tmp / MERGEKIT_CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        _modes_like(tmp, tmp / MERGEKIT_CONFIG_FILE)
        # the card (README.md) is outside the weights fingerprint; the run rewrites it later
        write_card(tmp, merge_card(config, out_dir.name))
        fingerprint_model(tmp)
    return out_dir


def _modes_like(folder: Path, reference: Path) -> None:
    """mergekit writes each weight shard to a private temporary file (mode 0600) and renames it:
    give every file the mode `reference`, written with a plain open(), got from the umask (0644
    under the usual 022), so a worker or teammate sharing the store can read the weights."""
    mode = reference.stat().st_mode & 0o777
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode)


def merge_identity(
    parent_fingerprints: Sequence[str],
    method: str,
    params: Mapping[str, Any] | None,
    *,
    base_fingerprint: str | None,
    dtype: str,
    seed: int,
) -> str:
    """Content address of a merge: same parents, method and effective parameters -> same id.

    The shared base counts only where mergekit uses it, the seed only where the method's result
    depends on it; mergekit's memory options and the device are left out. `dtype` is the
    effective one (`auto` resolved): `auto` read as bfloat16 and an explicit bfloat16 are one
    merge.
    """
    if dtype == AUTO:
        raise ValueError("merge_identity: resolve dtype 'auto' first (tasks.core.weights)")
    role = base_role(method, len(parent_fingerprints), base_fingerprint is not None)
    return stable_hash(
        {
            "parents": list(parent_fingerprints),
            "method": method,
            "params": effective_params(method, preset(method) if params is None else params),
            "base": base_fingerprint if role == SHARED_BASE else None,
            "dtype": dtype,
            "seed": seed if uses_seed(method, len(parent_fingerprints)) else None,
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
    options: dict[str, Any] | None = None,
    verify: str = "stat",
) -> dict[str, Any]:
    """Merge into the content-addressed `out_dir` unless a verified entry is already there.

    The store is the cache of merges (it is what DVC versions), so an entry that fails
    verification is rebuilt instead of trusted. `verify` (store.verify): `stat` re-hashes an
    entry only when its stat key changed, `full` always.
    """
    out = Path(out_dir)
    # two runs sharing a store must not write the same entry at once: the second waits, then
    # finds the first one's verified entry
    with entry_lock(out):
        note = None
        if out.exists():
            if (out / MERGEKIT_CONFIG_FILE).is_file() and verify_model(out, full=verify == "full"):
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
            options=options,
        )
        return {
            "merge_id": merge_id,
            "fingerprint": fingerprint_model(out),
            "reused": False,
            "rebuilt": note is not None,
        }


# -- Prefect task ---------------------------------------------------------------------------------


# the store is the merge cache (verified on reuse), so Prefect caches nothing here
@task(name="merge", cache_policy=NO_CACHE, persist_result=False)
def merge_task(request: dict[str, Any], threads: int = 1) -> dict[str, Any]:
    """`merge_or_reuse(**request)` with the step's share of the cores; `ran` says where and how
    long."""
    with running_step("merge", threads, resolve_device(request["device"])) as ran:
        result = merge_or_reuse(**request)
    return {**result, "ran": ran}
