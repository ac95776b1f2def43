"""The run's story as Markdown, for Prefect's UI (a markdown artifact on the flow run): what was
run, each generation (best, S, why it stopped) and the results table, as results.csv has it."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from tasks.outputs.tables import PRINT_COLUMNS, format_table


def artifact_key(experiment: str, run_name: str) -> str:
    """Prefect's artifact keys allow lowercase letters, digits and dashes only; one key per
    experiment run, so a resumed or repeated run adds a version of the same artifact."""
    key = re.sub(r"[^a-z0-9]+", "-", f"evolution-{experiment}-{run_name}".lower())
    return key.strip("-")[:200]


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """`rows` as a Markdown table, cells as the console's table shows them (averages in %)."""
    if not rows:
        return "_none yet_"
    # the console's fixed-width table already formats every cell: split its columns back out
    text = format_table(rows, columns).splitlines()
    widths = [len(w) for w in text[1].split("  ")]
    cells = []
    for line in [text[0], *text[2:]]:
        row, start = [], 0
        for width in widths:
            row.append(line[start : start + width].strip() or " ")
            start += width + 2
        cells.append(row)
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c) + " |" for c in cells[1:]]
    return "\n".join(lines)


def run_markdown(
    summary: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    final: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The Markdown shown on the flow run's Artifacts tab."""
    out = [f"# {summary['experiment']} / {summary['run_name']}", ""]
    out.append(
        f"**{summary['status']}** ({summary['strategy']}, {summary['runtime']}): "
        f"stopped: {summary['stop_reason']}"
    )
    if summary.get("best_model"):
        out.append(
            f"\nbest **{summary['best_model']}** avg {100 * summary['best_avg']:.2f} "
            f"(best foundation {100 * (summary['best_foundation_avg'] or 0):.2f})"
        )
    history = summary.get("history") or []
    if history:
        out += ["", "## Generations", "", "| gen | best | best avg | mean avg (S) | kinship (S) "]
        out[-1] += "| S | stop |"
        out.append("|---|---|---|---|---|---|---|")
        for i, gen in enumerate(history):
            kin = gen.get("mean_kinship_top_k")
            stop = summary["stop_reason"] if i == len(history) - 1 else ""
            out.append(
                f"| {gen['generation']} | {gen['best']} | {100 * gen['best_avg']:.2f} | "
                f"{100 * gen['mean_avg_top_k']:.2f} | {'' if kin is None else f'{kin:.3f}'} | "
                f"{', '.join(gen['top_k'])} | {stop} |"
            )
    out += ["", "## Models", "", markdown_table(rows, PRINT_COLUMNS)]
    if final:
        columns = [c for c in final[0] if c != "fingerprint"]
        out += ["", "## Final benchmark", "", markdown_table(final, columns)]
    return "\n".join(out) + "\n"
