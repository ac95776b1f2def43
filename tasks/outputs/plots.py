"""Plots of an evolution run, after the paper's figures: the kinship matrix of the population
(Figure 5), performance, gain and kinship per generation (Figures 3, 4 and 6) and the family tree.

Every function reads plain rows (results.csv) or matrices and writes one PNG.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

ROLE_COLORS = {"foundation": "#4c72b0", "pair": "#55a868", "exploration": "#c44e52"}


def kinship_heatmap(
    names: Sequence[str], matrix: Sequence[Sequence[float]], metric: str, path: Path, title: str
) -> Path:
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n, 1.0 + 0.5 * n))
    cmap = "viridis_r" if metric == "ed" else "viridis"
    image = ax.imshow(matrix, cmap=cmap)
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=6, color="w"
                )
    fig.colorbar(image, ax=ax, label=metric.upper())
    ax.set_title(title)
    return save_figure(fig, path)


def generation_curves(
    rows: Sequence[Mapping[str, Any]], history: Sequence[Mapping[str, Any]], path: Path, title: str
) -> Path:
    """Avg per model and best/top-k mean per generation; gain and parent kinship per merge."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    gens = [h["generation"] for h in history]
    ax = axes[0]
    for role, color in ROLE_COLORS.items():
        pts = [(r["gen"], r["avg"]) for r in rows if r["role"] == role and r["avg"] is not None]
        if pts:
            ax.scatter(*zip(*pts, strict=True), color=color, label=role, s=18, alpha=0.8)
    ax.plot(gens, [h["best_avg"] for h in history], "k-", label="best so far")
    ax.plot(gens, [h["mean_avg_top_k"] for h in history], "k--", label="mean of top-k")
    ax.set(xlabel="generation", ylabel="average accuracy", title="performance (Fig. 3)")
    ax.legend(fontsize=7)

    merges = [r for r in rows if r["role"] != "foundation" and r["gain"] is not None]
    ax = axes[1]
    for role in ("pair", "exploration"):
        pts = [(r["gen"], r["gain"]) for r in merges if r["role"] == role]
        if pts:
            ax.scatter(*zip(*pts, strict=True), color=ROLE_COLORS[role], label=role, s=18)
    mean_gain = _mean_by_gen(merges, "gain")
    ax.plot(list(mean_gain), list(mean_gain.values()), "k-", label="mean gain")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="generation", ylabel="merge gain", title="gain (Fig. 4)")
    ax.legend(fontsize=7)

    ax = axes[2]
    for metric, style in (("pcc", "o-"), ("cs", "s--")):
        mean_kin = _mean_by_gen(merges, metric)
        if mean_kin:
            ax.plot(
                list(mean_kin), list(mean_kin.values()), style, label=f"merges' parent {metric}"
            )
    within = [(h["generation"], h["mean_kinship_top_k"]) for h in history]
    within = [p for p in within if p[1] is not None]
    if within:
        ax.plot(*zip(*within, strict=True), "k:", label="mean within top-k")
    ax.set(xlabel="generation", ylabel="kinship", title="kinship (Fig. 6)")
    ax.legend(fontsize=7)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return save_figure(fig, path)


def family_tree(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Children under parents: one row per generation, exploration merges in red, dashed."""
    by_gen: dict[int, list[str]] = {}
    for r in rows:
        by_gen.setdefault(int(r["gen"]), []).append(r["model"])
    width = max(len(v) for v in by_gen.values())
    pos = {
        name: ((i + 1) * width / (len(names) + 1), -gen)
        for gen, names in by_gen.items()
        for i, name in enumerate(names)
    }
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * width), 1.4 + 1.3 * len(by_gen)))
    for r in rows:
        if not r["parents"]:
            continue
        exploration = r["role"] == "exploration"
        for parent in str(r["parents"]).split(" x "):
            (x0, y0), (x1, y1) = pos[parent], pos[r["model"]]
            ax.plot(
                [x0, x1],
                [y0, y1],
                color=ROLE_COLORS["exploration"] if exploration else "#999999",
                ls="--" if exploration else "-",
                lw=1.2,
                zorder=1,
            )
    for r in rows:
        x, y = pos[r["model"]]
        avg = "" if r["avg"] is None else f"\n{100 * r['avg']:.1f}"
        ax.scatter([x], [y], s=500, color=ROLE_COLORS[r["role"]], zorder=2)
        ax.annotate(
            f"{r['model']}{avg}",
            (x, y),
            xytext=(0, -22),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=7,
        )
    ax.set_yticks([-g for g in by_gen], [f"gen {g}" for g in by_gen])
    ax.set_xticks([])
    ax.set_ylim(-max(by_gen) - 0.8, 0.5)
    ax.set_title(f"{title} (red dashed: exploration merges)")
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    return save_figure(fig, path)


def _mean_by_gen(rows: Sequence[Mapping[str, Any]], key: str) -> dict[int, float]:
    groups: dict[int, list[float]] = {}
    for r in rows:
        if r.get(key) is not None:
            groups.setdefault(int(r["gen"]), []).append(float(r[key]))
    return {g: sum(v) / len(v) for g, v in sorted(groups.items())}


def save_figure(fig: Any, path: Path) -> Path:
    """Write `fig` as a PNG at `path` atomically: a reader never sees half a picture."""
    from tasks.core.store import atomic_file

    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_file(path) as partial:
            fig.savefig(partial, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


RENDERED_INDEX = ".rendered.json"  # plot file -> fingerprint of what it was drawn from


def render_run(output_dir: Path, title: str, plots_dir: Path | None = None) -> list[Path]:
    """Every plot of a finished run, from the files the run wrote (results.csv, summary.json,
    the last generation's kinship/gen-*.csv: a heatmap per metric); used by the flow and by the
    DVC report stage. A plot whose inputs, title and drawing code are those it was last drawn
    from is kept, not drawn again: a resumed or fully cached run would otherwise spend most of
    its time redrawing the same pictures."""
    from tasks.core.store import stable_hash, write_json_atomic
    from tasks.outputs.tables import read_matrix_csv, read_outputs

    output_dir = Path(output_dir)
    rows, summary = read_outputs(output_dir)
    plots = Path(plots_dir) if plots_dir else output_dir / "plots"
    history = summary["history"]
    # (file, what it shows, how to draw it at a path)
    drawings: list[tuple[str, Any, Callable[[Path], Path]]] = [
        ("family_tree.png", rows, functools.partial(family_tree, rows, title=title)),
        (
            "generations.png",
            [rows, history],
            functools.partial(generation_curves, rows, history, title=title),
        ),
    ]
    for csv_path in last_matrices(output_dir / "kinship"):
        names, matrix, metric, gen = read_matrix_csv(csv_path)
        heading = f"{title}: {metric.upper()} kinship after generation {gen}"
        draw = functools.partial(kinship_heatmap, names, matrix, metric, title=heading)
        drawings.append((f"{csv_path.stem}.png", [names, matrix, metric], draw))
    index_path = plots / RENDERED_INDEX
    drawn = _read_index(index_path)
    code = _drawing_code()
    written = []
    for name, inputs, draw in drawings:
        key = stable_hash({"inputs": inputs, "title": title, "code": code})
        path = plots / name
        if drawn.get(name) != key or not path.is_file():
            draw(path)
            drawn[name] = key
        written.append(path)
    write_json_atomic(index_path, drawn)
    return written


def last_matrices(folder: Path) -> list[Path]:
    """Per metric, the kinship matrix of the last generation (`gen-<g>-<metric>.csv`): it holds
    every pair of the run's models, each earlier generation's matrix is a corner of it."""
    last: dict[str, tuple[int, Path]] = {}
    for path in folder.glob("gen-*-*.csv"):
        _, gen, metric = path.stem.split("-", 2)
        if gen.isdigit() and int(gen) >= last.get(metric, (-1, path))[0]:
            last[metric] = (int(gen), path)
    return sorted(path for _, path in last.values())


@functools.cache
def _drawing_code() -> str:
    """Fingerprint of this module and matplotlib's version: a change to either redraws."""
    import hashlib

    return hashlib.sha256(
        Path(__file__).read_bytes() + matplotlib.__version__.encode()
    ).hexdigest()[:16]


def _read_index(path: Path) -> dict[str, str]:
    try:
        drawn = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: draw everything
        return {}
    return drawn if isinstance(drawn, dict) else {}
