"""Real checkpoint shapes (tests/checkpoints.py) through kinship and the whole flow.

Kinship of every family against an independent float64 computation that concatenates each
delta once (a tied embedding matrix once); tied checkpoints that also store the matrix as
lm_head.weight; and the five families of issue 11 (Llama, Mistral, Qwen2 tied, Gemma tied with
scaled embeddings, Phi-3 fused qkv) through fetch -> kinship -> merge -> evaluate for two
generations in one Hydra multirun, Qwen2 as hub references from an HF-layout cache.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tasks.core.weights import stored_dtype
from tests.checkpoints import FAMILIES, TIED, make_family, to_hub_cache
from tests.conftest import ROOT, evolve_command

FLOW_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "phi3")
HUB_FAMILY = "qwen2"  # its models go through the flow as hub references
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("families")
    return {family: make_family(root, family) for family in FAMILIES}


def _weights(folder: Path) -> dict[str, Any]:
    """Every tensor the index lists, loaded whole (the independent side: no tasks.delta)."""
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out: dict[str, Any] = {}
    for shard in sorted(set(index.values())):
        out.update(load_file(folder / shard))
    return out


def _float64_kinship(a: Path, b: Path, base: Path, embed_twice: bool = False) -> dict[str, float]:
    """PCC, CS and ED of the concatenated deltas, in float64 numpy, each tensor once. A tied
    model has one embedding matrix: its config ties lm_head to it, so a stored lm_head copy is
    not a second tensor (the family checkpoints store none; the copies test adds one).
    `embed_twice` gives the double-counted figure instead, to show the difference."""
    import numpy as np

    weights = [_weights(p) for p in (a, b, base)]
    tied = json.loads((base / "config.json").read_text())["tie_word_embeddings"]
    names = sorted(n for n in weights[2] if not (tied and n == "lm_head.weight"))
    names += [EMBED] if embed_twice else []
    x, y = (
        np.concatenate([(w[n].double() - weights[2][n].double()).numpy().ravel() for n in names])
        for w in weights[:2]
    )
    return {
        "pcc": float(np.corrcoef(x, y)[0, 1]),
        "cs": float(x @ y / np.sqrt((x @ x) * (y @ y))),
        "ed": float(np.linalg.norm(x - y)),
        "n": x.size,
    }


def _parameters(folder: Path) -> int:
    """The model's parameter count as transformers builds it (a tied matrix counts once)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


# the kinship engine's float32 blocks summed in float64 are ~1e-8 relative (tasks/kinship.py);
# counting a tied matrix twice moves PCC by ~1e-2 here (the copies test checks it does)
TOL = 1e-7


def _assert_matches(got: dict[str, Any], want: dict[str, float]) -> None:
    assert got["n_params"] == want["n"]
    assert got["pcc"] == pytest.approx(want["pcc"], abs=TOL)
    assert got["cs"] == pytest.approx(want["cs"], abs=TOL)
    assert got["ed"] == pytest.approx(want["ed"], rel=TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_kinship_matches_float64_counting_a_tied_matrix_once(
    families: dict[str, dict[str, Any]], family: str
) -> None:
    from tasks.kinship import kinship

    base, ft1, ft2 = families[family]["models"]
    got = kinship(ft1, ft2, base)
    want = _float64_kinship(ft1, ft2, base)
    _assert_matches(got, want)
    # every parameter of the model once: the tied embedding neither doubled nor missing
    assert got["n_params"] == _parameters(base)
    assert got["n_tensors"] == len(_weights(base))
    assert got["missing"] == {} and got["skipped"] == [] and got["tied"] == {}
    assert got["compared"] == {
        "n_tensors": got["n_tensors"],
        "n_params": got["n_params"],
        "skipped": {},
        "truncated": [],
    }
    assert 0.3 < got["pcc"] < 0.7  # the fixtures' designed kinship (RHO = 0.5)


def _with_tied_copy(folder: Path, out: Path) -> Path:
    """`folder` plus lm_head.weight, a copy of the tied embedding, in a shard of its own, as
    some hub checkpoints of tied models store it."""
    from safetensors.torch import save_file

    shutil.copytree(folder, out)
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    embed = _weights(folder)[EMBED]
    save_file({"lm_head.weight": embed.clone()}, out / "lm_head.safetensors")
    index["weight_map"]["lm_head.weight"] = "lm_head.safetensors"
    index_file.write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("family", sorted(TIED))
def test_stored_copy_of_a_tied_embedding_counts_once(
    families: dict[str, dict[str, Any]], family: str, tmp_path: Path
) -> None:
    from tasks.fetch import preflight, resolve
    from tasks.kinship import kinship, kinship_matrix_compared

    base, ft1, ft2 = families[family]["models"]
    base_copy = _with_tied_copy(base, tmp_path / "base")
    ft1_copy = _with_tied_copy(ft1, tmp_path / "ft1")
    ft2_copy = _with_tied_copy(ft2, tmp_path / "ft2")
    want = _float64_kinship(ft1, ft2, base)
    doubled = _float64_kinship(ft1, ft2, base, embed_twice=True)
    assert abs(doubled["pcc"] - want["pcc"]) > 100 * TOL  # the test can tell the two apart
    tied = {"lm_head.weight": EMBED}
    reason = f"tied to {EMBED}: the shared matrix is counted once"
    # a copy in one model, in the base only (the flow refused it: "lacks lm_head.weight"), in
    # all three (counted twice before)
    cases = [(ft1_copy, ft2, base), (ft1, ft2, base_copy), (ft1_copy, ft2_copy, base_copy)]
    for a, b, ref in cases:
        got = kinship(a, b, ref)
        _assert_matches(got, want)  # the copy is neither a second matrix nor "missing"
        assert got["tied"] == tied and got["missing"] == {}
        assert got["compared"]["skipped"] == {"lm_head.weight": reason}
    # the flow's checks accept a base that stores the copy and variants that do not
    models = [resolve(str(p), root=tmp_path) for p in (base_copy, ft1, ft2)]
    preflight(models[0], models[1:])
    matrix, compared = kinship_matrix_compared([ft1_copy, ft2], base_copy)
    assert matrix["pcc"][0][1] == pytest.approx(want["pcc"], abs=TOL)
    assert compared["n_params"] == want["n"] and compared["skipped"] == {"lm_head.weight": reason}


# -- the five families through the flow ----------------------------------------------------------


def _models_config(conf: Path, family: str, refs: dict[str, Any]) -> None:
    (conf / "models").mkdir(parents=True, exist_ok=True)
    config = {
        "base": str(refs["base"]),
        "foundations": [str(p) for p in refs["foundations"]],
        "allow_pickle": False,
        "trust_remote_code": False,
        "check_finite": True,
    }
    (conf / "models" / f"{family}.yaml").write_text(json.dumps(config))  # YAML reads JSON


def _tensor_names(folder: Path) -> set[str]:
    from tasks.delta import SafetensorsModel

    return set(SafetensorsModel(folder).tensors)


@pytest.mark.slow
def test_five_families_evolve_two_generations_through_the_flow(
    families: dict[str, dict[str, Any]], micro_zoo: Path, tmp_path: Path
) -> None:
    """One Hydra multirun, one job per family (`models=<family>` from a config dir added to
    Hydra's search path) sharing one process and one Prefect server; micro settings (k=2, two
    generations) scored on one zoo task: the point is the shapes, not the scores. Base + two
    variants give one merge in generation 1 and one or two (pair, exploration) in generation 2.

    Qwen2 comes from an HF-layout hub cache (a branch, a bare repo id, pinned commits) with three
    variants and three workers: its three tied foundations load at once, then its generation-1
    children as they land: two concurrent batches of tied loads, which without
    tasks.evaluate.load_model's lock failed 2 of 2 such runs (the unlocked failure rate of three
    concurrent tied loads is 44 of 50, bench/concurrent_load.py)."""
    conf, hub = tmp_path / "conf", tmp_path / "hub"
    for family in FLOW_FAMILIES:
        built = families[family]
        refs: dict[str, Any] = {"base": built["base"], "foundations": built["variants"]}
        if family == HUB_FAMILY:
            built = make_family(tmp_path / "models", family, n_variants=3)
            commits = {
                p.name: to_hub_cache(p, hub, f"acme/{family}-{p.name}") for p in built["models"]
            }
            refs = {
                "base": f"acme/{family}-base@main",
                "foundations": [
                    f"acme/{family}-ft1",
                    f"acme/{family}-ft2@{commits['ft2']}",
                    f"acme/{family}-ft3@main",
                ],
            }
        _models_config(conf, family, refs)
    cmd = evolve_command(
        tmp_path,
        micro_zoo,
        f"hydra.searchpath=[file://{conf}]",
        "models=" + ",".join(FLOW_FAMILIES),
        "+experiment=greedy_kinship",
        "eval.tasks=[zoo:add]",
        "eval.limit=10",  # ten documents are enough to load, run and score each shape
        "runtime.max_workers=3",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    )
    cmd.insert(3, "-m")
    start = time.monotonic()
    result = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "HF_HUB_CACHE": str(hub)},
    )
    print(f"five-family multirun: {time.monotonic() - start:.0f} s")  # -s shows the cost
    assert result.returncode == 0, result.stderr[-4000:]
    # mergekit's INFO line for every tied-embedding merge stays off the terminal, in the job logs
    skipped = "Skipping optional weight lm_head.weight"
    assert skipped not in result.stdout + result.stderr
    job_logs = (tmp_path / "multirun").glob("*/*.log")
    assert any(skipped in log.read_text() for log in job_logs)

    for family in FLOW_FAMILIES:
        # each job's run name carries its overrides (flows/evolve.py sweep_run_name)
        [out] = (tmp_path / "results").glob(f"greedy_kinship-models={family}-*")
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "FINISHED" and summary["generations"] == 2, family
        with (out / "results.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        foundations = [r for r in rows if r["role"] == "foundation"]
        merged = [r for r in rows if r["role"] != "foundation"]
        assert {r["gen"] for r in merged} == {"1", "2"}, family
        assert set(r for r in rows[0] if r.startswith("score_")) == {"score_zoo_add"}
        assert all(0.0 <= float(r["avg"]) <= 1.0 for r in rows)
        # every merge has its parents' kinship, from the family's real tensors
        assert all(-1.0 <= float(r["pcc"]) <= 1.0 and float(r["ed"]) > 0 for r in merged)
        assert (out / "kinship" / "gen-2-pcc.csv").is_file()
        if family == HUB_FAMILY:
            names = [f"{family}-ft{i}" for i in (1, 2, 3)]
            assert sorted(r["model"] for r in foundations) == names
            assert len([r for r in merged if r["gen"] == "1"]) == 3
            assert summary["peak_concurrent_steps"] >= 2  # tied loads did run side by side
        else:
            assert sorted(r["model"] for r in foundations) == ["ft1", "ft2"]

    # the merged folders keep each family's real layout: tied stays tied (no lm_head), Phi-3's
    # qkv and gate_up stay fused, Gemma stays Gemma (its embedding scale lives in the code)
    store = tmp_path / "data" / "store"
    by_type: dict[str, list[Path]] = {}
    for folder in sorted(p for p in store.iterdir() if (p / "config.json").is_file()):
        config = json.loads((folder / "config.json").read_text())
        by_type.setdefault(config["model_type"], []).append(folder)
    assert sorted(by_type) == sorted(FLOW_FAMILIES)
    for family in FLOW_FAMILIES:
        base = families[family]["base"]  # qwen2's hub models are built the same way
        base_config = json.loads((base / "config.json").read_text())
        for folder in by_type[family]:
            config = json.loads((folder / "config.json").read_text())
            assert config["tie_word_embeddings"] == (family in TIED)
            assert config["architectures"] == base_config["architectures"]
            assert _tensor_names(folder) == _tensor_names(base), (family, folder)
            # merge.dtype auto (the default): a bf16 family's merges are bf16 on disk
            assert stored_dtype(folder) == "bfloat16", (family, folder)
