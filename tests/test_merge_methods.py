"""Every merge method mergekit registers, merged on two micro-zoo models (the zoo base beside them
where the method takes one) or refused at validation with mergekit's own reason.

The method list is read from mergekit's registry when the tests are collected, so a mergekit
upgrade that registers a method adds it here by itself. Merges of the micro zoo take about 0.1 s
each; the cost is the session's micro zoo, shared with the other test files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from flows.run.schema import ConfigError, validate
from tasks.core.store import verify_model
from tasks.merge import (
    FIRST_PARENT,
    MERGEKIT_CONFIG_FILE,
    SHARED_BASE,
    MethodError,
    base_role,
    check_method,
    effective_params,
    merge_identity,
    merge_methods,
    merge_models,
    merge_or_reuse,
    method_spec,
    preset,
    uses_seed,
)
from tests.conftest import compose_config, run_evolve

PARENTS = ("add", "rev")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _pair_refusal(method: str) -> str | None:
    """mergekit's own reason why `method` cannot take two plain inputs, if it cannot."""
    try:
        method_spec(method).contract.validate_ids(["parent0", "parent1"], None)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("method", merge_methods())
def test_every_registered_method_merges_a_pair_or_is_refused(
    method: str, micro_zoo: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    parents = [micro_zoo / name for name in PARENTS]
    base = micro_zoo / "base"
    params = preset(method)  # conf/merge/<method>.yaml: one per method
    try:
        role = check_method(method, params)
    except MethodError as exc:
        # only a method whose contract admits no pair may be refused, and with mergekit's reason
        reason = _pair_refusal(method)
        assert reason is not None, f"{method} refused without a contract reason: {exc}"
        assert str(exc).startswith(f"merge.method: {method} cannot merge 2 models")
        assert reason in str(exc)
        with pytest.raises(ConfigError) as refused:
            validate(compose_config(f"merge.method={method}"))
        assert str(refused.value) == str(exc)
        return

    out = merge_models(parents, tmp_path / method, method, params, base=base)
    assert verify_model(out)
    assert (out / MERGEKIT_CONFIG_FILE).is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0

    merged = _weights(out)
    a, b, z = (_weights(p) for p in (*parents, base))
    assert set(merged) == set(a)
    assert all(merged[k].shape == a[k].shape and torch.isfinite(merged[k]).all() for k in merged)
    # a merge, not a copy of either parent or of the base
    for name, other in (("first parent", a), ("second parent", b), ("base", z)):
        assert any(not torch.equal(merged[k], other[k]) for k in merged), f"equals the {name}"
    if role == SHARED_BASE:
        assert Path(_config(out)["base_model"]) == base.resolve()
    elif role == FIRST_PARENT:
        assert Path(_config(out)["base_model"]) == parents[0].resolve()
    else:
        assert "base_model" not in _config(out)


def _config(folder: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((folder / MERGEKIT_CONFIG_FILE).read_text())


def _after_seed(seed: int) -> tuple[float, float]:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    return random.random(), torch.rand(1).item()


# -- the derivations from mergekit 0.1.5's registry, pinned -------------------------------------

# what our rules make of mergekit 0.1.5's input contracts; a later mergekit may move a method
ROLES_015 = {
    "slerp": FIRST_PARENT,  # requires a base, exactly two inputs: the first parent is it
    "nearswap": FIRST_PARENT,
    "arcee_fusion": FIRST_PARENT,
    "linear": None,  # ignores a base
    "karcher": None,
    "nuslerp": SHARED_BASE,  # optional base: task-vector form
    "multislerp": SHARED_BASE,
    "model_stock": SHARED_BASE,  # requires a base and at least three inputs
    "task_arithmetic": SHARED_BASE,
    "ties": SHARED_BASE,
    "dare_ties": SHARED_BASE,
    "della": SHARED_BASE,
    "breadcrumbs": SHARED_BASE,
    "sce": SHARED_BASE,
    "ram": SHARED_BASE,
}


@pytest.mark.parametrize(("method", "role"), ROLES_015.items())
def test_base_role_follows_the_input_contract(method: str, role: str | None) -> None:
    if method not in merge_methods():
        pytest.skip(f"this mergekit does not register {method}")
    assert base_role(method) == role


def test_base_role_without_a_shared_base() -> None:
    assert base_role("nuslerp", has_base=False) is None  # plain SLERP of the two
    assert base_role("slerp", has_base=False) == FIRST_PARENT
    with pytest.raises(MethodError) as err:
        base_role("model_stock", has_base=False)
    assert str(err.value) == (
        "merge.method: model_stock cannot merge 2 models "
        "(Merge method requires at least 3 inputs; got 2)"
    )


def test_passthrough_cannot_merge_a_pair() -> None:
    with pytest.raises(MethodError) as err:
        check_method("passthrough")
    assert str(err.value) == (
        "merge.method: passthrough cannot merge 2 models "
        "(Merge method requires exactly 1 inputs; got 2)"
    )


# a ~1M-element tensor makes arcee_fusion sample (it is deterministic below 1M elements)
SEEDED_015 = {"dare_ties": True, "della": True, "arcee_fusion": True}
SEEDED_015 |= {"breadcrumbs": False, "slerp": False}


@pytest.mark.parametrize(("method", "seeded"), SEEDED_015.items())
def test_seed_use_is_measured_on_the_kernel(method: str, seeded: bool) -> None:
    import random

    random.seed(7)
    torch.manual_seed(7)
    assert uses_seed.__wrapped__(method) is seeded  # measured now, not cached
    assert (random.random(), torch.rand(1).item()) == _after_seed(7)  # generators given back
    ids = {
        merge_identity(["a", "b"], method, None, base_fingerprint="z", dtype="float32", seed=s)
        for s in (0, 1)
    }
    assert len(ids) == (2 if seeded else 1)


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        (
            "slerp",
            {"parameters": {"tt": 0.5}},
            "merge.parameters: 'tt' is not a parameter of slerp (its parameters: t)",
        ),
        (
            "ties",
            {"parameters": {}, "model_parameters": {"density": 0.7}},
            "merge.model_parameters: ties needs 'weight', which has no default",
        ),
        (
            "slerp",
            {"parameters": {}},
            "merge.parameters: slerp needs 't', which has no default",
        ),
        (
            "ties",
            {"model_parameters": {"weight": 0.5, "normalize": True}},
            "merge.model_parameters: 'normalize' applies to the whole ties merge, not to one "
            "model; set it under merge.parameters",
        ),
        (
            "linear",
            {"model_parameters": {"weight": "heavy"}},
            "merge.model_parameters.weight: 'heavy' is not valid",
        ),
    ],
)
def test_bad_parameters_are_refused_with_a_reason(
    method: str, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(MethodError) as err:
        check_method(method, params)
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+merge.parameters.tt=0.5"], "merge.parameters: 'tt' is not a parameter of slerp"),
        (["merge=ties", "~merge.model_parameters.weight"], "merge.model_parameters: ties needs"),
        (["merge.options.out_shard_size=1.5B"], "merge.options.out_shard_size: '1.5B'"),
        (["+merge.options.cuda=true"], "merge.options.cuda: is set by the merge step"),
        (["+merge.options.turbo=true"], "merge.options.turbo: is not a mergekit option"),
    ],
)
def test_config_validation_refuses_before_any_work(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(*overrides))
    assert str(err.value).startswith(message), str(err.value)


def test_merge_id_depends_on_what_mergekit_reads() -> None:
    def merge_id(method: str, params: dict[str, Any], **kw: Any) -> str:
        kw = {"base_fingerprint": "z", "dtype": "float32", "seed": 0} | kw
        return merge_identity(["a", "b"], method, params, **kw)

    ties = {"parameters": {}, "model_parameters": {"weight": 0.5, "density": 0.7}}
    # a default spelled out, or a per-model value set for the whole merge: the same merge
    spelled = {
        "parameters": {"normalize": True, "lambda": 1.0},
        "model_parameters": ties["model_parameters"],
    }
    moved = {"parameters": {"weight": 0.5}, "model_parameters": {"density": 0.7}}
    assert merge_id("ties", ties) == merge_id("ties", spelled) == merge_id("ties", moved)
    assert merge_id("ties", ties) != merge_id("ties", {**ties, "parameters": {"lambda": 0.9}})
    assert effective_params("ties", ties)["normalize"] is True  # mergekit's default for TIES
    # the shared base counts only where mergekit reads it
    slerp = preset("slerp")
    assert merge_id("slerp", slerp, base_fingerprint="z") == merge_id(
        "slerp", slerp, base_fingerprint="y"
    )
    assert merge_id("ties", ties, base_fingerprint="z") != merge_id(
        "ties", ties, base_fingerprint="y"
    )


def test_shard_size_changes_the_files_not_the_tensors_nor_the_merge_id(
    micro_zoo: Path, tmp_path: Path
) -> None:
    """mergekit's out_shard_size comes from merge.options; a store entry written with one shard
    size is the same merge (same id, verified and reused) under another."""
    parents = [str(micro_zoo / name) for name in PARENTS]
    params = preset("slerp")
    merge_id = merge_identity(
        ["fa", "fb"], "slerp", params, base_fingerprint="z", dtype="float32", seed=0
    )
    request = {
        "merge_id": merge_id,
        "parents": parents,
        "method": "slerp",
        "params": params,
        "base": str(micro_zoo / "base"),
        "dtype": "float32",
        "device": "auto",  # this worker's device: cpu here, cuda on a GPU worker
        "seed": 0,
    }
    merge_or_reuse(**request, out_dir=str(tmp_path / "whole"))
    small = {"out_shard_size": "64K", "lazy_unpickle": True}
    sharded = merge_or_reuse(**request, out_dir=str(tmp_path / "sharded"), options=small)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert [p.name for p in (tmp_path / "whole").glob("*.safetensors")] == ["model.safetensors"]
    one, many = _weights(tmp_path / "whole"), _weights(tmp_path / "sharded")
    assert set(one) == set(many) and all(torch.equal(one[k], many[k]) for k in one)
    # the id never saw the options: the sharded entry is reused for the default shard size
    again = merge_or_reuse(**request, out_dir=str(tmp_path / "sharded"))
    assert again["reused"] and again["fingerprint"] == sharded["fingerprint"]


def test_a_cuda_device_on_a_cpu_worker_fails_before_merging(
    micro_zoo: Path, tmp_path: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this worker has CUDA")
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="CUDA is not available on this worker"):
        merge_models([micro_zoo / n for n in PARENTS], out, "slerp", device="cuda")
    assert not out.exists() and not list(tmp_path.iterdir())


# -- from the command line, as users type it ------------------------------------------------------


def test_a_method_is_chosen_whole_from_the_command_line(micro_zoo: Path, tmp_path: Path) -> None:
    """`merge=NAME` brings the method with its own preset (no slerp `t` left over), whose keys the
    command line sets without a `+`. The merged weights get the mode the umask gives any file
    (mergekit writes them 0600): a worker or teammate sharing the store can read them."""
    root = tmp_path / "run"
    umask = os.umask(0o022)
    try:
        result = run_evolve(
            root,
            micro_zoo,
            "merge=dare_linear",
            "merge.model_parameters.weight=0.5",
            "strategy.stop.max_generations=1",
        )
    finally:
        os.umask(umask)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = [p for p in (root / "data" / "store").iterdir() if p.is_dir()]
    assert len(entries) == 3  # generation 1: every pair of the three foundations
    for entry in entries:
        config = _config(entry)
        assert config["merge_method"] == "dare_linear" and "parameters" not in config
        assert config["models"][0]["parameters"] == {"weight": 0.5, "density": 0.7}
        modes = {p.name: p.stat().st_mode & 0o777 for p in entry.iterdir()}
        assert set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["merge=passthrough"],
            "config error: merge.method: passthrough cannot merge 2 models "
            "(Merge method requires exactly 1 inputs; got 2)",
        ),
        (
            ["merge.method=dare_linear"],
            "config error: merge.parameters: 't' is not a parameter of dare_linear (its "
            "parameters: int8_mask, normalize, rescale, lambda, weight, density) "
            "(merge.method=dare_linear keeps the parameters of the slerp preset: choose the "
            "method with merge=dare_linear)",
        ),
    ],
)
def test_a_method_is_refused_from_the_command_line_in_one_line(
    overrides: list[str], line: str, tmp_path: Path
) -> None:
    root = tmp_path / "run"
    result = run_evolve(root, tmp_path / "zoo", *overrides)  # refused before the zoo is read
    assert (result.returncode, result.stderr.splitlines()) == (2, [line]), result.stderr
    assert not (root / "data").exists() and not (root / "mlflow.db").exists()
