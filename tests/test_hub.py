"""Hub references `org/name@revision`, offline, against a cache laid out as huggingface_hub lays
it out (tests/checkpoints.py `to_hub_cache`): one fingerprint per resolved commit, uncached repos
and revisions refused with one line, and the resolved models pass the flow's preflight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tasks.fetch import ModelInputError, preflight, resolve
from tests.checkpoints import make_family, to_hub_cache

NOT_CACHED = (
    "{ref}: not in the local Hugging Face cache and the hub cannot be reached (offline or no "
    "network); download it first or point models.* at a local folder"
)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_family(tmp_path_factory.mktemp("models"), "qwen2")


@pytest.fixture
def hub_cache(
    family: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The family as three repos of a fresh HF_HUB_CACHE; repo id -> commit on main."""
    from huggingface_hub import constants

    # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported: nothing goes online
    assert constants.HF_HUB_OFFLINE
    # huggingface_hub reads HF_HUB_CACHE once, at import; snapshot_download reads this constant
    # on each call (the flow test sets the variable itself, in its own process)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    names = ["acme/qwen2-base", "acme/qwen2-ft1", "acme/qwen2-ft2"]
    return {
        repo: to_hub_cache(folder, tmp_path / "hub", repo)
        for repo, folder in zip(names, family["models"], strict=True)
    }


def test_branch_and_commit_resolve_to_one_pinned_model(
    hub_cache: dict[str, str], family: dict[str, Any], tmp_path: Path
) -> None:
    commit = hub_cache["acme/qwen2-base"]
    refs = ["acme/qwen2-base", "acme/qwen2-base@main", f"acme/qwen2-base@{commit}"]
    resolved = [resolve(ref, root=tmp_path) for ref in refs]
    snapshot = tmp_path / "hub" / "models--acme--qwen2-base" / "snapshots" / commit
    for model, ref in zip(resolved, refs, strict=True):
        assert model.ref == ref and model.source == "hub" and model.name == "qwen2-base"
        assert model.commit == commit and Path(model.path) == snapshot
    assert len({m.fingerprint for m in resolved}) == 1
    # the snapshot's files are the checkpoint's, through the blob symlinks
    for path in sorted(family["base"].iterdir()):
        linked = snapshot / path.name
        assert linked.is_symlink() and linked.read_bytes() == path.read_bytes()

    # another commit of the same repo (a `dev` branch): another model, another fingerprint
    dev = to_hub_cache(family["variants"][0], tmp_path / "hub", "acme/qwen2-base", branch="dev")
    moved = resolve("acme/qwen2-base@dev", root=tmp_path)
    assert moved.commit == dev != commit and moved.fingerprint != resolved[0].fingerprint
    assert resolve("acme/qwen2-base@main", root=tmp_path).fingerprint == resolved[0].fingerprint


@pytest.mark.parametrize(
    "ref", ["acme/not-cached", "acme/qwen2-base@v2", "acme/qwen2-base@" + "0" * 40]
)
def test_uncached_repo_or_revision_is_refused_in_one_line(
    hub_cache: dict[str, str], tmp_path: Path, ref: str
) -> None:
    with pytest.raises(ModelInputError) as err:
        resolve(ref, root=tmp_path)
    assert str(err.value) == NOT_CACHED.format(ref=ref)


def test_hub_models_pass_preflight(hub_cache: dict[str, str], tmp_path: Path) -> None:
    base = resolve("acme/qwen2-base@main", root=tmp_path)
    foundations = [
        resolve("acme/qwen2-ft1", root=tmp_path),
        resolve(f"acme/qwen2-ft2@{hub_cache['acme/qwen2-ft2']}", root=tmp_path),
    ]
    preflight(base, foundations)  # headers, architecture, tensor names and shapes, finite
    assert [m.name for m in foundations] == ["qwen2-ft1", "qwen2-ft2"]
    with pytest.raises(ModelInputError, match="same model"):
        preflight(base, [foundations[0], resolve("acme/qwen2-ft1@main", root=tmp_path)])
