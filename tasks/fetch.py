"""Fetch step: resolve a model reference to a local HF folder and a content fingerprint.

References:
- `zoo:NAME` — a model of the embedded zoo (`zoo:base`, `zoo:add`, ...);
- a local folder (absolute, or relative to the project root);
- a hub repo id `org/name` or `org/name@revision` (a branch, tag or commit), downloaded with
  huggingface_hub into its cache (HF_HUB_CACHE). Offline (HF_HUB_OFFLINE=1) only what the cache
  holds resolves: a branch or tag through the cache's refs/<name>, a commit through its snapshot
  folder. Either way the model is pinned to the resolved commit (ResolvedModel.commit), which
  its fingerprint hashes: `org/name`, `org/name@main` and `org/name@<that commit>` are one model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.core.errors import InputError
from tasks.core.store import fingerprint_model, stable_hash, write_json_atomic
from tasks.zoo.build import ZOO_REF

SAFE_WEIGHTS = ".safetensors"
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


class ModelInputError(InputError):
    """A model reference or folder that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # display name (zoo skill, folder name or repo name)
    ref: str  # the reference as configured
    path: str  # local folder, absolute
    fingerprint: str
    source: str  # zoo | local | hub
    commit: str = ""  # hub: the commit the reference resolved to


def is_zoo_ref(ref: str) -> bool:
    return ref.startswith(ZOO_REF)


def _looks_local(ref: str, root: Path) -> bool:
    return ref.startswith((".", "/", "~")) or (root / ref).exists() or Path(ref).exists()


def resolve(
    ref: str,
    *,
    root: Path,
    zoo_dir: Path | None = None,
    zoo_manifest: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> ResolvedModel:
    """Resolve one reference; raise ModelInputError early with what to fix."""
    if is_zoo_ref(ref):
        if zoo_dir is None or zoo_manifest is None:
            raise ModelInputError(f"{ref}: zoo reference but the zoo is not built")
        name = ref.removeprefix(ZOO_REF)
        folders = {"base": zoo_manifest["base"], **zoo_manifest["foundations"]}
        if name not in folders:
            raise ModelInputError(
                f"{ref}: no such zoo model; the zoo has {', '.join(sorted(folders))}"
            )
        path = (Path(zoo_dir) / folders[name]).resolve()
        check_model_folder(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        return ResolvedModel(name, ref, str(path), fingerprint_model(path), "zoo")
    if _looks_local(ref, root):
        path = Path(ref).expanduser()
        path = (path if path.is_absolute() else root / path).resolve()
        if not path.is_dir():
            raise ModelInputError(f"{ref}: model folder not found at {path}")
        check_model_folder(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        return ResolvedModel(path.name, ref, str(path), fingerprint_model(path), "local")
    return _resolve_hub(ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def _resolve_hub(ref: str, *, allow_pickle: bool, trust_remote_code: bool) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = ref.partition("@")
    patterns = HUB_PATTERNS + (["*.bin", "*.pt"] if allow_pickle else [])
    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns)
        )
    except IncompleteSnapshotError as exc:  # a subclass of the next: say what differs
        raise ModelInputError(
            f"{ref}: the cached snapshot is incomplete and the hub cannot be reached; "
            "download it again with network access"
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise ModelInputError(
            f"{ref}: not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline or no network); download it first or point models.* at a local folder"
        ) from exc
    except HFValidationError as exc:
        raise ModelInputError(f"{ref}: not a local folder nor a valid hub repo id") from exc
    except RevisionNotFoundError as exc:
        raise ModelInputError(f"{ref}: the hub has no revision '{revision}' of {repo_id}") from exc
    except GatedRepoError as exc:  # also a RepositoryNotFoundError
        raise ModelInputError(
            f"{ref}: gated on the hub; accept its terms and log in (hf auth login)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelInputError(
            f"{ref}: no such repo on the hub (or it is private and no token grants access)"
        ) from exc
    check_model_folder(folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    # huggingface_hub names the snapshot folder by the commit the revision resolved to (a
    # branch through refs/<branch>), so repo + commit pins the weights whatever was asked
    commit = folder.name
    fingerprint = stable_hash({"repo": repo_id, "commit": commit})
    return ResolvedModel(repo_id.split("/")[-1], ref, str(folder), fingerprint, "hub", commit)


def check_model_folder(path: Path, *, allow_pickle: bool, trust_remote_code: bool) -> None:
    """Refuse folders that would fail late or run untrusted code."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelInputError(f"{path}: no config.json; not a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ModelInputError(f"{config_file}: not valid JSON ({exc})") from None
    if config.get("auto_map") and not trust_remote_code:
        raise ModelInputError(
            f"{path}: this model needs remote code (config.json has auto_map); "
            "set models.trust_remote_code=true only if you trust it"
        )
    names = [p.name for p in path.iterdir()]
    if any(n.endswith(SAFE_WEIGHTS) for n in names):
        return
    if any(n.endswith(PICKLE_WEIGHTS) for n in names):
        if not allow_pickle:
            raise ModelInputError(
                f"{path}: only pickle checkpoints (*.bin/*.pt), which can run code when loaded; "
                "convert to safetensors or set models.allow_pickle=true"
            )
        return
    raise ModelInputError(f"{path}: no weight files (*.safetensors)")


# -- preflight: fail in seconds, before any merge, with what to fix ------------------------------


def _weights_header(model: ResolvedModel) -> None:
    from tasks.delta import read_header

    for path in sorted(Path(model.path).glob("*.safetensors")):
        try:
            read_header(path)
        except Exception as exc:  # any parse error means a damaged file
            raise ModelInputError(
                f"{model.ref}: {path} is truncated or corrupted ({exc}); re-download or rebuild it"
            ) from None


def _architecture(model: ResolvedModel) -> str:
    config = json.loads((Path(model.path) / "config.json").read_text())
    return ",".join(config.get("architectures") or []) or str(config.get("model_type"))


def check_finite(model: ResolvedModel, chunk_elems: int = 1 << 24) -> None:
    """Refuse NaN or Inf weights (a merge would spread them to every descendant)."""
    import numpy as np

    from tasks.delta import SafetensorsModel, decode

    reader = SafetensorsModel(Path(model.path))
    for name, info in sorted(reader.tensors.items()):
        if not info.is_float:
            continue
        for start in range(0, info.numel, chunk_elems):
            stop = min(info.numel, start + chunk_elems)
            finite = bool(np.isfinite(decode(reader.view(name, start, stop), info.dtype)).all())
            reader.release(name, start, stop)  # unmap the pages read, so memory stays flat
            if not finite:
                raise ModelInputError(
                    f"{model.ref}: tensor '{name}' in {info.file} has NaN or Inf values"
                )


def preflight(
    base: ResolvedModel,
    models: list[ResolvedModel],
    *,
    vocab_mismatch: str = "shared_rows",
    finite: bool = True,
    finite_cache: Path | None = None,
) -> None:
    """Check every model against the base before heavy work: readable weights, the same
    architecture, the same tensor names and shapes (vocabulary rows per `vocab_mismatch`),
    finite values (each model scanned once per fingerprint, remembered in `finite_cache`)."""
    from tasks.delta import SafetensorsModel, plan

    fingerprints: dict[str, str] = {}
    for model in models:
        if model.fingerprint in fingerprints:
            raise ModelInputError(
                f"models.foundations: {model.ref} and {fingerprints[model.fingerprint]} are the "
                "same model (identical weights)"
            )
        fingerprints[model.fingerprint] = model.ref
    for model in [base, *models]:
        _weights_header(model)
    base_arch = _architecture(base)
    base_reader = SafetensorsModel(Path(base.path))
    for model in models:
        arch = _architecture(model)
        if arch != base_arch:
            raise ModelInputError(
                f"{model.ref}: architecture {arch} differs from the base's {base_arch}; "
                "merging needs models fine-tuned from one base"
            )
        try:
            shared = plan(
                base_reader,
                [SafetensorsModel(Path(model.path))],
                ["base", model.ref],
                vocab_mismatch,
            )
        except ValueError as exc:
            raise ModelInputError(f"{model.ref}: {exc}") from None
        lacking = shared.missing.get(model.ref)
        if lacking:
            raise ModelInputError(
                f"{model.ref}: lacks {len(lacking)} tensors of the base, e.g. {lacking[:3]}"
            )
    if finite:
        checked = _read_finite(finite_cache)
        for model in [base, *models]:
            if model.fingerprint not in checked:
                check_finite(model)
                checked[model.fingerprint] = model.ref
        if finite_cache is not None:
            write_json_atomic(finite_cache, checked)


def _read_finite(cache: Path | None) -> dict[str, str]:
    """Fingerprints already scanned for NaN/Inf (-> the reference they were scanned as). A
    fingerprint covers the weights' bytes (a changed file is hashed again, so gets a new one), so
    a scan's result holds for as long as the fingerprint does."""
    try:
        data = json.loads(Path(cache).read_text()) if cache else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- Prefect task ---------------------------------------------------------------------------------


# fingerprints are memoised in the model folder, so fetching is cheap and needs no Prefect cache
@task(name="fetch", cache_policy=NO_CACHE, persist_result=False)
def fetch_task(ref: str, options: dict[str, Any]) -> ResolvedModel:
    """`resolve(ref, **options)` as a Prefect task."""
    return resolve(ref, **options)
