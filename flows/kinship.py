"""The kinship command: `python -m flows.kinship MODEL_1 MODEL_2 BASE [pcc,cs,ed]`, or
`--matrix MODEL... --base BASE`. The arithmetic is tasks/kinship.py's; this file only parses,
prints and exits (2 on bad input)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.core.device import available_cores, set_threads
from tasks.delta import VOCAB_MISMATCH
from tasks.kinship import DEFAULT_CHUNK, METRICS, check_metrics, kinship, kinship_matrix


def _json_safe(obj: Any) -> Any:
    """NaN (undefined PCC/CS of a zero delta) as null: strict JSON has no NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _print_matrix(names: list[str], result: dict[str, Any], metrics: list[str]) -> None:
    width = max(10, *(len(n) for n in names))
    for metric in metrics:
        print(f"{metric.upper()}")
        print(" " * width + "".join(f" {n[-12:]:>12}" for n in names))
        for name, row in zip(names, result[metric], strict=True):
            print(f"{name:>{width}}" + "".join(f" {v:12.6f}" for v in row))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.kinship",
        description="Model kinship: PCC, cosine similarity (CS) and Euclidean distance (ED) of "
        "delta parameters against a shared base, streamed from safetensors. Usage like the "
        "reference: MODEL_1 MODEL_2 BASE pcc,cs,ed; or --matrix MODEL... --base BASE.",
    )
    parser.add_argument("args", nargs="*", metavar="MODEL_1 MODEL_2 BASE [METRICS]")
    parser.add_argument("--matrix", nargs="+", metavar="MODEL", help="kinship matrix of N models")
    parser.add_argument("--base", help="the shared base model (with --matrix)")
    parser.add_argument("--metrics", help="comma-separated subset of pcc,cs,ed (default: all)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--per-tensor", action="store_true", help="add a per-tensor breakdown")
    parser.add_argument("--abs-cosine", action="store_true", help="|cos|, as the reference")
    parser.add_argument("--vocab-mismatch", choices=VOCAB_MISMATCH, default="shared_rows")
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (default), cpu, cuda or cuda:N. auto: CUDA when a GPU driver is visible "
        "(/proc/driver/nvidia/gpus lists a GPU, or ROCm's /dev/kfd exists, and "
        "CUDA_VISIBLE_DEVICES does not hide them all) and torch finds a device there; else the "
        "CPU, where numpy does the arithmetic and torch is not imported",
    )
    parser.add_argument("--chunk-elems", type=int, default=DEFAULT_CHUNK)
    parser.add_argument(
        "--threads",
        type=int,
        help="threads sharing the CPU arithmetic, and torch's (default: the cores this process "
        "may use, busy or not: numpy's threads do not spin-wait as OpenMP's do, and beside busy "
        "processes each thread gets its share of the CPU)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    threads = max(1, args.threads or available_cores())
    set_threads(threads)
    options: dict[str, Any] = {
        "threads": threads,
        "device": args.device,
        "abs_cosine": args.abs_cosine,
        "vocab_mismatch": args.vocab_mismatch,
        "chunk_elems": args.chunk_elems,
        "progress": not args.no_progress,
    }
    try:
        if args.matrix:
            if not args.base or args.args:
                parser.error("--matrix MODEL... needs --base BASE and no positional models")
            if args.per_tensor:
                parser.error("--per-tensor applies to a pair, not to --matrix")
            metrics = check_metrics(args.metrics or list(METRICS))
            result: dict[str, Any] = kinship_matrix(args.matrix, args.base, metrics, **options)
            result = {"models": args.matrix, "base": args.base, **result}
        else:
            if len(args.args) not in (3, 4):
                parser.error("give MODEL_1 MODEL_2 BASE [METRICS], or --matrix MODEL... --base B")
            if len(args.args) == 4 and args.metrics:
                parser.error("metrics given twice (positional and --metrics)")
            metrics = check_metrics(
                args.args[3] if len(args.args) == 4 else args.metrics or METRICS
            )
            a, b, base = args.args[:3]
            result = kinship(a, b, base, metrics, per_tensor=args.per_tensor, **options)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_json_safe(result), indent=2))
    elif args.matrix:
        _print_matrix([Path(m).name for m in args.matrix], result, metrics)
    else:
        names = {"pcc": "PCC", "cs": "|CS|" if args.abs_cosine else "CS", "ed": "ED"}
        for metric in metrics:
            print(f"Model kinship ({names[metric]}): {result[metric]:.6f}")
        print(f"over {result['n_params']:,} delta parameters")
        if result["skipped"]:
            print(f"skipped (not floating point): {', '.join(result['skipped'])}")
        for label, absent in result["missing"].items():
            print(f"missing from {label}: {', '.join(absent)}")
        if result["truncated"]:
            print(f"shared vocabulary rows only: {', '.join(result['truncated'])}")
        for copy, matrix in result["tied"].items():
            print(f"tied embeddings: {copy} is {matrix}, counted once")
        for name, values in result.get("per_tensor", {}).items():
            print(f"  {name}: " + " ".join(f"{m}={values[m]:.6f}" for m in metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
