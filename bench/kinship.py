"""Benchmark: the streaming kinship engine against the reference's full-concatenation approach.

Builds synthetic bf16 Llama checkpoints (a base and variants whose deltas have a designed
correlation RHO), then times, each in a fresh subprocess with its own peak RSS:
  - naive: the reference's method (zjunlp/ModelKinship) - load the three whole models,
    concatenate the deltas in float32, torch.corrcoef / torch.dist / numpy |cos|;
  - ours: tasks.kinship.kinship (pcc, cs, ed in one streaming pass);
  - truth: a float64 tensor-by-tensor computation, for the accuracy columns;
  - matrix: tasks.kinship.kinship_matrix for N = 2, 4, 8 models.

    python -m bench.kinship [--workdir DIR] [--sizes 0.5B,2B] [--matrix 2,4,8] [--threads N]

The models go under --workdir (default: a new temp dir), are deleted at the end unless --keep,
and are reused if a previous --keep run left them there. 2B is timed for our engine only: the
naive method peaks at ~17 GB on 0.5B and would need ~4x that on 2B, more than this machine has.
Run with --threads 1 on a shared machine: with another process busy, torch's 2-thread OpenMP
regions stall (10-30x slower, measured), which would swamp every timing here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES = {  # Llama geometry (full multi-head attention), vocab 32000; "tiny" is a smoke test
    "tiny": {"vocab": 1000, "hidden": 128, "inter": 256, "layers": 2},
    "0.5B": {"vocab": 32000, "hidden": 1024, "inter": 4096, "layers": 26},
    "2B": {"vocab": 32000, "hidden": 2048, "inter": 5632, "layers": 36},
}
RHO = 0.5  # designed correlation between any two variants' deltas
SIGMA = 2e-3  # delta scale; the base weights are N(0, 0.02)
SHARD_BYTES = 1 << 30


def llama_tensors(vocab: int, hidden: int, inter: int, layers: int) -> list[tuple[str, tuple]]:
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(f"{p}self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        out += [
            (f"{p}mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}mlp.up_proj.weight", (inter, hidden)),
            (f"{p}mlp.down_proj.weight", (hidden, inter)),
            (f"{p}input_layernorm.weight", (hidden,)),
            (f"{p}post_attention_layernorm.weight", (hidden,)),
        ]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def n_params(size: str) -> int:
    return sum(math.prod(s) for _, s in llama_tensors(**SIZES[size]))


# -- building the models ----------------------------------------------------------------------


def _layout(tensors: list[tuple[str, tuple]]) -> list[tuple[str, list[tuple[str, tuple]]]]:
    """Shards of about SHARD_BYTES, in tensor order."""
    shards: list[list[tuple[str, tuple]]] = [[]]
    used = 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        if used and used + nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    k = len(shards)
    return [(f"model-{i + 1:05d}-of-{k:05d}.safetensors", s) for i, s in enumerate(shards)]


def _header(entries: list[tuple[str, tuple]]) -> bytes:
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = 2 * math.prod(shape)
        meta[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(meta, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(blob)) + blob


def build_models(root: Path, size: str, n_variants: int) -> tuple[Path, list[Path]]:
    """Base + variants, streamed tensor by tensor into sharded safetensors (flat memory).

    Variant i = base + SIGMA·(√RHO·z + √(1−RHO)·e_i): shared z, own e_i, so any two deltas
    correlate by RHO (less a little bf16 rounding noise)."""
    import torch

    base, variants = root / "base", [root / f"variant-{i}" for i in range(n_variants)]
    folders = [base, *variants]
    marker = root / "built.json"
    want = {"size": size, "n_variants": n_variants, "rho": RHO, "sigma": SIGMA}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return base, variants
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    layout = _layout(llama_tensors(**SIZES[size]))
    weight_map = {name: file for file, entries in layout for name, _ in entries}
    index = json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / "model.safetensors.index.json").write_text(index)
    gen = torch.Generator().manual_seed(1234)
    a, b = math.sqrt(RHO) * SIGMA, math.sqrt(1 - RHO) * SIGMA
    for file, entries in layout:
        handles = [open(folder / file, "wb") for folder in folders]  # noqa: SIM115
        try:
            for h in handles:
                h.write(_header(entries))
            for name, shape in entries:
                w = (
                    torch.ones(shape)
                    if name.endswith("norm.weight")
                    else torch.randn(shape, generator=gen) * 0.02
                )
                handles[0].write(w.bfloat16().view(torch.uint16).numpy().tobytes())
                shared = torch.randn(shape, generator=gen).mul_(a).add_(w)
                for h in handles[1:]:
                    v = torch.randn(shape, generator=gen).mul_(b).add_(shared)
                    h.write(v.bfloat16().view(torch.uint16).numpy().tobytes())
        finally:
            for h in handles:
                h.close()
    marker.write_text(json.dumps(want))
    gb = sum(f.stat().st_size for d in folders for f in d.glob("*.safetensors")) / 1e9
    took = time.perf_counter() - t0
    print(f"  built {size}: base + {n_variants} variants, {gb:.1f} GB in {took:.0f} s")
    return base, variants


# -- the measured computations (run in a child process) -----------------------------------------


def naive_reference(model_1: Path, model_2: Path, base: Path) -> dict[str, float]:
    """The reference's merge_cal: whole state dicts, float32 concatenated deltas."""
    import numpy
    import torch
    from safetensors.torch import load_file

    def state_dict(folder: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    sd_1, sd_2, sd_base = state_dict(model_1), state_dict(model_2), state_dict(base)
    num_rows = sd_base["lm_head.weight"].shape[0]
    d_1, d_2 = [], []
    for key, base_params in sd_base.items():
        if key not in sd_1 or key not in sd_2:
            continue
        p_b = base_params.float()
        d_1.append((sd_1[key][:num_rows].float() - p_b).view(-1))
        d_2.append((sd_2[key][:num_rows].float() - p_b).view(-1))
    del sd_1, sd_2, sd_base
    v_1, v_2 = torch.cat(d_1), torch.cat(d_2)
    del d_1, d_2
    pcc = torch.corrcoef(torch.stack((v_1, v_2), dim=0))[0, 1].item()
    ed = torch.dist(v_1, v_2).item()
    a, b = v_1.numpy(), v_2.numpy()
    cs = float(numpy.sqrt(numpy.dot(a, b) ** 2 / (numpy.dot(a, a) * numpy.dot(b, b))))
    return {"pcc": pcc, "cs": cs, "ed": ed}


def float64_truth(model_1: Path, model_2: Path, base: Path) -> dict[str, float]:
    """Tensor by tensor in float64 (slow, exact): the reference values for accuracy."""
    from safetensors import safe_open

    def handles(folder: Path) -> dict[str, Any]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            h = safe_open(str(f), framework="pt")
            out.update(dict.fromkeys(h.keys(), h))
        return out

    h_1, h_2, h_b = handles(model_1), handles(model_2), handles(base)
    s = dict.fromkeys(["n", "x", "y", "xx", "yy", "xy", "dd"], 0.0)
    for key in h_b:
        w = h_b[key].get_tensor(key).float().double().flatten()
        x = h_1[key].get_tensor(key).float().double().flatten() - w
        y = h_2[key].get_tensor(key).float().double().flatten() - w
        d = x - y
        s["n"] += x.numel()
        s["x"] += x.sum().item()
        s["y"] += y.sum().item()
        s["xx"] += x.dot(x).item()
        s["yy"] += y.dot(y).item()
        s["xy"] += x.dot(y).item()
        s["dd"] += d.dot(d).item()
    n = s["n"]
    cov = s["xy"] - s["x"] * s["y"] / n
    var = (s["xx"] - s["x"] ** 2 / n) * (s["yy"] - s["y"] ** 2 / n)
    cs = s["xy"] / math.sqrt(s["xx"] * s["yy"])
    return {"pcc": cov / math.sqrt(var), "cs": cs, "ed": math.sqrt(s["dd"])}


def measure(kind: str, paths: list[str], threads: int | None) -> dict[str, Any]:
    import psutil
    import torch

    from tasks.core.device import available_cores
    from tasks.kinship import kinship, kinship_matrix

    threads = threads or available_cores()
    torch.set_num_threads(threads)  # the naive script's and the truth's; ours run on numpy

    start_rss = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    *models, base = [Path(p) for p in paths]
    if kind == "ours":
        result: dict[str, Any] = kinship(models[0], models[1], base, threads=threads)
        result = {m: result[m] for m in ("pcc", "cs", "ed")}
    elif kind == "naive":
        result = naive_reference(models[0], models[1], base)
    elif kind == "truth":
        result = float64_truth(models[0], models[1], base)
    elif kind == "matrix":
        matrix = kinship_matrix(models, base, threads=threads)
        off = [(i, j) for i in range(len(models)) for j in range(len(models)) if i != j]
        result = {m: sum(matrix[m][i][j] for i, j in off) / len(off) for m in matrix}
    else:
        raise ValueError(kind)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "peak_rss_mb": _peak_rss() / 2**20,
        "start_rss_mb": start_rss / 2**20,
        **result,
    }


def _peak_rss() -> int:
    """This process's peak RSS in bytes. VmHWM, not ru_maxrss: Linux carries the parent's RSS at
    fork into the child's ru_maxrss across exec, so the big driver process would leak into it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the driver --------------------------------------------------------------------------------


def warm_page_cache(folders: list[Path]) -> None:
    """Read the files once so every measurement starts from a warm page cache."""
    for folder in folders:
        for f in folder.glob("*.safetensors"):
            with open(f, "rb", buffering=0) as fh:
                while fh.read(1 << 24):
                    pass


def run_child(kind: str, folders: list[Path], threads: int | None) -> dict[str, Any]:
    warm_page_cache(folders)
    cmd = [sys.executable, "-m", "bench.kinship", "--measure", kind, *map(str, folders)]
    if threads:
        cmd += ["--threads", str(threads)]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-400:].strip()}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(size: str, label: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{size:>5} {label:<18} ERROR {r['error']}"
    rss = f"{r['peak_rss_mb']:10.0f} {r['start_rss_mb']:9.0f}"
    return (
        f"{size:>5} {label:<18} {r['wall_s']:8.2f} {rss} "
        f"{r['pcc']:10.6f} {r['cs']:10.6f} {r['ed']:10.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kinship", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", type=Path, help="where to build the models (default: temp)")
    parser.add_argument("--sizes", default="0.5B,2B")
    parser.add_argument(
        "--matrix", default="2,4,8", help="N values for the matrix timing ('' = none)"
    )
    parser.add_argument("--repeat", type=int, default=2, help="runs of our engine (best kept)")
    parser.add_argument(
        "--threads", type=int, help="threads in the measured processes (default: all cores)"
    )
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the models for a later run")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.paths, args.threads)))
        return 0

    sizes = [s for s in args.sizes.split(",") if s]
    ns = [int(n) for n in args.matrix.split(",") if n]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kinship-bench-"))
    load = os.getloadavg()
    print(
        f"kinship bench: {os.cpu_count()} CPUs, threads {args.threads or 'all cores'}, "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; models under {workdir}\n"
        f"wall_s = the computation only (imports excluded); peakRSS = the process's VmHWM; "
        f"ours and matrix: best of {args.repeat}"
    )
    header = (
        f"{'size':>5} {'run':<18} {'wall_s':>8} {'peakRSS_MB':>10} {'startRSS':>9} "
        f"{'pcc':>10} {'cs':>10} {'ed':>10}"
    )
    print(header, flush=True)
    best: dict[str, dict[str, Any]] = {}
    naive = truth = None
    matrix: dict[int, dict[str, Any]] = {}

    def best_of(kind: str, folders: list[Path]) -> dict[str, Any]:
        runs = [run_child(kind, folders, args.threads) for _ in range(args.repeat)]
        ok = [r for r in runs if "error" not in r]
        return min(ok, key=lambda r: r["wall_s"]) if ok else runs[0]

    try:
        for size in sizes:
            n_var = max([2, *ns]) if size == sizes[0] else 2
            print(f"  [{size}] {n_params(size) / 1e9:.3f}B params per model", flush=True)
            base, variants = build_models(workdir / size, size, n_var)
            pair = [variants[0], variants[1], base]
            best[size] = best_of("ours", pair)
            print(_row(size, "ours (pair)", best[size]), flush=True)
            if size == sizes[0]:
                if not args.skip_naive:
                    naive = run_child("naive", pair, args.threads)
                    print(_row(size, "naive reference", naive), flush=True)
                truth = run_child("truth", pair, args.threads)
                print(_row(size, "float64 truth", truth), flush=True)
                for n in ns:
                    matrix[n] = best_of("matrix", [*variants[:n], base])
                    print(_row(size, f"matrix N={n} (mean)", matrix[n]), flush=True)
            if not args.keep:
                shutil.rmtree(workdir / size, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(summary(sizes, best, naive, truth, matrix)))
    return 0


def _ok(r: dict[str, Any] | None) -> bool:
    return bool(r) and "error" not in r


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def summary(
    sizes: list[str],
    best: dict[str, dict[str, Any]],
    naive: dict[str, Any] | None,
    truth: dict[str, Any] | None,
    matrix: dict[int, dict[str, Any]],
) -> list[str]:
    out = ["", "== summary =="]
    first = sizes[0]
    ours = best.get(first)
    if _ok(ours) and _ok(truth):
        for label, r in (("ours", ours), ("naive", naive)):
            if _ok(r):
                errs = ", ".join(
                    f"{m} {abs(r[m] - truth[m]) / abs(truth[m]):.1e}" for m in ("pcc", "cs", "ed")
                )
                out.append(f"{first} relative error vs float64 truth, {label}: {errs}")
        out.append(f"{first} designed PCC of the deltas: {RHO} (before bf16 rounding)")
    if _ok(ours) and _ok(naive):
        speed = naive["wall_s"] / ours["wall_s"]
        mem = naive["peak_rss_mb"] / ours["peak_rss_mb"]
        out.append(
            f"{first} naive/ours: time {speed:.1f}x, peak RSS {mem:.1f}x "
            f"[target >= 10x faster: {_verdict(speed >= 10)}]"
        )
    last = sizes[-1]
    if len(sizes) > 1 and _ok(ours) and _ok(best.get(last)):
        a, b = ours["peak_rss_mb"], best[last]["peak_rss_mb"]
        out.append(
            f"ours peak RSS {first} -> {last}: {a:.0f} -> {b:.0f} MB, growth {b - a:+.0f} MB "
            f"[target < 200 MB: {_verdict(b - a < 200)}]; time {ours['wall_s']:.2f} -> "
            f"{best[last]['wall_s']:.2f} s"
        )
    times = {n: r["wall_s"] for n, r in matrix.items() if _ok(r)}
    if times:
        line = ", ".join(f"N={n} ({n * (n - 1) // 2} pairs) {t:.2f} s" for n, t in times.items())
        out.append(f"{first} matrix: {line}")
    if 2 in times and 8 in times:
        ratio = times[8] / times[2]
        out.append(f"N=8 matrix / N=2 matrix: {ratio:.2f}x [target < 4x: {_verdict(ratio < 4)}]")
        if _ok(ours):
            ratio = times[8] / ours["wall_s"]
            out.append(f"N=8 matrix / pair call: {ratio:.2f}x [target < 4x: {_verdict(ratio < 4)}]")
        if _ok(naive):
            t = naive["wall_s"]
            out.append(
                f"28 pairwise naive calls for N=8 would take ~28 x {t:.1f} s = {28 * t:.0f} s"
            )
    return out


if __name__ == "__main__":
    sys.exit(main())
