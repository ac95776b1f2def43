"""The study's figures: kinship against gain (the paper's Fig. 2 analog), best avg by
generation per strategy over seeds (Fig. 6), and mean kinship within S by generation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.outputs.plots import plt, save_figure
from tasks.study.analysis import METRICS, RunRecord

STRATEGY_COLORS = {"greedy": "#4c72b0", "greedy_kinship": "#c44e52"}


def kinship_vs_gain(points: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """One panel per kinship metric; each merge a dot coloured by its generation."""
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.8))
    gens = sorted({p["gen"] for p in points}) or [1]
    cmap = plt.get_cmap("viridis", max(len(gens), 2))
    for ax, metric in zip(axes, METRICS, strict=True):
        for i, gen in enumerate(gens):
            pts = [
                (p[metric], p["gain"])
                for p in points
                if p["gen"] == gen and p.get(metric) is not None
            ]
            if pts:
                ax.scatter(*zip(*pts, strict=True), color=cmap(i), s=20, label=f"gen {gen}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel=f"parents' {metric.upper()} kinship", ylabel="merge gain")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def best_by_generation(runs: Sequence[RunRecord], path: Path, title: str) -> Path:
    """Best avg so far per generation: each strategy's mean over seeds, with a min–max band."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in sorted({r.strategy for r in runs}):
        chosen = [r for r in runs if r.strategy == strategy]
        last = max(r.history[-1]["generation"] for r in chosen)
        # a run that stopped keeps its best: carry it forward to the longest run's last generation
        curves = np.array(
            [
                [
                    max(h["best_avg"] for h in r.history if h["generation"] <= g)
                    for g in range(last + 1)
                ]
                for r in chosen
            ]
        )
        gens = np.arange(last + 1)
        color = STRATEGY_COLORS.get(strategy)
        ax.plot(gens, curves.mean(axis=0), "o-", color=color, label=f"{strategy} (n={len(chosen)})")
        if len(chosen) > 1:
            ax.fill_between(gens, curves.min(axis=0), curves.max(axis=0), color=color, alpha=0.2)
    ax.set(xlabel="generation", ylabel="best avg so far", title=title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def kinship_within_s(runs: Sequence[RunRecord], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        pts = [(h["generation"], h["mean_kinship_top_k"]) for h in run.history]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            ax.plot(
                *zip(*pts, strict=True),
                "o-",
                color=STRATEGY_COLORS.get(run.strategy),
                alpha=0.7,
                label=run.label,
            )
    ax.set(xlabel="generation", ylabel="mean kinship within S", title=title)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
