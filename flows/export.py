"""Export or publish a model of a finished run:
`python -m flows.export RUN MODEL --to DIR [--force] [--push ORG/NAME]`.

MODEL is a name from the run's results.csv: its `model` column (`model-1-3`, or a foundation
such as `srt`) or its `parents` column (`srt x kb`). The copy gets the run's model card
(README.md) and the mergekit config, is written under a temporary name and renamed into place,
and its weights are re-hashed against the fingerprint the run recorded. `--push` uploads the copy
with huggingface_hub; offline (HF_HUB_OFFLINE=1, or no network) that is a one-line error.
Bad input prints one line and exits 2, like flows.evolve.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.core.errors import InputError
from tasks.core.store import (
    FINGERPRINT_FILE,
    MERGEKIT_CONFIG_FILE,
    PARTIAL_PREFIX,
    atomic_dir,
    hash_weights,
)
from tasks.outputs.cards import (
    CARD_FILE,
    MANIFEST_FILE,
    Lineage,
    public_config,
    read_front_matter,
    read_manifest,
    run_card,
    write_card,
)
from tasks.outputs.tables import SUMMARY_FILE, read_outputs
from tasks.select import KINSHIP_METRICS

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def find_run(run: str, root: Path) -> Path:
    """A run's results folder: RUN as a folder holding summary.json, else ROOT/results/RUN."""
    for folder in (Path(run), root / "results" / run):
        if (folder / SUMMARY_FILE).is_file():
            return folder
    runs = sorted(p.parent.name for p in (root / "results").glob(f"*/{SUMMARY_FILE}"))
    known = ", ".join(runs) if runs else f"none under {root / 'results'}"
    raise InputError(f"no finished run '{run}' (no {SUMMARY_FILE}); runs: {known}")


def find_model(rows: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """The results.csv row named `model` (its `model` or its `parents` column)."""
    wanted = " x ".join(part.strip() for part in model.split(" x "))
    for column in ("model", "parents"):
        matches = [r for r in rows if r[column] and r[column] == wanted]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(r["model"] for r in matches)
            raise InputError(f"'{model}' names {len(matches)} models ({names}); pick one of these")
    listing = ", ".join(r["model"] + (f" ({r['parents']})" if r["parents"] else "") for r in rows)
    raise InputError(f"no model '{model}' in this run; its models: {listing}")


def row_results(row: Mapping[str, Any]) -> dict[str, Any]:
    """avg, gain, scores and kinship of a results.csv row, as run_card takes them."""
    return {
        "avg": row.get("avg"),
        "gain": row.get("gain"),
        "scores": {
            k.removeprefix("score_"): v
            for k, v in row.items()
            if k.startswith("score_") and v is not None
        },
        "kinship": {k: row[k] for k in KINSHIP_METRICS if row.get(k) is not None},
    }


def check_push(repo_id: str) -> None:
    """Refuse a push that cannot work before any copying."""
    from huggingface_hub import constants

    if not REPO_ID.match(repo_id):
        raise InputError(f"--push {repo_id}: not a hub repo id (expected org/name)")
    if constants.is_offline_mode():
        raise InputError(
            f"--push {repo_id}: the hub is switched off here (HF_HUB_OFFLINE=1); "
            "unset it on a machine with network, or export with --to and upload later"
        )


def export_model(
    run_dir: Path, model: str, dest: Path, *, force: bool = False, hub_lineage: bool = False
) -> tuple[Lineage, str]:
    """Copy `model` of the run in `run_dir` to `dest` (atomically) with its card; verify the
    copy's weights; return its lineage and fingerprint."""
    rows, summary = read_outputs(run_dir)
    row = find_model(rows, model)
    if not (run_dir / MANIFEST_FILE).is_file():
        raise InputError(
            f"{run_dir} has no {MANIFEST_FILE} (the run predates export): run the same "
            "flows.evolve command again; it reuses every merge and evaluation and writes it"
        )
    lineage = read_manifest(run_dir)
    entry = lineage[row["model"]]
    source = Path(entry.path)
    if not source.is_dir():
        raise InputError(f"{row['model']}: its folder {source} is gone (store pruned or moved?)")
    if dest.exists() and not dest.is_dir():
        raise InputError(f"--to {dest}: is a file, not a folder")
    if dest.exists() and any(dest.iterdir()) and not force:
        raise InputError(f"--to {dest}: exists and is not empty; pass --force to replace it")

    with atomic_dir(dest) as tmp:
        for path in sorted(source.iterdir()):
            # the fingerprint sidecar is this machine's cache (keyed on mtimes), not the model's
            if path.name in (FINGERPRINT_FILE,) or path.name.startswith((PARTIAL_PREFIX, ".")):
                continue
            if path.is_dir():
                shutil.copytree(path, tmp / path.name)
            else:
                shutil.copy2(path, tmp / path.name)  # follows the hub cache's symlinks
        if entry.source != "hub" or not (tmp / CARD_FILE).is_file():
            # a hub model keeps its author's card; every other model gets this run's card
            card = run_card(
                entry,
                lineage,
                summary["run_name"],
                hub_lineage=hub_lineage,
                in_store=False,
                **row_results(row),
            )
            write_card(tmp, card)
        if entry.source == "merge":
            portable_merge_config(tmp, entry, lineage, summary["run_name"])
        fingerprint = verify_copy(tmp, entry, row)
    return entry, fingerprint


def portable_merge_config(
    folder: Path, entry: Lineage, lineage: Mapping[str, Lineage], run: str
) -> None:
    """Rewrite the copy's mergekit_config.yml without this machine's folders: each parent by its
    hub id or the run's name for it, as the card names them (the store's copy keeps the paths,
    so the merge can be redone here)."""
    import yaml

    path = folder / MERGEKIT_CONFIG_FILE
    if not path.is_file():
        return
    names = [lineage[p].card_id() for p in entry.parents]
    config = public_config(yaml.safe_load(path.read_text()), names)
    header = (
        f"# {entry.name} of run {run}, exported by flows.export: models are named as in the run's\n"
        "# results.csv (or by hub id); replace them with folders or hub ids to redo the merge\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))


def verify_copy(copy: Path, entry: Lineage, row: Mapping[str, Any]) -> str:
    """Re-hash the copy's weights. A merged, zoo or local model's fingerprint is that hash, and
    must equal the one the run recorded; a hub model's fingerprint pins the repo commit instead,
    so its copy must hash as its cache snapshot does."""
    got = hash_weights(copy)
    expected = row["fingerprint"] if entry.source != "hub" else hash_weights(Path(entry.path))
    if got != expected or row["fingerprint"] != entry.fingerprint:
        raise RuntimeError(
            f"{entry.name}: the copy's weights hash to {got}, the run recorded {expected}: "
            f"{entry.path} changed since the run; nothing was exported"
        )
    return got


def _unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the hub could not be reached. huggingface_hub's HTTP client is httpx or,
    in recent releases, its fork httpx2: match the exception families by name, not module."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"OfflineModeIsEnabled", "TransportError", "ConnectionError"})


def push(folder: Path, repo_id: str, message: str, private: bool) -> str:
    """Upload `folder` to the hub repo `repo_id` (created if new); its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
    except LocalTokenNotFoundError:
        raise InputError(
            f"--push {repo_id}: no hub token; set HF_TOKEN or run `hf auth login`"
        ) from None
    except HfHubHTTPError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"--push {repo_id}: the hub refused: {first}") from None
    except Exception as exc:
        if not _unreachable(exc):
            raise
        raise InputError(
            f"--push {repo_id}: cannot reach the hub ({type(exc).__name__}: {exc}); "
            "export with --to and upload from a machine with network"
        ) from None
    return str(url)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run name (results/RUN) or a results folder")
    parser.add_argument("model", help="a model of the run: `model-1-3`, `srt` or `srt x kb`")
    parser.add_argument("--to", type=Path, help="write the model folder here")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --to folder")
    parser.add_argument("--push", metavar="ORG/NAME", help="upload to this hub repo")
    parser.add_argument("--private", action="store_true", help="create the hub repo private")
    parser.add_argument("--root", type=Path, default=Path("."), help="project root (paths.root)")
    args = parser.parse_args(argv)
    if not args.to and not args.push:
        parser.error("say where: --to DIR, --push ORG/NAME, or both")
    try:
        if args.push:
            check_push(args.push)
        run_dir = find_run(args.run, args.root)
        with tempfile.TemporaryDirectory(prefix="export-") as scratch:
            dest = args.to or Path(scratch) / "model"
            entry, fingerprint = export_model(
                run_dir, args.model, dest, force=args.force, hub_lineage=bool(args.push)
            )
            print(f"exported {entry.name} of run {run_dir.name} to {dest} (weights {fingerprint})")
            if args.push:
                # the hub takes only hub repo ids as base_model (see tasks.outputs.cards.run_card)
                lineage = read_front_matter(dest / CARD_FILE).get("base_model") or "none"
                print(f"base_model on the hub: {lineage}")
                url = push(dest, args.push, f"{entry.name} of run {run_dir.name}", args.private)
                print(f"pushed to {url}")
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
