"""Model cards in merged folders and `flows.export`, on the shared greedy_kinship run (no new flow
run); plus the card helpers on their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.core.store import fingerprint_model, hash_weights, verify_model
from tasks.outputs.cards import (
    Lineage,
    hub_ancestors,
    hub_origin,
    public_config,
    read_front_matter,
    read_manifest,
    write_card,
)
from tasks.outputs.tables import read_outputs
from tests.conftest import ROOT

RUN = "greedy_kinship"


@pytest.fixture(scope="module")
def run_dir(evolve_root: Path, kinship_run: subprocess.CompletedProcess[str]) -> Path:
    assert kinship_run.returncode == 0, kinship_run.stderr[-4000:]
    return evolve_root / "results" / RUN


def _export(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from flows.export import main

    capsys.readouterr()  # drop what came before (e.g. transformers' loading bars)
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# -- cards in the store ---------------------------------------------------------------------------


@pytest.mark.slow
def test_every_merged_folder_has_a_card_naming_its_parents(run_dir: Path) -> None:
    rows, _ = read_outputs(run_dir)
    merged = [r for r in rows if r["role"] != "foundation"]
    assert merged
    for row in merged:
        entry = read_manifest(run_dir)[row["model"]]
        card = Path(entry.path) / "README.md"
        meta = read_front_matter(card)
        # the store entry is shared by runs: its card says which run it describes
        text = card.read_text()
        assert f"- run: `{RUN}`" in text, text[:400]
        assert meta["base_model"] == row["parents"].split(" x ")
        assert meta["base_model_relation"] == "merge"
        assert {"merge", "mergekit"} <= set(meta["tags"])
        assert meta["library_name"] == "transformers"
        assert f"- generation: {row['gen']}" in text
        assert "## Merge configuration" in text and "merge_method: slerp" in text
        assert f"{row['avg']:.4f}" in text and "Pearson correlation (pcc)" in text
        # no path of this machine: the card is publishable and the same in a clone
        assert str(run_dir.parents[1]) not in text and "/tmp" not in text
        # the card is outside the weights: the entry still verifies, its fingerprint unchanged
        assert verify_model(Path(entry.path))
        assert fingerprint_model(Path(entry.path)) == row["fingerprint"]


@pytest.mark.slow
def test_the_merge_step_writes_a_card_outside_the_fingerprint(
    micro_zoo: Path, tmp_path: Path
) -> None:
    from tasks.merge import merge_models

    parents = sorted(p for p in micro_zoo.iterdir() if (p / "config.json").is_file())[:2]
    out = merge_models(parents, tmp_path / "abc123", "linear")
    meta = read_front_matter(out / "README.md")
    assert meta["base_model"] == [p.name for p in parents]  # folder names before any run
    assert meta["base_model_relation"] == "merge" and "mergekit" in meta["tags"]
    assert "merge_method: linear" in (out / "README.md").read_text()
    assert str(micro_zoo) not in (out / "README.md").read_text()
    assert verify_model(out)
    before = fingerprint_model(out)
    write_card(out, (out / "README.md").read_text() + "\nrewritten\n")
    assert fingerprint_model(out) == before and verify_model(out)


# -- export ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_copies_a_verified_loadable_model_with_its_card(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows, _ = read_outputs(run_dir)
    # the best merge, from the latest generation on ties (its parents include a merge)
    row = max((r for r in rows if r["parents"]), key=lambda r: (r["avg"], r["gen"]))
    out = tmp_path / "best"
    code, stdout, err = _export(
        RUN, row["model"], "--to", str(out), "--root", str(run_dir.parents[1]), capsys=capsys
    )
    assert code == 0, err
    assert f"exported {row['model']}" in stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert model.num_parameters() > 0
    store = Path(read_manifest(run_dir)[row["model"]].path)
    assert hash_weights(out) == row["fingerprint"] == fingerprint_model(store)
    assert (out / "mergekit_config.yml").is_file() and not (out / "fingerprint.json").exists()
    # the exported config names the parents as the run does; the store's keeps its folders
    exported = yaml.safe_load((out / "mergekit_config.yml").read_text())
    stored = yaml.safe_load((store / "mergekit_config.yml").read_text())
    assert [m["model"] for m in exported["models"]] == row["parents"].split(" x ")
    assert all(Path(m["model"]).is_dir() for m in stored["models"])
    assert str(run_dir.parents[1]) not in (out / "mergekit_config.yml").read_text()
    assert {k: v for k, v in exported.items() if k not in ("models", "base_model")} == {
        k: v for k, v in stored.items() if k not in ("models", "base_model")
    }
    meta = read_front_matter(out / "README.md")
    assert meta["base_model"] == row["parents"].split(" x ")
    assert "shared by every run" not in (out / "README.md").read_text()  # this run's card only
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]

    # the same model by its parents (`srt x kb` style); a non-empty --to needs --force
    code, _, err = _export(run_dir.as_posix(), row["parents"], "--to", str(out), capsys=capsys)
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    code, _, err = _export(
        run_dir.as_posix(), row["parents"], "--to", str(out), "--force", capsys=capsys
    )
    assert code == 0, err
    assert hash_weights(out) == row["fingerprint"]


@pytest.mark.slow
def test_export_of_a_foundation_model(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    rows, _ = read_outputs(run_dir)
    row = next(r for r in rows if r["role"] == "foundation")
    out = tmp_path / row["model"]
    code, _, err = _export(str(run_dir), row["model"], "--to", str(out), capsys=capsys)
    assert code == 0, err
    AutoModelForCausalLM.from_pretrained(out)
    assert hash_weights(out) == row["fingerprint"]
    meta = read_front_matter(out / "README.md")
    assert "base_model" not in meta and meta["library_name"] == "transformers"


@pytest.mark.slow
def test_unknown_model_or_run_is_one_line_listing_what_exists(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows, _ = read_outputs(run_dir)
    code, _, err = _export(
        str(run_dir), "no-such-model", "--to", str(tmp_path / "x"), capsys=capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert all(r["model"] in err for r in rows)
    root = str(run_dir.parents[1])
    code, _, err = _export(
        "no-such-run", "srt", "--to", str(tmp_path / "x"), "--root", root, capsys=capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and RUN in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE"),
        # online mode but no network: a closed local port stands in for the hub
        ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach the hub"),
    ],
    ids=["offline", "no-network"],
)
def test_push_without_the_hub_is_a_one_line_error(
    run_dir: Path, tmp_path: Path, env: dict[str, str], says: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flows.export", str(run_dir), "srt", "--push", "someone/merged"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_not_a_token", **env},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert says in result.stderr


@pytest.mark.slow
def test_a_pushed_card_names_only_hub_models(run_dir: Path, tmp_path: Path) -> None:
    from flows.export import export_model

    rows, _ = read_outputs(run_dir)
    row = next(r for r in rows if r["parents"])
    export_model(run_dir, row["model"], tmp_path / "m", hub_lineage=True)
    meta = read_front_matter(tmp_path / "m" / "README.md")
    # the micro zoo has no hub model: no base_model, no relation; the body still names parents
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert all(p in (tmp_path / "m" / "README.md").read_text() for p in row["parents"].split(" x "))


# -- the card helpers on their own ----------------------------------------------------------------


def test_hub_parents_are_named_by_repo_id_and_merges_reach_their_hub_ancestors() -> None:
    snapshot = "/cache/hub/models--org--tiny-llama/snapshots/0123abcd"
    assert hub_origin(snapshot) == ("org/tiny-llama", "0123abcd")
    assert hub_origin("/data/store/1e05ad23e4adcba7") is None
    a = Lineage("tiny-llama", snapshot, "f1", "hub", hub_id="org/tiny-llama", revision="0123abcd")
    b = Lineage("kb", "/zoo/ft-kb", "f2", "zoo")
    c = Lineage("model-1-1", "/store/m11", "f3", "merge", "pair", 1, ["tiny-llama", "kb"])
    d = Lineage("model-2-1", "/store/m21", "f4", "merge", "pair", 2, ["model-1-1", "tiny-llama"])
    lineage = {m.name: m for m in (a, b, c, d)}
    assert [lineage[p].card_id() for p in c.parents] == ["org/tiny-llama", "kb"]
    assert hub_ancestors(d, lineage) == ["org/tiny-llama"]
    assert hub_ancestors(c, lineage) == ["org/tiny-llama"]


def test_public_config_names_parents_and_hides_local_paths(tmp_path: Path) -> None:
    config = {
        "merge_method": "slerp",
        "base_model": "/home/me/store/aaa",
        "models": [{"model": "/home/me/store/aaa"}, {"model": "/home/me/zoo/ft-kb"}],
        "parameters": {"t": 0.5},
    }
    public = public_config(config, ["model-1-3", "kb"])
    assert public["base_model"] == "model-1-3"
    assert [m["model"] for m in public["models"]] == ["model-1-3", "kb"]
    assert "/home/me" not in json.dumps(public) and config["models"][0]["model"].startswith("/")
    assert yaml.safe_load(yaml.safe_dump(public)) == public


def test_write_card_is_atomic_and_skips_identical_text(tmp_path: Path) -> None:
    assert write_card(tmp_path, "---\nlibrary_name: transformers\n---\n\n# x\n")
    mtime = (tmp_path / "README.md").stat().st_mtime_ns
    assert not write_card(tmp_path, "---\nlibrary_name: transformers\n---\n\n# x\n")
    assert (tmp_path / "README.md").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]
