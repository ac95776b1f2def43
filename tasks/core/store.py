"""Content-addressed storage helpers: fingerprints and atomic folder writes.

Every large artifact (model folders, the zoo) is written under a temporary name beside its
final place and renamed into place only when complete, so a crash never leaves a half-written
folder that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

PARTIAL_PREFIX = ".partial-"
FINGERPRINT_FILE = "fingerprint.json"
MERGEKIT_CONFIG_FILE = "mergekit_config.yml"  # a merge's recipe, beside its weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def to_plain(obj: Any) -> Any:
    """OmegaConf containers and tuples -> plain dicts and lists (for hashing, YAML, mergekit)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, DictConfig | ListConfig):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash a JSON-able object independent of key order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in Path(model_dir).iterdir() if p.name.endswith(WEIGHT_SUFFIXES))


def hash_weights(model_dir: Path, chunk: int = 1 << 24) -> str:
    """Fingerprint of a model's weights: sha256 over every weight file's name and bytes."""
    digest = hashlib.sha256()
    files = weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {model_dir}")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()[:16]


def stat_key(model_dir: Path) -> str:
    """What a re-run compares instead of the bytes: each weight file's name, size, mtime (ns)
    and inode. A rewrite changes the mtime; a file renamed into place, a copy, `dvc checkout` or
    `dvc pull` (and DVC relinking a file to its cache) changes the inode."""
    rows = []
    for path in weight_files(Path(model_dir)):
        st = path.stat()
        rows.append((path.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return stable_hash(rows)


# stat keys remembered per model beside the latest: DVC's `repro` swaps each store file for a
# private copy (a new inode) and relinks it to its cache object afterwards (the old inode, mtime
# and size, bytes the entry already hashed to its fingerprint): the returning key is trusted
# without a second re-hash of the store
KEPT_STAT_KEYS = 4


def _trusted_keys(recorded: Mapping[str, Any]) -> list[str]:
    """The stat keys under which these weights hashed to the recorded fingerprint, latest first."""
    keys = [recorded.get("stat_key"), *(recorded.get("earlier_stat_keys") or [])]
    return [k for k in keys if isinstance(k, str)]


def _record_fingerprint(
    model_dir: Path, fingerprint: str, key: str, earlier: Sequence[str] = ()
) -> None:
    record: dict[str, Any] = {"fingerprint": fingerprint, "stat_key": key}
    kept = [k for k in earlier if k != key][: KEPT_STAT_KEYS - 1]
    if kept:
        record["earlier_stat_keys"] = kept
    try:
        write_json_atomic(Path(model_dir) / FINGERPRINT_FILE, record)
    except OSError:
        pass  # read-only model folders (hub cache) still get a fingerprint


def _recorded(model_dir: Path) -> dict[str, Any]:
    try:
        recorded = json.loads((Path(model_dir) / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) and "fingerprint" in recorded else {}


def known_fingerprint(model_dir: Path) -> str | None:
    """The fingerprint recorded beside these weights while their stat key is one it was
    recorded under; None when a file changed since, or none was recorded. Reads no weight."""
    try:
        key = stat_key(Path(model_dir))
    except OSError:
        return None
    recorded = _recorded(Path(model_dir))
    return str(recorded["fingerprint"]) if key in _trusted_keys(recorded) else None


def folder_digest(folder: Path) -> str:
    """The content of a folder's files (not its subfolders): what defines a local benchmark,
    wherever it lives. For small folders (task configs and data): every byte is read."""
    files = sorted(p for p in Path(folder).glob("*") if p.is_file())
    return stable_hash({p.name: p.read_bytes().hex() for p in files})


def fingerprint_model(model_dir: Path) -> str:
    """Weights fingerprint, memoised in the folder by its stat key (`stat_key`).

    Hashing 14 GB of 7B weights takes about a minute; the sidecar makes re-runs instant while
    still noticing any rewritten, replaced or checked-out file.
    """
    model_dir = Path(model_dir)
    key = stat_key(model_dir)  # before hashing: a file changed meanwhile is hashed again later
    recorded = _recorded(model_dir)
    if key in _trusted_keys(recorded):
        return str(recorded["fingerprint"])
    fingerprint = hash_weights(model_dir)
    _record_fingerprint(model_dir, fingerprint, key)
    return fingerprint


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` only if the block succeeds,
    else remove it: readers never see half a file."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{PARTIAL_PREFIX}{final.name}.{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: Mapping[str, Any] | list[Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; rename it to `final` only if the block succeeds.

    The temporary folder lives on the same filesystem (same parent) so the rename is atomic.
    On any error it is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{PARTIAL_PREFIX}{final.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def own_copies(path: Path) -> list[Path]:
    """Give each linked file at or under `path` (a hard link or a symlink, as DVC's `cache.type`
    makes them) a copy of its own, renamed into place; return those files.

    `dvc unprotect`, for the outputs that libraries rewrite in place (SQLite's mlflow.db,
    Prefect's result files, MLflow's artifacts): written through a link, those bytes would
    change DVC's cache object too. The store needs none: every write there is a new file renamed
    into place, which replaces the link and leaves the cache as it was.
    """
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    copied = []
    for file in files:
        if not (file.is_symlink() or file.stat().st_nlink > 1):
            continue
        with atomic_file(file) as tmp:
            shutil.copyfile(file, tmp)
            os.chmod(tmp, 0o644)  # DVC leaves linked files read-only
        copied.append(file)
    return copied


def entry_lock(final: Path) -> FileLock:
    """The lock a writer of `final` holds (see tasks.merge); a partial folder whose lock is free
    belongs to a writer that died."""
    final = Path(final)
    return FileLock(str(final.parent / f".{final.name}.lock"))


def _being_written(partial: Path) -> bool:
    final_name = partial.name.removeprefix(PARTIAL_PREFIX).rsplit(".", 1)[0]
    try:
        with entry_lock(partial.parent / final_name).acquire(timeout=0):
            return False
    except Timeout:
        return True


def remove_partials(folder: Path) -> list[Path]:
    """Delete leftovers of interrupted atomic writes directly under `folder` (never the folder
    another live process is writing)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if not path.name.startswith(PARTIAL_PREFIX) or _being_written(path):
            continue
        removed.append(path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


VERIFY_MODES = ("stat", "full")  # store.verify


def verify_model(model_dir: Path, full: bool = True) -> bool:
    """True when the folder's weights still hash to the fingerprint recorded when it was written.

    `full` re-hashes every byte. Otherwise (`store.verify: stat`) an entry whose stat key still
    matches the recorded one is trusted without reading it: a truncated or rewritten file keeps
    its name but not its mtime or inode, so only a changed key costs a re-hash, which, when it
    passes, records the new key (after a `dvc pull` or `dvc checkout`, once).
    """
    model_dir = Path(model_dir)
    recorded = _recorded(model_dir)
    if not recorded:
        return False
    trusted = _trusted_keys(recorded)
    try:
        key = stat_key(model_dir)
        if not full and key in trusted:
            return True
        if hash_weights(model_dir) != recorded["fingerprint"]:
            return False
    except OSError:
        return False
    if recorded.get("stat_key") != key:
        _record_fingerprint(model_dir, str(recorded["fingerprint"]), key, trusted)
    return True
