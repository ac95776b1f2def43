"""Random checkpoints of real model families for the tests (a helper, not a test file).

The builder lives in bench/families.py (the scale bench builds its large families with it); the
tests import it from here, with `to_hub_cache`, which lays a built folder out as a hub cache.
"""

from __future__ import annotations

from pathlib import Path

from bench.families import FAMILIES, TIED, TINY, make_family, make_tokenizer, zoo_corpus

__all__ = [
    "FAMILIES",
    "TIED",
    "TINY",
    "make_family",
    "make_tokenizer",
    "to_hub_cache",
    "zoo_corpus",
]


def _git_blob_sha1(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def to_hub_cache(folder: Path, cache: Path, repo_id: str, branch: str = "main") -> str:
    """Lay `folder` out in `cache` (an HF_HUB_CACHE) exactly as huggingface_hub's downloads do,
    as the repo `repo_id` at one commit on `branch`; return that commit's hash.

        models--org--name/blobs/<etag>                 each file's content, once
        models--org--name/refs/<branch>                the commit hash (no newline)
        models--org--name/snapshots/<commit>/<file>    relative symlink to ../../blobs/<etag>

    The etag is the file's sha256 for LFS files (weights) and its git blob sha1 otherwise, as
    the hub reports them. The commit hash is derived from the files, so it is deterministic.
    """
    import hashlib

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    etags = {}
    for path in files:
        data = path.read_bytes()
        lfs = path.suffix == ".safetensors"
        etags[path.name] = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
        blob = repo / "blobs" / etags[path.name]
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
    commit = hashlib.sha1(repr(sorted(etags.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, etag in etags.items():
        (snapshot / name).symlink_to(Path("..", "..", "blobs", etag))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return commit
