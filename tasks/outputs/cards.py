"""Model cards: the README.md a merged folder carries, with Hugging Face front matter.

The front matter (`base_model`, `base_model_relation: merge`, `tags`, `library_name`) is what puts
a pushed model into the hub's model tree; the body says how the model was made (the mergekit
config), how it scored, how related its parents were (kinship) and in which generation.

Why the card may be rewritten inside a content-addressed store entry: the weights fingerprint
(tasks.core.store.hash_weights) covers only the weight files (*.safetensors, *.bin, ...), so
README.md can change without changing the entry's address, its fingerprint or `verify_model`. The
same entry can belong to several runs (at different generations, under different names), so the
card in the store describes the last run that evaluated it, and says so; `flows.export` writes the
card of whichever run is asked for. The card holds no absolute path, time or host: a re-run that
reuses everything writes the same bytes (and is skipped), so a DVC-tracked store does not change
and a fresh clone's store stays identical to the one pushed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.core.store import MERGEKIT_CONFIG_FILE, write_text_atomic

CARD_FILE = "README.md"
MANIFEST_FILE = "models.json"  # a run's models: where each lives, its source and lineage
TAGS = ["merge", "mergekit", "kinship-evolve"]
KINSHIP_NAMES = {
    "pcc": "Pearson correlation",
    "cs": "cosine similarity",
    "ed": "Euclidean distance",
}
# huggingface_hub's cache layout: <cache>/models--<org>--<name>/snapshots/<commit>/
HUB_CACHE_DIR = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")


@dataclass(frozen=True)
class Lineage:
    """One model of a run as a card and the exporter need it: where it lives and what it is."""

    name: str  # the run's name for it (results.csv `model`)
    path: str  # its folder
    fingerprint: str  # as the run recorded it
    source: str  # zoo | local | hub | merge
    role: str = "foundation"
    generation: int = 0
    parents: list[str] = field(default_factory=list)  # run names of its parents
    ref: str | None = None  # the reference as configured (foundations)
    hub_id: str | None = None  # `org/name` when it came from the hub
    revision: str | None = None  # the hub commit it resolved to

    def card_id(self) -> str:
        """How a card names this model: its hub id when it came from the hub (that is what the
        hub's model tree links), else the run's name for it."""
        return self.hub_id or self.name


def hub_origin(path: str | Path) -> tuple[str, str] | None:
    """(repo id, commit) when `path` is a snapshot folder of huggingface_hub's cache."""
    path = Path(path)
    match = (
        HUB_CACHE_DIR.match(path.parent.parent.name) if path.parent.name == "snapshots" else None
    )
    return (f"{match['org']}/{match['name']}", path.name) if match else None


def foundation_lineage(name: str, ref: str, path: str, fingerprint: str, source: str) -> Lineage:
    hub = hub_origin(path) if source == "hub" else None
    hub_id = hub[0] if hub else (ref.partition("@")[0] if source == "hub" else None)
    return Lineage(
        name, path, fingerprint, source, ref=ref, hub_id=hub_id, revision=hub[1] if hub else None
    )


def _path_identity(path: str) -> str:
    """What the merge step can say about a parent from its folder alone: the hub id of a cache
    snapshot, else the folder's name (a store entry's content address, or a zoo/local folder)."""
    hub = hub_origin(path)
    return hub[0] if hub else Path(path).name


def public_config(config: Mapping[str, Any], names: Sequence[str] = ()) -> dict[str, Any]:
    """The mergekit config with each local folder replaced by a name: the card shows how the merge
    was made without this machine's paths (mergekit_config.yml keeps them, so the merge can be
    re-run here). `names` are the parents' card names in the order of `models` (the order the
    merge step wrote them); any other folder (e.g. a shared base) gets `_path_identity`."""
    config = dict(config)
    paths = [m["model"] for m in config.get("models", [])]
    by_path = dict(zip(paths, names, strict=True)) if len(names) == len(paths) else {}
    by_path = {p: by_path.get(p) or _path_identity(p) for p in paths}
    if paths:
        config["models"] = [{**m, "model": by_path[m["model"]]} for m in config["models"]]
    if config.get("base_model"):  # SLERP's base is its first parent; TIES & co. the shared base
        config["base_model"] = by_path.get(config["base_model"]) or _path_identity(
            config["base_model"]
        )
    return config


def _front_matter(base_model: Sequence[str], merged: bool) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=list(base_model) or None,
        library_name="transformers",
        tags=list(TAGS) if merged else ["kinship-evolve"],
        # the hub's documented relations are adapter, merge, quantized and finetune
        base_model_relation="merge" if merged and base_model else None,
    )
    return data.to_yaml()


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def card_text(
    name: str,
    base_model: Sequence[str],
    *,
    parents: Sequence[Lineage] = (),
    merge_config: Mapping[str, Any] | None = None,
    run: str | None = None,
    generation: int | None = None,
    role: str | None = None,
    avg: float | None = None,
    gain: float | None = None,
    scores: Mapping[str, float] | None = None,
    kinship: Mapping[str, float] | None = None,
    in_store: bool = True,
) -> str:
    """The whole README.md: front matter, then what the model is and how it scored. `in_store`:
    the card of a shared store entry (it says which run it describes)."""
    from huggingface_hub import ModelCard

    merged = merge_config is not None
    lines = [f"# {name}", ""]
    if merged:
        method = merge_config.get("merge_method", "?")
        sources = [p.card_id() for p in parents] or list(base_model)
        made = f"A merge of {', '.join(f'`{b}`' for b in sources)} with mergekit ({method})"
        where = f", made by kinship-evolve in run `{run}`" if run else ", made by kinship-evolve"
        lines.append(f"{made}{where}.")
    else:
        lines.append(f"A foundation model of kinship-evolve run `{run}`." if run else "")
    if run:
        lines += [
            "",
            f"- run: `{run}`",
            f"- generation: {generation}",
            f"- role: {role}",
        ]
        if merged and in_store:
            lines.append(
                "- this folder is shared by every run that made the same merge; this card "
                f"describes run `{run}` (`python -m flows.export RUN MODEL` writes any run's card)"
            )
    if parents:
        lines += ["", "## Parents", "", "| parent | source | fingerprint |", "|---|---|---|"]
        for p in parents:
            source = f"hub `{p.hub_id}@{p.revision}`" if p.hub_id and p.revision else p.source
            label = p.name if p.card_id() == p.name else f"{p.name} (`{p.card_id()}`)"
            lines.append(f"| {label} | {source} | `{p.fingerprint}` |")
    if kinship:
        lines += ["", "## Kinship of its parents", "", "| metric | value |", "|---|---|"]
        rank = {m: i for i, m in enumerate(KINSHIP_NAMES)}
        for metric, value in sorted(kinship.items(), key=lambda kv: rank.get(kv[0], len(rank))):
            lines.append(f"| {KINSHIP_NAMES.get(metric, metric)} ({metric}) | {_number(value)} |")
    if avg is not None or scores:
        lines += ["", "## Scores", "", "| task | score |", "|---|---|"]
        for task, value in sorted((scores or {}).items()):
            lines.append(f"| {task} | {_number(value)} |")
        lines.append(f"| **average** | {_number(avg)} |")
        if gain is not None:
            lines += ["", f"Gain over the mean of its parents: {gain:+.4f}."]
    if merged:
        config = yaml.safe_dump(dict(merge_config), sort_keys=False).rstrip()
        lines += ["", "## Merge configuration", "", "```yaml", config, "```"]
    body = "\n".join(lines).rstrip() + "\n"
    # ModelCard parses the front matter back: a card it cannot read fails here, not on the hub
    card = ModelCard(f"---\n{_front_matter(base_model, merged)}\n---\n\n{body}")
    if card.data.to_dict().get("library_name") != "transformers":
        raise ValueError(f"model card front matter did not round-trip: {card.content[:200]}")
    return card.content


def merge_card(config: Mapping[str, Any], name: str = "merged model") -> str:
    """What the merge step knows: its parents by folder and the config. The run's card
    (`run_card`) replaces it once the merged model is evaluated."""
    public = public_config(config)
    return card_text(name, [m["model"] for m in public.get("models", [])], merge_config=public)


def run_lineage(models: Iterable[Any], foundations: Iterable[Any]) -> dict[str, Lineage]:
    """Lineage of a run's models from the lab's results (name, path, fingerprint, role,
    generation, parents) and the resolved foundation models (name, ref, path, fingerprint,
    source)."""
    resolved = {f.name: f for f in foundations}
    out = {}
    for m in models:
        if m.name in resolved:
            f = resolved[m.name]
            out[m.name] = foundation_lineage(f.name, f.ref, f.path, f.fingerprint, f.source)
        else:
            out[m.name] = Lineage(
                m.name,
                m.path,
                m.fingerprint,
                "merge",
                role=m.role,
                generation=m.generation,
                parents=list(m.parents or []),
            )
    return out


def run_card(
    model: Lineage,
    lineage: Mapping[str, Lineage],
    run: str,
    *,
    avg: float | None = None,
    gain: float | None = None,
    scores: Mapping[str, float] | None = None,
    kinship: Mapping[str, float] | None = None,
    hub_lineage: bool = False,
    in_store: bool = True,
) -> str:
    """The card of `model` as run `run` knows it. `hub_lineage` (for a push) lists in
    `base_model` only models on the hub, reaching through merged parents to their hub ancestors:
    the model tree links only hub repo ids, and the hub's metadata check may refuse others."""
    config_file = Path(model.path) / MERGEKIT_CONFIG_FILE
    parents = [lineage[p] for p in model.parents]
    if model.source == "merge" and not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; the store entry is incomplete")
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    names = [p.card_id() for p in parents]
    base_model = hub_ancestors(model, lineage) if hub_lineage else names
    return card_text(
        model.name,
        base_model,
        parents=parents,
        merge_config=public_config(config, names) if config is not None else None,
        run=run,
        generation=model.generation,
        role=model.role,
        avg=avg,
        gain=gain,
        scores=scores,
        kinship=kinship,
        in_store=in_store,
    )


def hub_ancestors(model: Lineage, lineage: Mapping[str, Lineage]) -> list[str]:
    """The nearest hub models among `model`'s ancestors, in order, each once."""
    out: list[str] = []
    for name in model.parents:
        parent = lineage[name]
        found = [parent.hub_id] if parent.hub_id else hub_ancestors(parent, lineage)
        out += [f for f in found if f not in out]
    return out


def write_card(folder: str | Path, text: str) -> bool:
    """Write README.md atomically (temp file + rename); skip identical text so a re-run leaves the
    file, its mtime and DVC's record of the store as they were. True when written."""
    path = Path(folder) / CARD_FILE
    if path.is_file() and path.read_text() == text:
        return False
    write_text_atomic(path, text)
    return True


def read_front_matter(path: str | Path) -> dict[str, Any]:
    """The YAML front matter of a README.md (empty when it has none)."""
    text = Path(path).read_text()
    if not text.startswith("---"):
        return {}
    return yaml.safe_load(text.split("---", 2)[1]) or {}


# -- a run's models -------------------------------------------------------------------------------


def write_manifest(output_dir: Path, models: Sequence[Lineage], root: Path) -> Path:
    """results/<run>/models.json: each model's folder (relative to the results folder when it
    lies under the project root, so a moved or cloned project still finds it), source, lineage."""
    import os

    from tasks.core.store import write_json_atomic

    output_dir, root = Path(output_dir), Path(root).resolve()
    entries = []
    for m in models:
        path = Path(m.path).resolve()
        inside = path.is_relative_to(root)
        entries.append(
            {**asdict(m), "path": os.path.relpath(path, output_dir) if inside else str(path)}
        )
    target = output_dir / MANIFEST_FILE
    write_json_atomic(target, {"models": entries})
    return target


def read_manifest(output_dir: Path) -> dict[str, Lineage]:
    output_dir = Path(output_dir)
    data = json.loads((output_dir / MANIFEST_FILE).read_text())
    out = {}
    for entry in data["models"]:
        path = Path(entry["path"])
        entry["path"] = str(path if path.is_absolute() else (output_dir / path).resolve())
        out[entry["name"]] = Lineage(**entry)
    return out
