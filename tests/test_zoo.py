"""The embedded zoo (micro config) and the lm-eval evaluator on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from tasks.core.store import hash_weights, weight_files
from tests.conftest import ROOT, compose_config


@pytest.fixture(scope="module")
def micro_cfg() -> dict:
    return OmegaConf.to_container(compose_config("+debug=micro").zoo, resolve=True)


@pytest.fixture(scope="module")
def manifest(micro_zoo: Path) -> dict:
    from tasks.zoo.build import load_manifest

    return load_manifest(micro_zoo)


def _models(manifest: dict) -> dict[str, str]:
    return {"base": manifest["base"], **manifest["foundations"]}


def test_layout_and_manifest(micro_zoo: Path, manifest: dict, micro_cfg: dict) -> None:
    from tasks.zoo.build import config_hash

    assert manifest["config_hash"] == config_hash(micro_cfg)
    assert manifest["base"] == "base"
    assert len(manifest["foundations"]) >= 3
    assert manifest["tasks"] == [f"zoo_{s}" for s in manifest["foundations"]]
    for folder in _models(manifest).values():
        files = {p.name for p in (micro_zoo / folder).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    task_dir = micro_zoo / manifest["task_dir"]
    for task in manifest["tasks"]:
        cfg = yaml.safe_load((task_dir / f"{task}.yaml").read_text())
        assert cfg["task"] == task and cfg["output_type"] == "multiple_choice"
        data_file = cfg["dataset_kwargs"]["data_files"]["test"]
        assert not Path(data_file).is_absolute()  # the zoo folder can move
        rows = [json.loads(line) for line in (task_dir / data_file).read_text().splitlines()]
        assert rows and len(rows) <= micro_cfg["eval"]["n_items"]
    assert not [p for p in micro_zoo.parent.iterdir() if p.name.startswith(".partial-")]


def test_models_load_with_auto_classes(micro_zoo: Path, manifest: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("base", next(iter(manifest["foundations"]))):
        folder = micro_zoo / _models(manifest)[name]
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
        assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        ids = tokenizer("add 1+2=", return_tensors="pt").input_ids
        assert tokenizer.decode(ids[0], skip_special_tokens=True) == "add 1+2="
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_build_is_idempotent(micro_zoo: Path, manifest: dict, micro_cfg: dict) -> None:
    from tasks.zoo.build import build_zoo

    before = {p: p.stat().st_mtime_ns for p in weight_files(micro_zoo / "base")}
    again = build_zoo(micro_zoo, micro_cfg, progress=False)
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in weight_files(micro_zoo / "base")} == before


def test_build_is_deterministic(micro_zoo: Path, manifest: dict, micro_cfg: dict, tmp_path) -> None:
    """A second build with the same seed and threads per model, in another number of processes
    (sequential if the fixture's fine-tunes ran in parallel, else two), gives the same bytes."""
    from tasks.core.store import FINGERPRINT_FILE
    from tasks.zoo.build import build_zoo

    workers = 1 if manifest["workers"] > 1 else 2
    other = tmp_path / "zoo"
    second = build_zoo(
        other, {**micro_cfg, "quality_check": False, "workers": workers}, progress=False
    )
    assert second["workers"] == workers and second["config_hash"] == manifest["config_hash"]
    assert second["train_loss"] == manifest["train_loss"]
    for name, folder in _models(manifest).items():
        assert hash_weights(other / _models(second)[name]) == hash_weights(micro_zoo / folder)

    def built(zoo: Path) -> list[Path]:
        # fetch writes fingerprint.json into a zoo model on first use: not the build's
        return sorted(
            p.relative_to(zoo) for p in zoo.rglob("*") if p.is_file() and p.name != FINGERPRINT_FILE
        )

    files = built(micro_zoo)
    assert files == built(other)
    for rel in files:
        if rel.name != "manifest.json":
            assert (other / rel).read_bytes() == (micro_zoo / rel).read_bytes(), rel


def test_zoo_identity_has_threads_not_workers(micro_cfg: dict, tmp_path) -> None:
    """The thread count per model changes a zoo's bytes, the number of processes does not."""
    from tasks.core.errors import InputError
    from tasks.zoo.build import build_zoo, config_hash

    same = config_hash(micro_cfg)
    assert config_hash({**micro_cfg, "workers": 7}) == same
    assert config_hash({**micro_cfg, "threads": 2}) != same
    with pytest.raises(InputError, match="zoo.workers"):
        build_zoo(tmp_path / "zoo", {**micro_cfg, "workers": "many"}, progress=False)


def test_evaluate_scores(micro_zoo: Path, manifest: dict, micro_cfg: dict, monkeypatch) -> None:
    from tasks.evaluate import evaluate_model

    # relative data_files must resolve against the YAML's folder, not the cwd
    monkeypatch.chdir(micro_zoo.parent)
    task_dir = micro_zoo / manifest["task_dir"]
    skill = next(iter(manifest["foundations"]))
    results = {
        name: evaluate_model(micro_zoo / _models(manifest)[name], manifest["tasks"], task_dir)
        for name in ("base", skill)
    }
    for res in results.values():
        assert set(res["scores"]) == set(manifest["tasks"])
        assert all(0.0 <= s <= 1.0 for s in res["scores"].values())
        assert res["avg"] == pytest.approx(sum(res["scores"].values()) / len(res["scores"]))
        assert all(0 < n <= micro_cfg["eval"]["n_items"] for n in res["n_samples"].values())
    task = f"zoo_{skill}"
    assert results[skill]["scores"][task] > results["base"]["scores"][task]


def test_evaluate_rejects_unknown_task(micro_zoo: Path, manifest: dict) -> None:
    from tasks.evaluate import evaluate_model

    with pytest.raises(ValueError, match=r"zoo_nope.*zoo_"):
        evaluate_model(micro_zoo / "base", ["zoo_nope"], micro_zoo / manifest["task_dir"], limit=1)


def test_every_skill_answers_right_and_wrong_in_the_zoo_vocabulary(micro_cfg: dict) -> None:
    """Each skill (the wide zoo's rot and max too) gives correct answers by its rule and
    multiple-choice items whose wrong answers differ, all in the zoo's character vocabulary."""
    import random

    from tasks.zoo.build import CHARS, SKILLS, SkillData, held_out_items

    data = SkillData(micro_cfg["data"], random.Random(0))
    rules = {
        "add": lambda p: str(sum(int(n) for n in p[4:-1].split("+"))),
        "rev": lambda p: p[4:-1][::-1],
        "srt": lambda p: "".join(sorted(p[4:-1])),
        "kb": lambda p: data.facts[p[3:-1]],
        "rot": lambda p: p[5:-1] + p[4],
        "max": lambda p: max(p[4:-1].split()),
    }
    assert set(rules) == set(SKILLS)
    rng = random.Random(1)
    for skill in SKILLS:
        for _ in range(50):
            prompt, answer = data.sample(skill, rng)
            assert answer == rules[skill](prompt), (skill, prompt, answer)
            assert set(prompt + answer) <= set(CHARS)
        for item in held_out_items(data, skill, 20, 4, rng):
            assert len(set(item["choices"])) == 4
            assert item["choices"][item["label"]] == rules[skill](item["prompt"])


@pytest.mark.slow
def test_zoo_command_prints_its_quality_bar_and_no_library_lines(tmp_path) -> None:
    """`python -m flows.zoo` as a user runs it (the micro zoo with its quality check on): the
    scores and the PASS lines on the terminal, mergekit's and lm-eval's lines only in the log."""
    zoo = tmp_path / "zoo"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.zoo",
            "+debug=micro",
            "zoo.quality_check=true",
            f"paths.zoo_dir={zoo}",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shown = done.stdout + done.stderr
    assert f"zoo at {zoo}" in shown and "gen-1 SLERP merge" in shown
    assert "each foundation beats the base on its own skill" in shown  # PASS, or FAIL at micro
    for library in ("mergekit", "lm_eval", "Writing shard"):
        assert library not in shown, library
    assert "Writing shard" in (tmp_path / "out" / "zoo.log").read_text()
