"""Bad inputs fail early with one clear error and leave nothing behind; a failed write leaves no
partial model."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tasks.core.store import PARTIAL_PREFIX, fingerprint_model, verify_model
from tasks.fetch import ModelInputError, ResolvedModel, preflight, resolve
from tasks.lmeval import check_tasks
from tests.conftest import ROOT, run_evolve


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "fingerprint.json").unlink(missing_ok=True)
    return dst


def _resolved(path: Path) -> ResolvedModel:
    return ResolvedModel(path.name, str(path), str(path), fingerprint_model(path), "local")


def _edit_weights(folder: Path, edit) -> Path:  # noqa: ANN001 - a small test helper
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    edit(tensors)
    save_file(tensors, str(weights))
    (folder / "fingerprint.json").unlink(missing_ok=True)
    return folder


@pytest.fixture
def models(micro_zoo: Path, tmp_path: Path) -> dict[str, Path]:
    return {
        "base": micro_zoo / "base",
        "add": micro_zoo / "add",
        "copy": _copy(micro_zoo / "rev", tmp_path / "rev"),
    }


def _nothing_written(root: Path) -> None:
    """Only Hydra's record of the attempt (its config and log) may exist: no data, no store, no
    MLflow database, no results."""
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
    hydra_only = [
        p
        for p in written
        if p.split("/")[:1] != ["results"]
        or "/.hydra" in p
        or p.endswith(".log")
        or p.count("/") < 2
    ]
    assert written == hydra_only, written
    assert not (root / "data").exists() and not (root / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("foundation", "expected"),
    [
        ("/nonexistent/model", "model folder not found"),
        ("someorg/some-model", "not in the local Hugging Face cache"),
    ],
)
def test_missing_path_or_offline_hub_id_fails_in_seconds(
    micro_zoo: Path, tmp_path: Path, foundation: str, expected: str
) -> None:
    root = tmp_path / "run"
    result = run_evolve(root, micro_zoo, f"models.foundations=[zoo:add,{foundation}]")
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    _nothing_written(root)


def test_pickle_only_and_remote_code_are_refused_unless_allowed(models, tmp_path: Path) -> None:
    pickled = _copy(models["add"], tmp_path / "pickled")
    tensors = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(tensors, pickled / "pytorch_model.bin")
    with pytest.raises(ModelInputError, match="allow_pickle"):
        resolve(str(pickled), root=tmp_path)
    assert resolve(str(pickled), root=tmp_path, allow_pickle=True).source == "local"

    remote = _copy(models["add"], tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelInputError, match="trust_remote_code"):
        resolve(str(remote), root=tmp_path)


def test_truncated_safetensors_names_the_file(models) -> None:
    weights = models["copy"] / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelInputError, match=str(weights)):
        preflight(_resolved(models["base"]), [_resolved(models["add"]), _resolved(models["copy"])])


def test_shape_mismatch_names_the_tensor(models) -> None:
    name = "model.layers.0.mlp.up_proj.weight"

    def widen(t: dict[str, torch.Tensor]) -> None:
        t[name] = torch.cat([t[name], t[name][:, :1]], dim=1).contiguous()

    _edit_weights(models["copy"], widen)
    with pytest.raises(ModelInputError, match=name):
        preflight(_resolved(models["base"]), [_resolved(models["add"]), _resolved(models["copy"])])


def test_other_architecture_is_refused(models) -> None:
    config = json.loads((models["copy"] / "config.json").read_text())
    config["architectures"], config["model_type"] = ["MistralForCausalLM"], "mistral"
    (models["copy"] / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelInputError, match="MistralForCausalLM"):
        preflight(_resolved(models["base"]), [_resolved(models["add"]), _resolved(models["copy"])])


def test_vocab_mismatch_follows_the_policy(models) -> None:
    def grow(t: dict[str, torch.Tensor]) -> None:
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            t[k] = torch.cat([t[k], torch.zeros(4, t[k].shape[1])]).contiguous()

    _edit_weights(models["copy"], grow)
    pair = [_resolved(models["add"]), _resolved(models["copy"])]
    preflight(_resolved(models["base"]), pair, vocab_mismatch="shared_rows")
    with pytest.raises(ModelInputError, match="embed_tokens|lm_head"):
        preflight(_resolved(models["base"]), pair, vocab_mismatch="error")


def test_nan_weights_are_refused(models) -> None:
    name = "model.layers.1.self_attn.q_proj.weight"

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[name][0, 0] = math.nan

    _edit_weights(models["copy"], poison)
    with pytest.raises(ModelInputError, match=f"{name}.*NaN"):
        preflight(_resolved(models["base"]), [_resolved(models["add"]), _resolved(models["copy"])])


def test_same_model_twice_is_refused(models, tmp_path: Path) -> None:
    twin = _copy(models["add"], tmp_path / "twin")
    with pytest.raises(ModelInputError, match="same model"):
        preflight(_resolved(models["base"]), [_resolved(models["add"]), _resolved(twin)])


def test_unknown_eval_task_is_named(micro_zoo: Path) -> None:
    with pytest.raises(ValueError, match="zoo_nope"):
        check_tasks(["zoo_add", "zoo_nope"], micro_zoo / "tasks")


def test_k_larger_than_population_fails_before_work(micro_zoo: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    result = run_evolve(root, micro_zoo, "strategy.k=9")
    assert result.returncode == 2 and "strategy.k" in result.stderr
    _nothing_written(root)


DISK_FULL = """
import resource, signal, sys
from pathlib import Path
from tasks.merge import merge_models
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), int(sys.argv[4])))
merge_models([Path(sys.argv[1]), Path(sys.argv[2])], Path(sys.argv[3]), "slerp")
"""


def test_disk_full_during_merge_leaves_no_partial_model(models, tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = store / "merged"
    a, b = str(models["add"]), str(models["copy"])
    size = (models["add"] / "model.safetensors").stat().st_size
    failed = subprocess.run(
        [sys.executable, "-c", DISK_FULL, a, b, str(out), str(size // 3)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode != 0
    assert "File too large" in failed.stderr or "Errno 27" in failed.stderr, failed.stderr[-2000:]
    assert not out.exists()
    assert not [p for p in store.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    # the next attempt, with room, completes
    again = subprocess.run(
        [sys.executable, "-c", DISK_FULL, a, b, str(out), str(size * 100)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert verify_model(out)


def test_corrupted_store_entry_is_rebuilt_not_used(models, tmp_path: Path) -> None:
    from tasks.merge import merge_or_reuse

    out = tmp_path / "store" / "entry"
    args = ("id1", [str(models["add"]), str(models["copy"])], str(out), "slerp")
    rest = ({"parameters": {"t": 0.5}, "model_parameters": {}}, None, "float32", "cpu", 0)
    first = merge_or_reuse(*args, *rest)
    assert not first["reused"]
    assert merge_or_reuse(*args, *rest)["reused"]
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # flip bits in the last tensor, keeping size and name
    weights.write_bytes(bytes(data))
    third = merge_or_reuse(*args, *rest)
    assert third["rebuilt"] and not third["reused"]
    assert third["fingerprint"] == first["fingerprint"]


@pytest.mark.parametrize(
    ("override", "line"),
    [
        (
            "strategy.kk=3",
            "config error: strategy.kk: no such key "
            "(did you mean strategy.k? a new key is added with +strategy.kk=3)",
        ),
        (
            "merge=frankenmerge",
            "config error: In 'config': Could not find 'merge/frankenmerge'; Available options "
            "in 'merge': arcee_fusion, breadcrumbs,",
        ),
    ],
)
def test_a_mistyped_key_or_option_is_one_line(override: str, line: str, tmp_path: Path) -> None:
    """Hydra refuses these before the run starts (7 lines and exit 1 of its own): one line and
    exit 2, like every config error."""
    root = tmp_path / "run"
    result = run_evolve(root, tmp_path / "zoo", override)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(line), result.stderr
    assert not root.exists()


def test_a_damaged_mlflow_store_is_one_line_and_touched_by_nothing(tmp_path: Path) -> None:
    """A truncated mlflow.db (a half-copied or half-restored file) is refused before any work
    with the remedy; the file stays as it was and nothing else is written."""
    from mlflow.tracking import MlflowClient

    made = tmp_path / "made.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{made}")
    client.create_run(client.create_experiment("made", artifact_location=tmp_path.as_uri()))
    root = tmp_path / "run"
    root.mkdir()
    damaged = made.read_bytes()[: made.stat().st_size // 2]
    (root / "mlflow.db").write_bytes(damaged)
    result = run_evolve(root, tmp_path / "zoo", "+experiment=greedy")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(
        f"error: the MLflow store {root / 'mlflow.db'} is damaged (database disk image is "
        "malformed): restore it (`dvc checkout mlflow.db` where DVC tracks it) or move it aside"
    ), result.stderr
    assert (root / "mlflow.db").read_bytes() == damaged
    assert sorted(p.name for p in root.iterdir()) == ["mlflow.db", "results"]  # Hydra's record
    assert not (tmp_path / "zoo").exists()
