"""Benchmark: the kinship command as a user runs it, whole process (interpreter start, imports,
reading, arithmetic, printing), against the naive full-concatenation script, quiet and beside
two CPU-bound processes, in one run.

    python -m bench.kinship_cli [--workdir DIR] [--size 0.5B] [--repeat 2] [--skip-naive]

Models are bench.kinship's synthetic bf16 Llamas (built once, kept in --workdir if given).
Every process starts from a warm page cache. The naive script is bench.kinship's
`naive_reference` (the reference's method: three whole state dicts, float32 concatenated
deltas) run as its own process, `python -m bench.kinship_cli --naive A B BASE`; on 0.5B it
peaks at about 17 GB, so it is skipped when less memory than that is available.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.kinship import build_models, n_params, naive_reference, warm_page_cache

ROOT = Path(__file__).resolve().parents[1]
NAIVE_GB = 18  # the naive script's peak on 0.5B, with some room (measured ~17 GB)


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def timed(cmd: list[str], folders: list[Path]) -> dict[str, Any]:
    """Wall time and peak RSS of one whole process (its own rusage, via wait4)."""
    warm_page_cache(folders)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            return {"error": err.read().decode()[-300:].strip()}
        return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "out": out.read().decode()}


class Busy:
    """Two CPU-bound processes (pure-Python loops) for the duration of a `with` block."""

    def __enter__(self) -> Busy:
        spin = [sys.executable, "-c", "while True: pass"]
        self.procs = [subprocess.Popen(spin) for _ in range(2)]
        time.sleep(1.0)  # let them reach the run queue
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kinship_cli", description=__doc__)
    parser.add_argument("--workdir", type=Path, help="models here, kept (default: temp, removed)")
    parser.add_argument("--size", default="0.5B", help="tiny, 0.5B or 2B (bench.kinship.SIZES)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of the CLI per setting")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--naive", nargs=3, metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.naive:  # the naive script itself, as its own process
        print(json.dumps(naive_reference(*map(Path, args.naive))))
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kinship-cli-bench-"))
    base, variants = build_models(workdir / args.size, args.size, 2)
    folders = [variants[0], variants[1], base]
    paths = list(map(str, folders))
    cli = [sys.executable, "-m", "flows.kinship", *paths, "pcc,cs,ed"]
    naive = [sys.executable, "-m", "bench.kinship_cli", "--naive", *paths]
    run_naive = not args.skip_naive and _available_gb() > NAIVE_GB * n_params(args.size) / 5e8
    load = os.getloadavg()
    print(
        f"kinship CLI bench: {args.size} bf16 models ({n_params(args.size) / 1e9:.3f}B params "
        f"each), {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n"
        f"whole-process wall seconds (warm page cache); CLI: median of {args.repeat}; "
        f"busy = beside two CPU-bound processes"
    )
    rows: dict[str, dict[str, Any]] = {}
    for setting in ("quiet", "busy"):
        with Busy() if setting == "busy" else _Nothing():
            runs = [timed(cli, folders) for _ in range(args.repeat)]
            ok = [r for r in runs if "error" not in r] or runs
            wall = statistics.median(r.get("wall_s", float("nan")) for r in ok)
            rows[f"cli {setting}"] = {**ok[0], "wall_s": wall}
            if run_naive:
                rows[f"naive {setting}"] = timed(naive, folders)
        for label in (f"cli {setting}", f"naive {setting}"):
            r = rows.get(label)
            if r is None:
                print(f"{label:<12} skipped (needs ~{NAIVE_GB} GB available per 0.5B)")
            elif "error" in r:
                print(f"{label:<12} ERROR {r['error']}")
            else:
                print(f"{label:<12} {r['wall_s']:7.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB")
    print("\n".join(summary(rows)))
    if not args.workdir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def summary(rows: dict[str, dict[str, Any]]) -> list[str]:
    def wall(label: str) -> float | None:
        r = rows.get(label)
        return r["wall_s"] if r and "error" not in r else None

    out = ["", "== summary =="]
    for setting in ("quiet", "busy"):
        c, n = wall(f"cli {setting}"), wall(f"naive {setting}")
        if c and n:
            ok = "MET" if n / c >= 8 else "NOT MET"
            out.append(f"{setting}: naive / CLI = {n:.2f} / {c:.2f} s = {n / c:.1f}x [>= 8x: {ok}]")
    c_q, c_b = wall("cli quiet"), wall("cli busy")
    if c_q and c_b:
        ok = "MET" if c_b / c_q <= 2 else "NOT MET"
        out.append(f"CLI busy / quiet = {c_b:.2f} / {c_q:.2f} s = {c_b / c_q:.1f}x [<= 2x: {ok}]")
    return out


if __name__ == "__main__":
    sys.exit(main())
