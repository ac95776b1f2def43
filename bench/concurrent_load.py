"""Benchmark: loading models in concurrent threads of one process (transformers 5 race).

Each try starts N threads at once (a barrier), each loading a different model of one family
(bench/families.py: a base and N-1 variants, bf16, sharded), through
  - transformers: AutoModelForCausalLM.from_pretrained(dir, dtype=float32) + .to("cpu");
  - load_model:   the project's tasks.evaluate.load_model(dir, "cpu", "float32");
for a tied-embedding family (llama_tied: no lm_head tensor) and an untied control (llama).
A try fails when any of its N loads raises. The tries of all four variants are interleaved.

Why it fails: from_pretrained enters process-wide patches (transformers/modeling_utils.py
get_init_context): `init.no_tie_weights()` swaps the class attribute PreTrainedModel.tie_weights
for a no-op and restores "the original" it saved on entry; torch.set_default_dtype and
torch.linspace are patched the same way. Two interleaved loads can save each other's patch as the
original, so tie_weights stays a no-op for the rest of the process: a tied lm_head is never tied
to the loaded embedding, stays on the meta device, and `.to(device)` raises "Cannot copy out of
meta tensor". After each try this script checks those globals; a try that left them patched is
counted, one sequential load of a tied model is attempted in that state (does the damage outlive
the race?), and the globals are restored so tries stay independent (--no-restore keeps them).

--cold K also runs K fresh processes per loader whose threads do the first transformers import
themselves (the lazy-import race: `ImportError: cannot import name 'AutoModelForCausalLM'`).

    python -m bench.concurrent_load [--threads 3] [--repeats 10] [--cold 0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

ROOT = Path(__file__).resolve().parents[1]
LOADERS = ("transformers", "load_model")
KINDS = {"tied": "llama_tied", "untied": "llama"}


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]


def loader_fn(loader: str) -> Callable[[Path], Any]:
    if loader == "transformers":

        def load(path: Path) -> Any:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            return model.to("cpu")

        return load
    if loader == "load_model":

        def load(path: Path) -> Any:
            from tasks.evaluate import load_model

            return load_model(path, "cpu", "float32")[0]

        return load
    raise ValueError(f"unknown loader '{loader}'")


def concurrent_try(load: Callable[[Path], Any], paths: list[Path]) -> list[str | None]:
    """Load paths[i] in thread i, all released at once; each thread's error or None."""
    barrier = threading.Barrier(len(paths))
    errors: list[str | None] = [None] * len(paths)

    def work(i: int) -> None:
        barrier.wait()
        try:
            load(paths[i])
        except BaseException as exc:  # the error is the measurement
            errors[i] = _error(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


class Globals:
    """The process-wide state from_pretrained patches, as it was before any race."""

    def __init__(self) -> None:
        import torch
        from transformers import PreTrainedModel

        self.tie_weights = PreTrainedModel.tie_weights
        self.dtype = torch.get_default_dtype()
        self.linspace = torch.linspace

    def damaged(self) -> list[str]:
        import torch
        from transformers import PreTrainedModel

        out = []
        if PreTrainedModel.tie_weights is not self.tie_weights:
            out.append("PreTrainedModel.tie_weights")
        if torch.get_default_dtype() != self.dtype:
            out.append(f"default dtype {torch.get_default_dtype()}")
        if torch.linspace is not self.linspace:
            out.append("torch.linspace")
        return out

    def restore(self) -> None:
        import torch
        from transformers import PreTrainedModel

        PreTrainedModel.tie_weights = self.tie_weights
        torch.set_default_dtype(self.dtype)
        torch.linspace = self.linspace


def _quiet() -> None:
    """No progress bars or load reports (the patched-state check prints MISSING lm_head)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def build_models(workdir: Path, n: int) -> dict[str, list[Path]]:
    sys.path.insert(0, str(ROOT))
    _quiet()
    from bench.families import make_family

    models = {}
    for kind, family in KINDS.items():
        models[kind] = make_family(workdir, family, n_variants=n - 1, seed=0)["models"]
    return models


def run_warm(models: dict[str, list[Path]], repeats: int, restore: bool) -> dict[str, Any]:
    """Interleaved tries in this process (transformers already imported: no import race)."""
    from transformers import AutoModelForCausalLM  # noqa: F401 - import before any thread

    import tasks.evaluate  # noqa: F401

    state = Globals()
    stats: dict[str, dict[str, Any]] = {}
    for loader in LOADERS:
        for kind in KINDS:
            stats[f"{loader}/{kind}"] = {
                "loader": loader,
                "kind": kind,
                "tries": 0,
                "failed_tries": 0,
                "loads": 0,
                "failed_loads": 0,
                "damaging_tries": 0,
                "sequential_after_damage": [0, 0],  # [failed, attempted]
                "errors": Counter(),
                "seconds": 0.0,
            }
    for _ in range(repeats):
        for loader in LOADERS:
            for kind in KINDS:
                s = stats[f"{loader}/{kind}"]
                started = time.perf_counter()
                errors = concurrent_try(loader_fn(loader), models[kind])
                s["seconds"] += time.perf_counter() - started
                failed = [e for e in errors if e]
                s["tries"] += 1
                s["loads"] += len(errors)
                s["failed_tries"] += bool(failed)
                s["failed_loads"] += len(failed)
                s["errors"].update(failed)
                if state.damaged():
                    s["damaging_tries"] += 1
                    s["errors"].update(f"left patched: {d}" for d in state.damaged())
                    try:
                        loader_fn("transformers")(models["tied"][0])
                    except Exception:
                        s["sequential_after_damage"][0] += 1
                    s["sequential_after_damage"][1] += 1
                    if restore:
                        state.restore()
    for s in stats.values():
        s["errors"] = dict(s["errors"])
        s["seconds"] = round(s["seconds"], 2)
    return stats


def one_cold(loader: str, paths: list[Path]) -> None:
    """Child process: the threads race the first transformers import, then load."""
    if loader == "load_model":
        import tasks.evaluate  # noqa: F401 - the module, not transformers (load_model imports it)
    errors = concurrent_try(loader_fn(loader), paths)
    print(json.dumps(errors))


def run_cold(models: dict[str, list[Path]], count: int) -> dict[str, Any]:
    stats = {}
    for loader in LOADERS:
        s = {"loader": loader, "kind": "tied", "tries": 0, "failed_tries": 0, "errors": Counter()}
        for _ in range(count):
            cmd = [sys.executable, "-m", "bench.concurrent_load", "--one-cold", loader]
            cmd += [str(p) for p in models["tied"]]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
            try:
                errors = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                errors = [f"process failed rc={proc.returncode}: {proc.stderr[-200:]}"]
            failed = [e for e in errors if e]
            s["tries"] += 1
            s["failed_tries"] += bool(failed)
            s["errors"].update(failed)
        s["errors"] = dict(s["errors"])
        stats[f"cold {loader}/tied"] = s
    return stats


def report(stats: dict[str, Any], threads: int) -> str:
    lines = [
        f"{threads} threads per try; a try fails when any of its loads raises",
        f"{'variant':<26}{'failed tries':>14}{'failed loads':>14}{'left patched':>14}{'s':>8}",
    ]
    for name, s in stats.items():
        loads = f"{s['failed_loads']}/{s['loads']}" if "loads" in s else "-"
        damaged = f"{s['damaging_tries']}/{s['tries']}" if "damaging_tries" in s else "-"
        secs = f"{s['seconds']:.1f}" if "seconds" in s else "-"
        tries = f"{s['failed_tries']}/{s['tries']}"
        lines.append(f"{name:<26}{tries:>14}{loads:>14}{damaged:>14}{secs:>8}")
    for name, s in stats.items():
        seq = s.get("sequential_after_damage")
        if seq and seq[1]:
            lines.append(
                f"{name}: later sequential tied load, patched state: {seq[0]}/{seq[1]} failed"
            )
        for err, n in sorted(s["errors"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {name}: {n} x {err}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cold", type=int, default=0, help="fresh processes per loader")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-restore", action="store_true", help="keep patched globals")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--one-cold", default=None, help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_cold:
        one_cold(args.one_cold, args.paths)
        return 0
    with tempfile.TemporaryDirectory(prefix="concurrent-load-") as tmp:
        workdir = args.workdir or Path(tmp)
        models = build_models(workdir, args.threads)
        stats = run_warm(models, args.repeats, restore=not args.no_restore)
        if args.cold:
            stats.update(run_cold(models, args.cold))
    try:
        import transformers

        version = transformers.__version__
    except ImportError:  # pragma: no cover
        version = "?"
    print(f"transformers {version}, python {sys.version.split()[0]}")
    print(report(stats, args.threads))
    if args.json:
        args.json.write_text(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # pragma: no cover
        traceback.print_exc()
        sys.exit(1)
