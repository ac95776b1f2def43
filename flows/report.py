"""Render the plots and table of finished runs: `python -m flows.report [RUN...] [--out DIR]`.

The DVC `report` stage runs this; it reads only the files a run wrote under results/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.outputs.plots import render_run
from tasks.outputs.tables import (
    SUMMARY_FILE,
    best_line,
    final_benchmark_line,
    format_table,
    read_outputs,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="*", type=Path, help="run folders (default: results/*)")
    parser.add_argument("--out", type=Path, help="write table.txt and plots/ here (one run)")
    args = parser.parse_args(argv)
    runs = args.runs or sorted(p.parent for p in Path("results").glob(f"*/{SUMMARY_FILE}"))
    if not runs:
        parser.error("no finished run found (results/*/summary.json); run flows.evolve first")
    if args.out and len(runs) > 1:
        parser.error("--out takes exactly one run folder")
    for run in runs:
        rows, summary = read_outputs(run)
        title = f"{summary['experiment']} / {summary['run_name']}"
        table = format_table(rows)
        headline = f"{run}: {best_line(summary)}; {summary['stop_reason']}"
        final = final_benchmark_line(summary)
        if final:
            headline += f"\n{final}"
            table += "\n\n" + _final_table(summary["final_scores"])
        written = render_run(run, title, args.out / "plots" if args.out else None)
        if args.out:
            (args.out / "table.txt").write_text(f"{headline}\n\n{table}\n")
        print(f"== {headline}\n{table}\nplots: {', '.join(str(p) for p in written)}\n")


def _final_table(final: dict[str, dict]) -> str:
    """The final benchmark's scores, one line per model in search-avg order (×100)."""
    ranked = sorted(final.items(), key=lambda kv: kv[1]["rank"])
    tasks = sorted({t for _, f in ranked for t in f["scores"]})
    lines = ["rank  model        search  final  " + "  ".join(tasks)]
    for name, f in ranked:
        scores = "  ".join(f"{100 * f['scores'][t]:>{len(t)}.2f}" for t in tasks)
        lines.append(
            f"{f['rank']:<4}  {name:<12} {100 * f['search_avg']:6.2f}  "
            f"{100 * f['avg']:5.2f}  {scores}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
