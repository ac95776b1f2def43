"""Benchmark: our merge step against mergekit's own `mergekit-yaml` CLI on the same config.

Builds a synthetic bf16 Llama (bench.kinship's generator: ~0.5B parameters, sharded safetensors,
plus a config.json) as a base and two variants, then, round by round in alternating order, runs
in a fresh subprocess each:
  - ours: tasks.merge.merge_or_reuse, the plain function a flow's merge step calls (config from
    conf/merge/<method>.yaml, atomic folder, mergekit_config.yml, fingerprint of the output);
  - cli:  mergekit-yaml on the mergekit_config.yml our first run wrote, with the same options
    (device cpu, seed, tokenizer copy, no model card).
Each run's wall time and peak RSS come from /usr/bin/time -v; the inputs are read once before
each run so every run starts from a warm page cache.

    python -m bench.merge_overhead [--size 0.5B] [--rounds 2] [--method slerp] [--workdir DIR]

The models go under --workdir (default: a new temp dir), are deleted at the end unless --keep,
and are reused if a previous --keep run left them there. The driver imports no torch: its RSS
stays out of the children's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.kinship import SIZES, n_params, warm_page_cache

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_YAML = Path(sys.executable).with_name("mergekit-yaml")
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def build(root: Path, size: str) -> list[Path]:
    """Base + two variants (bench.kinship) with a Llama config.json each; returns [base, v0, v1]."""
    from transformers import LlamaConfig

    from bench.kinship import build_models

    base, variants = build_models(root, size, 2)
    geometry = SIZES[size]
    heads = geometry["hidden"] // 64
    config = LlamaConfig(
        vocab_size=geometry["vocab"],
        hidden_size=geometry["hidden"],
        intermediate_size=geometry["inter"],
        num_hidden_layers=geometry["layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )
    for folder in (base, *variants):
        config.save_pretrained(folder)
    return [base, *variants]


def ours(request_file: Path) -> None:
    """One merge through the step's plain function (what merge_task runs); prints how long the
    import of tasks.merge (Prefect, for the @task) and the call itself took."""
    t0 = time.perf_counter()
    from tasks.merge import merge_or_reuse

    t1 = time.perf_counter()
    merge_or_reuse(**json.loads(request_file.read_text()))
    print(json.dumps({"import_s": t1 - t0, "call_s": time.perf_counter() - t1}))


def _timed(cmd: list[str]) -> dict[str, Any]:
    """Run `cmd` under /usr/bin/time -v: wall seconds and peak RSS (MB) of the child."""
    report = Path(tempfile.mkstemp(prefix="time-", suffix=".txt")[1])
    proc = subprocess.run(
        ["/usr/bin/time", "-v", "-o", str(report), *cmd],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
        check=False,
    )
    fields = {}
    for line in report.read_text().splitlines():
        key, _, value = line.strip().rpartition(": ")
        fields[key] = value
    report.unlink()
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-600:].strip()}
    try:
        own = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        own = {}
    h_m_s = [float(x) for x in fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")]
    wall = sum(v * 60**i for i, v in enumerate(reversed(h_m_s)))
    rss = int(fields["Maximum resident set size (kbytes)"]) / 1024
    return {"wall_s": wall, "peak_rss_mb": rss, **{k: round(v, 2) for k, v in own.items()}}


def _load() -> str:
    """The 1-, 5- and 15-minute load averages (2 cores here: above 2 means others compete)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.merge_overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--size", default="0.5B", choices=sorted(SIZES))
    parser.add_argument("--method", default="slerp")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ours", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        build(args.build, args.size)
        return 0
    if args.ours:
        ours(args.ours)
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    models = workdir / "models"
    print(f"synthetic bf16 Llama {args.size} ({n_params(args.size) / 1e9:.2f}B parameters)")
    subprocess.run(
        [sys.executable, "-m", "bench.merge_overhead", "--build", str(models), "--size", args.size],
        cwd=ROOT,
        check=True,
        env={**os.environ, **OFFLINE},
    )
    base, a, b = models / "base", models / "variant-0", models / "variant-1"
    request = {
        "merge_id": "bench",
        "parents": [str(a), str(b)],
        "method": args.method,
        "params": None,
        "base": str(base),
        "dtype": "bfloat16",
        "device": "cpu",
        "seed": 0,
    }
    request_file = workdir / "request.json"
    out_ours, out_cli = workdir / "out-ours", workdir / "out-cli"
    config_file = workdir / "mergekit_config.yml"
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "cli": []}
    print(f"load average before: {_load()}")
    try:
        for round_ in range(args.rounds):
            order = ("ours", "cli") if round_ % 2 == 0 else ("cli", "ours")
            for kind in order:
                shutil.rmtree(out_ours, ignore_errors=True)
                shutil.rmtree(out_cli, ignore_errors=True)
                warm_page_cache([base, a, b])
                if kind == "ours":
                    request_file.write_text(json.dumps({**request, "out_dir": str(out_ours)}))
                    cmd = [sys.executable, "-m", "bench.merge_overhead", "--ours"]
                    result = _timed([*cmd, str(request_file)])
                    if "error" not in result and not config_file.exists():
                        shutil.copy(out_ours / "mergekit_config.yml", config_file)
                else:
                    options = ["--device", "cpu", "--random-seed", "0", "--copy-tokenizer"]
                    options += ["--no-write-model-card", "--quiet"]
                    result = _timed([str(MERGEKIT_YAML), str(config_file), str(out_cli), *options])
                result |= {"round": round_ + 1, "load": _load()}
                runs[kind].append(result)
                print(f"  round {round_ + 1} {kind:<4} {json.dumps(result)}", flush=True)
                if "error" in result:
                    return 1
    finally:
        shutil.rmtree(out_ours, ignore_errors=True)
        shutil.rmtree(out_cli, ignore_errors=True)
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average after: {_load()}")
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "peak_rss_mb")}
        for k, v in runs.items()
    }
    print(f"\n{'':6} {'wall s (median)':>16} {'peak RSS MB (median)':>21}")
    for kind in ("ours", "cli"):
        print(f"{kind:6} {med[kind]['wall_s']:16.1f} {med[kind]['peak_rss_mb']:21.0f}")
    ratio_wall = med["ours"]["wall_s"] / med["cli"]["wall_s"]
    ratio_rss = med["ours"]["peak_rss_mb"] / med["cli"]["peak_rss_mb"]
    print(f"ours / mergekit-yaml: wall {ratio_wall:.3f}, peak RSS {ratio_rss:.3f} (goal: <= 1.05)")
    imports = statistics.median(r["import_s"] for r in runs["ours"])
    without = (med["ours"]["wall_s"] - imports) / med["cli"]["wall_s"]
    print(
        f"of ours, importing tasks.merge (Prefect for the @task; a flow has it already): "
        f"{imports:.1f} s; without it: wall {without:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
